"""Shared fixtures: tiny synthetic LiTS folders written as real NIfTI files into tmp_path, and real
checkpoints of untrained networks."""
from pathlib import Path

import pytest
import torch

import phantom
from tests.helpers import save_checkpoint


@pytest.fixture
def lits_dir(tmp_path: Path) -> Path:
    """Four phantoms (48x48 in-plane, 16-24 slices) in the LiTS layout, axes flipped as the seed says."""
    out = tmp_path / "lits"
    phantom.write_synthetic_lits(out, cases=4, size=48, seed=0)
    return out


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "cache"


@pytest.fixture(scope="session")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    """Checkpoints of tiny untrained networks, as train.py writes them (shared by the predict scripts'
    and the report's tests)."""
    from lit_model import LitClassifier, LitSegmenter
    root = tmp_path_factory.mktemp("ckpts")
    torch.manual_seed(0)
    return {
        "seg": save_checkpoint(LitSegmenter(in_channels=3, base_width=4, image_size=32, context_slices=1), root / "seg.ckpt"),
        # image size = the phantoms' in-plane size: no resampling, so an oracle's answer comes back exactly
        "seg48": save_checkpoint(LitSegmenter(in_channels=3, base_width=4, image_size=48, context_slices=1),
                                 root / "seg48.ckpt"),
        "seg64": save_checkpoint(LitSegmenter(in_channels=3, base_width=4, image_size=64, context_slices=1),
                                 root / "seg64.ckpt"),
        "cls": save_checkpoint(LitClassifier(in_channels=3, hidden=16, image_size=32), root / "cls.ckpt"),
    }
