"""predict_segmentation.py and predict_classification.py on tiny phantoms written as real NIfTI files.

No model is trained for these tests: checkpoints are real Lightning files of untrained networks, and
where the answer must be known an oracle stands in for the network (it recognises each slice it is
given and returns that slice's ground truth), so every step around the network is checked exactly:
preprocessing, 2.5D stacks, batching, orientation back to the file, the header, slice numbering.
"""
from __future__ import annotations

import csv
import json
import math
import pickle
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage
from torch import nn

import inference
import phantom
import predict_classification as pc
import predict_segmentation as ps
import pydicom
import volumes
from tests.dicom_helpers import canonical_slices, dicom_twin, read_series_by_tags, seg_label_frames
from tests.helpers import Oracle, load_script, save_checkpoint, unit_slices, use_oracle

ROOT = Path(__file__).resolve().parents[1]
WINDOW = volumes.WINDOW_HU


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """(volume, segmentation) pairs: axes flipped, stored in RAS order, and with an identity affine."""
    root = tmp_path_factory.mktemp("phantoms")
    out = {"flipped": phantom.write_phantom_case(root / "flipped", 0, size=48, seed=1, num_slices=8,
                                                 flips=(True, False, True), num_tumors=2),
           "ras": phantom.write_phantom_case(root / "ras", 1, size=48, seed=1, num_slices=8,
                                             flips=(False, False, False), num_tumors=2)}
    (root / "identity").mkdir()
    pair = []
    for src in out["ras"]:
        img = nib.Nifti1Image(np.asarray(nib.load(src).dataobj), np.eye(4))
        img.set_qform(np.eye(4), code=1)
        img.set_sform(np.eye(4), code=1)
        nib.save(img, root / "identity" / src.name)
        pair.append(root / "identity" / src.name)
    out["identity"] = tuple(pair)
    for vol, seg in out.values():
        assert (np.asarray(nib.load(seg).dataobj) == 2).any(), "each phantom needs tumor for the tests to bite"
    return out


def seg_args(*argv) -> object:
    return ps.get_args_parser().parse_args([str(a) for a in argv])


def cls_args(*argv) -> object:
    return pc.get_args_parser().parse_args([str(a) for a in argv])


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float((a & b).sum()) / max(1, float(a.sum() + b.sum()))


# --------------------------------------------------------------------------------------------
# Orientation and header: the oracle's answer must come back voxel for voxel in the file's order
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["flipped", "ras", "identity"])
def test_oracle_labels_line_up_with_the_input(kind, phantoms, ckpts, tmp_path, monkeypatch):
    volume, segmentation = phantoms[kind]
    truth_slices, _ = volumes.load_label_volume(segmentation)  # (Z, H, W) in slices order
    use_oracle(monkeypatch, Oracle(unit_slices(volume, 48), torch.from_numpy(truth_slices)))
    out = tmp_path / "out" / "pred.nii.gz"
    # The oracle knows whole slices at the model's size, which only the exact path shows it; the fast
    # path is held to the exact one's answer voxel for voxel in test_fast_path_writes_the_exact_answer.
    ps.main(seg_args("--checkpoint", ckpts["seg48"], "--input", volume, "--output", out, "--no-postprocess",
                     "--device", "cpu", "--batch-size", 3, "--exact"))
    pred_img, in_img = nib.load(out), nib.load(volume)
    pred, truth = np.asarray(pred_img.dataobj), np.asarray(nib.load(segmentation).dataobj)  # file order
    assert pred.shape == in_img.shape
    np.testing.assert_allclose(pred_img.affine, in_img.affine, atol=1e-6)
    np.testing.assert_allclose(pred_img.get_qform(), in_img.get_qform(), atol=1e-6)
    np.testing.assert_allclose(pred_img.get_sform(), in_img.get_sform(), atol=1e-6)
    assert int(pred_img.header["qform_code"]) == int(in_img.header["qform_code"])
    assert int(pred_img.header["sform_code"]) == int(in_img.header["sform_code"])
    assert nib.aff2axcodes(pred_img.affine) == nib.aff2axcodes(in_img.affine)
    assert pred_img.get_data_dtype() == np.uint8 and pred_img.dataobj.slope == 1 and pred_img.dataobj.inter == 0
    assert dice(pred >= 1, truth >= 1) == 1.0 and dice(pred == 2, truth == 2) == 1.0
    np.testing.assert_array_equal(pred, truth)


def test_default_output_beside_the_input_and_postprocess_keeps_a_clean_answer(phantoms, ckpts, tmp_path, monkeypatch):
    volume = Path(shutil.copy(phantoms["flipped"][0], tmp_path / "volume-0.nii"))
    truth_slices, _ = volumes.load_label_volume(phantoms["flipped"][1])
    use_oracle(monkeypatch, Oracle(unit_slices(volume, 48), torch.from_numpy(truth_slices)))
    result = ps.main(seg_args("--checkpoint", ckpts["seg48"], "--input", volume, "--device", "cpu",
                              "--report", tmp_path / "report.json", "--exact"))
    out = tmp_path / "volume-0_seg.nii.gz"
    assert result["cases"][0]["output"] == str(out)
    pred = np.asarray(nib.load(out).dataobj)
    truth = np.asarray(nib.load(phantoms["flipped"][1]).dataobj)
    # The phantom's liver is one piece with its tumors inside: post-processing changes nothing.
    np.testing.assert_array_equal(pred, truth)
    report = json.loads((tmp_path / "report.json").read_text())["cases"][0]
    assert report["num_lesions"] == len(report["lesions"]) >= 1
    expected_ml = float((truth >= 1).sum()) * np.prod(nib.load(volume).header.get_zooms()[:3]) / 1000
    assert report["liver_volume_ml"] == pytest.approx(expected_ml, rel=1e-5)


def test_fast_path_writes_the_exact_answer(ckpts, tmp_path, monkeypatch):
    """The default (fast) path and --exact write the same file on the input's grid, with a network that
    answers any crop or size of a slice alike (tests/test_inference.py's NearestLevel) on a volume
    whose intensities spell out a phantom's labels; the fast path's block leaves slices out."""
    from tests.test_inference import LEVELS_HU, NearestLevel
    monkeypatch.setattr(inference, "cpu_has_fast_bf16", lambda: False)  # float32 both: equality is due
    src_vol, src_seg = phantom.write_phantom_case(tmp_path / "src", 0, size=96, seed=4, num_slices=48,
                                                  flips=(True, False, True), num_tumors=2)
    seg_img = nib.load(src_seg)
    truth = np.asarray(seg_img.dataobj)
    volume = tmp_path / "coded.nii"
    nib.save(nib.Nifti1Image(np.asarray(LEVELS_HU, dtype=np.float32)[truth].astype(np.int16), seg_img.affine,
                             seg_img.header), volume)
    use_oracle(monkeypatch, NearestLevel())
    outs, reports = {}, {}
    for name, extra in (("fast", ()), ("exact", ("--exact",))):
        outs[name] = tmp_path / f"{name}.nii.gz"
        result = ps.main(seg_args("--checkpoint", ckpts["seg48"], "--input", volume, "--output", outs[name],
                                  "--no-postprocess", "--device", "cpu", *extra))
        reports[name] = result["cases"][0]
        assert reports[name]["exact"] is (name == "exact") and ("fast_path" in reports[name]) is (name == "fast")
    fast, exact = nib.load(outs["fast"]), nib.load(outs["exact"])
    assert fast.shape == exact.shape == truth.shape
    np.testing.assert_allclose(fast.affine, seg_img.affine, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(fast.dataobj), np.asarray(exact.dataobj))
    assert dice(np.asarray(fast.dataobj) >= 1, truth >= 1) > 0.95  # 96 -> 48 -> 96 blurs the edges only
    summary = reports["fast"]["fast_path"]
    assert 0 < summary["full_resolution_slices"] < truth.shape[2] and summary["bf16"] is False
    liver_slices = int((truth >= 1).any(axis=(0, 1)).sum())  # the block holds the liver and leaves slices out
    assert liver_slices <= summary["block_slices"] <= summary["full_resolution_slices"]
    assert summary["block_slices"] < summary["slices"] == truth.shape[2]


