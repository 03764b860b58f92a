"""Tests for dataset.py: every case is built as real NIfTI / PNG / NPY files in tmp_path, so the real
loading path is the one tested, and expected values are computed by hand or straight from nibabel.

    python -m pytest tests/test_dataset.py -q
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

import dataset
from dataset import DataError

DATASET_PY = Path(dataset.__file__).resolve()
FLIPS = [(True, True, False), (False, False, True), (True, False, True), (False, True, False), (True, True, True)]


# ------------------------------------------------------------------------------------------------
# helpers: independent of dataset.py's own geometry code
# ------------------------------------------------------------------------------------------------

def raw_array(path) -> np.ndarray:
    return np.asanyarray(nib.load(str(path)).dataobj)


def file_slice_order(path) -> np.ndarray:
    """File slice k of a phantom (axis-aligned affine) in inferior -> superior order."""
    img = nib.load(str(path))
    n = img.shape[2]
    return np.arange(n) if img.affine[2, 2] > 0 else np.arange(n)[::-1]


def per_slice_counts(seg_path, label_min: int) -> np.ndarray:
    """Pixels with label >= label_min per axial slice, inferior -> superior, straight from nibabel."""
    seg = raw_array(seg_path)
    counts = (seg >= label_min).sum(axis=(0, 1))
    return counts[file_slice_order(seg_path)]


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


def prepare(data_dir, cache_dir, image_size=32, window=dataset.WINDOW_HU, workers=1):
    return dataset.prepare_cases(dataset.find_cases(data_dir), cache_dir, data_dir, image_size, window,
                                 workers=workers, progress=False)


@pytest.fixture
def prepared(lits_dir, cache_dir):
    return prepare(lits_dir, cache_dir)


# ------------------------------------------------------------------------------------------------
# the three layouts
# ------------------------------------------------------------------------------------------------

def test_find_cases_lits_nested_folders_and_mixed_extensions(tmp_path):
    root = tmp_path / "LiTS"
    b1, b2, scratch = root / "Training Batch 1", root / "Training Batch 2", tmp_path / "scratch"
    dataset.write_phantom_case(b1, 0, size=48, seed=0)
    dataset.write_phantom_case(b1, 2, size=48, seed=0, compress=True)
    dataset.write_phantom_case(b2, 10, size=48, seed=0, compress=True)
    # case 11: volume as .nii, its segmentation as .nii.gz (same data, written both ways)
    vol_nii, _ = dataset.write_phantom_case(scratch / "nii", 11, size=48, seed=0)
    _, seg_gz = dataset.write_phantom_case(scratch / "gz", 11, size=48, seed=0, compress=True)
    shutil.move(vol_nii, b2 / vol_nii.name)
    shutil.move(seg_gz, b2 / seg_gz.name)
    shutil.rmtree(scratch)

    cases = dataset.find_cases(root)
    assert [c.case_id for c in cases] == ["volume-0", "volume-2", "volume-10", "volume-11"]  # numeric order
    assert all(c.layout == "lits" for c in cases)
    assert [(c.images[0].relative_to(root).as_posix(), c.labels[0].relative_to(root).as_posix()) for c in cases] == [
        ("Training Batch 1/volume-0.nii", "Training Batch 1/segmentation-0.nii"),
        ("Training Batch 1/volume-2.nii.gz", "Training Batch 1/segmentation-2.nii.gz"),
        ("Training Batch 2/volume-10.nii.gz", "Training Batch 2/segmentation-10.nii.gz"),
        ("Training Batch 2/volume-11.nii", "Training Batch 2/segmentation-11.nii.gz"),
    ]

    prepared = dataset.prepare_cases(cases, tmp_path / "cache", root, 32, workers=1, progress=False)
    assert [p.num_slices for p in prepared] == [nib.load(str(c.images[0])).shape[2] for c in cases]
    ds = dataset.LiTSSliceDataset(prepared, "segmentation", context_slices=1)
    assert len(ds) == sum(p.num_slices for p in prepared)
    image, target = ds[len(ds) - 1]
    assert image.shape == (3, 32, 32) and target.shape == (32, 32)


def test_find_cases_msd_ignores_macos_junk(tmp_path):
    root, scratch = tmp_path / "Task03_Liver", tmp_path / "scratch"
    for i in (10, 2):
        vol, seg = dataset.write_phantom_case(scratch, i, size=48, seed=1, compress=True)
        (root / "imagesTr").mkdir(parents=True, exist_ok=True)
        (root / "labelsTr").mkdir(parents=True, exist_ok=True)
        shutil.move(vol, root / "imagesTr" / f"liver_{i}.nii.gz")
        shutil.move(seg, root / "labelsTr" / f"liver_{i}.nii.gz")
    for sub in ("imagesTr", "labelsTr"):  # AppleDouble companions: not NIfTI at all
        (root / sub / "._liver_2.nii.gz").write_bytes(b"\x00\x05\x16\x07Mac OS X" + bytes(100))
    (root / "imagesTr" / "._liver_99.nii.gz").write_bytes(bytes(50))  # junk with no partner either

    cases = dataset.find_cases(root)
    assert [c.case_id for c in cases] == ["liver_2", "liver_10"]
    assert all(c.layout == "msd" for c in cases)
    assert cases[0].images[0] == root / "imagesTr" / "liver_2.nii.gz"
    assert cases[0].labels[0] == root / "labelsTr" / "liver_2.nii.gz"

    prepared = dataset.prepare_cases(cases, tmp_path / "cache", root, 32, workers=1, progress=False)
    ds = dataset.LiTSSliceDataset(prepared, "classification", context_slices=0)
    image, target = ds[0]
    assert image.shape == (1, 32, 32) and target.shape == () and target.dtype == torch.int64


def _write_slice_folders(root: Path) -> None:
    """liver_3: PNG slices 1, 2, 10 (40x40, constant 10 * index grey); pat_7: NPY slices of -200, 25, 250 HU."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir(parents=True)
    mask = np.zeros((40, 40), np.uint8)
    mask[5:30, 5:30] = 1
    mask[10:15, 10:15] = 2
    for idx in (10, 2, 1):
        Image.fromarray(np.full((40, 40), 10 * idx, np.uint8)).save(root / "images" / f"liver_3_{idx}.png")
        Image.fromarray(mask).save(root / "masks" / f"liver_3_{idx}.png")
    hu = {0: -200.0, 1: 25.0, 2: 250.0}
    for idx, value in hu.items():
        np.save(root / "images" / f"pat_7_{idx}.npy", np.full((40, 40), value, np.float32))
        Image.fromarray(mask if idx == 1 else np.zeros_like(mask)).save(root / "masks" / f"pat_7_{idx}.png")


