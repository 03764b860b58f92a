"""CT and label volumes in and out: NIfTI, DICOM series, DICOM SEG and 2D slices, in one place.

    hu, geom = read_volume("volume-7.nii")             # (Z, H, W) HU in (S, P, L) order, and its Geometry
    hu, geom = read_volume("CT/patient-7/")            # a folder holding one CT series as DICOM files
    write_labels(labels, geom, "volume-7_seg.nii.gz")  # back on the input's own grid
    write_labels(labels, geom, "volume-7_seg.dcm")     # a DICOM Segmentation of a DICOM input

Training (`dataset.py`) and both predict scripts read files through this module only, and the HU
window and the resizing that turn a slice into model input live here too, so training and prediction
cannot drift apart.

Orientation: every volume is brought to nibabel's closest canonical orientation and handed out as
axial slices in radiological display order, axis codes (S, P, L): axis 0 runs inferior -> superior,
rows run anterior -> posterior (anterior at the top), columns run patient right -> left (patient
right on the image left). A DICOM series is first given the NIfTI-style affine its tags describe
(LPS turned into RAS), so it goes through exactly the orientation code a NIfTI file goes through.
`Geometry` keeps the way back to the file's own voxel order, and everything a writer needs.
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import re
import shutil
import sys
import tempfile
import warnings
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, io_orientation, ornt_transform

WINDOW_HU: tuple[float, float] = (-200.0, 250.0)
SEG_CLASSES: tuple[str, ...] = ("background", "liver", "tumor")  # label values 0, 1, 2 of every label volume
CLS_CLASSES: tuple[str, ...] = ("healthy", "tumor")  # slice classes 0, 1
SLICE_AXCODES: tuple[str, str, str] = ("S", "P", "L")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".npy")
VOLUME_SUFFIXES = (".nii", ".nii.gz")
DICOM_SUFFIX = ".dcm"
# Files a folder run skips: the predict scripts' own outputs and LiTS label volumes (they are not CT).
_SKIPPED = re.compile(r"(_seg\.nii(\.gz)?|_mask\.png|_overlay\.png)$|^segmentation-\d+\.nii(\.gz)?$")
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


class DataError(ValueError):
    """A problem with the user's data: the message is one line naming the file, what was found
    and what was expected. Command-line entry points print it and exit with status 2."""


def one_line(text: object) -> str:
    return " ".join(str(text).split())


def run_cli(entry, parser, argv=None) -> int:
    """Run `entry(args)`; a user-input error becomes one line on stderr and exit status 2: a flag
    refused while parsing (argparse's message, without its usage block) and a DataError raised by
    `entry`. Anything else is a bug and keeps its traceback."""
    _one_line_parse_errors(parser)
    try:
        args = parser.parse_args(argv)
    except _FlagError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    try:
        rc = entry(args)
        return rc if isinstance(rc, int) else 0
    except DataError as exc:
        sys.stderr.write(f"error: {one_line(exc)}\n")
        return 2


# argparse's own messages, said as every other error here is: what was found, what was expected.
_ARGPARSE_MESSAGES = (
    (re.compile(r"(argument \S+: )invalid choice: (.+) \(choose from (.+)\)$"), r"\1found \2; expected one of \3"),
    (re.compile(r"the following arguments are required: (.+)$"), r"found no \1; expected \1 (required)"),
    (re.compile(r"unrecognized arguments: (.+)$"), r"found unknown \1; expected the flags --help lists"),
)


def _found_expected(message: str) -> str:
    for pattern, replacement in _ARGPARSE_MESSAGES:
        if pattern.match(message):
            return pattern.sub(replacement, message)
    return message


class _FlagError(Exception):
    """A flag argparse refused, on its way from the parser to `run_cli`."""


def _one_line_parse_errors(parser: argparse.ArgumentParser) -> None:
    """Make `parser` (and its subcommands' parsers) hand a refused flag to `run_cli`, which reports it
    as one line and exit status 2 like every other user mistake; argparse would print its usage block."""
    def error(message: str, prog: str = parser.prog):
        raise _FlagError(f"{_found_expected(one_line(message))} (see {prog} --help)")
    parser.error = error
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _one_line_parse_errors(sub)


# --------------------------------------------------------------------------------------------
# Flag values checked while parsing, before any work starts
# --------------------------------------------------------------------------------------------

def int_at_least(low: int):
    """An argparse `type`: an integer >= `low`; argparse names the flag in its message."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"found {text!r}; expected an integer, {low} or more") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"found {value}; expected {low} or more")
        return value
    return parse


def float_in(low: float, high: float, low_open: bool = False, high_open: bool = False, what: str = "a number"):
    """An argparse `type`: a finite float in the interval [low, high], either end open as asked."""
    shown = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"found {text!r}; expected {what} in {shown}") from None
        inside = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
        if not (math.isfinite(value) and inside):
            raise argparse.ArgumentTypeError(f"found {text}; expected {what} in {shown}")
        return value
    return parse


def ordered_pair(strict: bool = True, positive: bool = False):
    """An argparse action for `nargs=2` flags such as --window LOW HIGH: refuses LOW > HIGH (and LOW ==
    HIGH when `strict`), and with `positive` a LOW of 0 or less, while parsing."""
    class OrderedPair(argparse.Action):
        def __call__(self, parser, namespace, values, option_string=None):
            low, high = values
            bad = not (math.isfinite(low) and math.isfinite(high)) or (low >= high if strict else low > high)
            if bad or (positive and low <= 0):
                want = ("0 < " if positive else "") + ("LOW < HIGH" if strict else "LOW <= HIGH")
                raise argparse.ArgumentError(self, f"found {low:g} {high:g}; expected {want}")
            setattr(namespace, self.dest, [low, high])
    return OrderedPair


# --------------------------------------------------------------------------------------------
# Writing safely: a reader never sees a half-written file
# --------------------------------------------------------------------------------------------

@contextmanager
def atomic_output(path: str | Path):
    """Yield a temporary path beside `path`; on success it is renamed to `path`, on any error removed,
    so a reader never sees a half-written file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix="".join(path.suffixes[-2:]))
    os.close(fd)
    try:
        yield Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_output(path) as tmp:
        tmp.write_text(text)


@contextmanager
def atomic_folder(path: str | Path, replace: bool = False):
    """Yield a new temporary folder beside `path` to fill; on success it is renamed to `path`, on any
    error removed with the parent folders this created, so a reader sees the whole folder or none.

    `path` may be absent or an empty folder; with `replace` an existing folder is swapped out and
    deleted once the new one is in place. OS errors become a one-line DataError."""
    path = Path(path)
    made = [p for p in (path.parent, *path.parent.parents) if not p.exists()]  # deepest first
    tmp = None
    try:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial"))
        except OSError as exc:
            raise DataError(f"{path}: cannot create the output folder ({exc.strerror or type(exc).__name__}); "
                            f"expected a folder that can be written") from None
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp creates 0700; give the folder the usual permissions
        try:
            if replace and path.is_dir() and any(path.iterdir()):
                old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".old"))
                os.replace(path, old)  # onto the empty folder just made
                os.replace(tmp, path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, path)  # onto nothing, or onto an empty folder
        except OSError as exc:
            raise DataError(f"{path}: cannot put the output folder in place ({exc.strerror or type(exc).__name__}); "
                            f"expected a new or empty folder") from None
    except BaseException:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        for folder in made:
            try:
                folder.rmdir()
            except OSError:
                break
        raise


@contextmanager
def _writing(path: Path):
    """`atomic_output`, with OS errors (no such folder, disk full) turned into a one-line DataError."""
    try:
        with atomic_output(path) as tmp:
            yield tmp
    except OSError as exc:
        raise DataError(f"{path}: cannot write ({exc.strerror or type(exc).__name__}); "
                        f"expected a writable output location") from None


def ensure_folder(folder: Path) -> Path:
    """Create `folder` (and parents) or fail with a DataError before any work is done."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"{folder}: cannot create the output folder ({exc.strerror or type(exc).__name__}); "
                        f"expected a folder that can be written") from None
    if not folder.is_dir():
        raise DataError(f"{folder}: found a file where the output folder should be; expected a folder")
    return folder


