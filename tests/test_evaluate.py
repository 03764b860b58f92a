"""evaluate.py: hand-computed metrics, an independent brute-force reference, lesion matching, the CLI."""
import csv
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.distance import cdist

import evaluate
import phantom

REPO = Path(__file__).resolve().parents[1]
NAN = float("nan")


def assert_metrics(got: dict, expected: dict, tol: float = 1e-9):
    for key, want in expected.items():
        if math.isnan(want):
            assert math.isnan(got[key]), f"{key}: got {got[key]}, expected nan"
        else:
            assert got[key] == pytest.approx(want, abs=tol), f"{key}: got {got[key]}, expected {want}"


# --------------------------------------------------------------------------------------------
# Hand-computed cases
# --------------------------------------------------------------------------------------------

def test_overlap_and_surface_by_hand_1x4x4():
    gt = np.array([[[0, 1, 1, 0],
                    [0, 1, 1, 0],
                    [0, 2, 2, 0],
                    [0, 0, 0, 0]]])
    pred = np.array([[[0, 1, 1, 1],
                      [0, 1, 1, 0],
                      [0, 1, 2, 0],
                      [0, 0, 0, 0]]])
    m = evaluate.case_metrics(pred, gt, (3.0, 2.0, 0.5))
    # Liver (label >= 1): |G| = 6, |P| = 7, |P & G| = 6, |P | G| = 7.
    # Dice = 12/13, VOE = 1 - 6/7 = 1/7, RVD = (7 - 6)/6 = 1/6.
    assert_metrics(m, {"dice_liver": 12 / 13, "voe_liver": 1 / 7, "rvd_liver": 1 / 6})
    # Tumor: G = {(0,2,1), (0,2,2)}, P = {(0,2,2)}: Dice = 2/3, VOE = 1 - 1/2, RVD = (1 - 2)/2.
    # A one-voxel-thick slab is all surface (axis 0 has no neighbours inside the array).
    # P -> G: (0,2,2) is on G's surface: 0. G -> P: (0,2,1) -> (0,2,2) one column = 0.5 mm, (0,2,2): 0.
    # Pooled {0, 0, 0.5}: ASSD = 0.5/3, MSSD = 0.5, RMSD = sqrt(0.25/3).
    assert_metrics(m, {"dice_tumor": 2 / 3, "voe_tumor": 0.5, "rvd_tumor": -0.5,
                       "assd_tumor": 0.5 / 3, "mssd_tumor": 0.5, "rmsd_tumor": math.sqrt(0.25 / 3)})


def test_overlap_by_hand_offset_cubes_5x5x5():
    gt = np.zeros((5, 5, 5), np.uint8)
    pred = np.zeros((5, 5, 5), np.uint8)
    gt[0:3, 0:3, 0:3] = 1    # 27 voxels
    pred[1:4, 1:4, 1:4] = 1  # 27 voxels; overlap [1:3]^3 = 8, union 27 + 27 - 8 = 46
    m = evaluate.case_metrics(pred, gt, (1.0, 1.0, 1.0))
    # Dice = 2*8/54 = 8/27, VOE = 1 - 8/46 = 19/23, RVD = 0 (same size).
    assert_metrics(m, {"dice_liver": 8 / 27, "voe_liver": 19 / 23, "rvd_liver": 0.0})
    # No tumor in either: the both-empty rule.
    assert_metrics(m, {f"{k}_tumor": v for k, v in
                       dict(dice=1, voe=0, rvd=0, assd=0, mssd=0, rmsd=0).items()})


def test_surface_distances_parallel_planes_anisotropic():
    gt = np.zeros((5, 3, 3), np.uint8)
    pred = np.zeros((5, 3, 3), np.uint8)
    gt[0] = 1
    pred[3] = 1
    # Every voxel of each plane is surface; each is 3 slices (3 * 2.0 mm) from the other plane.
    m = evaluate.case_metrics(pred, gt, (2.0, 1.0, 0.5))
    assert_metrics(m, {"dice_liver": 0.0, "voe_liver": 1.0, "rvd_liver": 0.0,
                       "assd_liver": 6.0, "mssd_liver": 6.0, "rmsd_liver": 6.0})


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_surface_distances_cubes_offset_by_one_voxel(axis):
    spacing = (2.0, 1.0, 0.5)
    s = spacing[axis]
    gt = np.zeros((6, 6, 6), np.uint8)
    gt[1:4, 1:4, 1:4] = 1
    pred = np.roll(gt, 1, axis=axis)
    # A 3x3x3 cube has 26 surface voxels (all but its centre). Shifted by one voxel along `axis`:
    # P -> G: the 9 voxels of P's far face are one step (s mm) from G's face; P's near-face centre is
    # G's centre (not on G's surface), whose nearest surface neighbour is 0.5 mm away (the smallest
    # spacing, axis 2); the other 16 lie on G's surface (0). G -> P is the mirror image.
    # Pooled over 52: 18 at s, 2 at 0.5, 32 at 0.
    m = evaluate.case_metrics(pred, gt, spacing)
    assert_metrics(m, {"dice_liver": 2 * 18 / 54, "voe_liver": 1 - 18 / 36, "rvd_liver": 0.0,
                       "assd_liver": (18 * s + 2 * 0.5) / 52, "mssd_liver": s,
                       "rmsd_liver": math.sqrt((18 * s * s + 2 * 0.25) / 52)})


# --------------------------------------------------------------------------------------------
# Surfaces: the 18-neighbourhood of the scorer, not the 6-neighbourhood
# --------------------------------------------------------------------------------------------

def offsets(n: int) -> list[tuple[int, int, int]]:
    """The 6 (face) or 18 (face and edge) neighbour offsets of a voxel, listed from their definition."""
    steps = [(a, b, c) for a in (-1, 0, 1) for b in (-1, 0, 1) for c in (-1, 0, 1)]
    return [o for o in steps if 1 <= sum(map(abs, o)) <= {6: 1, 18: 2}[n]]


SIX, EIGHTEEN = offsets(6), offsets(18)


def brute_surface(mask: np.ndarray, neighbours=EIGHTEEN) -> np.ndarray:
    """Mask voxels with a neighbour outside the mask or outside the array, one voxel at a time."""
    surf = np.zeros_like(mask)
    for idx in zip(*np.nonzero(mask)):
        for off in neighbours:
            nb = tuple(i + o for i, o in zip(idx, off))
            if any(n < 0 or n >= s for n, s in zip(nb, mask.shape)) or not mask[nb]:
                surf[idx] = True
                break
    return surf


def brute_region(p: np.ndarray, g: np.ndarray, spacing, neighbours=EIGHTEEN) -> dict:
    """The scorer's definitions: nearest-neighbour distances between the two surfaces (cdist), pooled."""
    n_p, n_g, inter = p.sum(), g.sum(), (p & g).sum()
    pts_p = np.argwhere(brute_surface(p, neighbours)) * np.asarray(spacing)
    pts_g = np.argwhere(brute_surface(g, neighbours)) * np.asarray(spacing)
    d = cdist(pts_p, pts_g)  # mm
    both = np.concatenate([d.min(axis=1), d.min(axis=0)])
    return dict(dice=2 * inter / (n_p + n_g), voe=1 - inter / (n_p + n_g - inter), rvd=(n_p - n_g) / n_g,
                assd=both.sum() / (len(pts_p) + len(pts_g)), mssd=both.max(),
                rmsd=np.sqrt((both ** 2).sum() / (len(pts_p) + len(pts_g))))


