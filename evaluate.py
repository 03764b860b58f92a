"""LiTS metrics of predicted label volumes against the ground truth, as the LiTS scorer defines them.

    python evaluate.py --pred runs/predictions --gt /data/LiTS --output metrics.csv --summary summary.json
    python evaluate.py --pred runs/predictions --gt /data/LiTS --split-file runs/segmentation/splits.json --split test

Cases are paired by number: the ground truth is `segmentation-N.nii[.gz]` (LiTS), `labelsTr/liver_N.nii.gz`
(MSD) or any NIfTI whose name holds the case number as its last integer; a prediction is any NIfTI in
`--pred` whose last integer is N (`segmentation-N.nii`, `test-segmentation-N.nii`, `volume-N_seg.nii.gz`,
`prediction-N.nii.gz`). Prediction and ground truth must share the voxel grid (shape and affine), as
the LiTS scorer requires; nothing is resampled or reoriented.

The definitions follow the scorer of the LiTS challenge (github.com/PatrickChrist/lits-challenge-scoring,
`program/evaluate.py`, `helpers/calc_metric.py`, `helpers/surface.py`); where this module departs from
it, the function's docstring and the README say so. Per case and per region (liver = label >= 1, i.e.
liver and tumor together; tumor = label == 2): Dice, VOE, RVD, ASSD, MSSD, RMSD in mm
(`case_metrics`), and lesion detection counts (`match_lesions`, `detection_counts`, the scorer's
`detect_lesions` to the count, its mistakes included; `pair_detection_counts` beside it). Over all cases:
means, Dice global, detection precision/recall/F1 at IoU > 0.5 and > 0, the Dice of detected
lesions, recall by lesion size, and the tumor burden error (`summarize`).

This module is the one home of these rules: `predict_segmentation.py --ground-truth` and the
training-time Dice of `lit_model.py` call its functions. The lesion labelling (face-connected), the
largest axial diameter and the tumor burden are `lesions.py`'s, the very functions the prediction and
diagnostic reports measure with.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import re
import sys
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

# The lesion and burden rules live with the measurements, so a report and a score count alike.
from dicom_datasets import DicomOptions, add_dicom_arguments, find_dicom_cases, ground_truth_image, options_from_args
from lesions import label_lesions, largest_axial_diameters, tumor_burden
from volumes import (DataError, atomic_output, check_labels, check_output, check_same_grid, ensure_folder,
                     read_labels_on_grid, read_nifti, run_cli, visible_files)

REGIONS: tuple[str, ...] = ("liver", "tumor")
METRICS: tuple[str, ...] = ("dice", "voe", "rvd", "assd", "mssd", "rmsd")
COLUMNS: tuple[str, ...] = tuple(f"{m}_{r}" for r in REGIONS for m in METRICS)
LESION_COLUMNS: tuple[str, ...] = ("lesions_tp", "lesions_fp", "lesions_fn")
CSV_COLUMNS: tuple[str, ...] = ("case",) + COLUMNS + LESION_COLUMNS
IOU_THRESHOLDS: tuple[float, ...] = (0.5, 0.0)  # what the scorer reports: "detected" and "touched at all"
# Reference lesions by their largest axial diameter in mm: (name, lower bound, upper bound), the lower
# bound exclusive except for the first class: < 10, [10, 20], > 20.
SIZE_CLASSES: tuple[tuple[str, float, float], ...] = (("lt10mm", 0.0, 10.0), ("10to20mm", 10.0, 20.0),
                                                      ("gt20mm", 20.0, math.inf))
NAN = float("nan")


# --------------------------------------------------------------------------------------------
# Dice from counts: the empty-mask rules, shared with the training-time metrics
# --------------------------------------------------------------------------------------------

def _counts(*values):
    return tuple(np.asarray(v, dtype=np.float64) for v in values)


def _scalar_or_array(a: np.ndarray):
    return float(a) if a.ndim == 0 else a


def dice_from_counts(intersection, pred, ref):
    """Dice of one case (or element-wise, of arrays of cases): 2|P & G| / (|P| + |G|) from voxel counts.

    Empty masks, the LiTS scorer's per-case rule: P and G both empty -> 1.0 (nothing to find, nothing
    found); only one empty -> 0.0. Returns a float for scalar counts, else a float64 array."""
    inter, p, r = _counts(intersection, pred, ref)
    total = p + r
    return _scalar_or_array(np.where(total > 0, 2.0 * inter / np.where(total > 0, total, 1.0), 1.0))


def pooled_dice(intersection, pred, ref):
    """Dice of a whole split (or of a dataset, the LiTS "Dice global"): counts summed over all its
    cases, slices or pixels beforehand.

    When the reference of the whole split is empty (e.g. no tumor in any patient) the Dice does not
    apply and is NaN, whatever the prediction holds: a 1.0 would read as a perfect score. (The scorer
    divides by zero there.) Element-wise on arrays, as `dice_from_counts`."""
    inter, p, r = _counts(intersection, pred, ref)
    return _scalar_or_array(np.where(r > 0, 2.0 * inter / np.where(r > 0, p + r, 1.0), np.nan))


def mean_case_dice(intersection, pred, ref) -> float:
    """Mean over cases of `dice_from_counts` (the scorer's "Dice per case"); 1-D count arrays, one entry
    per case. NaN when no case's reference has the region (the split rule of `pooled_dice`)."""
    inter, p, r = (np.atleast_1d(a) for a in _counts(intersection, pred, ref))
    if not (r > 0).any():
        return NAN
    return float(np.mean(dice_from_counts(inter, p, r)))


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


def surface(mask: np.ndarray) -> np.ndarray:
    """The scorer's surface (helpers/surface.py, from SLIVER07): the mask minus its erosion by the
    18-neighbourhood (`generate_binary_structure(3, 2)`: face and edge neighbours, not corners), i.e. the
    mask voxels with a face or edge neighbour outside the mask. Outside the array counts as outside the
    mask (border_value=0), as in the scorer."""
    structure = ndimage.generate_binary_structure(mask.ndim, 2)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def surface_distances(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float],
                      crop: bool = True) -> np.ndarray:
    """All surface-to-surface distances in mm, both directions pooled into one array: for each voxel of
    pred's surface the distance to the nearest voxel of gt's surface, then the same from gt to pred
    (the scorer's two nearest-neighbour sets). Both masks must be non-empty.

    Cropping to the bounding box of pred | gt padded by one voxel changes nothing: every voxel outside
    that box is background in both masks, so each mask voxel sees the same 18 neighbours in the crop
    (a neighbour beyond the crop edge is either in the padding ring, which is kept, or beyond the volume
    edge, which border_value=0 already treats as background), hence the same surfaces; and the distance
    between two surface voxels depends only on their index difference times the spacing, and all
    surface voxels lie inside the box, so the exact EDT inside the box finds the same nearest surface
    voxel as a search over the whole volume."""
    if crop:
        box = _bbox(pred | gt, pad=1)
        pred, gt = pred[box], gt[box]
    sp, sg = surface(pred), surface(gt)
    # distance_transform_edt gives each non-zero voxel its distance to the nearest zero voxel; the
    # surface voxels are the zeros of ~surface.
    to_gt = ndimage.distance_transform_edt(~sg, sampling=spacing)[sp]
    to_pred = ndimage.distance_transform_edt(~sp, sampling=spacing)[sg]
    return np.concatenate([to_gt, to_pred])


