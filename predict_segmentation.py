"""Segment liver and tumor on CT with a trained U-Net checkpoint.

    python predict_segmentation.py --checkpoint runs/segmentation/checkpoints/best.ckpt --input volume-7.nii
    python predict_segmentation.py --checkpoint best.ckpt --input volume-7.nii --ground-truth segmentation-7.nii \\
        --report volume-7_report.json
    python predict_segmentation.py --checkpoint best.ckpt --input volume-7.nii --exact      # the reference path
    python predict_segmentation.py --checkpoint best.ckpt --input volume-7.nii --slice 60   # one slice
    python predict_segmentation.py --checkpoint best.ckpt --input slice.png               # mask + overlay PNG
    python predict_segmentation.py --checkpoint best.ckpt --input scans/ --output predictions/
    python predict_segmentation.py --checkpoint best.ckpt --input /data/Task03_Liver/imagesTr --output predictions/ \
        --split-file runs/segmentation/splits.json --split test    # only a run's test patients
    python predict_segmentation.py --checkpoint best.ckpt --input CT/patient-7/            # a DICOM series
    python predict_segmentation.py --checkpoint best.ckpt --input CT/patient-7/ --output patient-7_seg.dcm

A volume gives a label NIfTI (uint8: 0 background, 1 liver, 2 tumor) with exactly the input's shape,
affine and orientation, so it opens on top of the CT in 3D Slicer or ITK-SNAP; default name
`<name>_seg.nii.gz` beside the input. A DICOM series (a folder of its files, any depth, with or
without extensions) gives the same on the series' own grid, `<series folder>_seg.nii.gz` beside
the folder, or with `--output x.dcm` a DICOM Segmentation that references the series. A 2D slice
(PNG/JPG taken as already windowed, `.npy` or one `.dcm` file in HU) gives `<stem>_mask.png`
(label values 0/1/2) and `<stem>_overlay.png` (liver green, tumor red). A short report (liver
volume, lesions, tumor burden) is printed and, with --report, saved as JSON.

The model and its preprocessing (HU window, image size, 2.5D context) are rebuilt from the checkpoint
alone (`inference.py`); the preprocessing is `volumes.py`'s, the very functions training uses. A
lone 2D slice has no neighbours, so it stands in for them: its 2.5D stack repeats the slice.

A volume takes the fast path unless --exact: a coarse pass (the same network on every eighth slice
at half the model's size) finds the liver, the network then runs at full resolution only on the
liver's slices, each on a crop around its liver plus a margin (growing while the liver reaches an
edge), everything else is background; on a CPU with native bf16 (AVX512-BF16, AMX) in bf16. No liver
at half size: every fourth slice is looked at again at full size before the volume is called background.
--exact runs every slice at full resolution in float32 on a CPU: the reference (`inference.segment`).
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from inference import FlipTTA, add_runtime_flags, fast_path_slices, load_checkpoint, postprocess, runtime, segment
from lesions import measure, recist_role
from volumes import (DICOM_SUFFIX, VOLUME_SUFFIXES, DataError, DicomSeries, atomic_write_text, ensure_folder,
                     find_inputs, input_name, load_slice_image, one_volume, overlay, read_labels_on_grid,
                     read_volume, run_cli, slice_of_file, write_labels, write_png)


# --------------------------------------------------------------------------------------------
# Scoring against ground truth
# --------------------------------------------------------------------------------------------

def score(pred: np.ndarray, truth: np.ndarray, truth_img) -> dict:
    """LiTS metrics of a prediction against ground truth, with lesion detection counts at IoU > 0.5:
    `evaluate.score_case`'s row. Both arrays in the ground-truth file's voxel order (`truth_img`, its
    nibabel image, gives spacing and axial axis: `evaluate.grid_of`), as evaluate.py scores the files,
    so the two print the same numbers (the scorer's lesion counts depend on the voxel order).
    Non-finite values (an empty mask) become None, so the report stays JSON."""
    from evaluate import grid_of, json_safe, score_case
    spacing, axial_axis = grid_of(truth_img)
    return json_safe(score_case(pred, truth, spacing, axial_axis).row)


# --------------------------------------------------------------------------------------------
# Writing outputs
# --------------------------------------------------------------------------------------------

def write_mask_and_overlay(image: np.ndarray, labels: np.ndarray, mask_path: Path, overlay_path: Path) -> None:
    """Mask PNG (mode L, values 0/1/2) and overlay PNG (CT grey, liver green, tumor red) of one slice."""
    rgb = overlay(torch.from_numpy(image), torch.from_numpy(labels))  # (3, H, W) in [0, 1]
    write_png(np.ascontiguousarray(labels.astype(np.uint8)), mask_path)
    write_png((rgb.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8), overlay_path)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Liver and tumor segmentation of CT volumes, DICOM series or slices with a U-Net checkpoint. "
                    "A lone 2D slice has no neighbours, so it stands in for them in the 2.5D stack.")
    p.add_argument("--checkpoint", required=True, type=Path, help="segmentation .ckpt written by train.py")
    p.add_argument("--input", required=True, type=Path,
                   help="a NIfTI volume (.nii, .nii.gz), a folder holding a DICOM CT series (any depth, files with or "
                        "without extension), a 2D slice (PNG/JPG: 8-bit, already windowed; .npy or one .dcm: HU, "
                        "windowed with the checkpoint's window) or a folder of them (NIfTI and slices at its top "
                        "level, every CT series at any depth; *_seg.nii.gz, *_mask.png, *_overlay.png and "
                        "segmentation-N.nii are skipped)")
    p.add_argument("--series", default=None, metavar="UID",
                   help="with a folder as --input: only the DICOM series with this SeriesInstanceUID "
                        "(default: every CT series in the folder)")
    p.add_argument("--output", type=Path, default=None,
                   help="label volume path (.nii or .nii.gz; for a DICOM series also .dcm, a DICOM SEG) for one "
                        "volume, mask path (.png) for one slice (the overlay goes beside it as <stem>_overlay.png), "
                        "a folder for a folder input (default: beside each input, <name>_seg.nii.gz, for a DICOM "
                        "series <series folder>_seg.nii.gz beside its folder, or <stem>_mask.png + <stem>_overlay.png)")
    p.add_argument("--slice", type=int, default=None, metavar="K",
                   help="segment only slice K of a volume, K in the file's own order (its third axis; for a DICOM "
                        "series, by position along the slice normal); writes a one-slice NIfTI placed at that slice, "
                        "<name>_slice<K>_seg.nii.gz (default: all slices)")
    p.add_argument("--tta", action="store_true",
                   help="test-time augmentation: average the network's answers on each slice as it is, mirrored "
                        "left-right and mirrored top-bottom (three times the work; for scans whose orientation "
                        "may be wrong) (default: off)")
    p.add_argument("--postprocess", action=argparse.BooleanOptionalAction, default=True,
                   help="keep the largest 3D liver component and only tumor next to liver (default: on)")
    p.add_argument("--ground-truth", type=Path, default=None,
                   help="segmentation NIfTI of the input volume, on its voxel grid (same shape, affine within "
                        "0.001 mm, as evaluate.py requires; nothing is reoriented): score the prediction as "
                        "evaluate.py does (Dice, VOE, RVD, surface distances, lesion detection) (default: none)")
    p.add_argument("--report", type=Path, default=None,
                   help="also write the report as JSON to this file; volumes in mL and mm, 2D slices in "
                        "pixels (default: printed only)")
    p.add_argument("--exact", action="store_true",
                   help="the reference path: every slice through the network at the checkpoint's full resolution, "
                        "float32 on a CPU (default: off, the fast path: a coarse pass finds the liver, the network "
                        "runs at full resolution only on its slices, each on a crop around it plus a margin, "
                        "background elsewhere, in bf16 on CPUs with native bf16; see the README)")
    p.add_argument("--split-file", type=Path, default=None,
                   help="a run's splits.json (train.py writes it into its --output-dir): with a folder as --input, "
                        "segment only the cases of one of its parts; a volume's case is its name (volume-7.nii: "
                        "volume-7), a slice's the stem before its last underscore (default: every input)")
    p.add_argument("--split", choices=("train", "val", "test"), default=None,
                   help="which part of --split-file to segment (default: test)")
    add_runtime_flags(p, "slices per forward pass (default: 32 on CUDA, 8 on a CPU, where large batches "
                         "spill the caches: 1.94 vs 1.80 slices/s measured, see BENCHMARKS.md)")
    return p


@dataclass
class _Job:
    source: Path | DicomSeries
    kind: str
    outputs: tuple[Path, ...]


def _plan(args: argparse.Namespace, inputs: list[tuple[Path | DicomSeries, str]]) -> list[_Job]:
    """Output paths of every input, checked (and folders created) before any work is done."""
    if one_volume(args.input, inputs) or args.input.is_file():
        source, kind = inputs[0]
        stem, home = input_name(source)
        if args.output is not None and isinstance(source, Path) and args.output.resolve() == source.resolve():
            raise DataError(f"{args.output}: found the input itself as --output; expected another path "
                            f"(inputs are never overwritten)")
        if kind == "volume":
            name = stem + (f"_slice{args.slice}" if args.slice is not None else "")
            out = args.output or home / f"{name}_seg.nii.gz"
            dicom = isinstance(source, DicomSeries)
            if not out.name.lower().endswith(VOLUME_SUFFIXES + ((DICOM_SUFFIX,) if dicom else ())):
                raise DataError(f"{out}: found output suffix {''.join(out.suffixes) or 'none'}; expected .nii or "
                                f".nii.gz for a volume input" + (" (or .dcm for a DICOM SEG)" if dicom else
                                                                 " (a DICOM SEG needs a DICOM series as input)"))
            ensure_folder(out.parent)
            return [_Job(source, kind, (out,))]
        mask = args.output or home / f"{stem}_mask.png"
        if mask.suffix.lower() != ".png":
            raise DataError(f"{mask}: found output suffix {mask.suffix or 'none'}; expected .png for a 2D slice input")
        ensure_folder(mask.parent)
        overlay = mask.with_name(f"{stem}_overlay.png" if args.output is None else f"{mask.stem}_overlay.png")
        return [_Job(source, kind, (mask, overlay))]
    if args.output is not None:
        ensure_folder(args.output)
    jobs, seen = [], {}
    for source, kind in inputs:
        stem, home = input_name(source)
        folder = args.output or home
        if kind == "volume":
            outputs = (folder / f"{stem}_seg.nii.gz",)
        else:
            outputs = (folder / f"{stem}_mask.png", folder / f"{stem}_overlay.png")
        for out in outputs:
            if out in seen:
                raise DataError(f"{out}: found two inputs that would write it ({seen[out]} and {source}); expected "
                                f"inputs with different names")
            seen[out] = source
        jobs.append(_Job(source, kind, outputs))
    return jobs


def _predict_volume(job: _Job, args: argparse.Namespace, hp: dict, device: torch.device, get_net) -> dict:
    source = job.source
    stem, _ = input_name(source)
    where = source.label if isinstance(source, DicomSeries) else source
    hu, geom = read_volume(source, dtype=None)  # (Z, H, W) HU in slices order, as stored
    which = None
    if args.slice is not None:
        which = [slice_of_file(geom, args.slice, where)]
    truth = None
    if args.ground_truth is not None:
        # The rule evaluate.py applies: the input's voxel grid, or refused (never reoriented by its own
        # affine, which would score a lying header mirrored). Checked before any work is done.
        image_path = source.folder if isinstance(source, DicomSeries) else source
        truth_img, truth = read_labels_on_grid(args.ground_truth, image_path, geom.shape, geom.affine)
    found: list = []
    labels = segment(get_net(), hu, hp, device, fast=not args.exact, batch_size=args.batch_size, which=which,
                     desc=stem, info=found)
    if args.postprocess:
        labels = postprocess(labels)
    out_geom = geom if which is None else geom.one_slice(args.slice)
    write_labels(labels, out_geom, job.outputs[0])
    report = {"input": str(source.folder if isinstance(source, DicomSeries) else source),
              "output": str(job.outputs[0]), "kind": "volume",
              "shape": list(geom.shape), "spacing_mm": [float(s) for s in geom.spacing],
              "slice": args.slice, "postprocess": bool(args.postprocess), "exact": bool(args.exact)}
    if isinstance(source, DicomSeries):
        report["series_instance_uid"] = source.uid
    if found:
        report["fast_path"] = found[0].summary(len(hu))
    to_file = geom.file_slice_index if which is None else (lambda z: args.slice)
    world = geom.slices_affine.copy()
    if which is not None:
        world[:, 3] = world @ [which[0], 0, 0, 1]  # the one slice's (0, row, column) is the volume's (z, ...)
    report.update(measure(labels, geom.spacing, to_file, hu=hu if which is None else hu[which], affine=world))
    if truth is not None:
        ref = truth if which is None else truth[:, :, args.slice:args.slice + 1]  # the file's slice K
        report["ground_truth"] = str(args.ground_truth)
        report["metrics"] = score(out_geom.to_file(labels), ref, truth_img)
    return report


def _predict_images(jobs: list[_Job], args: argparse.Namespace, hp: dict, device: torch.device, get_net) -> list[dict]:
    """All slices are read first (a bad one stops the run before anything is written), then segmented
    in batches of slices with the same size."""
    images = [load_slice_image(job.source, hp["window"]) for job in jobs]  # (H, W) in [0, 1], the checkpoint's window
    by_size: dict[tuple[int, int], list[int]] = {}
    for i, image in enumerate(images):
        by_size.setdefault(image.shape, []).append(i)
    reports: list[dict] = [{}] * len(jobs)
    for size, members in by_size.items():
        stack = np.stack([images[i] for i in members])  # (N, H, W)
        labels = segment(get_net(), stack, hp, device, fast=not args.exact, batch_size=args.batch_size,
                         windowed=True, lone=True, desc=f"{len(members)} slice(s) {size[0]}x{size[1]}")
        for i, lab in zip(members, labels):
            lab = postprocess(lab[None])[0] if args.postprocess else lab
            write_mask_and_overlay(images[i], lab, *jobs[i].outputs)
            reports[i] = {"input": str(jobs[i].source), "output": str(jobs[i].outputs[0]),
                          "overlay": str(jobs[i].outputs[1]), "kind": "image", "shape": list(size),
                          "postprocess": bool(args.postprocess), **measure(lab[None])}
    return reports


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


PRINTED_LESIONS = 10  # the largest lesions printed; --report's JSON holds every one


def _rest_line(rest: list[dict], unit: str, key: str) -> list[str]:
    """One line for the lesions not printed (a model still learning can leave hundreds of specks)."""
    if not rest:
        return []
    total = sum(d[key] for d in rest)
    amount = f"{total:.2f} {unit}" if unit == "mL" else f"{total:.0f} {unit}"
    return [f"    ... and {len(rest)} smaller lesion(s), {amount} together (each in --report FILE.json)"]


def print_report(report: dict) -> None:
    lines = [f"{report['input']} -> {report['output']}" + (f" + {report['overlay']}" if "overlay" in report else "")]
    if report["kind"] == "volume":
        where = f" (slice {report['slice']})" if report["slice"] is not None else ""
        lines.append(f"  liver {report['liver_volume_ml']:.1f} mL, tumor {report['tumor_volume_ml']:.2f} mL "
                     f"(burden {report['tumor_burden_percent']:.2f} %), {report['num_lesions']} lesion(s){where}")
        targets = report["recist_target_lesions"]
        lines += [f"    lesion {d['id']}: {d['volume_ml']:.2f} mL, long axis {d['long_axis_mm']:.1f} mm, short axis "
                  f"{d['short_axis_mm']:.1f} mm (slice {d['slice']}; slices {d['first_slice']}-{d['last_slice']})"
                  + (f", RECIST {role}" if (role := recist_role(d, targets)) else "")
                  for d in report["lesions"][:PRINTED_LESIONS]]
        lines += _rest_line(report["lesions"][PRINTED_LESIONS:], "mL", "volume_ml")
        if targets:
            lines.append(f"  RECIST 1.1 target lesions: {', '.join(map(str, targets))} (sum of long axes "
                         f"{report['recist_sum_long_axes_mm']:.1f} mm)")
        if "fast_path" in report:
            f = report["fast_path"]
            lines.append(f"  fast path: {fast_path_slices(f)} at full resolution, {100 * f['share_of_volume']:.0f} % "
                         "of the volume" +
                         (", bf16" if f["bf16"] else "") + "; --exact for the reference path")
    else:
        lines.append(f"  liver {report['liver_area_px']:.0f} px, tumor {report['tumor_area_px']:.0f} px "
                     f"(burden {report['tumor_burden_percent']:.2f} %), {report['num_lesions']} lesion(s)")
        lines += [f"    lesion {d['id']}: {d['area_px']:.0f} px, long axis {d['long_axis_px']:.1f} px, short axis "
                  f"{d['short_axis_px']:.1f} px" for d in report["lesions"][:PRINTED_LESIONS]]
        lines += _rest_line(report["lesions"][PRINTED_LESIONS:], "px", "area_px")
    if "metrics" in report:
        lines.append("  against " + report["ground_truth"] + ": " +
                     ", ".join(f"{k} {_fmt(v)}" for k, v in report["metrics"].items()))
    sys.stdout.write("\n".join(lines) + "\n")


def select_split(inputs: list, args: argparse.Namespace) -> list:
    """The inputs whose case is in the chosen part of --split-file (all of them without it). Cases of
    the part that are not among the inputs are named on stderr: a data set can be spread over several
    folders (LiTS comes in two batches), each predicted in turn."""
    if args.split is not None and args.split_file is None:
        raise DataError(f"found --split {args.split} without --split-file; expected the run's splits.json too")
    if args.split_file is None:
        return inputs
    from dataset import split_part
    part = args.split or "test"
    wanted = set(split_part(args.split_file, part))

    def case_id(item) -> str:
        stem = input_name(item[0])[0]
        return stem.rsplit("_", 1)[0] if item[1] == "image" and "_" in stem else stem

    chosen = [item for item in inputs if case_id(item) in wanted]
    if not chosen:
        raise DataError(f"{args.input}: found none of the {len(wanted)} {part} case(s) of {args.split_file} "
                        f"(e.g. {sorted(wanted)[0]}); expected inputs named by case, e.g. {sorted(wanted)[0]}.nii.gz")
    found = {case_id(item) for item in chosen}
    absent = sorted(wanted - found)
    sys.stderr.write(f"{len(found)} of the {len(wanted)} {part} case(s) of {args.split_file} found in {args.input}"
                     + (f"; not here: {', '.join(absent)}" if absent else "") + "\n")
    return chosen


def main(args: argparse.Namespace) -> dict:
    device, args.batch_size = runtime(args.device, args.batch_size, args.threads)
    ckpt = load_checkpoint(args.checkpoint, "segmentation")
    inputs = select_split(find_inputs(args.input, args.series), args)
    for flag, value in (("--slice", args.slice), ("--ground-truth", args.ground_truth)):
        if value is not None and not one_volume(args.input, inputs):
            raise DataError(f"{args.input}: {flag} needs one volume as --input; found "
                            f"{'a folder' if args.input.is_dir() else 'a 2D slice'}")
    if args.ground_truth is not None and not args.ground_truth.is_file():
        raise DataError(f"{args.ground_truth}: ground truth not found; expected a segmentation NIfTI")
    if args.report is not None:
        if args.report.suffix.lower() != ".json":
            raise DataError(f"{args.report}: found suffix {args.report.suffix or 'none'}; expected a .json report")
        ensure_folder(args.report.parent)
    jobs = _plan(args, inputs)
    get_net = functools.cache(lambda: FlipTTA(ckpt.network(device)) if args.tta else ckpt.network(device))
    hp = ckpt.hparams

    reports: dict[int, dict] = {}  # by job index
    volumes = [i for i, j in enumerate(jobs) if j.kind == "volume"]
    # Closed on the way out, error or not (leave=False clears its line), so an error stays one clean line.
    with tqdm(total=len(volumes), desc="volumes", unit="file", file=sys.stderr, disable=len(volumes) < 2,
              delay=1.0, leave=False) as bar:
        for i in volumes:
            reports[i] = _predict_volume(jobs[i], args, hp, device, get_net)
            bar.clear()
            print_report(reports[i])  # as each file is done: a later bad file does not hide it
            bar.update()
    images = [i for i, j in enumerate(jobs) if j.kind == "image"]
    if images:
        for i, report in zip(images, _predict_images([jobs[i] for i in images], args, hp, device, get_net)):
            reports[i] = report
            print_report(report)
    ordered = [reports[i] for i in range(len(jobs))]
    result = {"checkpoint": str(args.checkpoint), "device": str(device), "cases": ordered}
    if args.report is not None:
        try:
            atomic_write_text(args.report, json.dumps(result, indent=2))
        except OSError as exc:
            raise DataError(f"{args.report}: cannot write the report ({exc.strerror}); expected a writable path") from None
    return result


if __name__ == "__main__":
    sys.exit(run_cli(main, get_args_parser()))