def notched_block() -> np.ndarray:
    """A 4x4x4 block (inside a 6x6x6 array) with the 2x2 column x < 2, y < 2 cut out along z: 48 voxels."""
    m = np.zeros((6, 6, 6), bool)
    m[1:5, 1:5, 1:5] = True
    m[1:3, 1:3, 1:5] = False
    return m


def test_surface_is_the_18_neighbourhood_by_hand():
    m = notched_block()
    assert m.sum() == 48
    # Each voxel has a face or an edge neighbour outside: all 48 are on the 18-neighbourhood surface.
    # Only (3, 3, 2) and (3, 3, 3) (block coordinates (2, 2, 1), (2, 2, 2)) have all six face
    # neighbours inside; their edge neighbours (2, 2, z) lie in the notch.
    assert evaluate.surface(m).sum() == 48
    six = m & ~ndimage.binary_erosion(m, structure=ndimage.generate_binary_structure(3, 1), border_value=0)
    assert six.sum() == 46 and not six[3, 3, 2] and not six[3, 3, 3]
    np.testing.assert_array_equal(evaluate.surface(m), brute_surface(m, EIGHTEEN))
    np.testing.assert_array_equal(six, brute_surface(m, SIX))


def test_distances_use_the_18_neighbourhood_with_anisotropic_spacing():
    spacing = (2.5, 0.7, 0.9)
    g = notched_block()
    p = np.zeros_like(g)
    p[1:5, 1:5, 1:5] = True  # the block without the notch
    got = evaluate.case_metrics(p.astype(np.uint8), g.astype(np.uint8), spacing)
    ref18, ref6 = brute_region(p, g, spacing, EIGHTEEN), brute_region(p, g, spacing, SIX)
    assert_metrics(got, {f"{k}_liver": float(v) for k, v in ref18.items()}, tol=1e-9)
    # The two definitions differ here, so this case tells them apart.
    assert abs(ref18["assd"] - ref6["assd"]) > 0.01 * ref18["assd"]
    assert abs(ref18["rmsd"] - ref6["rmsd"]) > 0.01 * ref18["rmsd"]


# --------------------------------------------------------------------------------------------
# Empty masks and the Dice rules
# --------------------------------------------------------------------------------------------

def _liver_with_tumor(tumor: bool) -> np.ndarray:
    v = np.zeros((4, 6, 6), np.uint8)
    v[1:3, 1:5, 1:5] = 1
    if tumor:
        v[1:3, 2:4, 2:4] = 2
    return v


def test_empty_both():
    z = np.zeros((4, 6, 6), np.uint8)
    m = evaluate.case_metrics(z, z, (1.0, 1.0, 1.0))
    assert m == {k: 0.0 if not k.startswith("dice") else 1.0 for k in evaluate.COLUMNS}


def test_empty_reference_nonempty_prediction():
    # The liver agrees; the prediction has a tumor the reference lacks.
    m = evaluate.case_metrics(_liver_with_tumor(True), _liver_with_tumor(False), (1.0, 1.0, 1.0))
    assert_metrics(m, {"dice_liver": 1.0, "assd_liver": 0.0,
                       "dice_tumor": 0.0, "voe_tumor": 1.0, "rvd_tumor": NAN,
                       "assd_tumor": NAN, "mssd_tumor": NAN, "rmsd_tumor": NAN})
    # No liver at all in the reference.
    m = evaluate.case_metrics(_liver_with_tumor(True), np.zeros((4, 6, 6), np.uint8), (1.0, 1.0, 1.0))
    assert_metrics(m, {"dice_liver": 0.0, "voe_liver": 1.0, "rvd_liver": NAN, "assd_liver": NAN,
                       "mssd_liver": NAN, "rmsd_liver": NAN})


def test_empty_prediction_nonempty_reference():
    m = evaluate.case_metrics(_liver_with_tumor(False), _liver_with_tumor(True), (1.0, 1.0, 1.0))
    assert_metrics(m, {"dice_liver": 1.0,
                       "dice_tumor": 0.0, "voe_tumor": 1.0, "rvd_tumor": -1.0,
                       "assd_tumor": NAN, "mssd_tumor": NAN, "rmsd_tumor": NAN})


def test_dice_rules_from_counts():
    # Per case: both empty is a perfect 1, one empty is 0.
    assert evaluate.dice_from_counts(0, 0, 0) == 1.0
    assert evaluate.dice_from_counts(0, 5, 0) == 0.0 and evaluate.dice_from_counts(0, 0, 5) == 0.0
    assert evaluate.dice_from_counts(3, 4, 5) == pytest.approx(6 / 9)
    np.testing.assert_allclose(evaluate.dice_from_counts([0, 3], [0, 4], [0, 5]), [1.0, 6 / 9])
    # A whole split: no reference at all means no Dice, even with predictions.
    assert math.isnan(evaluate.pooled_dice(0, 0, 0)) and math.isnan(evaluate.pooled_dice(0, 7, 0))
    assert evaluate.pooled_dice(0, 0, 5) == 0.0 and evaluate.pooled_dice(3, 4, 5) == pytest.approx(6 / 9)
    # Mean over cases: (1 + 0 + 6/9) / 3 when some case has the region; NaN when none has.
    assert evaluate.mean_case_dice([0, 0, 3], [0, 0, 4], [0, 5, 5]) == pytest.approx((1 + 0 + 6 / 9) / 3)
    assert math.isnan(evaluate.mean_case_dice([0, 0], [0, 4], [0, 0]))


def test_dice_counts_and_dice_global_by_hand():
    gt1, pred1 = _liver_with_tumor(True), _liver_with_tumor(False)  # liver 32 = 32; tumor |G| 8, |P| 0
    c1 = evaluate.dice_counts(pred1, gt1)
    assert c1 == {"intersection_liver": 32, "pred_liver": 32, "gt_liver": 32,
                  "intersection_tumor": 0, "pred_tumor": 0, "gt_tumor": 8}
    gt2 = _liver_with_tumor(True)
    pred2 = gt2.copy()
    pred2[1, 2, 2] = 1  # one tumor voxel missed: tumor |P| 7, |G| 8, |P & G| 7
    c2 = evaluate.dice_counts(pred2, gt2)
    # Tumor pooled: 2 * (0 + 7) / ((0 + 8) + (7 + 8)) = 14/23 (per-case mean would be (0 + 14/15)/2).
    assert evaluate.dice_global([c1, c2], "tumor") == pytest.approx(14 / 23)
    assert evaluate.dice_global([c1, c2], "liver") == 1.0
    # No tumor in any reference: not applicable, whether or not one was predicted.
    no_tumor = _liver_with_tumor(False)
    assert math.isnan(evaluate.dice_global([evaluate.dice_counts(no_tumor, no_tumor)], "tumor"))
    assert math.isnan(evaluate.dice_global([evaluate.dice_counts(_liver_with_tumor(True), no_tumor)], "tumor"))


