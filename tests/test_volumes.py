"""Tests for volumes.py: NIfTI and DICOM files written in tmp_path (phantoms, and pydicom's own CT
test file), read back through the real loading path; expected values are computed by hand, straight
from nibabel, or from the DICOM tags as written.

    python -m pytest tests/test_volumes.py -q
"""
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import phantom
import volumes
from volumes import DataError

FLIPS = [(True, True, False), (False, False, True), (True, False, True), (False, True, False), (True, True, True)]


def raw_array(path) -> np.ndarray:
    return np.asanyarray(nib.load(str(path)).dataobj)


def assert_one_line_naming(exc: pytest.ExceptionInfo, *names: str) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and msg.strip() == msg
    for name in names:
        assert name in msg, f"{name!r} not in {msg!r}"
    return msg


def save_nifti(path, array, affine=None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), str(path))
    return path


# ------------------------------------------------------------------------------------------------
# geometry
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flips", FLIPS)
def test_flipped_phantom_loads_like_unflipped_twin(tmp_path, flips):
    ref_vol, ref_seg = phantom.write_phantom_case(tmp_path / "ref", 5, size=48, seed=3, flips=(False, False, False))
    vol, seg = phantom.write_phantom_case(tmp_path / "flip", 5, size=48, seed=3, flips=flips)
    axes = tuple(i for i, f in enumerate(flips) if f)
    np.testing.assert_array_equal(raw_array(vol), np.flip(raw_array(ref_vol), axes))  # stored flipped
    assert not np.array_equal(raw_array(vol), raw_array(ref_vol))

    hu_ref, geom_ref = volumes.load_volume(ref_vol)
    hu, geom = volumes.load_volume(vol)
    assert hu.dtype == np.float32
    np.testing.assert_array_equal(hu, hu_ref)
    assert geom.spacing == geom_ref.spacing
    lab_ref, _ = volumes.load_label_volume(ref_seg)
    lab, _ = volumes.load_label_volume(seg, expected_shape=geom.shape)
    np.testing.assert_array_equal(lab, lab_ref)


@pytest.mark.parametrize("flips", FLIPS)
def test_flipped_phantom_keeps_world_position(tmp_path, flips):
    """The flipped twin's affine says where each voxel is: the same tissue at the same mm position."""
    ref_vol, _ = phantom.write_phantom_case(tmp_path / "ref", 5, size=48, seed=3, flips=(False, False, False))
    vol, _ = phantom.write_phantom_case(tmp_path / "flip", 5, size=48, seed=3, flips=flips)
    a_ref, a = nib.load(str(ref_vol)).affine, nib.load(str(vol)).affine
    shape = np.array(nib.load(str(vol)).shape)
    for ijk in ([0, 0, 0], [3, 7, 2], shape - 1):
        ijk = np.array(ijk)
        twin = np.where(flips, shape - 1 - ijk, ijk)
        np.testing.assert_allclose(a @ [*twin, 1], a_ref @ [*ijk, 1], atol=1e-3)
    centre = a_ref @ [*(shape / 2), 1]
    np.testing.assert_allclose(centre[:3], 0, atol=1e-3)  # origin at the volume centre


@pytest.mark.parametrize("flips", [(False, False, False)] + FLIPS)
def test_geometry_round_trip_to_file(tmp_path, flips):
    vol, seg = phantom.write_phantom_case(tmp_path, 1, size=48, seed=2, flips=flips)
    raw = raw_array(vol)
    hu, geom = volumes.load_volume(vol)
    assert geom.shape == raw.shape
    assert hu.shape == (raw.shape[2], raw.shape[1], raw.shape[0])
    np.testing.assert_array_equal(geom.to_file(hu), raw)
    np.testing.assert_array_equal(geom.to_file(geom.to_slices(raw)), raw)
    lab, lgeom = volumes.load_label_volume(seg)
    np.testing.assert_array_equal(lgeom.to_file(lab), raw_array(seg))
    with pytest.raises(ValueError):
        geom.to_file(hu[:-1])


