"""Tests for phantom.py: the synthetic CT phantom is CT-like where the tests and the demo rely on it.

    python -m pytest tests/test_phantom.py -q
"""
import nibabel as nib
import numpy as np
import pytest

import dataset
import phantom
import volumes
from tests.helpers import REPO, load_script


def test_phantom_files_int16_volume_and_0_1_2_labels(lits_dir):
    for case in dataset.find_cases(lits_dir):
        vol, seg = nib.load(str(case.images[0])), nib.load(str(case.labels[0]))
        assert vol.get_data_dtype() == np.int16
        assert np.asanyarray(vol.dataobj).dtype == np.int16  # stored as is, no scaling
        assert set(np.unique(np.asanyarray(seg.dataobj)).tolist()) <= {0, 1, 2}
        assert {1} <= set(np.unique(np.asanyarray(seg.dataobj)).tolist())
        assert vol.shape == seg.shape and np.allclose(vol.affine, seg.affine)


def test_phantom_some_cases_are_tumor_free():
    has_tumor = [bool((phantom.make_phantom(48, seed=s)[1] == 2).any()) for s in range(12)]
    assert 0 < sum(has_tumor) < 12


@pytest.mark.parametrize("seed", range(4))
def test_phantom_tumors_lie_inside_the_liver(seed):
    _, no_tumor, _ = phantom.make_phantom(48, seed=seed, num_tumors=0)
    _, labels, _ = phantom.make_phantom(48, seed=seed, num_tumors=3)
    liver = no_tumor == 1  # the same seed draws the same liver before any tumor
    assert (labels == 2).any()
    assert liver[labels == 2].all()
    np.testing.assert_array_equal(labels >= 1, liver)


@pytest.mark.parametrize("seed", range(6))
def test_phantom_tumor_contrast_and_noise(tmp_path, seed):
    """Read back from the files: the one lesion's median differs from the liver's by at most 60 HU,
    and the noise on the flat 500 HU spine (its largest bright component, eroded off its edge) is
    about 8-22 HU and correlated between neighbouring pixels, as CT noise is."""
    from scipy import ndimage
    vol, seg = phantom.write_phantom_case(tmp_path, 0, size=64, seed=seed, num_tumors=1)
    hu, _ = volumes.load_volume(vol)
    labels, _ = volumes.load_label_volume(seg)
    # medians: the liver's vessels would pull a mean
    contrast = np.median(hu[labels == 2]) - np.median(hu[labels == 1])
    assert abs(contrast) <= 60 + 5, contrast
    found, _ = ndimage.label(hu > 300)  # bone: spine and ribs
    sizes = np.bincount(found.ravel())[1:]
    spine = ndimage.binary_erosion(found == 1 + int(np.argmax(sizes)))
    assert spine.sum() > 200
    noise = np.where(spine, hu - np.median(hu[spine]), 0.0)
    assert 6 <= noise[spine].std() <= 25  # 8-22 HU over the volume; a few hundred correlated pixels vary more
    for axis in (1, 2):  # in-plane (slices are (Z, H, W)) lag-1 correlation over pixel pairs in the spine
        pair = spine & np.roll(spine, 1, axis=axis)
        r = np.corrcoef(noise[pair], np.roll(noise, 1, axis=axis)[pair])[0, 1]
        assert r > 0.3, (axis, r)


def _lesion_kinds(hu, labels):
    """Each connected lesion of a phantom: (equivalent diameter in voxels, its kind) where the kind is
    read from the HU as a radiologist would: brighter or darker than the liver, or a bright edge
    around a dark core (edge: lesion voxels with a non-lesion neighbour in-plane)."""
    from scipy import ndimage
    liver = np.median(hu[labels == 1])
    found, count = ndimage.label(labels == 2)
    out = []
    for k in range(1, count + 1):
        lesion = found == k
        core = ndimage.binary_erosion(lesion, structure=np.ones((3, 3, 1)), iterations=2)
        edge = lesion & ~ndimage.binary_erosion(lesion, structure=np.ones((3, 3, 1)))
        diameter = (6 * lesion.sum() / np.pi) ** (1 / 3)
        if core.sum() > 20 and np.median(hu[edge]) > liver + 10 and np.median(hu[core]) < liver - 5:
            out.append((diameter, "rim"))
        else:
            out.append((diameter, "hyper" if np.median(hu[lesion]) > liver else "hypo"))
    return out