def test_slice_option_predicts_the_files_own_slice(phantoms, ckpts, tmp_path, monkeypatch):
    volume, segmentation = phantoms["flipped"]  # the slice axis is flipped: file order != slices order
    truth = np.asarray(nib.load(segmentation).dataobj)
    k = int(np.argmax((truth == 2).sum(axis=(0, 1))))
    assert k != truth.shape[2] - 1 - k
    truth_slices, _ = volumes.load_label_volume(segmentation)
    oracle = Oracle(unit_slices(volume, 48), torch.from_numpy(truth_slices))
    use_oracle(monkeypatch, oracle)
    out = tmp_path / "one.nii.gz"
    result = ps.main(seg_args("--checkpoint", ckpts["seg48"], "--input", volume, "--slice", k, "--output", out,
                              "--no-postprocess", "--device", "cpu"))
    assert oracle.seen == [truth.shape[2] - 1 - k]  # one forward, of the right slice
    img, in_img = nib.load(out), nib.load(volume)
    mask = np.asarray(img.dataobj)
    assert mask.shape == (*truth.shape[:2], 1)
    np.testing.assert_array_equal(mask[..., 0], truth[..., k])
    # The one-slice volume sits where slice k sits in the world.
    np.testing.assert_allclose(img.affine[:, :3], in_img.affine[:, :3], atol=1e-6)
    np.testing.assert_allclose(img.affine[:, 3], in_img.affine @ [0, 0, k, 1], atol=1e-5)
    report = result["cases"][0]
    assert report["slice"] == k and report["lesions"]
    assert all(d["slice"] == d["first_slice"] == d["last_slice"] == k for d in report["lesions"])

    default = Path(shutil.copy(volume, tmp_path / "v.nii"))
    ps.main(seg_args("--checkpoint", ckpts["seg48"], "--input", default, "--slice", k, "--device", "cpu"))
    assert (tmp_path / f"v_slice{k}_seg.nii.gz").is_file()


# --------------------------------------------------------------------------------------------
# Batching, checkpoints, devices
# --------------------------------------------------------------------------------------------

def test_batched_inference_matches_one_stack_at_a_time(ckpts, phantoms):
    ckpt = inference.load_checkpoint(ckpts["seg"], "segmentation")
    net = ckpt.network(torch.device("cpu"))  # BN folded, channels-last
    hu, _ = volumes.load_volume(phantoms["flipped"][0])
    volume = inference.preprocess_volume(hu, ckpt.hparams)  # (Z, 32, 32)
    torch.testing.assert_close(volume, unit_slices(phantoms["flipped"][0], 32), atol=1e-6, rtol=0)
    batched = inference.infer_batched(net, volume, 1, lambda y: y, batch_size=3)  # (Z, 3, 32, 32)
    from lit_model import build_network
    plain = build_network(ckpt.hparams)
    plain.load_state_dict(ckpt.state_dict)
    plain.eval()
    with torch.no_grad():
        one = torch.cat([plain(volume[volumes.context_indices(z, len(volume), 1)][None]) for z in range(len(volume))])
    torch.testing.assert_close(batched, one, atol=1e-4, rtol=1e-4)


def test_checkpoint_written_by_train_py_loads_and_predicts(tmp_path):
    import train
    data = tmp_path / "lits"
    for i in range(4):  # few slices: the point is the checkpoint file, not the training
        phantom.write_phantom_case(data, i, size=48, seed=0, num_slices=8, num_tumors=1)
    argv = ["--task", "segmentation", "--data-dir", str(data), "--output-dir", str(tmp_path / "run"),
            "--cache-dir", str(tmp_path / "cache"), "--graphs-dir", str(tmp_path / "graphs"), "--max-epochs", "1",
            "--image-size", "32", "--base-width", "4", "--num-workers", "0", "--batch-size", "8",
            "--accelerator", "cpu"]
    summary = train.main(train.get_args_parser().parse_args(argv))
    best = Path(summary["checkpoint"])
    torch.load(best, map_location="cpu", weights_only=True)  # the file itself needs no code to load
    volume = sorted(data.glob("volume-*.nii"))[0]
    out = tmp_path / "pred.nii.gz"
    ps.main(seg_args("--checkpoint", best, "--input", volume, "--output", out, "--device", "cpu"))
    pred = np.asarray(nib.load(out).dataobj)
    assert pred.shape == nib.load(volume).shape and set(np.unique(pred)) <= {0, 1, 2}


def hand_window(hu, low: float, high: float) -> np.ndarray:
    """HU -> [0, 1] as the window is defined: low and below 0, high and above 1, linear between."""
    return np.clip((np.asarray(hu, np.float64) - low) / (high - low), 0.0, 1.0)