def check_output(path: Path, flag: str, folder: bool = False) -> None:
    """Refuse, before any work starts and creating nothing, an output `path` given by `flag` that
    could not be written: a folder where a file goes (or a file where a folder goes), a place under a
    file, or a folder this process may not write into."""
    path = Path(path)
    if path.exists() and path.is_dir() != folder:
        raise DataError(f"{path}: {flag} is {'a file' if folder else 'a folder'}; expected "
                        f"{'a folder' if folder else 'a file name'}")
    above = path if folder and path.exists() else path.parent  # where the new entries will go
    while not above.exists() and above != above.parent:
        above = above.parent
    if not above.is_dir():
        raise DataError(f"{path}: {flag} lies under the file {above}; expected a path that can be created")
    if not os.access(above, os.W_OK | os.X_OK):
        raise DataError(f"{path}: {flag} cannot be written into {above} (permission denied); expected a "
                        f"writable location")


def strip_nifti_suffix(name: str) -> str:
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


# --------------------------------------------------------------------------------------------
# Intensity and resizing: the one place these happen, for training and prediction alike
# --------------------------------------------------------------------------------------------

def window_hu(hu, window: Sequence[float] = WINDOW_HU):
    """Map Hounsfield units to [0, 1]: `window[0]` and below -> 0, `window[1]` and above -> 1.

    Accepts a numpy array or a torch tensor and returns float32 of the same kind."""
    lo, hi = float(window[0]), float(window[1])
    if not hi > lo:
        raise ValueError(f"window must satisfy low < high, got {window}")
    if isinstance(hu, torch.Tensor):
        return ((hu.float() - lo) / (hi - lo)).clamp_(0.0, 1.0)
    out = (np.asarray(hu, dtype=np.float32) - np.float32(lo)) / np.float32(hi - lo)
    return np.clip(out, 0.0, 1.0, out=out)


def resize_slices(slices, size: int, kind: str = "image") -> torch.Tensor:
    """Resize a stack of slices (Z, H, W) to (Z, size, size).

    kind="image": bilinear with antialiasing (area-like when shrinking); kind="label": nearest,
    so label values stay in {0, 1, 2}. Returns float32 for images, uint8 for labels."""
    t = torch.as_tensor(slices)
    if t.ndim != 3:
        raise ValueError(f"expected slices of shape (Z, H, W), got {tuple(t.shape)}")
    if t.shape[1] == size and t.shape[2] == size:
        return t.float() if kind == "image" else t.to(torch.uint8)
    if kind == "image":
        out = F.interpolate(t.float()[:, None], size=(size, size), mode="bilinear",
                            align_corners=False, antialias=True)[:, 0]
        return out
    out = F.interpolate(t.to(torch.float32)[:, None], size=(size, size), mode="nearest-exact")[:, 0]
    return out.to(torch.uint8)


def context_indices(z: int, num_slices: int, context_slices: int) -> np.ndarray:
    """Slice indices z-k..z+k, clamped at the ends of the volume (the end slice repeats)."""
    return np.clip(np.arange(z - context_slices, z + context_slices + 1), 0, num_slices - 1)


