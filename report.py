"""A diagnostic-aid report of one CT study from both models: the U-Net's lesions and the VGG16's slices.

    python report.py --input volume-7.nii --segmentation-checkpoint seg.ckpt \\
        --classification-checkpoint cls.ckpt --output-dir reports/volume-7
    python report.py --input CT/patient-7/ --segmentation-checkpoint seg.ckpt \\
        --classification-checkpoint cls.ckpt --output-dir reports/patient-7 --dicom-seg
    python report.py ... --exact --show-identifiers --device cuda

Writes into --output-dir, built in a temporary folder beside it and renamed when complete (a failed run
leaves nothing):
  <name>_seg.nii.gz   the label volume (0 background, 1 liver, 2 tumour) on the input's own grid;
  <name>_seg.dcm      with --dicom-seg, for a DICOM series: the same as a DICOM Segmentation;
  report.json         liver and tumour volumes, burden, every lesion (volume, RECIST long and short
                      axes, mean HU, key slice, world position), every slice (the classifier's
                      probability, the segmented tumour area), where the two models disagree, the
                      checkpoints and their preprocessing, the software version;
  report.html         one self-contained page (images embedded, no network): the same, with a key
                      image of each lesion and a plot along the slices.

The segmentation takes the fast path (`inference.segment`, as predict_segmentation.py does) unless
--exact, then `inference.postprocess`; the classifier sees every slice (`inference.classify`). Every
number is measured (`lesions.py`) on the label volume written. A DICOM header's patient id and study
date appear only with --show-identifiers.
"""
from __future__ import annotations

import argparse
import base64
import datetime
import hashlib
import html
import io
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from inference import (add_runtime_flags, classify, cpu_has_fast_bf16, fast_path_slices, hparam, load_checkpoint,
                       postprocess, runtime, segment, volume_score, volume_threshold)
from lesions import Lesion, label_lesions, measure, measure_lesions, recist_role
from volumes import (CLS_CLASSES, DataError, DicomSeries, atomic_folder, find_inputs, input_name, int_at_least,
                     one_volume, read_volume, run_cli, window_hu, write_labels)

__version__ = "0.12.0"  # reported where git cannot say (a copy of the project without its history)
REPORT_FORMAT = 1       # report.json's layout; raised when a key changes meaning
TABLE_ROWS = 100        # lesions listed on the page (report.json lists every one): a model still learning
                        # can leave thousands of specks, which a reader cannot use as rows
ROOT = Path(__file__).resolve().parent
NOT_A_DEVICE = ("Research software, not a medical device.", "It is not cleared or approved for clinical use and must "
                "not be used to diagnose, treat or triage anyone. Every number here comes from two neural networks "
                "and can be wrong: read the images yourself.")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Run the segmentation and the classification checkpoints on one CT study and write a report "
                    "(label volume, report.json, self-contained report.html) into a new folder.")
    p.add_argument("--input", required=True, type=Path,
                   help="a NIfTI volume (.nii, .nii.gz) or a folder holding a DICOM CT series (any depth)")
    p.add_argument("--series", default=None, metavar="UID",
                   help="with a folder holding several series: the SeriesInstanceUID to report on (default: the "
                        "folder's only CT series)")
    p.add_argument("--segmentation-checkpoint", required=True, type=Path,
                   help="segmentation .ckpt written by train.py --task segmentation")
    p.add_argument("--classification-checkpoint", required=True, type=Path,
                   help="classification .ckpt written by train.py --task classification")
    p.add_argument("--output-dir", required=True, type=Path,
                   help="the report's folder: must not exist yet, or be empty (or hold an earlier report, with "
                        "--overwrite)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier report in --output-dir (a folder holding report.json) once the new one "
                        "is complete (default: off, refuse a folder that is not empty)")
    p.add_argument("--dicom-seg", action="store_true",
                   help="also write the labels as a DICOM Segmentation, <name>_seg.dcm (DICOM input only) "
                        "(default: off)")
    p.add_argument("--show-identifiers", action="store_true",
                   help="show the DICOM header's patient id and study date, and the series' and slices' UIDs, in "
                        "report.json and report.html (default: off, withheld)")
    p.add_argument("--exact", action="store_true",
                   help="the reference path: every slice through both networks at full resolution, float32 on a "
                        "CPU (default: off, the fast path: the U-Net at full resolution only around the liver, and "
                        "bf16 on CPUs with native bf16)")
    p.add_argument("--key-images", type=int_at_least(0), default=20, metavar="N",
                   help="draw a key image for the N largest lesions; the table lists every lesion (default: 20)")
    add_runtime_flags(p, "slices per forward pass, both networks (default: 32 on CUDA, 8 on a CPU)")
    return p


# --------------------------------------------------------------------------------------------
# What the report records besides the measurements
# --------------------------------------------------------------------------------------------

def software_record(device: torch.device, exact: bool, cpu_bf16: bool) -> dict:
    """The software that made the report: the project's version (`git describe` of this checkout, else
    `__version__`), torch's and Python's, and how the networks ran."""
    version = None
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--tags"], cwd=ROOT, capture_output=True,
                             text=True, timeout=10)
        version = out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        pass
    return {"version": f"git {version}" if version else __version__, "report_format": REPORT_FORMAT,
            "torch": torch.__version__, "numpy": np.__version__, "python": platform.python_version(),
            "device": str(device), "path": "exact" if exact else "fast", "cpu_bf16": bool(cpu_bf16)}


