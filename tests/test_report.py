"""report.py on tiny phantoms written as real NIfTI files and DICOM series.

Where the answer must be known, oracles stand in for both networks (tests/helpers.py): the U-Net's
answers the phantom's own labels, the classifier's says "tumour" on slices the test chooses, so the
report's numbers, slice numbering and disagreements are checked against hand-made expectations, and
everything in report.json against the label volume the report wrote, read back from disk.
"""
from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from scipy import ndimage

import phantom
import report
import volumes
from tests.dicom_helpers import dicom_twin, seg_label_frames
from tests.helpers import Oracle, unit_slices, use_oracle

ROOT = Path(__file__).resolve().parents[1]
STUDY_DESCRIPTION = 'Liver <b>CT</b> & "portal" phase'  # markup a page must show as text


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> dict:
    """A 64x64x12 phantom with two lesions, stored with its x and slice axes flipped (the file's slice k is not the k-th
    from below), its DICOM twin in CT/patient-0/, and the slices the classifier oracle will call."""
    root = tmp_path_factory.mktemp("study")
    volume, segmentation = phantom.write_phantom_case(root / "nifti", 0, size=64, seed=9, num_slices=12,
                                                      flips=(True, False, True), num_tumors=3)
    files = dicom_twin(root / "CT" / "patient-0", volume)
    for path in files:
        ds = pydicom.dcmread(path)
        ds.StudyDescription = STUDY_DESCRIPTION
        ds.save_as(path, enforce_file_format=True)
    truth_slices, geom = volumes.load_label_volume(segmentation)  # (Z, H, W) in slices order
    liver = (truth_slices >= 1).any(axis=(1, 2))
    tumor = (truth_slices == 2).any(axis=(1, 2))
    # The classifier oracle agrees with the labels except on three slices: a tumour slice it calls
    # healthy, a liver slice without tumour it calls tumour, and a slice without liver it calls tumour
    # (not compared: the classifier does not learn on such slices).
    missed = int(np.flatnonzero(tumor)[len(np.flatnonzero(tumor)) // 2])
    extra = int(next(z for z in np.flatnonzero(liver & ~tumor) if abs(z - missed) > 1))
    outside = int(np.flatnonzero(~liver)[0])
    calls = tumor.copy()
    calls[[missed, extra, outside]] = [False, True, True]
    return {"volume": volume, "segmentation": segmentation, "series": root / "CT" / "patient-0",
            "truth_slices": truth_slices, "geom": geom, "calls": calls,
            "missed": geom.file_slice_index(missed), "extra": geom.file_slice_index(extra)}


def oracles(study: dict, monkeypatch) -> None:
    seg = Oracle(unit_slices(study["volume"], 64), torch.from_numpy(study["truth_slices"]))
    cls = Oracle(unit_slices(study["volume"], 32), torch.from_numpy(study["calls"]))
    use_oracle(monkeypatch, seg, classifier=cls)


def run(*argv) -> dict:
    return report.main(report.get_args_parser().parse_args([str(a) for a in argv]))


def run_cli(*argv) -> int:
    return volumes.run_cli(report.main, report.get_args_parser(), [str(a) for a in argv])


def brute_diameter(mask: np.ndarray, spacing) -> float:
    """The largest distance in mm between the centres of two pixels of a 2D mask, every pair compared."""
    from scipy.spatial.distance import cdist
    pts = np.argwhere(mask) * np.asarray(spacing, dtype=np.float64)
    return float(cdist(pts, pts).max()) if len(pts) else 0.0


def check_against_labels(out: Path, saved: dict, source) -> np.ndarray:
    """report.json agrees with the label volume written beside it, read back from disk (file order,
    slices along the third axis); returns that volume."""
    img = nib.load(out / saved["outputs"]["labels"])
    labels = np.asarray(img.dataobj)
    assert img.shape == volumes.read_volume(source)[1].shape
    dx, dy, dz = (float(v) for v in np.sqrt((img.affine[:3, :3] ** 2).sum(axis=0)))
    voxel_ml = dx * dy * dz / 1000
    tumor, liver = labels == 2, labels >= 1
    assert saved["liver_volume_ml"] == pytest.approx(liver.sum() * voxel_ml, rel=1e-6)
    assert saved["tumor_volume_ml"] == pytest.approx(tumor.sum() * voxel_ml, rel=1e-6, abs=1e-12)
    assert saved["tumor_burden_percent"] == pytest.approx(100 * tumor.sum() / max(1, liver.sum()))
    # Lesions as scipy labels them by default (face-connected), sizes largest first; they add up.
    ids, n = ndimage.label(tumor)
    assert saved["num_lesions"] == n == len(saved["lesions"])
    sizes = sorted(np.bincount(ids.ravel())[1:].tolist(), reverse=True)
    assert [d["voxels"] for d in saved["lesions"]] == sizes
    assert sum(d["volume_ml"] for d in saved["lesions"]) == pytest.approx(saved["tumor_volume_ml"], abs=1e-12)
    for d in saved["lesions"]:
        assert d["first_slice"] <= d["slice"] <= d["last_slice"]
        assert d["long_axis_mm"] >= d["short_axis_mm"] >= 0
        # Its own component (by size and slice range, one match), and that component's largest axial
        # diameter by brute force; the key slice is where it is reached.
        (own,) = [i for i in range(1, n + 1) if np.sum(ids == i) == d["voxels"]
                  and [int(z) for z in np.flatnonzero((ids == i).any(axis=(0, 1)))[[0, -1]]]
                  == [d["first_slice"], d["last_slice"]]]
        per_slice = [brute_diameter(ids[:, :, z] == own, (dx, dy)) for z in range(ids.shape[2])]
        assert d["long_axis_mm"] == pytest.approx(max(per_slice))
        assert per_slice[d["slice"]] == pytest.approx(d["long_axis_mm"])
        assert d["measurable"] == (d["long_axis_mm"] >= max(10.0, 2 * dz) - 1e-6)  # RECIST 1.1 on CT
    longest = sorted((d for d in saved["lesions"] if d["measurable"]), key=lambda d: (-d["long_axis_mm"], d["id"]))[:2]
    assert saved["recist_target_lesions"] == [d["id"] for d in longest]  # at most two per organ
    assert saved["recist_sum_long_axes_mm"] == pytest.approx(sum(d["long_axis_mm"] for d in longest))
    # Every slice, in the file's numbering, has a probability and the area the file shows.
    rows = saved["slices"]
    assert [r["slice"] for r in rows] == list(range(labels.shape[2])) == list(range(saved["num_slices"]))
    for r in rows:
        assert 0.0 <= r["tumor_probability"] <= 1.0
        assert r["tumor_area_mm2"] == pytest.approx(tumor[:, :, r["slice"]].sum() * dx * dy)
        assert r["liver_area_mm2"] == pytest.approx(liver[:, :, r["slice"]].sum() * dx * dy)
    assert sum(r["tumor_area_mm2"] for r in rows) * dz / 1000 == pytest.approx(saved["tumor_volume_ml"], abs=1e-12)
    return labels


def check_page(out: Path, saved: dict, key_images: int) -> str:
    page = (out / "report.html").read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    images = page.split('src="data:image/png;base64,')[1:]
    assert len(images) == min(key_images, saved["num_lesions"]) + 1  # key images and the slice plot
    for chunk in images:
        assert base64.b64decode(chunk.split('"', 1)[0])[:8] == b"\x89PNG\r\n\x1a\n"
    for offline in ("http://", "https://", "<script", "<link", "@import"):
        assert offline not in page  # opens offline: nothing to fetch, nothing to run
    assert "not a medical device" in page
    if saved["recist_target_lesions"]:
        assert f"sum of long axes {saved['recist_sum_long_axes_mm']:.1f} mm" in page
    return page


def test_nifti_report_agrees_with_its_labels_and_finds_the_disagreements(study, ckpts, tmp_path, monkeypatch):
    oracles(study, monkeypatch)
    out = tmp_path / "reports" / "volume-0"
    result = run("--input", study["volume"], "--segmentation-checkpoint", ckpts["seg64"],
                 "--classification-checkpoint", ckpts["cls"], "--output-dir", out, "--device", "cpu", "--exact")
    assert sorted(p.name for p in out.iterdir()) == ["report.html", "report.json", "volume-0_seg.nii.gz"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["volume-0"]  # no temporary folder left beside it
    saved = json.loads((out / "report.json").read_text())
    assert saved == json.loads(json.dumps(result))
    labels = check_against_labels(out, saved, study["volume"])
    np.testing.assert_array_equal(labels, np.asarray(nib.load(study["segmentation"]).dataobj))  # the oracle's
    np.testing.assert_allclose(nib.load(out / "volume-0_seg.nii.gz").affine, nib.load(study["volume"]).affine)
    assert saved["num_lesions"] == 2 and saved["lesions"][1]["short_axis_mm"] > 0
    assert saved["recist_target_lesions"] == [1, 2]  # 46 and 16 mm long, slices 4.8 mm apart: both measurable

    # The classifier's probabilities are the oracle's calls, slice by slice in the file's numbering.
    geom = study["geom"]
    called = {geom.file_slice_index(z) for z in np.flatnonzero(study["calls"])}
    assert {r["slice"] for r in saved["slices"] if r["tumor_probability"] >= 0.5} == called
    assert saved["classifier"]["threshold"] == 0.5 and saved["classifier"]["tumor_slices"] == len(called)
    # This untrained checkpoint chose no volume threshold: the volume's probability, and no verdict.
    assert saved["classifier"]["volume_threshold"] is None and saved["classifier"]["verdict"] is None
    # Two disagreements, one each way; the call on a slice without liver is not compared.
    assert [(r["first_slice"], r["last_slice"], r["slices"], r["tumor_by"]) for r in saved["disagreements"]] == sorted(
        [(study["missed"], study["missed"], 1, "segmentation"), (study["extra"], study["extra"], 1, "classifier")])
    agreement = saved["agreement"]
    liver_slices = int((study["truth_slices"] >= 1).any(axis=(1, 2)).sum())
    assert agreement["compared_slices"] == liver_slices
    assert (agreement["classifier_only"], agreement["segmentation_only"]) == (1, 1)

    # Provenance: both checkpoints, their preprocessing, the software.
    for role, key in (("segmentation", "seg64"), ("classification", "cls")):
        record = saved["checkpoints"][role]
        assert record["path"] == str(ckpts[key]) and record["task"] == role
        assert record["sha256"] == hashlib.sha256(ckpts[key].read_bytes()).hexdigest()
        assert record["preprocessing"]["window_hu"] == list(volumes.WINDOW_HU)
        assert record["training"] is None  # not in a train.py run folder: not recorded, and the page says so
    assert saved["checkpoints"]["segmentation"]["preprocessing"]["image_size"] == 64
    assert saved["software"]["version"] and saved["software"]["torch"] == torch.__version__
    assert saved["software"]["path"] == "exact" and saved["fast_path"] is None
    lesion = saved["lesions"][0]
    assert len(lesion["centre_ras_mm"]) == 3 and lesion["centre_lps_mm"][2] == lesion["centre_ras_mm"][2]

    page = check_page(out, saved, key_images=20)
    assert "volume-0" in page and "not recorded" in page


def test_dicom_series_report_withholds_identifiers_unless_asked(study, ckpts, tmp_path, monkeypatch):
    oracles(study, monkeypatch)
    common = ["--input", study["series"], "--segmentation-checkpoint", ckpts["seg64"], "--classification-checkpoint",
              ckpts["cls"], "--device", "cpu", "--exact"]
    out = tmp_path / "dicom"
    monkeypatch.setattr(report, "TABLE_ROWS", 1)  # the page lists the largest lesions, the JSON all
    saved = run(*common, "--output-dir", out, "--dicom-seg", "--key-images", 1)
    assert sorted(p.name for p in out.iterdir()) == ["patient-0_seg.dcm", "patient-0_seg.nii.gz", "report.html",
                                                      "report.json"]
    labels = check_against_labels(out, saved, study["series"])
    # The SEG holds the same labels: each tumour frame of a source slice is that slice's tumour.
    frames, seg = seg_label_frames(out / "patient-0_seg.dcm")
    _, geom = volumes.read_volume(study["series"])
    for k, ds in enumerate(geom.dicom):
        expected = labels[:, :, k].T  # file order (columns, rows) -> the frame's (rows, columns)
        np.testing.assert_array_equal(frames.get(ds.SOPInstanceUID, np.zeros_like(expected)), expected)
    nifti = run(*common[:1], study["volume"], *common[2:], "--output-dir", tmp_path / "nifti")
    assert saved["liver_volume_ml"] == pytest.approx(nifti["liver_volume_ml"], rel=1e-4)
    assert [d["voxels"] for d in saved["lesions"]] == [d["voxels"] for d in nifti["lesions"]]

    header = pydicom.dcmread(next(study["series"].iterdir()))
    private = (header.PatientID, header.StudyDate, str(header.PatientName), header.SeriesInstanceUID,
               header.SOPInstanceUID)
    text = (out / "report.json").read_text() + (out / "report.html").read_text()
    assert not [p for p in private if p in text]
    assert saved["study"]["identifiers"].startswith("withheld")
    page = check_page(out, saved, key_images=1)
    assert "withheld" in page and html_escaped(STUDY_DESCRIPTION) in page and STUDY_DESCRIPTION not in page
    rows = [f"<tr><td class=n>{d['id']}</td><td class=n>{d['volume_ml']:.2f}</td>" for d in saved["lesions"]]
    assert [row in page for row in rows] == [True, False] and "1 smaller lesion(s)" in page

    shown = tmp_path / "shown"
    saved = run(*common, "--output-dir", shown, "--show-identifiers")
    text = (shown / "report.json").read_text() + (shown / "report.html").read_text()
    assert header.PatientID in text and header.StudyDate in text
    assert str(header.PatientName) not in text  # never the name
    assert saved["study"]["patient_id"] == header.PatientID
    assert [r["sop_instance_uid"] for r in saved["slices"]] == [str(ds.SOPInstanceUID) for ds in geom.dicom]


def html_escaped(text: str) -> str:
    import html
    return html.escape(text, quote=True)


def test_fast_path_with_real_networks_and_overwrite(study, ckpts, tmp_path):
    out = tmp_path / "fast"
    common = ["--input", study["volume"], "--segmentation-checkpoint", ckpts["seg"], "--classification-checkpoint",
              ckpts["cls"], "--output-dir", out, "--device", "cpu"]
    saved = run(*common)
    assert saved["software"]["path"] == "fast" and saved["fast_path"]["slices"] == 12
    check_against_labels(out, saved, study["volume"])
    check_page(out, saved, key_images=20)

    (out / "note.txt").write_text("from the earlier report")
    assert run_cli(*common) == 2  # not empty: refused without --overwrite
    saved = run(*common, "--overwrite", "--key-images", 0)
    assert not (out / "note.txt").exists() and json.loads((out / "report.json").read_text()) == saved
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fast"]
    check_page(out, saved, key_images=0)


def test_bad_input_is_one_line_exit_2_and_writes_nothing(study, ckpts, tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    (tmp_path / "random.nii").write_bytes(np.random.default_rng(0).bytes(3000))
    (tmp_path / "slice.png").write_bytes(b"")
    not_empty = tmp_path / "not_empty"
    not_empty.mkdir()
    (not_empty / "keep.txt").write_text("mine")
    seg, cls, vol = ckpts["seg"], ckpts["cls"], study["volume"]
    out = tmp_path / "out" / "report"

    def argv(inp=vol, s=seg, c=cls, o=out, *extra):
        return ["--input", inp, "--segmentation-checkpoint", s, "--classification-checkpoint", c, "--output-dir", o,
                "--device", "cpu", *extra]

    cases = [
        (argv(s=cls), "found a classification checkpoint; expected a segmentation checkpoint (given as "
                      "--segmentation-checkpoint)"),
        (argv(c=seg), "found a segmentation checkpoint; expected a classification checkpoint (given as "
                      "--classification-checkpoint)"),
        (argv(inp=tmp_path / "random.nii"), "cannot read NIfTI"),
        (argv(inp=tmp_path / "missing.nii"), "input not found"),
        (argv(inp=tmp_path / "slice.png"), "found a 2D slice; expected one NIfTI volume"),
        (argv(o=a_file / "report"), "where a folder should be"),
        (argv(o=a_file), "found a file; expected a folder"),
        (argv(o=not_empty), "not empty"),
        (argv(vol, seg, cls, not_empty, "--overwrite"), "without report.json"),
        (argv(vol, seg, cls, out, "--dicom-seg"), "expected a DICOM series"),
        (argv(vol, seg, cls, out, "--key-images", "-1"), "expected 0 or more"),
    ]
    before = sorted(tmp_path.rglob("*"))
    for args, message in cases:
        assert run_cli(*args) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and message in err, (args, err)
    assert sorted(tmp_path.rglob("*")) == before  # nothing written, nothing removed
    assert (not_empty / "keep.txt").read_text() == "mine"


def test_a_failure_after_the_work_began_leaves_nothing(study, ckpts, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise volumes.DataError("x: cannot write (No space left on device); expected a writable output location")

    monkeypatch.setattr(report, "write_labels", broken)
    out = tmp_path / "new" / "deeper" / "report"
    assert run_cli("--input", study["volume"], "--segmentation-checkpoint", ckpts["seg"],
                   "--classification-checkpoint", ckpts["cls"], "--output-dir", out, "--device", "cpu") == 2
    assert list(tmp_path.iterdir()) == []  # the folders made for it are gone too


def test_command_line_wrong_task_checkpoint(study, ckpts, tmp_path):
    out = tmp_path / "report"
    proc = subprocess.run([sys.executable, str(ROOT / "report.py"), "--input", str(study["volume"]),
                           "--segmentation-checkpoint", str(ckpts["cls"]), "--classification-checkpoint",
                           str(ckpts["cls"]), "--output-dir", str(out), "--device", "cpu"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "--segmentation-checkpoint" in lines[0]
    assert not out.exists()


def test_volume_verdict_is_the_checkpoints_volume_threshold_on_every_slice(study, ckpts, tmp_path, monkeypatch):
    """The classifier oracle calls some slices tumour (probability sigmoid(5)), the rest not
    (sigmoid(-5)); the volume's probability is the mean of the 3 highest over every slice, as
    predict_classification.py scores it, and the verdict is at the checkpoint's volume threshold, with
    the sensitivity and specificity it gave on validation on the page. Slice threshold 0.5 throughout."""
    from lit_model import LitClassifier
    from tests.helpers import save_checkpoint
    oracles(study, monkeypatch)
    called = int(study["calls"].sum())
    high, low = torch.sigmoid(torch.tensor(5.0)).item(), torch.sigmoid(torch.tensor(-5.0)).item()
    score = (min(3, called) * high + max(0, 3 - called) * low) / 3
    for point, expected in (([score - 0.01, 1.0, 0.75, 8, 4], "tumor"), ([score + 0.01, 1.0, 0.75, 8, 4], "healthy")):
        model = LitClassifier(in_channels=3, hidden=16, image_size=32)
        model.volume_operating_point.copy_(torch.tensor(point, dtype=torch.float64))
        cls = save_checkpoint(model, tmp_path / f"{expected}.ckpt")
        out = tmp_path / expected
        saved = run("--input", study["volume"], "--segmentation-checkpoint", ckpts["seg64"], "--classification-checkpoint", cls,
                    "--output-dir", out, "--device", "cpu", "--exact", "--key-images", "0")
        verdict = saved["classifier"]
        assert verdict["volume_probability"] == pytest.approx(score, abs=1e-5) and verdict["verdict"] == expected
        assert verdict["volume_threshold"] == pytest.approx(point[0])
        assert verdict["volume_validation"] == {"sensitivity": 1.0, "specificity": 0.75, "volumes": 8, "tumour_volumes": 4}
        page = (out / "report.html").read_text(encoding="utf-8")
        assert f"{expected} (tumour probability {score:.3f}" in page
        assert "chosen on 8 validation volumes (4 with tumour): sensitivity 1.00, specificity 0.75" in page


def test_no_function_of_report_py_runs_past_80_lines():
    """The page and the command are split into named parts a reader can find (render_html and main
    were 150 and 110 lines)."""
    import ast
    tree = ast.parse((Path(__file__).resolve().parents[1] / "report.py").read_text())
    long = {f.name: f.end_lineno - f.lineno + 1 for f in ast.walk(tree)
            if isinstance(f, ast.FunctionDef) and f.end_lineno - f.lineno + 1 > 80}
    assert not long, long
