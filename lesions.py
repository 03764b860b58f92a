"""Lesion measurements of a label volume, in one place: lesions, volumes, RECIST axes, burden, position.

    found = measure(labels, geom.spacing, file_slice=geom.file_slice_index, hu=hu, affine=geom.slices_affine)
    found["lesions"][0]   # {"id": 1, "volume_ml": ..., "long_axis_mm": ..., "short_axis_mm": ..., "slice": ...}
    for lesion in measure_lesions(labels, geom.spacing, hu):   # the same, as objects: key slice, axis ends
        ...
    length, ends = long_axis(mask, (0.7, 1.3))                 # one axial slice (rows, columns) in mm

`labels` is a label volume (Z, H, W) in slices order (axis 0 across axial slices), uint8 0 background,
1 liver, 2 tumour; `spacing` is (dz, dy, dx) in mm. predict_segmentation.py, report.py and evaluate.py
all measure with this module, so one rule gives one number everywhere:

- Liver = label >= 1 (tumour included), tumour = label 2, as the LiTS scorer counts them.
- Lesions are the face-connected components of label 2 (6 neighbours in 3D, 4 in a slice), as
  `scipy.ndimage.label` labels by default and the LiTS scorer counts them: tumour voxels that touch
  only at an edge or a corner are two lesions.
- Long axis (RECIST 1.1's longest diameter): in each axial slice of a lesion, the largest distance
  between the centres of two of its pixels, in mm with the slice's (row, column) spacing, which may
  differ. The lesion's key slice is the one where this is largest (ties: the larger area, then the
  slice nearest the lesion's centroid, then the lower index); its long axis is that slice's.
- Short axis: the longest chord of the lesion perpendicular to the long axis, in the key slice
  (`short_axis` says exactly how the chord is discretised).
- RECIST 1.1 measurable: long axis >= 10 mm, or >= twice the slice spacing where slices lie more than
  5 mm apart (the spacing stands in for the slice thickness, which NIfTI does not record); the target
  lesions are the two measurable lesions with the longest long axes (the liver is one organ).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError
from scipy.spatial.distance import pdist, squareform

_TOL_MM = 1e-6  # lengths closer than this are equal (pixel spacings are far coarser)

# RECIST 1.1 (Eisenhauer et al. 2009, section 3.1.1 and 4.2): on CT a lesion is measurable from a
# long axis of 10 mm where slices are at most 5 mm thick, else from twice the slice thickness; the
# target lesions of one organ are at most its two largest measurable lesions, and the sum of their
# long axes is what response is judged on.
RECIST_MIN_LONG_AXIS_MM = 10.0
RECIST_TARGETS_PER_ORGAN = 2


def nonzero_box(labels: np.ndarray) -> tuple[slice, ...] | None:
    """The smallest block (one slice per axis) holding every nonzero voxel of `labels`; None if none.
    The fast path leaves most of a volume background; work on this block instead of the whole
    volume gives the same answer (everything outside is 0) in a fraction of the time."""
    found = ndimage.find_objects((np.asarray(labels) != 0).view(np.uint8))  # label 1 = nonzero
    return found[0] if found else None


def label_lesions(labels: np.ndarray) -> tuple[np.ndarray, int]:
    """Lesions: the connected components of label == 2 with scipy.ndimage.label's default structure, as
    the LiTS scorer labels them: face-connected (6-neighbourhood in 3D), so voxels that touch only at an
    edge or a corner belong to different lesions. Returns (lesion ids 1..n, 0 elsewhere; n)."""
    lab, n = ndimage.label(np.asarray(labels) == 2)
    return lab, int(n)


def tumor_burden(labels: np.ndarray) -> float:
    """Tumor burden as the LiTS scorer defines it: |label == 2| / |label >= 1| (a fraction of the liver,
    tumor included). NaN when there is no liver."""
    labels = np.asarray(labels)
    liver = int(np.count_nonzero(labels >= 1))
    return int(np.count_nonzero(labels == 2)) / liver if liver else math.nan


# --------------------------------------------------------------------------------------------
# The two RECIST axes of one axial slice
# --------------------------------------------------------------------------------------------

def _row_ends(mask: np.ndarray) -> np.ndarray:
    """(P, 2) pixel indices (row, column): the first and the last pixel of each row of a 2D mask.
    Every vertex of the convex hull of the pixel centres is one of them."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return np.zeros((0, 2), dtype=np.int64)
    first = mask[rows].argmax(axis=1)
    last = mask.shape[1] - 1 - mask[rows][:, ::-1].argmax(axis=1)
    return np.concatenate([np.stack([rows, first], 1), np.stack([rows, last], 1)])