# --------------------------------------------------------------------------------------------
# Geometry: from a file's voxels to canonical slices and back
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class Geometry:
    """Where a volume came from and how to go back: everything a writer needs, so it never re-opens
    the input. Immutable; `spacing` is derived from the affine.

    `dicom` holds, for a DICOM series, the source datasets (headers, no pixel data) in the file's
    slice order (its third axis), which a DICOM SEG references; it is empty for NIfTI files."""

    affine: np.ndarray                   # (4, 4) the file's voxel -> world (RAS, mm) matrix
    shape: tuple[int, int, int]          # the file's own array shape
    qform: np.ndarray | None = None      # NIfTI header matrices and codes, carried to label files
    qform_code: int = 1
    sform: np.ndarray | None = None
    sform_code: int = 1
    xyzt_units: tuple[str, str] = ("mm", "sec")
    source: str = ""                     # the input, as messages name it
    dicom: tuple = ()
    spacing: tuple[float, float, float] = field(init=False)  # mm along (slice, row, column) of the slices
    _to_slices: np.ndarray = field(init=False, repr=False)
    _to_file: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        def frozen(matrix):
            if matrix is None:
                return None
            m = np.array(matrix, dtype=np.float64)
            m.setflags(write=False)
            return m
        set_ = object.__setattr__  # the documented way to fill derived fields of a frozen dataclass
        set_(self, "affine", frozen(self.affine))
        set_(self, "qform", frozen(self.qform))
        set_(self, "sform", frozen(self.sform))
        set_(self, "shape", tuple(int(s) for s in self.shape))
        set_(self, "dicom", tuple(self.dicom))
        file_ornt, slice_ornt = io_orientation(self.affine), axcodes2ornt(SLICE_AXCODES)
        to_slices = ornt_transform(file_ornt, slice_ornt)
        set_(self, "_to_slices", to_slices)
        set_(self, "_to_file", ornt_transform(slice_ornt, file_ornt))
        zooms = np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0))
        spacing = [0.0, 0.0, 0.0]
        for i in range(3):
            spacing[int(to_slices[i, 0])] = float(zooms[i])
        set_(self, "spacing", tuple(spacing))

    @classmethod
    def of_nifti(cls, img, shape: Sequence[int], source: str = "") -> Geometry:
        """The geometry of a nibabel image whose data has `shape` (3D)."""
        qform, qcode = img.get_qform(coded=True)
        sform, scode = img.get_sform(coded=True)
        units = img.header.get_xyzt_units() if hasattr(img.header, "get_xyzt_units") else ("mm", "sec")
        return cls(np.asarray(img.affine, dtype=np.float64), tuple(shape), qform, int(qcode or 0), sform,
                   int(scode or 0), tuple(u or "unknown" for u in units), source)

    def to_slices(self, volume: np.ndarray, dtype=None, copy: bool = True) -> np.ndarray:
        """File voxel order -> slices (Z, H, W) in (S, P, L) order: a C-contiguous array of its own in
        `dtype` (default: the volume's), converted while it is copied; with `copy=False` a view of
        `volume` (flips and a transpose: its strides may be negative)."""
        view = apply_orientation(volume, self._to_slices)
        return np.ascontiguousarray(view, dtype=dtype) if copy else view

    def to_file(self, slices: np.ndarray) -> np.ndarray:
        """Slices (Z, H, W) -> the file's own voxel order; the inverse of `to_slices`. Laid out as NIfTI
        stores voxels (first axis fastest, Fortran order): for the usual axial file that is the slices'
        own memory order, so this is about a plain copy and the writer needs no second reordering
        (a C-order result cost 0.5 s for a 512x512x200 label volume, its NIfTI writing as much again)."""
        out = np.asfortranarray(apply_orientation(slices, self._to_file))
        if out.shape != tuple(self.shape):
            raise ValueError(f"slices of shape {slices.shape} do not map back to {self.shape}")
        return out

    def slice_index(self, k: int) -> int:
        """Index along the slices array of the file's own axial slice k (its third axis)."""
        new_axis, flip = int(self._to_slices[2, 0]), self._to_slices[2, 1] < 0
        if new_axis != 0:
            raise DataError(f"{self.source or 'the volume'}: the file's third axis is not axial (orientation "
                            f"{''.join(nib.aff2axcodes(self.affine))}); expected axial slices")
        n = self.shape[2]
        if not 0 <= k < n:
            raise DataError(f"found slice {k}; expected 0..{n - 1} (the volume has {n} slices)")
        return n - 1 - k if flip else k

    def file_slice_index(self, z: int) -> int:
        """The file's own index, along its axial axis, of slice z of the slices array; the inverse of
        `slice_index` (reports name slices as the file numbers them)."""
        axis, flip = int(self._to_file[0, 0]), self._to_file[0, 1] < 0
        return int(self.shape[axis] - 1 - z) if flip else int(z)

    @property
    def slices_affine(self) -> np.ndarray:
        """(4, 4) the slices array's voxel -> world matrix: (z, row, column, 1) of the (Z, H, W) slices
        `to_slices` gives -> (x, y, z, 1) in the file's world coordinates (RAS, mm; for a DICOM series
        its tags' LPS turned into RAS). Where a report puts a point it measured on the slices."""
        return self.affine @ inv_ornt_aff(self._to_slices, self.shape)

    def one_slice(self, k: int) -> Geometry:
        """The geometry of the file's slice k alone: shape (X, Y, 1), placed where slice k lies in the
        world (affine, qform and sform shifted by k slices), with only slice k's DICOM source."""
        if not 0 <= k < self.shape[2]:
            raise ValueError(f"slice {k} is outside 0..{self.shape[2] - 1}")
        shift = np.eye(4)
        shift[2, 3] = k
        moved = [None if m is None else m @ shift for m in (self.affine, self.qform, self.sform)]
        return Geometry(moved[0], (*self.shape[:2], 1), moved[1], self.qform_code, moved[2], self.sform_code,
                        self.xyzt_units, self.source, self.dicom[k:k + 1])


def slice_of_file(geom: Geometry, k: int, path) -> int:
    """Index in the slices array of the file's own slice k (`--slice K`), checked against the file."""
    n = geom.shape[2]
    if not 0 <= k < n:
        raise DataError(f"{path}: found --slice {k}; expected 0..{n - 1} (the file has {n} slices along its third axis)")
    return geom.slice_index(k)


# --------------------------------------------------------------------------------------------
# NIfTI and 2D slices
# --------------------------------------------------------------------------------------------

def read_nifti(path: Path):
    """Open a NIfTI file: (nibabel image, array with the header's scaling applied, 3D). Any failure to
    read it becomes a one-line DataError naming the file."""
    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)  # applies scl_slope/scl_inter where the header sets them
    except DataError:
        raise
    except Exception as exc:  # nibabel raises many kinds for truncated or corrupt files
        raise DataError(f"{path}: cannot read NIfTI ({one_line(type(exc).__name__)}: "
                        f"{one_line(exc)[:200]}); expected a valid .nii or .nii.gz file") from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DataError(f"{path}: found a {data.ndim}D array of shape {data.shape}; "
                        f"expected a 3D volume")
    return img, data


def load_volume(path: str | Path, dtype=np.float32) -> tuple[np.ndarray, Geometry]:
    """Read a NIfTI CT volume: returns HU as slices (Z, H, W) in (S, P, L) order and its Geometry.

    `dtype` float32 (the default): an array of its own. `dtype=None`: the values as nibabel gives them
    (the file's own integers where its header does not scale them, int16 for most CT), as a view in
    slices order, strides possibly negative (for an uncompressed file, of a copy-on-write memory map):
    for a reader that takes a few slices at a time (`inference.preprocess_volume`). A float32 copy of
    a 512x512x200 volume is 0.2 GB of fresh memory, and faulting it in took 0.2-0.9 s on the
    2-core VM of BENCHMARKS.md."""
    path = Path(path)
    img, data = read_nifti(path)
    geom = Geometry.of_nifti(img, data.shape, str(path))
    if dtype is None:
        return geom.to_slices(data, copy=False), geom
    return geom.to_slices(data, dtype=dtype), geom


def load_label_volume(path: str | Path, expected_shape: tuple[int, ...] | None = None,
                      image_path: str | Path | None = None) -> tuple[np.ndarray, Geometry]:
    """Read a label volume: uint8 slices (Z, H, W) in (S, P, L) order with values in {0, 1, 2}."""
    path = Path(path)
    img, data = read_nifti(path)
    if expected_shape is not None and tuple(data.shape) != tuple(expected_shape):
        raise DataError(f"{path}: found shape {tuple(data.shape)}; expected {tuple(expected_shape)} "
                        f"as its volume {Path(image_path).name if image_path else ''}".rstrip())
    labels = check_labels(data, path)
    geom = Geometry.of_nifti(img, data.shape, str(path))
    return geom.to_slices(labels), geom


AFFINE_TOLERANCE_MM = 1e-3  # two label volumes on "the same grid" have affines this close, entry by entry


def check_same_grid(path: str | Path, shape: Sequence[int], affine: np.ndarray,
                    other: str | Path, other_shape: Sequence[int], other_affine: np.ndarray) -> None:
    """The one rule for a label volume that must lie on another file's voxel grid (a ground truth on its
    CT volume or on a prediction): the same array shape, and affines that differ by at most
    `AFFINE_TOLERANCE_MM` in every entry. Nothing is resampled or reoriented, as the LiTS scorer does
    not: a file whose affine differs (a mirrored axis, another orientation, a lying header) is
    refused rather than scored mirrored. Raises DataError naming `path` and `other`."""
    shape, other_shape = tuple(int(s) for s in shape), tuple(int(s) for s in other_shape)
    if shape != other_shape:
        raise DataError(f"{path}: found shape {shape}; expected {other_shape}, the shape of {Path(other).name} "
                        f"(labels must lie on its voxel grid; nothing is resampled)")
    a, b = np.asarray(affine, dtype=np.float64), np.asarray(other_affine, dtype=np.float64)
    diff = float(np.max(np.abs(a - b)))
    if not diff <= AFFINE_TOLERANCE_MM:
        raise DataError(f"{path}: affine differs from {Path(other).name}'s by up to {diff:.4g} mm (orientation "
                        f"{''.join(nib.aff2axcodes(a))} vs {''.join(nib.aff2axcodes(b))}); expected its voxel "
                        f"grid to within {AFFINE_TOLERANCE_MM:g} mm (nothing is resampled or reoriented)")


