"""Tests for dataset.py: every case is built as real NIfTI / PNG / NPY files in tmp_path, so the real
loading path is the one tested, and expected values are computed by hand or straight from nibabel.

    python -m pytest tests/test_dataset.py -q
"""
import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

import dataset
import phantom
import volumes
from volumes import DataError
from tests.helpers import assert_one_line_naming, save_nifti

DATASET_PY = Path(dataset.__file__).resolve()


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


def prepare(data_dir, cache_dir, image_size=32, window=volumes.WINDOW_HU, workers=1):
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
    phantom.write_phantom_case(b1, 0, size=48, seed=0)
    phantom.write_phantom_case(b1, 2, size=48, seed=0, compress=True)
    phantom.write_phantom_case(b2, 10, size=48, seed=0, compress=True)
    # case 11: volume as .nii, its segmentation as .nii.gz (same data, written both ways)
    vol_nii, _ = phantom.write_phantom_case(scratch / "nii", 11, size=48, seed=0)
    _, seg_gz = phantom.write_phantom_case(scratch / "gz", 11, size=48, seed=0, compress=True)
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
        vol, seg = phantom.write_phantom_case(scratch, i, size=48, seed=1, compress=True)
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
    image, target, label = ds[0]
    assert image.shape == (1, 32, 32) and target.shape == () and target.dtype == torch.int64
    assert label.shape == (32, 32) and label.dtype == torch.uint8


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
    # Slice 10 sorts beside slice 2 but is no neighbour of it: slice 2 repeats in its place.
    np.testing.assert_allclose(image.mean(dim=(1, 2)).numpy(), [10 / 255, 20 / 255, 20 / 255], atol=1e-3)
    assert set(target.unique().tolist()) == {0, 1, 2}
    image, _ = ds[2]  # liver_3, slice 10: no neighbour at all
    np.testing.assert_allclose(image.mean(dim=(1, 2)).numpy(), [100 / 255] * 3, atol=1e-3)


def hand_window(hu, low, high) -> np.ndarray:
    """HU -> [0, 1] as the window is defined: low and below 0, high and above 1, linear between."""
    return np.clip((np.asarray(hu, np.float64) - low) / (high - low), 0.0, 1.0)


def test_npy_slices_are_windowed_with_the_runs_window(tmp_path):
    """.npy slices hold HU: the cache (what training reads) holds them windowed with the window it is
    prepared with, not the built-in one, and another window gives another cache."""
    root = tmp_path / "slices"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    ramp = np.linspace(-300, 300, 32 * 32, dtype=np.float32).reshape(32, 32)  # crosses both windows' ends
    for idx in range(3):
        np.save(root / "images" / f"pat_1_{idx}.npy", ramp + 10 * idx)
        Image.fromarray(np.ones((32, 32), np.uint8)).save(root / "masks" / f"pat_1_{idx}.png")
    for window in ((-100.0, 200.0), volumes.WINDOW_HU):
        (case,) = prepare(root, tmp_path / "cache", image_size=32, window=window)
        assert case.image_path.parent == dataset.cache_folder(tmp_path / "cache", root, 32, window)
        cached = np.load(case.image_path).astype(np.float32)  # (3, 32, 32) float16 in the cache
        expected = np.stack([hand_window(ramp + 10 * idx, *window) for idx in range(3)])
        np.testing.assert_allclose(cached, expected, atol=1e-3)
        item, _ = dataset.LiTSSliceDataset([case], "segmentation", context_slices=0)[1]
        np.testing.assert_allclose(item[0].numpy(), expected[1], atol=1e-3)