def _region_metrics(p: np.ndarray, g: np.ndarray, spacing: Sequence[float]) -> dict[str, float]:
    n_p, n_g = int(np.count_nonzero(p)), int(np.count_nonzero(g))
    if n_p == 0 and n_g == 0:
        return dict(dice=1.0, voe=0.0, rvd=0.0, assd=0.0, mssd=0.0, rmsd=0.0)
    if n_g == 0:
        return dict(dice=0.0, voe=1.0, rvd=NAN, assd=NAN, mssd=NAN, rmsd=NAN)
    if n_p == 0:
        return dict(dice=0.0, voe=1.0, rvd=-1.0, assd=NAN, mssd=NAN, rmsd=NAN)
    inter = int(np.count_nonzero(p & g))
    union = n_p + n_g - inter
    d = surface_distances(p, g, spacing)
    return dict(dice=dice_from_counts(inter, n_p, n_g), voe=1.0 - inter / union, rvd=(n_p - n_g) / n_g,
                assd=float(d.mean()), mssd=float(d.max()), rmsd=float(np.sqrt(np.mean(d * d))))


def case_metrics(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float]) -> dict[str, float]:
    """LiTS metrics of one case, for the liver (label >= 1: liver and tumor together) and the tumor
    (label == 2).

    pred, gt: integer label volumes of the same shape (0 background, 1 liver, 2 tumor), in the same
    voxel grid. spacing: mm per voxel along each array axis.

    Returns the keys dice_liver, voe_liver, rvd_liver, assd_liver, mssd_liver, rmsd_liver and the same
    six with _tumor. With P the predicted and G the reference mask:

    - Dice = 2|P & G| / (|P| + |G|); VOE = 1 - |P & G| / |P | G| (the scorer's 1 - Jaccard).
    - RVD = (|P| - |G|) / |G|, signed: negative is under-segmentation. The scorer calls medpy's
      `ravd(reference, prediction)`, i.e. (|G| - |P|) / |P|, reference and prediction swapped; not copied.
    - Surfaces as `surface` (18-neighbourhood). For every surface voxel of P the distance in mm to the
      nearest surface voxel of G, and vice versa, pooled into one set S: ASSD = mean(S), MSSD = max(S)
      (the symmetric Hausdorff distance), RMSD = sqrt(mean(S^2)), the scorer's definitions (pooled, not
      the mean of the two directed means).

    Empty masks:
    - P and G both empty: Dice 1, VOE 0, RVD 0, ASSD = MSSD = RMSD = 0 (a perfect answer; the scorer's
      per-case Dice rule).
    - G empty, P not: Dice 0, VOE 1, RVD NaN (relative to an empty reference it is undefined),
      ASSD/MSSD/RMSD NaN (no reference surface).
    - P empty, G not: Dice 0, VOE 1, RVD -1, ASSD/MSSD/RMSD NaN (no predicted surface).
    The scorer puts 9001 in place of these NaN; summaries here leave the NaN out and count them.
    (The scorer also scores the liver as missing when the prediction has no voxel of label 1, even if it
    has label 2; here the liver region is label >= 1 in both, always.)
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
    `intersection_<r>` = |P & G|, `pred_<r>` = |P|, `gt_<r>` = |G| for r in liver, tumor."""
    pred, gt = np.asarray(pred), np.asarray(gt)
    out = {}
    for region in REGIONS:
        p, g = _region(pred, region), _region(gt, region)
        out[f"intersection_{region}"] = int(np.count_nonzero(p & g))
        out[f"pred_{region}"] = int(np.count_nonzero(p))
        out[f"gt_{region}"] = int(np.count_nonzero(g))
    return out


