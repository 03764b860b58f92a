"""Write phantoms of a second, differently built family, for held-out checks only (never to train on).

    python benchmarks/heldout_phantoms.py --out-dir data/heldout_b            # 10 cases, seed 2027, 160 px

`phantom.py` (the demo's and the training tables' phantoms) draws organs as ellipses on a normalised
grid, a lobulated liver from one noise-bent ellipse, 10-60 mm lesions of one flat contrast, white noise,
1.5-5 mm slices. A model that only learnt that generator shows it here. This family is built another
way, in millimetres, and stored as messy real files are:

- anatomy: a superelliptic body with ribs, a stomach holding air and fluid, a gallbladder (a fluid
  pocket beside the liver, a hypodense look-alike that is not tumour), an IVC and a portal vein, a
  spleen; the liver a smoothed union of three rotated ellipsoids (right lobe, left lobe across the
  midline, caudate), 45-130 HU (unenhanced and fatty to portal-venous);
- lesions: 0-6 per case, half of them 3-10 mm across, the rest 10-45 mm; hypodense (-15 to -80 HU),
  hyperdense (+20 to +60 HU) or rim-enhancing (a dark core in a 2-3 mm bright ring, the label
  covering both), with soft edges;
- image: partial-volume blur, spatially correlated noise of 6-25 HU, slices 0.7-5 mm thick over a
  140-200 mm field;
- storage: int16, or uint16 with a -1024 intercept in the header; labels as uint8 or float32; an
  identity affine (as 3D-IRCADb's LiTS volumes), a silent left-right mirror, or honest flipped axes;
  .nii and .nii.gz mixed.

The files go through exactly the code LiTS files go through: `predict_segmentation.py --input
data/heldout_b`, `evaluate.py --gt data/heldout_b`, `benchmarks/eval_classifier.py --data-dir data/heldout_b`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from volumes import atomic_output  # noqa: E402


def _ellipsoid(x, y, z, centre, radii, angle: float) -> np.ndarray:
    """Points (mm grids x, y, z) inside an ellipsoid rotated by `angle` (radians) in the axial plane."""
    dx, dy, dz = x - centre[0], y - centre[1], z - centre[2]
    c, s = np.cos(angle), np.sin(angle)
    u, v = c * dx + s * dy, -s * dx + c * dy
    return (u / radii[0]) ** 2 + (v / radii[1]) ** 2 + (dz / radii[2]) ** 2 <= 1.0


def _lesion(rng, hu, labels, liver, depth, x, y, z, spacing, liver_hu) -> None:
    """One lesion drawn into `hu` and `labels` (label 2 inside the liver only)."""
    small = rng.random() < 0.5
    diameter = rng.uniform(3.0, 10.0) if small else rng.uniform(10.0, 45.0)
    r = diameter / 2
    inside = np.argwhere(depth >= min(max(r * 0.6, 2.0), depth.max()))
    c = inside[rng.integers(len(inside))]
    centre = (x[c[0], 0, 0], y[0, c[1], 0], z[0, 0, c[2]])
    radii = (r * rng.uniform(0.8, 1.2), r * rng.uniform(0.8, 1.2), r * rng.uniform(0.8, 1.2))
    shape = _ellipsoid(x, y, z, centre, radii, rng.uniform(0, np.pi)) & liver
    if not shape.any():
        return
    kind = rng.choice(["hypo", "hyper", "rim"], p=[0.55, 0.2, 0.25])
    soft = ndimage.gaussian_filter(shape.astype(np.float32), sigma=[0.8 / s for s in spacing])
    if kind == "rim":
        core = ndimage.binary_erosion(shape, iterations=max(1, int(round(2.5 / spacing[0]))))
        value = np.where(core, liver_hu - rng.uniform(25, 70), liver_hu + rng.uniform(30, 70))
        value = ndimage.gaussian_filter(value.astype(np.float32), sigma=[0.6 / s for s in spacing])
    else:
        contrast = -rng.uniform(15, 80) if kind == "hypo" else rng.uniform(20, 60)
        value = liver_hu + contrast
    hu[:] = hu * (1 - soft) + soft * value
    labels[shape] = 2


def make_case(seed: int, size: int = 160) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """(hu (X, Y, Z) float32 in RAS voxel order, labels (X, Y, Z) uint8, spacing in mm)."""
    rng = np.random.default_rng(seed)
    fov = rng.uniform(300.0, 420.0)
    dxy, dz = fov / size, float(rng.uniform(0.7, 5.0))
    nz = max(12, int(round(rng.uniform(140.0, 200.0) / dz)))
    spacing = (dxy, dxy, dz)
    x = ((np.arange(size) - size / 2) * dxy).astype(np.float32)[:, None, None]  # RAS: the patient's right is +
    y = ((np.arange(size) - size / 2) * dxy).astype(np.float32)[None, :, None]  # anterior is +
    z = ((np.arange(nz) - nz / 2) * dz).astype(np.float32)[None, None, :]       # superior is +

    hu = np.full((size, size, nz), -1000.0, dtype=np.float32)
    a, b, p = rng.uniform(140, 175), rng.uniform(100, 130), rng.uniform(2.3, 3.5)
    shell = lambda shrink: (np.abs(x) / (a - shrink)) ** p + (np.abs(y - 10) / (b - shrink)) ** p <= 1  # noqa: E731
    wall = rng.uniform(12, 30)
    body, inner, cavity = shell(0), shell(wall), shell(wall + rng.uniform(8, 15))
    hu[np.broadcast_to(body, hu.shape)] = rng.uniform(-120, -80)
    hu[np.broadcast_to(inner, hu.shape)] = rng.uniform(35, 60)  # abdominal wall muscle
    # The cavity: bowel and mesenteric fat in lobules, over which the organs are drawn.
    lobules = ndimage.gaussian_filter(rng.standard_normal(hu.shape).astype(np.float32), sigma=[7 / s for s in spacing])
    hu[np.broadcast_to(cavity, hu.shape)] = rng.uniform(15, 45)
    hu[np.broadcast_to(cavity, hu.shape) & (lobules > rng.uniform(0.0, 0.3) * lobules.std())] = rng.uniform(-110, -70)
    angles = np.linspace(0.15 * np.pi, 0.85 * np.pi, 9)
    for t in np.concatenate([angles, angles + np.pi]):  # ribs, in the body wall
        rib = ((x - 0.9 * a * np.cos(t)) ** 2 + (y - 10 - 0.9 * b * np.sin(t)) ** 2) <= 36
        hu[np.broadcast_to(rib & body, hu.shape)] = rng.uniform(400, 900)
    spine = (x ** 2 + (y + b * 0.65) ** 2) <= (16 + rng.uniform(-2, 3)) ** 2
    hu[np.broadcast_to(spine, hu.shape)] = rng.uniform(300, 600)
    aorta = ((x + 12) ** 2 + (y + b * 0.35) ** 2) <= 11 ** 2
    ivc = ((x - 22) ** 2 + (y + b * 0.3) ** 2) <= 12 ** 2
    contrast_phase = rng.random() < 0.75
    hu[np.broadcast_to(aorta, hu.shape)] = rng.uniform(150, 250) if contrast_phase else 45
    liver_hu = rng.uniform(95, 130) if contrast_phase else rng.uniform(45, 65)
    liver_hu -= rng.uniform(0, 30) * (rng.random() < 0.2)  # some fatty livers

    # Liver: right lobe (+x), left lobe across the midline, caudate; smoothed union.
    top = rng.uniform(20, 70)
    right = _ellipsoid(x, y, z, (a * rng.uniform(0.35, 0.5), rng.uniform(-15, 15), top - rng.uniform(40, 60)),
                       (rng.uniform(55, 75), rng.uniform(60, 85), rng.uniform(55, 80)), rng.uniform(-0.4, 0.4))
    left = _ellipsoid(x, y, z, (-rng.uniform(-10, 30), rng.uniform(20, 50), top - rng.uniform(20, 40)),
                      (rng.uniform(35, 60), rng.uniform(20, 35), rng.uniform(25, 40)), rng.uniform(-0.5, 0.5))
    caudate = _ellipsoid(x, y, z, (rng.uniform(5, 25), -rng.uniform(10, 30), top - 50),
                         (rng.uniform(12, 20), rng.uniform(12, 20), rng.uniform(20, 35)), 0.0)
    liver = ndimage.gaussian_filter((right | left | caudate).astype(np.float32),
                                    sigma=[6.0 / s for s in spacing]) > 0.5
    liver &= np.broadcast_to(inner & ~spine & ~aorta, hu.shape)
    texture = ndimage.gaussian_filter(rng.standard_normal(hu.shape).astype(np.float32), sigma=[3 / s for s in spacing])
    hu[liver] = liver_hu + 40 * texture[liver]
    hu[np.broadcast_to(ivc, hu.shape)] = liver_hu + rng.uniform(-10, 40)
    portal = _ellipsoid(x, y, z, (a * 0.25, 0, top - 55), (40, 5, 5), rng.uniform(-0.3, 0.3)) & liver
    hu[portal] = liver_hu + (rng.uniform(30, 70) if contrast_phase else -10)

    # Organs that border or mimic liver: spleen (on the patient's left, -x), stomach, gallbladder.
    spleen = _ellipsoid(x, y, z, (-a * 0.6, -b * 0.2, top - 60), (rng.uniform(25, 40), rng.uniform(35, 55), 45),
                        rng.uniform(-0.6, 0.6)) & np.broadcast_to(inner, hu.shape) & ~liver
    hu[spleen] = liver_hu + rng.uniform(-10, 20)
    stomach = _ellipsoid(x, y, z, (-a * 0.3, b * 0.3, top - 45), (40, 35, 40), rng.uniform(-0.5, 0.5))
    stomach &= np.broadcast_to(inner, hu.shape) & ~liver & ~spleen
    air = stomach & (y > b * 0.3 + rng.uniform(0, 20))
    hu[stomach] = rng.uniform(5, 35)
    hu[air] = -900
    gall = _ellipsoid(x, y, z, (a * 0.3, b * 0.35, top - 90), (14, 22, 28), rng.uniform(-0.5, 0.5))
    gall &= np.broadcast_to(inner, hu.shape) & ~stomach
    if rng.random() < 0.7:
        hu[gall] = rng.uniform(0, 20)
        liver &= ~gall

    labels = liver.astype(np.uint8)
    count = int(rng.choice(7, p=[0.2, 0.2, 0.2, 0.15, 0.1, 0.1, 0.05])) if liver.any() else 0
    depth = ndimage.distance_transform_edt(liver, sampling=spacing) if count else None
    for _ in range(count):
        _lesion(rng, hu, labels, liver, depth, x, y, z, spacing, liver_hu)
    hu = ndimage.gaussian_filter(hu, sigma=[0.7, 0.7, min(0.7, 1.5 / dz)])  # partial volume
    noise = ndimage.gaussian_filter(rng.standard_normal(hu.shape).astype(np.float32), sigma=(0.9, 0.9, 0.0))
    hu += noise * rng.uniform(6, 25) / max(noise.std(), 1e-6)
    return hu, labels, spacing


def write_case(out_dir: Path, index: int, seed: int, size: int) -> str:
    """volume-<index> / segmentation-<index> of this family, stored one of its messy ways; returns how."""
    rng = np.random.default_rng([seed, index])
    hu, labels, spacing = make_case(int(rng.integers(2**31)), size)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = -affine[:3, :3] @ (np.array(hu.shape) / 2)
    how = ("identity", "mirrored", "flipped", "flipped")[index % 4]
    if how == "identity":  # rows stored anterior to posterior under an identity affine, as 3D-IRCADb's
        hu, labels, affine = hu[:, ::-1], labels[:, ::-1], np.eye(4)
    elif how == "mirrored":  # left and right swapped in the array, the affine unchanged
        hu, labels = hu[::-1], labels[::-1]
    else:
        for ax in np.flatnonzero(rng.random(3) < [0.6, 0.6, 0.4]):
            hu, labels = np.flip(hu, ax), np.flip(labels, ax)
            affine[:3, 3] += affine[:3, ax] * (hu.shape[ax] - 1)
            affine[:3, ax] *= -1
    hu = np.clip(np.round(hu), -1024, 3071)
    stored_uint16 = index % 2 == 1
    img = nib.Nifti1Image(np.ascontiguousarray(hu + 1024 if stored_uint16 else hu).astype(
        np.uint16 if stored_uint16 else np.int16), affine)
    if stored_uint16:
        img.header.set_slope_inter(1.0, -1024.0)
    seg = nib.Nifti1Image(np.ascontiguousarray(labels).astype(np.float32 if index % 3 == 0 else np.uint8), affine)
    ext = ".nii.gz" if index % 2 == 0 else ".nii"
    for image, name in ((img, f"volume-{index}{ext}"), (seg, f"segmentation-{index}{ext}")):
        image.set_qform(affine, code=1)
        image.set_sform(affine, code=1)
        with atomic_output(out_dir / name) as tmp:
            nib.save(image, tmp)
    lesions = int(ndimage.label(labels == 2)[1])
    return (f"{how}, {'uint16 + intercept' if stored_uint16 else 'int16'}, {hu.shape[2]} slices of {spacing[2]:.1f} mm, "
            f"{lesions} lesion(s)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out-dir", type=Path, required=True, help="folder for volume-N / segmentation-N")
    p.add_argument("--cases", type=int, default=10, help="number of cases")
    p.add_argument("--seed", type=int, default=2027, help="random seed")
    p.add_argument("--size", type=int, default=160, help="in-plane size in voxels")
    args = p.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for i in range(args.cases):
        print(f"volume-{i}: {write_case(args.out_dir, i, args.seed, args.size)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
