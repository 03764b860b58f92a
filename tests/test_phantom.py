"""Tests for phantom.py: the synthetic CT phantom is CT-like where the tests and the demo rely on it.

    python -m pytest tests/test_phantom.py -q
"""
import nibabel as nib
import numpy as np
import pytest

import dataset
import phantom
import volumes


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
    vol, seg = phantom.write_phantom_case(tmp_path, 0, size=64, seed=seed, num_tumors=1)
    hu, _ = volumes.load_volume(vol)
    labels, _ = volumes.load_label_volume(seg)
    # medians: the liver's bright vessels would pull a mean
    contrast = np.median(hu[labels == 2]) - np.median(hu[labels == 1])
    assert 10 <= abs(contrast) <= 50, contrast
    spine = hu > 350  # bone is the one flat region above 350 HU (500 HU + noise)
    assert spine.sum() > 200
    assert 9.5 <= hu[spine].std() <= 20.5


def _heldout_family():
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "heldout_phantoms.py"
    spec = importlib.util.spec_from_file_location("heldout_phantoms", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