def test_tumor_burden_by_hand():
    gt = np.zeros((2, 10, 10), np.uint8)
    gt[0] = 1
    gt[0, 0, :4] = 2            # 4 tumor of 100 liver (tumor included): 0.04
    pred = np.zeros_like(gt)
    pred[0, :5] = 1
    pred[0, 0, :5] = 2          # 5 of 50: 0.1
    assert evaluate.tumor_burden(gt) == pytest.approx(0.04) and evaluate.tumor_burden(pred) == pytest.approx(0.1)
    assert evaluate.burden_error(pred, gt) == pytest.approx(-0.06)        # reference minus prediction
    assert evaluate.burden_error(np.zeros_like(gt), gt) == pytest.approx(0.04)  # no liver predicted: burden 0
    assert math.isnan(evaluate.burden_error(pred, np.zeros_like(gt)))     # no reference liver: undefined
    scores = [evaluate.score_case(p, gt, (1.0, 1.0, 1.0), 0) for p in (pred, np.zeros_like(gt))]
    scores.append(evaluate.score_case(pred, np.zeros_like(gt), (1.0, 1.0, 1.0), 0))
    s = evaluate.summarize(scores)
    assert s["tumor_burden_rmse"] == pytest.approx(math.sqrt((0.06 ** 2 + 0.04 ** 2) / 2))
    assert s["tumor_burden_max_error"] == pytest.approx(0.06)  # of |e|: the over-estimate counts
    assert s["nan_tumor_burden"] == 1


# --------------------------------------------------------------------------------------------
# Lesion detection: labelling, merging, matching (the scorer's detect_lesions)
# --------------------------------------------------------------------------------------------

def detect(pred: np.ndarray, gt: np.ndarray, threshold: float = 0.5) -> tuple[int, int, int]:
    match = evaluate.match_lesions(*evaluate.label_lesions(pred), *evaluate.label_lesions(gt))
    return evaluate.detection_counts(match, threshold)


def line(n: int, *spans: tuple[int, int]) -> np.ndarray:
    """A 1x1xn volume with tumor (2) on the half-open spans given, liver (1) elsewhere."""
    v = np.ones((1, 1, n), np.uint8)
    for a, b in spans:
        v[0, 0, a:b] = 2
    return v


def _lesion_case():
    gt = np.ones((3, 12, 12), np.uint8)
    pred = np.ones((3, 12, 12), np.uint8)
    gt[0:2, 0:2, 0:2] = 2      # lesion A: 8 voxels
    pred[0:2, 0:2, 0:3] = 2    # A': 12 voxels, overlap 8 -> IoU 8/12 = 2/3 > 0.5: detected
    gt[0:2, 6:8, 6:8] = 2      # lesion B: 8 voxels
    pred[0:2, 7:9, 7:9] = 2    # B': 8 voxels, overlap 2 -> IoU 2/14 = 1/7: detected only at IoU > 0
    pred[2, 11, 0] = 2         # C: touches nothing: a false positive
    return pred, gt


def test_lesion_detection_by_hand():
    pred, gt = _lesion_case()
    assert detect(pred, gt) == (1, 2, 1)         # TP A; FP B' and C; FN B
    assert detect(pred, gt, 0.0) == (2, 1, 0)    # B' overlaps B at all
    assert evaluate.detection_rates(1, 2, 1) == (pytest.approx(1 / 3), 0.5, pytest.approx(2 / 5))


def test_one_prediction_spanning_two_lesions_is_one_detection():
    # Reference lesions [0, 4) and [5, 9), one voxel apart; one prediction [0, 9) covers both.
    # Both join the prediction's group: 8 voxels, overlap 8, union 9, IoU 8/9. One TP; the
    # scorer counts FN = 2 reference lesions - 1 TP = 1 and FP = 1 - 1 = 0.
    gt, pred = line(9, (0, 4), (5, 9)), line(9, (0, 9))
    assert detect(pred, gt) == (1, 0, 1)
    match = evaluate.match_lesions(*evaluate.label_lesions(pred), *evaluate.label_lesions(gt))
    (pair,) = match.pairs
    assert pair.ref_ids == (1, 2) and pair.pred_ids == (1,)
    assert pair.iou == pytest.approx(8 / 9) and pair.dice == pytest.approx(16 / 17)


def test_one_lesion_predicted_in_two_pieces_is_one_detection():
    # Reference [0, 9); predictions [0, 4) and [5, 9). Both pieces go to the one lesion and are merged:
    # overlap 8, union 9, IoU 8/9: one TP; FP = 2 predicted lesions - 1 TP = 1 (the scorer's count).
    gt, pred = line(9, (0, 9)), line(9, (0, 4), (5, 9))
    assert detect(pred, gt) == (1, 1, 0)


def test_prediction_goes_to_the_lesion_it_overlaps_most():
    # g1 = [0, 3), g2 = [4, 24); p1 = [0, 10) overlaps g1 by 3 and g2 by 6; p2 = [11, 23) overlaps g2 by 12.
    # g1's best prediction is p1, g2's is p2: no reference merge. p1 overlaps g2 (6) more than g1 (3), so
    # p1 and p2 both go to g2 and are merged: overlap 18, union 20 + 22 - 18 = 24, IoU 3/4. g1 receives
    # nothing: missed although p1 covers it. TP 1, FP 2 - 1, FN 2 - 1.
    gt, pred = line(30, (0, 3), (4, 24)), line(30, (0, 10), (11, 23))
    assert detect(pred, gt) == (1, 1, 1)
    assert detect(pred, gt, 0.0) == (1, 1, 1)


# The scorer's detect_lesions worked by hand (PatrickChrist/lits-challenge-scoring,
# program/helpers/calc_metric.py). Its steps, in its own terms:
#   1. For each prediction p in id order, the reference lesions whose largest overlap (first on a tie)
#      is with p are merged into one group, named by its lowest id; g_merge_count of each = group size.
#   2. Each prediction keeps only its largest overlap with a (merged) reference group.
#   3. The predictions kept by one group are merged, named by their lowest id, and painted into
#      `detected_mask` with the *group's* name.
#   4. num_detected = number of merged pairs; for each pair (p, g) in the order of p:
#      overlap / |detected_mask == p  or  reference group g| <= t -> erase detected_mask == g and
#      num_detected -= g_merge_count[g].
#   TP = num_detected, FP = predicted lesions - TP, FN = reference lesions - TP.
# `line` lesions are numbered left to right (scipy's raster order).

def pair_counts(pred: np.ndarray, gt: np.ndarray, threshold: float = 0.5) -> tuple[int, int, int]:
    match = evaluate.match_lesions(*evaluate.label_lesions(pred), *evaluate.label_lesions(gt))
    return evaluate.pair_detection_counts(match, threshold)


def test_scorer_two_small_lesions_under_one_large_prediction_count_below_zero():
    # g1 = [0, 2), g2 = [3, 5); p1 = [0, 10), 10 voxels. I(p1, g1) = I(p1, g2) = 2.
    # 1. Both have their largest overlap with p1: merged into group 1, g_merge_count 2.
    # 2-3. p1 keeps group 1; p1's voxels are painted 1.
    # 4. Pair (p 1, g 1): overlap 4, union |painted == 1 (p1) or group 1| = 10: 0.4 <= 0.5, fails:
    #    num_detected = 1 pair - 2 = -1. TP -1, FP 1 - (-1) = 2, FN 2 - (-1) = 3.
    #    At IoU > 0: 0.4 > 0 passes: TP 1, FP 0, FN 1.
    gt, pred = line(12, (0, 2), (3, 5)), line(12, (0, 10))
    assert detect(pred, gt) == (-1, 2, 3)
    assert detect(pred, gt, 0.0) == (1, 0, 1)
    assert pair_counts(pred, gt) == (0, 1, 2)  # by the pair's own IoU 0.4: missed, never below zero
    # The same two lesions under p1 = [0, 5): overlap 4, union 5, 0.8: one TP, the other lesion an FN.
    assert detect(line(12, (0, 5)), gt) == (1, 0, 1)


