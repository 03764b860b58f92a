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
import pydicom
import volumes
from pydicom.data import get_testdata_file
from pydicom.uid import JPEG2000Lossless, RLELossless
from tests.dicom_helpers import canonical_slices, dicom_twin, read_series_by_tags, seg_label_frames
from tests.helpers import assert_one_line_naming, save_nifti
from volumes import DataError

FLIPS = [(True, True, False), (False, False, True), (True, False, True), (False, True, False), (True, True, True)]


def raw_array(path) -> np.ndarray:
    return np.asanyarray(nib.load(str(path)).dataobj)


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


@pytest.mark.parametrize("flips", [(False, False, False), (True, False, True), (True, True, True)])
def test_slices_affine_puts_a_slices_voxel_where_the_file_puts_it(tmp_path, flips):
    """Checked against nibabel's canonical image (tests/dicom_helpers.py), for a NIfTI file and for
    its DICOM twin: a report's positions, measured on the slices, are the file's world positions."""
    vol, _ = phantom.write_phantom_case(tmp_path, 1, size=16, seed=2, flips=flips, num_slices=6)
    dicom_twin(tmp_path / "ct", vol)
    img = nib.load(str(vol))
    _, canon = canonical_slices(np.zeros(img.shape), img.affine)
    x, y, _ = nib.as_closest_canonical(img).shape
    for source in (vol, tmp_path / "ct"):
        hu, geom = volumes.read_volume(source)
        for z, r, c in ([0, 0, 0], [5, 3, 11], [2, 15, 0]):
            # canonical_slices: slices[z, r, c] is the canonical array's [x - 1 - c, y - 1 - r, z]
            np.testing.assert_allclose(geom.slices_affine @ [z, r, c, 1], canon @ [x - 1 - c, y - 1 - r, z, 1],
                                       atol=1e-3)


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


@pytest.mark.parametrize("affine", [np.diag([2.0, 3.0, -4.0, 1.0]), np.eye(4)])  # z flipped; identity
def test_load_volume_as_stored_is_a_view_of_the_same_values(tmp_path, affine):
    raw = (np.arange(3 * 4 * 5, dtype=np.int16).reshape(3, 4, 5) * 37 - 300).astype(np.int16)
    path = save_nifti(tmp_path / "volume-0.nii", raw, affine)
    hu, _ = volumes.load_volume(path)
    stored, geom = volumes.load_volume(path, dtype=None)
    assert stored.dtype == np.int16 and not stored.flags.owndata  # the file's integers, not a copy
    np.testing.assert_array_equal(stored, hu)
    np.testing.assert_array_equal(volumes.read_volume(path, dtype=None)[0], hu)
    assert geom.shape == (3, 4, 5)


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


def test_geometry_is_immutable_and_one_slice_sits_at_its_slice(tmp_path):
    vol, _ = phantom.write_phantom_case(tmp_path, 1, size=48, seed=2, flips=(True, False, True))
    _, geom = volumes.load_volume(vol)
    with pytest.raises(AttributeError):
        geom.shape = (1, 2, 3)
    with pytest.raises(ValueError):
        geom.affine[0, 0] = 5.0  # the matrix itself is read-only too
    affine = nib.load(str(vol)).affine
    one = geom.one_slice(3)
    assert one.shape == (*geom.shape[:2], 1) and one.spacing == geom.spacing
    np.testing.assert_allclose(one.affine @ [0, 0, 0, 1], affine @ [0, 0, 3, 1], atol=1e-5)
    np.testing.assert_allclose(one.sform @ [5, 7, 0, 1], nib.load(str(vol)).get_sform() @ [5, 7, 3, 1], atol=1e-5)


# ------------------------------------------------------------------------------------------------
# DICOM series in: the same canonical array and world positions as the NIfTI twin
# ------------------------------------------------------------------------------------------------