def _write_named_slices(root: Path, stems: list[str]) -> dict[str, float]:
    """One 8x8 PNG slice per stem, each its own grey (so a channel tells which slice it holds)."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    grey = {}
    for i, stem in enumerate(stems):
        grey[stem] = 10.0 * (i + 1)
        Image.fromarray(np.full((8, 8), grey[stem], np.uint8)).save(root / "images" / f"{stem}.png")
        Image.fromarray(np.ones((8, 8), np.uint8)).save(root / "masks" / f"{stem}.png")
    return grey


@pytest.mark.parametrize("k", [1, 2])
def test_slice_folder_context_comes_from_true_neighbours_only(tmp_path, k):
    """Stems whose index is not a number (the flipped and mirrored exports f103, m102) and numbers
    with a gap between them are no neighbours: such a slice's context is the slice itself, as at a
    volume's end; numbers that follow each other are stacked, clamped at the end of their run."""
    root = tmp_path / "slices"
    grey = _write_named_slices(root, ["p1_f103", "p1_f104", "p1_m102", "q2_4", "q2_5", "q2_6", "q2_9", "q2_11"])
    # Each slice's context, written out by hand for k = 1 (k = 2 extends the same rule).
    by_hand = {1: {"p1_f103": ["p1_f103"] * 3, "p1_f104": ["p1_f104"] * 3, "p1_m102": ["p1_m102"] * 3,
                   "q2_4": ["q2_4", "q2_4", "q2_5"], "q2_5": ["q2_4", "q2_5", "q2_6"],
                   "q2_6": ["q2_5", "q2_6", "q2_6"], "q2_9": ["q2_9"] * 3, "q2_11": ["q2_11"] * 3},
               2: {"p1_f103": ["p1_f103"] * 5, "p1_f104": ["p1_f104"] * 5, "p1_m102": ["p1_m102"] * 5,
                   "q2_4": ["q2_4", "q2_4", "q2_4", "q2_5", "q2_6"], "q2_5": ["q2_4", "q2_4", "q2_5", "q2_6", "q2_6"],
                   "q2_6": ["q2_4", "q2_5", "q2_6", "q2_6", "q2_6"], "q2_9": ["q2_9"] * 5, "q2_11": ["q2_11"] * 5}}[k]
    cases = dataset.find_cases(root)
    prepared = prepare(root, tmp_path / "cache", image_size=8)
    ds = dataset.LiTSSliceDataset(prepared, "segmentation", context_slices=k)
    seen = {}
    for i, (ci, z) in enumerate(ds.index):
        stem = cases[ci].images[z].stem
        image, _ = ds[i]
        seen[stem] = (image.mean(dim=(1, 2)).numpy() * 255).round().tolist()
    assert seen == {stem: [grey[s] for s in context] for stem, context in by_hand.items()}


# ------------------------------------------------------------------------------------------------
# the prepared cache
# ------------------------------------------------------------------------------------------------

def _stamps(folder: Path) -> dict:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.iterdir()}


def test_second_prepare_rewrites_nothing(lits_dir, cache_dir, monkeypatch):
    first = prepare(lits_dir, cache_dir)
    folder = dataset.cache_folder(cache_dir, lits_dir, 32, volumes.WINDOW_HU)
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
    new_vol, new_seg = phantom.write_phantom_case(tmp_path / "other", 2, size=48, seed=99)
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
    a = dataset.cache_folder(cache_dir, lits_dir, 32, volumes.WINDOW_HU)
    assert dataset.cache_folder(cache_dir, lits_dir, 32, (-200, 250)) == a
    b = dataset.cache_folder(cache_dir, lits_dir, 40, volumes.WINDOW_HU)
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
        folder = dataset.cache_folder(tmp_path / cache, lits_dir, 32, volumes.WINDOW_HU)
        expected = {"params.json"} | {f"volume-{i}{ext}" for i in range(4)
                                      for ext in (".json", ".image.npy", ".label.npy")}
        assert {p.name for p in folder.iterdir()} == expected  # no temporary or hidden files
    for s, p in zip(serial, parallel):
        np.testing.assert_array_equal(np.load(s.image_path), np.load(p.image_path))
        np.testing.assert_array_equal(np.load(s.label_path), np.load(p.label_path))


def slices_by_hand(path) -> np.ndarray:
    """A phantom's voxels (axis-aligned affine, axes flipped as it says) as slices (Z, H, W) in
    (S, P, L) order, from nibabel and the affine's signs alone: slices run inferior -> superior (+z),
    rows anterior -> posterior (-y in RAS), columns patient right -> left (-x in RAS)."""
    img = nib.load(str(path))
    a = np.asarray(img.dataobj).transpose(2, 1, 0)  # (x, y, z) -> (z, y, x)
    flips = [ax for ax, flip in ((0, img.affine[2, 2] < 0), (1, img.affine[1, 1] > 0), (2, img.affine[0, 0] > 0))
             if flip]
    return np.flip(a, flips) if flips else a