def long_axis(mask: np.ndarray, spacing: Sequence[float] = (1.0, 1.0)) -> tuple[float, np.ndarray]:
    """The longest diameter of a 2D mask: the largest distance between the centres of two of its pixels,
    with (row, column) spacing, and its two ends as (row, column) pixel coordinates (2, 2).

    Exact: the farthest pair of a point set are vertices of its convex hull (scipy's ConvexHull), which
    are among each row's first and last pixels; `pdist` compares those. One pixel: length 0, both ends
    on it. An empty mask is a ValueError."""
    pts = _row_ends(np.asarray(mask, dtype=bool))
    if len(pts) == 0:
        raise ValueError("long_axis needs a mask with at least one pixel")
    mm = pts * np.asarray(spacing, dtype=np.float64)  # (P, 2) in mm
    if len(pts) > 3:
        try:
            keep = ConvexHull(mm).vertices
            pts, mm = pts[keep], mm[keep]
        except QhullError:  # collinear centres have no 2D hull; the row ends are few then
            pass
    if len(pts) < 2:
        return 0.0, np.repeat(pts[:1].astype(np.float64), 2, axis=0)
    dist = squareform(pdist(mm))
    i, j = np.unravel_index(int(dist.argmax()), dist.shape)
    return float(dist[i, j]), pts[[i, j]].astype(np.float64)


