"""A synthetic abdominal CT phantom in the LiTS file layout, for the demo and the tests.

    python dataset.py synth --out-dir data/synthetic --cases 12 --size 128 --seed 0

`write_phantom_case` writes one phantom as LiTS NIfTI files (volume-N, segmentation-N), with its axes
stored flipped as scanners and LiTS files often are; `write_phantom_dicom` writes a CT volume as a
DICOM series (one file per slice), so DICOM input is tested on real files with the orientations
scanners produce. `write_phantom_ircadb` and `write_phantom_seg_study` write a phantom's LiTS files again
as a 3D-IRCADb patient folder and as a DICOM study with a SEG (TCIA's layout), so the DICOM training
layouts are tested against their NIfTI twin. All go through exactly the loading code real data goes through.
"""
from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from volumes import atomic_output


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], cells: int) -> np.ndarray:
    """Smooth random field in about [-1, 1]: coarse noise upsampled with linear interpolation."""
    from scipy.ndimage import zoom
    coarse = rng.standard_normal(tuple(max(2, min(cells, s)) for s in shape)).astype(np.float32)
    field_ = zoom(coarse, [s / c for s, c in zip(shape, coarse.shape)], order=1)
    return field_[tuple(slice(0, s) for s in shape)] / 1.5


def _ellipsoid_radius2(shape: tuple[int, int, int], centre, radii: np.ndarray) -> np.ndarray:
    """Squared normalised distance from `centre` on a grid of `shape` (<= 1 inside the ellipsoid with
    semi-axes `radii`, in voxels), computed in the radii's dtype."""
    gx, gy, gz = ((np.arange(n, dtype=radii.dtype) - c) / r for n, c, r in zip(shape, centre, radii))
    return gx[:, None, None] ** 2 + gy[None, :, None] ** 2 + gz[None, None, :] ** 2


NOISE_MAX_HU = 22.0  # the noisiest phantom's noise (standard deviation)
ROSE_K = 3.6  # contrast x radius / noise a lesion needs to be seen (Rose's criterion, in mm)


def visible_contrast(u: float, radius_mm: float) -> float:
    """The contrast (HU, magnitude) of a lesion of `radius_mm` for a uniform draw `u` in [0, 1): over
    10-60 HU, from a floor that keeps it visible at the noisiest level the phantom draws. A reader
    finds a round lesion when contrast x radius / noise reaches a few units (Rose's criterion); a
    radiologist's reference marks only lesions that can be seen, and a lesion drawn fainter than the
    noise would teach a network to call noise tumour. The floor is 40 HU at 2 mm radius, 20 HU at 4 mm
    and 10 HU from 8 mm."""
    floor = min(max(10.0, ROSE_K * NOISE_MAX_HU / radius_mm), 60.0)
    return floor + float(u) * (60.0 - floor)


