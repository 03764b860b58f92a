"""LiTS metrics of predicted label volumes against the ground truth, as the LiTS scorer defines them.

    python evaluate.py --pred runs/predictions --gt /data/LiTS --output metrics.csv

Cases are paired by number: the ground truth is `segmentation-N.nii[.gz]` (LiTS), `labelsTr/liver_N.nii.gz`
(MSD) or any NIfTI whose name holds the case number as its last integer; a prediction is any NIfTI in
`--pred` whose last integer is N (`segmentation-N.nii`, `test-segmentation-N.nii`, `volume-N_seg.nii.gz`,
`prediction-N.nii.gz`). Prediction and ground truth must share the voxel grid (shape and affine), as
the LiTS scorer requires; nothing is resampled or reoriented.

Per case and per region (liver = label >= 1, i.e. liver and tumor together as LiTS scores it;
tumor = label == 2): Dice, VOE, RVD, ASSD, MSSD, RMSD in mm (see `case_metrics` for the definitions and
the empty-mask rules). Over all cases: the mean of each column (NaN cases left out and counted), the
"Dice global" (intersections and sizes pooled over cases) and lesion detection precision/recall
(3D connected tumor components matched one-to-one at IoU > 0.5).
"""
from __future__ import annotations

import argparse
import csv
import io
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy import ndimage

from volumes import DataError, check_labels, read_nifti, visible_files, atomic_write_text, run_cli

REGIONS: tuple[str, ...] = ("liver", "tumor")
METRICS: tuple[str, ...] = ("dice", "voe", "rvd", "assd", "mssd", "rmsd")
COLUMNS: tuple[str, ...] = tuple(f"{m}_{r}" for r in REGIONS for m in METRICS)
CSV_COLUMNS: tuple[str, ...] = ("case",) + COLUMNS
AFFINE_TOLERANCE_MM = 1e-3


# --------------------------------------------------------------------------------------------
# Per-case metrics
# --------------------------------------------------------------------------------------------

def _region(labels: np.ndarray, region: str) -> np.ndarray:
    return labels >= 1 if region == "liver" else labels == 2


def _bbox(mask: np.ndarray, pad: int = 0) -> tuple[slice, ...]:
    """The bounding box of the True voxels of a non-empty mask, grown by `pad` and clipped to the array."""
    box = []
    for ax in range(mask.ndim):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != ax)))
        box.append(slice(max(int(hit[0]) - pad, 0), min(int(hit[-1]) + 1 + pad, mask.shape[ax])))
    return tuple(box)


def _surface(mask: np.ndarray) -> np.ndarray:
    """Voxels of the mask with at least one 6-neighbour (face neighbour) outside it; outside the
    array counts as outside the mask (border_value=0), as in the LiTS scorer and medpy."""
    cross = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=cross, border_value=0)


def _surface_distances(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float],
                       crop: bool = True) -> np.ndarray:
    """All surface-to-surface distances in mm, both directions concatenated:
    for each voxel of pred's surface the distance to the nearest voxel of gt's surface, then the same
    from gt to pred. Both masks must be non-empty (a non-empty mask always has a surface).

    Cropping to the bounding box of pred | gt padded by one voxel changes nothing: every voxel outside
    that box is background in both masks, so each mask voxel sees the same 6-neighbours in the crop
    (a neighbour beyond the crop edge is either in the padding ring, which is kept, or beyond the
    volume edge, which border_value=0 already treats as background), hence the same surfaces; and the
    Euclidean distance between two surface voxels depends only on their index difference times the
    spacing, and all surface voxels lie inside the box, so the exact EDT inside the box finds the same
    nearest surface voxel as on the full volume. On a 512x512xN CT the box is a small fraction of it."""
    if crop:
        box = _bbox(pred | gt, pad=1)
        pred, gt = pred[box], gt[box]
    sp, sg = _surface(pred), _surface(gt)
    # distance_transform_edt gives each non-zero voxel its distance to the nearest zero voxel; the
    # surface voxels are the zeros of ~surface.
    to_gt = ndimage.distance_transform_edt(~sg, sampling=spacing)[sp]
    to_pred = ndimage.distance_transform_edt(~sp, sampling=spacing)[sg]
    return np.concatenate([to_gt, to_pred])


