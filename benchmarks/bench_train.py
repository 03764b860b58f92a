"""Steady-state training throughput and model-FLOP utilisation (MFU), measured against the device's
own matrix-product peak in the same run; plus how well the real data loader keeps up.

    python benchmarks/bench_train.py                                   # CPU, fp32, all three models
    python benchmarks/bench_train.py --device cuda --precision bf16-mixed --channels-last both --compile
    python benchmarks/bench_train.py --models unet256 --batch-size 4 --loader

Models: unet256 / unet512 (U-Net, base width 64, depth 4, 3 input slices, 3 classes) and vgg224
(VGG16 with batch norm, 3 input slices, 2 classes). FLOPs per training image (forward + backward) are
counted with torch.utils.flop_counter.FlopCounterMode; the peak is the best of several square matrix
products in the training dtype. The optimiser step (AdamW) is part of the timed step, as in training.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from unet import UNet  # noqa: E402
from vgg16 import VGG16  # noqa: E402

MODELS = {"unet256": ("segmentation", 256), "unet512": ("segmentation", 512), "vgg224": ("classification", 224)}
DTYPES = {"32": torch.float32, "32-true": torch.float32, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS), help="models to measure")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--precision", default="32", choices=list(DTYPES), help="training precision")
    p.add_argument("--batch-size", type=int, default=None, help="images per step (default: 4 on CPU, 32 on CUDA; half at 512)")
    p.add_argument("--channels-last", choices=["off", "on", "both"], default="off",
                   help="NHWC memory format; both = measure off and on side by side in this run")
    p.add_argument("--compile", action="store_true", help="torch.compile the network")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--steps", type=int, default=4, help="timed steps")
    p.add_argument("--peak-size", type=int, default=None, help="matrix size for the peak (default: 4096 CPU, 8192 CUDA)")
    p.add_argument("--loader", action="store_true",
                   help="also train the same steps fed by the real LiTSDataModule (prepared cache, workers) "
                        "and print its rate over the in-memory rate")
    p.add_argument("--num-workers", type=int, default=2, help="loader workers with --loader")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    return p


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure_peak(device: torch.device, dtype: torch.dtype, n: int, repeats: int = 5) -> float:
    """Best FLOP/s of an n x n x n matrix product in `dtype` (2 n^3 FLOPs each)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def build(name: str) -> tuple[torch.nn.Module, int, int]:
    task, size = MODELS[name]
    net = UNet(in_channels=3, num_classes=3, base_width=64) if task == "segmentation" else \
        VGG16(in_channels=3, num_classes=2, batch_norm=True)
    return net, size, 3 if task == "segmentation" else 2


def make_step(net, device, dtype, channels_last: bool, compiled: bool):
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    model = torch.compile(net) if compiled else net
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()

    def step(x, y):
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast:
            out = model(x)
        loss = F.cross_entropy(out.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss
    return step


def count_train_flops(net, x, y) -> float:
    """FLOPs of one forward + backward on batch x (matrix products and convolutions)."""
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(net(x).float(), y).backward()
    net.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def timed(step, batches, warmup: int, steps: int, device) -> float:
    """Seconds per step after `warmup` untimed steps; `batches` yields (x, y) on the device."""
    it = iter(batches)
    for _ in range(warmup):
        step(*next(it))
    sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        step(*next(it))
    sync(device)
    return (time.perf_counter() - t) / steps


def loader_batches(task: str, size: int, batch: int, device, workers: int, tmp: Path):
    """Endless batches from the real pipeline: phantoms on disk -> prepared cache -> LiTSDataModule."""
    import dataset
    import phantom
    data = tmp / f"data{size}"
    if not data.exists():
        for i in range(6):
            phantom.write_phantom_case(data, i, size=size, seed=1, num_slices=48, num_tumors=2)
    dm = dataset.LiTSDataModule(data, task, cache_dir=tmp / "cache", image_size=size, context_slices=1,
                                batch_size=batch, num_workers=workers, val_fraction=0.0, test_fraction=0.0,
                                augment=False)
    dm.prepare_data()
    dm.setup("fit")
    while True:
        for batch in dm.train_dataloader():  # classification batches also carry the tumour mask: unused here
            x, y = batch[0], batch[1]
            yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def main(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.precision]
    peak = measure_peak(device, dtype, args.peak_size or (8192 if device.type == "cuda" else 4096))
    print(f"device {device} | precision {args.precision} | compile {args.compile} "
          f"| torch {torch.__version__} | threads {torch.get_num_threads()}")
    print(f"peak matmul {peak / 1e9:.1f} GFLOP/s ({dtype})", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="bench_train_"))
    layouts = {"off": [False], "on": [True], "both": [False, True]}[args.channels_last]
    for name in args.models:
        for channels_last in layouts:
            run_model(name, args, device, dtype, peak, channels_last, tmp)


def run_model(name: str, args, device, dtype, peak: float, channels_last: bool, tmp: Path) -> None:
    torch.manual_seed(0)
    net, size, classes = build(name)
    net = net.to(device)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    bs = args.batch_size or ((32 if device.type == "cuda" else 4) // (2 if size >= 512 else 1))
    x = torch.rand(bs, 3, size, size, device=device)
    y = (torch.randint(0, classes, (bs, size, size), device=device) if classes == 3
         else torch.randint(0, classes, (bs,), device=device))
    flops_per_image = count_train_flops(net, x[:1], y[:1])
    step = make_step(net, device, dtype, channels_last, args.compile)
    sec = timed(step, iter(lambda: (x, y), None), args.warmup, args.steps, device)
    rate = bs / sec
    achieved = rate * flops_per_image
    tag = f"{name}{' channels-last' if channels_last else ''}"
    print(f"{tag}: batch {bs} | {rate:.2f} images/s | {flops_per_image / 1e9:.1f} GFLOP/image | "
          f"{achieved / 1e9:.1f} GFLOP/s | MFU {achieved / peak:.1%}", flush=True)
    if args.loader:
        batches = loader_batches(MODELS[name][0], size, bs, device, args.num_workers, tmp)
        sec_loader = timed(step, batches, args.warmup, args.steps, device)
        print(f"{tag}: fed by LiTSDataModule ({args.num_workers} workers) {bs / sec_loader:.2f} images/s | "
              f"loader/in-memory {sec / sec_loader:.2f}", flush=True)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