@pytest.mark.parametrize("flips", [(False, False, False), (False, False, True), (True, True, True)])
def test_slice_index_maps_file_slice_to_the_same_data(tmp_path, flips):
    vol, _ = phantom.write_phantom_case(tmp_path, 1, size=48, seed=2, flips=flips)
    raw = raw_array(vol)
    hu, geom = volumes.load_volume(vol)
    n = raw.shape[2]
    expected = [n - 1 - k for k in range(n)] if flips[2] else list(range(n))
    assert [geom.slice_index(k) for k in range(n)] == expected
    assert [geom.file_slice_index(geom.slice_index(k)) for k in range(n)] == list(range(n))
    for k in range(n):  # the same voxel values (in-plane order differs)
        np.testing.assert_array_equal(np.sort(hu[geom.slice_index(k)].ravel()), np.sort(raw[:, :, k].ravel()))
    for bad in (-1, n):
        with pytest.raises(DataError):
            geom.slice_index(bad)


@pytest.mark.parametrize("affine, expected", [
    # RAS+ (x to the patient's right): columns run R -> L, so the file's x is reversed, and rows run
    # A -> P, so y is reversed: slices[z, r, c] = data[X-1-c, Y-1-r, z]
    (np.diag([2.0, 3.0, 4.0, 1.0]), lambda d, z, r, c: d[2 - c, 3 - r, z]),
    # LPS (as DICOM-converted files): x already runs to the left, y to the back: a plain transpose
    (np.diag([-2.0, -3.0, 4.0, 1.0]), lambda d, z, r, c: d[c, r, z]),
])
def test_slices_are_spl_on_a_hand_built_volume(tmp_path, affine, expected):
    data = np.arange(3 * 4 * 5, dtype=np.int16).reshape(3, 4, 5)  # X=3, Y=4, Z=5, all values distinct
    path = save_nifti(tmp_path / "volume-0.nii", data, affine)
    hu, geom = volumes.load_volume(path)
    assert hu.shape == (5, 4, 3)
    for z in range(5):
        for r in range(4):
            for c in range(3):
                assert hu[z, r, c] == expected(data, z, r, c), (z, r, c)
    assert geom.spacing == (4.0, 3.0, 2.0)  # mm along (slice, row, column)


def test_load_volume_applies_scl_slope_and_inter(tmp_path):
    raw = (np.arange(3 * 4 * 5, dtype=np.int16).reshape(3, 4, 5) * 37 - 300).astype(np.int16)
    img = nib.Nifti1Image(raw, np.eye(4))
    img.header.set_slope_inter(2, -1000)
    path = tmp_path / "volume-0.nii"
    nib.save(img, str(path))
    assert nib.load(str(path)).get_data_dtype() == np.int16
    hu, _ = volumes.load_volume(path)
    expected = np.transpose(raw.astype(np.float64) * 2 - 1000, (2, 1, 0))[:, ::-1, ::-1]  # RAS -> SPL by hand
    assert hu.dtype == np.float32
    np.testing.assert_array_equal(hu, expected)


# ------------------------------------------------------------------------------------------------
# intensity and resizing
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_window_hu_hand_values(kind):
    hu = [-200.0, 250.0, 25.0, -1000.0, 3000.0, -87.5]
    expected = [0.0, 1.0, 0.5, 0.0, 1.0, 0.25]
    x = np.array(hu, np.float64) if kind == "numpy" else torch.tensor(hu, dtype=torch.float64)
    before = x.copy() if kind == "numpy" else x.clone()
    out = volumes.window_hu(x)
    if kind == "numpy":
        assert isinstance(out, np.ndarray) and out.dtype == np.float32
        np.testing.assert_allclose(out, expected, atol=1e-7)
        np.testing.assert_array_equal(x, before)
    else:
        assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
        torch.testing.assert_close(out, torch.tensor(expected), atol=1e-7, rtol=0)
        assert torch.equal(x, before)
    int_out = volumes.window_hu(np.array([-200, 25, 250], np.int16))
    assert int_out.dtype == np.float32 and int_out.tolist() == [0.0, 0.5, 1.0]


