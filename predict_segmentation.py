"""Segment liver and tumor on CT with a trained U-Net checkpoint.

    python predict_segmentation.py --checkpoint runs/segmentation/checkpoints/best.ckpt --input volume-7.nii
    python predict_segmentation.py --checkpoint best.ckpt --input volume-7.nii --ground-truth segmentation-7.nii \\
        --report volume-7_report.json
    python predict_segmentation.py --checkpoint best.ckpt --input volume-7.nii --slice 60   # one slice
    python predict_segmentation.py --checkpoint best.ckpt --input slice.png               # mask + overlay PNG
    python predict_segmentation.py --checkpoint best.ckpt --input scans/ --output predictions/

A volume gives a label NIfTI (uint8: 0 background, 1 liver, 2 tumor) with exactly the input's shape,
affine and orientation, so it opens on top of the CT in 3D Slicer or ITK-SNAP; default name
`<name>_seg.nii.gz` beside the input. A 2D slice (PNG/JPG taken as already windowed, `.npy` in HU)
gives `<stem>_mask.png` (label values 0/1/2) and `<stem>_overlay.png` (liver green, tumor red).
A short report (liver volume, lesions, tumor burden) is printed and, with --report, saved as JSON.

The model and its preprocessing (HU window, image size, 2.5D context) are rebuilt from the checkpoint
alone; the preprocessing is `dataset.py`'s, the very functions training uses. A lone 2D slice has no
neighbours, so it stands in for them: its 2.5D stack repeats the slice.

This module also holds the pieces both predict scripts use (`predict_classification.py` imports
them): `load_checkpoint`, `pick_device`, `find_inputs`, `preprocess_volume`, `infer_batched`.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import re
import sys
from collections.abc import Callable, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn
from tqdm import tqdm

from dataset import (IMAGE_SUFFIXES, DataError, Geometry, atomic_output, atomic_write_text,
                     context_indices, load_label_volume, load_slice_image, load_volume, one_line, resize_slices,
                     run_cli, window_hu)

VOLUME_SUFFIXES = (".nii", ".nii.gz")
# Files a folder run skips: this script's own outputs and LiTS label volumes (they are not CT).
_SKIPPED = re.compile(r"(_seg\.nii(\.gz)?|_mask\.png|_overlay\.png)$|^segmentation-\d+\.nii(\.gz)?$")
_REQUIRED_HPARAMS = ("task", "in_channels", "window", "image_size", "context_slices")


# --------------------------------------------------------------------------------------------
# Shared with predict_classification.py: checkpoint, device, inputs, preprocessing, batched inference
# --------------------------------------------------------------------------------------------

@dataclass
class Checkpoint:
    """What a checkpoint holds for prediction: its hyperparameters and the bare network's weights."""

    path: Path
    hparams: dict
    state_dict: dict  # the network's tensors, "net." prefix removed

    def network(self, device: torch.device) -> nn.Module:
        """The network rebuilt from the hyperparameters with its weights, ready for inference on `device`:
        eval mode, batch norms folded into their convolutions, channels-last (see `prepare_for_inference`)."""
        from lit_model import build_network  # Lightning takes seconds to import: bad input is reported first
        try:
            net = build_network(self.hparams)
            net.load_state_dict(self.state_dict)
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise DataError(f"{self.path}: weights do not fit the network its hyperparameters describe "
                            f"({one_line(exc)[:160]}); expected a checkpoint written by train.py") from None
        return prepare_for_inference(net, device)