# (flips of the phantom's NIfTI axes) -> the orientation scanners write: ImageOrientationPatient and
# the order in which the files run along the body.
ORIENTATIONS = {
    "head-first, standard IOP, slices head to feet": ((True, True, True), [1, 0, 0, 0, 1, 0]),
    "head-first, standard IOP, slices feet to head": ((True, True, False), [1, 0, 0, 0, 1, 0]),
    "feet-first, columns flipped": ((False, True, False), [-1, 0, 0, 0, 1, 0]),
    "rows and columns flipped": ((False, False, False), [-1, 0, 0, 0, -1, 0]),
    "rows flipped, slices head to feet": ((True, False, True), [1, 0, 0, 0, -1, 0]),
}


def nifti_twin(folder: Path, flips, seed: int = 0, offset=(31.5, -12.25, 70.0), num_slices: int = 12):
    """A 64x64x`num_slices` phantom as LiTS NIfTI files, moved by `offset` mm (origin far from 0)."""
    vol, seg = phantom.write_phantom_case(folder, 0, size=64, seed=seed, num_slices=num_slices, flips=flips,
                                          num_tumors=2)
    for path in (vol, seg):
        img = nib.load(str(path))
        affine = img.affine.copy()
        affine[:3, 3] += offset
        save_nifti(path, np.asanyarray(img.dataobj).copy(), affine)  # a copy: the file is memory-mapped
    return vol, seg


@pytest.mark.parametrize("case", list(ORIENTATIONS))
def test_dicom_series_loads_like_its_nifti_twin(tmp_path, case):
    flips, iop = ORIENTATIONS[case]
    vol, _ = nifti_twin(tmp_path / "nifti", flips)
    files = dicom_twin(tmp_path / "ct", vol, patient_position="FFS" if "feet-first" in case else "HFS")
    assert [float(v) for v in pydicom.dcmread(files[0]).ImageOrientationPatient] == iop  # the case is what it says

    hu, geom = volumes.read_volume(tmp_path / "ct")
    expected, world = canonical_slices(raw_array(vol), nib.load(str(vol)).affine)
    assert hu.dtype == np.float32
    np.testing.assert_array_equal(hu, expected)
    _, world_dicom = canonical_slices(np.zeros(geom.shape), geom.affine)
    np.testing.assert_allclose(world_dicom, world, atol=1e-3)  # every voxel at the same mm position
    assert world[:3, 3] @ world[:3, 3] > 100  # the origin is far from the world origin
    _, tags_affine, datasets = read_series_by_tags(files)
    np.testing.assert_allclose(geom.affine, tags_affine, atol=1e-4)
    np.testing.assert_allclose(geom.spacing, volumes.load_volume(vol)[1].spacing, rtol=1e-5)
    # The file axis runs along the slice normal: k = 0 is the first file by position, not by name.
    assert [d.SOPInstanceUID for d in geom.dicom] == [d.SOPInstanceUID for d in datasets]
    written = [pydicom.dcmread(f) for f in files]
    step = np.subtract(written[1].ImagePositionPatient, written[0].ImagePositionPatient)
    against_normal = float(step @ np.cross(iop[:3], iop[3:])) < 0
    assert against_normal == (case in ("head-first, standard IOP, slices head to feet", "feet-first, columns flipped"))
    by_name = [d.SOPInstanceUID for d in written]
    assert [d.SOPInstanceUID for d in geom.dicom] == (by_name[::-1] if against_normal else by_name)


def test_dicom_file_names_instance_numbers_and_depth_do_not_matter(tmp_path):
    vol, _ = nifti_twin(tmp_path / "nifti", (True, True, False))
    files = dicom_twin(tmp_path / "plain", vol)
    rng = np.random.default_rng(0)
    messy = tmp_path / "messy"
    for i, path in enumerate(files):
        ds = pydicom.dcmread(path)
        ds.InstanceNumber = int(rng.integers(1, 1000))  # says nothing about the order
        folder = messy / ("a/b" if i % 2 else "c")
        folder.mkdir(parents=True, exist_ok=True)
        ds.save_as(folder / f"{rng.integers(1 << 40):x}", enforce_file_format=True)  # no extension
    assert not list(messy.rglob("*.dcm"))
    hu, geom = volumes.read_volume(messy)
    hu_plain, geom_plain = volumes.read_volume(tmp_path / "plain")
    np.testing.assert_array_equal(hu, hu_plain)
    np.testing.assert_allclose(geom.affine, geom_plain.affine)
    ((item, kind),) = volumes.find_inputs(messy)
    assert kind == "volume" and item.folder == messy and item.name == "messy"