def test_scorer_one_lesion_split_by_two_predictions():
    # g1 = [0, 10); p1 = [0, 2), p2 = [5, 7), I = 2 each.
    # 1. g1's largest overlap: a tie, the first row wins: p1; group 1 alone, g_merge_count 1.
    # 2-3. p1 and p2 both keep group 1, merged as 1, painted 1.
    # 4. Pair (1, 1): overlap 4, union |p1 + p2 or g1| = 10: 0.4, fails: num_detected 1 - 1 = 0.
    #    TP 0, FP 2, FN 1.
    gt = line(10, (0, 10))
    assert detect(line(10, (0, 2), (5, 7)), gt) == (0, 2, 1)
    # p1 = [0, 3), p2 = [5, 8): overlap 6, union 10: 0.6, detected: TP 1, FP 2 - 1, FN 0.
    assert detect(line(10, (0, 3), (5, 8)), gt) == (1, 1, 0)


def test_scorer_union_reads_prediction_ids_in_a_mask_of_reference_ids():
    # g1 = [0, 2) (no prediction touches it), g2 = [5, 15), 10 voxels; p1 = [4, 26), 22 voxels.
    # 1-3. g2's only overlap is p1: group 2; p1 keeps it and is painted 2.
    # 4. Pair (p 1, g 2): overlap 10; union |painted == 1 or group 2|: nothing is painted 1, so the
    #    union is g2 alone, 10: 1.0 > 0.5, detected. TP 1, FP 0, FN 1.
    #    The pair's own IoU is 10 / 22: missed (TP 0, FP 1, FN 2).
    gt, pred = line(30, (0, 2), (5, 15)), line(30, (4, 26))
    assert detect(pred, gt) == (1, 0, 1)
    assert pair_counts(pred, gt) == (0, 1, 2)
    s = evaluate.summarize([evaluate.score_case(pred, gt, (1.0, 1.0, 1.0), 0)])
    assert (s["lesions_tp"], s["lesions_fp"], s["lesions_fn"]) == (1, 0, 1)
    assert (s["lesions_tp_pair_iou"], s["lesions_fp_pair_iou"], s["lesions_fn_pair_iou"]) == (0, 1, 2)
    assert s["lesion_dice_detected"] == pytest.approx(2 * 10 / 32)  # the scorer's detected pair


def test_scorer_chain_of_partial_overlaps():
    # g1 = [0, 2) (untouched), g2 = [4, 12) 8 voxels, g3 = [14, 18) 4, g4 = [26, 30) 4;
    # p1 = [3, 7) 4 voxels, p2 = [14, 24) 10, p3 = [26, 30) 4.
    # I(p1, g2) = 3, I(p2, g3) = 4, I(p3, g4) = 4, no other overlap.
    # 1-3. Groups 2, 3, 4 of one lesion each; p1 painted 2, p2 painted 3, p3 painted 4.
    # 4. num_detected = 3, then in the order of p:
    #    (p 1, g 2): overlap 3, union |painted == 1 (none) or g2| = 8: 0.375, fails: erase painted 2 (p1),
    #                num_detected 2.
    #    (p 2, g 3): overlap 4, union |painted == 2 (p1, erased: none) or g3| = 4: 1.0, detected.
    #    (p 3, g 4): overlap 4, union |painted == 3 (p2, 10) or g4 (4)| = 14: 0.29, fails: num_detected 1.
    # TP 1, FP 3 - 1 = 2, FN 4 - 1 = 3: g3 detected (own IoU 0.4), g4 missed (own IoU 1.0).
    gt = line(32, (0, 2), (4, 12), (14, 18), (26, 30))
    pred = line(32, (3, 7), (14, 24), (26, 30))
    match = evaluate.match_lesions(*evaluate.label_lesions(pred), *evaluate.label_lesions(gt))
    assert [(p.pred_ids, p.ref_ids) for p in match.pairs] == [((1,), (2,)), ((2,), (3,)), ((3,), (4,))]
    assert evaluate.scorer_detected(match, 0.5) == (False, True, False)
    assert evaluate.detection_counts(match, 0.5) == (1, 2, 3)
    assert [p.iou > 0.5 for p in match.pairs] == [False, False, True]
    assert evaluate.pair_detection_counts(match, 0.5) == (1, 2, 3)  # the same totals, another lesion
    assert evaluate.detection_counts(match, 0.0) == (3, 0, 1)


def test_lesions_touching_at_a_corner_or_an_edge_are_two():
    gt = np.zeros((2, 2, 2), np.uint8)
    gt[0, 0, 0] = gt[1, 1, 1] = 2  # corner contact only
    assert evaluate.label_lesions(gt)[1] == 2
    edge = np.zeros((1, 2, 2), np.uint8)
    edge[0, 0, 0] = edge[0, 1, 1] = 2  # edge contact only
    assert evaluate.label_lesions(edge)[1] == 2
    assert detect(gt, gt) == (2, 0, 0)
    half = np.zeros_like(gt)
    half[0, 0, 0] = 2
    assert detect(half, gt) == (1, 0, 1)


@pytest.mark.parametrize("end, iou, detected", [
    (10, 10 / 20, False),  # half of it: IoU 0.5 exactly, not > 0.5
    (11, 11 / 20, True),
    (40, 20 / 40, False),  # all of it and as much again: 0.5
    (39, 20 / 39, True),
])
def test_iou_just_under_and_just_over_one_half(end, iou, detected):
    gt, pred = line(60, (0, 20)), line(60, (0, end))
    match = evaluate.match_lesions(*evaluate.label_lesions(pred), *evaluate.label_lesions(gt))
    (pair,) = match.pairs
    assert pair.iou == pytest.approx(iou)
    assert detect(pred, gt) == ((1, 0, 0) if detected else (0, 1, 1))
    assert detect(pred, gt, 0.0) == (1, 0, 0)


def test_detection_without_lesions():
    pred, gt = _lesion_case()
    none = np.ones_like(gt)
    assert detect(none, none) == (0, 0, 0)
    assert detect(pred, none) == (0, 3, 0)
    assert detect(none, gt) == (0, 0, 2)
    nan = (NAN, NAN, NAN)
    for counts, expected in (((0, 0, 0), nan), ((0, 3, 0), (0.0, NAN, 0.0)), ((0, 0, 2), (NAN, 0.0, 0.0))):
        for got, want in zip(evaluate.detection_rates(*counts), expected):
            assert (math.isnan(got) and math.isnan(want)) or got == want, (counts, got, want)


