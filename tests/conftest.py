"""Shared fixtures: tiny synthetic LiTS folders written as real NIfTI files into tmp_path."""
from pathlib import Path

import pytest

import phantom


@pytest.fixture
def lits_dir(tmp_path: Path) -> Path:
    """Four phantoms (48x48 in-plane, 16-24 slices) in the LiTS layout, axes flipped as the seed says."""
    out = tmp_path / "lits"
    phantom.write_synthetic_lits(out, cases=4, size=48, seed=0)
    return out


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "cache"