class Recorder(nn.Module):
    """Wraps a network and keeps every input it is given: the model input a test checks."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net, self.inputs = net, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x.detach().float().cpu().clone())
        return self.net(x)


def test_the_window_given_to_training_is_the_one_applied_to_npy_and_dicom_slices(tmp_path, monkeypatch):
    """--window -100 200 on a folder of .npy slices (HU): training's model input, the checkpoint and
    both predict scripts' model input on an .npy and a 2D DICOM slice all use -100..200, checked
    against the slices windowed by hand."""
    import train
    from lit_model import LitClassifier, LitSegmenter
    window = (-100.0, 200.0)
    data = tmp_path / "slices"
    (data / "images").mkdir(parents=True)
    (data / "masks").mkdir()
    ramp = np.linspace(-300.0, 300.0, 32 * 32).reshape(32, 32)  # beyond both ends of both windows
    mask = np.zeros((32, 32), np.uint8)
    mask[4:28, 4:28] = 1
    mask[10:16, 10:16] = 2
    expected = {}
    for case in range(3):
        for idx in range(3):
            hu = (ramp + 20 * case + 5 * idx).astype(np.float32)
            np.save(data / "images" / f"pat_{case}_{idx}.npy", hu)
            Image.fromarray(mask).save(data / "masks" / f"pat_{case}_{idx}.png")
            expected[f"pat_{case}_{idx}"] = hand_window(hu, *window)

    seen = []  # validation batches: the model's input as training prepares it, without augmentation
    validation_step = LitSegmenter.validation_step

    def recording(self, batch, *args, **kwargs):
        seen.append(batch[0].detach().float().cpu().clone())
        return validation_step(self, batch, *args, **kwargs)

    monkeypatch.setattr(LitSegmenter, "validation_step", recording)
    argv = ["--task", "segmentation", "--data-dir", str(data), "--output-dir", str(tmp_path / "run"),
            "--cache-dir", str(tmp_path / "cache"), "--graphs-dir", str(tmp_path / "graphs"), "--max-epochs", "1",
            "--image-size", "32", "--base-width", "4", "--num-workers", "0", "--batch-size", "4",
            "--context-slices", "1", "--window", "-100", "200", "--accelerator", "cpu"]
    summary = train.main(train.get_args_parser().parse_args(argv))
    centres = torch.cat(seen)[:, 1].numpy()  # (N, 32, 32)
    assert len(centres) >= 3
    for centre in centres:  # each is one of the slices, windowed -100..200 (float16 in the cache)
        assert min(np.abs(centre - e).max() for e in expected.values()) < 1e-3
    seg_ckpt = Path(summary["checkpoint"])
    hparams = torch.load(seg_ckpt, map_location="cpu", weights_only=True)["hyper_parameters"]
    assert tuple(hparams["window"]) == window
    monkeypatch.setattr(LitSegmenter, "validation_step", validation_step)
    cls_ckpt = save_checkpoint(LitClassifier(in_channels=3, hidden=16, image_size=32, window=window),
                               tmp_path / "cls.ckpt")

    npy = tmp_path / "one.npy"
    np.save(npy, (ramp * 1.2).astype(np.float32))
    # A 2D DICOM slice with the usual orientation (rows anterior -> posterior, columns right -> left):
    # its pixels are shown, and windowed, as stored.
    (dcm,) = phantom.write_phantom_dicom(tmp_path / "dcm", np.round(ramp.T * 1.5)[:, :, None],
                                         np.diag([-1.0, -1.0, 1.0, 1.0]))
    ds = pydicom.dcmread(dcm)
    assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    dcm_hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    recorders = []
    network = inference.Checkpoint.network
    monkeypatch.setattr(inference.Checkpoint, "network",
                        lambda self, device: recorders.append(Recorder(network(self, device))) or recorders[-1])
    for path, hu in ((npy, ramp * 1.2), (dcm, dcm_hu)):
        ps.main(seg_args("--checkpoint", seg_ckpt, "--input", path, "--output", tmp_path / f"{path.stem}.png",
                         "--device", "cpu", "--exact"))
        pc.main(cls_args("--checkpoint", cls_ckpt, "--input", path, "--device", "cpu", "--exact"))
        for recorder in recorders[-2:]:
            (x,) = recorder.inputs  # (1, 3, 32, 32): a lone slice stands in for its neighbours
            for channel in x[0].numpy():
                np.testing.assert_allclose(channel, hand_window(hu, *window), atol=1e-5)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    via_torch, via_pickle = tmp_path / "evil.ckpt", tmp_path / "evil.pkl"
    torch.save({"state_dict": {}, "hyper_parameters": {"task": "segmentation"}, "x": Evil()}, via_torch)
    with open(via_pickle, "wb") as fh:
        pickle.dump(Evil(), fh)
    for path in (via_torch, via_pickle):
        with pytest.raises(volumes.DataError, match="refused|cannot load"):
            inference.load_checkpoint(path, "segmentation")
        assert not marker.exists()


def test_device_choice():
    assert inference.pick_device("cpu").type == "cpu"
    assert inference.pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(volumes.DataError, match="no CUDA"):
            inference.pick_device("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_path_gives_the_cpu_answer_with_an_oracle(phantoms, ckpts, tmp_path, monkeypatch):
    volume, segmentation = phantoms["flipped"]
    truth_slices, _ = volumes.load_label_volume(segmentation)
    oracle = Oracle(unit_slices(volume, 48).cuda(), torch.from_numpy(truth_slices).cuda())
    use_oracle(monkeypatch, oracle)
    out = tmp_path / "pred.nii.gz"
    # --exact: the oracle knows whole slices at the model's size (see the CPU test above); on CUDA the
    # exact path runs in bf16 as the fast one does.
    ps.main(seg_args("--checkpoint", ckpts["seg48"], "--input", volume, "--output", out, "--no-postprocess",
                     "--device", "cuda", "--exact"))
    np.testing.assert_array_equal(np.asarray(nib.load(out).dataobj), np.asarray(nib.load(segmentation).dataobj))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_real_network_runs_channels_last_bf16(phantoms, ckpts, tmp_path):
    out = tmp_path / "pred.nii.gz"
    ps.main(seg_args("--checkpoint", ckpts["seg"], "--input", phantoms["flipped"][0], "--output", out,
                     "--device", "cuda"))
    assert nib.load(out).shape == nib.load(phantoms["flipped"][0]).shape
    result = pc.main(cls_args("--checkpoint", ckpts["cls"], "--input", phantoms["flipped"][0], "--device", "cuda"))
    assert all(0.0 <= r["probability"] <= 1.0 for r in result["rows"])


# --------------------------------------------------------------------------------------------
# 2D slices and folders
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def slice_files(phantoms, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("slices")
    hu, _ = volumes.load_volume(phantoms["flipped"][0])
    z = hu.shape[0] // 2
    png = root / "liver_0_0004.png"
    Image.fromarray((volumes.window_hu(hu[z]) * 255).round().astype(np.uint8)).save(png)
    small = root / "small.png"
    Image.fromarray((volumes.window_hu(hu[z, :40, :36]) * 255).round().astype(np.uint8)).save(small)
    npy = root / "liver_0_0005.npy"
    np.save(npy, hu[z + 1].astype(np.float32))
    return {"png": png, "small": small, "npy": npy, "folder": root}


def test_png_slice_gives_mask_and_overlay_pngs(slice_files, ckpts, tmp_path):
    png = Path(shutil.copy(slice_files["png"], tmp_path / "s.png"))
    result = ps.main(seg_args("--checkpoint", ckpts["seg"], "--input", png, "--device", "cpu"))
    mask, overlay = tmp_path / "s_mask.png", tmp_path / "s_overlay.png"
    with Image.open(mask) as m, Image.open(overlay) as o:
        assert m.mode == "L" and m.size == (48, 48)
        assert set(np.unique(np.asarray(m))) <= {0, 1, 2}
        assert o.mode == "RGB" and o.size == (48, 48)
    report = result["cases"][0]
    assert report["kind"] == "image" and "liver_area_px" in report and "liver_volume_ml" not in report

    out = tmp_path / "named" / "m.png"
    ps.main(seg_args("--checkpoint", ckpts["seg"], "--input", slice_files["npy"], "--output", out, "--device", "cpu"))
    assert out.is_file() and (tmp_path / "named" / "m_overlay.png").is_file()


def test_image_oracle_mask_is_the_answer(slice_files, ckpts, tmp_path, monkeypatch):
    with Image.open(slice_files["png"]) as im:
        unit = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255)[None]  # (1, 48, 48)
    answer = (unit[0] > 0.5).to(torch.uint8) + (unit[0] > 0.6).to(torch.uint8)  # any 0/1/2 pattern
    use_oracle(monkeypatch, Oracle(unit, answer[None], lone=True))
    out = tmp_path / "m.png"
    ps.main(seg_args("--checkpoint", ckpts["seg48"], "--input", slice_files["png"], "--output", out,
                     "--no-postprocess", "--device", "cpu"))
    np.testing.assert_array_equal(np.asarray(Image.open(out)), answer.numpy())


def test_folders_of_volumes_and_of_slices(phantoms, slice_files, ckpts, tmp_path):
    vols = tmp_path / "vols"
    vols.mkdir()
    for kind in ("flipped", "ras"):
        for f in phantoms[kind]:
            shutil.copy(f, vols / f.name)  # segmentation-N.nii beside them is skipped
    result = ps.main(seg_args("--checkpoint", ckpts["seg"], "--input", vols, "--output", tmp_path / "out",
                              "--device", "cpu", "--report", tmp_path / "r.json"))
    assert len(result["cases"]) == 2
    for name in ("volume-0", "volume-1"):
        assert nib.load(tmp_path / "out" / f"{name}_seg.nii.gz").shape == nib.load(vols / f"{name}.nii").shape
    assert len(json.loads((tmp_path / "r.json").read_text())["cases"]) == 2

    ps.main(seg_args("--checkpoint", ckpts["seg"], "--input", slice_files["folder"], "--output", tmp_path / "m",
                     "--device", "cpu"))
    for stem, size in (("liver_0_0004", (48, 48)), ("liver_0_0005", (48, 48)), ("small", (36, 40))):
        for suffix in ("mask", "overlay"):
            with Image.open(tmp_path / "m" / f"{stem}_{suffix}.png") as im:
                assert im.size == size
    # Our own outputs in a folder are not taken as input on a second run.
    with pytest.raises(volumes.DataError, match="found no volumes or slices"):
        volumes.find_inputs(tmp_path / "m")

    rows = pc.main(cls_args("--checkpoint", ckpts["cls"], "--input", slice_files["folder"], "--device", "cpu"))["rows"]
    assert [(r["case"], r["slice"]) for r in rows] == [("liver_0_0004", 0), ("liver_0_0005", 0), ("small", 0)]


# --------------------------------------------------------------------------------------------
# DICOM series in, NIfTI or DICOM SEG out
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def series(phantoms, tmp_path_factory) -> dict[str, Path]:
    """The "flipped" phantom again as a DICOM series in CT/patient-0/ (its NIfTI twin), with the files
    named by nothing in particular and without extensions."""
    root = tmp_path_factory.mktemp("dicom")
    files = dicom_twin(root / "scratch", phantoms["flipped"][0])
    folder = root / "CT" / "patient-0"
    folder.mkdir(parents=True)
    for i, path in enumerate(files):
        path.rename(folder / f"{(i * 7919) % 1000:03d}")
    return {"folder": folder, "files": sorted(folder.iterdir())}


def truth_of_source(segmentation: Path, ds) -> np.ndarray:
    """The twin's labels of one DICOM slice (rows, columns): the NIfTI slice at its position."""
    img = nib.load(str(segmentation))
    ras = np.diag([-1.0, -1.0, 1.0]) @ np.array(ds.ImagePositionPatient, dtype=float)
    ijk = np.linalg.solve(img.affine[:3, :3], ras - img.affine[:3, 3])
    np.testing.assert_allclose(ijk[:2], 0, atol=1e-3)
    return np.asanyarray(img.dataobj)[:, :, int(round(ijk[2]))].T


