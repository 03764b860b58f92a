"""train.py end to end on tiny phantoms written as real NIfTI files: fast_dev_run, learning, resume,
reproducibility, DDP on two CPU processes, the PNG graphs and bad input."""
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import pytorch_lightning as pl
import torch

import phantom
import train
import volumes
from lit_model import LitClassifier, LitSegmenter, RegionDice
from tests.helpers import assert_one_line_naming, load_script, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_lits")
    for i in range(6):
        phantom.write_phantom_case(root, i, size=48, seed=3, num_slices=12, num_tumors=2 if i % 3 else 0)
    return root


def run_args(data, out, task, *extra):
    argv = ["--task", task, "--data-dir", str(data), "--output-dir", str(out), "--cache-dir", str(out.parent / "cache"),
            "--graphs-dir", str(out / "graphs"), "--image-size", "32", "--base-width", "4", "--vgg-hidden", "16",
            "--batch-size", "8", "--num-workers", "0", "--accelerator", "cpu", *extra]
    return train.get_args_parser().parse_args(argv)


@pytest.mark.parametrize("task", ["segmentation", "classification"])
def test_fast_dev_run_each_task(tiny_data, tmp_path, task):
    summary = train.main(run_args(tiny_data, tmp_path / "run", task, "--fast-dev-run"))
    assert summary["task"] == task
    assert "test/loss" in summary["test"]
    split = json.loads((tmp_path / "run" / "splits.json").read_text())
    parts = [set(split[k]) for k in ("train", "val", "test")]
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    assert set().union(*parts) == {f"volume-{i}" for i in range(6)}


def _epoch_losses(summary: dict) -> list[float]:
    scalars = train.read_scalars(Path(summary["tensorboard"]))
    return [v for _, v in scalars["train/loss_epoch"]]


class RecordingSegmenter(LitSegmenter):
    """LitSegmenter that records each test batch's predicted labels, reference and case index as its
    per-case Dice receives them, so a test can score them itself."""

    recorded: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    def on_test_epoch_start(self):
        super().on_test_epoch_start()
        update = self.case_dice.update

        def record(pred, target, groups):
            RecordingSegmenter.recorded.append((pred.cpu().numpy(), target.cpu().numpy(), groups.cpu().numpy()))
            return update(pred, target, groups)
        self.case_dice.update = record


def dice_by_hand(recorded) -> dict[str, float]:
    """The test metrics from the recorded labels with numpy: per region the split's pooled Dice (NaN
    without reference anywhere) and the mean over cases of each case's Dice (both empty: 1; NaN when
    no case has the region)."""
    pred = np.concatenate([p for p, _, _ in recorded])
    target = np.concatenate([t for _, t, _ in recorded])
    case = np.concatenate([c for _, _, c in recorded])
    out = {}
    for name, region in (("liver", lambda a: a >= 1), ("tumor", lambda a: a == 2)):
        p, g = region(pred), region(target)
        out[f"test/dice_{name}"] = 2 * np.sum(p & g) / (np.sum(p) + np.sum(g)) if g.any() else float("nan")
        per_case = []
        for c in np.unique(case):
            pc, gc = p[case == c], g[case == c]
            total = np.sum(pc) + np.sum(gc)
            per_case.append(2 * np.sum(pc & gc) / total if total else 1.0)
        out[f"test/dice_{name}_per_case"] = float(np.mean(per_case)) if g.any() else float("nan")
    return out


def assert_matches(got: dict, expected: dict) -> None:
    for key, want in expected.items():
        assert (np.isnan(got[key]) and np.isnan(want)) or got[key] == pytest.approx(want, rel=1e-5, abs=1e-6), \
            (key, got[key], want)


def test_segmentation_learns_and_writes_graphs_and_checkpoints(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setattr(train, "LitSegmenter", RecordingSegmenter)
    RecordingSegmenter.recorded.clear()
    out = tmp_path / "run"
    summary = train.main(run_args(tiny_data, out, "segmentation", "--max-epochs", "4", "--lr", "3e-3"))
    losses = _epoch_losses(summary)
    assert len(losses) == 4
    assert losses[-1] < losses[0] * 0.9, losses
    assert (out / "checkpoints" / "best.ckpt").is_file() and (out / "checkpoints" / "last.ckpt").is_file()
    for name in ("test_examples", "val_dice", "train_dice_epoch", "val_loss", "train_loss_epoch"):
        png = out / "graphs" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    expected = dice_by_hand(RecordingSegmenter.recorded)
    assert np.sum(np.concatenate([t for _, t, _ in RecordingSegmenter.recorded]) == 2) > 0  # tumour in the test
    assert_matches(summary["test"], expected)
    assert set(summary["test_per_case_dice"]) == set(summary["split"]["test"])
    saved = json.loads((out / "test_metrics.json").read_text())
    assert saved["test"] == pytest.approx(summary["test"])
    flags = saved["flags"]  # the recipe, as resolved: given flags, the task's defaults, paths as text
    assert flags["lr"] == 3e-3 and flags["max_epochs"] == 4 and flags["data_dir"] == [str(tiny_data)]
    assert flags["rotation"] == 10.0 and flags["scale"] == [0.9, 1.1] and flags["patch_size"] == 0
    assert flags["output_dir"] == str(out) and flags["task"] == "segmentation"


class RecordingClassifier(LitClassifier):
    """LitClassifier that records each test batch's slice probabilities, targets and case indices as
    its test metrics receive them (`recorded`), and those of the test volumes' slices the loader does
    not serve, which only the volume scores see (`rest`)."""

    recorded: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    rest: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for metric, into in ((self.test_preds, RecordingClassifier.recorded),
                             (self.test_rest, RecordingClassifier.rest)):
            def record(prob, target, case=None, update=metric.update, into=into):
                into.append((prob.detach().cpu().double().numpy(), target.cpu().numpy(), case.cpu().numpy()))
                return update(prob, target, case)
            metric.update = record


def auroc_by_pairs(scores: np.ndarray, target: np.ndarray) -> float:
    """Probability that a positive outscores a negative (ties count half), every pair compared."""
    pos, neg = scores[target == 1], scores[target == 0]
    return float(np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg]))