@pytest.mark.parametrize("syntax", [JPEG2000Lossless, RLELossless])
def test_compressed_series_decodes_to_the_same_volume(tmp_path, syntax):
    vol, _ = nifti_twin(tmp_path / "nifti", (True, True, True))
    files = dicom_twin(tmp_path / "compressed", vol, transfer_syntax=syntax)
    assert pydicom.dcmread(files[0]).file_meta.TransferSyntaxUID == syntax
    hu, _ = volumes.read_volume(tmp_path / "compressed")
    np.testing.assert_array_equal(hu, canonical_slices(raw_array(vol), nib.load(str(vol)).affine)[0])


def test_two_series_in_one_folder_and_objects_that_are_not_ct(tmp_path):
    vol_a, _ = nifti_twin(tmp_path / "a", (True, True, False), seed=1)
    vol_b, _ = nifti_twin(tmp_path / "b", (False, True, True), seed=2, num_slices=10)
    folder = tmp_path / "study"
    dicom_twin(folder, vol_a, series_number=3)
    files_b = dicom_twin(folder, vol_b, series_number=4)
    for name in ("rtstruct.dcm", "test-SR.dcm"):  # real non-image objects from pydicom's test files
        (folder / name).write_bytes(Path(get_testdata_file(name)).read_bytes())
    scout = pydicom.dcmread(files_b[0])  # a localiser in series b: another orientation, skipped
    scout.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    scout.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    scout.SOPInstanceUID = scout.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    scout.save_as(folder / "scout", enforce_file_format=True)

    found = volumes.find_dicom_series(folder)
    assert [s.name for s in found] == ["study_3", "study_4"]
    assert [len(s.files) for s in found] == [12, 10]
    for series, vol in zip(found, (vol_a, vol_b)):
        hu, _ = volumes.read_volume(series)
        np.testing.assert_array_equal(hu, canonical_slices(raw_array(vol), nib.load(str(vol)).affine)[0])
    with pytest.raises(DataError) as exc:
        volumes.read_volume(folder)  # a folder alone does not say which
    assert_one_line_naming(exc, "2 DICOM CT series", "--series")
    picked = volumes.find_inputs(folder, series=found[1].uid)
    assert [(item.uid, kind) for item, kind in picked] == [(found[1].uid, "volume")]
    with pytest.raises(DataError) as exc:
        volumes.find_inputs(folder, series="1.2.3.4")
    assert_one_line_naming(exc, "1.2.3.4", found[0].uid)


def test_series_without_uid_split_by_frame_of_reference(tmp_path):
    """Anonymised files may carry an empty SeriesInstanceUID: the frame of reference still tells
    two series apart."""
    folder = tmp_path / "anon"
    for seed, number in ((1, 1), (2, 2)):
        vol, _ = nifti_twin(tmp_path / f"n{seed}", (True, True, False), seed=seed)
        dicom_twin(folder, vol, series_uid="", series_number=number, study_uid=f"1.2.3.{seed}")
    found = volumes.find_dicom_series(folder)
    assert len(found) == 2 and {s.uid for s in found} == {""} and len({s.name for s in found}) == 2


def test_pydicom_ct_small_is_a_one_slice_input(tmp_path):
    path = Path(get_testdata_file("CT_small.dcm"))
    ds = pydicom.dcmread(path)
    assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]  # rows A -> P, columns R -> L
    expected = volumes.window_hu(ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept))
    assert volumes.input_kind(path) == "image"
    np.testing.assert_allclose(volumes.load_slice_image(path, volumes.WINDOW_HU), expected, atol=1e-6)
    hu = volumes.read_dicom_slice(path)
    assert hu.shape == (128, 128) and hu.min() < -100 and hu.max() > 500  # air and bone, in HU
    one = tmp_path / "one"
    one.mkdir()
    (one / "CT_small").write_bytes(path.read_bytes())
    with pytest.raises(DataError) as exc:
        volumes.read_volume(one)
    assert_one_line_naming(exc, "single slice", "expected at least 2")
    with pytest.raises(DataError) as exc:
        volumes.read_volume(path)
    assert_one_line_naming(exc, "CT_small.dcm", "whole series")


