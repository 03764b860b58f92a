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