def test_phantom_lesions_livers_and_ribs_span_what_the_docstring_promises():
    """Over 16 phantoms at 128 px: hypo-, hyperdense and rim-enhancing lesions, lesions under 10 mm
    and over 20 mm across, unenhanced livers (darker than the spleen of an enhanced scan would make
    them: under 90 HU) beside enhanced ones, and ribs (small bone outside the spine) in every case."""
    from scipy import ndimage
    kinds, diameters_mm, livers = set(), [], []
    for seed in range(16):
        hu, labels, spacing = phantom.make_phantom(128, seed=seed, num_tumors=3)
        livers.append(np.median(hu[labels == 1]))
        for diameter, kind in _lesion_kinds(hu.astype(np.float32), labels):
            kinds.add(kind)
            diameters_mm.append(diameter * np.prod(spacing) ** (1 / 3))
        found, count = ndimage.label(hu > 300)
        assert count >= 4, seed  # the spine and at least three rib sections
    assert kinds == {"hypo", "hyper", "rim"}
    assert min(diameters_mm) < 10 and max(diameters_mm) > 20
    assert min(livers) < 90 and max(livers) > 95


def test_visible_contrast_floor_follows_roses_criterion():
    """By hand: floor = 3.6 x 22 HU / radius, at least 10 HU; the draw spreads from it to 60 HU."""
    assert phantom.visible_contrast(0.0, 2.0) == pytest.approx(39.6)
    assert phantom.visible_contrast(0.5, 4.0) == pytest.approx(19.8 + 0.5 * 40.2)
    assert phantom.visible_contrast(0.0, 30.0) == pytest.approx(10.0)
    assert phantom.visible_contrast(1.0, 2.0) == pytest.approx(60.0)


def test_phantom_small_lesions_stand_out_of_the_noise():
    """Over 16 phantoms at 128 px: every lesion under 10 mm across (of 5 voxels or more, so that its
    median is not one noisy voxel) differs from the liver by 15 HU or more; before the floor, a 7 mm
    lesion 7 HU off the liver, under noise of 8-22 HU, was labelled tumour."""
    from scipy import ndimage
    small = []
    for seed in range(16):
        hu, labels, spacing = phantom.make_phantom(128, seed=seed, num_tumors=3)
        hu = hu.astype(np.float32)
        liver = np.median(hu[labels == 1])
        found, count = ndimage.label(labels == 2)
        for k in range(1, count + 1):
            lesion = found == k
            diameter = (6 * lesion.sum() * np.prod(spacing) / np.pi) ** (1 / 3)
            if diameter < 10 and lesion.sum() >= 5:
                small.append(abs(float(np.median(hu[lesion]) - liver)))
    assert len(small) >= 5
    assert min(small) >= 15, sorted(small)


def _heldout_family():
    return load_script(REPO / "benchmarks" / "heldout_phantoms.py")


def test_heldout_family_is_stored_as_messy_files_and_reads_back_as_made(tmp_path):
    """The second phantom family's four storage kinds, read back by nibabel (as_closest_canonical) and by
    the loaders training uses: volume-0 identity affine, int16, float32 labels; volume-1 mirrored,
    uint16 with a -1024 intercept; volumes 2-3 honest flipped axes. The honest and mirrored files hold
    the phantom as made (RAS), the mirrored one reversed left-right; every label file reads as 0/1/2."""
    family = _heldout_family()
    made = {}
    for i in range(4):
        family.write_case(tmp_path, i, seed=5, size=40)
        made[i] = family.make_case(int(np.random.default_rng([5, i]).integers(2**31)), 40)
    ext = {0: ".nii.gz", 1: ".nii", 2: ".nii.gz", 3: ".nii"}
    vols = {i: nib.load(str(tmp_path / f"volume-{i}{ext[i]}")) for i in range(4)}
    segs = {i: nib.load(str(tmp_path / f"segmentation-{i}{ext[i]}")) for i in range(4)}
    assert np.array_equal(vols[0].affine, np.eye(4)) and segs[0].get_data_dtype() == np.float32
    assert vols[1].get_data_dtype() == np.uint16 and vols[1].dataobj.inter == -1024
    for i in (2, 3):
        hu, labels, spacing = made[i]
        canonical = nib.as_closest_canonical(vols[i])
        assert np.array_equal(np.asanyarray(canonical.dataobj), np.clip(np.round(hu), -1024, 3071))
        assert np.array_equal(np.asanyarray(nib.as_closest_canonical(segs[i]).dataobj), labels)
        assert np.allclose(canonical.header.get_zooms(), spacing, atol=1e-5)
    hu, labels, _ = made[1]
    assert np.array_equal(np.asanyarray(vols[1].dataobj), np.clip(np.round(hu), -1024, 3071)[::-1])
    for i in range(4):
        slices, _ = volumes.load_label_volume(tmp_path / f"segmentation-{i}{ext[i]}")
        assert slices.dtype == np.uint8 and set(np.unique(slices)) <= {0, 1, 2} and (slices == 1).any()
        ct, _ = volumes.load_volume(tmp_path / f"volume-{i}{ext[i]}")
        assert ct.min() >= -1024 and ct.max() > 200  # air to bone, whatever the storage