def prepare_for_inference(net: nn.Module, device: torch.device) -> nn.Module:
    """Eval mode on `device`, each BatchNorm2d that follows a Conv2d in a Sequential folded into that
    conv, and channels-last memory layout.

    Folding is exact up to float rounding (eval-mode BN is an affine map per channel) and saves a pass
    over every activation; channels-last is the layout oneDNN (CPU) and cuDNN (CUDA) convolve fastest.
    Both measured in benchmarks/bench_predict.py (BENCHMARKS.md)."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval
    net = net.eval()
    for module in net.modules():
        if isinstance(module, nn.Sequential):
            for i in range(len(module) - 1):
                conv, bn = module[i], module[i + 1]
                if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats:
                    module[i], module[i + 1] = fuse_conv_bn_eval(conv, bn), nn.Identity()
    return net.to(device).to(memory_format=torch.channels_last)


def load_checkpoint(path: str | Path, task: str) -> Checkpoint:
    """Read a Lightning checkpoint of `task` without running any code from it.

    `weights_only=True` unpickles tensors and plain containers only, so a crafted file cannot execute
    anything on load (a checkpoint may come from anywhere). Raises DataError for a missing file, a file
    that is not a checkpoint of this project (random bytes, a bare state dict, a refused pickle) or a
    checkpoint of the other task."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: checkpoint not found; expected a .ckpt file written by train.py")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several kinds for foreign or refused files
        refused = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
        found = (f"a pickle that would call {refused.group(1)}, refused by the weights-only loader" if refused
                 else f"a file torch cannot load ({type(exc).__name__}: {one_line(exc)[:100]})")
        raise DataError(f"{path}: found {found}; expected a .ckpt checkpoint written by train.py") from None
    hp = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    state = ckpt.get("state_dict") if isinstance(ckpt, dict) else None
    if not isinstance(hp, dict) or not isinstance(state, dict):
        found = ("a bare state dict" if isinstance(ckpt, dict) and ckpt and
                 all(isinstance(v, torch.Tensor) for v in ckpt.values()) else f"a {type(ckpt).__name__}")
        raise DataError(f"{path}: found {found} without hyper_parameters and state_dict; expected a Lightning "
                        f"checkpoint written by train.py (it records the network and its preprocessing)")
    missing = [k for k in _REQUIRED_HPARAMS if k not in hp]
    if missing:
        raise DataError(f"{path}: hyper_parameters lack {', '.join(missing)}; expected a checkpoint written by train.py")
    if hp["task"] != task:
        raise DataError(f"{path}: found a {hp['task']} checkpoint; expected a {task} checkpoint "
                        f"(use predict_{hp['task']}.py for this one)")
    net_state = {k[len("net."):]: v for k, v in state.items() if k.startswith("net.")}
    if not net_state:
        raise DataError(f"{path}: found no 'net.' weights in its state_dict; expected a checkpoint written by train.py")
    return Checkpoint(path, dict(hp), net_state)


