"""Per-slice tumor probability from a trained VGG16 checkpoint.

    python predict_classification.py --checkpoint runs/classification/checkpoints/best.ckpt --input volume-7.nii
    python predict_classification.py --checkpoint best.ckpt --input volume-7.nii --slice 60
    python predict_classification.py --checkpoint best.ckpt --input scans/ --output tumor_slices.csv
    python predict_classification.py --checkpoint best.ckpt --input slice.png --threshold 0.3
    python predict_classification.py --checkpoint best.ckpt --input CT/patient-7/ --output slices.csv   # DICOM

Prints a table (case, slice, probability of tumor, prediction) and, for each volume, a one-line
verdict: how many slices show tumor and the most suspicious one. --output saves the table as CSV or
JSON (by extension). Slices are numbered in the file's own order (its third axis); those of a DICOM
series in the series' order (by position along the slice normal), and their rows also name each
slice's SOPInstanceUID (column sop_instance_uid). A 2D slice file is slice 0. The prediction is
tumor when the probability reaches the threshold recorded in the checkpoint, or --threshold.

The model and its preprocessing come from the checkpoint alone, through `inference.py`. A lone 2D
slice (PNG/JPG 8-bit, already windowed; .npy or one .dcm file in HU) has no neighbours, so it stands
in for them in the 2.5D stack.
"""
from __future__ import annotations

import argparse
import csv
import functools
import io
import json
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from inference import infer_batched, load_checkpoint, pick_device, preprocess_volume
from volumes import (CLS_CLASSES, DataError, DicomSeries, atomic_write_text, ensure_folder, find_inputs, input_name,
                     load_slice_image, one_volume, read_volume, run_cli, slice_of_file)

COLUMNS = ("case", "slice", "probability", "prediction")
UID_COLUMN = "sop_instance_uid"  # rows of a DICOM series only


def tumor_probability(logits: torch.Tensor) -> torch.Tensor:
    """Logits (B, 2) -> probability of class 1, tumor (B,)."""
    return logits.softmax(dim=1)[:, 1]


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Tumor / healthy per CT slice with a VGG16 checkpoint. A lone 2D slice has no neighbours, "
                    "so it stands in for them in the 2.5D stack.")
    p.add_argument("--checkpoint", required=True, type=Path, help="classification .ckpt written by train.py")
    p.add_argument("--input", required=True, type=Path,
                   help="a NIfTI volume (.nii, .nii.gz), a folder holding a DICOM CT series (any depth, files with "
                        "or without extension), a 2D slice (PNG/JPG: 8-bit, already windowed; .npy or one .dcm: HU) "
                        "or a folder of them (NIfTI and slices at its top level, every CT series at any depth; "
                        "segmentation-N.nii and this project's outputs skipped)")
    p.add_argument("--series", default=None, metavar="UID",
                   help="with a folder as --input: only the DICOM series with this SeriesInstanceUID "
                        "(default: every CT series in the folder)")
    p.add_argument("--slice", type=int, default=None, metavar="K",
                   help="only slice K of a volume, in the file's own order (a DICOM series: the series' order) "
                        "(default: all slices)")
    p.add_argument("--threshold", type=float, default=None,
                   help="tumor when probability >= this (default: the threshold recorded in the checkpoint)")
    p.add_argument("--output", type=Path, default=None,
                   help="save the table as .csv (case,slice,probability,prediction[,sop_instance_uid]) or .json "
                        "(default: print only)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto takes CUDA when available (default: auto)")
    p.add_argument("--batch-size", type=int, default=32, help="slices per forward pass (default: 32)")
    return p


def _rows(case: str, slices, probs, threshold: float, names, uids=None) -> list[dict]:
    rows = [{"case": case, "slice": int(k), "probability": float(p), "prediction": names[int(p >= threshold)]}
            for k, p in zip(slices, probs)]
    for row, uid in zip(rows, uids or ()):
        row[UID_COLUMN] = uid
    return rows


def classify_volume(get_net, source: Path | DicomSeries, hp: dict, device: torch.device, args: argparse.Namespace,
                    threshold: float, names) -> list[dict]:
    """Rows of one volume (all slices, or --slice), in the file's own slice order (a DICOM series:
    the series' order, each row naming its slice's SOPInstanceUID). The network comes from
    `get_net()` once the volume has been read, so a bad file is reported without waiting for it."""
    case, _ = input_name(source)
    hu, geom = read_volume(source)  # (Z, H, W) HU in slices order
    where = source.label if isinstance(source, DicomSeries) else source
    zs = np.arange(hu.shape[0]) if args.slice is None else np.array([slice_of_file(geom, args.slice, where)])
    volume = preprocess_volume(hu, hp, device)  # (Z, S, S)
    probs = infer_batched(get_net(), volume, hp["context_slices"], tumor_probability, args.batch_size, zs,
                          desc=case).numpy()
    numbers = np.array([geom.file_slice_index(int(z)) for z in zs])
    order = np.argsort(numbers)
    uids = [str(geom.dicom[k].get("SOPInstanceUID", "")) for k in numbers[order]] if geom.dicom else None
    return _rows(case, numbers[order], probs[order], threshold, names, uids)


