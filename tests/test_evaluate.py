"""evaluate.py: hand-computed metrics, an independent brute-force reference, lesion matching, the CLI."""
import csv
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
# Empty masks
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
    z = np.zeros((2, 2, 2), np.uint8)
    assert evaluate.dice_global([evaluate.dice_counts(z, z)], "tumor") == 1.0


# --------------------------------------------------------------------------------------------
# Lesion detection
# --------------------------------------------------------------------------------------------

def _lesion_case():
    gt = np.ones((3, 12, 12), np.uint8)
    pred = np.ones((3, 12, 12), np.uint8)
    gt[0:2, 0:2, 0:2] = 2      # lesion A: 8 voxels
    pred[0:2, 0:2, 0:3] = 2    # A': 12 voxels, overlap 8 -> IoU 8/12 = 2/3 > 0.5: detected
    gt[0:2, 6:8, 6:8] = 2      # lesion B: 8 voxels
    pred[0:2, 7:9, 7:9] = 2    # B': 8 voxels, overlap 2 -> IoU 2/14 = 1/7 < 0.5: not a match
    pred[2, 11, 0] = 2         # C: touches nothing: a false positive
    return pred, gt


def test_lesion_detection_by_hand():
    pred, gt = _lesion_case()
    # TP: A. FP: B' and C. FN: B.
    assert evaluate.lesion_detection(pred, gt) == (1, 2, 1)
    # At IoU > 0.1, B' matches B too.
    assert evaluate.lesion_detection(pred, gt, iou_threshold=0.1) == (2, 1, 0)
    assert evaluate.precision_recall(1, 2, 1) == (pytest.approx(1 / 3), 0.5)


def test_lesion_detection_is_one_to_one():
    gt = np.zeros((1, 3, 9), np.uint8)
    pred = np.zeros((1, 3, 9), np.uint8)
    gt[0, 1, 0:4] = 2
    gt[0, 1, 5:9] = 2          # two lesions of 4 voxels, one voxel apart
    pred[0, 1, :] = 2          # one component of 9 covering both: IoU 4/9 with each
    assert evaluate.lesion_detection(pred, gt, iou_threshold=0.3) == (1, 0, 1)
    assert evaluate.lesion_detection(pred, gt) == (0, 1, 2)


def test_lesions_touching_diagonally_are_one_component():
    gt = np.zeros((2, 2, 2), np.uint8)
    gt[0, 0, 0] = gt[1, 1, 1] = 2  # corner contact only: one lesion with 26-connectivity
    assert evaluate.lesion_detection(gt, gt) == (1, 0, 0)
    half = np.zeros_like(gt)
    half[0, 0, 0] = 2              # IoU 1/2 is not > 0.5
    assert evaluate.lesion_detection(half, gt) == (0, 1, 1)


def test_detection_without_lesions():
    pred, gt = _lesion_case()
    none = np.ones_like(gt)
    assert evaluate.lesion_detection(none, none) == (0, 0, 0)
    assert evaluate.lesion_detection(pred, none) == (0, 3, 0)
    assert evaluate.lesion_detection(none, gt) == (0, 0, 2)
    assert evaluate.precision_recall(0, 0, 0) == (1.0, 1.0)  # nothing claimed, nothing missed
    assert evaluate.precision_recall(0, 3, 0) == (0.0, 1.0)
    assert evaluate.precision_recall(0, 0, 2) == (1.0, 0.0)


# --------------------------------------------------------------------------------------------
# Against an independent brute-force computation
# --------------------------------------------------------------------------------------------

SIX = [(1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1)]


def brute_surface(mask: np.ndarray) -> np.ndarray:
    """Mask voxels with a face neighbour outside the mask or outside the array, one voxel at a time."""
    surf = np.zeros_like(mask)
    for idx in zip(*np.nonzero(mask)):
        for off in SIX:
            nb = tuple(i + o for i, o in zip(idx, off))
            if any(n < 0 or n >= s for n, s in zip(nb, mask.shape)) or not mask[nb]:
                surf[idx] = True
                break
    return surf