def make_phantom(size: int = 128, num_slices: int | None = None, seed: int = 0,
                 num_tumors: int | None = None,
                 steatosis: bool | None = None) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """A CT-like abdominal phantom in canonical RAS voxel order (x: left -> right, y: posterior ->
    anterior, z: inferior -> superior).

    Returns (hu (X, Y, Z) int16, labels (X, Y, Z) uint8 with 0/1/2, spacing in mm). Body, fat,
    muscle, bowel loops holding fluid (0-30 HU) or gas in enhancing walls, a stomach with an air cap,
    ribs, spine, aorta, spleen, kidneys, a textured lobulated liver with vessels and, four cases
    in five, a gallbladder in its fossa (bile, labelled background), scanned
    portal-venous (liver 95-120 HU) or, one case in four, unenhanced (liver 15-30 HU above muscle);
    one liver in five fatty (`steatosis`, or None to draw it): 15-50 HU darker than it would be, in
    either phase, so below its spleen and, unenhanced, down to or below muscle, its vessels and
    spleen left as they were (fat lowers the parenchyma, not the blood);
    0-4 tumors inside it, 4-60 mm across (a third under 10 mm), hypodense, hyperdense or
    rim-enhancing (10-60 HU contrast to the liver as it is, and enough of it to be seen at that size:
    `visible_contrast`); and noise of 8-22 HU correlated over neighbouring pixels, as a CT
    reconstruction kernel leaves it."""
    from scipy.ndimage import distance_transform_edt, gaussian_filter
    rng = np.random.default_rng(seed)
    nz = num_slices or int(rng.integers(size // 3, size // 2 + 1))
    xy_mm = 360.0 / size * rng.uniform(0.85, 1.1)
    z_mm = float(rng.uniform(1.5, 5.0))
    u = np.linspace(-1, 1, size, dtype=np.float32)[:, None, None]   # x, patient right is +
    v = np.linspace(-1, 1, size, dtype=np.float32)[None, :, None]   # y, anterior is +
    w = np.linspace(0, 1, nz, dtype=np.float32)[None, None, :]      # z, superior is +

    hu = np.full((size, size, nz), -1000.0, dtype=np.float32)
    bx, by = rng.uniform(0.78, 0.9), rng.uniform(0.58, 0.7)
    body = (u / bx) ** 2 + (v / by) ** 2 <= 1.0
    muscle = (u / (bx - 0.07)) ** 2 + (v / (by - 0.07)) ** 2 <= 1.0
    hu = np.where(body, -100.0, hu)          # subcutaneous fat
    muscle_hu = rng.uniform(40, 55)
    hu = np.where(muscle, muscle_hu, hu)  # muscle and bowel soft tissue
    hu = np.where(muscle & (_smooth_noise(rng, (size, size, nz), 6) > 0.6), -80.0, hu)  # visceral fat
    # Bowel and a stomach, from a stream of their own: fluid (0-30 HU) and gas in loops with enhancing
    # walls at every level, the stomach high on the patient's left with an air cap. Every abdomen has
    # them, and a fluid-filled loop against the liver is a hypodense blob that is no lesion.
    gut = np.random.default_rng([seed, 3])
    loops = _smooth_noise(gut, (size, size, nz), max(4, size // 10))
    gas = _smooth_noise(gut, (size, size, nz), max(3, size // 20)) > gut.uniform(0.3, 0.7)
    inner_wall = (u / (bx - 0.12)) ** 2 + (v / (by - 0.12)) ** 2 <= 1.0
    wall = inner_wall & (loops > 0.12)
    lumen = inner_wall & (loops > 0.22)
    hu = np.where(wall, muscle_hu + gut.uniform(0, 30), hu)
    hu = np.where(lumen, np.where(gas, -900.0, gut.uniform(0, 30)), hu)
    sr = gut.uniform(0.14, 0.22)
    stomach_r2 = ((u + 0.3) / sr) ** 2 + ((v - 0.2) / (0.8 * sr)) ** 2 + ((w - 0.8) / 0.25) ** 2
    hu = np.where(inner_wall & (stomach_r2 <= 1), muscle_hu + 10.0, hu)
    stomach = inner_wall & (stomach_r2 <= 0.7)
    hu = np.where(stomach, np.where(v > 0.2 + gut.uniform(0.0, 0.6) * sr, -900.0, gut.uniform(5, 35)), hu)
    spine = (u ** 2 + (v + by * 0.7) ** 2) <= 0.11 ** 2
    hu = np.where(np.broadcast_to(spine, hu.shape), 500.0, hu)
    aorta = ((u + 0.08) ** 2 + (v + by * 0.42) ** 2) <= 0.05 ** 2
    # Ribs: cross-sections at the inner edge of the body wall in the upper abdomen, moving along it
    # from slice to slice as oblique bones do: bright structures that touch the liver, not part of it.
    ribs = np.zeros(hu.shape, dtype=bool)
    for t in np.linspace(0.1, 0.9, 7) * np.pi:
        for a in (t + 0.25 * (w - 0.5), -t + 0.25 * (w - 0.5)):
            rib = (u - (bx - 0.065) * np.cos(a)) ** 2 + (v - (by - 0.065) * np.sin(a)) ** 2 <= 0.025 ** 2
            ribs |= rib & (w > 0.3)

    # Organs as in a portal-venous scan (a spleen on the patient's left about as bright as the liver,
    # so position and shape matter, not brightness alone, and two bright kidneys), or unenhanced.
    enhanced = rng.random() < 0.75
    hu = np.where(np.broadcast_to(aorta, hu.shape), 170.0 if enhanced else 45.0, hu)
    liver_hu = rng.uniform(95, 120) if enhanced else muscle_hu + rng.uniform(15, 30)  # unenhanced: 55-85 HU
    with np.errstate(divide="ignore", invalid="ignore"):
        sp = np.clip(np.sin(np.pi * (w - 0.45) / 0.5), 0, None) ** 0.6
        spleen = (((u + 0.45) / (0.12 * sp)) ** 2 + ((v + 0.18) / (0.2 * sp)) ** 2) <= 1
        kp = np.clip(np.sin(np.pi * (w - 0.05) / 0.45), 0, None) ** 0.6
        kidneys = (((np.abs(u) - 0.3) / (0.08 * kp)) ** 2 + ((v + by * 0.55) / (0.12 * kp)) ** 2) <= 1
    hu = np.where(spleen & muscle, liver_hu + rng.uniform(-5, 15), hu)
    hu = np.where(kidneys & muscle, rng.uniform(150, 190) if enhanced else rng.uniform(30, 40), hu)
    # Hepatic steatosis, common in real CT, drawn from a stream of its own so that the rest of a seed's
    # phantom is the same with or without it: the parenchyma only (lesions keep their contrast to it).
    fat = np.random.default_rng([seed, 1])
    drawn, drop = bool(fat.random() < 0.2), float(fat.uniform(15, 50))  # both drawn either way
    vessel_base = liver_hu  # blood, not parenchyma: as bright with a fatty liver as without
    fatty = drawn if steatosis is None else steatosis
    if fatty:
        liver_hu -= drop

    # Liver on the patient's right, largest in mid-upper slices, with a lobulated outline.
    z0, z1 = rng.uniform(0.1, 0.25), rng.uniform(0.75, 0.95)
    profile = np.clip(np.sin(np.pi * (w - z0) / (z1 - z0)), 0, None) ** 0.6
    cx, cy = rng.uniform(0.3, 0.4), rng.uniform(-0.05, 0.1)
    rx, ry = rng.uniform(0.3, 0.38) * profile, rng.uniform(0.3, 0.4) * profile
    lobes = 1 + 0.18 * _smooth_noise(rng, (size, size, nz), 5)
    with np.errstate(divide="ignore", invalid="ignore"):
        liver = (((u - cx) / rx) ** 2 + ((v - cy) / ry) ** 2) <= lobes
    soft = muscle & ~np.broadcast_to(spine | aorta, hu.shape) & ~ribs  # where organs may lie
    liver &= soft
    hu = np.where(liver, liver_hu + 8.0 * _smooth_noise(rng, hu.shape, max(4, size // 8)), hu)
    vessels = np.abs(_smooth_noise(rng, hu.shape, 7)) < 0.04
    hu = np.where(liver & vessels, vessel_base + (rng.uniform(40, 80) if enhanced else -rng.uniform(10, 25)), hu)
    # A gallbladder in four cases of five: bile (0-25 HU) in the fossa of the liver's lower, anterior,
    # medial surface, half sunk into it. Not liver: a dark oval the liver wraps that is no lesion.
    if liver.any() and rng.random() < 0.8:
        r_mm = rng.uniform(12.0, 20.0)
        depth_mm = distance_transform_edt(liver, sampling=(xy_mm, xy_mm, z_mm))
        lz = np.flatnonzero(liver.any(axis=(0, 1)))
        fossa = (depth_mm > 0.3 * r_mm) & (depth_mm < 0.8 * r_mm) & (u < cx) & (v > cy)
        fossa &= (np.arange(nz) < lz[0] + 0.5 * (lz[-1] - lz[0] + 1))[None, None, :]
        pts = np.argwhere(fossa)
        if len(pts):
            c = pts[rng.integers(len(pts))]
            rads = np.array([r_mm / xy_mm, r_mm / xy_mm * rng.uniform(0.7, 1.0), rng.uniform(25.0, 40.0) / z_mm])
            gallbladder = (_ellipsoid_radius2(hu.shape, c, rads) <= 1) & soft
            liver &= ~gallbladder
            hu = np.where(gallbladder, rng.uniform(0, 25), hu)
    hu = np.where(ribs & body, rng.uniform(350, 700), hu)

    labels = liver.astype(np.uint8)
    if not liver.any():
        num_tumors = 0
    elif num_tumors is None:
        num_tumors = int(rng.choice([0, 1, 2, 3, 4], p=[0.2, 0.3, 0.25, 0.15, 0.1]))
    # Lesions of 4-60 mm diameter, log-uniform (a third under 10 mm), centred at least half a radius
    # inside the liver so that most of each lies in it (LiTS lesions range from a few mm to over 10 cm).
    depth_mm = distance_transform_edt(liver, sampling=(xy_mm, xy_mm, z_mm)) if num_tumors else None
    for _ in range(num_tumors):
        r_mm = float(np.exp(rng.uniform(np.log(2.0), np.log(30.0))))
        pts = np.argwhere(depth_mm >= min(0.5 * r_mm, depth_mm.max()))
        c = pts[rng.integers(len(pts))].astype(np.float32)
        rads = np.array([r_mm / xy_mm, r_mm / xy_mm * rng.uniform(0.7, 1.3), r_mm / z_mm], dtype=np.float32)
        radius2 = _ellipsoid_radius2(hu.shape, c, np.array([rads[0], rads[1], max(rads[2], 0.6)], dtype=np.float32))
        blob = radius2 <= 1 + 0.15 * _smooth_noise(rng, hu.shape, 6)
        blob &= liver
        # Most lesions are hypodense; some hyperdense; some a dark core in a bright rim 2-3 mm wide, the
        # label covering both (metastases often look so in the portal-venous phase).
        kind = rng.choice(["hypo", "hyper", "rim"], p=[0.6, 0.2, 0.2])
        contrast = visible_contrast(rng.uniform(0, 1), r_mm) * (1 if kind == "hyper" else -1)
        value = liver_hu + contrast + 5.0 * _smooth_noise(rng, hu.shape, max(4, size // 8))
        if kind == "rim" and r_mm > 4.0:
            rim_px = rng.uniform(2.0, 3.0) / xy_mm
            inner = radius2 <= (1 - rim_px / min(rads[0], rads[1])) ** 2
            value = np.where(inner, value, liver_hu + rng.uniform(20, 50))
        hu = np.where(blob, value, hu)
        labels[blob] = 2

    # CT noise is not white: the reconstruction kernel correlates it over neighbouring pixels.
    noise = rng.standard_normal(hu.shape).astype(np.float32)
    kernel = rng.uniform(0.6, 1.2)
    noise = gaussian_filter(noise, sigma=(kernel, kernel, 0.0))
    hu += noise * (rng.uniform(8, NOISE_MAX_HU) / max(float(noise.std()), 1e-6))
    return np.clip(np.round(hu), -1024, 3071).astype(np.int16), labels, (xy_mm, xy_mm, z_mm)


def write_phantom_case(out_dir: str | Path, index: int, size: int = 128, seed: int = 0,
                       flips: tuple[bool, bool, bool] | None = None, compress: bool = False,
                       num_slices: int | None = None, num_tumors: int | None = None,
                       wrong_affine: str | None = None) -> tuple[Path, Path]:
    """Write one phantom as LiTS files volume-<index>.nii[.gz] and segmentation-<index>.nii[.gz].

    `flips` stores the array with those axes reversed and an affine that says so (as scanners and
    LiTS files do), so loading must undo it; by default drawn at random from the seed.
    `wrong_affine` writes a file whose affine lies, as real ones sometimes do: "identity" stores the
    rows anterior to posterior under an identity affine (as LiTS's 3D-IRCADb volumes 28-47 are:
    upside down once reoriented), "mirrored" flips the patient's left and right without saying so."""
    if wrong_affine not in (None, "identity", "mirrored"):
        raise ValueError(f"wrong_affine must be None, 'identity' or 'mirrored', got {wrong_affine!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, index])
    hu, labels, spacing = make_phantom(size, num_slices, seed=int(rng.integers(2**31)), num_tumors=num_tumors)
    if flips is None:
        flips = tuple(bool(f) for f in rng.random(3) < [0.6, 0.6, 0.3])
    if wrong_affine is not None:
        flips = (False, False, False)  # the lie is told about the volume as made: RAS voxel order
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] -= affine[:3, :3] @ (np.array(hu.shape) / 2)  # world origin near the volume centre
    for ax, flip in enumerate(flips):
        if flip:  # same anatomy at the same world position, stored in reverse voxel order
            hu, labels = np.flip(hu, ax), np.flip(labels, ax)
            affine[:3, 3] += affine[:3, ax] * (hu.shape[ax] - 1)
            affine[:3, ax] *= -1
    if wrong_affine == "identity":
        hu, labels = np.flip(hu, 1), np.flip(labels, 1)  # anterior-posterior flipped, as the file's data was
        affine = np.eye(4)
    elif wrong_affine == "mirrored":
        hu, labels = np.flip(hu, 0), np.flip(labels, 0)  # the array mirrored, the affine unchanged
    ext = ".nii.gz" if compress else ".nii"
    paths = (out_dir / f"volume-{index}{ext}", out_dir / f"segmentation-{index}{ext}")
    for arr, path in zip((np.ascontiguousarray(hu), np.ascontiguousarray(labels)), paths):
        img = nib.Nifti1Image(arr, affine)
        img.header.set_xyzt_units("mm", "sec")
        img.set_qform(affine, code=1)
        img.set_sform(affine, code=1)
        with atomic_output(path) as tmp:
            nib.save(img, tmp)
    return paths


def write_synthetic_lits(out_dir: str | Path, cases: int = 12, size: int = 128, seed: int = 0,
                         compress: bool = False, progress: bool = False) -> list[tuple[Path, Path]]:
    """Write `cases` phantoms in the LiTS layout; deterministic for a given seed."""
    from tqdm import tqdm
    return [write_phantom_case(out_dir, i, size=size, seed=seed, compress=compress)
            for i in tqdm(range(cases), desc="writing phantoms", unit="case", disable=not progress,
                          file=sys.stderr)]

_LPS = np.diag([-1.0, -1.0, 1.0])


def write_phantom_dicom(out_dir: str | Path, hu: np.ndarray, affine: np.ndarray, *, seed: int = 0,
                        series_number: int = 1, series_uid: str | None = None, study_uid: str | None = None,
                        frame_of_reference: bool = True, transfer_syntax: str | None = None,
                        suffix: str = ".dcm", patient_position: str = "HFS", rescale: bool = True) -> list[Path]:
    """Write a CT volume as a DICOM series (CT Image Storage), one file per slice of its third axis.

    `hu` (X, Y, Z) holds whole HU values in the file's voxel order and `affine` is its NIfTI-style
    voxel -> world (RAS, mm) matrix, as nibabel gives them for a phantom's volume-N.nii. Slice k
    becomes S<series_number>_IM<k><suffix> with pixels hu[:, :, k].T (rows, columns); ImagePositionPatient is voxel
    (0, 0, k) in LPS, ImageOrientationPatient and PixelSpacing come from the affine's first two
    columns (a flipped axis gives -1 components), so the series lies exactly where the NIfTI volume
    lies. An affine whose third column leaves the slice normal writes a gantry-tilted series.
    Pixels are stored unsigned with RescaleIntercept -1024 (as many scanners store them), so a reader
    must apply the rescale. `transfer_syntax` compresses the pixel data (e.g.
    pydicom.uid.JPEG2000Lossless or RLELossless); `frame_of_reference=False` leaves
    FrameOfReferenceUID out, as some public series (3D-IRCADb) do; `series_uid=""` writes an empty
    SeriesInstanceUID, as some anonymisers do; `rescale=False` stores the values as they are, without
    rescale attributes (as 3D-IRCADb's 0/255 mask series are). UIDs not given are derived from `seed` and
    `series_number`, so a rerun writes the same files. Returns the paths in k order."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
    from pydicom.valuerep import format_number_as_ds

    def ds_values(values: Sequence[float]) -> list[str]:
        return [format_number_as_ds(float(v)) for v in values]

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hu = np.asarray(hu)
    affine = np.asarray(affine, dtype=np.float64)
    if hu.ndim != 3:
        raise ValueError(f"expected a volume (X, Y, Z), got shape {hu.shape}")
    study_uid = study_uid or generate_uid(entropy_srcs=["phantom study", str(seed)])
    if series_uid is None:
        series_uid = generate_uid(entropy_srcs=["phantom series", str(seed), str(series_number)])
    frame_uid = generate_uid(entropy_srcs=["phantom frame", study_uid])
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    row_dir, col_dir = _LPS @ affine[:3, 0] / zooms[0], _LPS @ affine[:3, 1] / zooms[1]
    signed = float(hu.min()) < -1024  # only then is a signed store needed
    intercept = 0.0 if signed or not rescale else -1024.0
    stored = np.round(hu - intercept).astype(np.int16 if signed else np.uint16)
    paths = []
    for k in range(hu.shape[2]):
        sop_uid = generate_uid(entropy_srcs=[series_uid, str(seed), str(series_number), str(k)])
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = out_dir / f"S{series_number}_IM{k:04d}{suffix}"
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop_uid
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        if frame_of_reference:
            ds.FrameOfReferenceUID = frame_uid
        ds.Modality, ds.Manufacturer, ds.ImageType = "CT", "phantom.py", ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Phantom^Liver", f"PHANTOM-{seed}", "", "O"
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20260101", "120000", "1", ""
        ds.ReferringPhysicianName, ds.PatientPosition = "", patient_position
        ds.SeriesNumber, ds.InstanceNumber = series_number, k + 1
        ds.SeriesDescription = "synthetic liver phantom"
        ds.ImagePositionPatient = ds_values(_LPS @ (affine @ [0.0, 0.0, k, 1.0])[:3])
        ds.ImageOrientationPatient = ds_values([*row_dir, *col_dir])
        ds.PixelSpacing = ds_values([zooms[1], zooms[0]])  # between rows, between columns
        ds.SliceThickness = format_number_as_ds(float(zooms[2]))
        ds.Rows, ds.Columns = int(hu.shape[1]), int(hu.shape[0])
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, int(signed)
        if rescale:
            ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = format_number_as_ds(intercept), "1", "HU"
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()
        if transfer_syntax is not None:
            ds.compress(transfer_syntax)
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


# --------------------------------------------------------------------------------------------
# The same phantom in the DICOM layouts of annotated public data (3D-IRCADb, DICOM SEG collections)
# --------------------------------------------------------------------------------------------

def _nifti_twin(volume: Path, segmentation: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    img, seg = nib.load(str(volume)), nib.load(str(segmentation))
    return np.asanyarray(img.dataobj), np.asanyarray(seg.dataobj).astype(np.uint8), np.asarray(img.affine)


def _vein(labels: np.ndarray) -> np.ndarray:
    """A distractor structure inside the liver: a one-voxel tube along z through a liver voxel of the
    liver's middle slice, wherever that column is liver."""
    vein = np.zeros(labels.shape, dtype=bool)
    zs = np.flatnonzero((labels == 1).any(axis=(0, 1)))
    if len(zs):
        xs, ys = np.nonzero(labels[:, :, zs[len(zs) // 2]] == 1)
        vein[xs[len(xs) // 2], ys[len(ys) // 2], :] = labels[xs[len(xs) // 2], ys[len(ys) // 2], :] >= 1
    return vein


def write_phantom_ircadb(patient_dir: str | Path, volume: str | Path, segmentation: str | Path, *, seed: int = 0,
                         zipped: bool = False) -> Path:
    """Write a phantom's LiTS files (its NIfTI twin) again as a 3D-IRCADb patient folder: PATIENT_DICOM/
    image_0..image_N-1 (the CT) and MASKS_DICOM/<structure>/image_k, one 0/255 mask series per structure,
    as 3D-IRCADb distributes them: `liver` (labels 1 and 2), one `livertumorNN` per connected tumour
    (and `livertumors`, their union, where there are several), and distractors that are not liver
    tumour: `bone` (the spine), `tumor` (a lesion drawn outside the liver, as some patients have) and
    `portalvein` (a tube inside the liver). With `zipped`, the two folders become PATIENT_DICOM.zip and
    MASKS_DICOM.zip. Returns the patient folder."""
    import shutil
    import zipfile

    from pydicom.uid import generate_uid
    from scipy.ndimage import label as connected

    patient_dir = Path(patient_dir)
    hu, labels, affine = _nifti_twin(Path(volume), Path(segmentation))
    study = generate_uid(entropy_srcs=["phantom ircadb study", str(seed)])

    def series(folder: Path, values: np.ndarray, number: int, rescale: bool) -> None:
        for k, path in enumerate(write_phantom_dicom(folder, values, affine, seed=seed, series_number=number,
                                                     study_uid=study, frame_of_reference=False, suffix="",
                                                     rescale=rescale)):
            path.rename(folder / f"image_{k}")  # 3D-IRCADb's names, without suffix

    series(patient_dir / "PATIENT_DICOM", hu, 1, True)
    tumors, count = connected(labels == 2)
    structures = {"liver": labels >= 1, "bone": hu > 300}
    for i in range(1, count + 1):
        structures[f"livertumor{i:02d}"] = tumors == i
    if count > 1:
        structures["livertumors"] = labels == 2
    outside = (labels == 0) & (hu > -200)  # body outside the liver
    box = np.zeros_like(outside)
    nx, ny = labels.shape[:2]
    box[nx // 2 - nx // 8: nx // 2 + nx // 8, ny // 2 - ny // 8: ny // 2 + ny // 8, :] = True
    structures["tumor"] = outside & box
    structures["portalvein"] = _vein(labels)
    for j, (name, mask) in enumerate(sorted(structures.items())):
        series(patient_dir / "MASKS_DICOM" / name, mask.astype(np.uint16) * 255, 100 + j, False)
    if zipped:
        for part in ("PATIENT_DICOM", "MASKS_DICOM"):
            with zipfile.ZipFile(patient_dir / f"{part}.zip", "w", zipfile.ZIP_DEFLATED) as zf:
                for path in sorted((patient_dir / part).rglob("*")):
                    zf.write(path, path.relative_to(patient_dir).as_posix())
            shutil.rmtree(patient_dir / part)
    return patient_dir


def write_phantom_seg(path: str | Path, source_files: Sequence[str | Path], segments: dict[str, np.ndarray]) -> Path:
    """A DICOM SEG (BINARY, highdicom) of the CT series in `source_files` (written by `write_phantom_dicom`,
    in its k order) with one segment per item of `segments`: label -> bool mask (X, Y, Z) in the series'
    voxel order (as the NIfTI twin holds it). Segments may overlap (a liver segment that holds the
    tumours, as many annotators draw it)."""
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes

    sources = [pydicom.dcmread(p) for p in source_files]
    descriptions, planes = [], []
    for number, (label, mask) in enumerate(segments.items(), start=1):
        tumor = "liver" not in label.lower() or "tumo" in label.lower()
        descriptions.append(hd.seg.SegmentDescription(
            number, label, codes.SCT.MorphologicallyAbnormalStructure if tumor else codes.SCT.AnatomicalStructure,
            codes.SCT.Neoplasm if tumor else codes.SCT.Liver, hd.seg.SegmentAlgorithmTypeValues.MANUAL))
        planes.append(np.transpose(np.asarray(mask, dtype=bool), (2, 1, 0)))  # (slices, rows, columns)
    pixels = np.stack(planes, axis=-1).astype(np.uint8)  # (slices, rows, columns, segments)
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=pixels, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=300,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="phantom.py", manufacturer_model_name="phantom",
        software_versions="1", device_serial_number="none", series_description="phantom segmentation")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp:
        seg.save_as(tmp)
    return path


def write_phantom_seg_study(study_dir: str | Path, volume: str | Path, segmentation: str | Path, *,
                            seed: int = 0) -> dict[str, list[Path]]:
    """Write a phantom's LiTS files (its NIfTI twin) again as a DICOM study as TCIA collections hold one:
    the CT in `CT/` (series 1), another phase the SEG does not reference in `CT-late/` (series 2, the
    same anatomy 30 HU darker), and `SEG/seg.dcm` referencing series 1 with segments "Liver" (labels 1
    and 2: the liver with its tumours), "Tumor" (label 2) and "Portal vein" (a distractor inside the
    liver, not counted). Returns {"ct": files, "other": files, "seg": [path]}."""
    from pydicom.uid import generate_uid
    study_dir = Path(study_dir)
    hu, labels, affine = _nifti_twin(Path(volume), Path(segmentation))
    study = generate_uid(entropy_srcs=["phantom seg study", str(seed)])
    ct = write_phantom_dicom(study_dir / "CT", hu, affine, seed=seed, series_number=1, study_uid=study)
    other = write_phantom_dicom(study_dir / "CT-late", hu - 30, affine, seed=seed, series_number=2, study_uid=study)
    vein = _vein(labels)
    seg = write_phantom_seg(study_dir / "SEG" / "seg.dcm", ct,
                            {"Liver": labels >= 1, "Tumor": labels == 2, "Portal vein": vein})
    return {"ct": ct, "other": other, "seg": [seg]}