def _region_metrics(p: np.ndarray, g: np.ndarray, spacing: Sequence[float]) -> dict[str, float]:
    n_p, n_g = int(np.count_nonzero(p)), int(np.count_nonzero(g))
    nan = float("nan")
    if n_p == 0 and n_g == 0:
        return dict(dice=1.0, voe=0.0, rvd=0.0, assd=0.0, mssd=0.0, rmsd=0.0)
    if n_g == 0:
        return dict(dice=0.0, voe=1.0, rvd=nan, assd=nan, mssd=nan, rmsd=nan)
    if n_p == 0:
        return dict(dice=0.0, voe=1.0, rvd=-1.0, assd=nan, mssd=nan, rmsd=nan)
    inter = int(np.count_nonzero(p & g))
    union = n_p + n_g - inter
    d = _surface_distances(p, g, spacing)
    return dict(dice=2.0 * inter / (n_p + n_g), voe=1.0 - inter / union, rvd=(n_p - n_g) / n_g,
                assd=float(d.mean()), mssd=float(d.max()), rmsd=float(np.sqrt(np.mean(d * d))))


def case_metrics(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float]) -> dict[str, float]:
    """LiTS metrics of one case, for the liver (label >= 1: liver and tumor together) and the tumor
    (label == 2).

    pred, gt: integer label volumes of the same shape (0 background, 1 liver, 2 tumor), in the same
    voxel grid. spacing: mm per voxel along each array axis.

    Returns the keys dice_liver, voe_liver, rvd_liver, assd_liver, mssd_liver, rmsd_liver and the same
    six with _tumor. With P the predicted and G the reference mask:

    - Dice = 2|P & G| / (|P| + |G|); VOE = 1 - |P & G| / |P | G|; RVD = (|P| - |G|) / |G| (signed:
      negative is under-segmentation).
    - Surfaces are the mask voxels with a 6-neighbour outside the mask (the array border counts as
      outside). For every surface voxel of P the distance in mm to the nearest surface voxel of G, and
      vice versa, pooled into one set: ASSD is its mean, MSSD its maximum (the symmetric Hausdorff
      distance, = medpy.metric.binary.hd), RMSD the root of its mean square. Pooling is what the LiTS
      scorer does; medpy's assd instead averages the two directed means (the same value when both
      surfaces have as many voxels).

    Empty masks (common for the tumor):
    - P and G both empty: Dice 1, VOE 0, RVD 0, ASSD = MSSD = RMSD = 0 (a perfect answer).
    - G empty, P not: Dice 0, VOE 1, RVD NaN (relative to an empty reference it is undefined),
      ASSD/MSSD/RMSD NaN (no reference surface).
    - P empty, G not: Dice 0, VOE 1, RVD -1, ASSD/MSSD/RMSD NaN (no predicted surface).
    Summaries over cases leave the NaN out (nanmean) and say how many were left out per column.
    """
    pred, gt = np.asarray(pred), np.asarray(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"pred has shape {pred.shape} but gt has {gt.shape}; expected the same shape")
    if len(spacing) != gt.ndim:
        raise ValueError(f"spacing has {len(spacing)} values; expected one per axis ({gt.ndim})")
    spacing = tuple(float(s) for s in spacing)
    out: dict[str, float] = {}
    for region in REGIONS:
        values = _region_metrics(_region(pred, region), _region(gt, region), spacing)
        out.update({f"{m}_{region}": float(values[m]) for m in METRICS})
    return out


def dice_counts(pred: np.ndarray, gt: np.ndarray) -> dict[str, int]:
    """Voxel counts for the LiTS "Dice global" (one Dice over all cases pooled):
    `intersection_<r>` = |P & G|, `pred_<r>` = |P|, `gt_<r>` = |G| for r in liver, tumor.

    Dice global = 2 * sum(intersection) / sum(pred + gt) over cases; see `dice_global`."""
    pred, gt = np.asarray(pred), np.asarray(gt)
    out = {}
    for region in REGIONS:
        p, g = _region(pred, region), _region(gt, region)
        out[f"intersection_{region}"] = int(np.count_nonzero(p & g))
        out[f"pred_{region}"] = int(np.count_nonzero(p))
        out[f"gt_{region}"] = int(np.count_nonzero(g))
    return out


