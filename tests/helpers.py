"""Small helpers several test files share: one-line errors, NIfTI files, real checkpoints of untrained
networks, the oracle that stands in for a network where the answer must be known, and the benchmark
scripts as modules."""
import importlib.util
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import inference
import volumes

REPO = Path(__file__).resolve().parents[1]


def load_script(path: Path, module_name: str | None = None):
    """A script outside the repository root (benchmarks/*.py) as a module, imported as it runs: with its
    own folder first on sys.path (the benchmarks import each other)."""
    sys.path.insert(0, str(path.parent))
    try:
        spec = importlib.util.spec_from_file_location(module_name or path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path.parent))
    return module


def assert_one_line_naming(exc: pytest.ExceptionInfo, *names: str) -> str:
    """The error is one line and names each of `names`; returns its message."""
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


def save_checkpoint(model, path: Path) -> Path:
    """A real Lightning checkpoint of an untrained model, as trainer.save_checkpoint writes it."""
    import pytorch_lightning as pl
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, max_epochs=0, accelerator="cpu",
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.strategy.connect(model)
    trainer.save_checkpoint(path)
    return path


class Oracle(nn.Module):
    """Stands in for a network: recognises the centre slice of each 2.5D stack among the volume's
    preprocessed slices, checks the neighbours are the ones `context_indices` names, and returns
    one-hot logits of that slice's answer (segmentation (B, 3, S, S), or classification (B, 2))."""

    def __init__(self, unit: torch.Tensor, answers: torch.Tensor, context: int = 1, lone: bool = False):
        super().__init__()
        self.unit, self.answers, self.context, self.lone = unit, answers, context, lone  # (Z, S, S), (Z, ...)
        self.seen: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        centre = x[:, x.shape[1] // 2]  # (B, S, S)
        dist = (centre[:, None] - self.unit[None]).abs().flatten(2).amax(2)  # (B, Z)
        z = dist.argmin(dim=1)
        assert float(dist.min(dim=1).values.max()) < 1e-5, "a stack's centre is none of the volume's slices"
        for b, zb in enumerate(z.tolist()):
            near = [zb] * x.shape[1] if self.lone else volumes.context_indices(zb, len(self.unit), self.context)
            torch.testing.assert_close(x[b], self.unit[near], atol=1e-5, rtol=0)
        self.seen += z.tolist()
        ans = self.answers[z]
        if ans.ndim == 1:  # classification: tumor or not
            return torch.stack([-5 * ans.float() + 2.5, 5 * ans.float() - 2.5], dim=1)  # (B, 2)
        return F.one_hot(ans.long(), 3).permute(0, 3, 1, 2).float()  # (B, 3, S, S)


def unit_slices(volume: Path, size: int) -> torch.Tensor:
    """The model input the oracle expects, made with volumes.py directly (not the predict scripts)."""
    hu, _ = volumes.load_volume(volume)
    return volumes.resize_slices(torch.from_numpy(volumes.window_hu(hu, volumes.WINDOW_HU)), size)


def use_oracle(monkeypatch, oracle: nn.Module, classifier: nn.Module | None = None) -> None:
    """Every checkpoint's network is `oracle`; with `classifier`, a classification checkpoint's is that."""
    def network(self, device):
        return classifier if classifier is not None and self.hparams["task"] == "classification" else oracle
    monkeypatch.setattr(inference.Checkpoint, "network", network)