# ------------------------------------------------------------------------------------------------
# DICOM series that cannot form a volume: one line naming the series or file
# ------------------------------------------------------------------------------------------------

def _series(tmp_path, **kwargs) -> list[Path]:
    vol, _ = nifti_twin(tmp_path / "nifti", (True, True, False), **kwargs)
    return dicom_twin(tmp_path / "ct", vol)


def test_missing_slice_is_a_data_error(tmp_path):
    files = _series(tmp_path)
    files[5].unlink()
    with pytest.raises(DataError) as exc:
        volumes.read_volume(tmp_path / "ct")
    assert_one_line_naming(exc, str(tmp_path / "ct"), "missing slice", files[4].name, files[6].name, "evenly spaced")


def test_gantry_tilt_is_a_data_error(tmp_path):
    vol, _ = nifti_twin(tmp_path / "nifti", (True, True, False))
    img = nib.load(str(vol))
    tilted = img.affine.copy()
    tilted[1, 2] = tilted[2, 2] * np.tan(np.radians(15))  # each slice moves along y as well: a 15 degree tilt
    phantom.write_phantom_dicom(tmp_path / "ct", np.asanyarray(img.dataobj), tilted)
    with pytest.raises(DataError) as exc:
        volumes.read_volume(tmp_path / "ct")
    msg = assert_one_line_naming(exc, "gantry tilt", "expected")
    assert "15.0 degrees" in msg


def test_two_axial_orientations_in_one_series_are_a_data_error(tmp_path):
    """Files of one series whose axial orientations disagree (here columns flipped in one file) cannot
    be stacked: which is right is not known."""
    files = _series(tmp_path)
    ds = pydicom.dcmread(files[3])
    ds.ImageOrientationPatient = [-1, 0, 0, 0, 1, 0]
    ds.save_as(files[3], enforce_file_format=True)
    with pytest.raises(DataError) as exc:
        volumes.find_inputs(tmp_path / "ct")
    assert_one_line_naming(exc, ds.SeriesInstanceUID, "orientations", "11 axial, 1 axial", "expected one per series")


def reformat(folder: Path, vol: Path, axes: tuple[int, int, int], keep: slice, series_uid: str,
             series_number: int) -> list[Path]:
    """Slices `keep` of a reformat of the phantom `vol` (its file axes reordered by `axes`, the third
    the new slice axis), written as a scanner writes an MPR: DERIVED\\SECONDARY\\REFORMATTED images
    in the series `series_uid` of the axial slices, at the same world positions."""
    img = nib.load(str(vol))
    array = np.transpose(raw_array(vol), axes)
    affine = img.affine[:, [*axes, 3]]
    shift = np.eye(4)
    shift[2, 3] = keep.start
    files = phantom.write_phantom_dicom(folder, array[:, :, keep], affine @ shift, series_uid=series_uid,
                                        series_number=series_number)
    for path in files:
        ds = pydicom.dcmread(path)
        ds.ImageType = ["DERIVED", "SECONDARY", "REFORMATTED"]
        ds.save_as(path, enforce_file_format=True)
    return files


def test_reformats_beside_the_axial_slices_are_skipped_with_one_note(tmp_path, capsys):
    vol, _ = nifti_twin(tmp_path / "nifti", (True, True, True))  # slices head to feet: reformats head up
    folder = tmp_path / "ct"
    axial = dicom_twin(folder, vol)
    uid = pydicom.dcmread(axial[0]).SeriesInstanceUID
    coronal = reformat(folder, vol, (0, 2, 1), slice(20, 24), uid, 2)
    sagittal = reformat(folder, vol, (1, 2, 0), slice(30, 33), uid, 3)
    iops = {p: [float(v) for v in pydicom.dcmread(p).ImageOrientationPatient] for p in (coronal[0], sagittal[0])}
    assert iops == {coronal[0]: [1, 0, 0, 0, 0, -1], sagittal[0]: [0, 1, 0, 0, 0, -1]}  # as scanners write them

    ((series, kind),) = volumes.find_inputs(folder)
    assert kind == "volume" and series.uid == uid and sorted(series.files) == sorted(axial)
    note = capsys.readouterr().err
    assert note.count("\n") == 1 and note.startswith("note: ")
    for part in (uid, "12 axial", "4 coronal", "3 sagittal", "DERIVED\\SECONDARY\\REFORMATTED"):
        assert part in note, part
    hu, geom = volumes.read_volume(folder)
    np.testing.assert_array_equal(hu, canonical_slices(raw_array(vol), nib.load(str(vol)).affine)[0])
    assert len(geom.dicom) == 12