def dice_global(counts: Sequence[dict[str, int]], region: str) -> float:
    """Pooled Dice from `dice_counts` of several cases; 1.0 when every P and G is empty."""
    inter = sum(c[f"intersection_{region}"] for c in counts)
    total = sum(c[f"pred_{region}"] + c[f"gt_{region}"] for c in counts)
    return 2.0 * inter / total if total else 1.0


def lesion_detection(pred: np.ndarray, gt: np.ndarray, iou_threshold: float = 0.5) -> tuple[int, int, int]:
    """Tumor lesions detected, as (true positives, false positives, false negatives).

    Lesions are the connected components of label == 2 with 26-connectivity (in 3D: voxels touching
    by a face, an edge or a corner are one lesion). A reference lesion counts as detected when a
    predicted component overlaps it with IoU > iou_threshold; matching is one-to-one, pairs taken
    greedily by descending IoU (ties by reference, then predicted label), each component used at most
    once. FP = predicted components left unmatched, FN = reference lesions left unmatched."""
    p, g = np.asarray(pred) == 2, np.asarray(gt) == 2
    if p.shape != g.shape:
        raise ValueError(f"pred has shape {p.shape} but gt has {g.shape}; expected the same shape")
    if not p.any() or not g.any():
        full = ndimage.generate_binary_structure(p.ndim, p.ndim)
        n_p = ndimage.label(p, structure=full)[1] if p.any() else 0
        n_g = ndimage.label(g, structure=full)[1] if g.any() else 0
        return 0, int(n_p), int(n_g)
    box = _bbox(p | g)  # components do not change: everything outside the box is background
    p, g = p[box], g[box]
    full = ndimage.generate_binary_structure(p.ndim, p.ndim)
    lp, n_p = ndimage.label(p, structure=full)
    lg, n_g = ndimage.label(g, structure=full)
    size_p = np.bincount(lp.ravel(), minlength=n_p + 1)
    size_g = np.bincount(lg.ravel(), minlength=n_g + 1)
    both = (lp > 0) & (lg > 0)
    pairs, inter = np.unique(np.stack([lg[both], lp[both]]), axis=1, return_counts=True)
    candidates = []
    for (a, b), n in zip(pairs.T.tolist(), inter.tolist()):
        iou = n / (size_g[a] + size_p[b] - n)
        if iou > iou_threshold:
            candidates.append((-iou, a, b))
    used_g, used_p = set(), set()
    for _, a, b in sorted(candidates):
        if a not in used_g and b not in used_p:
            used_g.add(a)
            used_p.add(b)
    tp = len(used_g)
    return tp, int(n_p) - tp, int(n_g) - tp


def precision_recall(tp: int, fp: int, fn: int) -> tuple[float, float]:
    """precision = TP / (TP + FP), recall = TP / (TP + FN); each is 1.0 when its denominator is 0
    (no predicted lesions: nothing was wrongly claimed; no reference lesions: nothing was missed)."""
    precision = tp / (tp + fp) if tp + fp else 1.0
    recall = tp / (tp + fn) if tp + fn else 1.0
    return precision, recall


# --------------------------------------------------------------------------------------------
# Folders of NIfTI files
# --------------------------------------------------------------------------------------------

_NIFTI = re.compile(r"\.nii(\.gz)?$", re.IGNORECASE)
_LITS_SEG = re.compile(r"^segmentation-\d+\.nii(\.gz)?$")
_INTEGER = re.compile(r"\d+")


def case_number(path: str | Path) -> int | None:
    """The case number in a file name: its last integer (segmentation-12.nii -> 12, liver_7.nii.gz -> 7,
    volume-3_seg.nii.gz -> 3); None when the name has none."""
    found = _INTEGER.findall(_NIFTI.sub("", Path(path).name))
    return int(found[-1]) if found else None


def _niftis(root: Path, what: str) -> list[Path]:
    if not root.is_dir():
        raise DataError(f"{root}: {what} folder not found; expected a folder of NIfTI label volumes")
    return [p for p in visible_files(root) if _NIFTI.search(p.name)]


def _by_number(paths: Sequence[Path], what: str) -> dict[int, Path]:
    found: dict[int, Path] = {}
    for p in paths:
        n = case_number(p)
        if n is None:
            continue
        if n in found:
            raise DataError(f"{p}: a second {what} for case {n} (also {found[n]}); expected one file per case")
        found[n] = p
    return found