def scorer_procedure(pred: np.ndarray, gt: np.ndarray, threshold: float) -> tuple[int, int, int]:
    """The scorer's detect_lesions and its TP/FP/FN, re-done the way it works: a dense overlap matrix
    whose columns (reference lesions) and rows (predictions) are merged in label order, the merged
    predictions painted into a mask under their reference group's id, and each pair's union counted
    on that mask as the scorer counts it: the voxels holding the pair's lowest *prediction* id."""
    pl, n_p = ndimage.label(pred == 2)
    gl, n_g = ndimage.label(gt == 2)
    if n_g == 0:
        return 0, n_p, 0
    p_list = [p for p in range(1, n_p + 1) if ((pl == p) & (gl > 0)).any()]
    g_list = list(range(1, n_g + 1))
    merged_ref = gl.copy()
    group_size = {g: 1 for g in g_list}
    inter = np.array([[np.sum((pl == p) & (gl == g)) for g in g_list] for p in p_list],
                     dtype=np.int64).reshape(len(p_list), n_g)
    for i in range(len(p_list)):  # references spanned by prediction i, and best overlapped by it
        cols = [j for j in np.flatnonzero(inter[i]) if np.argmax(inter[:, j]) == i]
        names = [g_list[j] for j in cols]
        for g in names:
            group_size[g] = len(names)
            merged_ref[merged_ref == g] = names[0]
        if len(cols) > 1:
            inter[:, cols[0]] = inter[:, cols].sum(axis=1)
            inter = np.delete(inter, cols[1:], axis=1)
            g_list = [g for j, g in enumerate(g_list) if j not in cols[1:]]
    kept = np.zeros_like(inter)
    if len(p_list):
        best = np.argmax(inter, axis=1)
        kept[np.arange(len(p_list)), best] = inter[np.arange(len(p_list)), best]
    painted = np.zeros_like(pl)  # merged predictions under their reference group's id
    rows_of = []
    for j, g in enumerate(g_list):
        rows = np.flatnonzero(kept[:, j])
        for r in rows:
            painted[pl == p_list[r]] = g
        if len(rows):
            rows_of.append((p_list[rows[0]], g, int(kept[rows, j].sum())))
    detected = len(rows_of)
    for p_name, g, overlap in sorted(rows_of):
        union = np.sum((painted == p_name) | (merged_ref == g))
        if overlap / union <= threshold:
            painted[painted == g] = 0
            detected -= group_size[g]
    return detected, n_p - detected, n_g - detected


def random_lesions(rng, shape) -> np.ndarray:
    """Liver everywhere, tumor where smoothed noise is high: many lesions of all shapes."""
    lab = np.ones(shape, np.uint8)
    lab[ndimage.gaussian_filter(rng.standard_normal(shape), 1.0) > 0.25] = 2
    return lab


@pytest.mark.parametrize("seed", range(8))
def test_detection_matches_the_scorer_procedure_on_random_lesions(seed):
    rng = np.random.default_rng(seed)
    shape = (8, 16, 16)
    gt = random_lesions(rng, shape)
    pred = gt.copy()
    noise = ndimage.gaussian_filter(rng.standard_normal(shape), 1.0)
    pred[noise > 0.2] = 1                                     # split and shrink lesions
    pred[(noise < -0.3) | (random_lesions(rng, shape) == 2) & (noise < 0)] = 2  # grow, merge, add
    n_g = evaluate.label_lesions(gt)[1]
    assert n_g >= 3
    for threshold in (0.5, 0.0):
        assert detect(pred, gt, threshold) == scorer_procedure(pred, gt, threshold), threshold


def test_predict_segmentation_scores_with_these_definitions():
    import predict_segmentation
    pred, gt = _lesion_case()
    got = predict_segmentation.score(pred, gt, nib.Nifti1Image(gt, np.diag([2.5, 0.7, 0.7, 1.0])))
    assert (got["lesions_tp"], got["lesions_fp"], got["lesions_fn"]) == (1, 2, 1)  # as worked out in _lesion_case
    # Tumor: A (8 voxels) and B (8) against A' (12), B' (8), C (1): |P & G| = 8 + 2 = 10, Dice 20 / 37.
    assert got["dice_tumor"] == pytest.approx(20 / 37)


# --------------------------------------------------------------------------------------------
# Lesion size classes
# --------------------------------------------------------------------------------------------

def brute_diameters(ids: np.ndarray, num: int, spacing, axial_axis: int) -> list[float]:
    """All pairs of voxel centres of a lesion in each axial slice, by cdist."""
    out = []
    for i in range(1, num + 1):
        best = 0.0
        for z in range(ids.shape[axial_axis]):
            pts = np.argwhere(np.take(ids, z, axis=axial_axis) == i)
            if len(pts) > 1:
                sp = [s for ax, s in enumerate(spacing) if ax != axial_axis]
                best = max(best, cdist(pts * sp, pts * sp).max())
        out.append(best)
    return out


def test_size_classes_by_hand():
    # Axial axis 0, 0.5 mm pixels: a row of n pixels spans (n - 1) * 0.5 mm.
    gt = np.ones((25, 8, 50), np.uint8)
    gt[1, 0, 0:20] = 2     # 9.5 mm: lt10mm
    gt[1, 2, 0:21] = 2     # 10.0 mm: 10to20mm (10 and 20 belong to the middle class)
    gt[1, 4, 0:41] = 2     # 20.0 mm: 10to20mm
    gt[1, 6, 0:42] = 2     # 20.5 mm: gt20mm
    gt[3:23, 7, 49] = 2    # 20 slices long (50 mm along z) but one pixel per slice: 0 mm, lt10mm
    ids, n = evaluate.label_lesions(gt)
    diameters = evaluate.largest_axial_diameters(ids, n, (2.5, 0.5, 0.5), axial_axis=0)
    assert sorted(diameters.tolist()) == [0.0, 9.5, 10.0, 20.0, 20.5]
    assert [evaluate.size_class(d) for d in (0.0, 9.5, 10.0, 20.0, 20.5)] == \
        ["lt10mm", "lt10mm", "10to20mm", "10to20mm", "gt20mm"]
    # Detect the 9.5 mm and the 20.5 mm lesions only.
    pred = np.ones_like(gt)
    pred[1, 0, 0:20] = pred[1, 6, 0:42] = 2
    s = evaluate.summarize([evaluate.score_case(pred, gt, (2.5, 0.5, 0.5), axial_axis=0)])
    assert (s["lesions_lt10mm"], s["detected_lt10mm"], s["recall_lt10mm"]) == (2, 1, 0.5)
    assert (s["lesions_10to20mm"], s["detected_10to20mm"], s["recall_10to20mm"]) == (2, 0, 0.0)
    assert (s["lesions_gt20mm"], s["detected_gt20mm"], s["recall_gt20mm"]) == (1, 1, 1.0)


@pytest.mark.parametrize("axial_axis", [0, 2])
def test_diameters_match_brute_force(axial_axis):
    rng = np.random.default_rng(3)
    gt = random_lesions(rng, (6, 14, 12))
    ids, n = evaluate.label_lesions(gt)
    spacing = (1.7, 0.6, 0.9)
    np.testing.assert_allclose(evaluate.largest_axial_diameters(ids, n, spacing, axial_axis),
                               brute_diameters(ids, n, spacing, axial_axis), atol=1e-12)