def read_labels_on_grid(path: str | Path, other: str | Path, other_shape: Sequence[int],
                        other_affine: np.ndarray):
    """Read a label NIfTI that must lie on the voxel grid of `other` (`check_same_grid`): returns
    (nibabel image, uint8 labels in the file's own voxel order, values in {0, 1, 2})."""
    path = Path(path)
    img, data = read_nifti(path)
    check_same_grid(path, data.shape, img.affine, other, other_shape, other_affine)
    return img, check_labels(data, path)


def check_labels(data: np.ndarray, path: Path) -> np.ndarray:
    """Labels must be whole numbers in {0, 1, 2} (some LiTS files store them as floats)."""
    lo, hi = data.min(), data.max()
    if lo < 0 or hi > 2 or (data.dtype.kind == "f" and np.any(data != np.round(data))):
        values = np.unique(data)
        shown = ", ".join(f"{v:g}" for v in values[:8]) + (" ..." if len(values) > 8 else "")
        raise DataError(f"{path}: found label values {{{shown}}}; expected only 0 (background), "
                        f"1 (liver), 2 (tumor)")
    return data.astype(np.uint8, copy=False)


def load_slice_image(path: str | Path, window: Sequence[float]) -> np.ndarray:
    """Read one 2D slice as float32 (H, W) in [0, 1]: the model's input before resizing.

    `.npy` holds HU and a DICOM file is one CT slice (turned to HU and to the display orientation of
    the slices, see `read_dicom_slice`); both are windowed with `window`, the run's own (training:
    --window, prediction: the checkpoint's), never a default, so a run with another window trains
    and predicts with it. PNG/JPG must be 8-bit and are taken as already windowed (value / 255):
    they hold no HU to window."""
    path = Path(path)
    if _is_dicom_file(path):
        return window_hu(read_dicom_slice(path), window)
    try:
        if path.suffix.lower() == ".npy":
            arr = np.load(path, allow_pickle=False)
            kind = "npy"
        else:
            from PIL import Image
            with Image.open(path) as im:
                if im.mode not in ("L", "RGB", "RGBA", "P", "LA"):
                    raise DataError(f"{path}: found image mode {im.mode}; expected an 8-bit "
                                    f"grayscale or RGB image (or .npy in HU)")
                arr = np.asarray(im.convert("L"))
            kind = "8bit"
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"{path}: cannot read image ({one_line(exc)[:200]}); expected PNG, JPG or NPY") from None
    if arr.ndim != 2:
        raise DataError(f"{path}: found an array of shape {arr.shape}; expected a 2D slice (H, W)")
    if kind == "npy":
        return window_hu(arr, window)
    return arr.astype(np.float32) / 255.0


def load_slice_mask(path: str | Path) -> np.ndarray:
    """Read one 2D mask as uint8 (H, W) with label values in {0, 1, 2}."""
    path = Path(path)
    try:
        if path.suffix.lower() == ".npy":
            arr = np.load(path, allow_pickle=False)
        else:
            from PIL import Image
            with Image.open(path) as im:
                arr = np.asarray(im if im.mode in ("L", "P", "I", "I;16") else im.convert("L"))
    except Exception as exc:
        raise DataError(f"{path}: cannot read mask ({one_line(exc)[:200]}); expected PNG or NPY") from None
    if arr.ndim != 2:
        raise DataError(f"{path}: found an array of shape {arr.shape}; expected a 2D mask (H, W)")
    return check_labels(arr, path)


def write_png(array: np.ndarray, path: Path) -> None:
    """An 8-bit array (H, W) or (H, W, 3) as PNG, written atomically."""
    from PIL import Image
    with _writing(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")


def overlay(ct: torch.Tensor, labels: torch.Tensor | None, alpha: float = 0.45) -> torch.Tensor:
    """CT slice (H, W) in [0, 1] with liver in green and tumor in red -> RGB image (3, H, W).

    Here, not in lit_model, so that predict_segmentation's overlay PNG does not import Lightning;
    TensorBoard's images and train.py's test examples use it too."""
    rgb = ct.float().clamp(0, 1).expand(3, *ct.shape).clone()
    if labels is None:
        return rgb
    for value, colour in ((1, (0.1, 0.8, 0.2)), (2, (0.95, 0.1, 0.1))):
        m = labels == value
        for c in range(3):
            rgb[c][m] = (1 - alpha) * rgb[c][m] + alpha * colour[c]
    return rgb


# --------------------------------------------------------------------------------------------
# DICOM: finding CT series in a folder, reading one into a volume
# --------------------------------------------------------------------------------------------

# Tolerances for a stack of slices to count as one regular volume.
_ORIENTATION_TOL = 1e-3   # direction cosines
_SPACING_TOL = 0.05       # relative deviation of a slice step from the series' median step
_DRIFT_TOL = 0.1          # in-plane drift of slice positions, in pixels (more means gantry tilt)
_SKIP_MODALITIES = {"SEG", "RTSTRUCT", "RTPLAN", "RTDOSE", "RTIMAGE", "SR", "KO", "PR", "REG", "DOC"}
_CT_SOP_CLASSES = {"1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.2.1"}  # CT, Enhanced CT


@dataclass(frozen=True, eq=False)
class DicomSeries:
    """One CT series found in a folder: its files (in no particular order) and what names it."""

    folder: Path                  # the deepest folder holding all its files
    files: tuple[Path, ...]
    uid: str                      # SeriesInstanceUID, "" when the files carry none
    name: str                     # stem of its outputs: the folder's name (+ series number when shared)
    description: str = ""

    @property
    def label(self) -> str:
        """How messages name the series."""
        return f"{self.folder} (series {self.uid or 'without SeriesInstanceUID'}, {len(self.files)} file(s))"


def _has_preamble(path: Path) -> bool:
    """Whether the file starts as DICOM Part 10 files do: "DICM" at byte 128."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def _is_dicom_file(path: Path) -> bool:
    """A `.dcm` file, or any file with the DICOM preamble, whatever its name."""
    if path.suffix.lower() == DICOM_SUFFIX:
        return True
    if path.name.lower().endswith(VOLUME_SUFFIXES) or path.suffix.lower() in IMAGE_SUFFIXES:
        return False
    return _has_preamble(path)


def _read_dicom(path: Path, header_only: bool = False):
    """One DICOM file as a pydicom Dataset; unreadable -> one-line DataError naming the file. It must
    hold an object (SOPClassUID or Modality), except that sorting files into series (`header_only`)
    passes over Part 10 files without one, such as a DICOMDIR: a `.dcm` name alone does not make
    random bytes DICOM.

    pydicom's warnings about odd but readable values are silenced: the rules below decide what is
    acceptable, and a command's stderr stays one line."""
    import pydicom
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, stop_before_pixels=header_only, force=True)
    except Exception as exc:  # pydicom raises many kinds for truncated or foreign files
        raise DataError(f"{path}: cannot read DICOM ({type(exc).__name__}: {one_line(exc)[:160]}); "
                        f"expected a DICOM file") from None
    if "SOPClassUID" not in ds and "Modality" not in ds and not (header_only and _has_preamble(path)):
        raise DataError(f"{path}: found no DICOM header (neither SOPClassUID nor Modality); expected a DICOM file")
    return ds