def _runs(flags: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Runs of True along axis 1 of a 2D array: (row, first, end) with end exclusive, row-major."""
    edges = np.diff(np.pad(flags, ((0, 0), (1, 1))).astype(np.int8), axis=1)
    starts, ends = np.argwhere(edges == 1), np.argwhere(edges == -1)
    return starts[:, 0], starts[:, 1], ends[:, 1]


def _shrunk_pieces(mask: np.ndarray) -> np.ndarray:
    """The lesion shrunk by half a pixel on every side, as closed axis-aligned rectangles (N, 4) of
    (row0, row1, col0, col1) in pixel coordinates, possibly flat: the points at which a pixel-sized
    box fits inside the union of the lesion's pixels. That is, the square between the centres of
    every 2 x 2 block of lesion pixels (merged along rows), the segment between two neighbouring
    centres that no such square holds (merged along their line), and each centre with no neighbour."""
    m = np.asarray(mask, dtype=bool)
    h, w = m.shape
    cells = m[:-1, :-1] & m[1:, :-1] & m[:-1, 1:] & m[1:, 1:]  # (h-1, w-1): cell (r, c) spans [r, r+1] x [c, c+1]
    across = m[:, :-1] & m[:, 1:]  # (h, w-1): centres (r, c) and (r, c+1)
    down = m[:-1, :] & m[1:, :]    # (h-1, w): centres (r, c) and (r+1, c)
    held_across = np.zeros_like(across)
    held_across[:-1] |= cells
    held_across[1:] |= cells
    held_down = np.zeros_like(down)
    held_down[:, :-1] |= cells
    held_down[:, 1:] |= cells
    joined = np.zeros_like(m)
    joined[:, :-1] |= across
    joined[:, 1:] |= across
    joined[:-1] |= down
    joined[1:] |= down
    pieces = []
    r, c0, c1 = _runs(cells)
    pieces.append(np.stack([r, r + 1, c0, c1], 1))
    r, c0, c1 = _runs(across & ~held_across)
    pieces.append(np.stack([r, r, c0, c1], 1))
    c, r0, r1 = _runs((down & ~held_down).T)
    pieces.append(np.stack([r0, r1, c, c], 1))
    r, c = np.nonzero(m & ~joined)
    pieces.append(np.stack([r, r, c, c], 1))
    return np.concatenate(pieces).astype(np.float64).reshape(-1, 4)


def short_axis(mask: np.ndarray, spacing: Sequence[float], long_ends: np.ndarray,
               chunk: int = 256) -> tuple[float, np.ndarray]:
    """The longest chord of a 2D mask perpendicular to its long axis, and its two ends as (row, column)
    pixel coordinates (2, 2), with (row, column) spacing.

    How it is discretised: the lesion is the region its pixel centres span, that is the union of its
    pixels shrunk by half a pixel on every side (`_shrunk_pieces`), so both axes run between pixel
    centres (a rectangle of n x m pixels measures (n - 1) dy by (m - 1) dx). A chord is a segment
    that lies inside that region on a line perpendicular to the long axis (`long_ends`, from
    `long_axis`); a concave lesion's chord stops where the lesion does (an L shape's short axis is
    the thickness of its arms, not the width of its convex hull). The chord length along the long
    axis changes linearly between lines through the region's corners, which are pixel centres at the
    lesion's border, so the lines through those centres hold the longest chord: each is clipped
    against the region's rectangles exactly. A lesion of one pixel, or one row or column of pixels
    across its long axis, has short axis 0."""
    mask = np.asarray(mask, dtype=bool)
    step = np.asarray(spacing, dtype=np.float64)
    ends = np.asarray(long_ends, dtype=np.float64) * step  # (2, 2) mm
    along = ends[1] - ends[0]
    norm = float(np.hypot(*along))
    if norm < _TOL_MM:
        return 0.0, np.repeat(np.asarray(long_ends, dtype=np.float64)[:1], 2, axis=0)
    u = along / norm
    v = np.array([-u[1], u[0]])  # perpendicular, in (row, column) mm
    pieces = _shrunk_pieces(mask) * np.repeat(step, 2)  # (N, 4): row0, row1, col0, col1 in mm
    border = mask & ~ndimage.binary_erosion(mask, structure=np.ones((3, 3), bool), border_value=0)
    along_u = np.argwhere(border) * step @ u  # (B,) each line: {x : x . u = s} through a border centre
    offsets = along_u[np.unique(np.round(along_u, 9), return_index=True)[1]]  # one line per position
    best, best_ends = 0.0, np.repeat(ends[:1], 2, axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        for start in range(0, len(offsets), chunk):
            s = offsets[start:start + chunk, None]  # (k, 1)
            lo = np.full((len(s), len(pieces)), -np.inf)
            hi = np.full((len(s), len(pieces)), np.inf)
            for axis, (a0, a1) in enumerate(((pieces[:, 0], pieces[:, 1]), (pieces[:, 2], pieces[:, 3]))):
                origin = s * u[axis]  # (k, 1): the line is origin + t v
                if abs(v[axis]) > 1e-12:
                    t0, t1 = (a0 - origin) / v[axis], (a1 - origin) / v[axis]
                    lo, hi = np.maximum(lo, np.minimum(t0, t1)), np.minimum(hi, np.maximum(t0, t1))
                else:  # the line runs along this axis: it meets the piece only within its extent
                    outside = (origin < a0 - _TOL_MM) | (origin > a1 + _TOL_MM)
                    lo, hi = np.where(outside, np.inf, lo), np.where(outside, -np.inf, hi)
            for k in range(len(s)):
                hit = lo[k] <= hi[k] + _TOL_MM
                if not hit.any():
                    continue
                order = np.argsort(lo[k][hit], kind="stable")
                a, b = lo[k][hit][order], hi[k][hit][order]  # intervals of t, by start
                reach = np.maximum.accumulate(b)
                gap = np.flatnonzero(a[1:] > reach[:-1] + _TOL_MM) + 1  # a new piece of chord starts
                first = np.concatenate([[0], gap])
                last = np.concatenate([gap - 1, [len(a) - 1]])
                lengths = reach[last] - a[first]
                i = int(lengths.argmax())
                if lengths[i] > best + _TOL_MM:
                    best = float(lengths[i])
                    origin = float(s[k, 0]) * u
                    best_ends = np.stack([origin + a[first[i]] * v, origin + reach[last[i]] * v])
    return best, best_ends / step


@dataclass(frozen=True)
class Axes:
    """The RECIST axes of a lesion in one axial slice: lengths in mm (or pixels without spacing) and
    their ends as (row, column) pixel coordinates, (2, 2) each."""

    long: float
    short: float
    long_ends: np.ndarray
    short_ends: np.ndarray


def axes(mask: np.ndarray, spacing: Sequence[float] = (1.0, 1.0)) -> Axes:
    """Both RECIST axes of a 2D mask (`long_axis`, `short_axis`)."""
    length, ends = long_axis(mask, spacing)
    width, across = short_axis(mask, spacing, ends)
    return Axes(length, width, ends, across)


def largest_axial_diameters(ids: np.ndarray, num: int, spacing: Sequence[float], axial_axis: int) -> np.ndarray:
    """Largest axial diameter in mm of lesions 1..num of an id volume: the largest distance between the
    centres of two of the lesion's voxels lying in the same axial slice (slices are the planes normal
    to `axial_axis`), over all its slices: the long axis of `measure_lesions`. 0 for a lesion of one
    voxel per slice."""
    ids = np.moveaxis(np.asarray(ids), axial_axis, 0)
    in_plane = [s for ax, s in enumerate(spacing) if ax != axial_axis]
    out = np.zeros(num, dtype=np.float64)
    for i, box in enumerate(ndimage.find_objects(ids, max_label=num)):
        if box is not None:
            lesion = ids[box] == i + 1
            out[i] = max(long_axis(plane, in_plane)[0] for plane in lesion if plane.any())
    return out


# --------------------------------------------------------------------------------------------
# Every lesion of a volume
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Lesion:
    """One lesion of a label volume (Z, H, W), in the volume's slices order.

    `z` is its key slice (where its long axis is longest), `axes` its RECIST axes there (ends in
    (row, column) pixel coordinates of the volume), `centre` the mean (row, column) of its pixels in
    that slice, `z_range` its first and last slice, `mean_hu` the mean HU of all its voxels."""

    id: int
    voxels: int
    z: int
    z_range: tuple[int, int]
    axes: Axes
    centre: tuple[float, float]
    mean_hu: float | None = None


def _key_slice(lesion: np.ndarray, spacing: Sequence[float]) -> tuple[int, float, np.ndarray]:
    """The key slice of a lesion's mask (z, y, x): (its index, long axis, long axis ends)."""
    zs = np.flatnonzero(lesion.any(axis=(1, 2)))
    centroid = float(np.nonzero(lesion)[0].mean())
    candidates = []
    for z in zs:
        length, ends = long_axis(lesion[z], spacing)
        candidates.append((length, int(lesion[z].sum()), -abs(z - centroid), -int(z), ends))
    top = max(c[0] for c in candidates)
    length, _, _, minus_z, ends = max((c for c in candidates if c[0] >= top - _TOL_MM), key=lambda c: c[1:4])
    return -minus_z, length, ends