def test_single_slice_series_say_what_was_found(tmp_path, capsys):
    """Files each written as a series of their own (one slice each) form no volume: alone, one line
    saying so; beside a series of several slices, skipped with one note line."""
    vol, _ = nifti_twin(tmp_path / "nifti", (True, True, False))
    img = nib.load(str(vol))
    folder = tmp_path / "ct"
    for k in range(3):
        shift = np.eye(4)
        shift[2, 3] = k
        phantom.write_phantom_dicom(folder, raw_array(vol)[:, :, k:k + 1], img.affine @ shift, series_number=k + 1)
    assert len({pydicom.dcmread(p).SeriesInstanceUID for p in folder.iterdir()}) == 3
    for call in (volumes.find_inputs, volumes.read_volume):
        with pytest.raises(DataError) as exc:
            call(folder)
        assert_one_line_naming(exc, str(folder), "3 DICOM CT files", "each a series of a single slice",
                               "3 different SeriesInstanceUIDs", "S1_IM0000.dcm", "expected")

    series = dicom_twin(folder, vol, series_number=9)
    capsys.readouterr()
    ((found, kind),) = volumes.find_inputs(folder)
    assert sorted(found.files) == sorted(series)
    note = capsys.readouterr().err
    assert note.count("\n") == 1 and note.startswith("note: ") and "skipped 3 DICOM CT file(s)" in note


@pytest.mark.parametrize("problem", ["no pixel data", "truncated", "not dicom"])
def test_broken_files_are_a_data_error(tmp_path, problem):
    files = _series(tmp_path)
    bad = files[4]
    if problem == "no pixel data":
        ds = pydicom.dcmread(bad)
        del ds.PixelData
        ds.save_as(bad, enforce_file_format=True)
    elif problem == "truncated":
        bad.write_bytes(bad.read_bytes()[:-3000])
    else:
        bad.write_bytes(np.random.default_rng(0).bytes(4000))  # named .dcm, but random bytes
    with pytest.raises(DataError) as exc:
        volumes.read_volume(tmp_path / "ct")
    assert_one_line_naming(exc, str(bad), "expected")


def test_folder_without_inputs_says_what_it_found(tmp_path):
    (tmp_path / "notes.txt").write_text("not a scan")
    (tmp_path / "blob").write_bytes(np.random.default_rng(0).bytes(300))
    (tmp_path / "report.dcm").write_bytes(Path(get_testdata_file("test-SR.dcm")).read_bytes())
    with pytest.raises(DataError) as exc:
        volumes.find_inputs(tmp_path)
    assert_one_line_naming(exc, "found no volumes or slices", "DICOM SR: 1", "2 other file(s)", "expected")


# ------------------------------------------------------------------------------------------------
# Labels out: NIfTI on the series' grid, DICOM SEG referencing the series
# ------------------------------------------------------------------------------------------------

def test_labels_of_a_series_as_nifti_lie_on_the_series_grid(tmp_path):
    vol, seg = nifti_twin(tmp_path / "nifti", (True, False, True))
    files = dicom_twin(tmp_path / "ct", vol)
    _, geom = volumes.read_volume(tmp_path / "ct")
    labels, _ = volumes.load_label_volume(seg)  # the twin's truth, (Z, H, W) in slices order
    volumes.write_labels(labels, geom, tmp_path / "out.nii.gz")
    out = nib.load(str(tmp_path / "out.nii.gz"))
    _, tags_affine, _ = read_series_by_tags(files)
    np.testing.assert_allclose(out.affine, tags_affine, atol=1e-4)  # the series' own grid, in RAS
    assert out.shape == (64, 64, 12) and out.get_data_dtype() == np.uint8
    assert int(out.header["qform_code"]) == int(out.header["sform_code"]) == 1  # scanner coordinates
    got, world = canonical_slices(np.asanyarray(out.dataobj), out.affine)
    expected, world_twin = canonical_slices(raw_array(seg), nib.load(str(seg)).affine)
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_allclose(world, world_twin, atol=1e-3)