def test_find_cases_slice_folders_png_and_npy(tmp_path):
    root = tmp_path / "slices"
    _write_slice_folders(root)
    for sub in ("images", "masks"):  # macOS AppleDouble companions are not slices
        (root / sub / "._liver_3_1.png").write_bytes(bytes(80))
    cases = dataset.find_cases(root)
    assert [c.case_id for c in cases] == ["liver_3", "pat_7"]
    assert all(c.layout == "slices" for c in cases)
    assert [p.name for p in cases[0].images] == ["liver_3_1.png", "liver_3_2.png", "liver_3_10.png"]
    assert [p.name for p in cases[0].labels] == ["liver_3_1.png", "liver_3_2.png", "liver_3_10.png"]
    assert [p.name for p in cases[1].images] == ["pat_7_0.npy", "pat_7_1.npy", "pat_7_2.npy"]

    prepared = dataset.prepare_cases(cases, tmp_path / "cache", root, 32, workers=1, progress=False)
    png = np.load(prepared[0].image_path).astype(np.float32)  # (3, 32, 32)
    npy = np.load(prepared[1].image_path).astype(np.float32)
    assert png.shape == (3, 32, 32) and npy.shape == (3, 32, 32)
    np.testing.assert_allclose(png.mean(axis=(1, 2)), [10 / 255, 20 / 255, 100 / 255], atol=1e-3)
    np.testing.assert_allclose(npy.mean(axis=(1, 2)), [0.0, 0.5, 1.0], atol=1e-3)  # HU windowed -200..250
    assert prepared[0].liver_pixels.tolist() == [25 * 25] * 3
    assert prepared[0].tumor_pixels.tolist() == [25] * 3
    assert prepared[1].tumor_pixels.tolist() == [0, 25, 0]

    ds = dataset.LiTSSliceDataset(prepared, "segmentation", context_slices=1)
    assert len(ds) == 6
    image, target = ds[1]  # liver_3, slice 2 (middle)
    assert image.shape == (3, 32, 32) and target.shape == (32, 32)
    np.testing.assert_allclose(image.mean(dim=(1, 2)).numpy(), [10 / 255, 20 / 255, 100 / 255], atol=1e-3)
    assert set(target.unique().tolist()) == {0, 1, 2}


# ------------------------------------------------------------------------------------------------
# geometry
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flips", FLIPS)
def test_flipped_phantom_loads_like_unflipped_twin(tmp_path, flips):
    ref_vol, ref_seg = dataset.write_phantom_case(tmp_path / "ref", 5, size=48, seed=3, flips=(False, False, False))
    vol, seg = dataset.write_phantom_case(tmp_path / "flip", 5, size=48, seed=3, flips=flips)
    axes = tuple(i for i, f in enumerate(flips) if f)
    np.testing.assert_array_equal(raw_array(vol), np.flip(raw_array(ref_vol), axes))  # stored flipped
    assert not np.array_equal(raw_array(vol), raw_array(ref_vol))

    hu_ref, geom_ref = dataset.load_volume(ref_vol)
    hu, geom = dataset.load_volume(vol)
    assert hu.dtype == np.float32
    np.testing.assert_array_equal(hu, hu_ref)
    assert geom.spacing == geom_ref.spacing
    lab_ref, _ = dataset.load_label_volume(ref_seg)
    lab, _ = dataset.load_label_volume(seg, expected_shape=geom.shape)
    np.testing.assert_array_equal(lab, lab_ref)