def test_summary_of_detection_and_detected_lesion_dice():
    pred1, gt1 = _lesion_case()                        # Dice of A: 2*8/(12+8) = 0.8
    gt2, pred2 = line(9, (0, 4), (5, 9)), line(9, (0, 9))  # merged pair: 16/17
    scores = [evaluate.score_case(pred1, gt1, (1.0, 1.0, 1.0), 0), evaluate.score_case(pred2, gt2, (1.0, 1.0, 1.0), 0)]
    assert {k: scores[0].row[k] for k in evaluate.LESION_COLUMNS} == {"lesions_tp": 1, "lesions_fp": 2, "lesions_fn": 1}
    s = evaluate.summarize(scores)
    assert (s["lesions_reference"], s["lesions_predicted"]) == (4, 4)
    assert (s["lesions_tp"], s["lesions_fp"], s["lesions_fn"]) == (2, 2, 2)
    assert (s["lesions_tp_iou0"], s["lesions_fp_iou0"], s["lesions_fn_iou0"]) == (3, 1, 1)
    assert s["detection_precision"] == s["detection_recall"] == s["detection_f1"] == 0.5
    assert s["detection_recall_iou0"] == pytest.approx(0.75)
    assert s["lesion_dice_detected"] == pytest.approx((0.8 + 16 / 17) / 2)
    # No lesion detected anywhere: 0 (something was there); no reference lesion anywhere: not applicable.
    missed = evaluate.summarize([evaluate.score_case(np.ones_like(gt1), gt1, (1.0, 1.0, 1.0), 0)])
    assert missed["lesion_dice_detected"] == 0.0 and missed["detection_recall"] == 0.0
    clean = evaluate.summarize([evaluate.score_case(pred1, np.ones_like(gt1), (1.0, 1.0, 1.0), 0)])
    assert math.isnan(clean["lesion_dice_detected"]) and math.isnan(clean["detection_recall"])
    assert clean["detection_precision"] == 0.0
    # ... and no tumor Dice of any kind.
    assert math.isnan(clean["dice_global_tumor"]) and math.isnan(clean["mean_dice_tumor"])
    assert clean["nan_dice_tumor"] == 1 and clean["mean_dice_liver"] == 1.0


# --------------------------------------------------------------------------------------------
# Against an independent brute-force computation
# --------------------------------------------------------------------------------------------

def random_labels(rng, shape, shift=(0, 0, 0)) -> np.ndarray:
    """Liver and tumor blobs from thresholded smoothed noise; they reach the volume's faces."""
    liver = ndimage.gaussian_filter(rng.standard_normal(shape), 1.5, mode="wrap") > 0.0
    tumor = liver & (ndimage.gaussian_filter(rng.standard_normal(shape), 1.2, mode="wrap") > 0.05)
    lab = liver.astype(np.uint8) + tumor
    return np.roll(lab, shift, axis=(0, 1, 2))


@pytest.mark.parametrize("seed", range(6))
def test_matches_brute_force_on_random_blobs(seed):
    rng = np.random.default_rng(seed)
    shape, spacing = (12, 10, 8), (2.0, 0.7, 1.3)
    gt = random_labels(rng, shape)
    pred = gt.copy()
    noise = ndimage.gaussian_filter(rng.standard_normal(shape), 1.0)
    pred[(noise > 0.25) & (gt >= 1)] = 0           # carve liver away
    pred[(noise < -0.25) & (gt == 0)] = 1          # add false liver
    pred[(noise > 0.1) & (gt == 1)] = 2            # tumor where there is none
    got = evaluate.case_metrics(pred, gt, spacing)
    for region, (p, g) in {"liver": (pred >= 1, gt >= 1), "tumor": (pred == 2, gt == 2)}.items():
        assert p.any() and g.any()
        # The blobs touch the volume's faces, so the crop box meets the array border there.
        assert any(m.take(0, ax).any() or m.take(-1, ax).any() for m in (p, g) for ax in range(3))
        ref = brute_region(p, g, spacing)
        assert_metrics(got, {f"{k}_{region}": float(v) for k, v in ref.items()}, tol=1e-6)


def test_crop_gives_the_same_distances_as_no_crop():
    rng = np.random.default_rng(7)
    spacing = (2.0, 1.0, 0.5)
    # Small blobs squeezed into opposite corners, plus one in the middle: the padded crop box is clipped
    # by the array at some faces and not at others.
    g = np.zeros((12, 10, 8), bool)
    p = np.zeros((12, 10, 8), bool)
    g[:3, :3, :2] = rng.random((3, 3, 2)) > 0.3
    g[5:8, 4:7, 3:5] = True
    p[-3:, -2:, -3:] = rng.random((3, 2, 3)) > 0.3
    p[6:9, 4:6, 3:6] = True
    g[0, 0, 0] = p[-1, -1, -1] = True
    d_crop = np.sort(evaluate.surface_distances(p, g, spacing, crop=True))
    d_full = np.sort(evaluate.surface_distances(p, g, spacing, crop=False))
    np.testing.assert_allclose(d_crop, d_full, atol=1e-12)
    # And an interior pair whose padded box does not touch the border.
    g2, p2 = np.zeros((12, 10, 8), bool), np.zeros((12, 10, 8), bool)
    g2[4:7, 3:6, 2:5] = True
    p2[5:8, 3:5, 3:6] = True
    np.testing.assert_allclose(np.sort(evaluate.surface_distances(p2, g2, spacing, crop=True)),
                               np.sort(evaluate.surface_distances(p2, g2, spacing, crop=False)), atol=1e-12)
    ref = brute_region(p, g, spacing)
    got = evaluate.case_metrics(p.astype(np.uint8), g.astype(np.uint8), spacing)
    assert_metrics(got, {f"{k}_liver": float(v) for k, v in ref.items()}, tol=1e-6)


# --------------------------------------------------------------------------------------------
# Folders and the command line
# --------------------------------------------------------------------------------------------

PRED_NAMES = ["prediction-{}.nii", "test-segmentation-{}.nii", "volume-{}_seg.nii"]


@pytest.fixture
def folders(tmp_path: Path):
    """Three phantom cases (48 px, 2 lesions each) in LiTS layout, and predictions = copies of the gt."""
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    pred_dir.mkdir()
    for i in range(3):
        _, seg = phantom.write_phantom_case(gt_dir, i, size=48, seed=0, num_tumors=2)
        shutil.copy(seg, pred_dir / PRED_NAMES[i].format(i))
    return pred_dir, gt_dir


def read_labels(path: Path):
    img = nib.load(str(path))
    return np.asarray(img.dataobj), img


def save_labels(path: Path, data: np.ndarray, affine: np.ndarray):
    nib.save(nib.Nifti1Image(np.ascontiguousarray(data), affine), str(path))


