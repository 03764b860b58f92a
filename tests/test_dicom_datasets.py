"""Tests for dicom_datasets.py: 3D-IRCADb patient folders and CT series + DICOM SEG as training and scoring
data, each written by phantom.py from a NIfTI twin and checked against that twin voxel for voxel.

    python -m pytest tests/test_dicom_datasets.py -q
"""
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch

import dataset
import dicom_datasets
import evaluate
import phantom
import train
import volumes
from tests.dicom_helpers import canonical_slices
from tests.helpers import assert_one_line_naming

SIZE, SLICES = 48, 8


def twin(root: Path, index: int, tumors: int = 2) -> tuple[Path, Path]:
    """A phantom as LiTS NIfTI files: the reference the DICOM layouts are checked against."""
    return phantom.write_phantom_case(root, index, size=SIZE, seed=5, num_slices=SLICES, num_tumors=tumors)


def twin_labels(seg: Path) -> np.ndarray:
    """The twin's labels as canonical slices (S, P, L), by nibabel alone (not volumes.py)."""
    img = nib.load(str(seg))
    return canonical_slices(np.asanyarray(img.dataobj).astype(np.uint8), img.affine)[0]


def cached(prepared, case_id: str) -> tuple[np.ndarray, np.ndarray]:
    case = next(c for c in prepared if c.case_id == case_id)
    return np.load(case.image_path), np.load(case.label_path)


def run(argv, capsys, main=dataset.main, parser=None) -> tuple[int, str]:
    rc = volumes.run_cli(main, parser or dataset.get_args_parser(), [str(a) for a in argv])
    return rc, capsys.readouterr().err