def pair_files(pred_dir: str | Path, gt_dir: str | Path) -> tuple[list[tuple[int, Path, Path]], list[Path]]:
    """Pair ground truth and prediction files by case number: returns ([(case, pred, gt)] sorted by
    case, prediction files with no ground truth). Raises DataError when there is no ground truth or a
    ground-truth case has no prediction."""
    gt_dir, pred_dir = Path(gt_dir), Path(pred_dir)
    gt_files = _niftis(gt_dir, "ground-truth")
    # A LiTS or MSD folder also holds the CT volumes; only its label files are ground truth.
    if any(_LITS_SEG.match(p.name) for p in gt_files):
        gt_files = [p for p in gt_files if _LITS_SEG.match(p.name)]
    elif any(p.parent.name == "labelsTr" for p in gt_files):
        gt_files = [p for p in gt_files if p.parent.name == "labelsTr"]
    if not gt_files:
        raise DataError(f"{gt_dir}: found no NIfTI files; expected ground-truth label volumes such as "
                        f"segmentation-N.nii[.gz] or labelsTr/liver_N.nii.gz")
    for p in gt_files:
        if case_number(p) is None:
            raise DataError(f"{p}: found no case number in the name; expected one, e.g. segmentation-N.nii")
    gts = _by_number(gt_files, "ground truth")
    pred_files = _niftis(pred_dir, "prediction")
    preds = _by_number(pred_files, "prediction")
    pairs = []
    for n, g in sorted(gts.items()):
        if n not in preds:
            raise DataError(f"{g}: no prediction for case {n} in {pred_dir}; expected a NIfTI whose name "
                            f"ends in the number {n}, e.g. segmentation-{n}.nii or prediction-{n}.nii.gz")
        pairs.append((n, preds[n], g))
    extra = [p for p in pred_files if case_number(p) not in gts]
    return pairs, extra


def load_pair(pred_path: Path, gt_path: Path) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """Read a prediction and its ground truth in file voxel order, checking they share the voxel grid
    and hold only labels 0, 1, 2. Returns (pred uint8, gt uint8, gt spacing in mm per array axis)."""
    import nibabel as nib

    gt_img, gt = read_nifti(gt_path)
    pred_img, pred = read_nifti(pred_path)
    if pred.shape != gt.shape:
        raise DataError(f"{pred_path}: found shape {pred.shape}; expected {gt.shape}, the shape of "
                        f"{gt_path.name} (predictions must be on the ground truth's voxel grid)")
    diff = float(np.max(np.abs(np.asarray(pred_img.affine, float) - np.asarray(gt_img.affine, float))))
    if not diff <= AFFINE_TOLERANCE_MM:
        raise DataError(f"{pred_path}: affine differs from {gt_path.name}'s by up to {diff:.4g} "
                        f"(orientation {''.join(nib.aff2axcodes(pred_img.affine))} vs "
                        f"{''.join(nib.aff2axcodes(gt_img.affine))}); expected the ground truth's voxel "
                        f"grid to within {AFFINE_TOLERANCE_MM:g} mm (write predictions in the input's geometry)")
    gt = check_labels(np.asarray(gt), gt_path)
    pred = check_labels(np.asarray(pred), pred_path)
    spacing = tuple(float(z) for z in gt_img.header.get_zooms()[:3])
    return pred, gt, spacing


def evaluate_folders(pred_dir: str | Path, gt_dir: str | Path, *,
                     progress: bool = False) -> tuple[list[dict], dict]:
    """Score every ground-truth case in `gt_dir` against its prediction in `pred_dir`.

    Returns (rows, summary). rows: one dict per case, sorted by case number, with `case` (int) and the
    12 metric columns of `case_metrics`. summary: `cases`; `mean_<column>` (mean over the cases where the
    value is not NaN; NaN if none) and `nan_<column>` (how many cases were left out) for each column;
    `dice_global_liver`, `dice_global_tumor`; `tp`, `fp`, `fn` summed over cases;
    `detection_precision`, `detection_recall`; `extra_predictions` (prediction files with no ground
    truth, ignored)."""
    from tqdm import tqdm

    pairs, extra = pair_files(pred_dir, gt_dir)
    rows, counts, detections = [], [], []
    # The context closes the bar (ending its line) before an error propagates, so the CLI's
    # `error:` line starts a line of its own.
    with tqdm(pairs, desc="evaluating", unit="case", disable=not progress, file=sys.stderr) as bar:
        for n, pred_path, gt_path in bar:
            pred, gt, spacing = load_pair(pred_path, gt_path)
            rows.append({"case": n, **case_metrics(pred, gt, spacing)})
            counts.append(dice_counts(pred, gt))
            detections.append(lesion_detection(pred, gt))
    return rows, summarize(rows, counts, detections, extra_predictions=len(extra))