def test_dicom_series_labels_lie_on_the_series_grid(series, phantoms, ckpts, monkeypatch):
    volume, segmentation = phantoms["flipped"]
    truth_slices, _ = volumes.load_label_volume(segmentation)
    use_oracle(monkeypatch, Oracle(unit_slices(volume, 48), torch.from_numpy(truth_slices)))
    result = ps.main(seg_args("--checkpoint", ckpts["seg48"], "--input", series["folder"], "--no-postprocess",
                              "--device", "cpu", "--exact"))
    out = series["folder"].parent / "patient-0_seg.nii.gz"  # beside the series folder, named after it
    report = result["cases"][0]
    assert report["output"] == str(out) and report["input"] == str(series["folder"])
    assert report["series_instance_uid"] == pydicom.dcmread(series["files"][0]).SeriesInstanceUID
    pred = nib.load(str(out))
    _, tags_affine, datasets = read_series_by_tags(series["files"])
    np.testing.assert_allclose(pred.affine, tags_affine, atol=1e-4)  # the series' own grid in world space
    assert pred.shape == (48, 48, 8)
    got, world = canonical_slices(np.asanyarray(pred.dataobj), pred.affine)
    expected, world_twin = canonical_slices(np.asanyarray(nib.load(str(segmentation)).dataobj),
                                            nib.load(str(segmentation)).affine)
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_allclose(world, world_twin, atol=1e-3)
    out.unlink()


def test_dicom_seg_output_holds_the_answer_slice_by_slice(series, phantoms, ckpts, tmp_path, monkeypatch):
    volume, segmentation = phantoms["flipped"]
    truth_slices, _ = volumes.load_label_volume(segmentation)
    use_oracle(monkeypatch, Oracle(unit_slices(volume, 48), torch.from_numpy(truth_slices)))
    out = tmp_path / "pred.dcm"
    ps.main(seg_args("--checkpoint", ckpts["seg48"], "--input", series["folder"], "--output", out,
                     "--no-postprocess", "--device", "cpu", "--exact"))
    frames, seg = seg_label_frames(out)
    datasets = [pydicom.dcmread(p) for p in series["files"]]
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == datasets[0].SeriesInstanceUID
    for ds in datasets:
        expected = truth_of_source(segmentation, ds)
        np.testing.assert_array_equal(frames.get(ds.SOPInstanceUID, np.zeros_like(expected)), expected)
    assert any((f == 2).any() for f in frames.values())

    k = 5  # --slice K of a series: K in the series' order, by position along the normal
    _, _, by_position = read_series_by_tags(series["files"])
    one = tmp_path / "one.dcm"
    ps.main(seg_args("--checkpoint", ckpts["seg48"], "--input", series["folder"], "--slice", k, "--output", one,
                     "--no-postprocess", "--device", "cpu"))
    frames, _ = seg_label_frames(one)
    assert set(frames) <= {by_position[k].SOPInstanceUID}
    expected = truth_of_source(segmentation, by_position[k])
    np.testing.assert_array_equal(frames.get(by_position[k].SOPInstanceUID, np.zeros_like(expected)), expected)