def dice_global(counts: Sequence[dict[str, int]], region: str) -> float:
    """Dice global: 2 * sum(|P & G|) / sum(|P| + |G|) over cases (`dice_counts` of each); NaN when no
    case's reference has the region (`pooled_dice`)."""
    return pooled_dice(*(sum(c[f"{k}_{region}"] for c in counts) for k in ("intersection", "pred", "gt")))


def burden_error(pred: np.ndarray, gt: np.ndarray) -> float:
    """Reference burden minus predicted burden (the scorer's sign). A prediction without liver claims
    no tumor: burden 0 (the scorer instead sets 9001 when the prediction has no voxel of label 1, even
    one that has label 2). NaN when the reference has no liver (the scorer divides by zero)."""
    predicted = tumor_burden(pred)
    return tumor_burden(gt) - (0.0 if math.isnan(predicted) else predicted)


# --------------------------------------------------------------------------------------------
# Lesions: the scorer's merging and matching (labelling: lesions.label_lesions)
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LesionPair:
    """A merged reference lesion and the merged predicted lesion matched to it.

    `partner` and `partner_overlap` serve the scorer's union (`scorer_detected`): the index in
    `LesionMatch.pairs` of the pair whose lowest reference id equals this pair's lowest prediction id
    (None if no pair has it), and the voxels that pair's predictions share with this pair's reference
    lesions."""
    ref_ids: tuple[int, ...]    # reference lesion ids merged into one
    pred_ids: tuple[int, ...]   # predicted lesion ids merged into one
    intersection: int           # voxels
    ref_voxels: int
    pred_voxels: int
    partner: int | None = None
    partner_overlap: int = 0

    @property
    def iou(self) -> float:
        """The pair's own IoU, |Pm & Gm| / |Pm | Gm| (not the scorer's; see `scorer_detected`)."""
        return self.intersection / (self.ref_voxels + self.pred_voxels - self.intersection)

    @property
    def dice(self) -> float:
        return dice_from_counts(self.intersection, self.pred_voxels, self.ref_voxels)


@dataclass(frozen=True)
class LesionMatch:
    """The outcome of `match_lesions`: every pair, in the scorer's order (by lowest prediction id), and
    the lesion counts before merging."""
    pairs: tuple[LesionPair, ...]
    num_pred: int
    num_ref: int


def match_lesions(pred_ids: np.ndarray, num_pred: int, ref_ids: np.ndarray, num_ref: int) -> LesionMatch:
    """Merge and match lesions by the rule of the scorer's `detect_lesions` (helpers/calc_metric.py).

    pred_ids, ref_ids: lesion id volumes from `label_lesions`. With I(p, g) the voxels shared by
    predicted lesion p and reference lesion g, and only the predictions that overlap some reference:

    1. Reference lesions spanned by one prediction are merged: each reference lesion that overlaps a
       prediction joins the group of the prediction overlapping it most (ties: the lower prediction id).
       Reference lesions without overlap stay alone (and are missed). A group is named by its lowest
       reference id, as the scorer relabels its members.
    2. Each overlapping predicted lesion goes to the merged reference lesion it overlaps most (summed
       over the group's members; ties: the group with the lower name).
    3. Predicted lesions that went to the same merged reference lesion are merged, named by their
       lowest id.
    4. Each merged reference lesion that received predictions forms a `LesionPair`; the pairs come in
       the order of their prediction names, the order of the scorer's last loop. Which of them count
       as detected is `scorer_detected`'s (the scorer's rule) or `LesionPair.iou` > t (the pair's own).

    Ids follow scipy's raster order of the array, and the scorer's union depends on the ids themselves
    (`scorer_detected`), so its counts depend on the array's axis order: the scorer works in the NIfTI
    file's voxel order, as `evaluate_folders` and `predict_segmentation.py --ground-truth` do."""
    pred_ids, ref_ids = np.asarray(pred_ids), np.asarray(ref_ids)
    if pred_ids.shape != ref_ids.shape:
        raise ValueError(f"pred has shape {pred_ids.shape} but gt has {ref_ids.shape}; expected the same shape")
    both = (pred_ids > 0) & (ref_ids > 0)
    if not both.any():
        return LesionMatch((), int(num_pred), int(num_ref))
    pred_size = np.bincount(pred_ids.ravel(), minlength=num_pred + 1)
    ref_size = np.bincount(ref_ids.ravel(), minlength=num_ref + 1)
    pairs, shared = np.unique(np.stack([pred_ids[both], ref_ids[both]]), axis=1, return_counts=True)
    overlap: dict[tuple[int, int], int] = {(int(p), int(g)): int(n) for (p, g), n in zip(pairs.T, shared)}

    # 1. Group key of each overlapping reference lesion: the prediction overlapping it most.
    best_pred: dict[int, tuple[int, int]] = {}  # g -> (overlap, -p), the larger the better
    for (p, g), n in overlap.items():
        if g not in best_pred or (n, -p) > best_pred[g]:
            best_pred[g] = (n, -p)
    groups: dict[int, list[int]] = {}
    for g in sorted(best_pred):
        groups.setdefault(-best_pred[g][1], []).append(g)
    group_of = {g: key for key, members in groups.items() for g in members}

    # 2. Each overlapping prediction goes to the merged reference lesion it overlaps most.
    to_group: dict[int, dict[int, int]] = {}
    for (p, g), n in overlap.items():
        row = to_group.setdefault(p, {})
        row[group_of[g]] = row.get(group_of[g], 0) + n
    assigned: dict[int, list[int]] = {}
    for p in sorted(to_group):
        key = max(to_group[p], key=lambda k: (to_group[p][k], -groups[k][0]))
        assigned.setdefault(key, []).append(p)

    # 3-4. One pair per merged reference lesion that received predictions, by lowest prediction id.
    order = sorted(assigned.items(), key=lambda kv: kv[1][0])
    by_ref_name = {groups[key][0]: i for i, (key, _) in enumerate(order)}
    out = []
    for key, preds in order:
        refs = groups[key]
        partner = by_ref_name.get(preds[0])
        partner_overlap = 0 if partner is None else sum(
            overlap.get((p, g), 0) for p in order[partner][1] for g in refs)
        out.append(LesionPair(ref_ids=tuple(refs), pred_ids=tuple(preds),
                              intersection=sum(to_group[p][key] for p in preds),
                              ref_voxels=int(sum(ref_size[g] for g in refs)),
                              pred_voxels=int(sum(pred_size[p] for p in preds)),
                              partner=partner, partner_overlap=partner_overlap))
    return LesionMatch(tuple(out), int(num_pred), int(num_ref))