@pytest.mark.parametrize("flips", FLIPS)
def test_flipped_phantom_keeps_world_position(tmp_path, flips):
    """The flipped twin's affine says where each voxel is: the same tissue at the same mm position."""
    ref_vol, _ = dataset.write_phantom_case(tmp_path / "ref", 5, size=48, seed=3, flips=(False, False, False))
    vol, _ = dataset.write_phantom_case(tmp_path / "flip", 5, size=48, seed=3, flips=flips)
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
    vol, seg = dataset.write_phantom_case(tmp_path, 1, size=48, seed=2, flips=flips)
    raw = raw_array(vol)
    hu, geom = dataset.load_volume(vol)
    assert geom.shape == raw.shape
    assert hu.shape == (raw.shape[2], raw.shape[1], raw.shape[0])
    np.testing.assert_array_equal(geom.to_file(hu), raw)
    np.testing.assert_array_equal(geom.to_file(geom.to_slices(raw)), raw)
    lab, lgeom = dataset.load_label_volume(seg)
    np.testing.assert_array_equal(lgeom.to_file(lab), raw_array(seg))
    with pytest.raises(ValueError):
        geom.to_file(hu[:-1])


@pytest.mark.parametrize("flips", [(False, False, False), (False, False, True), (True, True, True)])
def test_slice_index_maps_file_slice_to_the_same_data(tmp_path, flips):
    vol, _ = dataset.write_phantom_case(tmp_path, 1, size=48, seed=2, flips=flips)
    raw = raw_array(vol)
    hu, geom = dataset.load_volume(vol)
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
    hu, geom = dataset.load_volume(path)
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
    hu, _ = dataset.load_volume(path)
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
    out = dataset.window_hu(x)
    if kind == "numpy":
        assert isinstance(out, np.ndarray) and out.dtype == np.float32
        np.testing.assert_allclose(out, expected, atol=1e-7)
        np.testing.assert_array_equal(x, before)
    else:
        assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
        torch.testing.assert_close(out, torch.tensor(expected), atol=1e-7, rtol=0)
        assert torch.equal(x, before)
    int_out = dataset.window_hu(np.array([-200, 25, 250], np.int16))
    assert int_out.dtype == np.float32 and int_out.tolist() == [0.0, 0.5, 1.0]


def test_window_hu_custom_window():
    np.testing.assert_allclose(dataset.window_hu(np.array([-10.0, 0.0, 50.0, 100.0, 150.0]), (0, 100)),
                               [0.0, 0.0, 0.5, 1.0, 1.0])
    out = dataset.window_hu(torch.tensor([-1000, 0, 500], dtype=torch.int16), window=(-1000.0, 1000.0))
    torch.testing.assert_close(out, torch.tensor([0.0, 0.5, 0.75]))
    with pytest.raises(ValueError):
        dataset.window_hu(np.zeros(3), (100, 100))


@pytest.mark.parametrize("size", [20, 64])
def test_resize_labels_keep_only_input_values(size):
    labels = np.random.default_rng(0).choice(np.array([0, 2], np.uint8), size=(4, 48, 48))
    out = dataset.resize_slices(labels, size, "label")
    assert out.shape == (4, size, size) and out.dtype == torch.uint8
    assert set(out.unique().tolist()) <= {0, 2}
    img = dataset.resize_slices(np.full((2, 48, 48), 0.3, np.float32), size, "image")
    assert img.dtype == torch.float32 and img.shape == (2, size, size)
    torch.testing.assert_close(img, torch.full((2, size, size), 0.3))  # a flat image stays flat


def test_resize_is_identity_when_size_matches():
    rng = np.random.default_rng(1)
    image = rng.random((3, 32, 32), dtype=np.float32)
    labels = rng.integers(0, 3, (3, 32, 32)).astype(np.uint8)
    assert torch.equal(dataset.resize_slices(image, 32, "image"), torch.from_numpy(image))
    assert torch.equal(dataset.resize_slices(labels, 32, "label"), torch.from_numpy(labels))
    with pytest.raises(ValueError):
        dataset.resize_slices(image[0], 32)


# ------------------------------------------------------------------------------------------------
# the prepared cache
# ------------------------------------------------------------------------------------------------

def _stamps(folder: Path) -> dict:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.iterdir()}


def test_second_prepare_rewrites_nothing(lits_dir, cache_dir, monkeypatch):
    first = prepare(lits_dir, cache_dir)
    folder = dataset.cache_folder(cache_dir, lits_dir, 32, dataset.WINDOW_HU)
    before = _stamps(folder)

    def must_not_run(*args, **kwargs):
        raise AssertionError("a fresh case was prepared again")

    monkeypatch.setattr(dataset, "_prepare_case", must_not_run)
    second = prepare(lits_dir, cache_dir)
    assert _stamps(folder) == before  # params.json included
    assert [(p.case_id, p.num_slices, p.image_path) for p in second] == \
        [(p.case_id, p.num_slices, p.image_path) for p in first]
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a.tumor_pixels, b.tumor_pixels)


def test_changed_source_rebuilds_that_case_only(lits_dir, cache_dir, tmp_path, monkeypatch):
    prepare(lits_dir, cache_dir)
    done = []
    real = dataset._prepare_case

    def spy(case, *args, **kwargs):
        done.append(case.case_id)
        return real(case, *args, **kwargs)

    monkeypatch.setattr(dataset, "_prepare_case", spy)
    seg1 = lits_dir / "segmentation-1.nii"
    st = seg1.stat()
    os.utime(seg1, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))  # touched, same content
    prepare(lits_dir, cache_dir)
    assert done == ["volume-1"]

    done.clear()  # new content for case 2
    new_vol, new_seg = dataset.write_phantom_case(tmp_path / "other", 2, size=48, seed=99)
    shutil.copyfile(new_vol, lits_dir / "volume-2.nii")
    shutil.copyfile(new_seg, lits_dir / "segmentation-2.nii")
    result = {p.case_id: p for p in prepare(lits_dir, cache_dir)}
    assert done == ["volume-2"]
    np.testing.assert_array_equal(result["volume-2"].liver_pixels, per_slice_counts(new_seg, 1))
    assert result["volume-2"].num_slices == nib.load(str(new_vol)).shape[2]

    done.clear()
    prepare(lits_dir, cache_dir)
    assert done == []