def test_classification_of_a_series_numbers_slices_in_series_order(series, phantoms, ckpts, tmp_path, monkeypatch):
    volume, segmentation = phantoms["flipped"]
    truth_slices, _ = volumes.load_label_volume(segmentation)
    use_oracle(monkeypatch, Oracle(unit_slices(volume, 32), torch.from_numpy((truth_slices == 2).any(axis=(1, 2)))))
    pc.main(cls_args("--checkpoint", ckpts["cls"], "--input", series["folder"], "--output", tmp_path / "p.csv",
                     "--device", "cpu"))
    with open(tmp_path / "p.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    _, _, by_position = read_series_by_tags(series["files"])
    assert list(rows[0]) == ["case", "slice", "probability", "prediction", "sop_instance_uid"]
    assert [int(r["slice"]) for r in rows] == list(range(8))
    assert [r["sop_instance_uid"] for r in rows] == [d.SOPInstanceUID for d in by_position]
    expected = ["tumor" if (truth_of_source(segmentation, d) == 2).any() else "healthy" for d in by_position]
    assert [r["prediction"] for r in rows] == expected and "tumor" in expected and "healthy" in expected
    assert {r["case"] for r in rows} == {"patient-0"}


def test_folder_with_two_series_and_the_series_flag(series, phantoms, ckpts, tmp_path):
    study = tmp_path / "study"
    dicom_twin(study, phantoms["flipped"][0], series_number=2)
    dicom_twin(study, phantoms["ras"][0], series_number=7)
    uids = [s.uid for s in volumes.find_dicom_series(study)]
    result = ps.main(seg_args("--checkpoint", ckpts["seg"], "--input", study, "--device", "cpu"))
    outs = [tmp_path / "study_2_seg.nii.gz", tmp_path / "study_7_seg.nii.gz"]
    assert [c["output"] for c in result["cases"]] == [str(o) for o in outs]
    assert [c["series_instance_uid"] for c in result["cases"]] == uids
    for out in outs:
        assert nib.load(str(out)).shape == (48, 48, 8)
        out.unlink()
    picked = ps.main(seg_args("--checkpoint", ckpts["seg"], "--input", study, "--series", uids[1],
                              "--output", tmp_path / "picked.nii.gz", "--device", "cpu"))
    assert [c["series_instance_uid"] for c in picked["cases"]] == [uids[1]]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["picked.nii.gz", "study"]
    rows = pc.main(cls_args("--checkpoint", ckpts["cls"], "--input", study, "--series", uids[0],
                            "--device", "cpu"))["rows"]
    assert {r["case"] for r in rows} == {"study_2"} and len(rows) == 8


# --------------------------------------------------------------------------------------------
# Classification
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("native_bf16", [True, False])
def test_classification_precision_bf16_by_default_where_native_float32_with_exact(native_bf16, phantoms, ckpts,
                                                                                   monkeypatch):
    monkeypatch.setattr(pc, "cpu_has_fast_bf16", lambda: native_bf16)
    seen = []
    real = inference.infer_batched
    monkeypatch.setattr(inference, "infer_batched", lambda *a, **k: seen.append(k["cpu_bf16"]) or real(*a, **k))
    volume, _ = phantoms["flipped"]
    default = pc.main(cls_args("--checkpoint", ckpts["cls"], "--input", volume, "--device", "cpu"))
    exact = pc.main(cls_args("--checkpoint", ckpts["cls"], "--input", volume, "--device", "cpu", "--exact"))
    assert seen == [native_bf16, False]
    # An untrained VGG16 of width 16 answers alike in both precisions, to bf16's rounding.
    np.testing.assert_allclose([r["probability"] for r in default["rows"]],
                               [r["probability"] for r in exact["rows"]], atol=0.02)


def test_classification_table_csv_json_in_the_files_slice_order(phantoms, ckpts, tmp_path, monkeypatch, capsys):
    volume, segmentation = phantoms["flipped"]
    truth = np.asarray(nib.load(segmentation).dataobj)  # file order
    truth_slices, _ = volumes.load_label_volume(segmentation)
    has_tumor = torch.from_numpy((truth_slices == 2).any(axis=(1, 2)))
    use_oracle(monkeypatch, Oracle(unit_slices(volume, 32), has_tumor))
    result = pc.main(cls_args("--checkpoint", ckpts["cls"], "--input", volume, "--output", tmp_path / "p.csv",
                              "--device", "cpu", "--batch-size", 3))
    with open(tmp_path / "p.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["case", "slice", "probability", "prediction"]
    n = truth.shape[2]
    assert [int(r["slice"]) for r in rows] == list(range(n))
    expected = ["tumor" if (truth[..., k] == 2).any() else "healthy" for k in range(n)]
    assert [r["prediction"] for r in rows] == expected
    assert {r["case"] for r in rows} == {"volume-0"}
    assert all(0.0 <= float(r["probability"]) <= 1.0 for r in rows)
    out = capsys.readouterr().out
    assert f"tumor in {expected.count('tumor')} of {n} slice(s)" in out
    assert result["verdicts"] and "most suspicious slice" in result["verdicts"][0]

    pc.main(cls_args("--checkpoint", ckpts["cls"], "--input", volume, "--output", tmp_path / "p.json",
                     "--device", "cpu", "--threshold", "1.0"))
    saved = json.loads((tmp_path / "p.json").read_text())
    records = saved["slices"]
    assert [r["slice"] for r in records] == list(range(n))
    assert set(records[0]) == {"case", "slice", "probability", "prediction"}
    assert all(r["prediction"] == "healthy" for r in records)  # sigmoid(5) < 1.0: nothing reaches --threshold 1
    (vol,) = saved["volumes"]
    top3 = sorted((r["probability"] for r in records), reverse=True)[:3]
    # --threshold is the slices'; this untrained checkpoint chose no volume threshold: no verdict.
    assert vol["probability"] == pytest.approx(sum(top3) / 3) and vol["prediction"] is None
    assert vol["tumor_slices"] == 0 and vol["slices"] == n and saved["threshold"] == 1.0

    k = expected.index("tumor")
    one = pc.main(cls_args("--checkpoint", ckpts["cls"], "--input", volume, "--slice", k, "--device", "cpu"))
    assert [(r["slice"], r["prediction"]) for r in one["rows"]] == [(k, "tumor")]


# --------------------------------------------------------------------------------------------
# Bad input: one line on stderr, exit status 2, nothing half-written
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bad_files(phantoms, ckpts, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad")
    rng = np.random.default_rng(0)
    files = {"random.nii": rng.bytes(4000), "random.ckpt": rng.bytes(4000)}
    for name, data in files.items():
        (root / name).write_bytes(data)
    whole = phantoms["flipped"][0].read_bytes()
    (root / "truncated.nii").write_bytes(whole[: len(whole) // 2])
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 4, 2), np.int16), np.eye(4)), root / "four_d.nii")
    nib.save(nib.Nifti1Image(np.zeros((48, 48), np.int16), np.eye(4)), root / "two_d.nii")
    from lit_model import LitSegmenter
    torch.save(LitSegmenter(in_channels=3, base_width=4).net.state_dict(), root / "state_dict.ckpt")

    class Evil:
        def __reduce__(self):
            return (open, (str(root / "pwned"), "w"))
    torch.save({"hyper_parameters": {"task": "segmentation"}, "state_dict": {}, "evil": Evil()}, root / "evil.ckpt")
    (root / "a_file").write_text("not a folder")
    # DICOM folders that cannot give a volume
    (root / "not_dicom").mkdir()
    for i in range(3):
        (root / "not_dicom" / f"file{i}").write_bytes(rng.bytes(600))
    for name in ("no_pixels", "single", "truncated_dcm", "missing_slice"):
        dicom_twin(root / name, phantoms["flipped"][0])
    no_pixels = pydicom.dcmread(root / "no_pixels" / "S1_IM0003.dcm")
    del no_pixels.PixelData
    no_pixels.save_as(root / "no_pixels" / "S1_IM0003.dcm", enforce_file_format=True)
    for extra in sorted((root / "single").iterdir())[1:]:
        extra.unlink()
    cut = root / "truncated_dcm" / "S1_IM0005.dcm"
    cut.write_bytes(cut.read_bytes()[:-2000])
    (root / "missing_slice" / "S1_IM0004.dcm").unlink()
    return {"root": root, **{p.name: p for p in root.iterdir()}}


def _bad_cases(phantoms, ckpts, bad):
    vol = phantoms["flipped"][0]
    seg, cls = ("predict_segmentation.py", ckpts["seg"]), ("predict_classification.py", ckpts["cls"])
    blocked = bad["a_file"] / "out"
    return {
        "missing input": (*seg, ["--input", bad["root"] / "nothere.nii"]),
        "corrupt nifti": (*seg, ["--input", bad["random.nii"]]),
        "truncated nifti": (*seg, ["--input", bad["truncated.nii"]]),
        "4D nifti": (*seg, ["--input", bad["four_d.nii"]]),
        "2D nifti": (*cls, ["--input", bad["two_d.nii"]]),
        "classification ckpt to segmentation": ("predict_segmentation.py", ckpts["cls"], ["--input", vol]),
        "segmentation ckpt to classification": ("predict_classification.py", ckpts["seg"], ["--input", vol]),
        "random bytes ckpt": ("predict_segmentation.py", bad["random.ckpt"], ["--input", vol]),
        "bare state dict": ("predict_segmentation.py", bad["state_dict.ckpt"], ["--input", vol]),
        "malicious pickle": ("predict_segmentation.py", bad["evil.ckpt"], ["--input", vol]),
        "slice out of range": (*seg, ["--input", vol, "--slice", "8"]),
        "output under a file": (*seg, ["--input", vol, "--output", blocked / "x.nii.gz"]),
        "folder of non-DICOM files": (*seg, ["--input", bad["not_dicom"]]),
        "DICOM without pixel data": (*seg, ["--input", bad["no_pixels"]]),
        "single-slice series": (*cls, ["--input", bad["single"]]),
        "truncated DICOM": (*seg, ["--input", bad["truncated_dcm"]]),
        "series with a missing slice": (*cls, ["--input", bad["missing_slice"]]),
        "SEG of a NIfTI input": (*seg, ["--input", vol, "--output", bad["root"] / "x.dcm"]),
    }


@pytest.fixture(scope="module")
def bad_runs(phantoms, ckpts, bad_files):
    """Every bad-input case as its own process (two at a time: each pays for importing torch)."""
    cases = _bad_cases(phantoms, ckpts, bad_files)
    watched = [bad_files["root"], phantoms["flipped"][0].parent]
    before = {p for d in watched for p in d.rglob("*")}

    def run(item):
        script, ckpt, argv = item
        cmd = [sys.executable, str(ROOT / script), "--checkpoint", str(ckpt), "--device", "cpu", *map(str, argv)]
        return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)

    with ThreadPoolExecutor(2) as pool:
        results = dict(zip(cases, pool.map(run, cases.values())))
    after = {p for d in watched for p in d.rglob("*")}
    return results, after - before


NAMED = {  # what the one line must name, beyond "expected"
    "folder of non-DICOM files": "3 other file(s)",
    "DICOM without pixel data": "S1_IM0003.dcm",
    "single-slice series": "single slice",
    "truncated DICOM": "S1_IM0005.dcm",
    "series with a missing slice": "missing slice",
    "SEG of a NIfTI input": "DICOM SEG needs a DICOM series",
}


@pytest.mark.parametrize("case", ["missing input", "corrupt nifti", "truncated nifti", "4D nifti", "2D nifti",
                                  "classification ckpt to segmentation", "segmentation ckpt to classification",
                                  "random bytes ckpt", "bare state dict", "malicious pickle", "slice out of range",
                                  "output under a file", "folder of non-DICOM files", "DICOM without pixel data",
                                  "single-slice series", "truncated DICOM", "series with a missing slice",
                                  "SEG of a NIfTI input"])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, bad_runs, bad_files):
    results, created = bad_runs
    proc = results[case]
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "expected" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert NAMED.get(case, "") in lines[0], proc.stderr
    assert not created, f"files left behind: {sorted(map(str, created))}"
    assert not (bad_files["root"] / "pwned").exists()