def _floats(ds, keyword: str, count: int, path: Path) -> np.ndarray:
    value = ds.get(keyword)
    try:
        out = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        out = np.zeros(0)
    if out.shape != (count,) or not np.all(np.isfinite(out)):
        raise DataError(f"{path}: found {keyword} {value!r}; expected {count} numbers")
    return out


def _is_ct_image(ds) -> bool:
    modality = str(ds.get("Modality", "")).upper()
    if modality in _SKIP_MODALITIES:
        return False
    if modality != "CT" and str(ds.get("SOPClassUID", "")) not in _CT_SOP_CLASSES:
        return False
    return "LOCALIZER" not in [str(v).upper() for v in (ds.get("ImageType") or [])]


def _plane(iop: np.ndarray | None) -> str:
    """The anatomical plane closest to a slice orientation (ImageOrientationPatient), by its normal."""
    if iop is None:
        return "unknown"
    normal = np.abs(np.cross(iop[:3], iop[3:]))
    return ("sagittal", "coronal", "axial")[int(np.argmax(normal))]


def _axial_group(uid: str, members: list[dict], noted: bool) -> dict:
    """The one group of files to read among the groups one SeriesInstanceUID spans: scanners store
    coronal and sagittal reformats (ImageType DERIVED\\SECONDARY\\REFORMATTED) in the series of the axial
    slices they were computed from. Its axial slices are the series; the rest are skipped with one
    note line on stderr (`noted`). Files in other frames of reference, or no axial group or several
    with different orientations, cannot be told apart: a DataError."""
    files = ", ".join(str(g["files"][0]) for g in members[:2])
    if len({g["frame"] for g in members}) > 1:
        raise DataError(f"series {uid}: found {len(members)} different frames of reference (FrameOfReferenceUID) "
                        f"among its files (e.g. {files}); expected one per series")
    axial = [g for g in members if _plane(g["iop"]) == "axial"]
    if len(axial) != 1:
        planes = ", ".join(f"{len(g['files'])} {_plane(g['iop'])}" for g in members)
        raise DataError(f"series {uid}: found {len(members)} different orientations (ImageOrientationPatient) "
                        f"among its files ({planes}; e.g. {files}); expected one per series, or one axial stack "
                        f"beside reformats")
    kept = axial[0]
    if noted:
        skipped: dict[str, int] = {}
        for g in members:
            if g is not kept:
                skipped[_plane(g["iop"])] = skipped.get(_plane(g["iop"]), 0) + len(g["files"])
        kinds = sorted({"\\".join(str(v) for v in (g["ds"].get("ImageType") or [])) or "none"
                        for g in members if g is not kept})
        what = " and ".join(f"{n} {plane}" for plane, n in skipped.items())
        sys.stderr.write(f"note: series {uid}: read its {len(kept['files'])} axial slice(s); skipped {what} "
                         f"file(s) of the same series (ImageType {', '.join(kinds)}), e.g. "
                         f"{next(g for g in members if g is not kept)['files'][0]}\n")
    return kept


def find_dicom_series(root: str | Path, series_uid: str | None = None) -> list[DicomSeries]:
    """The CT series among the DICOM files under `root` (any depth; `.dcm` files and files that carry
    the DICOM preamble, whatever their names), sorted by folder and series number.

    Files group by SeriesInstanceUID, frame of reference and orientation (anonymised files may carry
    an empty SeriesInstanceUID); SEG, RTSTRUCT, SR and other non-image objects, non-CT images and
    localiser images are skipped. A series that holds coronal or sagittal reformats beside its axial
    slices is its axial slices (a note on stderr names what was skipped, see `_axial_group`).
    `series_uid` keeps that series only. A series whose files disagree otherwise on orientation, or
    on frame of reference, is a DataError; so is a `series_uid` found nowhere.
    Returns [] when there is no CT series (the caller says what it expected)."""
    root = Path(root)
    groups: list[dict] = []
    for path in (p for p in visible_files(root) if _is_dicom_file(p)):
        ds = _read_dicom(path, header_only=True)
        if not _is_ct_image(ds):
            continue
        uid = str(ds.get("SeriesInstanceUID", "") or "")
        frame = str(ds.get("FrameOfReferenceUID", "") or "")
        iop = ds.get("ImageOrientationPatient")
        iop = _floats(ds, "ImageOrientationPatient", 6, path) if iop is not None else None
        for g in groups:
            same_iop = (iop is None and g["iop"] is None) or (
                iop is not None and g["iop"] is not None and np.abs(iop - g["iop"]).max() <= _ORIENTATION_TOL)
            if g["uid"] == uid and g["frame"] == frame and same_iop:
                g["files"].append(path)
                break
        else:
            groups.append({"uid": uid, "frame": frame, "iop": iop, "files": [path], "ds": ds})
    for uid in sorted({g["uid"] for g in groups if g["uid"]}):
        members = [g for g in groups if g["uid"] == uid]
        if len(members) > 1:
            kept = _axial_group(uid, members, noted=series_uid is None or series_uid == uid)
            groups = [g for g in groups if g["uid"] != uid or g is kept]
    series = []
    for g in groups:
        files = tuple(sorted(g["files"]))
        folder = Path(os.path.commonpath([str(p.parent) for p in files]))
        number = g["ds"].get("SeriesNumber")
        series.append((folder, str(number) if number not in (None, "") else "", g, files))
    series.sort(key=lambda s: (str(s[0]), int(s[1]) if s[1].isdigit() else 1 << 30, s[2]["uid"]))
    out, folders = [], [s[0] for s in series]
    for i, (folder, number, g, files) in enumerate(series):
        name = folder.name or "series"
        if folders.count(folder) > 1:  # several series in one folder: keep their outputs apart
            same = [s[1] for s in series if s[0] == folder]
            name += f"_{number}" if number and same.count(number) == 1 else f"_{i + 1}"
        description = str(g["ds"].get("SeriesDescription", "") or "")
        out.append(DicomSeries(folder, files, g["uid"], name, description))
    if series_uid is None:
        return out
    # Named among all the folder's series above, so a series keeps its output name with --series.
    chosen = [s for s in out if s.uid == series_uid]
    if not chosen:
        known = ", ".join(f"{s.uid or '(no UID)'} ({len(s.files)} files)" for s in out[:6]) or "none"
        raise DataError(f"{root}: found no CT series {series_uid}; expected one of: {known}")
    return chosen


