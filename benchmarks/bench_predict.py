"""Segmentation prediction benchmarks: the fast default path against --exact, end to end; and the
batched path's throughput against a one-slice loop.

    python benchmarks/bench_predict.py --checkpoint best.ckpt                     # 512x512x200, end to end
    python benchmarks/bench_predict.py --checkpoint best.ckpt --memory-slices 500  # + peak memory at 500 slices
    python benchmarks/bench_predict.py --task classification --checkpoint cls.ckpt # bf16 vs --exact float32
    python benchmarks/bench_predict.py --checkpoint best.ckpt --fast-settings 2,8,24 2,8,16 4,8,24  # in-process
    python benchmarks/bench_predict.py --widths 16 32 64                          # U-Net forward rate per width
    python benchmarks/bench_predict.py --throughput --slices 24 --device cpu --ablation

End to end (the default): a CT phantom (`phantom.write_phantom_case`, 512x512x200 unless told) is
written to a temporary folder; `predict_segmentation.py` runs on it as a user runs it, in a child
process, once with the default (fast) path and once with --exact, after one untimed warm-up run of
the fast path (it loads torch and the files into the page cache). For each: seconds from process
start to exit (the NIfTI written), the child's peak resident memory (GNU time's %M), and Dice of
liver (label >= 1) and tumour (label 2) against the phantom's reference labels and between the two
paths (`evaluate.dice_from_counts`: both empty -> 1). The last lines are the ratio exact / fast
and, with --memory-slices, the fast path's peak memory on a longer volume. The checkpoint should be
trained (on phantoms: `train.py --task segmentation --data-dir <phantoms>`), or the region finding
has no liver to find.

Throughput (`--throughput`): both paths segment the same phantom in this process (the read is timed
apart), from HU slices to labels at native size, in slices/s:
- batched: `inference.segment(..., fast=False)`, the exact path of the predict script: the whole
  volume windowed and resized at once, `--batch-size` 2.5D stacks per forward, inference_mode, batch
  norms folded into the convs, channels-last, bf16 autocast on CUDA;
- one slice: a plain loop, for each slice its stack windowed and resized, one float32 forward under
  no_grad with the network as trained (BN separate, default layout), logits upsampled, argmax.
`--ablation` also times the batched path with single changes undone, to show what each one brings.
Paths run in rounds (`--repeats`), each round over all paths, and the best round counts: on a shared
machine that keeps the comparison fair. The last line printed is the ratio batched / one-slice.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
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

from inference import Checkpoint, load_checkpoint, pick_device, segment  # noqa: E402
from phantom import write_phantom_case  # noqa: E402
from volumes import DataError, context_indices, load_volume, resize_slices, run_cli, window_hu  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def segment_slices(net, hu, hp, device, batch_size):
    """The predict script's exact path, in this process."""
    return segment(net, hu, hp, device, fast=False, batch_size=batch_size)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Segmentation prediction: the fast path against --exact end to end, "
                                            "or (--throughput) slices/s of the batched path against a one-slice loop.")
    p.add_argument("--throughput", action="store_true",
                   help="measure slices/s in this process, batched vs one slice (default: end to end, fast vs --exact)")
    p.add_argument("--memory-slices", type=int, default=None, metavar="N",
                   help="end to end: also the fast path's peak memory on a 512x512xN phantom (default: none)")
    p.add_argument("--widths", type=int, nargs="+", default=None, metavar="W",
                   help="instead: forward slices/s and GFLOP per slice of randomly initialised U-Nets of these widths "
                        "at --image-size, float32 and (on a CPU with native bf16) bf16 (default: off)")
    p.add_argument("--fast-settings", nargs="+", default=None, metavar="F,S,M",
                   help="instead: in this process, the fast path's segment() with coarse factor F, coarse stride S "
                        "and margin M (model pixels) against the exact path, on the phantom (default: off)")
    p.add_argument("--task", choices=["segmentation", "classification"], default="segmentation",
                   help="end to end: which predict script and checkpoint; for classification the paths differ in "
                        "precision only (bf16 on a CPU with native bf16 vs --exact float32) (default: segmentation)")
    p.add_argument("--skip-exact", action="store_true",
                   help="end to end: time the fast path only (default: both)")
    p.add_argument("--slices", type=int, default=200, help="slices of the phantom (default: 200)")
    p.add_argument("--size", type=int, default=512, help="in-plane size of the phantom (default: 512)")
    p.add_argument("--base-width", type=int, default=32, help="U-Net width, randomly initialised (default: 32, the U-Net default)")
    p.add_argument("--image-size", type=int, default=256, help="model resolution (default: 256)")
    p.add_argument("--context-slices", type=int, default=1, help="2.5D neighbours on each side (default: 1)")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="segmentation checkpoint; needed end to end, else a random U-Net (default: none)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="slices per forward (default: the predict script's own end to end, 32 for --throughput)")
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


def host_line() -> str:
    """The header line of an end-to-end benchmark: the machine, the cores this process may use, and
    OMP_NUM_THREADS (child processes inherit both)."""
    return (f"machine: {machine()}; {len(os.sched_getaffinity(0))} core(s) this process may use; "
            f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")


def write_bench_phantom(folder: Path, args: argparse.Namespace) -> tuple[Path, Path]:
    """The benchmark's phantom (--size, --slices, --seed) written into `folder`; says how long it took."""
    start = time.perf_counter()
    vol, seg = write_phantom_case(folder, 0, size=args.size, seed=args.seed, num_slices=args.slices)
    print(f"phantom {args.size}x{args.size}x{args.slices} written in {time.perf_counter() - start:.1f} s "
          f"(not timed below)")
    return vol, seg


def machine() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        model = next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "")
    except OSError:
        model = ""
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{model or platform.processor()}, {torch.get_num_threads()} torch threads{gpu}, torch {torch.__version__}"



def main(args: argparse.Namespace) -> dict:
    if args.widths:
        return width_speed(args)
    if args.fast_settings:
        return fast_settings(args)
    return throughput(args) if args.throughput else end_to_end(args)


def fast_settings(args: argparse.Namespace) -> dict:
    """segment() in this process (no start-up, no file writing): the exact path once, then the fast
    path with each setting, each timed once; Dice after `postprocess`, as the script writes it."""
    import inference
    from inference import postprocess
    from volumes import load_label_volume
    if args.checkpoint is None:
        raise DataError("--fast-settings needs --checkpoint: a trained segmentation checkpoint")
    ckpt = load_checkpoint(args.checkpoint, "segmentation")
    device = pick_device(args.device)
    net = ckpt.network(device)
    with tempfile.TemporaryDirectory() as tmp:
        vol, seg = write_phantom_case(tmp, 0, size=args.size, seed=args.seed, num_slices=args.slices)
        hu, _ = load_volume(vol)
        truth, _ = load_label_volume(seg)
    print(f"machine: {machine()}; {len(os.sched_getaffinity(0))} core(s) this process may use")
    start = time.perf_counter()
    exact = postprocess(segment(net, hu, ckpt.hparams, device, fast=False))
    print(f"phantom {args.size}x{args.size}x{args.slices}; exact path {time.perf_counter() - start:.1f} s, "
          f"Dice vs reference liver {region_dice(exact, truth)[0]:.4f}")
    print("| coarse factor | coarse stride | margin (px) | segment (s) | liver Dice vs --exact | "
          "liver Dice vs reference | full-res slices run | share of volume | grown |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    saved = (inference.COARSE_FACTOR, inference.COARSE_STRIDE, inference.MARGIN_PX)
    out = []
    try:
        for setting in args.fast_settings:
            factor, stride, margin = (int(v) for v in setting.split(","))
            inference.COARSE_FACTOR, inference.COARSE_STRIDE, inference.MARGIN_PX = factor, stride, margin
            info: list = []
            start = time.perf_counter()
            fast = postprocess(segment(net, hu, ckpt.hparams, device, fast=True, info=info))
            took = time.perf_counter() - start
            f = info[0]
            print(f"| {factor} | {stride} | {margin} | {took:.1f} | {region_dice(fast, exact)[0]:.4f} | "
                  f"{region_dice(fast, truth)[0]:.4f} | {f.full_slices} | {f.share:.3f} | {f.grown} |", flush=True)
            out.append({"setting": setting, "seconds": took})
    finally:
        inference.COARSE_FACTOR, inference.COARSE_STRIDE, inference.MARGIN_PX = saved
    return {"settings": out}


def width_speed(args: argparse.Namespace, seconds: float = 8.0) -> dict:
    """Forward rate of the bare U-Net per width: batches of 8 random 2.5D stacks, channels-last, BN
    folded, inference_mode, for `seconds` after a warm-up batch; FLOPs counted by torch."""
    from torch.utils.flop_counter import FlopCounterMode

    from inference import autocast_for, build_network, cpu_has_fast_bf16, prepare_for_inference
    device = pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"machine: {machine()}; {len(os.sched_getaffinity(0))} core(s) this process may use")
    print(f"| width | GFLOP/slice at {args.image_size}² | float32 slices/s | bf16 slices/s |")
    print("| --- | --- | --- | --- |")
    out = {}
    for width in args.widths:
        hp = {**_segmenter_defaults(), "base_width": width, "in_channels": 2 * args.context_slices + 1}
        net = prepare_for_inference(build_network(hp), device)
        x = torch.rand(8, hp["in_channels"], args.image_size, args.image_size, device=device)
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            counter = FlopCounterMode(display=False)
            with counter:
                net(x[:1])
            gflop = counter.get_total_flops() / 1e9
        rates = []
        for bf16 in (False, True):
            if bf16 and device.type == "cpu" and not cpu_has_fast_bf16():
                rates.append(float("nan"))
                continue
            with torch.inference_mode(), autocast_for(device, bf16):
                net(x)
                sync(device)
                start, n = time.perf_counter(), 0
                while time.perf_counter() - start < seconds:
                    net(x)
                    n += len(x)
                sync(device)
                rates.append(n / (time.perf_counter() - start))
        print(f"| {width} | {gflop:.1f} | {rates[0]:.2f} | {rates[1]:.2f} |", flush=True)
        out[width] = {"gflop": gflop, "fp32": rates[0], "bf16": rates[1]}
    return out


def run_predict(argv: list[str], task: str = "segmentation") -> tuple[float, float]:
    """Run predict_<task>.py in a child process: (seconds from start to exit, its peak RSS in MB)."""
    return run_script(f"predict_{task}.py", argv)


def run_script(script: str, argv: list[str]) -> tuple[float, float]:
    """Run one of the project's commands in a child process, as a user runs it: (seconds from start to
    exit, its peak RSS in MB).

    The peak comes from GNU time, whose own child is forked from a small process: the rusage of a
    child forked straight from this one counts this process's pages at the fork (phantoms of GBs)."""
    cmd = [sys.executable, str(ROOT / script), *argv]
    with tempfile.NamedTemporaryFile("r", suffix=".txt") as peak:
        gnu_time = Path("/usr/bin/time").is_file()
        if gnu_time:
            cmd = ["/usr/bin/time", "-f", "%M", "-o", peak.name, *cmd]
        start = time.perf_counter()
        proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, check=False)
        took = time.perf_counter() - start
        if proc.returncode:
            raise RuntimeError(f"{script} {' '.join(argv)} exited {proc.returncode}: {proc.stderr.strip()[-400:]}")
        kb = float(peak.read().split()[-1]) if gnu_time else resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return took, kb / 1024  # Linux reports kB


