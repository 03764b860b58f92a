"""train.py end to end on tiny phantoms written as real NIfTI files: fast_dev_run, learning, resume,
reproducibility, DDP on two CPU processes, the PNG graphs and bad input."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch

import phantom
import train
import volumes
from lit_model import LitClassifier, LitSegmenter, RegionDice

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


class RecordingClassifier(LitClassifier):
    """LitClassifier that records each test batch's slice probabilities, targets and case indices as
    its test metrics receive them."""

    recorded: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        update = self.test_preds.update

        def record(prob, target, case=None):
            RecordingClassifier.recorded.append((prob.detach().cpu().double().numpy(), target.cpu().numpy(),
                                                 case.cpu().numpy()))
            return update(prob, target, case)
        self.test_preds.update = record


def auroc_by_pairs(scores: np.ndarray, target: np.ndarray) -> float:
    """Probability that a positive outscores a negative (ties count half), every pair compared."""
    pos, neg = scores[target == 1], scores[target == 0]
    return float(np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg]))


def classification_by_hand(recorded, threshold: float) -> dict[str, float]:
    from inference import VOLUME_TOP_K
    prob = np.concatenate([p for p, _, _ in recorded])
    target = np.concatenate([t for _, t, _ in recorded])
    case = np.concatenate([c for _, _, c in recorded])
    pred = prob >= threshold
    tp, fn = np.sum(pred & (target == 1)), np.sum(~pred & (target == 1))
    tn, fp = np.sum(~pred & (target == 0)), np.sum(pred & (target == 0))
    sens, spec = tp / (tp + fn), tn / (tn + fp)
    volumes_ = np.unique(case)
    vol_score = np.array([np.mean(np.sort(prob[case == c])[::-1][:VOLUME_TOP_K]) for c in volumes_])
    vol_target = np.array([target[case == c].max() for c in volumes_])
    return {"test/acc": (tp + tn) / len(target), "test/sensitivity": sens, "test/specificity": spec,
            "test/balanced_acc": (sens + spec) / 2, "test/f1": 2 * tp / (2 * tp + fp + fn),
            "test/auroc": auroc_by_pairs(prob, target), "test/auroc_volume": auroc_by_pairs(vol_score, vol_target)}


def test_classification_graphs_and_metrics(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setattr(train, "LitClassifier", RecordingClassifier)
    RecordingClassifier.recorded.clear()
    out = tmp_path / "run"
    # A third of the patients for the test: a tumour-free one and one with tumours, so both classes.
    summary = train.main(run_args(tiny_data, out, "classification", "--max-epochs", "2", "--test-fraction", "0.34"))
    for name in ("train_loss_epoch", "train_accuracy_epoch", "train_loss_step", "train_accuracy_step", "val_loss",
                 "val_accuracy", "roc_curve", "confusion_matrix"):
        assert (out / "graphs" / f"{name}.png").is_file(), name
    threshold = summary["test"]["test/threshold"]  # chosen on validation
    assert 0.0 <= threshold <= 1.0
    assert_matches(summary["test"], classification_by_hand(RecordingClassifier.recorded, threshold))
    # The test ran at the threshold chosen on validation, which best.ckpt records for prediction.
    ckpt = torch.load(summary["checkpoint"], map_location="cpu", weights_only=True)
    assert ckpt["hyper_parameters"]["threshold"] == pytest.approx(summary["test"]["test/threshold"])


def test_augmentation_strength_defaults_by_task_and_flags_override_it():
    def resolved(*argv):
        args = train.resolve_args(train.get_args_parser().parse_args(list(argv)))
        return args.rotation, tuple(args.scale), args.paste_tumor
    assert resolved("--task", "classification") == resolved("--task", "classification", "--demo") == (20.0, (0.8, 1.2), 0.5)
    assert resolved("--task", "segmentation") == resolved("--task", "segmentation", "--demo") == (10.0, (0.9, 1.1), 0.0)
    assert resolved("--task", "classification", "--rotation", "5", "--scale", "1", "1.5", "--paste-tumor", "0") == \
        (5.0, (1.0, 1.5), 0.0)


@pytest.mark.parametrize("flag, value, expected", [("--paste-tumor", "1.5", "expected a probability in [0, 1]"),
                                                    ("--oversample-tumor", "1.0", "expected a share in [0, 1)"),
                                                    ("--scale", "1.2 0.8", "expected 0 < LOW <= HIGH")])
def test_out_of_range_flags_name_what_was_found_and_expected(flag, value, expected):
    from volumes import DataError
    argv = ["--task", "classification", flag, *value.split()]
    with pytest.raises(DataError) as err:
        train.resolve_args(train.get_args_parser().parse_args(argv))
    assert str(err.value) == f"found {flag} {value}; {expected}"


def test_classifier_keeps_the_end_of_training_whatever_validation_auroc_says(tiny_data, tmp_path, monkeypatch):
    """Validation AUROC scripted to fall every epoch: the rule of highest validation AUROC would keep
    the first epoch; best.ckpt is the last one, the same weights and operating threshold as last.ckpt,
    and the test runs on it."""
    import lit_model
    falling = iter(np.linspace(0.99, 0.01, 199))
    monkeypatch.setattr(lit_model, "binary_auroc", lambda *a, **k: torch.tensor(float(next(falling))))
    out = tmp_path / "run"
    summary = train.main(run_args(tiny_data, out, "classification", "--max-epochs", "3", "--test-fraction", "0.34"))
    val_auroc = [v for _, v in train.read_scalars(Path(summary["tensorboard"]))["val/auroc"]]
    assert len(val_auroc) == 3 and val_auroc[0] > val_auroc[1] > val_auroc[2]
    best, last = (torch.load(out / "checkpoints" / f"{n}.ckpt", map_location="cpu", weights_only=True)
                  for n in ("best", "last"))
    assert best["epoch"] == last["epoch"] == 2 and Path(summary["checkpoint"]) == out / "checkpoints" / "best.ckpt"
    assert best["hyper_parameters"]["threshold"] == last["hyper_parameters"]["threshold"]
    assert best["state_dict"].keys() == last["state_dict"].keys()
    assert all(torch.equal(best["state_dict"][k], last["state_dict"][k]) for k in last["state_dict"])
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


def _fit_with_ema(model: pl.LightningModule, tmp_path: Path):
    """Two epochs of three steps with EMAWeights(0.5), last.ckpt in tmp_path; returns (trainer, loader)."""
    loader = torch.utils.data.DataLoader(torch.zeros(3, 1), batch_size=1)
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, filename="last", save_top_k=1, monitor=None)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=2, callbacks=[ckpt, train.EMAWeights(0.5)],
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
