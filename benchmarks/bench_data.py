"""Data-loading throughput: the prepared slice cache against reading the NIfTI file for every slice.

    python benchmarks/bench_data.py                                # 512x512x200 phantoms, one .nii, one .nii.gz
    python benchmarks/bench_data.py --size 256 --slices 100 --work-dir data/bench   # smaller, files kept

In one run, on LiTS-sized synthetic phantoms (int16, as LiTS stores them), it measures
- prepare time per volume (`dataset.prepare_cases`, one worker), for .nii and .nii.gz;
- slices/s of `LiTSSliceDataset` reading the prepared cache (segmentation, 256x256, one context slice
  on each side, one process, random order);
- slices/s of the naive dataset most repositories use, `nibabel.load(path).get_fdata()[..., k]` per
  item, for .nii and .nii.gz (random order). It returns the image slice only (no label, no context, no
  resize), which flatters it;
- optionally the DataLoader rate with 2 workers and batch 32.
Each rate is printed on its own line; the last line is the ratio cache / naive(.nii). The files are
read right after they are written, so both sides read from the page cache (a warm disk).
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere, as a plain script
import dataset  # noqa: E402
import phantom  # noqa: E402


class NaiveNiftiSlices(Dataset):
    """One item = open the NIfTI and decode the whole volume as float64, then keep slice k."""

    def __init__(self, volumes: list[tuple[Path, int]]):
        self.items = [(str(path), k) for path, depth in volumes for k in range(depth)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> torch.Tensor:
        path, k = self.items[i]
        return torch.from_numpy(nib.load(path).get_fdata()[..., k].astype(np.float32))  # (X, Y)


def slices_per_second(ds: Dataset, min_items: int, min_seconds: float, max_seconds: float,
                      seed: int = 0) -> tuple[float, int, float]:
    """Read random items until at least `min_items` and `min_seconds` (stopping at `max_seconds`)."""
    rng = np.random.default_rng(seed)
    ds[int(rng.integers(len(ds)))]  # warm-up: imports, first file open
    n, start = 0, time.perf_counter()
    while True:
        for i in rng.integers(0, len(ds), size=64 if min_items > 64 else 1):
            ds[int(i)]
            n += 1
        elapsed = time.perf_counter() - start
        if (n >= min_items and elapsed >= min_seconds) or elapsed >= max_seconds:
            return n / elapsed, n, elapsed


def loader_slices_per_second(ds: Dataset, workers: int, batch_size: int, min_seconds: float) -> tuple[float, int, float]:
    loader = DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=workers,
                        generator=torch.Generator().manual_seed(0))
    n, start = 0, None
    while True:
        for images, _ in loader:
            if start is None:  # the first batch pays for starting the workers
                start = time.perf_counter()
                continue
            n += images.shape[0]
            if time.perf_counter() - start >= min_seconds:
                elapsed = time.perf_counter() - start
                return n / elapsed, n, elapsed


def write_phantoms(work: Path, cases: int, size: int, slices: int) -> dict[str, list[Path]]:
    """`cases` phantoms per file type; files already in `work` with the right shape are reused."""
    data = work / "data"
    volumes: dict[str, list[Path]] = {".nii": [], ".nii.gz": []}
    for i in range(2 * cases):
        ext = ".nii" if i % 2 == 0 else ".nii.gz"
        vol, seg = data / f"volume-{i}{ext}", data / f"segmentation-{i}{ext}"
        if not (vol.exists() and seg.exists() and nib.load(str(vol)).shape == (size, size, slices)):
            start = time.perf_counter()
            phantom.write_phantom_case(data, i, size=size, seed=0, compress=ext == ".nii.gz", num_slices=slices)
            sys.stderr.write(f"wrote {vol.name} in {time.perf_counter() - start:.1f} s\n")
        volumes[ext].append(vol)
    return volumes


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Data-loading benchmark: prepared cache vs naive NIfTI reads.")
    parser.add_argument("--cases", type=int, default=1, help="phantoms per file type, .nii and .nii.gz (default: 1)")
    parser.add_argument("--size", type=int, default=512, help="in-plane size of the phantoms (default: 512)")
    parser.add_argument("--slices", type=int, default=200, help="slices per phantom (default: 200)")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="folder for phantoms and cache, kept and reused (default: a temporary folder, removed)")
    parser.add_argument("--image-size", type=int, default=256, help="cache resolution (default: 256)")
    parser.add_argument("--context-slices", type=int, default=1, help="neighbours on each side (default: 1)")
    parser.add_argument("--items", type=int, default=20_000, help="least items read from the cache (default: 20000)")
    parser.add_argument("--cache-seconds", type=float, default=3.0, help="least seconds reading the cache (default: 3)")
    parser.add_argument("--naive-seconds", type=float, default=5.0,
                        help="least seconds per naive file type (default: 5)")
    parser.add_argument("--loader-workers", type=int, default=2,
                        help="DataLoader workers for the loader rate, 0 to skip it (default: 2)")
    parser.add_argument("--batch-size", type=int, default=32, help="DataLoader batch size (default: 32)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads while reading, as in a DataLoader worker (default: 1)")
    return parser


def main(args: argparse.Namespace) -> dict[str, float]:
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="bench_data_"))
    results: dict[str, float] = {}
    try:
        print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}, "
              f"torch {torch.__version__}, nibabel {nib.__version__}, python {platform.python_version()}")
        start = time.perf_counter()
        volumes = write_phantoms(work, args.cases, args.size, args.slices)
        print(f"phantoms: {2 * args.cases} x {args.size}x{args.size}x{args.slices} int16 "
              f"({args.cases} .nii + {args.cases} .nii.gz), ready in {time.perf_counter() - start:.1f} s")

        data, cache = work / "data", work / "cache"
        shutil.rmtree(cache, ignore_errors=True)  # prepare is measured from scratch
        # warm-up on a tiny case, so the first timed volume does not pay for one-time imports and kernels
        phantom.write_phantom_case(work / "warmup", 0, size=48, seed=0)
        dataset.prepare_cases(dataset.find_cases(work / "warmup"), cache, work / "warmup", args.image_size,
                              workers=1, progress=False)
        cases = {c.images[0]: c for c in dataset.find_cases(data)}
        prepared = []
        for ext, paths in volumes.items():
            seconds = []
            for path in paths:
                start = time.perf_counter()
                prepared += dataset.prepare_cases([cases[path]], cache, data, args.image_size, workers=1,
                                                  progress=False)
                seconds.append(time.perf_counter() - start)
            results[f"prepare{ext}"] = float(np.mean(seconds))
            print(f"prepare {ext}: {results[f'prepare{ext}']:.2f} s/volume")

        torch.set_num_threads(args.threads)  # prepare above used the default; a reader runs like a worker
        ds = dataset.LiTSSliceDataset(prepared, "segmentation", context_slices=args.context_slices)
        image, target = ds[0]
        rate, n, elapsed = slices_per_second(ds, args.items, args.cache_seconds, 10 * args.cache_seconds)
        results["cache"] = rate
        print(f"cache LiTSSliceDataset (image {tuple(image.shape)} + label {tuple(target.shape)}, 1 process, "
              f"{args.threads} torch thread(s)): "
              f"{rate:.0f} slices/s ({n} items in {elapsed:.1f} s)")

        for ext, paths in volumes.items():
            naive = NaiveNiftiSlices([(p, args.slices) for p in paths])
            rate, n, elapsed = slices_per_second(naive, 1, args.naive_seconds, 10 * args.naive_seconds)
            results[f"naive{ext}"] = rate
            print(f"naive nibabel get_fdata()[..., k] {ext}: {rate:.2f} slices/s ({n} items in {elapsed:.1f} s)")

        if args.loader_workers > 0:
            rate, n, elapsed = loader_slices_per_second(ds, args.loader_workers, args.batch_size, args.cache_seconds)
            results["loader"] = rate
            print(f"cache DataLoader ({args.loader_workers} workers, batch {args.batch_size}): "
                  f"{rate:.0f} slices/s ({n} items in {elapsed:.1f} s)")

        results["ratio.nii.gz"] = results["cache"] / results["naive.nii.gz"]
        results["ratio.nii"] = results["cache"] / results["naive.nii"]
        print(f"ratio cache/naive(.nii.gz): {results['ratio.nii.gz']:.0f}x")
        print(f"ratio cache/naive(.nii): {results['ratio.nii']:.0f}x")
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    return results


if __name__ == "__main__":
    main(get_args_parser().parse_args())