def test_cached_arrays_equal_independent_computation(prepared, lits_dir):
    # The cache against nibabel, the window written out ((HU - low) / (high - low), clipped to [0, 1])
    # and PIL's resizing (torch's antialiased bilinear and nearest-exact are PIL's BILINEAR and NEAREST).
    low, high = volumes.WINDOW_HU
    for case, prep in zip(dataset.find_cases(lits_dir), prepared):
        hu = slices_by_hand(case.images[0]).astype(np.float32)
        windowed = np.clip((hu - low) / (high - low), 0.0, 1.0).astype(np.float32)
        expected = np.stack([np.asarray(Image.fromarray(s, mode="F").resize((32, 32), Image.BILINEAR))
                             for s in windowed])
        image = np.load(prep.image_path)
        assert image.dtype == np.float16 and image.shape == (prep.num_slices, 32, 32)
        np.testing.assert_allclose(image.astype(np.float32), expected, atol=1e-3, rtol=0)
        label = np.load(prep.label_path)
        lab = np.ascontiguousarray(slices_by_hand(case.labels[0]).astype(np.uint8))
        assert label.dtype == np.uint8
        np.testing.assert_array_equal(label, np.stack([np.asarray(Image.fromarray(s).resize((32, 32), Image.NEAREST))
                                                       for s in lab]))
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
        image, target, label = ds[i]
        assert image.shape == (2 * k + 1, 32, 32) and image.dtype == torch.float32
        assert 0.0 <= image.min() and image.max() <= 1.0
        assert target.shape == () and target.dtype == torch.int64
        # The label map (deep supervision) is the cached one of the same slice.
        ci, z = ds.index[i]
        assert torch.equal(label, torch.from_numpy(np.load(prepared[ci].label_path)[z]))
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


@pytest.mark.parametrize("hflip, vflip", [(True, False), (False, True), (True, True)])
def test_augment_batch_flips_exactly(hflip, vflip):
    torch.manual_seed(2)
    images, masks = _random_batch(3)
    images = images.repeat(4, 1, 1, 1)  # 16 slices: both outcomes of each coin show up
    masks = masks.repeat(4, 1, 1)
    out, m = dataset.augment_batch(images, masks, max_rotation=0, scale=(1, 1), contrast=0, brightness=0,
                                   noise=0, hflip=hflip, vflip=vflip)
    seen = set()
    for i in range(16):
        for fx in (False, True) if hflip else (False,):
            for fy in (False, True) if vflip else (False,):
                dims = [d for d, f in ((-1, fx), (-2, fy)) if f]
                want_img = images[i].flip(dims) if dims else images[i]
                want_mask = masks[i].flip(dims) if dims else masks[i]
                if torch.allclose(out[i], want_img, atol=1e-5) and torch.equal(m[i], want_mask):
                    seen.add((fx, fy))
                    break
            else:
                continue
            break
        else:
            raise AssertionError(f"slice {i} is neither itself nor a mirror of itself")
    assert len(seen) == (2 if hflip else 1) * (2 if vflip else 1), seen


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
    phantom.write_synthetic_lits(data, cases=6, size=48, seed=0)
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
    images, target, labels = next(iter(dm2.train_dataloader()))
    assert images.shape == (4, 3, 32, 32) and target.shape == (4,) and target.dtype == torch.int64
    assert labels.shape == (4, 32, 32) and labels.dtype == torch.uint8
    *_, case = next(iter(dm2.val_dataloader()))  # val and test items name their case (per-volume metrics)
    assert case.shape == (4,) and set(case.tolist()) <= set(range(len(dm2.datasets["val"].cases)))
    for ds in dm2.datasets.values():  # classification defaults to liver slices only
        assert all(ds.cases[ci].liver_pixels[z] > 0 for ci, z in ds.index)


# ------------------------------------------------------------------------------------------------
# errors: one line, naming the file
# ------------------------------------------------------------------------------------------------

def test_shape_mismatch_is_a_data_error(tmp_path):
    data = tmp_path / "data"
    phantom.write_phantom_case(data, 0, size=48, seed=0)
    _, other_seg = phantom.write_phantom_case(tmp_path / "other", 0, size=56, seed=0)
    shutil.copyfile(other_seg, data / "segmentation-0.nii")
    with pytest.raises(DataError) as exc:
        prepare(data, tmp_path / "cache")
    msg = assert_one_line_naming(exc, "segmentation-0.nii", "volume-0.nii")
    assert str(nib.load(str(other_seg)).shape) in msg and str(nib.load(str(data / "volume-0.nii")).shape) in msg