def test_cache_folder_depends_on_parameters(lits_dir, cache_dir):
    a = dataset.cache_folder(cache_dir, lits_dir, 32, dataset.WINDOW_HU)
    assert dataset.cache_folder(cache_dir, lits_dir, 32, (-200, 250)) == a
    b = dataset.cache_folder(cache_dir, lits_dir, 40, dataset.WINDOW_HU)
    c = dataset.cache_folder(cache_dir, lits_dir, 32, (-100, 200))
    assert len({a, b, c}) == 3
    prepare(lits_dir, cache_dir, 32)
    prepare(lits_dir, cache_dir, 40)
    cw = prepare(lits_dir, cache_dir, 32, window=(-100, 200))
    assert sorted(p.name for p in cache_dir.iterdir()) == sorted([a.name, b.name, c.name])
    assert np.load(cw[0].image_path).shape[1:] == (32, 32)
    assert np.load(prepare(lits_dir, cache_dir, 40)[0].image_path).shape[1:] == (40, 40)
    assert json.loads((c / "params.json").read_text())["window"] == [-100.0, 200.0]


def test_prepare_leaves_complete_entries_only_and_parallel_equals_serial(lits_dir, tmp_path):
    serial = prepare(lits_dir, tmp_path / "c1", workers=1)
    parallel = prepare(lits_dir, tmp_path / "c2", workers=2)
    for cache in ("c1", "c2"):
        folder = dataset.cache_folder(tmp_path / cache, lits_dir, 32, dataset.WINDOW_HU)
        expected = {"params.json"} | {f"volume-{i}{ext}" for i in range(4)
                                      for ext in (".json", ".image.npy", ".label.npy")}
        assert {p.name for p in folder.iterdir()} == expected  # no temporary or hidden files
    for s, p in zip(serial, parallel):
        np.testing.assert_array_equal(np.load(s.image_path), np.load(p.image_path))
        np.testing.assert_array_equal(np.load(s.label_path), np.load(p.label_path))


def test_cached_arrays_equal_independent_computation(prepared, lits_dir):
    for case, prep in zip(dataset.find_cases(lits_dir), prepared):
        hu, _ = dataset.load_volume(case.images[0])
        expected = dataset.resize_slices(dataset.window_hu(hu), 32, "image").numpy()
        image = np.load(prep.image_path)
        assert image.dtype == np.float16 and image.shape == (prep.num_slices, 32, 32)
        np.testing.assert_allclose(image.astype(np.float32), expected, atol=1e-3, rtol=0)
        label = np.load(prep.label_path)
        lab, _ = dataset.load_label_volume(case.labels[0])
        assert label.dtype == np.uint8
        np.testing.assert_array_equal(label, dataset.resize_slices(lab, 32, "label").numpy())
        # native-resolution counts, straight from the segmentation file
        np.testing.assert_array_equal(prep.liver_pixels, per_slice_counts(case.labels[0], 1))
        np.testing.assert_array_equal(prep.tumor_pixels, per_slice_counts(case.labels[0], 2))
        assert prep.num_slices == nib.load(str(case.images[0])).shape[2]
        assert prep.spacing == tuple(float(z) for z in nib.load(str(case.images[0])).header.get_zooms()[::-1])
    assert any(p.tumor_pixels.sum() > 0 for p in prepared) and any(p.tumor_pixels.sum() == 0 for p in prepared)


# ------------------------------------------------------------------------------------------------
# the patient-level split
# ------------------------------------------------------------------------------------------------

IDS = [f"volume-{i}" for i in range(20)]


def test_split_cases_partitions_reproducibly():
    split = dataset.split_cases(IDS, 0.15, 0.15, seed=0)
    parts = [set(split[k]) for k in ("train", "val", "test")]
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    assert parts[0] | parts[1] | parts[2] == set(IDS)
    assert split == dataset.split_cases(IDS, 0.15, 0.15, seed=0)
    assert split != dataset.split_cases(IDS, 0.15, 0.15, seed=1)
    assert len(split["val"]) == len(split["test"]) == 3 and len(split["train"]) == 14
    s2 = dataset.split_cases(IDS, 0.25, 0.1, seed=0)
    assert (len(s2["train"]), len(s2["val"]), len(s2["test"])) == (13, 5, 2)
    small = dataset.split_cases(IDS[:3], 0.15, 0.15)  # 0.15 * 3 rounds to 0, yet each part gets one
    assert sorted(len(v) for v in small.values()) == [1, 1, 1]
    with pytest.raises(ValueError):
        dataset.split_cases(IDS, 0.6, 0.5)