def _hu_of(ds, path: Path) -> np.ndarray:
    """The pixel data of a one-frame CT dataset in HU: pixel * RescaleSlope + RescaleIntercept, (Rows, Columns)."""
    if "PixelData" not in ds:
        raise DataError(f"{path}: found a DICOM {ds.get('Modality', '')} object without pixel data; "
                        f"expected a CT image".replace("  ", " "))
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames != 1:
        raise DataError(f"{path}: found a multi-frame image ({frames} frames); expected one slice per file "
                        f"(CT Image Storage)")
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        raise DataError(f"{path}: found {ds.SamplesPerPixel} samples per pixel; expected a grey-scale CT image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pixels = ds.pixel_array
    except Exception as exc:  # a missing decoder, a truncated file, a corrupt stream
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(syntax, "name", str(syntax))
        raise DataError(f"{path}: cannot decode its pixel data ({name}; {type(exc).__name__}: "
                        f"{one_line(exc)[:160]}); expected a complete, decodable CT image") from None
    if pixels.shape != (int(ds.Rows), int(ds.Columns)):
        raise DataError(f"{path}: found pixel data of shape {pixels.shape}; expected ({ds.Rows}, {ds.Columns})")
    slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
    intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
    return pixels.astype(np.float32) * np.float32(slope) + np.float32(intercept)


def _dicom_affine(iop: np.ndarray, position: np.ndarray, pixel_spacing: np.ndarray,
                  slice_step: np.ndarray) -> np.ndarray:
    """The NIfTI-style affine (RAS) of a file array indexed (column, row, slice), as DICOM's tags give
    it in LPS: column i moves along the row direction (IOP[:3]) by PixelSpacing[1], row j along the
    column direction (IOP[3:]) by PixelSpacing[0], slice k by `slice_step` (a vector, mm)."""
    lps = np.eye(4)
    lps[:3, 0] = iop[:3] * pixel_spacing[1]
    lps[:3, 1] = iop[3:] * pixel_spacing[0]
    lps[:3, 2] = slice_step
    lps[:3, 3] = position
    return _LPS_TO_RAS @ lps


def read_dicom_series(series: DicomSeries) -> tuple[np.ndarray, Geometry]:
    """Read a CT series: HU as float32 slices (Z, H, W) in (S, P, L) order and its Geometry.

    Slices are ordered by their position along the slice normal (ImagePositionPatient . the cross
    product of ImageOrientationPatient's row and column directions), never by file name or
    InstanceNumber; HU = pixel * RescaleSlope + RescaleIntercept, slice by slice. The file array is
    (column, row, position) with the affine the tags describe (`_dicom_affine`), so the series takes
    the path a NIfTI volume takes. A stack that is not one regular volume (a single slice, slices of
    different size or spacing, two at one position, uneven steps such as a missing slice, gantry tilt)
    is a DataError naming the series and the file."""
    label = series.label
    datasets = [(p, _read_dicom(p)) for p in series.files]
    if len(datasets) < 2:
        raise DataError(f"{label}: found a single slice; expected at least 2 slices to form a volume "
                        f"(give the file itself as --input for one slice)")
    first_path, first = datasets[0]
    iop = _floats(first, "ImageOrientationPatient", 6, first_path)
    spacing = _floats(first, "PixelSpacing", 2, first_path)
    size = (int(first.get("Rows") or 0), int(first.get("Columns") or 0))
    normal = np.cross(iop[:3], iop[3:])
    if not np.isclose(np.linalg.norm(normal), 1.0, atol=1e-2):
        raise DataError(f"{first_path}: found ImageOrientationPatient {list(iop)}; expected two orthogonal "
                        f"unit vectors")
    positions, slices = [], []
    for path, ds in datasets:
        if np.abs(_floats(ds, "ImageOrientationPatient", 6, path) - iop).max() > _ORIENTATION_TOL:
            raise DataError(f"{label}: {path} has another orientation than {first_path}; expected one orientation")
        if (int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)) != size:
            raise DataError(f"{label}: {path} has {ds.get('Rows')}x{ds.get('Columns')} pixels where "
                            f"{first_path} has {size[0]}x{size[1]}; expected one slice size")
        if np.abs(_floats(ds, "PixelSpacing", 2, path) - spacing).max() > 1e-3 * spacing.max():
            raise DataError(f"{label}: {path} has PixelSpacing {list(ds.PixelSpacing)} where {first_path} has "
                            f"{list(spacing)}; expected one pixel spacing")
        positions.append(_floats(ds, "ImagePositionPatient", 3, path))
        slices.append(_hu_of(ds, path))
        del ds.PixelData  # the Geometry keeps headers only
    positions = np.array(positions)  # (N, 3) LPS mm
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    along, positions = along[order], positions[order]
    files = [datasets[i][0] for i in order]
    steps = np.diff(along)
    step = float(np.median(steps))
    if steps.min() <= 1e-3 * max(step, 1e-3):
        i = int(np.argmin(steps))
        raise DataError(f"{label}: {files[i]} and {files[i + 1]} lie at the same position ({along[i]:.3f} mm "
                        f"along the slice normal); expected one slice per position")
    uneven = np.abs(steps - step) > max(_SPACING_TOL * step, 1e-2)
    if uneven.any():
        i = int(np.flatnonzero(uneven)[0])
        hint = " (a missing slice?)" if steps[i] > 1.5 * step else ""
        raise DataError(f"{label}: found a step of {steps[i]:.3f} mm between {files[i].name} and "
                        f"{files[i + 1].name} where the series steps {step:.3f} mm{hint}; expected evenly "
                        f"spaced slices")
    offsets = positions - positions[0]
    drift = np.linalg.norm(offsets - np.outer(offsets @ normal, normal), axis=1)  # in-plane part, mm
    if drift.max() > _DRIFT_TOL * spacing.min():
        length = float(along[-1] - along[0])
        angle = float(np.degrees(np.arctan2(drift.max(), length)))
        raise DataError(f"{label}: slice positions drift {drift.max():.2f} mm across the slice plane over "
                        f"{length:.1f} mm (gantry tilt about {angle:.1f} degrees); expected positions along "
                        f"the slice normal (resample the series first)")
    volume = np.stack([slices[i].T for i in order], axis=2)  # (columns, rows, slices)
    affine = _dicom_affine(iop, positions[0], spacing, normal * (along[-1] - along[0]) / (len(along) - 1))
    headers = tuple(datasets[i][1] for i in order)
    geom = Geometry(affine, volume.shape, affine, 1, affine, 1, ("mm", "sec"), label, headers)
    return geom.to_slices(volume), geom


def read_dicom_slice(path: str | Path) -> np.ndarray:
    """One DICOM CT file as a slice: HU float32 (H, W), rows anterior -> posterior and columns patient
    right -> left as the slices of a volume are (from its orientation tags; a file without them is
    taken as displayed). A slice whose plane is not axial is a DataError."""
    path = Path(path)
    ds = _read_dicom(path)
    hu = _hu_of(ds, path)
    if "ImageOrientationPatient" not in ds or "PixelSpacing" not in ds:
        return hu
    iop = _floats(ds, "ImageOrientationPatient", 6, path)
    position = _floats(ds, "ImagePositionPatient", 3, path) if "ImagePositionPatient" in ds else np.zeros(3)
    thickness = float(ds.get("SliceThickness") or 1.0) or 1.0
    affine = _dicom_affine(iop, position, _floats(ds, "PixelSpacing", 2, path),
                           np.cross(iop[:3], iop[3:]) * thickness)
    geom = Geometry(affine, (hu.shape[1], hu.shape[0], 1), source=str(path))
    geom.slice_index(0)  # raises unless the file's slice is axial
    return geom.to_slices(hu.T[:, :, None])[0]