@pytest.mark.parametrize("value, dtype, shown", [(3, np.uint8, "3"), (0.5, np.float32, "0.5"), (-1, np.int16, "-1")])
def test_labels_outside_0_1_2_are_a_data_error(tmp_path, value, dtype, shown):
    data = tmp_path / "data"
    _, seg = phantom.write_phantom_case(data, 0, size=48, seed=0)
    img = nib.load(str(seg))
    labels = np.asanyarray(img.dataobj).astype(dtype)
    labels[10, 10, 3] = value
    save_nifti(seg, labels, img.affine)
    with pytest.raises(DataError) as exc:
        prepare(data, tmp_path / "cache")
    msg = assert_one_line_naming(exc, "segmentation-0.nii")
    assert shown in msg.split("{")[1].split("}")[0]
    assert not list((tmp_path / "cache").rglob("volume-0*"))


def test_unpaired_files_are_a_data_error(lits_dir):
    (lits_dir / "segmentation-1.nii").unlink()
    with pytest.raises(DataError) as exc:
        dataset.find_cases(lits_dir)
    assert_one_line_naming(exc, "volume-1.nii", "segmentation-1.nii")
    _, seg1 = phantom.write_phantom_case(lits_dir.parent / "x", 1, size=48)
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
    phantom.write_phantom_case(data, 0, size=48, seed=0)
    bad = data / "volume-0.nii"
    bad.write_bytes(np.random.default_rng(0).bytes(5000))
    with pytest.raises(DataError) as exc:
        volumes.load_volume(bad)
    assert_one_line_naming(exc, str(bad))
    with pytest.raises(DataError) as exc:
        prepare(data, tmp_path / "cache")
    assert_one_line_naming(exc, "volume-0.nii")


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
        phantom.write_phantom_case(data, 0, size=48, seed=0)
        phantom.write_phantom_case(data, 1, size=48, seed=0)  # a good case beside the bad one
        if problem == "shape":
            _, other = phantom.write_phantom_case(tmp_path / "other", 0, size=56, seed=0)
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
    folder = dataset.cache_folder(tmp_path / "cache", tmp_path / "synth", 32, volumes.WINDOW_HU)
    for cid in ("volume-0", "volume-1"):
        assert np.load(folder / f"{cid}.image.npy").shape[1:] == (32, 32)
        assert json.loads((folder / f"{cid}.json").read_text())["case_id"] == cid
    assert "prepared 2 case(s)" in proc.stderr


@pytest.mark.parametrize("argv, named", [
    (["prepare", "--window", "250", "-200"], "argument --window: found 250 -200; expected LOW < HIGH"),
    (["prepare", "--workers", "0"], "argument --workers: found 0; expected 1 or more"),
    (["prepare", "--image-size", "8"], "argument --image-size: found 8; expected 32 or more"),
    (["synth", "--cases", "0"], "argument --cases: found 0; expected 1 or more"),
    (["synth", "--size", "16"], "argument --size: found 16; expected 32 or more"),
    (["synth", "--out-dir", "{a_file}/synth"], "--out-dir lies under the file"),
    (["prepare", "--cache-dir", "{a_file}/cache"], "--cache-dir lies under the file"),
])
def test_cli_bad_flags_one_line_exit_2_nothing_written(lits_dir, tmp_path, capsys, argv, named):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    where = ["--data-dir", str(lits_dir), "--cache-dir", str(tmp_path / "cache")] if argv[0] == "prepare" else \
        ["--out-dir", str(tmp_path / "synth")]
    argv = [a.format(a_file=a_file) for a in argv]  # a flag given twice: the last one counts
    assert volumes.run_cli(dataset.main, dataset.get_args_parser(), [*argv[:1], *where, *argv[1:]]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("error: ") and named in err and "expected" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "lits"]


@pytest.mark.parametrize("compress", [False, True])
def test_synth_is_deterministic_per_seed(tmp_path, compress):
    parser = dataset.get_args_parser()
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        argv = ["synth", "--out-dir", str(tmp_path / name), "--cases", "2", "--size", "48", "--seed", str(seed)]
        assert volumes.run_cli(dataset.main, parser, argv + (["--compress"] if compress else [])) == 0
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert len(files) == 4 and files == sorted(p.name for p in (tmp_path / "c").iterdir())
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
        assert (tmp_path / "a" / f).read_bytes() != (tmp_path / "c" / f).read_bytes()


