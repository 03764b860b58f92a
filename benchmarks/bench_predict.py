"""Whole-volume segmentation throughput: predict_segmentation's batched path against a one-slice loop.

    python benchmarks/bench_predict.py                                   # 512x512x200 phantom, U-Net width 64
    python benchmarks/bench_predict.py --slices 24 --device cpu --ablation
    python benchmarks/bench_predict.py --checkpoint best.ckpt --device cuda

Both paths segment the same CT phantom (written with phantom.write_phantom_case and read back with
load_volume; the read is timed apart) from HU slices to labels at native size, in slices/s:

- batched: `predict_segmentation.segment_slices`, the script's real code path: the whole volume
  windowed and resized at once, `--batch-size` 2.5D stacks per forward, inference_mode, batch norms
  folded into the convs, channels-last, bf16 autocast on CUDA;
- one slice: a plain loop, for each slice its stack windowed and resized, one float32 forward under
  no_grad with the network as trained (BN separate, default layout), logits upsampled, argmax.

`--ablation` also times the batched path with single changes undone, to show what each one brings.
Paths run in rounds (`--repeats`), each round over all paths, and the best round counts: on a shared
machine that keeps the comparison fair. The last line printed is the ratio batched / one-slice.
"""
from __future__ import annotations

import argparse
import copy
import platform
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from inference import Checkpoint, load_checkpoint, pick_device  # noqa: E402
from phantom import write_phantom_case  # noqa: E402
from predict_segmentation import segment_slices  # noqa: E402
from volumes import context_indices, load_volume, resize_slices, run_cli, window_hu  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Slices/s of whole-volume segmentation: batched path vs one-slice loop.")
    p.add_argument("--slices", type=int, default=200, help="slices of the phantom (default: 200)")
    p.add_argument("--size", type=int, default=512, help="in-plane size of the phantom (default: 512)")
    p.add_argument("--base-width", type=int, default=64, help="U-Net width, randomly initialised (default: 64)")
    p.add_argument("--image-size", type=int, default=256, help="model resolution (default: 256)")
    p.add_argument("--context-slices", type=int, default=1, help="2.5D neighbours on each side (default: 1)")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="segmentation checkpoint instead of a random U-Net (default: none)")
    p.add_argument("--batch-size", type=int, default=32, help="batched path's slices per forward (default: 32)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto takes CUDA when available (default: auto)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--ablation", action="store_true",
                   help="also time the batched path without each of its changes (default: off)")
    p.add_argument("--repeats", type=int, default=2,
                   help="rounds over all paths; the best round counts (default: 2)")
    p.add_argument("--seed", type=int, default=0, help="phantom and initialisation seed (default: 0)")
    return p


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device) -> tuple[float, object]:
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def one_slice_loop(net: torch.nn.Module, hu: np.ndarray, hp: dict, device: torch.device) -> np.ndarray:
    """The straightforward way: per slice its stack, window, resize, one float32 forward, upsample, argmax."""
    num, size = hu.shape[0], hu.shape[1:]
    labels = np.empty(hu.shape, dtype=np.uint8)
    with torch.no_grad():
        for z in range(num):
            stack = hu[context_indices(z, num, hp["context_slices"])]  # (C, H, W)
            x = resize_slices(window_hu(torch.from_numpy(stack), hp["window"]), hp["image_size"])[None]  # (1, C, S, S)
            logits = net(x.to(device))  # (1, 3, S, S)
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)  # (1, 3, H, W)
            labels[z] = logits.argmax(dim=1)[0].to(torch.uint8).cpu().numpy()
    return labels


@contextmanager
def no_grad_instead_of_inference_mode():
    saved = torch.inference_mode
    torch.inference_mode = lambda *a, **k: torch.no_grad()
    try:
        yield
    finally:
        torch.inference_mode = saved


def machine() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        model = next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "")
    except OSError:
        model = ""
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{model or platform.processor()}, {torch.get_num_threads()} torch threads{gpu}, torch {torch.__version__}"