@pytest.mark.parametrize("frame_of_reference", [True, False])
def test_seg_round_trip_matches_the_nifti_output(tmp_path, capsys, frame_of_reference):
    vol, seg = nifti_twin(tmp_path / "nifti", (False, True, True))
    files = dicom_twin(tmp_path / "ct", vol, frame_of_reference=frame_of_reference)
    before = {p: p.read_bytes() for p in files}
    _, geom = volumes.read_volume(tmp_path / "ct")
    labels, _ = volumes.load_label_volume(seg)
    assert set(np.unique(labels)) == {0, 1, 2}
    volumes.write_labels(labels, geom, tmp_path / "out.nii.gz")
    volumes.write_labels(labels, geom, tmp_path / "out.dcm")
    err = capsys.readouterr().err
    if frame_of_reference:
        assert err == ""
    else:  # as 3D-IRCADb: the SEG still comes, with one warning line
        assert err.count("\n") == 1 and err.startswith("warning: ") and "FrameOfReferenceUID" in err
    assert {p: p.read_bytes() for p in files} == before  # the input is never touched

    frames, seg_ds = seg_label_frames(tmp_path / "out.dcm")
    sources = {d.SOPInstanceUID: d for d in (pydicom.dcmread(p) for p in files)}
    assert seg_ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4" and seg_ds.Modality == "SEG"
    assert seg_ds.SegmentationType == "BINARY"
    first = next(iter(sources.values()))
    assert seg_ds.StudyInstanceUID == first.StudyInstanceUID and seg_ds.PatientID == first.PatientID
    assert seg_ds.ReferencedSeriesSequence[0].SeriesInstanceUID == first.SeriesInstanceUID
    assert {i.ReferencedSOPInstanceUID for i in seg_ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence} \
        == set(sources)
    if frame_of_reference:
        assert seg_ds.FrameOfReferenceUID == first.FrameOfReferenceUID
    else:
        assert seg_ds.FrameOfReferenceUID and "FrameOfReferenceUID" not in first
    segments = {int(s.SegmentNumber): s for s in seg_ds.SegmentSequence}
    assert segments[1].SegmentedPropertyTypeCodeSequence[0].CodeValue == "10200004"  # SCT Liver
    assert segments[2].SegmentedPropertyTypeCodeSequence[0].CodeValue == "108369006"  # SCT Neoplasm
    assert segments[2].AnatomicRegionSequence[0].CodeValue == "10200004"  # ... of the liver
    for item in seg_ds.PerFrameFunctionalGroupsSequence:  # each frame where its source slice lies
        source = sources[item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID]
        np.testing.assert_allclose([float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient],
                                   [float(v) for v in source.ImagePositionPatient], atol=1e-3)

    # The SEG and the NIfTI output say the same, voxel for voxel: pair each source slice with the
    # NIfTI slice at its world position.
    nifti = nib.load(str(tmp_path / "out.nii.gz"))
    data = np.asanyarray(nifti.dataobj)
    for uid, source in sources.items():
        ras = np.diag([-1.0, -1.0, 1.0]) @ np.array(source.ImagePositionPatient, dtype=float)
        k = np.linalg.solve(nifti.affine[:3, :3], ras - nifti.affine[:3, 3])
        np.testing.assert_allclose(k[:2], 0, atol=1e-3)
        expected = data[:, :, int(round(k[2]))].T  # (rows, columns) as DICOM stores them
        got = frames.get(uid, np.zeros_like(expected))  # frames without labels are left out
        np.testing.assert_array_equal(got, expected)
    assert sum(int((f > 0).sum()) for f in frames.values()) == int((labels > 0).sum())

    import highdicom  # a second reader: highdicom parses what it wrote as a valid SEG
    assert highdicom.seg.segread(tmp_path / "out.dcm").number_of_segments == 2