def scorer_detected(match: LesionMatch, iou_threshold: float = 0.5) -> tuple[bool, ...]:
    """Which pairs of `match` the scorer keeps as detected at `iou_threshold`, by its last loop.

    The scorer writes each merged prediction into its `detected_mask` under the name of its reference
    group, then tests each pair (P, G), P named p and G named g, in the order of p:
    overlap = |P & G| / |{detected_mask == p} | G| <= t fails it, which erases P from detected_mask
    (later unions no longer see it) and takes the size of G from the detected count. Its union reads
    `detected_mask == p` although that mask holds reference names: it is not P but the prediction of
    the still detected pair whose reference group is named p, if any (P itself only when p == g).
    So a prediction far larger than its lesion can count as detected (the union is then G alone), and
    a good match can fail because an unrelated prediction joins its union."""
    alive = [True] * len(match.pairs)
    for i, pair in enumerate(match.pairs):
        union = pair.ref_voxels
        if pair.partner is not None and alive[pair.partner]:
            union += match.pairs[pair.partner].pred_voxels - pair.partner_overlap
        if pair.intersection / union <= iou_threshold:
            alive[i] = False
    return tuple(alive)


def detection_counts(match: LesionMatch, iou_threshold: float = 0.5) -> tuple[int, int, int]:
    """(TP, FP, FN) exactly as the LiTS scorer counts them: TP = its `num_detected`, the number of pairs
    minus, for each pair that fails `scorer_detected`, the number of reference lesions merged into it;
    FP = predicted lesions - TP; FN = reference lesions - TP, the lesion counts taken before merging.

    A detected merge of k reference lesions is one TP and k - 1 FN; a lesion predicted in k detected
    pieces is one TP and k - 1 FP. A failed merge of k reference lesions takes k from TP where it
    added one, so TP can fall below zero (one prediction over two small lesions, IoU <= t: TP -1,
    FP 2, FN 3), and FP and FN can exceed the numbers of lesions. We think that subtraction, and the
    scorer's union (`scorer_detected`), are mistakes; `pair_detection_counts` counts by each pair's
    own IoU, one per pair, never below zero. These counts are the scorer's because the numbers LiTS
    papers report were computed with them."""
    detected = scorer_detected(match, iou_threshold)
    tp = len(match.pairs) - sum(len(pair.ref_ids) for pair, ok in zip(match.pairs, detected) if not ok)
    return tp, match.num_pred - tp, match.num_ref - tp


def pair_detection_counts(match: LesionMatch, iou_threshold: float = 0.5) -> tuple[int, int, int]:
    """(TP, FP, FN) by each merged pair's own IoU: TP = pairs with `LesionPair.iou` > `iou_threshold`,
    FP = predicted lesions - TP, FN = reference lesions - TP (lesion counts before merging). Not the
    scorer's count (`detection_counts`); 0 <= TP <= min(predicted, reference lesions)."""
    tp = sum(1 for pair in match.pairs if pair.iou > iou_threshold)
    return tp, match.num_pred - tp, match.num_ref - tp