def measure_lesions(labels: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0),
                    hu: np.ndarray | None = None) -> list[Lesion]:
    """Every lesion of a label volume (Z, H, W), largest first (ids 1..n in that order; equal sizes
    keep scipy's raster order). `spacing` (dz, dy, dx) in mm; `hu` (Z, H, W) gives each its mean HU."""
    labels = np.asarray(labels)
    block = nonzero_box(labels)
    if block is None:
        return []
    offset = np.array([b.start for b in block])
    ids, _ = label_lesions(labels[block])
    in_plane = tuple(float(s) for s in spacing[1:])
    found = []
    for i, box in enumerate(ndimage.find_objects(ids), start=1):
        sub = ids[box] == i  # (z, y, x) within the lesion's bounding box
        corner = offset + [b.start for b in box]
        z, length, long_ends = _key_slice(sub, in_plane)
        width, short_ends = short_axis(sub[z], in_plane, long_ends)
        shift = corner[1:].astype(np.float64)
        centre = np.argwhere(sub[z]).mean(axis=0) + shift
        mean_hu = None
        if hu is not None:
            mean_hu = float(np.asarray(hu)[tuple(slice(c, c + n) for c, n in zip(corner, sub.shape))][sub].mean())
        found.append(Lesion(0, int(sub.sum()), int(z + corner[0]), (int(corner[0]), int(corner[0] + sub.shape[0] - 1)),
                            Axes(length, width, long_ends + shift, short_ends + shift),
                            (float(centre[0]), float(centre[1])), mean_hu))
    found.sort(key=lambda lesion: -lesion.voxels)
    return [replace(lesion, id=rank) for rank, lesion in enumerate(found, start=1)]


def recist_measurable(long_axis_mm: float, slice_mm: float) -> bool:
    """RECIST 1.1's measurability on CT: a long axis of at least 10 mm, or of twice the slice thickness
    where that is over 5 mm (here the slice spacing, `slice_mm`)."""
    return long_axis_mm >= max(RECIST_MIN_LONG_AXIS_MM, 2.0 * float(slice_mm)) - _TOL_MM


def recist_targets(records: Sequence[dict]) -> list[int]:
    """Ids of RECIST 1.1's target lesions among `lesion_record`s of one liver: the measurable ones with
    the longest long axes, at most two (ties: the larger lesion, that is the lower id)."""
    measurable = [d for d in records if d.get("measurable")]
    ranked = sorted(measurable, key=lambda d: (-d["long_axis_mm"], d["id"]))
    return [d["id"] for d in ranked[:RECIST_TARGETS_PER_ORGAN]]