def test_more_bad_flags_in_process(phantoms, ckpts, slice_files, bad_files, tmp_path, capsys):
    vol = phantoms["flipped"][0]
    seg = ["--checkpoint", str(ckpts["seg"]), "--device", "cpu"]
    cls = ["--checkpoint", str(ckpts["cls"]), "--device", "cpu"]
    cases = [
        (ps, [*seg, "--input", str(vol), "--report", str(bad_files["a_file"] / "r.json")], "cannot create"),
        (ps, [*seg, "--input", str(vol), "--output", str(tmp_path / "x.png")], "expected .nii"),
        (ps, [*seg, "--input", str(slice_files["folder"]), "--slice", "1"], "needs one volume"),
        (ps, [*seg, "--input", str(slice_files["folder"]), "--output", str(bad_files["a_file"])], "cannot create"),
        (ps, [*seg, "--input", str(vol), "--ground-truth", str(tmp_path / "none.nii")], "ground truth not found"),
        (ps, ["--checkpoint", str(tmp_path / "none.ckpt"), "--input", str(vol)], "checkpoint not found"),
        (ps, [*seg, "--input", str(vol), "--batch-size", "0"], "expected 1 or more"),
        (ps, [*seg, "--input", str(vol), "--threads", "0"], "argument --threads: found 0; expected 1 or more"),
        (pc, [*cls, "--input", str(vol), "--threads", "0"], "argument --threads: found 0; expected 1 or more"),
        (pc, [*cls, "--input", str(vol), "--batch-size", "0"], "argument --batch-size: found 0; expected 1 or more"),
        (pc, [*cls, "--input", str(vol), "--heatmap", str(tmp_path / "maps"), "--heatmap-slices", "0"],
         "argument --heatmap-slices: found 0; expected 1 or more"),
        (pc, [*cls, "--input", str(vol), "--threshold", "nan"], "argument --threshold: found nan; expected a probability"),
        (pc, [*cls, "--input", str(vol), "--heatmap", str(bad_files["a_file"] / "maps")], "--heatmap lies under the file"),
        (ps, [*seg, "--input", str(vol), "--device", "tpu"], "argument --device: found 'tpu'; expected one of"),
        (ps, [*seg, "--input", str(vol), "--output", str(vol)], "the input itself"),
        (pc, [*cls, "--input", str(vol), "--output", str(tmp_path / "p.txt")], "expected .csv or .json"),
        (pc, [*cls, "--input", str(vol), "--slice", "-1"], "found --slice -1; expected 0..7"),
        (pc, [*cls, "--input", str(vol), "--threshold", "1.5"], "expected a probability"),
        (pc, [*cls, "--input", str(bad_files["random.ckpt"])], "expected a NIfTI volume"),
    ]
    if not torch.cuda.is_available():
        cases.append((pc, ["--checkpoint", str(ckpts["cls"]), "--input", str(vol), "--device", "cuda"], "no CUDA"))
    for module, argv, message in cases:
        assert volumes.run_cli(module.main, module.get_args_parser(), argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and "\n" not in err, (argv, err)
    assert not list(tmp_path.iterdir())


def test_classification_takes_the_shared_runtime_flags(phantoms, ckpts, monkeypatch):
    """--threads, as the other commands have it (inference.add_runtime_flags), sets torch's CPU threads."""
    asked: list[int] = []
    monkeypatch.setattr(torch, "set_num_threads", asked.append)
    volume, _ = phantoms["flipped"]
    argv = ["--checkpoint", str(ckpts["cls"]), "--input", str(volume), "--device", "cpu", "--threads", "1",
            "--batch-size", "4"]
    assert volumes.run_cli(pc.main, pc.get_args_parser(), argv) == 0
    assert asked == [1]
    flags = lambda parser: {o for a in parser._actions for o in a.option_strings}  # noqa: E731
    runtime = {"--device", "--batch-size", "--threads"}
    assert runtime <= flags(pc.get_args_parser()) and runtime <= flags(ps.get_args_parser())


def test_segmenting_a_slice_never_imports_lightning(slice_files, ckpts, tmp_path):
    """The overlay PNG's colours come from a library module, not lit_model: Lightning costs seconds
    of start-up a prediction need not pay."""
    png = shutil.copy(slice_files["png"], tmp_path / "s.png")
    code = ("import sys, predict_segmentation as ps, volumes\n"
            f"rc = volumes.run_cli(ps.main, ps.get_args_parser(), ['--checkpoint', {str(ckpts['seg'])!r}, "
            f"'--input', {str(png)!r}, '--device', 'cpu'])\n"
            "print(rc, sorted({m.split('.')[0] for m in sys.modules} & {'lightning', 'pytorch_lightning', "
            "'lightning_fabric', 'lit_model'}))")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().splitlines()[-1] == "0 []", res.stdout
    assert (tmp_path / "s_overlay.png").is_file()


# --------------------------------------------------------------------------------------------
# Scoring against ground truth (evaluate.py)
# --------------------------------------------------------------------------------------------

def test_ground_truth_scoring_with_the_oracle_is_perfect(phantoms, ckpts, tmp_path, monkeypatch):
    import evaluate  # a failure to import it is a failure, not a skip
    volume, segmentation = phantoms["ras"]
    truth_slices, _ = volumes.load_label_volume(segmentation)
    use_oracle(monkeypatch, Oracle(unit_slices(volume, 48), torch.from_numpy(truth_slices)))
    result = ps.main(seg_args("--checkpoint", ckpts["seg48"], "--input", volume, "--output", tmp_path / "p.nii.gz",
                              "--ground-truth", segmentation, "--no-postprocess", "--device", "cpu",
                              "--report", tmp_path / "r.json", "--exact"))
    metrics = result["cases"][0]["metrics"]
    assert metrics["dice_liver"] == pytest.approx(1.0) and metrics["dice_tumor"] == pytest.approx(1.0)
    assert metrics["voe_liver"] == pytest.approx(0.0) and metrics["assd_liver"] == pytest.approx(0.0)
    # Every lesion found once: TP = the lesions scipy finds in the file (face-connected, its default).
    num_lesions = ndimage.label(np.asarray(nib.load(segmentation).dataobj) == 2)[1]
    assert num_lesions >= 1
    assert (metrics["lesions_tp"], metrics["lesions_fp"], metrics["lesions_fn"]) == (num_lesions, 0, 0)
    assert json.loads((tmp_path / "r.json").read_text())["cases"][0]["metrics"] == metrics
    assert evaluate.json_safe(evaluate.score_case(*evaluate.load_pair(tmp_path / "p.nii.gz", segmentation)).row) \
        == metrics


def test_ground_truth_scores_as_evaluate_scores_the_written_file(phantoms, ckpts, tmp_path, monkeypatch):
    """A flipped phantom (its slices order is not the file's) and an imperfect answer with several
    lesions: the scorer's lesion counts depend on the voxel order, so --ground-truth must print what
    evaluate.py prints for the file it wrote, number for number."""
    import evaluate
    volume, segmentation = phantoms["flipped"]
    truth_slices, _ = volumes.load_label_volume(segmentation)
    answer = truth_slices.copy()
    rng = np.random.default_rng(0)
    answer[(rng.random(answer.shape) < 0.05) & (truth_slices == 1)] = 2  # specks of false tumour
    answer[ndimage.binary_dilation(truth_slices == 2, iterations=2) & (truth_slices >= 1)] = 2  # lesions grown
    use_oracle(monkeypatch, Oracle(unit_slices(volume, 48), torch.from_numpy(answer)))
    pred_dir, gt_dir = tmp_path / "pred", tmp_path / "gt"
    gt_dir.mkdir()
    shutil.copy(segmentation, gt_dir / segmentation.name)
    result = ps.main(seg_args("--checkpoint", ckpts["seg48"], "--input", volume, "--output",
                              pred_dir / "prediction-0.nii.gz", "--ground-truth", segmentation, "--no-postprocess",
                              "--device", "cpu", "--exact"))
    metrics = result["cases"][0]["metrics"]
    rows, _ = evaluate.evaluate_folders(pred_dir, gt_dir)
    assert metrics == evaluate.json_safe({k: v for k, v in rows[0].items() if k != "case"})
    # The scorer's counts, re-done independently (tests/test_evaluate.py) on the files as stored; in the
    # slices' order they differ for this answer, which is why the order matters.
    from tests.test_evaluate import scorer_procedure
    pred_file = np.asarray(nib.load(pred_dir / "prediction-0.nii.gz").dataobj)
    truth_file = np.asarray(nib.load(segmentation).dataobj)
    counts = scorer_procedure(pred_file, truth_file, 0.5)
    assert (metrics["lesions_tp"], metrics["lesions_fp"], metrics["lesions_fn"]) == counts
    assert scorer_procedure(answer, truth_slices, 0.5) != counts


def test_mirrored_affine_ground_truth_is_refused_by_both_commands_alike(phantoms, ckpts, tmp_path, capsys):
    """A ground truth whose affine says its x axis runs the other way (its voxels as they were): the
    same shape, another voxel grid. Both commands refuse it with one line, exit 2, the same message."""
    import evaluate
    volume, segmentation = phantoms["ras"]
    img = nib.load(segmentation)
    mirrored = img.affine.copy()
    mirrored[:3, 3] += mirrored[:3, 0] * (img.shape[0] - 1)
    mirrored[:3, 0] *= -1
    gt_dir, pred_dir, out = tmp_path / "gt", tmp_path / "pred", tmp_path / "out"
    for d in (gt_dir, pred_dir, out):
        d.mkdir()
    truth = gt_dir / "segmentation-1.nii"
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), mirrored), str(truth))
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), img.affine), str(pred_dir / "prediction-1.nii"))

    rc_predict = volumes.run_cli(ps.main, ps.get_args_parser(), [
        "--checkpoint", str(ckpts["seg"]), "--input", str(volume), "--output", str(out / "p.nii.gz"),
        "--ground-truth", str(truth), "--device", "cpu"])
    err_predict = capsys.readouterr().err.strip()
    rc_evaluate = volumes.run_cli(evaluate.main, evaluate.get_args_parser(), [
        "--pred", str(pred_dir), "--gt", str(gt_dir), "--output", str(out / "m.csv")])
    err_evaluate = capsys.readouterr().err.strip()
    assert rc_predict == rc_evaluate == 2
    dx = float(np.abs(img.affine[0, 0]))
    # |entry differences|: the x column's 2 dx, the origin's (shape - 1) dx.
    largest = max(2 * dx, (img.shape[0] - 1) * dx)
    for err, other in ((err_predict, volume.name), (err_evaluate, "prediction-1.nii")):
        errors = [ln for ln in err.splitlines() if ln.startswith("error:")]  # evaluate's progress bar aside
        assert "Traceback" not in err
        assert errors == [f"error: {truth}: affine differs from {other}'s by up to {largest:.4g} mm (orientation "
                          f"LAS vs RAS); expected its voxel grid to within 0.001 mm (nothing is resampled or "
                          f"reoriented)"], err
    assert list(out.iterdir()) == []  # nothing written