def size_class(diameter_mm: float) -> str:
    """The name of the `SIZE_CLASSES` entry of a lesion diameter: lt10mm (< 10), 10to20mm (10 to 20
    inclusive), gt20mm (> 20)."""
    if diameter_mm < SIZE_CLASSES[0][2]:
        return SIZE_CLASSES[0][0]
    return SIZE_CLASSES[1][0] if diameter_mm <= SIZE_CLASSES[1][2] else SIZE_CLASSES[2][0]


# --------------------------------------------------------------------------------------------
# One case, and the summary over cases
# --------------------------------------------------------------------------------------------

@dataclass
class CaseScore:
    """Everything `evaluate.py` takes from one case: `row` (the CSV columns but `case`) and what the
    summary pools over cases."""
    row: dict[str, float]
    counts: dict[str, int]
    detection: dict[float, tuple[int, int, int]]       # IoU threshold -> (TP, FP, FN), the scorer's
    detected_dice: list[float]                          # Dice of each pair the scorer detects at IoU > 0.5
    sizes: list[tuple[str, bool]] = field(default_factory=list)  # (size class, detected at IoU > 0.5) per reference lesion
    burden_error: float = NAN
    pair_detection: tuple[int, int, int] = (0, 0, 0)   # (TP, FP, FN) by each pair's own IoU > 0.5


def score_case(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float], axial_axis: int) -> CaseScore:
    """Score one case: `case_metrics`, lesion detection at each of `IOU_THRESHOLDS` (the scorer's
    counts, and at 0.5 also by each pair's own IoU), the Dice of the detected lesions, the size class
    and detection of each reference lesion, the tumor burden error. A lesion counts as detected when
    the scorer keeps its pair (`scorer_detected`). pred, gt: label volumes on the same grid, in the
    file's voxel order (lesion ids, hence the scorer's counts, follow the array's order);
    spacing: mm per array axis; axial_axis: the array axis across axial slices (for lesion diameters)."""
    pred, gt = np.asarray(pred), np.asarray(gt)
    row = case_metrics(pred, gt, spacing)
    pred_ids, num_pred = label_lesions(pred)
    ref_ids, num_ref = label_lesions(gt)
    match = match_lesions(pred_ids, num_pred, ref_ids, num_ref)
    detection = {t: detection_counts(match, t) for t in IOU_THRESHOLDS}
    row.update(zip(LESION_COLUMNS, detection[0.5]))
    detected = [pair for pair, ok in zip(match.pairs, scorer_detected(match, 0.5)) if ok]
    found = {g for pair in detected for g in pair.ref_ids}
    diameters = largest_axial_diameters(ref_ids, num_ref, spacing, axial_axis)
    sizes = [(size_class(d), g in found) for g, d in enumerate(diameters, start=1)]
    return CaseScore(row=row, counts=dice_counts(pred, gt), detection=detection,
                     detected_dice=[pair.dice for pair in detected], sizes=sizes, burden_error=burden_error(pred, gt),
                     pair_detection=pair_detection_counts(match, 0.5))


def detection_rates(tp: int, fp: int, fn: int) -> tuple[float, float, float]:
    """(precision, recall, F1) = (TP / (TP + FP), TP / (TP + FN), 2TP / (2TP + FP + FN)); each NaN when
    its denominator is 0 (no predicted lesion, no reference lesion, neither), where the scorer puts 0.
    With the scorer's counts (`detection_counts`) TP can be negative, and these with it."""
    def ratio(a: int, b: int) -> float:
        return a / b if b else NAN
    return ratio(tp, tp + fp), ratio(tp, tp + fn), ratio(2 * tp, 2 * tp + fp + fn)