def classification_by_hand(recorded, rest, threshold: float) -> dict[str, float]:
    """The slice metrics from the served slices (`recorded`); each volume's score (the mean of its
    VOLUME_TOP_K highest probabilities) over every slice of it, served or not (`recorded` + `rest`)."""
    from inference import VOLUME_TOP_K
    prob, target, case = (np.concatenate([r[i] for r in recorded]) for i in range(3))
    pred = prob >= threshold
    tp, fn = np.sum(pred & (target == 1)), np.sum(~pred & (target == 1))
    tn, fp = np.sum(~pred & (target == 0)), np.sum(pred & (target == 0))
    sens, spec = tp / (tp + fn), tn / (tn + fp)
    all_prob, all_target, all_case = (np.concatenate([r[i] for r in recorded + rest]) for i in range(3))
    volumes_ = np.unique(all_case)
    vol_score = np.array([np.mean(np.sort(all_prob[all_case == c])[::-1][:VOLUME_TOP_K]) for c in volumes_])
    vol_target = np.array([all_target[all_case == c].max() for c in volumes_])
    return {"test/acc": (tp + tn) / len(target), "test/sensitivity": sens, "test/specificity": spec,
            "test/balanced_acc": (sens + spec) / 2, "test/f1": 2 * tp / (2 * tp + fp + fn),
            "test/auroc": auroc_by_pairs(prob, target), "test/auroc_volume": auroc_by_pairs(vol_score, vol_target)}