def pick_device(name: str) -> torch.device:
    """The device for --device: auto takes CUDA when available, else the CPU; asking for CUDA without
    one is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DataError(f"found --device {name} but no CUDA device is available; expected --device cpu or auto")
    return torch.device(name)


def input_kind(path: Path) -> str | None:
    """The kind of an input file: volume (NIfTI), image (a 2D slice file) or None."""
    name = path.name.lower()
    if name.endswith(VOLUME_SUFFIXES):
        return "volume"
    return "image" if path.suffix.lower() in IMAGE_SUFFIXES else None


def find_inputs(path: str | Path) -> list[tuple[Path, str]]:
    """A file, or the volumes and slices of a folder (not recursive), as (path, kind) sorted by name.

    A folder run skips hidden files, this script's own outputs (`*_seg.nii.gz`, `*_mask.png`,
    `*_overlay.png`) and LiTS label volumes (`segmentation-N.nii[.gz]`)."""
    path = Path(path)
    expected = "a NIfTI volume (.nii, .nii.gz), a 2D slice (.png, .jpg, .npy) or a folder of them"
    if path.is_file():
        kind = input_kind(path)
        if kind is None:
            raise DataError(f"{path}: found a {''.join(path.suffixes) or 'file without extension'}; expected {expected}")
        return [(path, kind)]
    if path.is_dir():
        found = [(p, input_kind(p)) for p in sorted(path.iterdir())
                 if p.is_file() and not p.name.startswith(".") and not _SKIPPED.search(p.name)]
        found = [(p, k) for p, k in found if k is not None]
        if not found:
            raise DataError(f"{path}: found no volumes or slices in this folder; expected {expected}")
        return found
    raise DataError(f"{path}: input not found; expected {expected}")


def preprocess_volume(slices, hparams: dict, device: torch.device | str = "cpu",
                      windowed: bool = False) -> torch.Tensor:
    """Slices (Z, H, W) -> (Z, S, S) float32 in [0, 1] on `device`, exactly as training prepares them:
    `window_hu` with the checkpoint's window (skipped for `windowed` input such as 8-bit PNGs), then
    `resize_slices` to its image size. The whole volume at once: one pass, on the GPU when there is one."""
    t = torch.as_tensor(slices).to(device)
    unit = t.float() if windowed else window_hu(t, hparams["window"])  # (Z, H, W)
    return resize_slices(unit, int(hparams["image_size"]), "image")  # (Z, S, S)


def autocast_for(device: torch.device):
    """bf16 autocast on CUDA (fp16 where the GPU lacks bf16), nothing on the CPU: one code path for both."""
    if device.type != "cuda":
        return nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def infer_batched(net: nn.Module, volume: torch.Tensor, context_slices: int,
                  head: Callable[[torch.Tensor], torch.Tensor], batch_size: int = 32,
                  slices: Sequence[int] | None = None, lone: bool = False, desc: str | None = None) -> torch.Tensor:
    """Run `net` over the slices of a preprocessed volume (Z, S, S), `batch_size` 2.5D stacks at a time.

    Slice z goes in as the stack `context_indices(z, Z, context_slices)` (C = 2k+1 channels, the stacks
    training uses). With `lone`, each slice is an image of its own (a folder of 2D slices): it has no
    neighbours, so it stands in for them and its stack repeats it C times. `head` maps each batch of
    logits to what is kept (labels at native size, probabilities), so full logits never pile up.
    Returns the heads' outputs for `slices` (default all), in that order, on the CPU. Runs under
    inference_mode, channels-last; bf16 autocast on CUDA, float32 on the CPU."""
    device = volume.device
    num = volume.shape[0]
    zs = np.arange(num) if slices is None else np.asarray(slices, dtype=np.int64)
    channels = 2 * int(context_slices) + 1
    outputs = []
    bar = tqdm(total=len(zs), desc=desc or "slices", unit="slice", file=sys.stderr, delay=1.0, leave=False)
    try:
        with torch.inference_mode(), autocast_for(device):
            for start in range(0, len(zs), batch_size):
                batch_z = zs[start:start + batch_size]
                if lone:
                    stacks = np.repeat(batch_z[:, None], channels, axis=1)
                else:
                    stacks = np.stack([context_indices(int(z), num, int(context_slices)) for z in batch_z])
                x = volume[torch.from_numpy(stacks).to(device)]  # (B, C, S, S)
                logits = net(x.contiguous(memory_format=torch.channels_last))  # (B, classes, ...)
                outputs.append(head(logits.float()).cpu())
                bar.update(len(batch_z))
    finally:
        bar.close()
    return torch.cat(outputs)


# --------------------------------------------------------------------------------------------
# Segmentation: labels at native size, post-processing, measurements
# --------------------------------------------------------------------------------------------

def label_head(size: Sequence[int]) -> Callable[[torch.Tensor], torch.Tensor]:
    """Logits (B, 3, S, S) -> labels (B, H, W) uint8: bilinear upsampling of the logits to the native
    slice size, then argmax (smoother borders than upsampling the labels)."""
    size = tuple(int(s) for s in size)

    def head(logits: torch.Tensor) -> torch.Tensor:
        if tuple(logits.shape[-2:]) != size:
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)  # (B, 3, H, W)
        return logits.argmax(dim=1).to(torch.uint8)  # (B, H, W)
    return head


def segment_slices(net: nn.Module, slices, hparams: dict, device: torch.device, batch_size: int = 32,
                   which: Sequence[int] | None = None, windowed: bool = False, lone: bool = False,
                   desc: str | None = None) -> np.ndarray:
    """Slices (Z, H, W) in HU (or [0, 1] when `windowed`) -> labels (len(which), H, W) uint8 in {0, 1, 2}."""
    volume = preprocess_volume(slices, hparams, device, windowed)  # (Z, S, S)
    labels = infer_batched(net, volume, hparams["context_slices"], label_head(np.shape(slices)[1:]),
                           batch_size, which, lone, desc)
    return labels.numpy()


_FULL = np.ones((3, 3, 3), dtype=bool)  # 26-connectivity in 3D (8 in a single slice)


def postprocess(labels: np.ndarray, margin: int = 2) -> np.ndarray:
    """Clean a label volume (Z, H, W); returns a new array.

    1. A tumor component (26-connected) with no liver (label 1) within `margin` pixels in-plane is
       removed (set to 0): a liver tumor lies in the liver.
    2. The liver region (label >= 1, tumor included) keeps its largest 3D component (26-connected);
       everything outside it becomes background.
    On a single slice both rules work in 2D."""
    out = labels.copy()
    tumor = out == 2
    if tumor.any():
        comps, _ = ndimage.label(tumor, structure=_FULL)
        inplane = np.zeros((3, 3, 3), dtype=bool)
        inplane[1] = ndimage.generate_binary_structure(2, 2)
        near_liver = ndimage.binary_dilation(out == 1, structure=inplane, iterations=margin)
        keep = np.unique(comps[near_liver & tumor])
        out[tumor & ~np.isin(comps, keep)] = 0
    region = out >= 1
    if region.any():
        comps, n = ndimage.label(region, structure=_FULL)
        if n > 1:
            sizes = np.bincount(comps.ravel())
            sizes[0] = 0
            out[region & (comps != int(sizes.argmax()))] = 0
    return out


def max_pixel_distance(mask: np.ndarray, spacing: Sequence[float] = (1.0, 1.0)) -> float:
    """Largest distance between the centres of two pixels of a 2D mask, with (row, column) spacing.

    Exact: the farthest pair lies on the convex hull, whose vertices are border pixels, so only border
    pixels (some 4-neighbour outside the mask) are compared; many of them are first cut down to their
    convex hull. One pixel -> 0; an empty mask -> 0."""
    from scipy.spatial import ConvexHull
    from scipy.spatial.distance import pdist
    border = mask & ~ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(2, 1))
    pts = np.argwhere(border) * np.asarray(spacing, dtype=np.float64)  # (P, 2) in mm (or pixels)
    if len(pts) < 2:
        return 0.0
    if len(pts) > 512:
        try:
            pts = pts[ConvexHull(pts).vertices]
        except Exception:  # collinear points have no 2D hull; the border of a line is short anyway
            pass
    return float(pdist(pts).max())


def measure(labels: np.ndarray, spacing: Sequence[float] | None = None,
            file_slice: Callable[[int], int] | None = None) -> dict:
    """Liver, tumor and per-lesion numbers of a label volume (Z, H, W) in slices order.

    Liver = label >= 1 (tumor included, as LiTS scores it); lesions = 3D components of label 2,
    26-connected, largest first. With `spacing` (dz, dy, dx) in mm: volumes in mL, the largest axial
    diameter in mm (largest distance between two pixel centres of the lesion in any axial slice) and
    the centre slice (the lesion's slice nearest its centroid, as the file numbers it via `file_slice`).
    Without spacing (2D images): areas and diameters in pixels. Tumor burden = tumor / liver in %."""
    region, tumor = labels >= 1, labels == 2
    comps, n = ndimage.label(tumor, structure=_FULL)
    boxes = ndimage.find_objects(comps)
    if spacing is not None:
        dz, dy, dx = (float(s) for s in spacing)
        unit, scale, in_plane = "ml", dz * dy * dx / 1000.0, (dy, dx)
    else:
        unit, scale, in_plane = "px", 1.0, (1.0, 1.0)
    size_key = "volume_ml" if unit == "ml" else "area_px"
    diam_key = "largest_axial_diameter_mm" if unit == "ml" else "largest_diameter_px"
    found = []
    for i, box in enumerate(boxes, start=1):
        sub = comps[box] == i  # (z, y, x) within the lesion's bounding box
        count = int(sub.sum())
        numbers = {size_key: count * scale, diam_key: max(max_pixel_distance(s, in_plane) for s in sub)}
        if unit == "ml":
            zs = np.flatnonzero(sub.any(axis=(1, 2)))
            centroid = np.nonzero(sub)[0].mean()
            z = int(zs[np.argmin(np.abs(zs - centroid))]) + box[0].start
            numbers["centre_slice"] = file_slice(z) if file_slice else z
        numbers["voxels" if unit == "ml" else "pixels"] = count
        found.append(numbers)
    found.sort(key=lambda d: -d[size_key])
    lesions = [{"id": rank, **numbers} for rank, numbers in enumerate(found, start=1)]
    liver_n, tumor_n = int(region.sum()), int(tumor.sum())
    return {
        f"liver_{size_key}": liver_n * scale,
        f"tumor_{size_key}": tumor_n * scale,
        "tumor_burden_percent": 100.0 * tumor_n / liver_n if liver_n else 0.0,
        "num_lesions": n,
        "lesions": lesions,
    }


def slice_of_file(geom: Geometry, k: int, path: Path) -> int:
    """Index in the slices array of the file's own slice k (`--slice K`), checked against the file."""
    n = geom.shape[2]
    if not 0 <= k < n:
        raise DataError(f"{path}: found --slice {k}; expected 0..{n - 1} (the file has {n} slices along its third axis)")
    return geom.slice_index(k)


def score(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float]) -> dict:
    """LiTS metrics of a prediction against ground truth (both (Z, H, W) in slices order, so axial is
    axis 0), with lesion detection counts at IoU > 0.5: `evaluate.score_case`'s row. Non-finite values
    (an empty mask) become None, so the report stays JSON."""
    from evaluate import json_safe, score_case
    return json_safe(score_case(pred, truth, spacing, axial_axis=0).row)