# ------------------------------------------------------------------------------------------------
# anatomy that looks mirrored after reorientation
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("wrong, expected", [(None, []), ("identity", ["spine"]), ("mirrored", ["left"])])
def test_anatomy_warnings_name_what_looks_mirrored(tmp_path, wrong, expected):
    vol, seg = phantom.write_phantom_case(tmp_path, 0, size=64, seed=5, num_slices=16, wrong_affine=wrong)
    hu, _ = volumes.load_volume(vol)
    labels, _ = volumes.load_label_volume(seg)
    found = dataset.anatomy_warnings(hu, labels)
    assert len(found) == len(expected) and all(w in f for w, f in zip(expected, found)), found


def test_anatomy_warnings_hand_built_slices():
    hu = np.full((2, 20, 20), -1000.0)
    hu[:, 2:18, 2:18] = 40.0  # body: rows and columns 2..17, centre 9.5
    labels = np.zeros((2, 20, 20), np.uint8)
    labels[:, 5:10, 3:8] = 1  # liver in columns 3..7: the patient's right (image left)
    hu[:, 14:17, 8:12] = 700.0  # spine in rows 14..16: posterior (lower half)
    assert dataset.anatomy_warnings(hu, labels) == []
    both = dataset.anatomy_warnings(hu[:, ::-1, ::-1], labels[:, ::-1, ::-1])  # turned 180 degrees
    assert len(both) == 2 and "left" in both[0] and "spine" in both[1]
    assert dataset.anatomy_warnings(hu, np.zeros_like(labels)) == []  # no liver: nothing to judge


def test_prepare_warns_once_per_suspect_file(tmp_path, capsys):
    data = tmp_path / "data"
    phantom.write_phantom_case(data, 0, size=48, seed=1, num_slices=12)
    phantom.write_phantom_case(data, 1, size=48, seed=1, num_slices=12, wrong_affine="identity")
    prepare(data, tmp_path / "cache")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "volume-1.nii" in err[0] and "affine" in err[0]
    prepare(data, tmp_path / "cache")  # from the cache: still reported
    assert "volume-1.nii" in capsys.readouterr().err


def test_datamodule_passes_its_rotation_and_scale_to_the_augmentation(tmp_path):
    """rotation 0 and zoom 0.5 (no flips): an 8x8 mask of ones shrinks to the central 4x4, the
    rest is outside the input (background); image and mask move together."""
    dm = dataset.LiTSDataModule(tmp_path, "segmentation", rotation=0.0, scale=(0.5, 0.5), flip=False)
    dm.trainer = types.SimpleNamespace(training=True)
    images, masks = dm.on_after_batch_transfer((torch.ones(2, 1, 8, 8), torch.ones(2, 8, 8, dtype=torch.int64)), 0)
    expected = torch.zeros(2, 8, 8, dtype=torch.int64)
    expected[:, 2:6, 2:6] = 1
    assert torch.equal(masks, expected)
    assert (images[:, 0][expected == 0] < 0.5).all() and (images[:, 0][expected == 1] > 0.5).all()


def _paste_pair():
    """Slice 0: liver only (value 0.5) in rows and columns 10-14 of a 24x24 slice; slice 1: liver
    (0.6) in rows and columns 0-9 holding a 3x3 tumour (0.3) at rows and columns 2-4. Two channels
    (a context slice each side would be three; the rule is the same)."""
    images = torch.zeros(2, 2, 24, 24)
    labels = torch.zeros(2, 24, 24, dtype=torch.int64)
    images[0, :, 10:15, 10:15], labels[0, 10:15, 10:15] = 0.5, 1
    images[1, :, 0:10, 0:10], labels[1, 0:10, 0:10] = 0.6, 1
    images[1, :, 2:5, 2:5], labels[1, 2:5, 2:5] = 0.3, 2
    return images, labels


@pytest.mark.parametrize("seed", range(6))
def test_paste_tumors_moves_a_lesion_into_another_liver_with_its_contrast(seed):
    torch.manual_seed(seed)
    images, labels = _paste_pair()
    out, lab, pasted = dataset.paste_tumors(images, labels, 1.0)
    assert pasted.tolist() == [True, False]  # slice 1's only donor would be itself
    assert torch.equal(out[1], images[1]) and torch.equal(lab[1], labels[1])
    tumour = lab[0] == 2
    # The 3x3 lesion centred on a liver pixel, cut to the 5x5 liver: 4 to 9 pixels, one block.
    ys, xs = torch.nonzero(tumour, as_tuple=True)
    assert 4 <= int(tumour.sum()) <= 9
    assert int(tumour.sum()) == (int(ys.max() - ys.min()) + 1) * (int(xs.max() - xs.min()) + 1)
    assert (labels[0][tumour] == 1).all()  # inside the recipient's liver only
    # Contrast kept: 0.3 against a 0.6 liver becomes 0.2 against a 0.5 liver, in every channel.
    torch.testing.assert_close(out[0][:, tumour], torch.full((2, int(tumour.sum())), 0.2))
    assert torch.equal(out[0][:, ~tumour], images[0][:, ~tumour])
    assert torch.equal(lab[0][~tumour], labels[0][~tumour])
    assert images[0].max() == 0.5 and (labels[0] != 2).all()  # the inputs are not modified