@pytest.mark.parametrize("seed", range(5))
def test_split_cases_stratifies_tumor_cases(seed):
    has_tumor = {c: i < 4 for i, c in enumerate(IDS)}  # 4 of 20 cases have tumors
    split = dataset.split_cases(IDS, 0.15, 0.15, seed=seed, has_tumor=has_tumor)
    assert sorted(sum(split.values(), [])) == sorted(IDS)
    for part in ("train", "val", "test"):
        assert any(has_tumor[c] for c in split[part]), part
    assert sum(has_tumor[c] for c in split["train"]) == 2


def test_load_split_errors(tmp_path):
    ok = tmp_path / "ok.json"
    ok.write_text(json.dumps({"train": IDS[:15], "val": IDS[15:18], "test": IDS[18:], "seed": 0}))
    assert dataset.load_split(ok, IDS) == {"train": IDS[:15], "val": IDS[15:18], "test": IDS[18:]}
    both = tmp_path / "both.json"
    both.write_text(json.dumps({"train": IDS[:15], "val": IDS[14:18], "test": IDS[18:]}))
    with pytest.raises(DataError) as exc:
        dataset.load_split(both, IDS)
    assert_one_line_naming(exc, "both.json", IDS[14])
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps({"train": IDS[:15] + ["volume-99"], "val": [], "test": []}))
    with pytest.raises(DataError) as exc:
        dataset.load_split(unknown, IDS)
    assert_one_line_naming(exc, "unknown.json", "volume-99")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(DataError) as exc:
        dataset.load_split(broken, IDS)
    assert_one_line_naming(exc, "broken.json")


# ------------------------------------------------------------------------------------------------
# the slice dataset, sampling and augmentation
# ------------------------------------------------------------------------------------------------

def test_context_indices_clamp_at_the_ends():
    assert dataset.context_indices(0, 5, 2).tolist() == [0, 0, 0, 1, 2]
    assert dataset.context_indices(4, 5, 1).tolist() == [3, 4, 4]
    assert dataset.context_indices(2, 5, 0).tolist() == [2]


@pytest.mark.parametrize("k", [0, 1, 2])
def test_segmentation_items(prepared, k):
    ds = dataset.LiTSSliceDataset(prepared, "segmentation", context_slices=k)
    assert len(ds) == sum(p.num_slices for p in prepared)
    i = 0
    for prep in prepared:
        cache = np.load(prep.image_path).astype(np.float32)
        labels = np.load(prep.label_path)
        n = prep.num_slices
        for z in range(n):
            image, target = ds[i + z]
            assert image.shape == (2 * k + 1, 32, 32) and image.dtype == torch.float32
            assert target.shape == (32, 32) and target.dtype == torch.int64
            assert 0.0 <= image.min() and image.max() <= 1.0
            assert set(target.unique().tolist()) <= {0, 1, 2}
            for j in range(2 * k + 1):
                neighbour = min(max(z - k + j, 0), n - 1)
                np.testing.assert_array_equal(image[j].numpy(), cache[neighbour])
            np.testing.assert_array_equal(target.numpy(), labels[z])
            if k >= 1 and z == 0:
                assert torch.equal(image[0], image[1])  # clamped: the first slice repeats
            if k >= 1 and z == n - 1:
                assert torch.equal(image[-1], image[-2])
        i += n
    all_labels = set(np.concatenate([np.unique(np.load(p.label_path)) for p in prepared]).tolist())
    assert all_labels == {0, 1, 2}


@pytest.mark.parametrize("k, min_tumor_pixels", [(0, 1), (1, 1), (2, 20)])
def test_classification_targets_from_segmentation_file(prepared, lits_dir, k, min_tumor_pixels):
    ds = dataset.LiTSSliceDataset(prepared, "classification", k, min_tumor_pixels=min_tumor_pixels)
    expected = np.concatenate([per_slice_counts(c.labels[0], 2) >= min_tumor_pixels
                               for c in dataset.find_cases(lits_dir)]).astype(np.int64)
    got = []
    for i in range(len(ds)):
        image, target = ds[i]
        assert image.shape == (2 * k + 1, 32, 32) and image.dtype == torch.float32
        assert 0.0 <= image.min() and image.max() <= 1.0
        assert target.shape == () and target.dtype == torch.int64
        got.append(int(target))
    assert got == expected.tolist()
    assert 0 < sum(got) < len(got)


def test_liver_only_keeps_exactly_the_liver_slices(prepared, lits_dir):
    ds = dataset.LiTSSliceDataset(prepared, "segmentation", 0, liver_only=True)
    expected = {(c.case_id, z) for c in dataset.find_cases(lits_dir)
                for z in np.flatnonzero(per_slice_counts(c.labels[0], 1) > 0)}
    got = {(prepared[ci].case_id, z) for ci, z in ds.index.tolist()}
    assert got == expected and len(ds) == len(expected) < sum(p.num_slices for p in prepared)


@pytest.mark.parametrize("fraction", [0.5, 0.2])
def test_tumor_sampler_draws_the_requested_fraction(fraction):
    tumor = np.zeros(1000, bool)
    tumor[::100] = True  # 1% tumor slices
    sampler = dataset.tumor_sampler(tumor, fraction, num_samples=20_000, seed=0)
    drawn = np.fromiter(iter(sampler), dtype=np.int64)
    assert len(drawn) == 20_000
    assert abs(tumor[drawn].mean() - fraction) < 0.05
    assert np.array_equal(drawn, np.fromiter(iter(dataset.tumor_sampler(tumor, fraction, 20_000, seed=0)), np.int64))
    assert len(list(dataset.tumor_sampler(np.zeros(10, bool), 0.5))) == 10  # no tumor at all: uniform