def checkpoint_record(ckpt, role: str) -> dict:
    """A checkpoint as the report names it: file, SHA-256, the preprocessing and network it records, and
    what train.py wrote about its run (`test_metrics.json` in the run folder holding it), if found."""
    hp = ckpt.hparams
    digest = hashlib.sha256()
    with open(ckpt.path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    record = {"path": str(ckpt.path), "sha256": digest.hexdigest(), "task": hp["task"],
              "preprocessing": {"window_hu": [float(v) for v in hp["window"]], "image_size": int(hp["image_size"]),
                                "context_slices": int(hp["context_slices"]), "in_channels": int(hp["in_channels"])}}
    if role == "segmentation":
        record["network"] = {"name": "U-Net", **{k: hp.get(k) for k in ("base_width", "depth", "upsampling", "attention")}}
    else:
        record["network"] = {"name": "VGG16", "head": hparam(hp, "head"), "hidden": hp.get("hidden")}
        record["threshold"] = float(hp.get("threshold", 0.5))
        record["volume_threshold"] = volume_threshold(hp)
    record["training"] = training_record(ckpt.path)
    record["training_data"] = hp.get("training_data")  # what train.py wrote into the checkpoint itself
    return record


def training_record(path: Path) -> dict | None:
    """What train.py recorded about the run a checkpoint came from: `test_metrics.json` in the run folder
    (`<run>/checkpoints/x.ckpt` -> `<run>/test_metrics.json`): its data folder, whether the data were the
    demo's synthetic phantoms, how many patients each split held, and the held-out test metrics. None
    when the checkpoint is not in such a folder; a checkpoint alone does not say what it learnt from."""
    run = Path(path).resolve().parent
    found = run.parent / "test_metrics.json"
    if run.name != "checkpoints" or not found.is_file():
        return None
    try:
        saved = json.loads(found.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(saved, dict):
        return None
    split = saved.get("split") if isinstance(saved.get("split"), dict) else {}
    return {"source": str(found), "data_dir": saved.get("data_dir"), "synthetic": saved.get("synthetic"),
            "patients": {k: len(v) for k, v in split.items() if isinstance(v, list)},
            "test": {k: v for k, v in (saved.get("test") or {}).items() if isinstance(v, (int, float)) or v is None}}


def study_record(source: Path | DicomSeries, geom, show_identifiers: bool) -> dict:
    """What the input is: for a NIfTI file its name, grid and orientation; for a DICOM series the
    descriptions from its header, and its patient id, study date and UIDs only with `show_identifiers`
    (other identifying attributes, such as the patient's name, are never copied)."""
    import nibabel as nib
    name, _ = input_name(source)
    record = {"name": name, "kind": "dicom" if isinstance(source, DicomSeries) else "nifti",
              "shape": list(geom.shape), "spacing_mm": [float(s) for s in geom.spacing],
              "orientation": "".join(nib.aff2axcodes(geom.affine))}
    if not geom.dicom:
        return record
    ds = geom.dicom[0]

    def text(keyword: str) -> str:
        return str(ds.get(keyword, "") or "")

    record.update({"modality": text("Modality"), "manufacturer": text("Manufacturer"),
                   "study_description": text("StudyDescription"), "series_description": text("SeriesDescription"),
                   "series_number": text("SeriesNumber"), "slice_thickness_mm": text("SliceThickness"),
                   "identifiers": "shown" if show_identifiers else "withheld (--show-identifiers shows them)"})
    if show_identifiers:
        record.update({"patient_id": text("PatientID"), "study_date": text("StudyDate"),
                       "study_instance_uid": text("StudyInstanceUID"), "series_instance_uid": text("SeriesInstanceUID")})
    return record


# --------------------------------------------------------------------------------------------
# The two models side by side, slice by slice
# --------------------------------------------------------------------------------------------

DISAGREEMENT_RULE = ("Compared on the slices where the segmentation shows liver (the classifier learns on such "
                     "slices only). A slice is classifier-positive when its tumour probability reaches the "
                     "classifier checkpoint's threshold, segmentation-positive when it holds at least one tumour "
                     "voxel; a disagreement is a maximal run of consecutive compared slices where one says tumour "
                     "and the other does not, the same one throughout.")


def slice_table(labels: np.ndarray, probs: np.ndarray, geom, uids: bool = False) -> list[dict]:
    """One row per slice, in the file's own slice order: the classifier's tumour probability and the
    segmented tumour and liver areas (mm^2) of the label volume written."""
    _, dy, dx = geom.spacing
    tumor = np.count_nonzero(labels == 2, axis=(1, 2)) * dy * dx
    liver = np.count_nonzero(labels >= 1, axis=(1, 2)) * dy * dx
    rows = [{"slice": geom.file_slice_index(z), "tumor_probability": float(probs[z]),
             "tumor_area_mm2": float(tumor[z]), "liver_area_mm2": float(liver[z])} for z in range(len(labels))]
    if uids and geom.dicom and _axial_files(geom):  # the DICOM file of slice k: the series' k-th by position
        for row in rows:
            row["sop_instance_uid"] = str(geom.dicom[row["slice"]].get("SOPInstanceUID", ""))
    return sorted(rows, key=lambda r: r["slice"])


def _axial_files(geom) -> bool:
    """Whether each of the file's slices (its third axis) is an axial slice, so a slice number names a file."""
    try:
        geom.slice_index(0)
    except DataError:
        return False
    return True


def disagreements(rows: list[dict], threshold: float) -> tuple[dict, list[dict]]:
    """Counts of agreement and the runs of disagreement (`DISAGREEMENT_RULE`) over slice rows in file
    order. Each run: first and last slice, length, which model says tumour, and its highest
    probability and largest tumour area."""
    counts = {"compared_slices": 0, "both_tumor": 0, "both_healthy": 0, "classifier_only": 0,
              "segmentation_only": 0}
    runs: list[dict] = []
    previous = None  # (slice, side) of the last compared slice
    for row in rows:
        if row["liver_area_mm2"] <= 0:
            previous = None
            continue
        by_classifier = row["tumor_probability"] >= threshold
        by_segmentation = row["tumor_area_mm2"] > 0
        counts["compared_slices"] += 1
        if by_classifier == by_segmentation:
            counts["both_tumor" if by_classifier else "both_healthy"] += 1
            previous = None
            continue
        side = "classifier" if by_classifier else "segmentation"
        counts[f"{side}_only"] += 1
        if previous == (row["slice"] - 1, side):
            run = runs[-1]
            run.update(last_slice=row["slice"], slices=run["slices"] + 1,
                       max_tumor_probability=max(run["max_tumor_probability"], row["tumor_probability"]),
                       max_tumor_area_mm2=max(run["max_tumor_area_mm2"], row["tumor_area_mm2"]))
        else:
            runs.append({"first_slice": row["slice"], "last_slice": row["slice"], "slices": 1, "tumor_by": side,
                         "max_tumor_probability": row["tumor_probability"],
                         "max_tumor_area_mm2": row["tumor_area_mm2"]})
        previous = (row["slice"], side)
    return counts, runs


# --------------------------------------------------------------------------------------------
# Figures: a key image per lesion, the two models along the slices
# --------------------------------------------------------------------------------------------

def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=fig.dpi)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def key_image(ct: np.ndarray, labels: np.ndarray, lesion_mask: np.ndarray, lesion: Lesion, spacing,
              window, title: str) -> str:
    """PNG (base64) of a lesion's key slice: the whole slice with liver (green) and tumour (red)
    outlines and a box around the lesion, and beside it the box enlarged with the lesion's outline
    (yellow) and its long (cyan) and short (magenta) axes. In mm, display orientation (anterior up,
    patient right on the image left). `ct` (H, W) HU, `labels` (H, W), `lesion_mask` (H, W) bool."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle
    dy, dx = (float(s) for s in spacing)
    h, w = ct.shape
    extent = (-0.5 * dx, (w - 0.5) * dx, (h - 0.5) * dy, -0.5 * dy)
    xs, ys = np.arange(w) * dx, np.arange(h) * dy
    fig = Figure(figsize=(8.4, 4.2), dpi=80)
    full, zoom = fig.subplots(1, 2)
    long_mm = lesion.axes.long_ends[:, ::-1] * [dx, dy]  # (2, 2) as (x, y) mm
    short_mm = lesion.axes.short_ends[:, ::-1] * [dx, dy]
    cy, cx = lesion.centre[0] * dy, lesion.centre[1] * dx
    half = max(15.0, 0.85 * lesion.axes.long)  # mm: the lesion fills about half of the enlarged box
    # The enlarged panel draws only its window (plus a pixel), so its contours cost what it shows.
    rows = slice(max(0, int((cy - half) / dy) - 1), min(h, int((cy + half) / dy) + 2))
    cols = slice(max(0, int((cx - half) / dx) - 1), min(w, int((cx + half) / dx) + 2))
    window_box = ((cols.start - 0.5) * dx, (cols.stop - 0.5) * dx, (rows.stop - 0.5) * dy, (rows.start - 0.5) * dy)
    for ax, part, box in ((full, (slice(None), slice(None)), extent), (zoom, (rows, cols), window_box)):
        ax.imshow(window_hu(ct[part], window), cmap="gray", vmin=0, vmax=1, extent=box, interpolation="antialiased")
        for mask, colour in ((labels[part] >= 1, "#2ecc40"), (labels[part] == 2, "#ff4136")):
            if mask.any() and not mask.all():  # an outline to draw
                ax.contour(xs[part[1]], ys[part[0]], mask.astype(np.float32), levels=[0.5], colors=colour,
                           linewidths=1.0)
        ax.set_xticks([])
        ax.set_yticks([])
    full.add_patch(Rectangle((cx - half, cy - half), 2 * half, 2 * half, fill=False, edgecolor="#ffdc00",
                             linewidth=1.2, linestyle="--"))
    for text, (x, y, ha, va) in {"R": (0.02, 0.5, "left", "center"), "L": (0.98, 0.5, "right", "center"),
                                 "A": (0.5, 0.98, "center", "top"), "P": (0.5, 0.02, "center", "bottom")}.items():
        full.text(x, y, text, transform=full.transAxes, color="white", ha=ha, va=va, fontsize=9, fontweight="bold")
    zoom.contour(xs[cols], ys[rows], lesion_mask[rows, cols].astype(np.float32), levels=[0.5], colors="#ffdc00",
                 linewidths=1.8)
    zoom.plot(long_mm[:, 0], long_mm[:, 1], "-o", color="#00e5ff", linewidth=2, markersize=3,
              label=f"long axis {lesion.axes.long:.1f} mm")
    zoom.plot(short_mm[:, 0], short_mm[:, 1], "-o", color="#ff4dff", linewidth=2, markersize=3,
              label=f"short axis {lesion.axes.short:.1f} mm")
    zoom.set_xlim(cx - half, cx + half)
    zoom.set_ylim(cy + half, cy - half)
    zoom.legend(loc="lower left", fontsize=8, framealpha=0.8)
    bar = max(b for b in (2.0, 5.0, 10.0, 20.0, 50.0, 100.0) if b <= half / 2)  # a scale bar, mm
    x0, y0 = cx + half - bar - 0.08 * half, cy + half - 0.08 * half
    zoom.plot([x0, x0 + bar], [y0, y0], color="white", linewidth=3)
    zoom.text(x0 + bar / 2, y0 - 0.03 * half, f"{bar:.0f} mm", color="white", ha="center", va="bottom", fontsize=8)
    full.set_title("slice: liver green, tumour red", fontsize=9)
    zoom.set_title("lesion (yellow) and its axes", fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.02, top=0.88, wspace=0.04)
    return _png(fig)


def slice_plot(rows: list[dict], threshold: float, runs: list[dict]) -> str:
    """PNG (base64): along the slices, the classifier's probability (line, threshold dashed) against the
    segmented tumour area (bars), disagreements shaded, slices without liver greyed."""
    from matplotlib.figure import Figure
    k = np.array([r["slice"] for r in rows])
    prob = np.array([r["tumor_probability"] for r in rows])
    area = np.array([r["tumor_area_mm2"] for r in rows])
    no_liver = np.array([r["liver_area_mm2"] <= 0 for r in rows])
    fig = Figure(figsize=(11, 3.6), dpi=80)
    ax = fig.subplots()
    areas = ax.twinx()
    areas.bar(k, area, width=1.0, color="#ff4136", alpha=0.55, label="segmented tumour area (mm², right)")
    areas.set_ylabel("tumour area (mm²)")
    areas.set_ylim(0, max(1.0, float(area.max()) * 1.15))
    for first, last in _spans(k, no_liver):
        ax.axvspan(first - 0.5, last + 0.5, color="#dddddd", alpha=0.6, linewidth=0)
    colours = {"classifier": "#ff851b", "segmentation": "#b10dc9"}
    for run in runs:
        ax.axvspan(run["first_slice"] - 0.5, run["last_slice"] + 0.5, color=colours[run["tumor_by"]], alpha=0.3,
                   linewidth=0)
    ax.plot(k, prob, color="#0074d9", linewidth=1.6, label="classifier: tumour probability (left)")
    ax.axhline(threshold, color="#0074d9", linestyle="--", linewidth=1, label=f"threshold {threshold:.2f}")
    ax.set_ylim(0, 1.02)
    ax.set_xlim(k.min() - 0.5, k.max() + 0.5)
    ax.set_xlabel("slice (the file's own numbering)")
    ax.set_ylabel("tumour probability")
    ax.set_zorder(areas.get_zorder() + 1)
    ax.patch.set_visible(False)
    from matplotlib.patches import Patch
    handles = ax.get_legend_handles_labels()[0] + areas.get_legend_handles_labels()[0] + [
        Patch(color=colours["classifier"], alpha=0.3, label="only the classifier says tumour"),
        Patch(color=colours["segmentation"], alpha=0.3, label="only the segmentation says tumour"),
        Patch(color="#dddddd", label="no liver segmented: not compared")]
    fig.legend(handles=handles, loc="upper center", ncol=3, fontsize=8, frameon=False)
    fig.subplots_adjust(left=0.06, right=0.93, bottom=0.14, top=0.8)
    return _png(fig)


def _spans(k: np.ndarray, flags: np.ndarray) -> list[tuple[int, int]]:
    """Runs of consecutive True in `flags` over increasing slice numbers `k`: (first, last) numbers."""
    spans, start = [], None
    for i, flag in enumerate(flags):
        if flag and start is None:
            start = i
        if start is not None and (not flag or i == len(flags) - 1):
            end = i if flag else i - 1
            spans.append((int(k[start]), int(k[end])))
            start = None
    return spans


# --------------------------------------------------------------------------------------------
# The page
# --------------------------------------------------------------------------------------------

_CSS = """
body{font-family:-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;max-width:1120px;margin:1.2em auto;
padding:0 1em;color:#1b1b1b;line-height:1.4}
h1{font-size:1.5em;margin:.4em 0}h2{font-size:1.2em;margin:1.4em 0 .4em;border-bottom:1px solid #ccc}
.warn{border:2px solid #b00020;background:#fff3f3;padding:.6em 1em;border-radius:6px}
table{border-collapse:collapse;margin:.4em 0;font-size:.95em}th,td{border:1px solid #ccc;padding:.2em .6em}
th{background:#f2f2f2;text-align:left}td.n{text-align:right;font-variant-numeric:tabular-nums}
.kv td:first-child{color:#555}figure{margin:.8em 0}figcaption{color:#555;font-size:.9em}
img{max-width:100%;height:auto}.small{font-size:.85em;color:#555}.cls{color:#c25e00}.seg{color:#8a0a9c}
"""


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _num(value, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _kv(pairs) -> str:
    return "<table class=kv>" + "".join(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in pairs) + "</table>"


def training_data_text(record: dict) -> str:
    """The data sets a checkpoint records it was trained on (`training_data`, written by train.py), as
    a sentence; empty for checkpoints that record none."""
    found = record.get("training_data") or []
    if not found:
        return ""
    return " Trained on " + "; ".join(f"{d.get('name')} ({d.get('layout')}): {d.get('train')} of {d.get('cases')} "
                                      f"cases" for d in found) + " (recorded in the checkpoint)."


def _training_text(record: dict) -> str:
    found = record.get("training")
    if not found:
        return ("not recorded: a checkpoint records its preprocessing, not its data, and no test_metrics.json "
                "from train.py lies in its run folder")
    if found.get("synthetic"):
        data = "the demo's synthetic CT phantoms (not real patients)"
    else:
        data = f"data from {found.get('data_dir')}"
    patients = found.get("patients") or {}
    text = data + (f", {patients.get('train', '?')} training patients" if patients else "")
    tests = {k.split("/", 1)[-1]: v for k, v in (found.get("test") or {}).items()
             if k.split("/", 1)[-1] in ("dice_liver", "dice_tumor", "auroc") and v is not None}
    if tests:
        text += (f"; on {patients.get('test', '?')} held-out test patients: "
                 + ", ".join(f"{k.replace('_', ' ')} {v:.3f}" for k, v in tests.items()))
    return text + f" (from {found['source']})"


def _study_rows(study: dict) -> list[tuple[str, str]]:
    rows = [("input", study["name"]), ("kind", "DICOM series" if study["kind"] == "dicom" else "NIfTI volume"),
            ("grid", " × ".join(str(s) for s in study["shape"]) + f" voxels, orientation {study['orientation']}"),
            ("spacing (slice, row, column)", " × ".join(f"{s:.3g}" for s in study["spacing_mm"]) + " mm")]
    if study["kind"] == "dicom":
        rows += [("study description", study["study_description"] or "(none)"),
                 ("series description", study["series_description"] or "(none)"),
                 ("modality, manufacturer", f"{study['modality']}, {study['manufacturer'] or '(none)'}"),
                 ("patient id", study.get("patient_id", "withheld (--show-identifiers)")),
                 ("study date", study.get("study_date", "withheld (--show-identifiers)"))]
    return rows


def _summary_rows(report: dict) -> list[tuple[str, str]]:
    cls, runs, targets = report["classifier"], report["disagreements"], report["recist_target_lesions"]
    targets_text = (f"{', '.join(map(str, targets))} (sum of long axes {report['recist_sum_long_axes_mm']:.1f} mm)"
                    if targets else "none (no lesion is measurable)")
    return [("liver volume", f"{report['liver_volume_ml']:.1f} mL"),
            ("tumour volume", f"{report['tumor_volume_ml']:.2f} mL"),
            ("tumour burden", f"{report['tumor_burden_percent']:.2f} % of the liver (tumour included)"),
            ("lesions", str(report["num_lesions"])),
            ("RECIST 1.1 target lesions", targets_text),
            ("classifier, whole volume", _verdict_text(cls, len(report["slices"]))),
            ("models disagree", f"{len(runs)} run(s) of slices, "
             f"{report['agreement']['classifier_only'] + report['agreement']['segmentation_only']} of "
             f"{report['agreement']['compared_slices']} compared slices")]


def _verdict_text(cls: dict, num_slices: int) -> str:
    """The classifier's verdict on the volume, the rule it was decided by and what that rule gave on
    the validation volumes it was chosen on."""
    found = cls.get("volume_validation")
    if cls["volume_threshold"] is None:
        rule = ("no volume threshold: the classification checkpoint records none (written before train.py chose "
                "one on validation volumes, or its validation volumes held one class only)")
    else:
        rule = f"volume threshold {cls['volume_threshold']:.3f}" + (
            f", chosen on {int(found['volumes'])} validation volumes ({int(found['tumour_volumes'])} with tumour): "
            f"sensitivity {found['sensitivity']:.2f}, specificity {found['specificity']:.2f}" if found else "")
    return (f"{cls['verdict'] or 'no verdict'} (tumour probability {cls['volume_probability']:.3f}, the mean of its "
            f"3 most suspicious slices; {rule}); {cls['tumor_slices']} of {num_slices} slices at or above the slice "
            f"threshold {cls['threshold']:.3f}")


def _lesion_table(report: dict) -> str:
    """The lesion table (the first TABLE_ROWS lesions, the rest summed in a line)."""
    targets = report["recist_target_lesions"]
    lesion_rows = "".join(
        f"<tr><td class=n>{d['id']}</td><td class=n>{d['volume_ml']:.2f}</td><td class=n>{d['long_axis_mm']:.1f}</td>"
        f"<td class=n>{d['short_axis_mm']:.1f}</td><td class=n>{_num(d.get('mean_hu'), 0)}</td>"
        f"<td class=n>{d['slice']}</td><td class=n>{d['first_slice']}–{d['last_slice']}</td>"
        f"<td class=n>{', '.join(f'{v:.1f}' for v in d['centre_ras_mm'])}</td>"
        f"<td>{recist_role(d, targets)}</td></tr>"
        for d in report["lesions"][:TABLE_ROWS])
    lesion_table = ("<p>No tumour was segmented.</p>" if not report["lesions"] else
                    "<table><tr><th>lesion</th><th>volume (mL)</th><th>long axis (mm)</th><th>short axis (mm)</th>"
                    "<th>mean HU</th><th>key slice</th><th>slices</th><th>centre, RAS (mm)</th><th>RECIST 1.1</th></tr>"
                    + lesion_rows + "</table>")
    rest = report["lesions"][TABLE_ROWS:]
    if rest:
        lesion_table += (f"<p class=small>{len(rest)} smaller lesion(s), {sum(d['volume_ml'] for d in rest):.2f} mL "
                         f"together, are listed in report.json only.</p>")
    return lesion_table


def _key_figures(report: dict, key_images: dict[int, str]) -> str:
    """The key images drawn, each with its caption, and a line when not every lesion has one."""
    shown = [d for d in report["lesions"] if d["id"] in key_images]
    figures = "".join(
        f"<figure><img alt=\"lesion {d['id']}, slice {d['slice']}\" src=\"data:image/png;base64,{key_images[d['id']]}\">"
        f"<figcaption>Lesion {d['id']}: {d['volume_ml']:.2f} mL, long axis {d['long_axis_mm']:.1f} mm, short axis "
        f"{d['short_axis_mm']:.1f} mm, on slice {d['slice']} (slices {d['first_slice']}–{d['last_slice']}).</figcaption>"
        "</figure>" for d in shown)
    if len(shown) < len(report["lesions"]):
        figures += (f"<p class=small>Key images of the {len(shown)} largest of {len(report['lesions'])} lesions "
                    f"(--key-images).</p>")
    return figures


def _disagreement_table(runs: list[dict]) -> str:
    run_rows = "".join(
        f"<tr><td class=n>{r['first_slice']}–{r['last_slice']}</td><td class=n>{r['slices']}</td>"
        f"<td class={'cls' if r['tumor_by'] == 'classifier' else 'seg'}>only the {r['tumor_by']}</td>"
        f"<td class=n>{r['max_tumor_probability']:.3f}</td><td class=n>{r['max_tumor_area_mm2']:.1f}</td></tr>"
        for r in runs)
    return ("<p>The two models agree on every compared slice.</p>" if not runs else
            "<table><tr><th>slices</th><th>count</th><th>tumour seen by</th><th>highest probability</th>"
            "<th>largest tumour area (mm²)</th></tr>" + run_rows + "</table>")


def _path_text(report: dict) -> str:
    """How the segmentation ran, in words."""
    fast = report.get("fast_path")
    return ("the exact path (every slice at full resolution, float32 on a CPU)" if report["software"]["path"] == "exact"
            else "the fast path (the U-Net at full resolution only around the liver a coarse pass found"
            + (f": {fast_path_slices(fast)}" if fast else "") + ")")


def _checkpoint_rows(report: dict) -> str:
    return "".join(
        f"<tr><td>{_e(role)}</td><td>{_e(c['network']['name'])}</td><td>{_e(Path(c['path']).name)}</td>"
        f"<td><code>{_e(c['sha256'][:16])}</code></td><td>window {c['preprocessing']['window_hu'][0]:g} to "
        f"{c['preprocessing']['window_hu'][1]:g} HU, {c['preprocessing']['image_size']}², "
        f"{2 * c['preprocessing']['context_slices'] + 1} slices in</td>"
        f"<td>{_e(_training_text(c) + training_data_text(c))}</td></tr>"
        for role, c in (("segmentation", report["checkpoints"]["segmentation"]),
                        ("classification", report["checkpoints"]["classification"])))


def render_html(report: dict, key_images: dict[int, str], plot: str) -> str:
    """report.html: one page, plain HTML and CSS, figures as base64 PNG; every text from the input or a
    file is escaped. The page's sections are made by the helpers above; this is its template."""
    study, sw = report["study"], report["software"]
    study_rows, summary_rows = _study_rows(study), _summary_rows(report)
    lesion_table, figures = _lesion_table(report), _key_figures(report, key_images)
    run_table, path_text = _disagreement_table(report["disagreements"]), _path_text(report)
    checkpoints = _checkpoint_rows(report)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>Liver CT report: {_e(study['name'])}</title><style>{_CSS}</style></head><body>
<div class=warn><b>{_e(NOT_A_DEVICE[0])}</b> {_e(NOT_A_DEVICE[1])}</div>
<h1>Liver CT report: {_e(study['name'])}</h1>
<h2>Study</h2>{_kv(study_rows)}
<h2>Summary</h2>{_kv(summary_rows)}
<h2>Lesions</h2>{lesion_table}
<p class=small>A lesion is a face-connected piece of the segmented tumour. Long axis: the longest distance between
two of its pixel centres in its key slice (the axial slice where that is longest); short axis: the longest chord
inside the lesion perpendicular to it, in the same slice (RECIST 1.1). Slices are numbered as the file numbers them;
the centre is the lesion's centre in its key slice in world coordinates (RAS: x towards the patient's right,
y anterior, z superior; DICOM's LPS is (−x, −y, z)). RECIST 1.1: a lesion is measurable from a long axis of 10 mm
(twice the slice spacing where slices lie more than 5 mm apart); the target lesions are the two measurable ones with
the longest long axes, and the sum of their long axes is what response is judged on.</p>
<h2>Key images</h2>{figures or '<p>No lesion to show.</p>'}
<h2>The two models along the slices</h2>
<figure><img alt="tumour probability and tumour area along the slices" src="data:image/png;base64,{plot}">
<figcaption>Blue: the classifier's tumour probability per slice; red bars: the tumour area the segmentation
found. Shaded: where they disagree, the places to look at first.</figcaption></figure>
<p class=small>{_e(DISAGREEMENT_RULE)}</p>{run_table}
<h2>What the models are, and are not</h2>
<p>Two neural networks from the open-source <i>liver-tumor-lits</i> research project looked at this study. A U-Net
labels every pixel of every axial slice as background, liver or liver tumour; the volumes, lesions and axes above
are measured on its labels. A VGG16 gives each slice a probability of showing a liver tumour. They answer the same
question in two ways, and where they disagree a reader should look.</p>
<p>{_e(" ".join(NOT_A_DEVICE))} The models were trained as the table below says; the project trains on the LiTS challenge
data (contrast-enhanced abdominal CT of 131 patients) or, in its demo, on synthetic phantoms. They have not been
validated on other scanners, protocols or patients. They look for tumours inside the liver only; they do not
characterise a lesion (benign or malignant, its type), compare with earlier studies, or see anything outside the
liver. Lesions smaller than a few voxels, lesions touching each other and lesions at the liver's border are where
automatic segmentation fails most.</p>
<table><tr><th>model</th><th>network</th><th>checkpoint</th><th>SHA-256</th><th>preprocessing</th><th>trained on</th></tr>
{checkpoints}</table>
<p class=small>Segmentation by {_e(path_text)}, on {_e(sw['device'])}. Software {_e(sw['version'])}, torch
{_e(sw['torch'])}, Python {_e(sw['python'])}. Report made {_e(report['created'])}. The label volume beside this
page ({_e(report['outputs']['labels'])}) is what was measured.</p>
</body></html>
"""


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------

def check_output_dir(folder: Path, overwrite: bool) -> None:
    """Refuse, before any work, an output folder that cannot become the report's: a file, a folder
    holding something else (or, with --overwrite, one that holds no earlier report), or a place under a
    file."""
    if folder.exists() and not folder.is_dir():
        raise DataError(f"{folder}: found a file; expected a folder for the report")
    if folder.is_dir() and any(folder.iterdir()):
        if not overwrite:
            raise DataError(f"{folder}: found a folder that is not empty; expected a new or empty folder "
                            f"(--overwrite replaces an earlier report)")
        if not (folder / "report.json").is_file():
            raise DataError(f"{folder}: found a folder without report.json; expected an earlier report to replace "
                            f"(--overwrite never deletes other folders)")
    above = folder.parent
    while not above.exists():
        above = above.parent
    if not above.is_dir():
        raise DataError(f"{folder}: found the file {above} where a folder should be; expected a path that can be "
                        f"created")
    if not os.access(above, os.W_OK | os.X_OK):
        raise DataError(f"{folder}: cannot write into {above} (permission denied); expected a writable location")


def _input(args: argparse.Namespace) -> Path | DicomSeries:
    found = find_inputs(args.input, args.series)
    if not one_volume(args.input, found):
        kinds = [kind for _, kind in found]
        what = ("a 2D slice" if kinds == ["image"] else f"{len(found)} inputs ({kinds.count('volume')} volume(s), "
                f"{kinds.count('image')} slice(s))")
        raise DataError(f"{args.input}: found {what}; expected one NIfTI volume or a folder holding one DICOM CT "
                        f"series (--series UID picks one of several)")
    return found[0][0]


MEASUREMENT_RULES = {
    "liver": "label >= 1 (tumour included); tumour: label 2",
    "lesions": "face-connected components of label 2 (6 neighbours in 3D), as evaluate.py and LiTS count them",
    "long_axis": "largest distance between two pixel centres of the lesion in its key slice, the axial slice "
                 "where this is largest (RECIST 1.1 longest diameter)",
    "short_axis": "longest chord inside the lesion (the region its pixel centres span) perpendicular to the "
                  "long axis, in the key slice",
    "measurable": "RECIST 1.1 on CT: long axis >= 10 mm, or >= twice the slice spacing where slices lie "
                  "more than 5 mm apart (the spacing stands in for the slice thickness)",
    "recist_target_lesions": "the measurable lesions with the longest long axes, at most two (one organ); "
                             "recist_sum_long_axes_mm is the sum of their long axes",
    "centre": "mean position of the lesion's pixels in its key slice, world coordinates of the input: "
              "centre_ras_mm (NIfTI RAS+) and centre_lps_mm (DICOM LPS+)",
    "slices": "the input's own numbering: a NIfTI file's index along its axial axis; a DICOM series' order "
              "by position along the slice normal, from 0"}


def _open_inputs(args: argparse.Namespace):
    """Everything checked before any work: both checkpoints, the input and the output folder.
    Returns (seg_ckpt, cls_ckpt, source)."""
    seg_ckpt = load_checkpoint(args.segmentation_checkpoint, "segmentation", "--segmentation-checkpoint")
    cls_ckpt = load_checkpoint(args.classification_checkpoint, "classification", "--classification-checkpoint")
    source = _input(args)
    if args.dicom_seg and not isinstance(source, DicomSeries):
        raise DataError(f"{args.input}: found --dicom-seg with a NIfTI input; expected a DICOM series (a DICOM SEG "
                        f"must reference the series it segments)")
    check_output_dir(args.output_dir, args.overwrite)
    return seg_ckpt, cls_ckpt, source


def _run_models(args, seg_ckpt, cls_ckpt, hu, name: str, device, batch: int, timing: dict):
    """The segmentation (fast path unless --exact, then postprocessed) and the classifier on every slice.
    Returns (labels (Z, H, W), probabilities (Z,), the fast path's finding or None, cpu_bf16)."""
    tick = time.perf_counter()
    found_fast: list = []
    labels = segment(seg_ckpt.network(device), hu, seg_ckpt.hparams, device, fast=not args.exact, batch_size=batch,
                     desc=f"{name}: segmentation", info=found_fast)
    labels = postprocess(labels)
    timing["segmentation"] = time.perf_counter() - tick
    tick = time.perf_counter()
    cpu_bf16 = not args.exact and cpu_has_fast_bf16()
    probs = classify(cls_ckpt.network(device), hu, cls_ckpt.hparams, device, batch, desc=f"{name}: classification",
                     cpu_bf16=cpu_bf16)
    timing["classification"] = time.perf_counter() - tick
    return labels, probs, (found_fast[0] if found_fast else None), cpu_bf16


def build_report(args, seg_ckpt, cls_ckpt, source, geom, hu, labels, probs, found, fast, device,
                 cpu_bf16: bool) -> dict:
    """report.json's content (all but the timing): the measurements of `found` lesions on `labels`,
    the classifier's verdict and slices, where the two models disagree, and what made them."""
    threshold = float(cls_ckpt.hparams.get("threshold", 0.5))
    volume_thr = volume_threshold(cls_ckpt.hparams)
    names = tuple(cls_ckpt.hparams.get("class_names", CLS_CLASSES))
    name, _ = input_name(source)
    numbers = measure(labels, geom.spacing, geom.file_slice_index, hu, geom.slices_affine, found=found)
    rows = slice_table(labels, probs, geom, uids=args.show_identifiers)
    agreement, runs = disagreements(rows, threshold)
    volume_probability = volume_score(probs)
    outputs = {"labels": f"{name}_seg.nii.gz", "html": "report.html", "json": "report.json"}
    if args.dicom_seg:
        outputs["dicom_seg"] = f"{name}_seg.dcm"
    return {
        "report_format": REPORT_FORMAT,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "software": software_record(device, args.exact, cpu_bf16),
        "input": str(args.input),
        "study": study_record(source, geom, args.show_identifiers),
        "outputs": outputs,
        "checkpoints": {"segmentation": checkpoint_record(seg_ckpt, "segmentation"),
                        "classification": checkpoint_record(cls_ckpt, "classification")},
        "spacing_mm": [float(s) for s in geom.spacing],
        "num_slices": int(len(labels)),
        **numbers,
        # The verdict as predict_classification.py gives it: over every slice, at the volume threshold.
        "classifier": {"threshold": threshold, "volume_threshold": volume_thr,
                       "volume_validation": cls_ckpt.hparams.get("volume_validation") if volume_thr is not None else None,
                       "volume_probability": volume_probability,
                       "verdict": names[int(volume_probability >= volume_thr)] if volume_thr is not None else None,
                       "tumor_slices": int(np.count_nonzero(probs >= threshold))},
        "slices": rows,
        "disagreement_rule": DISAGREEMENT_RULE,
        "agreement": agreement,
        "disagreements": runs,
        "fast_path": fast.summary(len(labels)) if fast is not None else None,
        "measurement_rules": MEASUREMENT_RULES,
    }


def _key_images(report: dict, found, labels, hu, geom, window, name: str, count: int) -> dict[int, str]:
    """Key images (base64 PNG) of the `count` largest lesions, by lesion id."""
    images: dict[int, str] = {}
    if not found or not count:
        return images
    ids, _ = label_lesions(labels)
    for lesion, record in zip(found[:count], report["lesions"]):
        z = lesion.z
        r, c = (int(round(v)) for v in lesion.axes.long_ends[0])  # a pixel of the lesion
        mask = ids[z] == ids[z, r, c]
        images[lesion.id] = key_image(hu[z], labels[z], mask, lesion, geom.spacing[1:], window,
                                      f"{name}, lesion {lesion.id}: key slice {record['slice']}")
    return images


def _write(args, report: dict, page: str, labels, geom, timing: dict, started: float) -> None:
    """The report's folder, built in a temporary one and renamed when complete."""
    outputs = report["outputs"]
    with atomic_folder(args.output_dir, replace=args.overwrite) as tmp:
        tick = time.perf_counter()
        write_labels(labels, geom, tmp / outputs["labels"])
        if args.dicom_seg:
            write_labels(labels, geom, tmp / outputs["dicom_seg"])
        (tmp / "report.html").write_text(page, encoding="utf-8")
        timing["writing"] = time.perf_counter() - tick
        timing["total"] = time.perf_counter() - started
        report["timing_s"] = {k: round(v, 3) for k, v in timing.items()}
        (tmp / "report.json").write_text(json.dumps(report, indent=1, allow_nan=False), encoding="utf-8")


def main(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    device, batch = runtime(args.device, args.batch_size, args.threads)
    seg_ckpt, cls_ckpt, source = _open_inputs(args)
    timing = {}
    hu, geom = read_volume(source, dtype=None)  # (Z, H, W) HU in slices order, as stored
    name, _ = input_name(source)
    timing["load"] = time.perf_counter() - started  # the checkpoints and the volume

    labels, probs, fast, cpu_bf16 = _run_models(args, seg_ckpt, cls_ckpt, hu, name, device, batch, timing)
    tick = time.perf_counter()
    found = measure_lesions(labels, geom.spacing, hu)
    report = build_report(args, seg_ckpt, cls_ckpt, source, geom, hu, labels, probs, found, fast, device, cpu_bf16)
    timing["measurements"] = time.perf_counter() - tick

    tick = time.perf_counter()
    images = _key_images(report, found, labels, hu, geom, seg_ckpt.hparams["window"], name, args.key_images)
    plot = slice_plot(report["slices"], report["classifier"]["threshold"], report["disagreements"])
    page = render_html(report, images, plot)
    timing["figures"] = time.perf_counter() - tick

    _write(args, report, page, labels, geom, timing, started)
    cls = report["classifier"]
    sys.stdout.write(f"{args.output_dir}/: liver {report['liver_volume_ml']:.1f} mL, {report['num_lesions']} lesion(s), "
                     f"tumour {report['tumor_volume_ml']:.2f} mL (burden {report['tumor_burden_percent']:.2f} %); "
                     f"classifier: {cls['verdict'] or 'no verdict'} ({cls['volume_probability']:.3f}); "
                     f"{len(report['disagreements'])} disagreement run(s); {timing['total']:.1f} s\n")
    return report


if __name__ == "__main__":
    sys.exit(run_cli(main, get_args_parser()))