def test_paste_tumors_leaves_what_it_cannot_paste():
    images, labels = _paste_pair()
    out, lab, pasted = dataset.paste_tumors(images, labels, 0.0)
    assert not pasted.any() and torch.equal(out, images) and torch.equal(lab, labels)
    no_liver = labels.clone()
    no_liver[0] = 0  # slice 0 has no liver to receive a lesion
    out, lab, pasted = dataset.paste_tumors(images, no_liver, 1.0)
    assert not pasted.any() and torch.equal(out, images) and torch.equal(lab, no_liver)
    torch.manual_seed(3)
    first = dataset.paste_tumors(images, labels, 1.0)
    torch.manual_seed(3)
    again = dataset.paste_tumors(images, labels, 1.0)
    assert all(torch.equal(a, b) for a, b in zip(first, again))  # seeded: repeats


def test_datamodule_pastes_before_augmenting_and_relabels_the_slice(tmp_path):
    """Classification: a healthy slice that received a lesion becomes a tumour slice (target 1),
    and its label map (the dense supervision) shows the pasted tumour."""
    torch.manual_seed(0)
    dm = dataset.LiTSDataModule(tmp_path, "classification", rotation=0.0, scale=(1.0, 1.0), flip=False,
                                paste_tumor=1.0)
    dm.trainer = types.SimpleNamespace(training=True)
    images, labels = _paste_pair()
    target = torch.tensor([0, 1])
    out, y, lab = dm.on_after_batch_transfer((images, target, labels), 0)
    assert y.tolist() == [1, 1]
    assert 4 <= int((lab[0] == 2).sum()) <= 9 and torch.equal(lab[1], labels[1])
    dm.paste_tumor = 0.0
    assert dm.on_after_batch_transfer((images, target, labels), 0)[1].tolist() == [0, 1]


# vary_appearance: each transform alone (the others set to leave the slice as it is), against values
# worked out by hand on a slice of three flat regions.
NEUTRAL = {"LESION_CONTRAST": (1.0, 1.0), "HYPERDENSE": 0.0, "LIVER_SHIFT": 0.0, "GAMMA": (1.0, 1.0), "GAIN": (1.0, 1.0),
           "BLUR_SIGMA": (1e-3, 1e-3), "LOW_RES": (1.0, 1.0), "NOISE_SIGMA": (0.0, 0.0)}


def _flat_slices(n=64):
    """Background 0.1; a liver (label 1, 0.6) over rows/columns 4-19; a tumour (label 2, 0.4) at 9-13."""
    images = torch.full((n, 3, 24, 24), 0.1)
    labels = torch.zeros(n, 24, 24, dtype=torch.int64)
    images[:, :, 4:20, 4:20], labels[:, 4:20, 4:20] = 0.6, 1
    images[:, :, 9:14, 9:14], labels[:, 9:14, 9:14] = 0.4, 2
    return images, labels


def _only(monkeypatch, **changed):
    for name, value in {**NEUTRAL, **changed}.items():
        monkeypatch.setattr(dataset, name, value)


def test_vary_appearance_with_neutral_ranges_or_no_probability_leaves_slices_alone(monkeypatch):
    images, labels = _flat_slices()
    assert torch.equal(dataset.vary_appearance(images, labels, 0.0), images)
    _only(monkeypatch)
    torch.manual_seed(0)
    torch.testing.assert_close(dataset.vary_appearance(images, labels, 1.0), images)


def test_vary_appearance_turns_a_lesion_hyperdense_or_darker_and_nothing_else(monkeypatch):
    _only(monkeypatch, LESION_CONTRAST=(0.5, 0.5), HYPERDENSE=0.5)
    images, labels = _flat_slices()
    torch.manual_seed(0)
    out = dataset.vary_appearance(images, labels, 1.0)
    tumour = (labels == 2)[:, None].expand_as(images)
    torch.testing.assert_close(out[~tumour], images[~tumour])
    # 0.4 against a 0.6 liver, its difference halved: 0.5, or flipped: 0.7 (hyperdense); every channel alike.
    values = out[tumour].view(64, -1)
    assert torch.allclose(values, values[:, :1])
    seen = {round(float(v), 4) for v in values[:, 0]}
    assert seen == {0.5, 0.7}