@pytest.fixture(scope="module")
def nifti(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("nifti")
    for i in (1, 2):
        twin(root, i)
    return root


def test_ircadb_folders_and_zips_give_the_twins_labels_and_cache(nifti, tmp_path):
    root = tmp_path / "3Dircadb1"
    phantom.write_phantom_ircadb(root / "3Dircadb1.1", nifti / "volume-1.nii", nifti / "segmentation-1.nii", seed=1)
    phantom.write_phantom_ircadb(root / "zipped" / "3Dircadb1.2", nifti / "volume-2.nii", nifti / "segmentation-2.nii",
                                 seed=2, zipped=True)
    assert (root / "zipped" / "3Dircadb1.2" / "MASKS_DICOM.zip").is_file()
    cases = dataset.find_cases(root)
    assert [(c.case_id, c.layout) for c in cases] == [("3Dircadb1.1", "ircadb"), ("3Dircadb1.2", "ircadb")]
    for case, i in zip(cases, (1, 2)):
        hu, labels, geom = dicom_datasets.load_dicom_case(case)
        expected = twin_labels(nifti / f"segmentation-{i}.nii")
        assert labels.shape == expected.shape and np.array_equal(labels, expected)  # tumour folder not counted
        assert (labels == 2).any()
        img = nib.load(str(nifti / f"volume-{i}.nii"))
        np.testing.assert_array_equal(hu, canonical_slices(np.asanyarray(img.dataobj).astype(np.float32), img.affine)[0])
    # The cache holds what the twin's cache holds, voxel for voxel.
    mine, _ = dataset.prepare_datasets([root], tmp_path / "cache", image_size=32, workers=1, progress=False)
    ref, _ = dataset.prepare_datasets([nifti], tmp_path / "cache", image_size=32, workers=1, progress=False)
    for i in (1, 2):
        image, labels = cached(mine, f"3Dircadb1.{i}")
        ref_image, ref_labels = cached(ref, f"volume-{i}")
        np.testing.assert_array_equal(labels, ref_labels)
        np.testing.assert_array_equal(image, ref_image)
    # A second run finds its entries fresh (the fingerprint, options included, survives its JSON file).
    stamps = {c.case_id: c.label_path.stat().st_mtime_ns for c in mine}
    again, _ = dataset.prepare_datasets([root], tmp_path / "cache", image_size=32, workers=1, progress=False)
    assert {c.case_id: c.label_path.stat().st_mtime_ns for c in again} == stamps
    named, _ = dataset.prepare_datasets([root], tmp_path / "cache", image_size=32, workers=1, progress=False,
                                        dicom_options=dicom_datasets.DicomOptions(ircadb_tumor=("tumor",)))
    assert all(c.label_path.stat().st_mtime_ns != stamps[c.case_id] for c in named)


def test_ircadb_named_structure_counts_as_tumour(nifti, tmp_path):
    root = tmp_path / "ircadb"
    phantom.write_phantom_ircadb(root / "3Dircadb1.1", nifti / "volume-1.nii", nifti / "segmentation-1.nii", seed=1)
    plain = dataset.find_cases(root)[0]
    named = dataset.find_cases(root, dicom_datasets.DicomOptions(ircadb_tumor=("tumor",)))[0]
    _, before, _ = dicom_datasets.load_dicom_case(plain)
    _, after, _ = dicom_datasets.load_dicom_case(named)
    # phantom.py draws the "tumor" structure as a block of body outside the liver: only there labels change.
    changed = before != after
    assert changed.any() and (before[changed] == 0).all() and (after[changed] == 2).all()
    assert dataset._fingerprint(plain) != dataset._fingerprint(named)  # the cache reads the labels again


def test_seg_study_gives_the_twins_labels_and_ignores_other_series(nifti, tmp_path):
    root = tmp_path / "tcia"
    written = phantom.write_phantom_seg_study(root / "HCC_001" / "study", nifti / "volume-1.nii",
                                              nifti / "segmentation-1.nii", seed=1)
    cases = dataset.find_cases(root)
    assert [(c.case_id, c.layout) for c in cases] == [("HCC_001", "dicomseg")]
    assert set(cases[0].images) == set(written["ct"])  # the late phase the SEG does not reference is not read
    hu, labels, geom = dicom_datasets.load_dicom_case(cases[0])
    assert np.array_equal(labels, twin_labels(nifti / "segmentation-1.nii"))
    mine, _ = dataset.prepare_datasets([root], tmp_path / "cache", image_size=32, workers=1, progress=False)
    ref, _ = dataset.prepare_datasets([nifti], tmp_path / "cache", image_size=32, workers=1, progress=False)
    np.testing.assert_array_equal(cached(mine, "HCC_001")[1], cached(ref, "volume-1")[1])
    np.testing.assert_array_equal(cached(mine, "HCC_001")[0], cached(ref, "volume-1")[0])


def test_seg_written_by_prediction_reads_back(nifti, tmp_path):
    """The SEG predict_segmentation.py writes ("Liver", "Liver tumor") is training data as it is."""
    series_dir = tmp_path / "study" / "CT"
    img = nib.load(str(nifti / "volume-2.nii"))
    phantom.write_phantom_dicom(series_dir, np.asanyarray(img.dataobj), img.affine, seed=2)
    hu, geom = volumes.read_volume(series_dir)
    labels = twin_labels(nifti / "segmentation-2.nii")
    volumes.write_labels(labels, geom, tmp_path / "study" / "seg.dcm")
    case = dataset.find_cases(tmp_path / "study")[0]
    assert np.array_equal(dicom_datasets.load_dicom_case(case)[1], labels)


def test_seg_segments_named_by_flags(nifti, tmp_path):
    vol, seg = nifti / "volume-1.nii", nifti / "segmentation-1.nii"
    ct = phantom.write_phantom_dicom(tmp_path / "s" / "CT", np.asanyarray(nib.load(str(vol)).dataobj),
                                     nib.load(str(vol)).affine, seed=1)
    labels = np.asanyarray(nib.load(str(seg)).dataobj)
    phantom.write_phantom_seg(tmp_path / "s" / "seg.dcm", ct, {"Organ A": labels >= 1, "Spot": labels == 2})
    with pytest.raises(volumes.DataError, match="Organ A"):
        dicom_datasets.load_dicom_case(dataset.find_cases(tmp_path / "s")[0])
    options = dicom_datasets.DicomOptions(seg_liver=("organ a",), seg_tumor=("SPOT",))
    _, got, _ = dicom_datasets.load_dicom_case(dataset.find_cases(tmp_path / "s", options)[0])
    assert np.array_equal(got, twin_labels(seg))


def _seg_on_ct(nifti: Path, folder: Path) -> tuple[Path, np.ndarray]:
    """A CT series of phantom 1 and a SEG of it ("Liver", "Tumor"), edited by the tests with pydicom."""
    img = nib.load(str(nifti / "volume-1.nii"))
    ct = phantom.write_phantom_dicom(folder / "CT", np.asanyarray(img.dataobj), img.affine, seed=1)
    labels = np.asanyarray(nib.load(str(nifti / "segmentation-1.nii")).dataobj)
    return phantom.write_phantom_seg(folder / "seg.dcm", ct, {"Liver": labels >= 1, "Tumor": labels == 2}), labels


def test_seg_frames_without_references_are_placed_by_position(nifti, tmp_path):
    path, _ = _seg_on_ct(nifti, tmp_path / "s")
    ds = pydicom.dcmread(path)
    for item in ds.PerFrameFunctionalGroupsSequence:
        del item.DerivationImageSequence  # frames that say where they lie, not which slice they came from
    ds.save_as(path)
    _, got, _ = dicom_datasets.load_dicom_case(dataset.find_cases(tmp_path / "s")[0])
    assert np.array_equal(got, twin_labels(nifti / "segmentation-1.nii"))


@pytest.mark.parametrize("by", ["reference", "position"])
def test_seg_frames_matching_no_ct_slice_are_one_error(nifti, tmp_path, by):
    path, _ = _seg_on_ct(nifti, tmp_path / "s")
    ds = pydicom.dcmread(path)
    item = ds.PerFrameFunctionalGroupsSequence[0]
    if by == "reference":
        item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID = "1.2.3.4.5"
    else:
        for frame in ds.PerFrameFunctionalGroupsSequence:
            del frame.DerivationImageSequence
        position = item.PlanePositionSequence[0].ImagePositionPatient
        item.PlanePositionSequence[0].ImagePositionPatient = [position[0], position[1], float(position[2]) + 0.4]
    ds.save_as(path)
    with pytest.raises(volumes.DataError) as exc:
        dicom_datasets.load_dicom_case(dataset.find_cases(tmp_path / "s")[0])
    assert_one_line_naming(exc, "seg.dcm", "1.2.3.4.5" if by == "reference" else "matches no slice")


# ------------------------------------------------------------------------------------------------
# Bad variants: one line on stderr, exit status 2
# ------------------------------------------------------------------------------------------------

def _seg_variant(root: Path, nifti: Path, segments, other_series: bool = False) -> None:
    vol, seg = nifti / "volume-1.nii", nifti / "segmentation-1.nii"
    img = nib.load(str(vol))
    ct = phantom.write_phantom_dicom(root / "HCC_009" / "CT", np.asanyarray(img.dataobj), img.affine, seed=9)
    if other_series:  # a series of the same anatomy that is not in the data folder
        ct = phantom.write_phantom_dicom(root.parent / "elsewhere", np.asanyarray(img.dataobj), img.affine, seed=9,
                                         series_number=7)
    labels = np.asanyarray(nib.load(str(seg)).dataobj)
    phantom.write_phantom_seg(root / "HCC_009" / "SEG" / "seg.dcm", ct, segments(labels))


@pytest.mark.parametrize("variant, words", [
    ("missing mask slice", ["liver mask slice", "expected 8"]),
    ("other series", ["not among the CT series"]),
    ("no liver", ["expected one labelled as the liver", "'Tumor'"]),
    ("overlapping tumours", ["overlap", "'Tumor 1'", "'Tumor 2'"]),
])
def test_bad_variants_one_line_exit_2(nifti, tmp_path, capsys, variant, words):
    root = tmp_path / "data"
    if variant == "missing mask slice":
        patient = phantom.write_phantom_ircadb(root / "3Dircadb1.1", nifti / "volume-1.nii",
                                               nifti / "segmentation-1.nii", seed=1)
        (patient / "MASKS_DICOM" / "liver" / "image_3").unlink()
    elif variant == "other series":
        _seg_variant(root, nifti, lambda lab: {"Liver": lab >= 1, "Tumor": lab == 2}, other_series=True)
    elif variant == "no liver":
        _seg_variant(root, nifti, lambda lab: {"Tumor": lab == 2})
    else:
        _seg_variant(root, nifti, lambda lab: {"Liver": lab >= 1, "Tumor 1": lab == 2, "Tumor 2": lab == 2})
    rc, err = run(["prepare", "--data-dir", root, "--cache-dir", tmp_path / "cache", "--image-size", 32,
                   "--workers", 1], capsys)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for w in words:
        assert w in lines[0], (w, lines[0])
    assert not list((tmp_path / "cache").rglob("*.npy"))  # nothing half-written


# ------------------------------------------------------------------------------------------------
# Mixtures: several --data-dir, case ids that carry the data set, LiTS 28-47 and 3D-IRCADb-01
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mixture(tmp_path_factory, nifti) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("mixture")
    lits = root / "LiTS"
    for i in (0, 3, 28):
        twin(lits, i, tumors=1 if i else 0)
    ircadb = root / "3Dircadb1"
    for i in (1, 2):
        phantom.write_phantom_ircadb(ircadb / f"3Dircadb1.{i}", nifti / f"volume-{i}.nii",
                                     nifti / f"segmentation-{i}.nii", seed=i)
    return lits, ircadb


def test_prepare_mixture_prefixes_ids_and_drops_lits_28_to_47(mixture, tmp_path, capsys):
    lits, ircadb = mixture
    rc, err = run(["prepare", "--data-dir", lits, "--data-dir", ircadb, "--cache-dir", tmp_path / "cache",
                   "--image-size", 32, "--workers", 1], capsys)
    assert rc == 0, err
    assert "left out 1 case(s) numbered 28-47" in err
    prepared, records = dataset.prepare_datasets([lits, ircadb], tmp_path / "cache", 32, workers=1, progress=False)
    assert sorted(c.case_id for c in prepared) == ["3Dircadb1/3Dircadb1.1", "3Dircadb1/3Dircadb1.2",
                                                   "LiTS/volume-0", "LiTS/volume-3"]
    assert [(r["name"], r["layout"], r["cases"], r["dropped"]) for r in records] == [
        ("LiTS", "lits", 2, 1), ("3Dircadb1", "ircadb", 2, 0)]
    kept, _ = dataset.prepare_datasets([lits, ircadb], tmp_path / "cache", 32, workers=1, progress=False,
                                       drop_ircadb_duplicates=False)
    assert "LiTS/volume-28" in {c.case_id for c in kept}
    # One folder alone keeps its ids and its cache folder as before.
    alone, _ = dataset.prepare_datasets([lits], tmp_path / "cache", 32, workers=1, progress=False)
    assert sorted(c.case_id for c in alone) == ["volume-0", "volume-28", "volume-3"]
    assert alone[0].image_path.parent == dataset.cache_folder(tmp_path / "cache", lits, 32, volumes.WINDOW_HU)


def test_train_on_mixture_records_its_data_sets(mixture, tmp_path):
    lits, ircadb = mixture
    out = tmp_path / "run"
    argv = ["--task", "segmentation", "--data-dir", str(lits), "--data-dir", str(ircadb), "--output-dir", str(out),
            "--cache-dir", str(tmp_path / "cache"), "--graphs-dir", str(out / "graphs"), "--image-size", "32",
            "--base-width", "4", "--batch-size", "8", "--num-workers", "0", "--accelerator", "cpu",
            "--max-epochs", "1", "--val-fraction", "0.25", "--test-fraction", "0.25"]
    summary = train.main(train.get_args_parser().parse_args(argv))
    split = json.loads((out / "splits.json").read_text())
    every = split["train"] + split["val"] + split["test"]
    assert sorted(every) == ["3Dircadb1/3Dircadb1.1", "3Dircadb1/3Dircadb1.2", "LiTS/volume-0", "LiTS/volume-3"]
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    recorded = {d["name"]: d for d in ckpt["hyper_parameters"]["training_data"]}
    for name in ("LiTS", "3Dircadb1"):
        expected_train = sum(1 for c in split["train"] if c.startswith(name + "/"))
        assert recorded[name]["cases"] == 2 and recorded[name]["train"] == expected_train
    assert recorded["3Dircadb1"]["layout"] == "ircadb"
    assert summary["datasets"] == ckpt["hyper_parameters"]["training_data"]
    import report
    text = report.training_data_text({"training_data": ckpt["hyper_parameters"]["training_data"]})
    assert "3Dircadb1 (ircadb)" in text and "LiTS (lits)" in text


def test_evaluate_scores_predictions_against_dicom_ground_truth(nifti, tmp_path, capsys):
    root = tmp_path / "ircadb"
    phantom.write_phantom_ircadb(root / "3Dircadb1.2", nifti / "volume-2.nii", nifti / "segmentation-2.nii", seed=2)
    series = volumes.find_dicom_series(root / "3Dircadb1.2" / "PATIENT_DICOM")
    _, geom = volumes.read_volume(series[0])
    labels = twin_labels(nifti / "segmentation-2.nii")
    pred = labels.copy()
    pred[pred == 2] = 1  # every tumour missed: liver Dice 1, tumour Dice 0
    (tmp_path / "pred").mkdir()
    volumes.write_labels(pred, geom, tmp_path / "pred" / "prediction-2.nii.gz")
    rows, _ = evaluate.evaluate_folders(tmp_path / "pred", root)
    assert [r["case"] for r in rows] == [2]
    assert rows[0]["dice_liver"] == pytest.approx(1.0) and rows[0]["dice_tumor"] == pytest.approx(0.0)
    shutil.rmtree(root / "3Dircadb1.2" / "MASKS_DICOM" / "liver")
    rc, err = run(["--pred", tmp_path / "pred", "--gt", root], capsys, evaluate.main, evaluate.get_args_parser())
    errors = [line for line in err.splitlines() if line.startswith("error: ")]  # after evaluate's progress bar
    assert rc == 2 and len(errors) == 1 and "'liver' mask series" in errors[0]