def test_window_hu_custom_window():
    np.testing.assert_allclose(volumes.window_hu(np.array([-10.0, 0.0, 50.0, 100.0, 150.0]), (0, 100)),
                               [0.0, 0.0, 0.5, 1.0, 1.0])
    out = volumes.window_hu(torch.tensor([-1000, 0, 500], dtype=torch.int16), window=(-1000.0, 1000.0))
    torch.testing.assert_close(out, torch.tensor([0.0, 0.5, 0.75]))
    with pytest.raises(ValueError):
        volumes.window_hu(np.zeros(3), (100, 100))


@pytest.mark.parametrize("size", [20, 64])
def test_resize_labels_keep_only_input_values(size):
    labels = np.random.default_rng(0).choice(np.array([0, 2], np.uint8), size=(4, 48, 48))
    out = volumes.resize_slices(labels, size, "label")
    assert out.shape == (4, size, size) and out.dtype == torch.uint8
    assert set(out.unique().tolist()) <= {0, 2}
    img = volumes.resize_slices(np.full((2, 48, 48), 0.3, np.float32), size, "image")
    assert img.dtype == torch.float32 and img.shape == (2, size, size)
    torch.testing.assert_close(img, torch.full((2, size, size), 0.3))  # a flat image stays flat


def test_resize_is_identity_when_size_matches():
    rng = np.random.default_rng(1)
    image = rng.random((3, 32, 32), dtype=np.float32)
    labels = rng.integers(0, 3, (3, 32, 32)).astype(np.uint8)
    assert torch.equal(volumes.resize_slices(image, 32, "image"), torch.from_numpy(image))
    assert torch.equal(volumes.resize_slices(labels, 32, "label"), torch.from_numpy(labels))
    with pytest.raises(ValueError):
        volumes.resize_slices(image[0], 32)


def test_context_indices_clamp_at_the_ends():
    assert volumes.context_indices(0, 5, 2).tolist() == [0, 0, 0, 1, 2]
    assert volumes.context_indices(4, 5, 1).tolist() == [3, 4, 4]
    assert volumes.context_indices(2, 5, 0).tolist() == [2]


# ------------------------------------------------------------------------------------------------
# NIfTI errors
# ------------------------------------------------------------------------------------------------

def test_float_labels_with_whole_values_are_accepted(tmp_path):
    data = tmp_path / "data"
    _, seg = phantom.write_phantom_case(data, 0, size=48, seed=0)
    img = nib.load(str(seg))
    save_nifti(seg, np.asanyarray(img.dataobj).astype(np.float32), img.affine)  # as some LiTS files are
    lab, _ = volumes.load_label_volume(seg)
    assert lab.dtype == np.uint8 and set(np.unique(lab).tolist()) <= {0, 1, 2}


@pytest.mark.parametrize("compress", [False, True])
def test_truncated_file_is_a_data_error(tmp_path, compress):
    vol, _ = phantom.write_phantom_case(tmp_path / "data", 0, size=48, seed=0, compress=compress)
    content = vol.read_bytes()
    vol.write_bytes(content[: len(content) // 2])
    with pytest.raises(DataError) as exc:
        volumes.load_volume(vol)
    assert_one_line_naming(exc, vol.name)


def test_4d_volume_is_a_data_error(tmp_path):
    path = save_nifti(tmp_path / "volume-0.nii", np.zeros((8, 8, 4, 2), np.int16))
    with pytest.raises(DataError) as exc:
        volumes.load_volume(path)
    assert_one_line_naming(exc, "volume-0.nii", "4D")
    single = save_nifti(tmp_path / "volume-1.nii", np.zeros((8, 8, 4, 1), np.int16))
    assert volumes.load_volume(single)[0].shape == (4, 8, 8)  # a trailing axis of 1 is fine