# --------------------------------------------------------------------------------------------
# Writing outputs
# --------------------------------------------------------------------------------------------

def strip_nifti_suffix(name: str) -> str:
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def ensure_folder(folder: Path) -> Path:
    """Create `folder` (and parents) or fail with a DataError before any work is done."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"{folder}: cannot create the output folder ({exc.strerror or type(exc).__name__}); "
                        f"expected a folder that can be written") from None
    if not folder.is_dir():
        raise DataError(f"{folder}: found a file where the output folder should be; expected a folder")
    return folder


@contextmanager
def _writing(path: Path):
    """`atomic_output`, with OS errors (no such folder, disk full) turned into a one-line DataError."""
    try:
        with atomic_output(path) as tmp:
            yield tmp
    except OSError as exc:
        raise DataError(f"{path}: cannot write ({exc.strerror or type(exc).__name__}); "
                        f"expected a writable output location") from None


def write_label_volume(labels: np.ndarray, reference, path: Path, first_slice: int | None = None) -> None:
    """Write labels (file voxel order, uint8) as NIfTI with the reference image's affine, qform and
    sform; with `first_slice` the labels are one slice of the reference and the matrices are shifted
    so it lies at that slice in world space."""
    shift = np.eye(4)
    if first_slice is not None:
        shift[2, 3] = first_slice
    img = nib.Nifti1Image(np.ascontiguousarray(labels, dtype=np.uint8), reference.affine @ shift)
    for setter, (matrix, code) in ((img.set_qform, reference.get_qform(coded=True)),
                                   (img.set_sform, reference.get_sform(coded=True))):
        setter(None if matrix is None or not code else matrix @ shift, code=int(code) if code else None)
    if hasattr(reference.header, "get_xyzt_units"):
        img.header.set_xyzt_units(*reference.header.get_xyzt_units())
    img.set_data_dtype(np.uint8)
    img.header.set_slope_inter(None, None)  # labels are stored as they are, never scaled
    with _writing(path) as tmp:
        nib.save(img, tmp)


def write_png(array: np.ndarray, path: Path) -> None:
    from PIL import Image
    with _writing(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")


def write_mask_and_overlay(image: np.ndarray, labels: np.ndarray, mask_path: Path, overlay_path: Path) -> None:
    """Mask PNG (mode L, values 0/1/2) and overlay PNG (CT grey, liver green, tumor red) of one slice."""
    from lit_model import overlay
    rgb = overlay(torch.from_numpy(image), torch.from_numpy(labels))  # (3, H, W) in [0, 1]
    write_png(np.ascontiguousarray(labels.astype(np.uint8)), mask_path)
    write_png((rgb.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8), overlay_path)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Liver and tumor segmentation of CT volumes or slices with a U-Net checkpoint. A lone 2D "
                    "slice has no neighbours, so it stands in for them in the 2.5D stack.")
    p.add_argument("--checkpoint", required=True, type=Path, help="segmentation .ckpt written by train.py")
    p.add_argument("--input", required=True, type=Path,
                   help="a NIfTI volume (.nii, .nii.gz), a 2D slice (PNG/JPG: 8-bit, already windowed; .npy: HU) "
                        "or a folder of them (not recursive; *_seg.nii.gz, *_mask.png, *_overlay.png and "
                        "segmentation-N.nii are skipped)")
    p.add_argument("--output", type=Path, default=None,
                   help="label volume path (.nii or .nii.gz) for one volume, mask path (.png) for one slice "
                        "(the overlay goes beside it as <stem>_overlay.png), a folder for a folder input "
                        "(default: beside each input, <name>_seg.nii.gz or <stem>_mask.png + <stem>_overlay.png)")
    p.add_argument("--slice", type=int, default=None, metavar="K",
                   help="segment only slice K of a volume, K in the file's own order (its third axis); writes "
                        "a one-slice NIfTI placed at that slice, <name>_slice<K>_seg.nii.gz (default: all slices)")
    p.add_argument("--postprocess", action=argparse.BooleanOptionalAction, default=True,
                   help="keep the largest 3D liver component and only tumor next to liver (default: on)")
    p.add_argument("--ground-truth", type=Path, default=None,
                   help="segmentation NIfTI of the input volume: score the prediction (Dice, VOE, RVD, surface "
                        "distances, lesion detection) (default: none)")
    p.add_argument("--report", type=Path, default=None,
                   help="also write the report as JSON to this file; volumes in mL and mm, 2D slices in "
                        "pixels (default: printed only)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto takes CUDA when available (default: auto)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="slices per forward pass (default: 32 on CUDA, 8 on a CPU, where large batches "
                        "spill the caches: 1.94 vs 1.80 slices/s measured, see BENCHMARKS.md)")
    return p


@dataclass
class _Job:
    path: Path
    kind: str
    outputs: tuple[Path, ...]


def _plan(args: argparse.Namespace, inputs: list[tuple[Path, str]]) -> list[_Job]:
    """Output paths of every input, checked (and folders created) before any work is done."""
    single = args.input.is_file()
    jobs = []
    if single:
        path, kind = inputs[0]
        if args.output is not None and args.output.resolve() == path.resolve():
            raise DataError(f"{args.output}: found the input itself as --output; expected another path "
                            f"(inputs are never overwritten)")
        if kind == "volume":
            name = strip_nifti_suffix(path.name) + (f"_slice{args.slice}" if args.slice is not None else "")
            out = args.output or path.with_name(f"{name}_seg.nii.gz")
            if not out.name.lower().endswith(VOLUME_SUFFIXES):
                raise DataError(f"{out}: found output suffix {''.join(out.suffixes) or 'none'}; expected .nii or "
                                f".nii.gz for a volume input")
            ensure_folder(out.parent)
            return [_Job(path, kind, (out,))]
        mask = args.output or path.with_name(f"{path.stem}_mask.png")
        if mask.suffix.lower() != ".png":
            raise DataError(f"{mask}: found output suffix {mask.suffix or 'none'}; expected .png for a 2D slice input")
        ensure_folder(mask.parent)
        overlay = mask.with_name(f"{path.stem}_overlay.png" if args.output is None else f"{mask.stem}_overlay.png")
        return [_Job(path, kind, (mask, overlay))]
    if args.output is not None:
        ensure_folder(args.output)
    for path, kind in inputs:
        folder = args.output or path.parent
        if kind == "volume":
            jobs.append(_Job(path, kind, (folder / f"{strip_nifti_suffix(path.name)}_seg.nii.gz",)))
        else:
            jobs.append(_Job(path, kind, (folder / f"{path.stem}_mask.png", folder / f"{path.stem}_overlay.png")))
    return jobs


def _predict_volume(job: _Job, args: argparse.Namespace, hp: dict, device: torch.device, get_net) -> dict:
    hu, geom = load_volume(job.path)  # (Z, H, W) HU in slices order
    which = None
    if args.slice is not None:
        which = [slice_of_file(geom, args.slice, job.path)]
    truth = None
    if args.ground_truth is not None:
        truth, _ = load_label_volume(args.ground_truth, expected_shape=geom.shape, image_path=job.path)
    labels = segment_slices(get_net(), hu, hp, device, args.batch_size, which, desc=job.path.name)
    if args.postprocess:
        labels = postprocess(labels)
    reference = nib.load(str(job.path))  # header only: its qform and sform go to the output
    if which is None:
        write_label_volume(geom.to_file(labels), reference, job.outputs[0])
        slice_geom = geom
    else:
        slice_geom = Geometry(geom.affine, (*geom.shape[:2], 1), geom.spacing)
        write_label_volume(slice_geom.to_file(labels), reference, job.outputs[0], first_slice=args.slice)
    report = {"input": str(job.path), "output": str(job.outputs[0]), "kind": "volume",
              "shape": list(geom.shape), "spacing_mm": [float(s) for s in geom.spacing],
              "slice": args.slice, "postprocess": bool(args.postprocess)}
    to_file = geom.file_slice_index if which is None else (lambda z: args.slice)
    report.update(measure(labels, geom.spacing, to_file))
    if truth is not None:
        ref = truth if which is None else truth[which]
        report["ground_truth"] = str(args.ground_truth)
        report["metrics"] = score(labels, ref, geom.spacing)
    return report


def _predict_images(jobs: list[_Job], args: argparse.Namespace, hp: dict, device: torch.device, get_net) -> list[dict]:
    """All slices are read first (a bad one stops the run before anything is written), then segmented
    in batches of slices with the same size."""
    images = [load_slice_image(job.path) for job in jobs]  # (H, W) in [0, 1]
    by_size: dict[tuple[int, int], list[int]] = {}
    for i, image in enumerate(images):
        by_size.setdefault(image.shape, []).append(i)
    reports: list[dict] = [{}] * len(jobs)
    for size, members in by_size.items():
        stack = np.stack([images[i] for i in members])  # (N, H, W)
        labels = segment_slices(get_net(), stack, hp, device, args.batch_size, windowed=True, lone=True,
                                desc=f"{len(members)} slice(s) {size[0]}x{size[1]}")
        for i, lab in zip(members, labels):
            lab = postprocess(lab[None])[0] if args.postprocess else lab
            write_mask_and_overlay(images[i], lab, *jobs[i].outputs)
            reports[i] = {"input": str(jobs[i].path), "output": str(jobs[i].outputs[0]),
                          "overlay": str(jobs[i].outputs[1]), "kind": "image", "shape": list(size),
                          "postprocess": bool(args.postprocess), **measure(lab[None])}
    return reports


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def print_report(report: dict) -> None:
    lines = [f"{report['input']} -> {report['output']}" + (f" + {report['overlay']}" if "overlay" in report else "")]
    if report["kind"] == "volume":
        where = f" (slice {report['slice']})" if report["slice"] is not None else ""
        lines.append(f"  liver {report['liver_volume_ml']:.1f} mL, tumor {report['tumor_volume_ml']:.2f} mL "
                     f"(burden {report['tumor_burden_percent']:.2f} %), {report['num_lesions']} lesion(s){where}")
        lines += [f"    lesion {d['id']}: {d['volume_ml']:.2f} mL, largest axial diameter "
                  f"{d['largest_axial_diameter_mm']:.1f} mm, centre slice {d['centre_slice']}" for d in report["lesions"]]
    else:
        lines.append(f"  liver {report['liver_area_px']:.0f} px, tumor {report['tumor_area_px']:.0f} px "
                     f"(burden {report['tumor_burden_percent']:.2f} %), {report['num_lesions']} lesion(s)")
        lines += [f"    lesion {d['id']}: {d['area_px']:.0f} px, largest diameter {d['largest_diameter_px']:.1f} px"
                  for d in report["lesions"]]
    if "metrics" in report:
        lines.append("  against " + report["ground_truth"] + ": " +
                     ", ".join(f"{k} {_fmt(v)}" for k, v in report["metrics"].items()))
    sys.stdout.write("\n".join(lines) + "\n")


def main(args: argparse.Namespace) -> dict:
    if args.batch_size is not None and args.batch_size < 1:
        raise DataError(f"found --batch-size {args.batch_size}; expected 1 or more")
    device = pick_device(args.device)
    if args.batch_size is None:
        args.batch_size = 32 if device.type == "cuda" else 8
    ckpt = load_checkpoint(args.checkpoint, "segmentation")
    inputs = find_inputs(args.input)
    single_volume = args.input.is_file() and inputs[0][1] == "volume"
    for flag, value in (("--slice", args.slice), ("--ground-truth", args.ground_truth)):
        if value is not None and not single_volume:
            raise DataError(f"{args.input}: {flag} needs one volume as --input; found "
                            f"{'a folder' if args.input.is_dir() else 'a 2D slice'}")
    if args.ground_truth is not None and not args.ground_truth.is_file():
        raise DataError(f"{args.ground_truth}: ground truth not found; expected a segmentation NIfTI")
    if args.report is not None:
        if args.report.suffix.lower() != ".json":
            raise DataError(f"{args.report}: found suffix {args.report.suffix or 'none'}; expected a .json report")
        ensure_folder(args.report.parent)
    jobs = _plan(args, inputs)
    get_net = functools.cache(lambda: ckpt.network(device))
    hp = ckpt.hparams

    reports: dict[Path, dict] = {}
    volumes = [j for j in jobs if j.kind == "volume"]
    # Closed on the way out, error or not (leave=False clears its line), so an error stays one clean line.
    with tqdm(total=len(volumes), desc="volumes", unit="file", file=sys.stderr, disable=len(volumes) < 2,
              delay=1.0, leave=False) as bar:
        for job in volumes:
            reports[job.path] = _predict_volume(job, args, hp, device, get_net)
            bar.clear()
            print_report(reports[job.path])  # as each file is done: a later bad file does not hide it
            bar.update()
    images = [j for j in jobs if j.kind == "image"]
    if images:
        for job, report in zip(images, _predict_images(images, args, hp, device, get_net)):
            reports[job.path] = report
            print_report(report)
    ordered = [reports[j.path] for j in jobs]
    result = {"checkpoint": str(args.checkpoint), "device": str(device), "cases": ordered}
    if args.report is not None:
        try:
            atomic_write_text(args.report, json.dumps(result, indent=2))
        except OSError as exc:
            raise DataError(f"{args.report}: cannot write the report ({exc.strerror}); expected a writable path") from None
    return result


if __name__ == "__main__":
    sys.exit(run_cli(main, get_args_parser()))