def region_dice(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(liver, tumour) Dice of label volumes a and b; both empty -> 1 (evaluate's per-case rule)."""
    from evaluate import dice_from_counts
    out = []
    for pa, pb in ((a >= 1, b >= 1), (a == 2, b == 2)):
        out.append(float(dice_from_counts(int((pa & pb).sum()), int(pa.sum()), int(pb.sum()))))
    return out[0], out[1]


def classification_end_to_end(args: argparse.Namespace) -> dict:
    """predict_classification.py default (bf16 where native) vs --exact: seconds, memory, and how far
    the slice probabilities, slice predictions and the volume verdict move."""
    hp = load_checkpoint(args.checkpoint, "classification").hparams
    common = ["--checkpoint", str(args.checkpoint), "--device", args.device]
    print(host_line())
    print(f"checkpoint {args.checkpoint}: VGG16 ({hp.get('head', 'fc')} head), image size {hp['image_size']}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        vol, _ = write_phantom_case(tmp, 0, size=args.size, seed=args.seed, num_slices=args.slices)
        run_predict([*common, "--input", str(vol), "--slice", "0"], "classification")  # warm-up, untimed
        rows = {}
        for name, extra in (("default", []), ("--exact", ["--exact"])):
            out = tmp / f"{len(rows)}.json"
            took, rss = run_predict([*common, *extra, "--input", str(vol), "--output", str(out)], "classification")
            found = json.loads(out.read_text())
            rows[name] = {"seconds": took, "peak_mb": rss, "probs": np.array([r["probability"] for r in found["slices"]]),
                          "preds": [r["prediction"] for r in found["slices"]], "volume": found["volumes"][0]}
    fast, exact = rows["default"], rows["--exact"]
    print("| path | end to end (s) | peak memory (MB) | volume probability | verdict |")
    print("| --- | --- | --- | --- | --- |")
    for name, r in rows.items():
        print(f"| {name} | {r['seconds']:.1f} | {r['peak_mb']:.0f} | {r['volume']['probability']:.4f} | "
              f"{r['volume']['prediction']} |")
    diff = np.abs(fast["probs"] - exact["probs"])
    same = float(np.mean([a == b for a, b in zip(fast["preds"], exact["preds"])]))
    ratio = exact["seconds"] / fast["seconds"]
    print(f"slice probabilities: max |difference| {diff.max():.4f}, mean {diff.mean():.5f}; slice predictions "
          f"equal on {100 * same:.2f} % of {len(diff)} slices")
    print(f"ratio --exact / default: {ratio:.2f}x")
    return {"ratio": ratio, "max_prob_diff": float(diff.max()), "same_predictions": same}


def end_to_end(args: argparse.Namespace) -> dict:
    import nibabel as nib
    if args.task == "classification" and args.checkpoint is not None:
        return classification_end_to_end(args)
    if args.checkpoint is None:
        raise DataError("end to end needs --checkpoint: a trained segmentation checkpoint (the region finding "
                        "needs a network that sees the liver); expected e.g. --checkpoint runs/segmentation/"
                        "checkpoints/best.ckpt, or --throughput")
    hp = load_checkpoint(args.checkpoint, "segmentation").hparams
    common = ["--checkpoint", str(args.checkpoint), "--device", args.device]
    if args.batch_size:
        common += ["--batch-size", str(args.batch_size)]
    if args.threads:
        common += ["--threads", str(args.threads)]
    print(host_line())
    print(f"checkpoint {args.checkpoint}: U-Net width {hp['base_width']}, depth {hp['depth']}, image size "
          f"{hp['image_size']}, context {hp['context_slices']}")
    result: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        vol, seg = write_bench_phantom(tmp, args)
        truth = np.asarray(nib.load(seg).dataobj)
        z_liver = np.flatnonzero((truth >= 1).any(axis=(0, 1)))
        print(f"its liver spans {len(z_liver)} of {args.slices} slices; {int((truth == 2).sum())} tumour voxels")
        run_predict([*common, "--input", str(vol), "--output", str(tmp / "warm.nii.gz")])  # warm-up, untimed
        paths = {"fast (default)": []} if args.skip_exact else {"fast (default)": [], "--exact": ["--exact"]}
        rows: dict[str, dict] = {name: {"runs": []} for name in paths}
        # Rounds over both paths, so a change in the machine's load hits both alike; the best round counts.
        for _ in range(args.repeats):
            for k, (name, extra) in enumerate(paths.items()):
                out, report = tmp / f"{k}.nii.gz", tmp / f"{k}.json"
                took, rss = run_predict([*common, *extra, "--input", str(vol), "--output", str(out),
                                         "--report", str(report)])
                rows[name]["runs"].append((took, rss))
        for k, (name, r) in enumerate(rows.items()):
            labels = np.asarray(nib.load(tmp / f"{k}.nii.gz").dataobj)
            case = json.loads((tmp / f"{k}.json").read_text())["cases"][0]
            r.update(seconds=min(t for t, _ in r["runs"]), peak_mb=max(m for _, m in r["runs"]), labels=labels,
                     dice_ref=region_dice(labels, truth), fast_path=case.get("fast_path"))
        print()
        print(f"| path | end to end (s), best of {args.repeats} | each run (s) | peak memory (MB) | "
              f"liver Dice vs reference | tumour Dice vs reference |")
        print("| --- | --- | --- | --- | --- | --- |")
        for name, r in rows.items():
            each = ", ".join(f"{t:.1f}" for t, _ in r["runs"])
            print(f"| {name} | {r['seconds']:.1f} | {each} | {r['peak_mb']:.0f} | {r['dice_ref'][0]:.4f} | "
                  f"{r['dice_ref'][1]:.4f} |")
        fast = rows["fast (default)"]
        print(f"\nfast path: {fast['fast_path']}")
        result["rows"] = {k: {kk: vv for kk, vv in v.items() if kk != "labels"} for k, v in rows.items()}
        if "--exact" in rows:
            exact = rows["--exact"]
            agree = region_dice(fast["labels"], exact["labels"])
            ratio = exact["seconds"] / fast["seconds"]
            print(f"Dice fast vs --exact: liver {agree[0]:.4f}, tumour {agree[1]:.4f}; voxels equal "
                  f"{100 * float((fast['labels'] == exact['labels']).mean()):.4f} %")
            print(f"difference to --exact against the reference: liver {fast['dice_ref'][0] - exact['dice_ref'][0]:+.4f}, "
                  f"tumour {fast['dice_ref'][1] - exact['dice_ref'][1]:+.4f}")
            print(f"ratio --exact / fast: {ratio:.2f}x")
            result.update(agreement=agree, ratio=ratio)
    if args.memory_slices:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            vol, _ = write_phantom_case(tmp, 0, size=args.size, seed=args.seed, num_slices=args.memory_slices)
            took, rss = run_predict([*common, "--input", str(vol), "--output", str(tmp / "long.nii.gz")])
        print(f"fast path, {args.size}x{args.size}x{args.memory_slices}: {took:.1f} s end to end, peak memory {rss:.0f} MB")
        result["long"] = {"slices": args.memory_slices, "seconds": took, "peak_mb": rss}
    return result


def throughput(args: argparse.Namespace) -> dict:
    args.batch_size = args.batch_size or 32
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
            paths["batched + bf16 autocast on CPU"] = cpu_bf16
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