def test_volume_verdict_is_the_checkpoints_volume_threshold_on_every_slice(phantoms, ckpts, tmp_path, monkeypatch,
                                                                          capsys):
    """One slice of the volume tumorous for the oracle (probability sigmoid(5)), the others not
    (sigmoid(-5)): the volume's score is (sigmoid(5) + 2 sigmoid(-5)) / 3 = 0.3356. The checkpoint's
    slice threshold is 0.5 and its volume threshold 0.3 (chosen on 4 validation volumes, 2 with tumour,
    sensitivity 1, specificity 0.5): tumour, and the line says what the threshold gave on validation.
    At a volume threshold of 0.4, healthy. A checkpoint from before volume thresholds: no verdict."""
    from lit_model import LitClassifier
    volume, _ = phantoms["flipped"]
    unit = unit_slices(volume, 32)
    answers = torch.zeros(len(unit), dtype=torch.bool)
    answers[len(unit) // 2] = True
    use_oracle(monkeypatch, Oracle(unit, answers))
    score = (torch.sigmoid(torch.tensor(5.0)) + 2 * torch.sigmoid(torch.tensor(-5.0))).item() / 3

    def checkpoint(name, point):
        model = LitClassifier(in_channels=3, hidden=16, image_size=32)
        if point is not None:
            model.volume_operating_point.copy_(torch.tensor(point, dtype=torch.float64))
        path = save_checkpoint(model, tmp_path / name)
        if point is None:  # as written before volume thresholds
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
            del ckpt["state_dict"]["volume_operating_point"], ckpt["hyper_parameters"]["volume_threshold"]
            del ckpt["hyper_parameters"]["volume_validation"]
            torch.save(ckpt, path)
        return path

    result = pc.main(cls_args("--checkpoint", checkpoint("v03.ckpt", [0.3, 1.0, 0.5, 4, 2]), "--input", volume,
                              "--device", "cpu", "--output", tmp_path / "v.json"))
    (vol,) = result["volumes"]
    assert result["threshold"] == 0.5 and result["volume_threshold"] == pytest.approx(0.3)
    assert vol["probability"] == pytest.approx(score, abs=1e-5) and vol["prediction"] == "tumor"
    assert "chosen on 4 validation volumes (2 with tumour): sensitivity 1.00, specificity 0.50" in capsys.readouterr().out
    saved = json.loads((tmp_path / "v.json").read_text())
    assert saved["volume_threshold"] == pytest.approx(0.3) and saved["volumes"][0]["prediction"] == "tumor"
    assert saved["volume_validation"] == {"sensitivity": 1.0, "specificity": 0.5, "volumes": 4.0, "tumour_volumes": 2.0}
    higher = pc.main(cls_args("--checkpoint", checkpoint("v04.ckpt", [0.4, 1.0, 0.5, 4, 2]), "--input", volume,
                              "--device", "cpu"))
    assert higher["volumes"][0]["prediction"] == "healthy"
    old = pc.main(cls_args("--checkpoint", checkpoint("old.ckpt", None), "--input", volume, "--device", "cpu"))
    assert old["volume_threshold"] is None and old["volumes"][0]["prediction"] is None
    assert old["volumes"][0]["probability"] == pytest.approx(score, abs=1e-5)
    assert "no verdict" in old["verdicts"][0] and "records none" in old["verdicts"][0]
    mine = pc.main(cls_args("--checkpoint", tmp_path / "old.ckpt", "--input", volume, "--device", "cpu",
                            "--volume-threshold", "0.3"))
    assert mine["volumes"][0]["prediction"] == "tumor" and mine["volume_validation"] is None


def test_classification_volume_verdict_and_evidence_heatmaps(phantoms, tmp_path):
    from lit_model import LitClassifier
    torch.manual_seed(0)
    model = LitClassifier(in_channels=3, image_size=32, context_slices=1)  # the evidence head
    model.operating_threshold.fill_(0.02)  # below every untrained probability: tumour slices ...
    model.volume_operating_point[0] = 0.02  # ... and a tumour verdict
    ckpt = save_checkpoint(model, tmp_path / "evidence.ckpt")
    volume, _ = phantoms["ras"]
    maps = tmp_path / "maps"
    result = pc.main(cls_args("--checkpoint", ckpt, "--input", volume, "--device", "cpu", "--heatmap", maps,
                              "--heatmap-slices", 2))
    assert result["threshold"] == pytest.approx(0.02)
    (vol,) = result["volumes"]
    assert vol["prediction"] == "tumor" and vol["tumor_slices"] == vol["slices"] == 8
    pngs = sorted(maps.iterdir())
    top2 = sorted(result["rows"], key=lambda r: -r["probability"])[:2]
    assert [p.name for p in pngs] == sorted(f"volume-1_slice{r['slice']}_evidence.png" for r in top2)
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    with pytest.raises(volumes.DataError, match="evidence head"):  # the classic head has no map to draw
        pc.main(cls_args("--checkpoint", save_checkpoint(LitClassifier(in_channels=3, hidden=16, image_size=32,
                                                                       head="fc"), tmp_path / "fc.ckpt"),
                         "--input", volume, "--device", "cpu", "--heatmap", maps))


# --------------------------------------------------------------------------------------------
# Test-time augmentation
# --------------------------------------------------------------------------------------------

class _LeftHalfIsLiver(nn.Module):
    """Answers liver on the image's left half and background on its right, whatever the input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        logits = torch.full((b, 3, h, w), -30.0)
        logits[:, 0, :, w // 2:] = 30.0
        logits[:, 1, :, :w // 2] = 30.0
        return logits


def test_flip_tta_averages_the_mirrored_answers_by_hand():
    from inference import FlipTTA
    out = FlipTTA(_LeftHalfIsLiver())(torch.rand(2, 3, 8, 8)).exp()  # (2, 3, 8, 8) probabilities
    # Left half: as-is says liver, left-right mirror (mirrored back) says background, top-bottom says liver.
    torch.testing.assert_close(out[:, 1, :, :4], torch.full((2, 8, 4), 2 / 3))
    torch.testing.assert_close(out[:, 0, :, 4:], torch.full((2, 8, 4), 2 / 3))
    torch.testing.assert_close(out.sum(1), torch.ones(2, 8, 8))


def test_tta_flag_writes_labels_on_the_input_grid(phantoms, ckpts, tmp_path):
    volume, _ = phantoms["flipped"]
    out = tmp_path / "tta.nii.gz"
    ps.main(seg_args("--checkpoint", ckpts["seg"], "--input", volume, "--output", out, "--device", "cpu", "--tta"))
    written, source = nib.load(str(out)), nib.load(str(volume))
    assert written.shape == source.shape and np.allclose(written.affine, source.affine)
    assert set(np.unique(np.asarray(written.dataobj)).tolist()) <= {0, 1, 2}


def test_printout_lists_the_ten_largest_lesions_and_sums_the_rest(capsys):
    lesion = {"short_axis_mm": 1.0, "slice": 3, "first_slice": 3, "last_slice": 3}
    found = [dict(lesion, id=i, volume_ml=10.0 / i, long_axis_mm=20.0 / i, measurable=20.0 / i >= 10) for i in range(1, 14)]
    ps.print_report({"input": "ct.nii", "output": "ct_seg.nii.gz", "kind": "volume", "slice": None,
                     "liver_volume_ml": 1500.0, "tumor_volume_ml": sum(d["volume_ml"] for d in found),
                     "tumor_burden_percent": 1.0, "num_lesions": 13, "lesions": found,
                     "recist_target_lesions": [1, 2], "recist_sum_long_axes_mm": 30.0})
    out = capsys.readouterr().out.splitlines()
    printed = [line for line in out if line.startswith("    lesion ")]
    assert [line.split(":")[0].split()[-1] for line in printed] == [str(i) for i in range(1, 11)]
    assert printed[0].endswith("RECIST target") and printed[1].endswith("RECIST target") and printed[2].endswith(")")
    rest = 10 / 11 + 10 / 12 + 10 / 13  # lesions 11-13
    assert f"... and 3 smaller lesion(s), {rest:.2f} mL together" in out[-2]
    assert out[-1] == "  RECIST 1.1 target lesions: 1, 2 (sum of long axes 30.0 mm)"


def test_split_file_segments_only_the_chosen_part(phantoms, ckpts, tmp_path, capsys):
    vols = tmp_path / "vols"
    vols.mkdir()
    for kind in ("flipped", "ras"):  # volume-0 and volume-1
        shutil.copy(phantoms[kind][0], vols / phantoms[kind][0].name)
    split = tmp_path / "splits.json"
    split.write_text(json.dumps({"train": ["volume-0"], "val": [], "test": ["volume-1", "volume-5"], "seed": 0}))
    result = ps.main(seg_args("--checkpoint", ckpts["seg"], "--input", vols, "--output", tmp_path / "out",
                              "--device", "cpu", "--split-file", split, "--split", "test"))
    assert [Path(c["input"]).name for c in result["cases"]] == ["volume-1.nii"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["volume-1_seg.nii.gz"]
    err = capsys.readouterr().err
    assert "1 of the 2 test case(s)" in err and "not here: volume-5" in err
    ps.main(seg_args("--checkpoint", ckpts["seg"], "--input", vols, "--output", tmp_path / "tr",
                     "--device", "cpu", "--split-file", split, "--split", "train"))
    assert sorted(p.name for p in (tmp_path / "tr").iterdir()) == ["volume-0_seg.nii.gz"]
    # Slices belong to the case named by the stem before their last underscore.
    item = (Path("liver_3_0007.png"), "image")
    args = seg_args("--checkpoint", "c", "--input", "x", "--split-file", split)
    split.write_text(json.dumps({"train": [], "val": [], "test": ["liver_3"]}))
    assert ps.select_split([item, (Path("liver_4_0001.png"), "image")], args) == [item]


def test_split_file_that_selects_nothing_is_refused(phantoms, ckpts, tmp_path):
    split = tmp_path / "splits.json"
    split.write_text(json.dumps({"train": ["volume-0"], "val": [], "test": ["volume-9"]}))
    out = tmp_path / "out"
    for argv, message in ((["--split-file", split], r"found none of the 1 test case\(s\)"),
                          (["--split", "val"], "without --split-file"),
                          (["--split-file", split, "--split", "val"], "found no val cases")):
        with pytest.raises(volumes.DataError, match=message):
            ps.main(seg_args("--checkpoint", ckpts["seg"], "--input", phantoms["ras"][0], "--output", out,
                             "--device", "cpu", *argv))
    assert not out.exists()


def _eval_classifier_module():
    return load_script(ROOT / "benchmarks" / "eval_classifier.py")


def test_eval_classifier_auroc_by_lesion_size_by_hand():
    """Each tumour slice falls in the size class of the largest lesion it shows (a lesion's largest
    axial diameter: centre to centre of its farthest voxels in one slice), and each class is ranked
    against every healthy slice: a row of 5 voxels at 1 mm is 4 mm (< 10 mm), a row of 26 is 25 mm."""
    ec = _eval_classifier_module()
    labels = np.ones((5, 40, 40), dtype=np.uint8)
    labels[0:2, 5, 2:7] = 2      # one small lesion over slices 0 and 1
    labels[2, 20, 2:28] = 2      # a large one on slice 2 ...
    labels[2, 30, 2:7] = 2       # ... beside another small one: the slice counts as large
    classes = ec.slice_size_classes(labels, (2.0, 1.0, 1.0))
    assert classes == ["lt10mm", "lt10mm", "gt20mm", None, None]
    prob = torch.tensor([0.2, 0.6, 0.9, 0.5, 0.1], dtype=torch.float64)
    target = torch.tensor([1, 1, 1, 0, 0])
    by_size = ec.auroc_by_size(prob, target, classes)
    assert by_size["gt20mm"] == {"slices": 1, "auroc": 1.0}
    # small slices 0.2 and 0.6 against healthy 0.5 and 0.1: 3 of 4 pairs ranked right
    assert by_size["lt10mm"] == {"slices": 2, "auroc": pytest.approx(0.75)}
    assert by_size["10to20mm"]["slices"] == 0 and math.isnan(by_size["10to20mm"]["auroc"])


def test_eval_classifier_benchmark_scores_the_verdict_predict_gives(tmp_path):
    """benchmarks/eval_classifier.py scores each volume and decides it exactly as
    predict_classification.py does (every slice, the checkpoint's volume threshold): with the threshold
    set between two phantoms' scores, one verdict each way, the same in both."""
    from lit_model import LitClassifier
    eval_classifier = _eval_classifier_module()
    phantom.write_synthetic_lits(tmp_path / "d", cases=2, size=32, seed=1)
    torch.manual_seed(0)
    model = LitClassifier(in_channels=3, hidden=16, image_size=32)
    first = save_checkpoint(model, tmp_path / "first.ckpt")
    inputs = sorted((tmp_path / "d").glob("volume-*"))
    scores = [pc.main(cls_args("--checkpoint", first, "--input", v, "--device", "cpu", "--exact"))["volumes"][0]
              ["probability"] for v in inputs]
    assert scores[0] != scores[1]
    model.volume_operating_point.copy_(torch.tensor([sum(scores) / 2, 1.0, 1.0, 2, 1], dtype=torch.float64))
    ckpt = save_checkpoint(model, tmp_path / "between.ckpt")
    predicted = [pc.main(cls_args("--checkpoint", ckpt, "--input", v, "--device", "cpu", "--exact"))["volumes"][0]
                 for v in inputs]
    predicted = {v["case"]: v for v in predicted}
    result = eval_classifier.main(["--checkpoint", str(ckpt), "--data-dir", str(tmp_path / "d"), "--device", "cpu",
                                   "--exact"])
    assert result["volume_threshold"] == pytest.approx(sum(scores) / 2)
    for v in result["per_volume"]:
        assert v["score"] == pytest.approx(predicted[v["case"]]["probability"], abs=1e-6)
        assert ("tumor" if v["verdict"] else "healthy") == predicted[v["case"]]["prediction"]
    assert sorted(v["verdict"] for v in result["per_volume"]) == [0, 1]
    assert set(result["slice_auroc_by_size"]) == {"lt10mm", "10to20mm", "gt20mm"}