def brute_region(p: np.ndarray, g: np.ndarray, spacing) -> dict:
    n_p, n_g, inter = p.sum(), g.sum(), (p & g).sum()
    pts_p = np.argwhere(brute_surface(p)) * np.asarray(spacing)
    pts_g = np.argwhere(brute_surface(g)) * np.asarray(spacing)
    d = cdist(pts_p, pts_g)  # mm
    both = np.concatenate([d.min(axis=1), d.min(axis=0)])
    return dict(dice=2 * inter / (n_p + n_g), voe=1 - inter / (n_p + n_g - inter), rvd=(n_p - n_g) / n_g,
                assd=both.mean(), mssd=both.max(), rmsd=np.sqrt((both ** 2).mean()))


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
    d_crop = np.sort(evaluate._surface_distances(p, g, spacing, crop=True))
    d_full = np.sort(evaluate._surface_distances(p, g, spacing, crop=False))
    np.testing.assert_allclose(d_crop, d_full, atol=1e-12)
    # And an interior pair whose padded box does not touch the border.
    g2, p2 = np.zeros((12, 10, 8), bool), np.zeros((12, 10, 8), bool)
    g2[4:7, 3:6, 2:5] = True
    p2[5:8, 3:5, 3:6] = True
    np.testing.assert_allclose(np.sort(evaluate._surface_distances(p2, g2, spacing, crop=True)),
                               np.sort(evaluate._surface_distances(p2, g2, spacing, crop=False)), atol=1e-12)
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
    assert "precision 1.0000, recall 1.0000" in res.stdout
    assert "Dice global" in res.stdout
    with open(out, newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["case", "dice_liver", "voe_liver", "rvd_liver", "assd_liver", "mssd_liver", "rmsd_liver",
                       "dice_tumor", "voe_tumor", "rvd_tumor", "assd_tumor", "mssd_tumor", "rmsd_tumor"]
    assert [r[0] for r in rows[1:]] == ["0", "1", "2"]
    for r in rows[1:]:
        values = dict(zip(rows[0][1:], map(float, r[1:])))
        assert values["dice_liver"] == values["dice_tumor"] == 1.0
        assert all(v == 0.0 for k, v in values.items() if not k.startswith("dice"))
    assert sorted(p.name for p in out.parent.iterdir()) == ["metrics.csv"]  # no temporary left over


def test_degraded_prediction(folders, capsys):
    pred_dir, gt_dir = folders
    gt, img = read_labels(gt_dir / "segmentation-1.nii")
    assert (gt == 2).any()
    bad = gt.copy()
    bad[bad == 2] = 1                                                  # every lesion missed
    bad[ndimage.binary_erosion(bad >= 1) ^ (bad >= 1)] = 0             # liver one voxel too thin
    save_labels(pred_dir / PRED_NAMES[1].format(1), bad, img.affine)
    lesions_1 = evaluate.lesion_detection(gt, gt)[0]
    counts = []
    for i in range(3):
        g = read_labels(gt_dir / f"segmentation-{i}.nii")[0]
        counts.append(evaluate.dice_counts(bad if i == 1 else g, g))

    rows, summary = evaluate.evaluate_folders(pred_dir, gt_dir)
    assert [r["case"] for r in rows] == [0, 1, 2]
    assert set(rows[1]) == set(evaluate.CSV_COLUMNS)
    r1 = rows[1]
    assert 0.0 < r1["dice_liver"] < 1.0 and r1["rvd_liver"] < 0.0 and r1["assd_liver"] > 0.0
    assert_metrics(r1, {"dice_tumor": 0.0, "voe_tumor": 1.0, "rvd_tumor": -1.0, "assd_tumor": NAN})
    assert rows[0]["dice_tumor"] == rows[2]["dice_tumor"] == 1.0
    assert summary["cases"] == 3
    assert summary["nan_assd_tumor"] == 1 and summary["mean_assd_tumor"] == 0.0  # the NaN left out
    assert summary["mean_dice_tumor"] == pytest.approx(2 / 3)
    assert summary["dice_global_liver"] == pytest.approx(evaluate.dice_global(counts, "liver"))
    assert summary["dice_global_liver"] < 1.0
    assert summary["fn"] == lesions_1 and summary["fp"] == 0
    assert summary["detection_precision"] == 1.0
    assert summary["detection_recall"] == pytest.approx(summary["tp"] / (summary["tp"] + lesions_1))

    rc = evaluate.run_cli(evaluate.main, evaluate.get_args_parser(),
                          ["--pred", str(pred_dir), "--gt", str(gt_dir)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "left out: liver 0, tumor 1" in printed and f"FN {lesions_1}" in printed


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