def verdict(rows: list[dict], threshold: float, tumor_name: str) -> str:
    """One line for a volume: slices with tumor and the most suspicious slice."""
    top = max(rows, key=lambda r: r["probability"])
    positive = sum(r["prediction"] == tumor_name for r in rows)
    return (f"{rows[0]['case']}: tumor in {positive} of {len(rows)} slice(s) (threshold {threshold:g}); "
            f"most suspicious slice {top['slice']} (probability {top['probability']:.3f})")


def columns(rows: list[dict]) -> tuple[str, ...]:
    """The table's columns: sop_instance_uid only when some row comes from a DICOM series."""
    return COLUMNS + ((UID_COLUMN,) if any(UID_COLUMN in r for r in rows) else ())


def format_table(rows: list[dict]) -> str:
    names = columns(rows)
    cells = [names] + [(r["case"], str(r["slice"]), f"{r['probability']:.4f}", r["prediction"],
                        r.get(UID_COLUMN, ""))[:len(names)] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(names))]
    return "\n".join("  ".join(c.rjust(w) if i in (1, 2) else c.ljust(w)
                               for i, (c, w) in enumerate(zip(cell, widths))).rstrip() for cell in cells)


def main(args: argparse.Namespace) -> dict:
    if args.batch_size < 1:
        raise DataError(f"found --batch-size {args.batch_size}; expected 1 or more")
    device = pick_device(args.device)
    ckpt = load_checkpoint(args.checkpoint, "classification")
    hp = ckpt.hparams
    threshold = float(hp.get("threshold", 0.5) if args.threshold is None else args.threshold)
    if not 0.0 <= threshold <= 1.0:
        raise DataError(f"found threshold {threshold}; expected a probability in [0, 1]")
    names = tuple(hp.get("class_names", CLS_CLASSES))
    inputs = find_inputs(args.input, args.series)
    if args.slice is not None and not one_volume(args.input, inputs):
        raise DataError(f"{args.input}: --slice needs one volume as --input; found "
                        f"{'a folder' if args.input.is_dir() else 'a 2D slice'}")
    if args.output is not None:
        if args.output.suffix.lower() not in (".csv", ".json"):
            raise DataError(f"{args.output}: found output suffix {args.output.suffix or 'none'}; expected .csv or .json")
        ensure_folder(args.output.parent)
    get_net = functools.cache(lambda: ckpt.network(device))

    rows, verdicts = [], []
    volumes = [p for p, kind in inputs if kind == "volume"]
    # Closed on the way out, error or not (leave=False clears its line), so an error stays one clean line.
    with tqdm(total=len(volumes), desc="volumes", unit="file", file=sys.stderr, disable=len(volumes) < 2,
              delay=1.0, leave=False) as bar:
        for source in volumes:
            case_rows = classify_volume(get_net, source, hp, device, args, threshold, names)
            rows += case_rows
            verdicts.append(verdict(case_rows, threshold, names[1]))
            bar.update()
    images = [p for p, kind in inputs if kind == "image"]
    if images:
        # Every slice is resized to the model's size, so slices of any size share the batches.
        volume = torch.cat([preprocess_volume(load_slice_image(p)[None], hp, device, windowed=True) for p in images])
        probs = infer_batched(get_net(), volume, hp["context_slices"], tumor_probability, args.batch_size,
                              lone=True, desc=f"{len(images)} slice(s)").numpy()
        for path, p in zip(images, probs):
            rows += _rows(input_name(path)[0], [0], [p], threshold, names)

    sys.stdout.write(format_table(rows) + "\n" + "".join(v + "\n" for v in verdicts))
    if args.output is not None:
        if args.output.suffix.lower() == ".json":
            text = json.dumps(rows, indent=2)
        else:
            buf = io.StringIO()
            writer = csv.DictWriter(buf, fieldnames=columns(rows), lineterminator="\n")
            writer.writeheader()
            writer.writerows({**r, "probability": f"{r['probability']:.6f}"} for r in rows)
            text = buf.getvalue()
        try:
            atomic_write_text(args.output, text)
        except OSError as exc:
            raise DataError(f"{args.output}: cannot write ({exc.strerror}); expected a writable path") from None
    return {"threshold": threshold, "rows": rows, "verdicts": verdicts}


if __name__ == "__main__":
    sys.exit(run_cli(main, get_args_parser()))