def test_seg_of_a_nifti_input_is_a_data_error(tmp_path):
    vol, seg = nifti_twin(tmp_path / "nifti", (False, False, False))
    labels, geom = volumes.load_label_volume(seg)
    with pytest.raises(DataError) as exc:
        volumes.write_labels(labels, geom, tmp_path / "out.dcm")
    assert_one_line_naming(exc, "out.dcm", "expected .nii or .nii.gz")
    assert not list(tmp_path.glob("*out*"))


def test_atomic_folder_appears_whole_or_not_at_all(tmp_path):
    target = tmp_path / "made" / "for" / "it"
    with pytest.raises(RuntimeError):
        with volumes.atomic_folder(target) as tmp:
            (tmp / "half.txt").write_text("half")
            raise RuntimeError("stopped midway")
    assert list(tmp_path.iterdir()) == []  # neither the folder nor the parents made for it
    with volumes.atomic_folder(target) as tmp:
        (tmp / "a.txt").write_text("a")
        assert not target.exists()
    assert [p.name for p in target.iterdir()] == ["a.txt"] and oct(target.stat().st_mode & 0o777) != "0o700"
    with pytest.raises(DataError, match="expected a new or empty folder"):
        with volumes.atomic_folder(target) as tmp:  # not empty, and not to be replaced
            (tmp / "b.txt").write_text("b")
    with volumes.atomic_folder(target, replace=True) as tmp:
        (tmp / "b.txt").write_text("b")
    assert [p.name for p in target.iterdir()] == ["b.txt"]
    assert sorted(p.name for p in target.parent.iterdir()) == ["it"]  # no temporary or old folder left


# ------------------------------------------------------------------------------------------------
# run_cli: one line and exit status 2 for a user's mistake, a traceback for a bug
# ------------------------------------------------------------------------------------------------

def _parser():
    import argparse
    p = argparse.ArgumentParser(prog="tool.py")
    p.add_argument("--count", type=volumes.int_at_least(1), default=1)
    p.add_argument("--share", type=volumes.float_in(0, 1, high_open=True, what="a share"), default=0.5)
    p.add_argument("--window", type=float, nargs=2, action=volumes.ordered_pair(), default=[0.0, 1.0])
    p.add_argument("--mode", choices=["a", "b"], default="a")
    return p


@pytest.mark.parametrize("argv, line", [
    (["--count", "0"], "error: argument --count: found 0; expected 1 or more (see tool.py --help)"),
    (["--count", "two"], "error: argument --count: found 'two'; expected an integer, 1 or more (see tool.py --help)"),
    (["--share", "1"], "error: argument --share: found 1; expected a share in [0, 1) (see tool.py --help)"),
    (["--share", "inf"], "error: argument --share: found inf; expected a share in [0, 1) (see tool.py --help)"),
    (["--window", "5", "-5"], "error: argument --window: found 5 -5; expected LOW < HIGH (see tool.py --help)"),
    (["--mode", "c"], "error: argument --mode: found 'c'; expected one of 'a', 'b' (see tool.py --help)"),
    (["--nope"], "error: found unknown --nope; expected the flags --help lists (see tool.py --help)"),
])
def test_run_cli_refused_flag_is_one_line_exit_2_before_the_command_runs(capsys, argv, line):
    ran = []
    assert volumes.run_cli(ran.append, _parser(), argv) == 2
    captured = capsys.readouterr()
    assert captured.err == line + "\n" and captured.out == "" and not ran


def test_run_cli_data_error_is_one_line_and_a_bug_keeps_its_traceback(capsys):
    def user_mistake(args):
        raise DataError("x.nii: found 4 dimensions;\n expected 3")

    def bug(args):
        return {}["missing"]
    assert volumes.run_cli(user_mistake, _parser(), []) == 2
    assert capsys.readouterr().err == "error: x.nii: found 4 dimensions; expected 3\n"
    with pytest.raises(KeyError):
        volumes.run_cli(bug, _parser(), [])
    with pytest.raises(SystemExit) as done:  # --help still prints its page and exits 0
        volumes.run_cli(bug, _parser(), ["--help"])
    assert done.value.code == 0 and "usage: tool.py" in capsys.readouterr().out