def summarize(rows: Sequence[dict], counts: Sequence[dict], detections: Sequence[tuple[int, int, int]],
              extra_predictions: int = 0) -> dict:
    """The summary of `evaluate_folders` from its per-case rows, `dice_counts` and `lesion_detection`."""
    summary: dict = {"cases": len(rows)}
    for col in COLUMNS:
        values = np.array([r[col] for r in rows], dtype=np.float64)
        finite = ~np.isnan(values)
        summary[f"mean_{col}"] = float(values[finite].mean()) if finite.any() else float("nan")
        summary[f"nan_{col}"] = int((~finite).sum())
    for region in REGIONS:
        summary[f"dice_global_{region}"] = dice_global(counts, region)
    tp, fp, fn = (int(sum(d[i] for d in detections)) for i in range(3))
    summary.update(tp=tp, fp=fp, fn=fn)
    summary["detection_precision"], summary["detection_recall"] = precision_recall(tp, fp, fn)
    summary["extra_predictions"] = int(extra_predictions)
    return summary


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

def _fmt(v: float) -> str:
    return "nan" if np.isnan(v) else f"{v:.4f}"


def format_summary(summary: dict) -> str:
    """A short table of the per-case means, the Dice global values and lesion detection."""
    n = summary["cases"]
    lines = [f"{n} case(s)   {'liver':>10} {'tumor':>10}   (mean over cases; NaN cases left out)"]
    for m in METRICS:
        unit = " mm" if m in ("assd", "mssd", "rmsd") else ""
        cells = [_fmt(summary[f"mean_{m}_{r}"]) for r in REGIONS]
        left = [summary[f"nan_{m}_{r}"] for r in REGIONS]
        note = f"   left out: liver {left[0]}, tumor {left[1]}" if any(left) else ""
        lines.append(f"{(m.upper() + unit):<11} {cells[0]:>10} {cells[1]:>10}{note}")
    lines.append(f"{'Dice global':<11} {_fmt(summary['dice_global_liver']):>10} "
                 f"{_fmt(summary['dice_global_tumor']):>10}")
    lines.append(f"lesion detection (IoU > 0.5): TP {summary['tp']}, FP {summary['fp']}, FN {summary['fn']}, "
                 f"precision {summary['detection_precision']:.4f}, recall {summary['detection_recall']:.4f}")
    return "\n".join(lines)


def rows_to_csv(rows: Sequence[dict]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for r in rows:
        writer.writerow([r["case"]] + [format(float(r[c]), ".8g") for c in COLUMNS])
    return buf.getvalue()


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="LiTS metrics of predicted label volumes against the ground truth.")
    parser.add_argument("--pred", required=True, type=Path,
                        help="folder of predicted label volumes, one NIfTI per case named with its number")
    parser.add_argument("--gt", required=True, type=Path,
                        help="folder of ground-truth label volumes (segmentation-N.nii[.gz], labelsTr/liver_N.nii.gz)")
    parser.add_argument("--output", type=Path, default=None,
                        help="CSV file for the per-case metrics (default: none, print the summary only)")
    return parser


def main(args: argparse.Namespace) -> int:
    if args.output is not None and args.output.is_dir():
        raise DataError(f"{args.output}: --output is a folder; expected a CSV file name")
    rows, summary = evaluate_folders(args.pred, args.gt, progress=True)
    if summary["extra_predictions"]:
        sys.stderr.write(f"note: {summary['extra_predictions']} prediction file(s) in {args.pred} have no "
                         f"ground truth and were ignored\n")
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.output, rows_to_csv(rows))
    print(format_summary(summary))
    if args.output is not None:
        print(f"per-case metrics: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, get_args_parser()))