def _random_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(4, 3, 32, 32, generator=g), torch.randint(0, 3, (4, 32, 32), generator=g)


def test_augment_batch_shapes_and_ranges():
    torch.manual_seed(0)
    images, masks = _random_batch()
    out, m = dataset.augment_batch(images, masks, max_rotation=30, noise=0.2, brightness=0.3)
    assert out.shape == images.shape and out.dtype == torch.float32
    assert m.shape == masks.shape and m.dtype == torch.int64
    assert 0.0 <= out.min() and out.max() <= 1.0
    assert set(m.unique().tolist()) <= {0, 1, 2}
    out2, none = dataset.augment_batch(images.double())
    assert none is None and out2.dtype == torch.float64 and out2.shape == images.shape


def test_augment_batch_without_jitter_is_identity():
    torch.manual_seed(0)
    images, masks = _random_batch()
    out, m = dataset.augment_batch(images, masks, max_rotation=0, scale=(1, 1), contrast=0, brightness=0, noise=0)
    torch.testing.assert_close(out, images, atol=1e-5, rtol=0)
    assert torch.equal(m, masks)


@pytest.mark.parametrize("hflip", [False, True])
def test_augment_batch_moves_image_and_mask_together(hflip):
    torch.manual_seed(1)
    images = torch.zeros(8, 3, 64, 64)
    masks = torch.zeros(8, 64, 64, dtype=torch.int64)
    images[:, :, 12:36, 30:50] = 1.0  # off-centre, so a flip or rotation moves it
    masks[:, 12:36, 30:50] = 1
    out, m = dataset.augment_batch(images, masks, max_rotation=15, scale=(0.85, 1.15), hflip=hflip)
    for i in range(8):
        fg_img, fg_mask = out[i, 1] > 0.5, m[i] == 1
        iou = (fg_img & fg_mask).sum() / (fg_img | fg_mask).sum()
        assert iou > 0.9, (i, float(iou))
        assert (fg_img == fg_mask).float().mean() > 0.98
    if hflip:  # some samples flipped: their square lies on the other half
        assert any(m[i, :, :32].sum() > m[i, :, 32:].sum() for i in range(8))


# ------------------------------------------------------------------------------------------------
# LiTSDataModule
# ------------------------------------------------------------------------------------------------

def test_datamodule_end_to_end(tmp_path):
    data = tmp_path / "data"
    dataset.write_synthetic_lits(data, cases=6, size=48, seed=0)
    out = tmp_path / "run"
    dm = dataset.LiTSDataModule(data, "segmentation", cache_dir=tmp_path / "cache", image_size=32, batch_size=4,
                                num_workers=0, output_dir=out, prepare_workers=1)
    dm.prepare_data()
    dm.setup("fit")
    record = json.loads((out / "splits.json").read_text())
    split = {k: record[k] for k in ("train", "val", "test")}
    ids = [f"volume-{i}" for i in range(6)]
    assert sorted(sum(split.values(), [])) == ids and all(split.values())
    num_slices = {c.case_id: nib.load(str(c.images[0])).shape[2] for c in dataset.find_cases(data)}
    for part, ds in dm.datasets.items():
        assert sorted(c.case_id for c in ds.cases) == sorted(split[part])
        assert len(ds) == sum(num_slices[c] for c in split[part])
        assert {ds.cases[ci].case_id for ci in ds.index[:, 0]} == set(split[part])

    images, masks = next(iter(dm.train_dataloader()))
    assert images.shape == (4, 3, 32, 32) and images.dtype == torch.float32
    assert masks.shape == (4, 32, 32) and masks.dtype == torch.int64
    images, masks = next(iter(dm.val_dataloader()))
    assert images.shape[1:] == (3, 32, 32) and masks.shape[1:] == (32, 32)
    batch = (images, masks)
    assert dm.on_after_batch_transfer(batch, 0) is batch  # no trainer: no augmentation

    dm2 = dataset.LiTSDataModule(data, "classification", cache_dir=tmp_path / "cache", image_size=32, batch_size=4,
                                 num_workers=0, seed=123, split_file=out / "splits.json", prepare_workers=1,
                                 oversample_tumor=0.5)
    dm2.setup("fit")
    assert dm2.split == split
    assert sorted(c.case_id for c in dm2.datasets["test"].cases) == sorted(split["test"])
    images, target = next(iter(dm2.train_dataloader()))
    assert images.shape == (4, 3, 32, 32) and target.shape == (4,) and target.dtype == torch.int64
    for ds in dm2.datasets.values():  # classification defaults to liver slices only
        assert all(ds.cases[ci].liver_pixels[z] > 0 for ci, z in ds.index)


# ------------------------------------------------------------------------------------------------
# errors: one line, naming the file
# ------------------------------------------------------------------------------------------------