def test_classification_graphs_and_metrics(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setattr(train, "LitClassifier", RecordingClassifier)
    RecordingClassifier.recorded.clear()
    RecordingClassifier.rest.clear()
    out = tmp_path / "run"
    # A third of the patients for the test: a tumour-free one and one with tumours, so both classes.
    summary = train.main(run_args(tiny_data, out, "classification", "--max-epochs", "2", "--test-fraction", "0.34"))
    for name in ("train_loss_epoch", "train_accuracy_epoch", "train_loss_step", "train_accuracy_step", "val_loss",
                 "val_accuracy", "roc_curve", "confusion_matrix"):
        assert (out / "graphs" / f"{name}.png").is_file(), name
    threshold = summary["test"]["test/threshold"]  # chosen on validation
    assert 0.0 <= threshold <= 1.0
    assert_matches(summary["test"], classification_by_hand(RecordingClassifier.recorded, RecordingClassifier.rest,
                                                          threshold))
    # The test ran at the threshold chosen on validation, which best.ckpt records for prediction.
    ckpt = torch.load(summary["checkpoint"], map_location="cpu", weights_only=True)
    assert ckpt["hyper_parameters"]["threshold"] == pytest.approx(summary["test"]["test/threshold"])
    # So the volume threshold, chosen on the validation volumes' scores over every slice; with the
    # volumes of one class only (here a single validation patient) none can be, and none is recorded.
    hp = ckpt["hyper_parameters"]
    assert "volume_threshold" in hp and "volume_validation" in hp
    recorded = float("nan") if hp["volume_threshold"] is None else hp["volume_threshold"]
    assert summary["test"]["test/threshold_volume"] == pytest.approx(recorded, nan_ok=True)
    assert {"test/sensitivity_volume", "test/specificity_volume"} <= set(summary["test"])


def test_augmentation_strength_defaults_by_task_and_flags_override_it():
    def resolved(*argv):
        args = train.resolve_args(train.get_args_parser().parse_args(list(argv)))
        return args.rotation, tuple(args.scale), args.paste_tumor, args.appearance
    assert resolved("--task", "classification") == resolved("--task", "classification", "--demo") == \
        (20.0, (0.8, 1.2), 0.5, 0.0)
    assert resolved("--task", "segmentation") == resolved("--task", "segmentation", "--demo") == \
        (10.0, (0.9, 1.1), 0.0, 0.0)
    assert resolved("--task", "classification", "--rotation", "5", "--scale", "1", "1.5", "--paste-tumor", "0",
                    "--appearance", "0.3") == (5.0, (1.0, 1.5), 0.0, 0.3)


def test_batch_size_defaults_by_task_and_demo():
    """Segmentation takes 8 slices a step (16 in the demo), classification 16; --batch-size overrides."""
    def resolved(*argv):
        return train.resolve_args(train.get_args_parser().parse_args(list(argv))).batch_size
    assert resolved("--task", "segmentation") == 8
    assert resolved("--task", "segmentation", "--demo") == resolved("--task", "classification") == 16
    assert resolved("--task", "classification", "--demo") == 16
    assert resolved("--task", "segmentation", "--batch-size", "4") == 4


def test_vgg_width_is_the_papers_but_in_the_demo_and_the_papers_with_imagenet_weights():
    """The VGG16 is the paper's by default; the CPU-sized demo takes half its widths (a quarter of the
    arithmetic); --pretrained keeps the paper's in the demo too (the only width its weights fit), and
    the flag overrides."""
    def resolved(*argv):
        return train.resolve_args(train.get_args_parser().parse_args(["--task", "classification", *argv])).vgg_width
    assert resolved() == 1.0 and resolved("--demo") == 0.5 and resolved("--demo", "--pretrained") == 1.0
    assert resolved("--vgg-width", "0.25") == 0.25 and resolved("--demo", "--vgg-width", "1") == 1.0


def test_the_demo_trains_for_its_time_budget_unless_epochs_are_given():
    """--demo: 3 min 30 s of training (210 s), no epoch limit, the schedule spanning the time; an explicit
    --max-epochs or --max-time takes over; outside the demo neither is set."""
    def resolved(*argv):
        args = train.resolve_args(train.get_args_parser().parse_args(["--task", "segmentation", *argv]))
        return args.max_time, args.max_epochs, args.time_budget_s
    assert resolved("--demo") == ("00:00:03:30", -1, 210.0)
    assert resolved("--demo", "--max-epochs", "5") == (None, 5, None)
    assert resolved("--demo", "--max-time", "00:00:01:00") == ("00:00:01:00", -1, 60.0)
    assert resolved() == (None, 40, None)


@pytest.fixture(scope="module")
def small_ckpts(tmp_path_factory):
    """Checkpoints of untrained networks as train.py's flags below would build them (--base-width 4,
    --context-slices 1, --image-size 32, --vgg-hidden 16), to resume from."""
    root = tmp_path_factory.mktemp("resume")
    return {"seg": save_checkpoint(LitSegmenter(in_channels=3, base_width=4, image_size=32, context_slices=1),
                                   root / "seg.ckpt")}


# Each: the flags, and what the one line must name. All are refused before anything is written.
BAD_FLAGS = {
    "window reversed": (["--window", "250", "-200"], "--window", "250 -200"),
    "val fraction above 1": (["--val-fraction", "1.5"], "--val-fraction", "1.5"),
    "batch size 0": (["--batch-size", "0"], "--batch-size", "0"),
    "image size 16": (["--image-size", "16"], "--image-size", "16"),
    "lr 0": (["--lr", "0"], "--lr", "0"),
    "lr nan": (["--lr", "nan"], "--lr", "nan"),
    "workers -1": (["--num-workers", "-1"], "--num-workers", "-1"),
    "paste probability 1.5": (["--paste-tumor", "1.5"], "--paste-tumor", "1.5"),
    "oversample share 1": (["--oversample-tumor", "1.0"], "--oversample-tumor", "1.0"),
    "scale reversed": (["--scale", "1.2", "0.8"], "--scale", "1.2 0.8"),
    "fractions leave no training patients": (["--val-fraction", "0.5", "--test-fraction", "0.5"],
                                             "--test-fraction", "0.5"),
    "precision misspelt": (["--precision", "bf17"], "--precision", "bf17"),
    "devices 0": (["--devices", "0"], "--devices", "0"),
    "max time nonsense with max epochs": (["--max-epochs", "2", "--max-time", "soon"], "--max-time", "soon"),
    "split file missing": (["--split-file", "nothere.json"], "--split-file", "nothere.json"),
    "output dir under a file": (["--output-dir", "a_file/run"], "--output-dir", "a_file"),
    "pretrained for segmentation": (["--pretrained"], "--pretrained", "segmentation"),
    "liver gate for segmentation": (["--liver-gate"], "--liver-gate", "segmentation"),
    "vgg width 0": (["--vgg-width", "0"], "--vgg-width", "0"),
    "patch larger than the slice": (["--image-size", "64", "--patch-size", "96"], "--patch-size 96", "--image-size 64"),
    "foreground share 2": (["--foreground-patches", "2"], "--foreground-patches", "2"),
    "vgg width 1.5": (["--vgg-width", "1.5"], "--vgg-width", "1.5"),
    "resume of another base width": (["--base-width", "8", "--resume", "{seg}"], "--base-width 4", "--base-width 8"),
    "resume of other context slices": (["--base-width", "4", "--context-slices", "2", "--resume", "{seg}"],
                                       "--context-slices 1", "--context-slices 2"),
    "resume of another image size": (["--base-width", "4", "--image-size", "64", "--resume", "{seg}"],
                                     "--image-size 32", "--image-size 64"),
}
if not torch.cuda.is_available():
    BAD_FLAGS["gpu without one"] = (["--accelerator", "gpu"], "--accelerator gpu", "no CUDA")


@pytest.mark.parametrize("case", sorted(BAD_FLAGS))
def test_bad_flags_are_one_line_exit_2_and_write_nothing(case, small_ckpts, tmp_path, monkeypatch, capsys):
    """No --data-dir: the demo would write its phantoms into the working folder, and the run its
    cache, run folder and graphs there too; the working folder must stay as it was."""
    argv, *named = BAD_FLAGS[case]
    work = tmp_path / "work"
    work.mkdir()
    (work / "a_file").write_text("x")
    monkeypatch.chdir(work)
    argv = [a.format(seg=small_ckpts["seg"]) for a in argv]
    rc = volumes.run_cli(train.main, train.get_args_parser(), ["--task", "segmentation", *argv])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "expected" in lines[0], err
    for name in named:
        assert name in lines[0], (name, lines[0])
    assert sorted(p.name for p in work.rglob("*")) == ["a_file"]


def test_pretrained_without_the_weights_is_one_line_before_anything_is_written(tmp_path, monkeypatch, capsys):
    """Offline and nothing in the torch hub cache: --pretrained stops the run at once."""
    def offline(url, dst, *args, **kwargs):
        raise OSError("[Errno 101] Network is unreachable")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    rc = volumes.run_cli(train.main, train.get_args_parser(), ["--task", "classification", "--pretrained"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and err.startswith("error: ") and "ImageNet weights" in err, err
    assert "Network is unreachable" in err and "expected" in err
    assert not list(work.iterdir())
    rc = volumes.run_cli(train.main, train.get_args_parser(),
                         ["--task", "classification", "--pretrained", "--head", "fc", "--vgg-hidden", "512"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "--vgg-hidden 512" in err and "4096" in err and not list(work.iterdir())
    rc = volumes.run_cli(train.main, train.get_args_parser(),
                         ["--task", "classification", "--pretrained", "--vgg-width", "0.5"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and "--vgg-width 0.5" in err and "1.0" in err and not list(work.iterdir())


def test_liver_gate_with_the_fc_head_is_one_line_before_anything_is_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    rc = volumes.run_cli(train.main, train.get_args_parser(),
                         ["--task", "classification", "--head", "fc", "--liver-gate"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and "--liver-gate" in err and "--head evidence" in err, err
    assert not list(tmp_path.iterdir())


def test_resume_checks_are_load_checkpoint_s(tmp_path):
    """A file that is no checkpoint of this project is described as the predict scripts describe it."""
    bare = tmp_path / "bare.ckpt"
    torch.save({"conv.weight": torch.zeros(2, 2)}, bare)
    args = train.resolve_args(run_args(tmp_path, tmp_path / "o", "segmentation", "--resume", str(bare)))
    with pytest.raises(volumes.DataError) as err:
        train.check_resume(args)
    assert_one_line_naming(err, "bare.ckpt", "found a bare state dict", "expected")


def test_resume_refuses_another_vgg_width(tmp_path):
    """A classifier checkpoint at width 0.5 resumed at another width: one line naming the flag, not a
    shape mismatch from deep inside the weight loading."""
    half = save_checkpoint(LitClassifier(in_channels=3, head="evidence", liver_gate=True, width=0.5, image_size=32),
                           tmp_path / "half.ckpt")
    args = train.resolve_args(run_args(tmp_path, tmp_path / "o", "classification", "--resume", str(half)))
    with pytest.raises(volumes.DataError) as err:  # run_args leaves the width at the paper's 1.0
        train.check_resume(args)
    assert_one_line_naming(err, "half.ckpt", "--vgg-width 0.5", "expected --vgg-width 1 ")


FROM_BEFORE = {  # a field checkpoints did not always record: the network, the flag that differs from the value
    # it had before, what the message names of the checkpoint, and the flags that resume it
    "liver gate": (lambda: LitClassifier(in_channels=3, head="evidence", liver_gate=False, image_size=32),
                   "classification", "liver_gate", ["--liver-gate"], "--liver-gate off", ["--no-liver-gate"]),
    "vgg width": (lambda: LitClassifier(in_channels=3, head="evidence", liver_gate=True, image_size=32),
                  "classification", "width", ["--vgg-width", "0.5"], "--vgg-width 1", []),
    "unet deep supervision": (lambda: LitSegmenter(in_channels=3, base_width=4, image_size=32, context_slices=1),
                              "segmentation", "deep_supervision", ["--unet-deep-supervision", "1"],
                              "--unet-deep-supervision 0", []),
}


@pytest.mark.parametrize("case", FROM_BEFORE.values(), ids=FROM_BEFORE.keys())
def test_resume_compares_a_field_the_checkpoint_lacks_at_its_value_from_before(tmp_path, case):
    """A checkpoint saved before it recorded a field (the liver gate, the VGG16 width, the U-Net's deep
    supervision) had the value every network had then: resumed with flags that give another, it is one
    line naming the flag (as for a recorded field), not a failure inside Lightning's weight loading; with
    that value it resumes."""
    make, task, field, other, found, same = case
    ckpt = torch.load(save_checkpoint(make(), tmp_path / "old.ckpt"), map_location="cpu", weights_only=False)
    del ckpt["hyper_parameters"][field]
    torch.save(ckpt, tmp_path / "old.ckpt")
    resume = ["--resume", str(tmp_path / "old.ckpt")]
    with pytest.raises(volumes.DataError) as err:
        train.check_resume(train.resolve_args(run_args(tmp_path, tmp_path / "o", task, *resume, *other)))
    assert_one_line_naming(err, "old.ckpt", f"found a checkpoint of {found};", f"expected {' '.join(other)} ")
    train.check_resume(train.resolve_args(run_args(tmp_path, tmp_path / "o", task, *resume, *same)))


def test_classifier_keeps_the_end_of_training_whatever_validation_auroc_says(tiny_data, tmp_path, monkeypatch):
    """Validation AUROC scripted to fall every epoch: the rule of highest validation AUROC would keep
    the first epoch; best.ckpt is the last one, the same weights and operating threshold as last.ckpt,
    and the test runs on it."""
    import lit_model
    falling = iter(np.linspace(0.99, 0.01, 199))
    monkeypatch.setattr(lit_model, "binary_auroc", lambda *a, **k: torch.tensor(float(next(falling))))
    out = tmp_path / "run"
    # a tumour-free patient in validation too: both classes, so that there is an AUROC to script
    summary = train.main(run_args(tiny_data, out, "classification", "--max-epochs", "3", "--test-fraction", "0.34",
                                  "--val-fraction", "0.34"))
    val_auroc = [v for _, v in train.read_scalars(Path(summary["tensorboard"]))["val/auroc"]]
    assert len(val_auroc) == 3 and val_auroc[0] > val_auroc[1] > val_auroc[2]
    best, last = (torch.load(out / "checkpoints" / f"{n}.ckpt", map_location="cpu", weights_only=True)
                  for n in ("best", "last"))
    assert best["epoch"] == last["epoch"] == 2 and Path(summary["checkpoint"]) == out / "checkpoints" / "best.ckpt"
    assert best["hyper_parameters"]["threshold"] == last["hyper_parameters"]["threshold"]
    assert best["state_dict"].keys() == last["state_dict"].keys()
    for k in last["state_dict"]:  # NaN where nothing was chosen (the volume threshold, one-class validation)
        torch.testing.assert_close(best["state_dict"][k], last["state_dict"][k], rtol=0, atol=0, equal_nan=True)
    # One file written per epoch: last.ckpt is a link to best.ckpt.
    link = out / "checkpoints" / "last.ckpt"
    assert link.is_symlink() and link.resolve() == (out / "checkpoints" / "best.ckpt").resolve()


def test_classifier_resumes_from_its_linked_last_checkpoint(tiny_data, tmp_path):
    out = tmp_path / "run"
    train.main(run_args(tiny_data, out, "classification", "--max-epochs", "1"))
    resumed = train.main(run_args(tiny_data, out, "classification", "--max-epochs", "2",
                                  "--resume", str(out / "checkpoints" / "last.ckpt")))
    assert resumed["epochs"] == 2 and ckpt_epoch(out / "checkpoints" / "best.ckpt") == 1
    assert (out / "checkpoints" / "last.ckpt").is_symlink() and ckpt_epoch(out / "checkpoints" / "last.ckpt") == 1
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    assert len(_epoch_losses(resumed)) == 2  # one set of curves across the interruption


def test_checkpoint_alone_rebuilds_model_and_preprocessing(tiny_data, tmp_path):
    from lit_model import LitSegmenter
    out = tmp_path / "run"
    train.main(run_args(tiny_data, out, "segmentation", "--max-epochs", "1", "--context-slices", "2"))
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    hp = ckpt["hyper_parameters"]
    assert hp["context_slices"] == 2 and hp["in_channels"] == 5 and hp["image_size"] == 32
    assert tuple(hp["window"]) == volumes.WINDOW_HU
    model = LitSegmenter.load_from_checkpoint(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert model(torch.rand(1, 5, 32, 32)).shape == (1, 3, 32, 32)


def test_same_seed_same_metrics(tiny_data, tmp_path):
    a = train.main(run_args(tiny_data, tmp_path / "a", "segmentation", "--max-epochs", "1"))
    b = train.main(run_args(tiny_data, tmp_path / "b", "segmentation", "--max-epochs", "1"))
    assert a["test"] == b["test"]


def test_resume_ends_where_an_uninterrupted_run_would(tiny_data, tmp_path):
    full = train.main(run_args(tiny_data, tmp_path / "full", "segmentation", "--max-epochs", "2"))
    # A run stopped after its first epoch, then resumed from last.ckpt to the same 2 epochs.
    out = tmp_path / "stopped"
    train.main(run_args(tiny_data, out, "segmentation", "--max-epochs", "1"))
    resumed = train.main(run_args(tiny_data, out, "segmentation", "--max-epochs", "2",
                                  "--resume", str(out / "checkpoints" / "last.ckpt")))
    assert resumed["epochs"] == full["epochs"] == 2
    assert ckpt_epoch(out / "checkpoints" / "last.ckpt") == 1  # a finished run, continued to its new end
    assert resumed["split"] == full["split"]
    assert len(_epoch_losses(resumed)) == 2  # one set of curves across the interruption
    assert Path(resumed["tensorboard"]).name == "version_0"
    again = train.main(run_args(tiny_data, out, "segmentation", "--max-epochs", "1"))
    assert Path(again["tensorboard"]).name == "version_1"  # a new run never mixes into old curves


def _cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "train.py", *args], cwd=cwd, capture_output=True, text=True, timeout=600)


def test_bad_input_one_line_exit_2(tmp_path, tiny_data):
    missing = _cli("--task", "segmentation", "--data-dir", str(tmp_path / "nope"), "--output-dir", str(tmp_path / "o"))
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert missing.stderr.strip().splitlines()[-1].startswith("error:") and "nope" in missing.stderr
    wrong = tmp_path / "fake.ckpt"
    torch.save({"hyper_parameters": {"task": "classification"}, "state_dict": {}}, wrong)
    res = _cli("--task", "segmentation", "--data-dir", str(tiny_data), "--resume", str(wrong),
               "--output-dir", str(tmp_path / "o2"))
    assert res.returncode == 2 and "classification checkpoint" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.parametrize("task", ["segmentation", "classification"])
def test_ddp_on_two_cpu_processes(tiny_data, tmp_path, task):
    out = tmp_path / "ddp"
    res = _cli("--task", task, "--data-dir", str(tiny_data), "--output-dir", str(out),
               "--cache-dir", str(tmp_path / "cache"), "--graphs-dir", str(out / "graphs"), "--image-size", "32",
               "--base-width", "4", "--batch-size", "4", "--num-workers", "0", "--max-epochs", "1",
               "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp")
    assert res.returncode == 0, res.stderr[-3000:]
    saved = json.loads((out / "test_metrics.json").read_text())
    # The epoch-wide states (slice counts, slice probabilities) were gathered from both processes.
    assert ("test/dice_liver_per_slice" if task == "segmentation" else "test/auroc") in saved["test"]
    assert (out / "graphs" / ("val_dice.png" if task == "segmentation" else "roc_curve.png")).is_file()


class ScriptedDice(RegionDice):
    """Validation Dice that follows scripts, one value per epoch, so a test knows which epochs are
    best: the tumour's `script`, the liver's `liver` (by default the same values, so val/dice_mean, what
    best.ckpt goes by, is the script too)."""

    def __init__(self, script: list[float], epoch, liver: list[float] | None = None):
        super().__init__()
        self.script, self.epoch, self.liver = script, epoch, liver or script

    def compute(self) -> torch.Tensor:
        e = self.epoch()
        return torch.tensor([self.liver[e], self.script[e]], dtype=torch.float32, device=self.inter.device)


class ScriptedSegmenter(LitSegmenter):
    """LitSegmenter with val/dice_tumor read from $SCRIPTED_VAL_DICE ("0.2,0.6,..."), val/dice_liver
    from $SCRIPTED_VAL_LIVER (default: the same), and the epochs it trains recorded in `trained_epochs`."""

    trained_epochs: list[int] = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        script = [float(v) for v in os.environ["SCRIPTED_VAL_DICE"].split(",")]
        liver = os.environ.get("SCRIPTED_VAL_LIVER")
        self.val_dice = ScriptedDice(script, lambda: self.current_epoch,
                                     [float(v) for v in liver.split(",")] if liver else None)

    def on_train_epoch_start(self):
        ScriptedSegmenter.trained_epochs.append(self.current_epoch)


def scripted(monkeypatch, script: str) -> list[int]:
    monkeypatch.setenv("SCRIPTED_VAL_DICE", script)
    monkeypatch.setattr(train, "LitSegmenter", ScriptedSegmenter)
    ScriptedSegmenter.trained_epochs.clear()
    return ScriptedSegmenter.trained_epochs


def ckpt_epoch(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=True)["epoch"]


# train.py with the scripted segmenter, in a process of its own (so it can be killed).
SCRIPTED_TRAIN = ("import sys, train, tests.test_train as t; train.LitSegmenter = t.ScriptedSegmenter; "
                  "sys.exit(train.run_cli(train.main, train.get_args_parser()))")


def test_killed_after_its_best_epoch_resumes_from_its_last(tiny_data, tmp_path, monkeypatch):
    """SIGKILL (no chance to clean up) after the best epoch (1) and at least one worse one, then --resume
    from last.ckpt: training goes on from the last finished epoch, not from the best, ends after the
    requested epochs with the same split, best.ckpt stays the best, and the curves cover every epoch once."""
    import signal
    import time
    out = tmp_path / "killed"
    args = ["--task", "segmentation", "--data-dir", str(tiny_data), "--output-dir", str(out),
            "--cache-dir", str(tmp_path / "cache"), "--graphs-dir", str(out / "graphs"), "--image-size", "32",
            "--base-width", "4", "--batch-size", "8", "--num-workers", "0", "--max-epochs", "5",
            "--accelerator", "cpu"]
    script = "0.2,0.6,0.1,0.1,0.1"
    proc = subprocess.Popen([sys.executable, "-c", SCRIPTED_TRAIN, *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "SCRIPTED_VAL_DICE": script})
    last, best = out / "checkpoints" / "last.ckpt", out / "checkpoints" / "best.ckpt"
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        if last.exists() and ckpt_epoch(last) >= 2:  # Lightning writes checkpoints atomically
            break
        time.sleep(0.05)
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = ckpt_epoch(last)
    assert 2 <= killed_at < 4, "the run was not killed between its third epoch and its end"
    assert ckpt_epoch(best) == 1
    split_before = json.loads((out / "splits.json").read_text())

    trained = scripted(monkeypatch, script)
    resumed = train.main(train.get_args_parser().parse_args([*args, "--resume", str(last)]))
    assert trained == list(range(killed_at + 1, 5))
    assert resumed["epochs"] == 5 and ckpt_epoch(last) == 4
    assert ckpt_epoch(best) == 1 and Path(resumed["checkpoint"]) == best
    assert resumed["split"] == {k: split_before[k] for k in ("train", "val", "test")}
    scalars = train.read_scalars(Path(resumed["tensorboard"]))
    assert len(scalars["val/loss"]) == 5 and len(scalars["train/loss_epoch"]) == 5
    assert [round(v, 6) for _, v in scalars["val/dice_tumor"]] == [float(v) for v in script.split(",")]


def test_last_is_the_last_epoch_and_ties_go_to_the_lower_val_loss(tiny_data, tmp_path, monkeypatch):
    """Validation tumor Dice stays 0: last.ckpt still follows every epoch, and best.ckpt is the epoch
    of lowest validation loss among the tied ones."""
    scripted(monkeypatch, "0,0,0")
    out = tmp_path / "run"
    summary = train.main(run_args(tiny_data, out, "segmentation", "--max-epochs", "3"))
    assert ckpt_epoch(out / "checkpoints" / "last.ckpt") == 2
    val_loss = [v for _, v in train.read_scalars(Path(summary["tensorboard"]))["val/loss"]]
    assert len(val_loss) == 3
    assert ckpt_epoch(out / "checkpoints" / "best.ckpt") == int(np.argmin(val_loss))


def test_best_goes_by_the_mean_of_liver_and_tumor_dice(tiny_data, tmp_path, monkeypatch):
    """Tumour Dice 0.6 then 0.5, liver 0.3 then 0.9: the tumour alone would keep epoch 0 (as it once
    kept a model whose liver was still unlearnt); the mean, 0.45 then 0.70, keeps epoch 1."""
    scripted(monkeypatch, "0.6,0.5")
    monkeypatch.setenv("SCRIPTED_VAL_LIVER", "0.3,0.9")
    out = tmp_path / "run"
    summary = train.main(run_args(tiny_data, out, "segmentation", "--max-epochs", "2"))
    scalars = train.read_scalars(Path(summary["tensorboard"]))
    assert [round(v, 6) for _, v in scalars["val/dice_mean"]] == [0.45, 0.7]
    assert ckpt_epoch(out / "checkpoints" / "best.ckpt") == 1


def test_liver_only_data_has_no_tumor_dice_and_best_follows_liver_dice(tmp_path, monkeypatch):
    monkeypatch.setattr(train, "LitSegmenter", RecordingSegmenter)
    RecordingSegmenter.recorded.clear()
    data = tmp_path / "liver_only"
    for i in range(5):
        phantom.write_phantom_case(data, i, size=48, seed=4, num_slices=10, num_tumors=0)
    out = tmp_path / "run"
    summary = train.main(run_args(data, out, "segmentation", "--max-epochs", "2", "--oversample-tumor", "0"))
    scalars = train.read_scalars(Path(summary["tensorboard"]))
    assert all(np.isnan(v) for _, v in scalars["val/dice_tumor"])
    liver, loss = [v for _, v in scalars["val/dice_liver"]], [v for _, v in scalars["val/loss"]]
    assert [v for _, v in scalars["val/dice_mean"]] == liver  # the liver alone: the tumour is not applicable
    # The higher liver Dice; a tie goes to the lower validation loss (on equal loss, the earlier epoch).
    best = 1 if liver[1] > liver[0] or (liver[1] == liver[0] and loss[1] < loss[0]) else 0
    assert ckpt_epoch(out / "checkpoints" / "best.ckpt") == best
    assert np.isnan(summary["test"]["test/dice_tumor"]) and np.isnan(summary["test"]["test/dice_tumor_per_case"])
    assert_matches(summary["test"], dice_by_hand(RecordingSegmenter.recorded))  # the tumour's NaN included
    saved = json.loads((out / "test_metrics.json").read_text())  # strict JSON: NaN written as null
    assert saved["test"]["test/dice_tumor"] is None and saved["test"]["test/dice_liver"] is not None


class _Counter(pl.LightningModule):
    """One weight w from 0; loss = -w with SGD at lr 1 makes w = k after k steps. Records the w that
    validation and test see."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.seen = {"val": [], "test": []}

    def training_step(self, batch, batch_idx):
        return -self.w

    def validation_step(self, batch, batch_idx):
        self.seen["val"].append(self.w.item())
        self.log("val/loss", -self.w)

    def test_step(self, batch, batch_idx):
        self.seen["test"].append(self.w.item())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1.0)


def _fit_with_ema(model: pl.LightningModule, tmp_path: Path, decay: float = 0.5, warmup: bool = False):
    """Two epochs of three steps with EMAWeights(decay, warmup), last.ckpt in tmp_path; returns (trainer, loader)."""
    loader = torch.utils.data.DataLoader(torch.zeros(3, 1), batch_size=1)
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, filename="last", save_top_k=1, monitor=None)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=2, callbacks=[ckpt, train.EMAWeights(decay, warmup)],
                         num_sanity_val_steps=0, logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, loader, loader)
    return trainer, loader


def test_ema_validates_saves_and_tests_the_average(tmp_path):
    """decay 0.5 over raw weights 1, 2, ..., 6 (one per step, two epochs of 3): the average is 1 (the
    first step's weights), 1.5, 2.25, 3.125, 4.0625, 5.03125. Validation after each epoch sees 2.25 and
    5.03125; 5.03125 is what the checkpoint, the model after fit and a test from the checkpoint hold."""
    model = _Counter()
    trainer, loader = _fit_with_ema(model, tmp_path)
    assert model.seen["val"] == [2.25] * 3 + [5.03125] * 3
    assert model.w.item() == 5.03125
    saved = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=True)
    assert float(saved["state_dict"]["w"]) == 5.03125 and float(saved["current_model_state"]["w"]) == 6.0
    model.w.data.fill_(-1.0)
    trainer.test(model, loader, ckpt_path=str(tmp_path / "last.ckpt"), verbose=False)
    assert model.seen["test"] == [5.03125] * 3


def test_ema_decay_warms_up_to_its_ceiling():
    """min(decay, (1 + n) / (10 + n)): 2/11 at the first update, 101/110 at the 100th, the ceiling
    0.995 from update 1,790 (1791/1800 = 0.995) on; without warm-up the ceiling throughout."""
    assert train.ema_decay(0.995, 1) == pytest.approx(2 / 11)
    assert train.ema_decay(0.995, 100) == pytest.approx(101 / 110)
    assert train.ema_decay(0.995, 1789) < 0.995 and train.ema_decay(0.995, 1790) == pytest.approx(0.995)
    assert train.ema_decay(0.995, 10**6) == 0.995 and train.ema_decay(0.995, 1, warmup=False) == 0.995


def test_ema_with_warm_up_averages_at_the_growing_decay(tmp_path):
    """Raw weights 1, 2, ..., 6 under decay 0.9 with warm-up: updates 1-5 use 2/11, 3/12, 4/13, 5/14,
    6/15 (all below 0.9). By hand: 2/11 * 1 + 9/11 * 2 = 20/11; 1/4 * 20/11 + 3/4 * 3 = 119/44 (the
    first validation); 4/13 * 119/44 + 9/13 * 4 = 515/143; 5/14 * 515/143 + 9/14 * 5 = 4505/1001;
    2/5 * 4505/1001 + 3/5 * 6 = 27028/5005 (the second validation, the checkpoint and the model), where
    a fixed 0.9 gives 0.9**5 * 1 + 0.1 * (0.9**4 * 2 + 0.9**3 * 3 + 0.9**2 * 4 + 0.9 * 5 + 6) = 2.31441,
    more than half of it the first step's weights."""
    model = _Counter()
    _fit_with_ema(model, tmp_path, decay=0.9, warmup=True)
    assert model.seen["val"] == pytest.approx([119 / 44] * 3 + [27028 / 5005] * 3)
    saved = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=True)
    assert float(saved["state_dict"]["w"]) == pytest.approx(27028 / 5005)
    fixed = _Counter()
    _fit_with_ema(fixed, tmp_path / "fixed", decay=0.9, warmup=False)
    assert fixed.w.item() == pytest.approx(2.31441)


def _validated(check, epoch: int, dice: float) -> None:
    trainer = SimpleNamespace(callback_metrics={"val/dice_liver": torch.tensor(dice)}, sanity_checking=False,
                              current_epoch=epoch, callbacks=[], is_global_zero=True)
    check.on_validation_end(trainer, None)


def test_learning_check_warns_once_when_the_liver_is_not_learnt_by_a_third_of_the_time(capsys):
    """A 20-minute budget: validations at 5 and 6.5 minutes (under a third) say nothing whatever the
    Dice; the first at or past 6 min 40 s with liver Dice 0.31 gives one line; later ones none."""
    clock = [0.0]
    check = train.LearningCheck(budget_s=1200, max_epochs=-1, elapsed=lambda: clock[0])
    for seconds, dice in ((300, 0.0), (390, 0.1), (400, 0.31), (800, 0.2)):
        clock[0] = seconds
        _validated(check, epoch=seconds // 100, dice=dice)
        if seconds == 390:
            assert capsys.readouterr().err == ""
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("warning: at 33% of the run (epoch 5, 20 minutes' budget)")
    assert "liver Dice is 0.31, below 0.5" in err


def test_learning_check_is_silent_for_a_run_that_learns_and_counts_epochs_without_a_time_budget(capsys):
    """30 epochs, no --max-time: epoch 10 (a third) with Dice 0.8 passes and nothing more is checked;
    another run at 0.4 in epoch 10 is warned about in epochs."""
    learns = train.LearningCheck(budget_s=None, max_epochs=30)
    for epoch, dice in ((8, 0.1), (9, 0.8), (10, 0.1)):
        _validated(learns, epoch, dice)
    assert capsys.readouterr().err == ""
    stalls = train.LearningCheck(budget_s=None, max_epochs=30)
    _validated(stalls, 9, 0.4)
    assert capsys.readouterr().err.startswith("warning: at 33% of the run (epoch 10 of 30)")


class _Stalled(pl.LightningModule):
    """Learns nothing (validation liver Dice 0.2); each training step advances a clock by 100 s.
    Records the step count at each validation."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.clock, self.validated_at = [0.0], []

    def training_step(self, batch, batch_idx):
        self.clock[0] += 100.0
        return -self.w

    def validation_step(self, batch, batch_idx):
        self.log("val/dice_liver", 0.2)

    def on_validation_epoch_end(self):
        self.validated_at.append(self.global_step)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1.0)


@pytest.mark.parametrize("per_epoch, validated_at", [(12, [4, 12, 24]), (5, [5, 10])])
def test_learning_check_validates_at_a_third_of_the_time_when_the_epoch_ends_much_later(capsys, per_epoch,
                                                                                        validated_at):
    """A 20-minute budget, 100 s a step. Epochs of 12 steps end at 1200 s, far past the third (400 s):
    one extra validation after step 4 (clock 400 s) gives the warning then; epochs of 5 steps end 100 s
    after the third (under a sixth of the budget, 200 s), so validation stays at the epoch ends and the
    warning comes after step 5 (500 s: 42 %)."""
    model = _Stalled()
    check = train.LearningCheck(budget_s=1200, max_epochs=-1, elapsed=lambda: model.clock[0])
    loader = torch.utils.data.DataLoader(torch.zeros(per_epoch, 1), batch_size=1)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=2, callbacks=[check], num_sanity_val_steps=0,
                         logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False)
    trainer.fit(model, loader, torch.utils.data.DataLoader(torch.zeros(1, 1), batch_size=1))
    assert model.validated_at == validated_at
    err = capsys.readouterr().err
    assert err.count("warning: at ") == 1
    assert f"warning: at {33 if per_epoch == 12 else 42}% of the run (epoch 1, 20 minutes' budget)" in err


class _Thresholded(_Counter):
    """_Counter with a buffer that validation sets, as LitClassifier's operating threshold: epoch e's
    validation chooses 10 * (e + 1)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("operating_threshold", torch.tensor(0.5, dtype=torch.float64))

    def on_validation_epoch_end(self):
        self.operating_threshold.fill_(10.0 * (self.current_epoch + 1))


def test_ema_keeps_the_threshold_validation_chose(tmp_path):
    """The weights are averaged as above, the threshold is not: after two epochs the checkpoint, the
    model and a test hold the second validation's 20 (averaged with the raw model's copies at every
    step, as Lightning's callback does with any buffer, it came out 8.8125)."""
    model = _Thresholded()
    trainer, loader = _fit_with_ema(model, tmp_path)
    assert model.w.item() == 5.03125 and float(model.operating_threshold) == 20.0
    saved = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=True)
    assert float(saved["state_dict"]["operating_threshold"]) == 20.0
    model.operating_threshold.fill_(-1.0)
    trainer.test(model, loader, ckpt_path=str(tmp_path / "last.ckpt"), verbose=False)
    assert float(model.operating_threshold) == 20.0


class _Clocked(LitSegmenter):
    """The segmenter on a fake clock: each training batch takes one second of `CLOCK`, the clock that
    Lightning's Timer (--max-time) reads in the test below; `stop_at_epoch` raises at the start of that
    epoch (a run killed after the previous one's checkpoint); the end of training is recorded."""

    CLOCK = [0.0]
    stop_at_epoch: int | None = None
    ended: dict = {}

    def on_train_epoch_start(self):
        if self.current_epoch == type(self).stop_at_epoch:
            raise RuntimeError("killed")

    def on_train_batch_start(self, batch, batch_idx):
        type(self).CLOCK[0] += 1.0

    def on_train_end(self):
        type(self).ended = {"step": self.trainer.global_step, "lr": self.trainer.optimizers[0].param_groups[0]["lr"]}


def test_a_max_time_run_resumed_ends_its_schedule_where_an_uninterrupted_one_does(tiny_data, tmp_path, monkeypatch):
    """--max-time 24 s on a clock of one second per training batch (6 batches an epoch): uninterrupted,
    24 steps and the learning rate at the end of its cosine, about 0. Killed at the start of epoch 2
    (12 s, half the budget) and resumed from last.ckpt: the same 24 steps (within an epoch) and the same
    end, the schedule having gone on from 12 s instead of warming up again."""
    import types
    import pytorch_lightning.callbacks.timer as timer_module
    monkeypatch.setattr(timer_module, "time", types.SimpleNamespace(monotonic=lambda: _Clocked.CLOCK[0]))
    monkeypatch.setattr(train, "LitSegmenter", _Clocked)
    peak = 2e-3

    def run(out, *extra):
        _Clocked.ended = {}
        train.main(run_args(tiny_data, out, "segmentation", "--max-time", "00:00:00:24", "--lr", str(peak), *extra))
        return _Clocked.ended

    full = run(tmp_path / "full")
    assert full["step"] == 24 and full["lr"] < 0.01 * peak
    out = tmp_path / "killed"
    monkeypatch.setattr(_Clocked, "stop_at_epoch", 2)
    with pytest.raises(RuntimeError, match="killed"):
        run(out)
    assert ckpt_epoch(out / "checkpoints" / "last.ckpt") == 1
    monkeypatch.setattr(_Clocked, "stop_at_epoch", None)
    resumed = run(out, "--resume", str(out / "checkpoints" / "last.ckpt"))
    assert abs(resumed["step"] - full["step"]) <= 6 and resumed["lr"] < 0.01 * peak


def test_monai_peer_writes_into_its_own_folders():
    """benchmarks/monai_baseline.py (MONAI's tutorial U-Net through train.py) defaults to runs/monai and
    its graphs beside it, so a peer run never overwrites our runs/segmentation or the committed
    Graphs_Segmentation/; flags given still win. Parsing needs no MONAI."""
    peer = load_script(ROOT / "benchmarks" / "monai_baseline.py")
    args = peer.parse_args(["--data-dir", "d"])
    assert (args.task, args.lr) == ("segmentation", 1e-4)
    assert (args.output_dir, args.graphs_dir) == (Path("runs/monai"), Path("runs/monai/graphs"))
    assert peer.parse_args(["--output-dir", "r/m"]).graphs_dir == Path("r/m/graphs")
    args = peer.parse_args(["--output-dir", "r/m", "--graphs-dir", "g"])
    assert (args.output_dir, args.graphs_dir) == (Path("r/m"), Path("g"))
    with pytest.raises(SystemExit):
        peer.parse_args(["--task", "classification"])