def summarize(scores: Sequence[CaseScore], extra_predictions: int = 0) -> dict:
    """Every aggregate over cases, as a flat dict (the `--summary` JSON):

    - `cases`; `mean_<column>` and `nan_<column>` for each of the 12 metric columns: the mean over the
      cases where it is not NaN, and how many were left out. The tumor means are all NaN (every case
      left out) when no case's reference has tumor: no Dice for what is not there.
    - `dice_global_liver`, `dice_global_tumor` (`dice_global`).
    - `lesions_reference`, `lesions_predicted` (before merging); at IoU > 0.5: `lesions_tp`,
      `lesions_fp`, `lesions_fn`, `detection_precision`, `detection_recall`, `detection_f1`; the same
      with the suffix `_iou0` at IoU > 0 (`detection_counts`, the scorer's counts: TP can be negative;
      `detection_rates`). The same five at IoU > 0.5 with the suffix `_pair_iou`: counted by each
      merged pair's own IoU (`pair_detection_counts`), not the scorer's way.
    - `lesion_dice_detected`: the mean Dice of the lesion pairs detected at IoU > 0.5, over all cases'
      pairs pooled (the scorer's "lesion Dice"); 0 when reference lesions exist but none was detected
      (the scorer's default), NaN when there is no reference lesion at all.
    - For each size class c of `SIZE_CLASSES`: `lesions_<c>` reference lesions, `detected_<c>` of them
      detected at IoU > 0.5 (a lesion of a detected merged group counts as detected), `recall_<c>`
      (NaN without lesions of that size).
    - `tumor_burden_rmse` = sqrt(mean(e^2)) and `tumor_burden_max_error` = max |e| over cases, e the
      `burden_error` (the scorer's maximum is of the signed e, so over-estimates never show);
      `nan_tumor_burden`: cases left out (reference without liver).
    - `extra_predictions`: prediction files with no ground truth (ignored)."""
    rows = [s.row for s in scores]
    summary: dict = {"cases": len(rows)}
    no_tumor = not any(s.counts["gt_tumor"] for s in scores)
    for col in COLUMNS:
        values = np.array([r[col] for r in rows], dtype=np.float64)
        finite = ~np.isnan(values)
        if col.endswith("_tumor") and no_tumor:
            finite[:] = False
        summary[f"mean_{col}"] = float(values[finite].mean()) if finite.any() else NAN
        summary[f"nan_{col}"] = int((~finite).sum())
    for region in REGIONS:
        summary[f"dice_global_{region}"] = dice_global([s.counts for s in scores], region)
    num_ref = sum(s.detection[0.5][0] + s.detection[0.5][2] for s in scores)
    summary["lesions_reference"] = num_ref
    summary["lesions_predicted"] = sum(s.detection[0.5][0] + s.detection[0.5][1] for s in scores)
    for t, suffix in ((0.5, ""), (0.0, "_iou0")):
        tp, fp, fn = (int(sum(s.detection[t][i] for s in scores)) for i in range(3))
        summary.update({f"lesions_tp{suffix}": tp, f"lesions_fp{suffix}": fp, f"lesions_fn{suffix}": fn})
        rates = detection_rates(tp, fp, fn)
        for name, value in zip(("precision", "recall", "f1"), rates):
            summary[f"detection_{name}{suffix}"] = value
    tp, fp, fn = (int(sum(s.pair_detection[i] for s in scores)) for i in range(3))
    summary.update({"lesions_tp_pair_iou": tp, "lesions_fp_pair_iou": fp, "lesions_fn_pair_iou": fn})
    for name, value in zip(("precision", "recall", "f1"), detection_rates(tp, fp, fn)):
        summary[f"detection_{name}_pair_iou"] = value
    dices = [d for s in scores for d in s.detected_dice]
    summary["lesion_dice_detected"] = float(np.mean(dices)) if dices else (0.0 if num_ref else NAN)
    for name, _, _ in SIZE_CLASSES:
        found = [hit for s in scores for c, hit in s.sizes if c == name]
        summary[f"lesions_{name}"] = len(found)
        summary[f"detected_{name}"] = int(sum(found))
        summary[f"recall_{name}"] = sum(found) / len(found) if found else NAN
    errors = np.array([s.burden_error for s in scores], dtype=np.float64)
    errors = errors[~np.isnan(errors)]
    summary["tumor_burden_rmse"] = float(np.sqrt(np.mean(errors ** 2))) if errors.size else NAN
    summary["tumor_burden_max_error"] = float(np.max(np.abs(errors))) if errors.size else NAN
    summary["nan_tumor_burden"] = len(scores) - int(errors.size)
    summary["extra_predictions"] = int(extra_predictions)
    return summary