def test_vary_appearance_shifts_liver_and_tumour_together_softly_at_the_edge(monkeypatch):
    _only(monkeypatch, LIVER_SHIFT=0.15)
    images, labels = _flat_slices()
    torch.manual_seed(1)
    out = dataset.vary_appearance(images, labels, 1.0)
    shift = out[:, 1, 11, 11] - 0.4  # the tumour's centre
    assert (shift.abs() <= 0.15 + 1e-6).all() and shift.std() > 0.03
    torch.testing.assert_close(out[:, :, 6:18, 6:18] - images[:, :, 6:18, 6:18],
                               shift.view(64, 1, 1, 1).expand(64, 3, 12, 12))  # 2 pixels inside: whole shift
    torch.testing.assert_close(out[:, :, 0:2, :], images[:, :, 0:2, :])  # over 2 pixels outside: none
    # On the edge the 5x5 box covers 3 of 5 rows inside the liver (the liver's last row and the two above).
    torch.testing.assert_close(out[:, 1, 19, 11] - 0.6, shift * 3 / 5)


def test_vary_appearance_gamma_contrast_and_noise_stay_in_their_ranges(monkeypatch):
    images, labels = torch.full((64, 1, 16, 16), 0.25), torch.zeros(64, 16, 16, dtype=torch.int64)
    _only(monkeypatch, GAMMA=(0.7, 1.5))
    torch.manual_seed(2)
    out = dataset.vary_appearance(images, labels, 1.0)[:, 0, 0, 0]
    assert (out >= 0.25 ** 1.5 - 1e-6).all() and (out <= 0.25 ** 0.7 + 1e-6).all() and out.std() > 0.02
    _only(monkeypatch, NOISE_SIGMA=(0.0, 0.05))
    out = dataset.vary_appearance(images, labels, 1.0)
    sd = (out - 0.25).flatten(1).std(1)
    assert sd.max() <= 0.06 and sd.max() > 0.03  # 256 draws a slice: within 20 % of its sigma
    ramp, none = torch.linspace(0, 1, 16).repeat(64, 1, 16, 1), torch.zeros(64, 16, 16, dtype=torch.int64)
    _only(monkeypatch, GAIN=(0.75, 1.25))
    out = dataset.vary_appearance(ramp, none, 1.0)
    gain = (out[:, 0, 0, 10] - out[:, 0, 0, 5]) / (ramp[0, 0, 0, 10] - ramp[0, 0, 0, 5])
    assert (gain >= 0.75 - 1e-4).all() and (gain <= 1.25 + 1e-4).all()
    torch.testing.assert_close(out.mean(dim=(1, 2, 3)), ramp.mean(dim=(1, 2, 3)))  # about the slice's mean


def test_vary_appearance_blurs_and_coarsens_about_half_the_slices_it_may(monkeypatch):
    images, labels = _flat_slices(200)
    for name, value in (("BLUR_SIGMA", (1.0, 1.0)), ("LOW_RES", (2.0, 2.0))):
        _only(monkeypatch, **{name: value})
        torch.manual_seed(3)
        out = dataset.vary_appearance(images, labels, 1.0)
        changed = (out - images).abs().flatten(1).amax(1) > 1e-3
        assert 70 <= int(changed.sum()) <= 130  # half of 200 (probability times one half)
        torch.testing.assert_close(out[~changed], images[~changed])
        # Averaging: no value leaves the range the slice had.
        assert out.min() >= 0.1 - 1e-6 and out.max() <= 0.6 + 1e-6


# crop_patches: windows placed by hand-computed rules on slices whose every pixel tells where it came from.
def _numbered_slices(n=3, size=40):
    """Pixel (y, x) of slice i holds 10000 i + 100 y + x in each of 2 channels; labels all background."""
    yx = torch.arange(size)[:, None] * 100 + torch.arange(size)[None, :]
    images = (torch.arange(n)[:, None, None] * 10000 + yx).float()[:, None].repeat(1, 2, 1, 1)
    return images, torch.zeros(n, size, size, dtype=torch.int64)