def test_shape_mismatch_is_a_data_error(tmp_path):
    data = tmp_path / "data"
    dataset.write_phantom_case(data, 0, size=48, seed=0)
    _, other_seg = dataset.write_phantom_case(tmp_path / "other", 0, size=56, seed=0)
    shutil.copyfile(other_seg, data / "segmentation-0.nii")
    with pytest.raises(DataError) as exc:
        prepare(data, tmp_path / "cache")
    msg = assert_one_line_naming(exc, "segmentation-0.nii", "volume-0.nii")
    assert str(nib.load(str(other_seg)).shape) in msg and str(nib.load(str(data / "volume-0.nii")).shape) in msg


@pytest.mark.parametrize("value, dtype, shown", [(3, np.uint8, "3"), (0.5, np.float32, "0.5"), (-1, np.int16, "-1")])
def test_labels_outside_0_1_2_are_a_data_error(tmp_path, value, dtype, shown):
    data = tmp_path / "data"
    _, seg = dataset.write_phantom_case(data, 0, size=48, seed=0)
    img = nib.load(str(seg))
    labels = np.asanyarray(img.dataobj).astype(dtype)
    labels[10, 10, 3] = value
    save_nifti(seg, labels, img.affine)
    with pytest.raises(DataError) as exc:
        prepare(data, tmp_path / "cache")
    msg = assert_one_line_naming(exc, "segmentation-0.nii")
    assert shown in msg.split("{")[1].split("}")[0]
    assert not list((tmp_path / "cache").rglob("volume-0*"))


def test_float_labels_with_whole_values_are_accepted(tmp_path):
    data = tmp_path / "data"
    _, seg = dataset.write_phantom_case(data, 0, size=48, seed=0)
    img = nib.load(str(seg))
    save_nifti(seg, np.asanyarray(img.dataobj).astype(np.float32), img.affine)  # as some LiTS files are
    lab, _ = dataset.load_label_volume(seg)
    assert lab.dtype == np.uint8 and set(np.unique(lab).tolist()) <= {0, 1, 2}


def test_unpaired_files_are_a_data_error(lits_dir):
    (lits_dir / "segmentation-1.nii").unlink()
    with pytest.raises(DataError) as exc:
        dataset.find_cases(lits_dir)
    assert_one_line_naming(exc, "volume-1.nii", "segmentation-1.nii")
    _, seg1 = dataset.write_phantom_case(lits_dir.parent / "x", 1, size=48)
    shutil.copyfile(seg1, lits_dir / "segmentation-1.nii")
    (lits_dir / "volume-2.nii").unlink()
    with pytest.raises(DataError) as exc:
        dataset.find_cases(lits_dir)
    assert_one_line_naming(exc, "segmentation-2.nii", "volume-2")


def test_unpaired_msd_files_are_a_data_error(tmp_path):
    (tmp_path / "labelsTr").mkdir()
    (tmp_path / "labelsTr" / "liver_4.nii.gz").write_bytes(b"")
    with pytest.raises(DataError) as exc:
        dataset.find_cases(tmp_path)
    assert_one_line_naming(exc, "liver_4.nii.gz", "imagesTr")


def test_corrupt_file_is_a_data_error(tmp_path):
    data = tmp_path / "data"
    dataset.write_phantom_case(data, 0, size=48, seed=0)
    bad = data / "volume-0.nii"
    bad.write_bytes(np.random.default_rng(0).bytes(5000))
    with pytest.raises(DataError) as exc:
        dataset.load_volume(bad)
    assert_one_line_naming(exc, str(bad))
    with pytest.raises(DataError) as exc:
        prepare(data, tmp_path / "cache")
    assert_one_line_naming(exc, "volume-0.nii")