def test_heldout_family_lesions_and_slices_span_the_ranges_it_promises():
    """Over 12 cases at 160 px: lesions under 10 mm and over 20 mm across (equivalent diameter of each
    connected lesion, from its voxel count and spacing), and slices from under 2 mm to over 3.5 mm thick."""
    from scipy import ndimage
    family = _heldout_family()
    diameters, thickness = [], []
    for seed in range(12):
        _, labels, spacing = family.make_case(seed, 160)
        thickness.append(spacing[2])
        found, count = ndimage.label(labels == 2)
        for k in range(1, count + 1):
            volume_mm3 = float((found == k).sum()) * np.prod(spacing)
            diameters.append((6 * volume_mm3 / np.pi) ** (1 / 3))
    assert min(diameters) < 10 and max(diameters) > 20
    assert min(thickness) < 2 and max(thickness) > 3.5


def test_phantom_gallbladder_is_bile_in_a_liver_pocket_and_labelled_background():
    """Most phantoms (four in five are drawn) have a gallbladder: at least 3 mL of bile (-15 to 30 HU
    after a 3x3 median) that is not liver, in a pocket the liver wraps (its in-plane closing by a
    6-pixel disk); a radiologist's dark oval that is no lesion. Some phantoms have none."""
    from scipy import ndimage
    yy, xx = np.mgrid[-6:7, -6:7]
    disk = (xx ** 2 + yy ** 2 <= 36)[..., None]
    with_bile = 0
    for seed in range(16):
        hu, labels, spacing = phantom.make_phantom(128, seed=seed, num_tumors=0)
        liver = labels == 1
        closed = ndimage.binary_closing(np.pad(liver, ((8, 8), (8, 8), (0, 0))), structure=disk)[8:-8, 8:-8]
        smooth = ndimage.median_filter(hu, size=(3, 3, 1))
        bile = closed & ~liver & (smooth > -15) & (smooth < 30)
        assert not (labels[bile] == 2).any()
        with_bile += bile.sum() * np.prod(spacing) / 1000 >= 3.0
    assert 10 <= with_bile <= 15, with_bile


def test_phantom_steatosis_darkens_the_parenchyma_only():
    """A fatty liver is the same phantom with its parenchyma, and the lesions in it, 15-50 HU darker:
    not one voxel outside the liver changes, every lesion voxel drops by the same amount, and the
    liver's vessels keep their value (fat lowers the parenchyma, not the blood), so unenhanced they
    stand out brighter than the liver, as on a real fatty liver."""
    for seed in (0, 3):
        plain_hu, labels, _ = phantom.make_phantom(64, seed=seed, num_tumors=2, steatosis=False)
        fatty_hu, fatty_labels, _ = phantom.make_phantom(64, seed=seed, num_tumors=2, steatosis=True)
        assert np.array_equal(labels, fatty_labels)
        drop = plain_hu.astype(np.int32) - fatty_hu.astype(np.int32)
        assert (drop[labels == 0] == 0).all()
        d = np.bincount(drop[labels == 1].clip(0)).argmax()  # the parenchyma's drop (rounding aside)
        assert 15 <= d <= 50, d
        assert (np.abs(drop[labels == 2] - d) <= 1).all()
        assert (drop[labels == 1] == 0).sum() > 0.01 * (labels == 1).sum()  # the vessels: unchanged
        assert set(np.unique(drop[labels >= 1])) <= set(range(d - 1, d + 2)) | {0}
    fatty = 0  # left to chance (None), one liver in five is fatty: 20 seeds, each drawn twin compared
    for seed in range(20):
        drawn = phantom.make_phantom(32, num_slices=6, seed=seed)[0]
        twins = [phantom.make_phantom(32, num_slices=6, seed=seed, steatosis=s)[0] for s in (False, True)]
        same = [np.array_equal(drawn, t) for t in twins]
        assert sum(same) == 1, seed
        fatty += same[1]
    assert 1 <= fatty <= 9, fatty


def test_phantom_has_bowel_gas_and_fluid_that_are_not_liver():
    """Every phantom's abdomen holds bowel: gas (under -500 HU inside the body's outline, at least 0.5 mL)
    and, on slices without liver, fluid-density tissue (0-35 HU after a 3x3 median, at least 2 mL);
    none of the gas is labelled liver or tumour, so a dark loop beside the liver is taught as background."""
    from scipy import ndimage
    for seed in range(8):
        hu, labels, spacing = phantom.make_phantom(128, seed=seed)
        ml = np.prod(spacing) / 1000
        inside = np.stack([ndimage.binary_fill_holes(hu[..., z] > -500) for z in range(hu.shape[2])], axis=-1)
        gas = inside & (hu < -500)
        assert gas.sum() * ml >= 0.5, seed
        assert not labels[gas].any()
        free = ~(labels >= 1).any(axis=(0, 1))
        smooth = ndimage.median_filter(hu[..., free], size=(3, 3, 1))
        assert ((smooth >= 0) & (smooth <= 35) & inside[..., free]).sum() * ml >= 2, seed