# --------------------------------------------------------------------------------------------
# Inputs of the predict scripts
# --------------------------------------------------------------------------------------------

def visible_files(root: Path):
    """Files under `root`, sorted, at any depth. Hidden files are skipped: the MSD archive ships
    macOS "._liver_N.nii.gz" companions."""
    for p in sorted(root.rglob("*")):
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts):
            yield p


def input_kind(path: Path) -> str | None:
    """The kind of an input file: volume (NIfTI), image (a 2D slice file, a lone DICOM file among
    them) or None."""
    name = path.name.lower()
    if name.endswith(VOLUME_SUFFIXES):
        return "volume"
    if path.suffix.lower() in IMAGE_SUFFIXES or _is_dicom_file(path):
        return "image"
    return None


def find_inputs(path: str | Path, series: str | None = None) -> list[tuple[Path | DicomSeries, str]]:
    """What --input names, as (item, kind) pairs: kind "volume" for a NIfTI file (item a Path) or a
    DICOM CT series (item a DicomSeries), "image" for a 2D slice file (PNG, JPG, NPY, one DICOM file).

    A file is one item. A folder gives its NIfTI volumes and slices (top level, sorted by name;
    hidden files, the predict scripts' own outputs and LiTS `segmentation-N.nii[.gz]` skipped) and
    every CT series among its DICOM files (any depth; see `find_dicom_series`) that holds more than
    one slice (see `_without_lone_slices`). `series` picks one DICOM series by SeriesInstanceUID and
    nothing else."""
    path = Path(path)
    expected = ("a NIfTI volume (.nii, .nii.gz), a 2D slice (.png, .jpg, .npy, .dcm), a folder holding a "
                "DICOM CT series, or a folder of them")
    if path.is_file():
        if series is not None:
            raise DataError(f"{path}: found --series with a file; expected a folder of DICOM files")
        kind = input_kind(path)
        if kind is None:
            raise DataError(f"{path}: found a {''.join(path.suffixes) or 'file without extension'}; expected {expected}")
        return [(path, kind)]
    if not path.is_dir():
        raise DataError(f"{path}: input not found; expected {expected}")
    found: list[tuple[Path | DicomSeries, str]] = []
    if series is None:
        for p in sorted(path.iterdir()):
            if p.is_file() and not p.name.startswith(".") and not _SKIPPED.search(p.name) and not _is_dicom_file(p):
                kind = input_kind(p)
                if kind is not None:
                    found.append((p, kind))
    dicom = find_dicom_series(path, series)
    if series is None:
        dicom = _without_lone_slices(path, dicom, beside=bool(found))
    found += [(s, "volume") for s in dicom]
    if not found:
        raise DataError(f"{path}: found no volumes or slices in this folder, nor a DICOM CT series at any depth "
                        f"({_folder_summary(path)}); expected {expected}")
    return found


def _without_lone_slices(root: Path, series: list[DicomSeries], beside: bool = False) -> list[DicomSeries]:
    """The series of a folder that can be volumes: those of one file (a lone slice, a dose report
    page, or files each written as a series of its own) cannot. Beside other inputs (`beside`, or
    series of several slices) they are skipped with one note line on stderr; alone they are a
    DataError that says what was found."""
    lone = [s for s in series if len(s.files) == 1]
    if not lone:
        return series
    rest = [s for s in series if len(s.files) > 1]
    names = ", ".join(s.files[0].name for s in lone[:3]) + (", ..." if len(lone) > 3 else "")
    if rest or beside:
        sys.stderr.write(f"note: {root}: skipped {len(lone)} DICOM CT file(s) that are each a series of a single "
                         f"slice ({names}); give such a file as --input to predict that slice alone\n")
        return rest
    if len(lone) == 1:
        raise DataError(f"{root}: found one DICOM CT file, {names}, a series of a single slice; expected at least 2 "
                        f"slices of a series to form a volume (give the file itself as --input for one slice)")
    raise DataError(f"{root}: found {len(lone)} DICOM CT files that are each a series of a single slice "
                    f"({len({s.uid for s in lone})} different SeriesInstanceUIDs; {names}); expected at least 2 "
                    f"slices sharing one SeriesInstanceUID to form a volume (give one file as --input for one slice)")


def _folder_summary(root: Path) -> str:
    """What a folder without inputs holds, for the error message: DICOM objects by modality, other files."""
    modalities: dict[str, int] = {}
    others = 0
    for p in visible_files(root):
        if _is_dicom_file(p):
            try:
                modality = str(_read_dicom(p, header_only=True).get("Modality", "") or "no modality")
            except DataError:
                modality = "unreadable"
            modalities[modality] = modalities.get(modality, 0) + 1
        else:
            others += 1
    found = [f"DICOM {m}: {n}" for m, n in sorted(modalities.items())]
    return ", ".join(found + [f"{others} other file(s)"])


def input_name(item: Path | DicomSeries) -> tuple[str, Path]:
    """(stem, folder) of an input from `find_inputs`: the stem its outputs and table rows are named by
    (a NIfTI file's name without suffix, a slice's stem, a series' folder name) and the folder its
    outputs go to by default (beside the file; beside the series' folder, never inside it)."""
    if isinstance(item, DicomSeries):
        return item.name, item.folder.parent
    return (strip_nifti_suffix(item.name) if item.name.lower().endswith(VOLUME_SUFFIXES) else item.stem), item.parent


def one_volume(path: Path, inputs: list[tuple[Path | DicomSeries, str]]) -> bool:
    """Whether `find_inputs(path)` gave one volume alone: a NIfTI file, or a folder that holds exactly
    one DICOM series (or one picked by --series). Flags such as --slice need that."""
    return (len(inputs) == 1 and inputs[0][1] == "volume"
            and (Path(path).is_file() or isinstance(inputs[0][0], DicomSeries)))


def read_volume(source: str | Path | DicomSeries, dtype=np.float32) -> tuple[np.ndarray, Geometry]:
    """Any CT volume: HU as slices (Z, H, W) in (S, P, L) order, float32 by default, and its Geometry.

    `source` is a NIfTI file, a DicomSeries (from `find_inputs` or `find_dicom_series`), or a folder
    holding exactly one DICOM CT series. `dtype=None`: a NIfTI file's values as stored, as a view
    (`load_volume`); a DICOM series is float32 either way."""
    if isinstance(source, DicomSeries):
        return read_dicom_series(source)
    path = Path(source)
    if path.is_dir():
        found = _without_lone_slices(path, find_dicom_series(path))
        if len(found) != 1:
            raise DataError(f"{path}: found {len(found)} DICOM CT series; expected exactly one (pick one with "
                            f"--series UID)")
        return read_dicom_series(found[0])
    if _is_dicom_file(path):
        raise DataError(f"{path}: found a single DICOM file; expected a folder holding the whole series "
                        f"for a volume")
    return load_volume(path, dtype)


