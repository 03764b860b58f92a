"""lesions.py: lesion labelling, volumes and the RECIST axes against hand-computed values.

Shapes are drawn on pixel grids with anisotropic spacing (row, column) in mm. Both axes run between
pixel centres, so a rectangle of n x m pixels spans (n - 1) dy by (m - 1) dx, and a shape whose
extreme pixels lie exactly on the drawn outline (an ellipse with whole-pixel semi-axes) measures
exactly its outline's axes.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

import lesions


def test_measure_by_hand_volumes_axes_slices_hu_and_centre():
    labels = np.zeros((10, 40, 40), dtype=np.uint8)
    labels[1:9, 5:35, 5:35] = 1  # liver region: 8 * 30 * 30 = 7200 voxels
    labels[2:7, 10:14, 10:14] = 2  # lesion A: 5 slices of 4 x 4 = 80 voxels, all alike
    labels[7, 25:27, 20:23] = 2  # lesion B: 1 slice of 2 x 3 = 6 voxels
    hu = np.where(labels == 2, 30.0, 100.0).astype(np.float32)
    hu[7, 25, 20] = 90.0  # B: five voxels of 30 HU and one of 90: mean 40
    spacing = (2.5, 0.8, 0.7)  # (slice, row, column) mm
    voxel_ml = 2.5 * 0.8 * 0.7 / 1000
    world = np.array([[0.0, 0.0, -0.7, 50.0], [0.0, -0.8, 0.0, 20.0], [2.5, 0.0, 0.0, -30.0], [0, 0, 0, 1]])
    r = lesions.measure(labels, spacing, file_slice=lambda z: 9 - z, hu=hu, affine=world)  # a file upside down
    assert r["num_lesions"] == 2
    assert r["liver_volume_ml"] == pytest.approx(7200 * voxel_ml)
    assert r["tumor_volume_ml"] == pytest.approx(86 * voxel_ml)
    assert r["tumor_burden_percent"] == pytest.approx(100 * 86 / 7200)
    a, b = r["lesions"]
    assert (a["id"], b["id"]) == (1, 2)
    assert a["volume_ml"] == pytest.approx(80 * voxel_ml) and a["voxels"] == 80
    # A 4 x 4 square of centres 3 dy by 3 dx: corner to corner, and the chord across that diagonal.
    diagonal = math.hypot(3 * 0.8, 3 * 0.7)
    assert a["long_axis_mm"] == pytest.approx(diagonal)
    assert a["short_axis_mm"] == pytest.approx(diagonal * (3 * 0.7) / (3 * 0.8))
    # Five equal slices: the one nearest the centroid (slices-order 4) is the key slice, file slice 5.
    assert (a["slice"], a["first_slice"], a["last_slice"]) == (5, 3, 7)  # slices 2..6 of 10, upside down
    assert a["mean_hu"] == pytest.approx(30.0)
    centre = world @ [4, 11.5, 11.5, 1]
    assert a["centre_ras_mm"] == pytest.approx(list(centre[:3]))
    assert a["centre_lps_mm"] == pytest.approx([-centre[0], -centre[1], centre[2]])
    assert b["volume_ml"] == pytest.approx(6 * voxel_ml)
    assert b["long_axis_mm"] == pytest.approx(math.hypot(1 * 0.8, 2 * 0.7))
    assert b["short_axis_mm"] == pytest.approx(math.hypot(0.8, 1.4) * 0.8 / 1.4)
    assert (b["slice"], b["first_slice"], b["last_slice"]) == (2, 2, 2)
    assert b["mean_hu"] == pytest.approx(40.0)

    # 2D: pixels, no spacing; face-connected lesions (diagonal neighbours are two lesions).
    flat = np.zeros((1, 20, 20), dtype=np.uint8)
    flat[0, 2:18, 2:18] = 1
    flat[0, 5, 5] = flat[0, 6, 6] = 2
    flat[0, 10, 4:9] = 2
    r2 = lesions.measure(flat)
    assert r2["liver_area_px"] == 256 and r2["tumor_area_px"] == 7 and r2["num_lesions"] == 3
    assert r2["lesions"][0] == {"id": 1, "pixels": 5, "area_px": 5.0, "long_axis_px": 4.0, "short_axis_px": 0.0}
    assert lesions.measure(np.zeros((3, 8, 8), np.uint8), spacing) == {
        "liver_volume_ml": 0.0, "tumor_volume_ml": 0.0, "tumor_burden_percent": 0.0, "num_lesions": 0, "lesions": [],
        "recist_target_lesions": [], "recist_sum_long_axes_mm": 0.0}
    assert not a["measurable"] and not b["measurable"]  # 3.2 and 1.6 mm: far below 10 mm
    assert r["recist_target_lesions"] == [] and r["recist_sum_long_axes_mm"] == 0.0


def test_recist_measurable_lesions_and_targets_by_hand():
    # Four bars in one slice at 0.5 mm columns: n pixels in a row span (n - 1) * 0.5 mm between centres.
    labels = np.zeros((3, 40, 60), dtype=np.uint8)
    labels[1, 2, 0:21] = 2   # 10.0 mm: exactly RECIST's 10 mm, measurable
    labels[1, 6, 0:20] = 2   #  9.5 mm: not
    labels[1, 10, 0:41] = 2  # 20.0 mm
    labels[1, 14, 0:31] = 2  # 15.0 mm
    labels[1, 18:20, 0:31] = 2  # two rows: its diagonal, hypot(0.5, 15) mm, just beats the 15-mm bar
    r = lesions.measure(labels, (2.5, 0.5, 0.5))
    by_long = {round(d["long_axis_mm"], 6): d for d in r["lesions"] if d["voxels"] != 62}
    assert by_long[10.0]["measurable"] and not by_long[9.5]["measurable"] and by_long[20.0]["measurable"]
    # Ids go by size: 62 (two-row bar), 41, 31, 21, 20 voxels -> ids 1..5; targets: the two longest
    # measurable, 20 mm (id 2) and the two-row bar (id 1); the 15-mm bar is a third, left out.
    assert [d["voxels"] for d in r["lesions"]] == [62, 41, 31, 21, 20]
    assert r["recist_target_lesions"] == [2, 1]
    assert r["recist_sum_long_axes_mm"] == pytest.approx(20.0 + math.hypot(0.5, 15.0))
    # Slices 6 mm apart: measurable from twice that, 12 mm.
    thick = lesions.measure(labels, (6.0, 0.5, 0.5))
    assert [d["measurable"] for d in thick["lesions"]] == [True, True, True, False, False]
    assert lesions.recist_measurable(12.0, 6.0) and not lesions.recist_measurable(11.9, 6.0)
    assert lesions.recist_measurable(10.0, 5.0) and not lesions.recist_measurable(9.99, 1.0)
    # Equal long axes: the larger lesion (the lower id) first; a longer lesion that is not measurable
    # (on thick slices) is no target.
    records = [{"id": 1, "long_axis_mm": 12.0, "measurable": True}, {"id": 2, "long_axis_mm": 18.0, "measurable": False},
               {"id": 3, "long_axis_mm": 12.0, "measurable": True}, {"id": 4, "long_axis_mm": 12.0, "measurable": True}]
    assert lesions.recist_targets(records) == [1, 3]


def test_lesions_are_face_connected_in_3d():
    labels = np.zeros((4, 10, 10), dtype=np.uint8)
    labels[0:2, 1:3, 1:3] = 2
    labels[2:4, 3:5, 1:3] = 2  # meets the first cube along an edge only
    assert lesions.label_lesions(labels)[1] == 2
    labels[2, 2, 1] = 2  # a voxel sharing a face with each joins them
    assert lesions.label_lesions(labels)[1] == 1
    assert len(lesions.measure_lesions(labels, (1.0, 1.0, 1.0))) == 1


def test_rectangle_at_anisotropic_spacing():
    spacing = (0.7, 1.3)
    mask = np.zeros((12, 20), bool)
    mask[3:8, 4:15] = True  # 5 rows x 11 columns: centres span 2.8 mm by 13 mm
    h, w = 4 * 0.7, 10 * 1.3
    diagonal = math.hypot(h, w)
    got = lesions.axes(mask, spacing)
    assert got.long == pytest.approx(diagonal)
    # Across the diagonal the longest chord runs from one long side to the other: h / sin(angle) =
    # h * diagonal / w.
    assert got.short == pytest.approx(h * diagonal / w)
    tall = lesions.axes(mask.T, spacing[::-1])  # the same rectangle turned: the same numbers
    assert (tall.long, tall.short) == pytest.approx((got.long, got.short))


@pytest.mark.parametrize("semi_rows, semi_cols", [(14, 16), (30, 7)])
def test_ellipse_with_whole_pixel_semi_axes_measures_its_axes(semi_rows, semi_cols):
    spacing = (0.7, 1.3)
    r, c = np.mgrid[-40:41, -40:41]
    mask = r ** 2 * semi_cols ** 2 + c ** 2 * semi_rows ** 2 <= (semi_rows * semi_cols) ** 2  # exact in integers
    a, b = sorted((semi_rows * 0.7, semi_cols * 1.3), reverse=True)  # semi-axes in mm: the major first
    got = lesions.axes(mask, spacing)
    # The ends of both axes are pixel centres on the outline, and no two centres inside lie farther apart.
    assert got.long == pytest.approx(2 * a)
    assert got.short == pytest.approx(2 * b)
    long_dir = np.diff(got.long_ends, axis=0)[0] * spacing
    short_dir = np.diff(got.short_ends, axis=0)[0] * spacing
    assert abs(long_dir @ short_dir) < 1e-9  # perpendicular in mm, not in pixels


def test_rotated_ellipse_within_a_pixel_of_its_axes():
    spacing = (0.7, 1.3)
    a, b, angle = 20.0, 9.0, math.radians(30)
    rows, cols = np.mgrid[:90, :60]
    y, x = (rows - 45.3) * spacing[0], (cols - 30.2) * spacing[1]
    u = x * math.cos(angle) + y * math.sin(angle)
    v = -x * math.sin(angle) + y * math.cos(angle)
    mask = (u / a) ** 2 + (v / b) ** 2 <= 1
    got = lesions.axes(mask, spacing)
    pixel = math.hypot(*spacing)  # an outline point is at most a pixel diagonal from a centre inside
    assert 2 * a - 2 * pixel <= got.long <= 2 * a
    assert 2 * b - 2 * pixel <= got.short <= 2 * b + 0.1
    d = np.diff(got.long_ends, axis=0)[0] * spacing  # (row, column) mm
    tilt = math.degrees(math.atan2(d[0], d[1])) % 180
    assert abs(tilt - 30) < 4


def test_l_shape_short_axis_stays_inside_the_lesion():
    spacing = (0.5, 1.0)
    mask = np.zeros((24, 14), bool)
    mask[0:21, 0:3] = True    # upright arm: centres span 10 mm down, 2 mm across
    mask[16:21, 0:11] = True  # foot: centres span 2 mm down, 10 mm across
    got = lesions.axes(mask, spacing)
    # Long axis: from the top of the upright arm's outer edge to the foot's far corner.
    assert got.long == pytest.approx(10 * math.sqrt(2))
    assert sorted(map(tuple, got.long_ends)) == [(0.0, 0.0), (20.0, 10.0)]
    # Across it (lines x + y = const in mm), every chord inside the L crosses one arm: 2 mm of x and
    # 2 mm of y, 2 sqrt(2) mm; the convex hull's chord would be 6 sqrt(2) mm, across the empty corner.
    assert got.short == pytest.approx(2 * math.sqrt(2))


def test_degenerate_shapes():
    one = np.zeros((5, 5), bool)
    one[2, 3] = True
    got = lesions.axes(one, (0.7, 1.3))
    assert (got.long, got.short) == (0.0, 0.0)
    np.testing.assert_array_equal(got.long_ends, [[2, 3], [2, 3]])
    row = np.zeros((5, 9), bool)
    row[2, 1:8] = True
    got = lesions.axes(row, (0.7, 1.3))
    assert got.long == pytest.approx(6 * 1.3) and got.short == 0.0
    diagonal = np.eye(4, dtype=bool)  # pixels touching at corners only: their centres span no area
    got = lesions.axes(diagonal, (1.0, 1.0))
    assert got.long == pytest.approx(3 * math.sqrt(2)) and got.short == 0.0
    with pytest.raises(ValueError):
        lesions.long_axis(np.zeros((3, 3), bool))


def test_long_axis_is_exact_on_large_and_odd_shapes():
    yy, xx = np.mgrid[:501, :501]
    disk = (yy - 250) ** 2 + (xx - 250) ** 2 <= 200 ** 2  # many row ends: the hull path
    assert lesions.long_axis(disk, (0.5, 0.5))[0] == pytest.approx(200.0)  # 2 r * 0.5 mm
    rng = np.random.default_rng(0)
    blob = rng.random((15, 17)) < 0.3
    pts = np.argwhere(blob) * [0.9, 0.6]
    brute = np.sqrt(((pts[:, None] - pts[None]) ** 2).sum(-1)).max()
    assert lesions.long_axis(blob, (0.9, 0.6))[0] == pytest.approx(brute)
    line = np.zeros((5, 900), bool)
    line[2, 10:890] = True  # collinear: no 2D hull
    assert lesions.long_axis(line)[0] == pytest.approx(879.0)


def test_short_axis_of_an_odd_blob_against_brute_force():
    """Dense sampling of each perpendicular line stands in for the exact clipping: the chord found must
    be at least what sampling finds, and not more than a sampling step longer."""
    rng = np.random.default_rng(3)
    from scipy import ndimage
    blob = ndimage.binary_opening(ndimage.gaussian_filter(rng.random((30, 26)), 2.0) > 0.5)
    blob = lesions.label_lesions(blob.astype(np.uint8) * 2)[0] == 1  # one piece
    spacing = np.array([0.9, 0.6])
    got = lesions.axes(blob, spacing)
    ends = got.long_ends * spacing
    u = (ends[1] - ends[0]) / np.linalg.norm(ends[1] - ends[0])
    v = np.array([-u[1], u[0]])

    def inside(points_mm: np.ndarray) -> np.ndarray:
        """In the lesion shrunk by half a pixel: every pixel a pixel-sized box there touches is lesion."""
        rc = points_mm / spacing
        lo, hi = np.floor(rc + 1e-9).astype(int), np.ceil(rc - 1e-9).astype(int)
        ok = np.ones(len(rc), bool)
        for r in (lo[:, 0], hi[:, 0]):
            for c in (lo[:, 1], hi[:, 1]):
                valid = (r >= 0) & (r < blob.shape[0]) & (c >= 0) & (c < blob.shape[1])
                ok &= valid & blob[np.clip(r, 0, blob.shape[0] - 1), np.clip(c, 0, blob.shape[1] - 1)]
        return ok

    step = 0.01
    centres = np.argwhere(blob) * spacing
    best = 0.0
    for s in np.unique(np.round(centres @ u, 9)):
        t = np.arange(-60, 60, step)
        hit = inside(s * u + t[:, None] * v)
        if hit.any():
            runs = np.split(np.flatnonzero(hit), np.flatnonzero(np.diff(np.flatnonzero(hit)) > 1) + 1)
            best = max(best, max((len(r) - 1) * step for r in runs))
    assert best - 1e-9 <= got.short <= best + 2 * step
    assert inside(got.short_ends * spacing).all()


def test_key_slice_is_where_the_long_axis_is_longest():
    labels = np.zeros((5, 20, 20), dtype=np.uint8)
    labels[0, 8:11, 8:11] = 2
    labels[1, 6:13, 7:12] = 2
    labels[2, 5:15, 8:11] = 2   # the longest (9 rows) though not the largest
    labels[3, 6:13, 6:13] = 2   # the largest area, shorter long axis than slice 2
    (lesion,) = lesions.measure_lesions(labels, (3.0, 1.0, 1.0))
    assert lesion.z == 2 and lesion.z_range == (0, 3)
    assert lesion.axes.long == pytest.approx(math.hypot(9, 2))
    d = lesions.largest_axial_diameters(lesions.label_lesions(labels)[0], 1, (3.0, 1.0, 1.0), axial_axis=0)
    assert d[0] == pytest.approx(lesion.axes.long)  # evaluate.py's size classes measure the same