def main(args: argparse.Namespace) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    torch.manual_seed(args.seed)
    if args.checkpoint is not None:
        ckpt = load_checkpoint(args.checkpoint, "segmentation")
    else:
        from lit_model import build_network
        hp = {**_segmenter_defaults(), "base_width": args.base_width, "image_size": args.image_size,
              "context_slices": args.context_slices, "in_channels": 2 * args.context_slices + 1}
        ckpt = Checkpoint(Path("random-init"), hp, build_network(hp).state_dict())
    hp = ckpt.hparams
    raw = build_network_from(ckpt).eval().to(device)  # as trained: BN separate, default layout, float32
    net = ckpt.network(device)  # the predict script's network preparation

    with tempfile.TemporaryDirectory() as tmp:
        vol_path, _ = write_phantom_case(tmp, 0, size=args.size, seed=args.seed, num_slices=args.slices,
                                         flips=(False, False, False))
        load_s, (hu, _) = timed(lambda: load_volume(vol_path), device)
    num = hu.shape[0]
    print(f"machine: {machine()}; device {device}")
    print(f"phantom {args.size}x{args.size}x{num}, U-Net width {hp['base_width']}, image size {hp['image_size']}, "
          f"context {hp['context_slices']}; reading the NIfTI took {load_s:.2f} s (not in the rates below)")

    # Warm-up: the first calls pay for thread start-up and kernel selection.
    segment_slices(net, hu[:2], hp, device, args.batch_size)
    one_slice_loop(raw, hu[:2], hp, device)

    paths = {"batched": lambda: segment_slices(net, hu, hp, device, args.batch_size),
             "one_slice": lambda: one_slice_loop(raw, hu, hp, device)}
    if args.ablation:
        unfolded = copy.deepcopy(raw).to(memory_format=torch.channels_last)
        contiguous = copy.deepcopy(net).to(memory_format=torch.contiguous_format)

        def no_grad_run():
            with no_grad_instead_of_inference_mode():
                return segment_slices(net, hu, hp, device, args.batch_size)

        paths.update({
            "batched, batch size 1": lambda: segment_slices(net, hu, hp, device, 1),
            "batched, batch size 8": lambda: segment_slices(net, hu, hp, device, 8),
            "batched, BN not folded": lambda: segment_slices(unfolded, hu, hp, device, args.batch_size),
            "batched, contiguous layout": lambda: segment_slices(contiguous, hu, hp, device, args.batch_size),
            "batched, no_grad not inference_mode": no_grad_run,
        })
        if device.type == "cpu":
            def cpu_bf16():
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    return segment_slices(net, hu, hp, device, args.batch_size)
            paths["batched + bf16 autocast on CPU (not the script's path)"] = cpu_bf16
    # Rounds over all paths, so a change in the machine's load hits every path alike; best of the rounds.
    seconds: dict[str, list[float]] = {name: [] for name in paths}
    labels = {}
    for _ in range(args.repeats):
        for name, fn in paths.items():
            took, out = timed(fn, device)
            seconds[name].append(took)
            labels[name] = out
    print(f"{'path':58s} {'best':>8s} {'median':>8s}  slices/s over {args.repeats} round(s)")
    rates = {}
    for name, times in seconds.items():
        rates[name] = num / min(times)
        print(f"{name:58s} {rates[name]:8.3f} {num / float(np.median(times)):8.3f}")
    agree = float((labels["batched"] == labels["one_slice"]).mean())
    print(f"labels equal between the two paths: {100 * agree:.3f} % of voxels")
    ratio = rates["batched"] / rates["one_slice"]
    print(f"ratio batched / one-slice: {ratio:.2f}x")
    return {**rates, "ratio": ratio, "agreement": agree}


def _segmenter_defaults() -> dict:
    import inspect

    from lit_model import LitSegmenter
    return {k: v.default for k, v in inspect.signature(LitSegmenter.__init__).parameters.items()
            if v.default is not inspect.Parameter.empty}


def build_network_from(ckpt: Checkpoint) -> torch.nn.Module:
    from lit_model import build_network
    net = build_network(ckpt.hparams)
    net.load_state_dict(ckpt.state_dict)
    return net


if __name__ == "__main__":
    sys.exit(run_cli(main, get_args_parser()))