def _window_origin(patch: torch.Tensor) -> tuple[int, int, int]:
    """(slice, top, left) of a numbered slice's window, read off its first pixel."""
    v = int(patch[0, 0, 0])
    return v // 10000, v % 10000 // 100, v % 100


def test_crop_patches_centres_a_foreground_window_on_tumour_first_and_keeps_it_on_the_slice():
    images, labels = _numbered_slices()
    labels[0, 5:30, 5:30] = 1
    labels[0, 25, 20] = 2          # slice 0: tumour wins over liver -> window rows 17-32, columns 12-27
    labels[1, 2, 38] = 1           # slice 1: liver only, in a corner -> window pushed back onto the slice
    torch.manual_seed(0)
    out, lab = dataset.crop_patches(images, labels, 16, foreground=1.0)
    assert out.shape == (3, 2, 16, 16) and lab.shape == (3, 16, 16)
    assert _window_origin(out[0]) == (0, 17, 12) and lab[0, 8, 8] == 2
    assert _window_origin(out[1]) == (1, 0, 24) and lab[1, 2, 14] == 1
    assert torch.equal(out[0, 1], images[0, 1, 17:33, 12:28])           # every channel, untouched
    assert torch.equal(lab[0], labels[0, 17:33, 12:28])
    s, top, left = _window_origin(out[2])                                # slice 2 holds no foreground
    assert s == 2 and 0 <= top <= 24 and 0 <= left <= 24


def test_crop_patches_places_windows_anywhere_without_foreground_share():
    images, labels = _numbered_slices(n=200)
    labels[:, 0:4, 0:4] = 2  # forced windows would all start at (0, 0)
    torch.manual_seed(1)
    out, lab = dataset.crop_patches(images, labels, 16, foreground=0.0)
    origins = [_window_origin(p) for p in out]
    assert [o[0] for o in origins] == list(range(200))
    tops, lefts = {o[1] for o in origins}, {o[2] for o in origins}
    assert tops <= set(range(25)) and lefts <= set(range(25)) and len(tops) > 20 and len(lefts) > 20
    for (i, top, left), patch, patch_labels in zip(origins, out, lab):
        assert torch.equal(patch, images[i, :, top:top + 16, left:left + 16])
        assert torch.equal(patch_labels, labels[i, top:top + 16, left:left + 16])


def test_crop_patches_leaves_whole_slices_and_refuses_a_larger_window():
    images, labels = _numbered_slices(n=2, size=24)
    out, lab = dataset.crop_patches(images, labels, 24, foreground=0.5)
    assert out is images and lab is labels
    with pytest.raises(ValueError, match="at most"):
        dataset.crop_patches(images[..., :20], labels[..., :20], 24, foreground=0.5)


def test_datamodule_trains_on_patches_and_validates_on_whole_slices(tmp_path):
    dm = dataset.LiTSDataModule(tmp_path, "segmentation", rotation=0.0, scale=(1.0, 1.0), flip=False, patch_size=16,
                                foreground=1.0)
    images, labels = _numbered_slices(n=2)
    labels[:, 10, 10] = 2
    dm.trainer = types.SimpleNamespace(training=True)
    out, lab = dm.on_after_batch_transfer((images, labels), 0)
    assert out.shape == (2, 2, 16, 16) and (lab[:, 8, 8] == 2).all()
    dm.trainer = types.SimpleNamespace(training=False)
    out, lab = dm.on_after_batch_transfer((images, labels), 0)
    assert out is images and lab is labels


def test_a_classification_window_is_a_tumour_slice_only_when_it_holds_enough_tumour():
    """Slices 0 and 1 hold one tumour pixel each, slice 2 (labelled healthy) a line of 3; every window is
    centred on its slice's tumour, so it holds all of it: the label is the window's count against the rule."""
    images, labels = _numbered_slices(n=3)
    labels[0, 0, 0] = labels[1, 39, 39] = 2
    labels[2, 18:21, 20] = 2
    target = torch.tensor([1, 1, 0])
    for min_pixels, expected in ((1, [1, 1, 1]), (3, [0, 0, 1]), (4, [0, 0, 0])):
        out, y, lab = dataset.augment_training_batch((images / 1e6, target, labels), "classification", rotation=0.0,
                                                     scale=(1.0, 1.0), patch_size=16, foreground=1.0,
                                                     min_tumor_pixels=min_pixels)
        assert out.shape == (3, 2, 16, 16) and lab.shape == (3, 16, 16)
        assert y.tolist() == expected and [int((w == 2).sum()) for w in lab] == [1, 1, 3]