# --------------------------------------------------------------------------------------------
# Writing label volumes: NIfTI on the input's grid, or a DICOM Segmentation of a DICOM input
# --------------------------------------------------------------------------------------------

def write_labels(labels: np.ndarray, geometry: Geometry, path: str | Path) -> None:
    """Write labels (Z, H, W) uint8 in {0, 1, 2}, in slices order, back on the input's own grid.

    `.nii` / `.nii.gz`: the file's voxel order, affine, qform and sform (codes included), so it overlays
    the CT voxel for voxel (for a DICOM input, the series' grid in RAS). `.dcm`: a DICOM Segmentation
    of the source series (`write_dicom_seg`); the geometry must come from a DICOM series."""
    path = Path(path)
    file_labels = geometry.to_file(np.asarray(labels, dtype=np.uint8))
    name = path.name.lower()
    if name.endswith(VOLUME_SUFFIXES):
        _write_nifti_labels(file_labels, geometry, path)
    elif name.endswith(DICOM_SUFFIX):
        if not geometry.dicom:
            raise DataError(f"{path}: found a DICOM SEG output for a non-DICOM input ({geometry.source}); "
                            f"expected .nii or .nii.gz (a SEG must reference a DICOM series)")
        write_dicom_seg(file_labels, geometry, path)
    else:
        raise DataError(f"{path}: found output suffix {''.join(path.suffixes) or 'none'}; expected .nii, .nii.gz "
                        f"or (for a DICOM input) .dcm")


def _write_nifti_labels(file_labels: np.ndarray, geometry: Geometry, path: Path) -> None:
    img = nib.Nifti1Image(np.asfortranarray(file_labels, dtype=np.uint8), geometry.affine)
    img.set_qform(geometry.qform if geometry.qform_code else None, code=geometry.qform_code or None)
    img.set_sform(geometry.sform if geometry.sform_code else None, code=geometry.sform_code or None)
    img.header.set_xyzt_units(*geometry.xyzt_units)
    img.set_data_dtype(np.uint8)
    img.header.set_slope_inter(None, None)  # labels are stored as they are, never scaled
    with _writing(path) as tmp:
        nib.save(img, tmp)


# Attributes highdicom copies from the source images into a SEG. Identifiers missing from the source
# (older and public series, e.g. 3D-IRCADb without FrameOfReferenceUID) are generated, the rest
# (Type 2: present, may be empty) are left empty.
_SEG_SERIES_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID")
_SEG_EMPTY_OK = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
                 "StudyDate", "StudyTime", "ReferringPhysicianName")


def _seg_sources(geometry: Geometry) -> tuple[list, list[str]]:
    """In-memory copies of the source headers with what a SEG needs of them filled in, and the names
    of the attributes that had to be generated or left empty."""
    from pydicom.uid import generate_uid
    sources = [copy.deepcopy(ds) for ds in geometry.dicom]
    filled: list[str] = []
    for keyword in _SEG_SERIES_UIDS:  # one value for the whole series
        if any(not str(ds.get(keyword, "") or "") for ds in sources):
            uid = next((str(ds.get(keyword)) for ds in sources if str(ds.get(keyword, "") or "")), None) or generate_uid()
            for ds in sources:
                setattr(ds, keyword, uid)
            filled.append(keyword)
    if any(not str(ds.get("SOPInstanceUID", "") or "") for ds in sources):
        for ds in sources:
            if not str(ds.get("SOPInstanceUID", "") or ""):
                ds.SOPInstanceUID = generate_uid()
        filled.append("SOPInstanceUID")
    for ds in sources:
        if not str(ds.get("SOPClassUID", "") or ""):
            ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        if not str(ds.get("Modality", "") or ""):
            ds.Modality = "CT"
    for keyword in _SEG_EMPTY_OK:
        if any(keyword not in ds for ds in sources):
            for ds in sources:
                if keyword not in ds:
                    setattr(ds, keyword, "")
            filled.append(keyword)
    return sources, filled


def write_dicom_seg(file_labels: np.ndarray, geometry: Geometry, path: str | Path) -> None:
    """A DICOM Segmentation (BINARY) of labels in the file order of a DICOM geometry (columns, rows,
    slices): one frame per source slice that holds a label, at that slice's position, referencing it;
    segment 1 "Liver" (label 1: liver parenchyma, SCT 10200004) and segment 2 "Liver tumor" (label 2,
    SCT 108369006 Neoplasm in the liver). Liver as LiTS counts it is both segments together.

    Source series that lack identifiers the SEG requires still get one: they are generated on
    in-memory copies (the input files are never touched) and one warning line says so."""
    import highdicom as hd
    from pydicom.sr.codedict import codes
    path = Path(path)
    if file_labels.shape != tuple(geometry.shape) or len(geometry.dicom) != geometry.shape[2]:
        raise ValueError(f"labels {file_labels.shape} do not fit the geometry {geometry.shape} with "
                         f"{len(geometry.dicom)} source slices")
    sources, filled = _seg_sources(geometry)
    if filled:
        sys.stderr.write(f"warning: {geometry.source}: the source files lack {', '.join(filled)}; the SEG "
                         f"carries generated identifiers or empty values for them (input files unchanged)\n")
    algorithm = hd.AlgorithmIdentificationSequence(name="LiTS liver and tumor U-Net", version="1",
                                                   family=codes.cid7162.ArtificialIntelligence)
    automatic = hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC
    segments = [
        hd.seg.SegmentDescription(1, "Liver", codes.SCT.AnatomicalStructure, codes.SCT.Liver, automatic,
                                  algorithm, tracking_uid=hd.UID(), tracking_id="liver"),
        hd.seg.SegmentDescription(2, "Liver tumor", codes.SCT.MorphologicallyAbnormalStructure,
                                  codes.SCT.Neoplasm, automatic, algorithm, tracking_uid=hd.UID(),
                                  tracking_id="liver tumor", anatomic_regions=[codes.SCT.Liver]),
    ]
    frames = np.ascontiguousarray(np.transpose(file_labels, (2, 1, 0)))  # (slices, rows, columns) uint8 0/1/2
    src = sources[0]
    number = str(src.get("SeriesNumber", "") or "")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            seg = hd.seg.Segmentation(
                source_images=sources, pixel_array=frames, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
                segment_descriptions=segments, series_instance_uid=hd.UID(),
                series_number=int(number) + 1000 if number.isdigit() else 1000, sop_instance_uid=hd.UID(),
                instance_number=1, manufacturer="liver-tumor-lits (open source)", manufacturer_model_name="U-Net",
                software_versions="1", device_serial_number="none", series_description="Liver and tumor segmentation",
                omit_empty_frames=bool(frames.any()))
    except (ValueError, TypeError, AttributeError) as exc:
        raise DataError(f"{geometry.source}: cannot build a DICOM SEG from this series ({type(exc).__name__}: "
                        f"{one_line(exc)[:160]}); expected a CT series with the usual patient and study "
                        f"attributes") from None
    with _writing(path) as tmp:
        seg.save_as(tmp)
