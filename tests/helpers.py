"""Small helpers several test files share."""
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest


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