def test_cli_perfect_predictions(folders, tmp_path):
    pred_dir, gt_dir = folders
    out = tmp_path / "results" / "metrics.csv"
    res = subprocess.run([sys.executable, "evaluate.py", "--pred", str(pred_dir), "--gt", str(gt_dir),
                          "--output", str(out)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "precision 1.0000, recall 1.0000, F1 1.0000" in res.stdout
    assert "Dice global" in res.stdout
    with open(out, newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["case", "dice_liver", "voe_liver", "rvd_liver", "assd_liver", "mssd_liver", "rmsd_liver",
                       "dice_tumor", "voe_tumor", "rvd_tumor", "assd_tumor", "mssd_tumor", "rmsd_tumor",
                       "lesions_tp", "lesions_fp", "lesions_fn"]
    assert [r[0] for r in rows[1:]] == ["0", "1", "2"]
    for r in rows[1:]:
        values = dict(zip(rows[0][1:], map(float, r[1:])))
        assert values["dice_liver"] == values["dice_tumor"] == 1.0
        assert all(v == 0.0 for k, v in values.items() if not k.startswith("dice") and not k.startswith("lesions"))
        assert values["lesions_tp"] >= 1 and values["lesions_fp"] == values["lesions_fn"] == 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["metrics.csv"]  # no temporary left over


def test_degraded_prediction(folders, capsys):
    pred_dir, gt_dir = folders
    gt, img = read_labels(gt_dir / "segmentation-1.nii")
    assert (gt == 2).any()
    bad = gt.copy()
    bad[bad == 2] = 1                                                  # every lesion missed
    bad[ndimage.binary_erosion(bad >= 1) ^ (bad >= 1)] = 0             # liver one voxel too thin
    save_labels(pred_dir / PRED_NAMES[1].format(1), bad, img.affine)
    # Expected values from the files with numpy and scipy alone.
    lesions_1 = ndimage.label(gt == 2)[1]  # face-connected, scipy's default
    inter = total = 0
    for i in range(3):
        g = read_labels(gt_dir / f"segmentation-{i}.nii")[0] >= 1
        p = (bad >= 1) if i == 1 else g
        inter, total = inter + np.sum(p & g), total + np.sum(p) + np.sum(g)
    dice_global_liver = 2 * inter / total

    rows, summary = evaluate.evaluate_folders(pred_dir, gt_dir)
    assert [r["case"] for r in rows] == [0, 1, 2]
    assert set(rows[1]) == set(evaluate.CSV_COLUMNS)
    r1 = rows[1]
    assert 0.0 < r1["dice_liver"] < 1.0 and r1["rvd_liver"] < 0.0 and r1["assd_liver"] > 0.0
    assert_metrics(r1, {"dice_tumor": 0.0, "voe_tumor": 1.0, "rvd_tumor": -1.0, "assd_tumor": NAN})
    assert rows[0]["dice_tumor"] == rows[2]["dice_tumor"] == 1.0
    assert summary["cases"] == 3
    assert (r1["lesions_tp"], r1["lesions_fp"], r1["lesions_fn"]) == (0, 0, lesions_1)
    assert summary["nan_assd_tumor"] == 1 and summary["mean_assd_tumor"] == 0.0  # the NaN left out
    assert summary["mean_dice_tumor"] == pytest.approx(2 / 3)
    assert summary["dice_global_liver"] == pytest.approx(dice_global_liver) and dice_global_liver < 1.0
    assert summary["lesions_fn"] == lesions_1 and summary["lesions_fp"] == 0
    assert summary["detection_precision"] == 1.0
    assert summary["detection_recall"] == pytest.approx(summary["lesions_tp"] / (summary["lesions_tp"] + lesions_1))
    assert summary["lesion_dice_detected"] == 1.0  # the lesions of cases 0 and 2, found exactly
    assert summary["tumor_burden_max_error"] == pytest.approx(np.sum(gt == 2) / np.sum(gt >= 1))  # case 1: burden 0

    rc = evaluate.run_cli(evaluate.main, evaluate.get_args_parser(),
                          ["--pred", str(pred_dir), "--gt", str(gt_dir)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "left out: liver 0, tumor 1" in printed and f"FN {lesions_1}" in printed


def test_summary_json_holds_every_aggregate(folders, tmp_path):
    pred_dir, gt_dir = folders
    out = tmp_path / "out" / "summary.json"
    rc = evaluate.run_cli(evaluate.main, evaluate.get_args_parser(),
                          ["--pred", str(pred_dir), "--gt", str(gt_dir), "--summary", str(out)])
    assert rc == 0
    saved = json.loads(out.read_text())
    _, summary = evaluate.evaluate_folders(pred_dir, gt_dir)
    assert saved == evaluate.json_safe(summary)
    for key in ("dice_global_tumor", "mean_assd_liver", "lesions_tp_iou0", "lesions_tp_pair_iou", "detection_f1",
                "lesion_dice_detected",
                "recall_lt10mm", "tumor_burden_rmse", "tumor_burden_max_error"):
        assert key in saved, key
    assert sorted(p.name for p in out.parent.iterdir()) == ["summary.json"]


def test_liver_only_data_has_no_tumor_dice(tmp_path, capsys):
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    pred_dir.mkdir()
    for i in range(2):
        _, seg = phantom.write_phantom_case(gt_dir, i, size=32, seed=1, num_tumors=0)
        shutil.copy(seg, pred_dir / f"prediction-{i}.nii")
    rc = evaluate.run_cli(evaluate.main, evaluate.get_args_parser(),
                          ["--pred", str(pred_dir), "--gt", str(gt_dir), "--summary", str(tmp_path / "s.json")])
    assert rc == 0
    saved = json.loads((tmp_path / "s.json").read_text())
    assert saved["dice_global_liver"] == saved["mean_dice_liver"] == 1.0
    for key in ("dice_global_tumor", "mean_dice_tumor", "detection_recall", "lesion_dice_detected"):
        assert saved[key] is None, key  # NaN, written as null: not applicable
    assert "no reference tumor in any case" in capsys.readouterr().out


def test_pairs_msd_layout_and_ignores_volumes(tmp_path):
    root, pred_dir = tmp_path / "Task03_Liver", tmp_path / "pred"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    pred_dir.mkdir()
    lab = np.zeros((4, 5, 6), np.uint8)
    lab[1:3, 1:4, 1:5] = 1
    for n in (3, 10):
        save_labels(root / "imagesTr" / f"liver_{n}.nii.gz", lab.astype(np.int16) * 60, np.eye(4))
        save_labels(root / "labelsTr" / f"liver_{n}.nii.gz", lab, np.eye(4))
        save_labels(pred_dir / f"liver_{n}.nii.gz", lab, np.eye(4))
    save_labels(pred_dir / "prediction-99.nii.gz", lab, np.eye(4))  # no ground truth: ignored
    assert evaluate.case_number("volume-3_seg.nii.gz") == 3
    assert evaluate.case_number("test-segmentation-12.nii") == 12
    pairs, extra = evaluate.pair_files(pred_dir, root)
    assert [(n, g.parent.name) for n, _, g in pairs] == [(3, "labelsTr"), (10, "labelsTr")]
    assert [p.name for p in extra] == ["prediction-99.nii.gz"]
    rows, summary = evaluate.evaluate_folders(pred_dir, root)
    assert [r["dice_liver"] for r in rows] == [1.0, 1.0] and summary["extra_predictions"] == 1
    # The slices are axial across the array axis that runs head to foot, wherever the affine puts it.
    assert evaluate.load_pair(pred_dir / "liver_3.nii.gz", root / "labelsTr" / "liver_3.nii.gz")[3] == 2
    tilted = np.array([[0, 0, 2.5, 0], [0, 0.8, 0, 0], [0.8, 0, 0, 0], [0, 0, 0, 1]])
    save_labels(tmp_path / "a.nii.gz", lab, tilted)
    assert evaluate.load_pair(tmp_path / "a.nii.gz", tmp_path / "a.nii.gz")[3] == 0


def _missing(pred_dir, gt_dir):
    (pred_dir / PRED_NAMES[2].format(2)).unlink()
    return "no prediction for case 2"


def _shape(pred_dir, gt_dir):
    gt, img = read_labels(gt_dir / "segmentation-1.nii")
    save_labels(pred_dir / PRED_NAMES[1].format(1), gt[:, :, :-1], img.affine)
    return "expected (48, 48"


def _flipped(pred_dir, gt_dir):
    # The same anatomy stored in reverse order along x with an affine that says so: the classic
    # prediction written in another orientation. Same shape, different voxel grid.
    gt, img = read_labels(gt_dir / "segmentation-0.nii")
    affine = img.affine.copy()
    affine[:3, 3] += affine[:3, 0] * (gt.shape[0] - 1)
    affine[:3, 0] *= -1
    save_labels(pred_dir / PRED_NAMES[0].format(0), np.flip(gt, 0), affine)
    return "affine differs"


def _corrupt(pred_dir, gt_dir):
    path = pred_dir / PRED_NAMES[1].format(1)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return "cannot read NIfTI"


def _labels(pred_dir, gt_dir):
    gt, img = read_labels(gt_dir / "segmentation-2.nii")
    bad = gt.copy()
    bad[0, 0, 0] = 3
    save_labels(pred_dir / PRED_NAMES[2].format(2), bad, img.affine)
    return "found label values {0, 1, 2, 3}"


def _empty_gt(pred_dir, gt_dir):
    shutil.rmtree(gt_dir)
    gt_dir.mkdir()
    (gt_dir / "notes.txt").write_text("no labels here")
    return "found no NIfTI files"


@pytest.mark.parametrize("breaker", [_missing, _shape, _flipped, _corrupt, _labels, _empty_gt],
                         ids=["missing-prediction", "shape-mismatch", "affine-flipped", "corrupt-file",
                              "labels-outside-0-1-2", "empty-gt-dir"])
def test_cli_bad_input_exits_2_with_one_line(folders, tmp_path, capsys, breaker):
    pred_dir, gt_dir = folders
    expected = breaker(pred_dir, gt_dir)
    out_dir = tmp_path / "results"
    out_dir.mkdir()
    rc = evaluate.run_cli(evaluate.main, evaluate.get_args_parser(),
                          ["--pred", str(pred_dir), "--gt", str(gt_dir), "--output", str(out_dir / "m.csv")])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert rc == 2
    assert len(lines) == 1 and expected in lines[0], err
    assert "Traceback" not in err
    assert list(out_dir.iterdir()) == []  # no CSV, no temporary


def test_cli_error_in_a_real_process(folders, tmp_path):
    pred_dir, gt_dir = folders
    _flipped(pred_dir, gt_dir)
    out = tmp_path / "m.csv"
    res = subprocess.run([sys.executable, "evaluate.py", "--pred", str(pred_dir), "--gt", str(gt_dir),
                          "--output", str(out)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "prediction-0.nii" in errors[0] and "Traceback" not in res.stderr
    assert not out.exists()


def test_summary_path_that_is_a_folder_exits_2(folders, tmp_path, capsys):
    pred_dir, gt_dir = folders
    rc = evaluate.run_cli(evaluate.main, evaluate.get_args_parser(),
                          ["--pred", str(pred_dir), "--gt", str(gt_dir), "--output", str(tmp_path / "m.csv"),
                           "--summary", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and "--summary is a folder" in err and "Traceback" not in err
    assert not (tmp_path / "m.csv").exists()


def write_split(path: Path, test: list[str], val: list[str] = (), train: list[str] = ()) -> Path:
    """A splits.json as train.py writes it (the three parts, then what made them)."""
    path.write_text(json.dumps({"train": list(train), "val": list(val), "test": list(test), "seed": 0,
                                "val_fraction": 0.15, "test_fraction": 0.15}))
    return path


def test_split_file_scores_exactly_the_test_patients(folders, tmp_path, capsys):
    pred_dir, gt_dir = folders
    split = write_split(tmp_path / "splits.json", test=["volume-0", "volume-2"], val=["volume-1"])
    (pred_dir / PRED_NAMES[2].format(2)).unlink()   # case 2 is a test patient: still required
    (pred_dir / PRED_NAMES[1].format(1)).unlink()   # case 1 is not: no longer required
    with pytest.raises(evaluate.DataError, match="no prediction for case 2"):
        evaluate.main(evaluate.get_args_parser().parse_args(
            ["--pred", str(pred_dir), "--gt", str(gt_dir), "--split-file", str(split)]))
    shutil.copy(gt_dir / "segmentation-2.nii", pred_dir / "prediction-2.nii")
    out = tmp_path / "m.csv"
    rc = evaluate.run_cli(evaluate.main, evaluate.get_args_parser(),
                          ["--pred", str(pred_dir), "--gt", str(gt_dir), "--output", str(out),
                           "--split-file", str(split), "--split", "test"])
    assert rc == 0
    with open(out, newline="") as fh:
        assert [r["case"] for r in csv.DictReader(fh)] == ["0", "2"]
    assert "scored the 2 test case(s)" in capsys.readouterr().err
    # The validation part alone; a prediction of a case outside the part is not an "extra" one.
    shutil.copy(gt_dir / "segmentation-1.nii", pred_dir / "prediction-1.nii")
    rows, summary = evaluate.evaluate_folders(pred_dir, gt_dir, cases=[1])
    assert [r["case"] for r in rows] == [1] and summary["cases"] == 1 and summary["extra_predictions"] == 0


@pytest.mark.parametrize("argv, message", [
    (["--split", "test"], "without --split-file"),
    (["--split-file", "{split}", "--split", "train"], "found no train cases"),
    (["--split-file", "{other}"], "found no ground truth for case(s) 7"),
    (["--split-file", "{slices}"], "without a number"),
    (["--split-file", "{missing}"], "cannot read split"),
])
def test_split_file_mistakes_are_one_line(folders, tmp_path, capsys, argv, message):
    pred_dir, gt_dir = folders
    paths = {"split": write_split(tmp_path / "splits.json", test=["volume-0"]),
             "other": write_split(tmp_path / "other.json", test=["volume-0", "volume-7"]),
             "slices": write_split(tmp_path / "slices.json", test=["pA"]),
             "missing": tmp_path / "nothing.json"}
    argv = [a.format(**paths) for a in argv]
    rc = evaluate.run_cli(evaluate.main, evaluate.get_args_parser(), ["--pred", str(pred_dir), "--gt", str(gt_dir)] + argv)
    err = capsys.readouterr().err
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, err
@pytest.mark.parametrize("blocked", ["--output", "--summary"])
def test_unwritable_output_is_refused_before_scoring_and_neither_file_is_written(folders, tmp_path, capsys,
                                                                                  monkeypatch, blocked):
    pred_dir, gt_dir = folders
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    paths = {"--output": tmp_path / "out" / "m.csv", "--summary": tmp_path / "out" / "s.json"}
    paths[blocked] = a_file / "x"
    scored = []
    real = evaluate.evaluate_folders
    monkeypatch.setattr(evaluate, "evaluate_folders", lambda *a, **k: scored.append(1) or real(*a, **k))
    argv = ["--pred", str(pred_dir), "--gt", str(gt_dir)] + [str(x) for kv in paths.items() for x in kv]
    rc = evaluate.run_cli(evaluate.main, evaluate.get_args_parser(), argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and err.startswith("error: ") and "expected" in err, err
    assert str(paths[blocked]) in err and blocked in err
    assert not scored  # minutes of scoring on LiTS are not spent first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "gt", "pred"]


def test_a_failed_second_write_leaves_neither_file(folders, tmp_path, capsys, monkeypatch):
    """The disk fills while the summary is written: the per-case CSV is not left alone beside nothing."""
    pred_dir, gt_dir = folders
    real = Path.write_text

    def full_disk(self, text, *args, **kwargs):
        if ".s.json" in self.name:
            raise OSError(28, "No space left on device")
        return real(self, text, *args, **kwargs)
    monkeypatch.setattr(Path, "write_text", full_disk)
    out = tmp_path / "out"
    rc = evaluate.run_cli(evaluate.main, evaluate.get_args_parser(),
                          ["--pred", str(pred_dir), "--gt", str(gt_dir), "--output", str(out / "m.csv"),
                           "--summary", str(out / "s.json")])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]  # after the progress bar's line
    assert rc == 2 and len(lines) == 1 and "s.json: cannot write (No space left on device)" in lines[0], err
    assert "Traceback" not in err and list(out.iterdir()) == []