@pytest.mark.parametrize("compress", [False, True])
def test_truncated_file_is_a_data_error(tmp_path, compress):
    vol, _ = dataset.write_phantom_case(tmp_path / "data", 0, size=48, seed=0, compress=compress)
    content = vol.read_bytes()
    vol.write_bytes(content[: len(content) // 2])
    with pytest.raises(DataError) as exc:
        dataset.load_volume(vol)
    assert_one_line_naming(exc, vol.name)


def test_4d_volume_is_a_data_error(tmp_path):
    path = save_nifti(tmp_path / "volume-0.nii", np.zeros((8, 8, 4, 2), np.int16))
    with pytest.raises(DataError) as exc:
        dataset.load_volume(path)
    assert_one_line_naming(exc, "volume-0.nii", "4D")
    single = save_nifti(tmp_path / "volume-1.nii", np.zeros((8, 8, 4, 1), np.int16))
    assert dataset.load_volume(single)[0].shape == (4, 8, 8)  # a trailing axis of 1 is fine


def test_empty_or_missing_data_dir_is_a_data_error(tmp_path):
    empty = tmp_path / "empty"
    (empty / "imagesTr").mkdir(parents=True)
    (empty / "imagesTr" / "._liver_0.nii.gz").write_bytes(bytes(10))  # junk only
    with pytest.raises(DataError) as exc:
        dataset.find_cases(empty)
    assert_one_line_naming(exc, str(empty), "found no cases")
    with pytest.raises(DataError) as exc:
        dataset.find_cases(tmp_path / "nowhere")
    assert_one_line_naming(exc, "nowhere")


# ------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------

def run_cli(*args, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(DATASET_PY), *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("problem", ["missing", "shape", "corrupt"])
def test_cli_prepare_bad_data_exits_2_with_one_line(tmp_path, problem):
    data, cache = tmp_path / "data", tmp_path / "cache"
    bad_file = data
    if problem != "missing":
        dataset.write_phantom_case(data, 0, size=48, seed=0)
        dataset.write_phantom_case(data, 1, size=48, seed=0)  # a good case beside the bad one
        if problem == "shape":
            _, other = dataset.write_phantom_case(tmp_path / "other", 0, size=56, seed=0)
            bad_file = data / "segmentation-0.nii"
            shutil.copyfile(other, bad_file)
        else:
            bad_file = data / "volume-0.nii"
            bad_file.write_bytes(bytes(range(256)) * 20)
    inputs = {p: p.read_bytes() for p in data.rglob("*")} if data.exists() else {}
    proc = run_cli("prepare", "--data-dir", data, "--cache-dir", cache, cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr and bad_file.name in lines[0]
    assert proc.stdout == ""
    left = [p for p in cache.rglob("*") if p.is_file()] if cache.exists() else []
    assert not [p for p in left if p.name.startswith(".") or p.suffix == ".tmp" or p.name.startswith("volume-0")]
    for meta in (p for p in left if p.suffix == ".json" and p.name != "params.json"):
        cid = meta.name[:-5]
        assert (meta.parent / f"{cid}.image.npy").exists() and (meta.parent / f"{cid}.label.npy").exists()
    assert {p: p.read_bytes() for p in data.rglob("*")} == inputs  # inputs untouched


def test_cli_synth_then_prepare(tmp_path):
    proc = run_cli("synth", "--out-dir", "synth", "--cases", 2, "--size", 48, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    names = sorted(p.name for p in (tmp_path / "synth").iterdir())
    assert names == ["segmentation-0.nii", "segmentation-1.nii", "volume-0.nii", "volume-1.nii"]
    assert nib.load(str(tmp_path / "synth" / "volume-0.nii")).shape[:2] == (48, 48)
    proc = run_cli("prepare", "--data-dir", "synth", "--cache-dir", "cache", "--image-size", 32, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    folder = dataset.cache_folder(tmp_path / "cache", tmp_path / "synth", 32, dataset.WINDOW_HU)
    for cid in ("volume-0", "volume-1"):
        assert np.load(folder / f"{cid}.image.npy").shape[1:] == (32, 32)
        assert json.loads((folder / f"{cid}.json").read_text())["case_id"] == cid
    assert "prepared 2 case(s)" in proc.stderr


@pytest.mark.parametrize("compress", [False, True])
def test_synth_is_deterministic_per_seed(tmp_path, compress):
    parser = dataset.get_args_parser()
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        argv = ["synth", "--out-dir", str(tmp_path / name), "--cases", "2", "--size", "48", "--seed", str(seed)]
        assert dataset.run_cli(dataset.main, parser, argv + (["--compress"] if compress else [])) == 0
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert len(files) == 4 and files == sorted(p.name for p in (tmp_path / "c").iterdir())
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
        assert (tmp_path / "a" / f).read_bytes() != (tmp_path / "c" / f).read_bytes()


# ------------------------------------------------------------------------------------------------
# the phantom
# ------------------------------------------------------------------------------------------------

def test_phantom_files_int16_volume_and_0_1_2_labels(lits_dir):
    for case in dataset.find_cases(lits_dir):
        vol, seg = nib.load(str(case.images[0])), nib.load(str(case.labels[0]))
        assert vol.get_data_dtype() == np.int16
        assert np.asanyarray(vol.dataobj).dtype == np.int16  # stored as is, no scaling
        assert set(np.unique(np.asanyarray(seg.dataobj)).tolist()) <= {0, 1, 2}
        assert {1} <= set(np.unique(np.asanyarray(seg.dataobj)).tolist())
        assert vol.shape == seg.shape and np.allclose(vol.affine, seg.affine)


def test_phantom_some_cases_are_tumor_free():
    has_tumor = [bool((dataset.make_phantom(48, seed=s)[1] == 2).any()) for s in range(12)]
    assert 0 < sum(has_tumor) < 12


@pytest.mark.parametrize("seed", range(4))
def test_phantom_tumors_lie_inside_the_liver(seed):
    _, no_tumor, _ = dataset.make_phantom(48, seed=seed, num_tumors=0)
    _, labels, _ = dataset.make_phantom(48, seed=seed, num_tumors=3)
    liver = no_tumor == 1  # the same seed draws the same liver before any tumor
    assert (labels == 2).any()
    assert liver[labels == 2].all()
    np.testing.assert_array_equal(labels >= 1, liver)


@pytest.mark.parametrize("seed", range(6))
def test_phantom_tumor_contrast_and_noise(tmp_path, seed):
    vol, seg = dataset.write_phantom_case(tmp_path, 0, size=64, seed=seed, num_tumors=1)
    hu, _ = dataset.load_volume(vol)
    labels, _ = dataset.load_label_volume(seg)
    # medians: the liver's bright vessels would pull a mean
    contrast = np.median(hu[labels == 2]) - np.median(hu[labels == 1])
    assert 10 <= abs(contrast) <= 50, contrast
    spine = hu > 350  # bone is the one flat region above 350 HU (500 HU + noise)
    assert spine.sum() > 200
    assert 9.5 <= hu[spine].std() <= 20.5