def recist_role(record: dict, targets: Sequence[int]) -> str:
    """What RECIST 1.1 makes of one lesion record, for a table or a printout: "target", "measurable"
    (not among the targets) or "" (too small to measure)."""
    return "target" if record["id"] in targets else "measurable" if record["measurable"] else ""


def lesion_record(lesion: Lesion, spacing: Sequence[float] | None, file_slice: Callable[[int], int] | None = None,
                  affine: np.ndarray | None = None) -> dict:
    """A lesion as a report names it. With `spacing` (dz, dy, dx): volume in mL, axes in mm, `slice` the
    key slice and `first_slice`, `last_slice` as the file numbers them (`file_slice` maps an index of
    the slices array to the file's own; default the same), and with `affine` (the slices array's
    (z, row, column) -> world RAS mm, `Geometry.slices_affine`) the key slice's in-plane centre in
    world coordinates: `centre_ras_mm` (NIfTI's RAS+: x grows towards the patient's right, y towards
    anterior, z towards superior) and `centre_lps_mm` (DICOM's LPS+: x towards the patient's left, y
    towards posterior; the same point); `measurable` is RECIST 1.1's rule (`recist_measurable`). Without
    spacing (a 2D image): pixels."""
    if spacing is None:
        return {"id": lesion.id, "pixels": lesion.voxels, "area_px": float(lesion.voxels),
                "long_axis_px": lesion.axes.long, "short_axis_px": lesion.axes.short}
    dz, dy, dx = (float(s) for s in spacing)
    to_file = file_slice or (lambda z: z)
    ends = sorted(to_file(z) for z in lesion.z_range)
    record = {"id": lesion.id, "voxels": lesion.voxels, "volume_ml": lesion.voxels * dz * dy * dx / 1000.0,
              "long_axis_mm": lesion.axes.long, "short_axis_mm": lesion.axes.short, "slice": to_file(lesion.z),
              "first_slice": ends[0], "last_slice": ends[1], "measurable": recist_measurable(lesion.axes.long, dz)}
    if lesion.mean_hu is not None:
        record["mean_hu"] = lesion.mean_hu
    if affine is not None:
        ras = (np.asarray(affine, dtype=np.float64) @ [lesion.z, *lesion.centre, 1.0])[:3]
        record["centre_ras_mm"] = [float(v) for v in ras]
        record["centre_lps_mm"] = [float(-ras[0]), float(-ras[1]), float(ras[2])]
    return record


def measure(labels: np.ndarray, spacing: Sequence[float] | None = None,
            file_slice: Callable[[int], int] | None = None, hu: np.ndarray | None = None,
            affine: np.ndarray | None = None, found: list[Lesion] | None = None) -> dict:
    """Liver, tumour and per-lesion numbers of a label volume (Z, H, W) in slices order.

    With `spacing` (dz, dy, dx) in mm: volumes in mL, axes in mm, slices as the file numbers them
    (`file_slice`), mean HU with `hu`, centres in world coordinates with `affine` (`lesion_record`).
    Without spacing (2D images): areas and axes in pixels. Tumour burden = tumour / liver in %, 0 for
    a volume without liver (a prediction without liver claims no tumour, as evaluate.py counts it).
    With spacing also RECIST 1.1's target lesions (`recist_targets`) and the sum of their long axes.
    `found` passes lesions already measured (`measure_lesions`) instead of measuring them again."""
    labels = np.asarray(labels)
    block = nonzero_box(labels)
    sub = labels[block] if block is not None else labels[:0]  # numbers count nonzero voxels only
    liver_n, tumor_n = int(np.count_nonzero(sub >= 1)), int(np.count_nonzero(sub == 2))
    if found is None:
        found = measure_lesions(labels, spacing or (1.0, 1.0, 1.0), hu)
    if spacing is not None:
        dz, dy, dx = (float(s) for s in spacing)
        unit, scale = "volume_ml", dz * dy * dx / 1000.0
    else:
        unit, scale = "area_px", 1.0
    burden = tumor_burden(sub) if liver_n else 0.0
    records = [lesion_record(lesion, spacing, file_slice, affine) for lesion in found]
    result = {
        f"liver_{unit}": liver_n * scale,
        f"tumor_{unit}": tumor_n * scale,
        "tumor_burden_percent": 100.0 * burden,
        "num_lesions": len(found),
        "lesions": records,
    }
    if spacing is not None:
        targets = recist_targets(records)
        result["recist_target_lesions"] = targets
        result["recist_sum_long_axes_mm"] = float(sum(d["long_axis_mm"] for d in records if d["id"] in targets))
    return result