def json_safe(value):
    """NaN and infinities as None, so a file of results is strict JSON (null reads as "not applicable")."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


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


def _dicom_ground_truth(gt_dir: Path, options: DicomOptions | None) -> list:
    """The cases of a 3D-IRCADb or DICOM SEG folder (their number: the last integer of the case id, as
    in 3Dircadb1.17 or HCC_017), or [] when `gt_dir` holds NIfTI files or is no folder."""
    if not gt_dir.is_dir() or any(_NIFTI.search(p.name) for p in visible_files(gt_dir)):
        return []
    return find_dicom_cases(gt_dir, options)


def _dicom_by_number(cases) -> dict:
    found: dict = {}
    for case in cases:
        n = case_number(case.case_id)
        if n is None:
            raise DataError(f"{case.folder}: found no case number in the case id {case.case_id}; expected one, "
                            f"e.g. 3Dircadb1.17")
        if n in found:
            raise DataError(f"{case.folder}: a second ground truth for case {n} (also {found[n].folder}); expected "
                            f"one case per number")
        found[n] = case
    return found


def pair_files(pred_dir: str | Path, gt_dir: str | Path, cases: Sequence[int] | None = None,
               dicom_options: DicomOptions | None = None) -> tuple[list[tuple[int, Path, Path]], list[Path]]:
    """Pair ground truth and prediction files by case number: returns ([(case, pred, gt)] sorted by
    case, prediction files with no ground truth). With `cases` (e.g. a run's test patients), only
    those ground-truth cases are scored; each must be in `gt_dir`. Raises DataError when there is no
    ground truth or a scored ground-truth case has no prediction. A ground-truth folder in a DICOM
    layout (`dicom_datasets.py`) gives its cases in place of files; their predictions are NIfTI files
    on the CT series' grid."""
    gt_dir, pred_dir = Path(gt_dir), Path(pred_dir)
    dicom_gt = _dicom_ground_truth(gt_dir, dicom_options)
    gt_files = [] if dicom_gt else _niftis(gt_dir, "ground-truth")
    # A LiTS or MSD folder also holds the CT volumes; only its label files are ground truth.
    if any(_LITS_SEG.match(p.name) for p in gt_files):
        gt_files = [p for p in gt_files if _LITS_SEG.match(p.name)]
    elif any(p.parent.name == "labelsTr" for p in gt_files):
        gt_files = [p for p in gt_files if p.parent.name == "labelsTr"]
    if not gt_files and not dicom_gt:
        raise DataError(f"{gt_dir}: found no NIfTI files; expected ground-truth label volumes such as "
                        f"segmentation-N.nii[.gz] or labelsTr/liver_N.nii.gz")
    for p in gt_files:
        if case_number(p) is None:
            raise DataError(f"{p}: found no case number in the name; expected one, e.g. segmentation-N.nii")
    gts = _dicom_by_number(dicom_gt) if dicom_gt else _by_number(gt_files, "ground truth")
    extra_of = set(gts)  # a prediction of a case outside the selection is not an extra one
    if cases is not None:
        missing = sorted(set(cases) - set(gts))
        if missing:
            raise DataError(f"{gt_dir}: found no ground truth for case(s) {', '.join(map(str, missing))} of the "
                            f"selected split; expected the data folder the split was made from")
        gts = {n: g for n, g in gts.items() if n in set(cases)}
    pred_files = _niftis(pred_dir, "prediction")
    preds = _by_number(pred_files, "prediction")
    pairs = []
    for n, g in sorted(gts.items()):
        if n not in preds:
            raise DataError(f"{g}: no prediction for case {n} in {pred_dir}; expected a NIfTI whose name "
                            f"ends in the number {n}, e.g. segmentation-{n}.nii or prediction-{n}.nii.gz")
        pairs.append((n, preds[n], g))
    extra = [p for p in pred_files if case_number(p) not in extra_of]
    return pairs, extra


def grid_of(img) -> tuple[tuple[float, ...], int]:
    """(spacing in mm per array axis from the NIfTI header, as the scorer reads it; the array axis
    nearest the patient's head-feet direction, across which the slices are axial) of a nibabel image."""
    import nibabel as nib

    spacing = tuple(float(z) for z in img.header.get_zooms()[:3])
    world_axis = nib.io_orientation(img.affine)[:, 0]  # array axis -> world axis (0 R-L, 1 A-P, 2 S-I)
    axial_axis = int(np.flatnonzero(world_axis == 2)[0]) if (world_axis == 2).any() else 2
    return spacing, axial_axis


def load_pair(pred_path: Path, gt_path: Path) -> tuple[np.ndarray, np.ndarray, tuple[float, ...], int]:
    """Read a prediction and its ground truth in file voxel order, checking they share the voxel grid
    (`volumes.check_same_grid`, the rule `predict_segmentation.py --ground-truth` applies too) and hold
    only labels 0, 1, 2. Returns (pred uint8, gt uint8, gt spacing in mm per array axis, the array
    axis across which the slices are axial: `grid_of`)."""
    pred_img, pred = read_nifti(pred_path)
    if isinstance(gt_path, Path):
        gt_img, gt = read_labels_on_grid(gt_path, pred_path, pred.shape, pred_img.affine)
    else:  # a 3D-IRCADb or DICOM SEG case (`dicom_datasets.py`): its labels on its CT series' grid
        gt_img, gt = ground_truth_image(gt_path)
        check_same_grid(gt_path.folder, gt.shape, gt_img.affine, pred_path, pred.shape, pred_img.affine)
        gt = check_labels(np.asarray(gt), gt_path.folder)
    pred = check_labels(np.asarray(pred), pred_path)
    return (pred, gt, *grid_of(gt_img))


def evaluate_folders(pred_dir: str | Path, gt_dir: str | Path, *, cases: Sequence[int] | None = None,
                     progress: bool = False, dicom_options: DicomOptions | None = None
                     ) -> tuple[list[dict], dict]:
    """Score every ground-truth case in `gt_dir` against its prediction in `pred_dir`.

    Returns (rows, summary). rows: one dict per case, sorted by case number, with `case` (int), the 12
    metric columns of `case_metrics` and `lesions_tp`, `lesions_fp`, `lesions_fn` (IoU > 0.5).
    summary: `summarize` of the cases, with `extra_predictions` (prediction files with no ground
    truth, ignored). `cases`: only these case numbers (see `pair_files`)."""
    from tqdm import tqdm

    pairs, extra = pair_files(pred_dir, gt_dir, cases, dicom_options)
    rows, scores = [], []
    # The context closes the bar (ending its line) before an error propagates, so the CLI's
    # `error:` line starts a line of its own.
    with tqdm(pairs, desc="evaluating", unit="case", disable=not progress, file=sys.stderr) as bar:
        for n, pred_path, gt_path in bar:
            pred, gt, spacing, axial_axis = load_pair(pred_path, gt_path)
            scores.append(score_case(pred, gt, spacing, axial_axis))
            rows.append({"case": n, **scores[-1].row})
    return rows, summarize(scores, extra_predictions=len(extra))


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

def _fmt(v: float) -> str:
    return "nan" if math.isnan(v) else f"{v:.4f}"


def format_summary(summary: dict) -> str:
    """A short table of the per-case means, Dice global, lesion detection and tumor burden."""
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
    if math.isnan(summary["dice_global_tumor"]):
        lines.append("note: no reference tumor in any case: tumor Dice and the other tumor metrics do not "
                     "apply (nan)")
    for label, s in (("IoU > 0.5", ""), ("IoU > 0  ", "_iou0")):
        lines.append(f"lesion detection ({label}): TP {summary['lesions_tp' + s]}, FP {summary['lesions_fp' + s]}, "
                     f"FN {summary['lesions_fn' + s]}, precision {_fmt(summary['detection_precision' + s])}, "
                     f"recall {_fmt(summary['detection_recall' + s])}, F1 {_fmt(summary['detection_f1' + s])}")
    lines.append(f"  by each merged pair's own IoU > 0.5 (not the scorer's count): TP {summary['lesions_tp_pair_iou']}, "
                 f"FP {summary['lesions_fp_pair_iou']}, FN {summary['lesions_fn_pair_iou']}")
    lines.append(f"Dice of detected lesions: {_fmt(summary['lesion_dice_detected'])}")
    lines.append("recall by largest axial diameter: " + ", ".join(
        f"{name} {_fmt(summary['recall_' + name])} ({summary['detected_' + name]}/{summary['lesions_' + name]})"
        for name, _, _ in SIZE_CLASSES))
    lines.append(f"tumor burden error: RMSE {_fmt(summary['tumor_burden_rmse'])}, "
                 f"max {_fmt(summary['tumor_burden_max_error'])}")
    return "\n".join(lines)


def rows_to_csv(rows: Sequence[dict]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for r in rows:
        writer.writerow([r["case"]] + [format(float(r[c]), ".8g") for c in COLUMNS]
                        + [int(r[c]) for c in LESION_COLUMNS])
    return buf.getvalue()


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="LiTS metrics of predicted label volumes against the ground truth.")
    parser.add_argument("--pred", required=True, type=Path,
                        help="folder of predicted label volumes, one NIfTI per case named with its number")
    parser.add_argument("--gt", required=True, type=Path,
                        help="folder of ground-truth label volumes (segmentation-N.nii[.gz], labelsTr/liver_N.nii.gz), "
                             "or of 3D-IRCADb patients or CT series with DICOM SEG (case N: the last number of the "
                             "patient's folder, e.g. 3Dircadb1.17; predictions on the CT series' grid)")
    parser.add_argument("--output", type=Path, default=None,
                        help="CSV file for the per-case metrics (default: none, print the summary only)")
    parser.add_argument("--summary", type=Path, default=None,
                        help="JSON file for every aggregate over cases, NaN written as null (default: none)")
    parser.add_argument("--split-file", type=Path, default=None,
                        help="a run's splits.json (train.py writes it into its --output-dir): score only the cases "
                             "of one of its parts, matched by case number (default: every case in --gt)")
    parser.add_argument("--split", choices=("train", "val", "test"), default=None,
                        help="which part of --split-file to score (default: test)")
    add_dicom_arguments(parser)
    return parser


def split_case_numbers(split_file: Path, part: str) -> list[int]:
    """The case numbers of one part of a splits.json (volume-7 -> 7, liver_7 -> 7), to pair with the
    ground truth's file names."""
    from dataset import split_part  # only with --split-file: the dataset module brings torch
    numbers = []
    for case_id in split_part(split_file, part):
        n = case_number(case_id)
        if n is None:
            raise DataError(f"{split_file}: found case id {case_id!r} without a number; expected ids such as "
                            f"volume-7 or liver_7 (a split of LiTS or MSD volumes)")
        numbers.append(n)
    return numbers


def main(args: argparse.Namespace) -> int:
    outputs = [(flag, path) for flag, path in (("--output", args.output), ("--summary", args.summary)) if path]
    for flag, path in outputs:  # before the scoring, which takes minutes on LiTS
        check_output(path, flag)
    if len(outputs) == 2 and outputs[0][1].resolve() == outputs[1][1].resolve():
        raise DataError(f"{args.output}: found the same file for --output and --summary; expected two files")
    if args.split is not None and args.split_file is None:
        raise DataError(f"found --split {args.split} without --split-file; expected the run's splits.json too")
    cases = split_case_numbers(args.split_file, args.split or "test") if args.split_file is not None else None
    rows, summary = evaluate_folders(args.pred, args.gt, cases=cases, progress=True,
                                     dicom_options=options_from_args(args))
    if cases is not None:
        sys.stderr.write(f"scored the {len(cases)} {args.split or 'test'} case(s) of {args.split_file}\n")
    if summary["extra_predictions"]:
        sys.stderr.write(f"note: {summary['extra_predictions']} prediction file(s) in {args.pred} have no "
                         f"ground truth and were ignored\n")
    texts = {"--output": rows_to_csv(rows) if args.output else None,
             "--summary": json.dumps(json_safe(summary), indent=2, allow_nan=False) + "\n"}
    # Both files or neither: each is renamed into place only once both were written in full.
    writing = None
    try:
        with ExitStack() as stack:
            for flag, writing in outputs:
                ensure_folder(writing.parent)
                stack.enter_context(atomic_output(writing)).write_text(texts[flag])
    except OSError as exc:  # the disk filled, or the folder changed, since `check_output`
        raise DataError(f"{writing}: cannot write ({exc.strerror or exc}); expected a writable location") from None
    print(format_summary(summary))
    if args.output is not None:
        print(f"per-case metrics: {args.output}")
    if args.summary is not None:
        print(f"summary: {args.summary}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, get_args_parser()))
