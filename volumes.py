"""CT and label volumes in and out: NIfTI and 2D slices, in one place.

    hu, geom = read_volume("volume-7.nii")             # (Z, H, W) HU in (S, P, L) order, and its Geometry
    write_labels(labels, geom, "volume-7_seg.nii.gz")  # back on the input's own grid

Training (`dataset.py`) and both predict scripts read files through this module only, and the HU
window and the resizing that turn a slice into model input live here too, so training and prediction
cannot drift apart.

Orientation: every volume is brought to nibabel's closest canonical orientation and handed out as
axial slices in radiological display order, axis codes (S, P, L): axis 0 runs inferior -> superior,
rows run anterior -> posterior (anterior at the top), columns run patient right -> left (patient
right on the image left). `Geometry` keeps the way back to the file's own voxel order, and everything a writer needs.
"""
from __future__ import annotations

import os
import re
import sys
import tempfile
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform

WINDOW_HU: tuple[float, float] = (-200.0, 250.0)
SEG_CLASSES: tuple[str, ...] = ("background", "liver", "tumor")  # label values 0, 1, 2 of every label volume
CLS_CLASSES: tuple[str, ...] = ("healthy", "tumor")  # slice classes 0, 1
SLICE_AXCODES: tuple[str, str, str] = ("S", "P", "L")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".npy")
VOLUME_SUFFIXES = (".nii", ".nii.gz")
# Files a folder run skips: the predict scripts' own outputs and LiTS label volumes (they are not CT).
_SKIPPED = re.compile(r"(_seg\.nii(\.gz)?|_mask\.png|_overlay\.png)$|^segmentation-\d+\.nii(\.gz)?$")


class DataError(ValueError):
    """A problem with the user's data: the message is one line naming the file, what was found
    and what was expected. Command-line entry points print it and exit with status 2."""


def one_line(text: object) -> str:
    return " ".join(str(text).split())


def run_cli(entry, parser, argv=None) -> int:
    """Run `entry(args)`; a user-input error becomes one line on stderr and exit status 2."""
    args = parser.parse_args(argv)
    try:
        rc = entry(args)
        return rc if isinstance(rc, int) else 0
    except DataError as exc:
        sys.stderr.write(f"error: {one_line(exc)}\n")
        return 2


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
    the input. Immutable; `spacing` is derived from the affine."""

    affine: np.ndarray                   # (4, 4) the file's voxel -> world (RAS, mm) matrix
    shape: tuple[int, int, int]          # the file's own array shape
    qform: np.ndarray | None = None      # NIfTI header matrices and codes, carried to label files
    qform_code: int = 1
    sform: np.ndarray | None = None
    sform_code: int = 1
    xyzt_units: tuple[str, str] = ("mm", "sec")
    source: str = ""                     # the input, as messages name it
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

    def to_slices(self, volume: np.ndarray) -> np.ndarray:
        """File voxel order -> slices (Z, H, W) in (S, P, L) order."""
        return np.ascontiguousarray(apply_orientation(volume, self._to_slices))

    def to_file(self, slices: np.ndarray) -> np.ndarray:
        """Slices (Z, H, W) -> the file's own voxel order; the inverse of `to_slices`."""
        out = np.ascontiguousarray(apply_orientation(slices, self._to_file))
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

    def one_slice(self, k: int) -> Geometry:
        """The geometry of the file's slice k alone: shape (X, Y, 1), placed where slice k lies in the
        world (affine, qform and sform shifted by k slices)."""
        if not 0 <= k < self.shape[2]:
            raise ValueError(f"slice {k} is outside 0..{self.shape[2] - 1}")
        shift = np.eye(4)
        shift[2, 3] = k
        moved = [None if m is None else m @ shift for m in (self.affine, self.qform, self.sform)]
        return Geometry(moved[0], (*self.shape[:2], 1), moved[1], self.qform_code, moved[2], self.sform_code,
                        self.xyzt_units, self.source)


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


def load_volume(path: str | Path) -> tuple[np.ndarray, Geometry]:
    """Read a NIfTI CT volume: returns HU as float32 slices (Z, H, W) in (S, P, L) order and its Geometry."""
    path = Path(path)
    img, data = read_nifti(path)
    geom = Geometry.of_nifti(img, data.shape, str(path))
    return geom.to_slices(data.astype(np.float32, copy=False)), geom


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


def check_labels(data: np.ndarray, path: Path) -> np.ndarray:
    """Labels must be whole numbers in {0, 1, 2} (some LiTS files store them as floats)."""
    lo, hi = data.min(), data.max()
    if lo < 0 or hi > 2 or (data.dtype.kind == "f" and np.any(data != np.round(data))):
        values = np.unique(data)
        shown = ", ".join(f"{v:g}" for v in values[:8]) + (" ..." if len(values) > 8 else "")
        raise DataError(f"{path}: found label values {{{shown}}}; expected only 0 (background), "
                        f"1 (liver), 2 (tumor)")
    return data.astype(np.uint8, copy=False)


def load_slice_image(path: str | Path) -> np.ndarray:
    """Read one 2D slice as float32 (H, W) in [0, 1].

    PNG/JPG must be 8-bit and are taken as already windowed (value / 255); `.npy` holds HU and is
    windowed with the default window."""
    path = Path(path)
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
        return window_hu(arr)
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
    """The kind of an input file: volume (NIfTI), image (a 2D slice file) or None."""
    name = path.name.lower()
    if name.endswith(VOLUME_SUFFIXES):
        return "volume"
    return "image" if path.suffix.lower() in IMAGE_SUFFIXES else None


def find_inputs(path: str | Path) -> list[tuple[Path, str]]:
    """A file, or the volumes and slices of a folder (not recursive), as (path, kind) sorted by name.

    A folder run skips hidden files, the predict scripts' own outputs (`*_seg.nii.gz`, `*_mask.png`,
    `*_overlay.png`) and LiTS label volumes (`segmentation-N.nii[.gz]`)."""
    path = Path(path)
    expected = "a NIfTI volume (.nii, .nii.gz), a 2D slice (.png, .jpg, .npy) or a folder of them"
    if path.is_file():
        kind = input_kind(path)
        if kind is None:
            raise DataError(f"{path}: found a {''.join(path.suffixes) or 'file without extension'}; expected {expected}")
        return [(path, kind)]
    if path.is_dir():
        found = [(p, input_kind(p)) for p in sorted(path.iterdir())
                 if p.is_file() and not p.name.startswith(".") and not _SKIPPED.search(p.name)]
        found = [(p, k) for p, k in found if k is not None]
        if not found:
            raise DataError(f"{path}: found no volumes or slices in this folder; expected {expected}")
        return found
    raise DataError(f"{path}: input not found; expected {expected}")


def input_name(item: Path) -> tuple[str, Path]:
    """(stem, folder) of an input from `find_inputs`: the stem its outputs and table rows are named by
    (a NIfTI file's name without suffix, a slice's stem) and the folder its outputs go to by default."""
    return (strip_nifti_suffix(item.name) if item.name.lower().endswith(VOLUME_SUFFIXES) else item.stem), item.parent


def one_volume(path: Path, inputs: list[tuple[Path, str]]) -> bool:
    """Whether `find_inputs(path)` gave one volume alone (a NIfTI file). Flags such as --slice need that."""
    return len(inputs) == 1 and inputs[0][1] == "volume" and Path(path).is_file()


def read_volume(source: str | Path) -> tuple[np.ndarray, Geometry]:
    """Any CT volume: HU as float32 slices (Z, H, W) in (S, P, L) order and its Geometry."""
    return load_volume(source)


# --------------------------------------------------------------------------------------------
# Writing label volumes: NIfTI on the input's grid
# --------------------------------------------------------------------------------------------

def write_labels(labels: np.ndarray, geometry: Geometry, path: str | Path) -> None:
    """Write labels (Z, H, W) uint8 in {0, 1, 2}, in slices order, back on the input's own grid.

    `.nii` / `.nii.gz`: the file's voxel order, affine, qform and sform (codes included), so it overlays
    the CT voxel for voxel."""
    path = Path(path)
    file_labels = geometry.to_file(np.asarray(labels, dtype=np.uint8))
    name = path.name.lower()
    if name.endswith(VOLUME_SUFFIXES):
        _write_nifti_labels(file_labels, geometry, path)
    else:
        raise DataError(f"{path}: found output suffix {''.join(path.suffixes) or 'none'}; expected .nii or .nii.gz")


def _write_nifti_labels(file_labels: np.ndarray, geometry: Geometry, path: Path) -> None:
    img = nib.Nifti1Image(np.ascontiguousarray(file_labels, dtype=np.uint8), geometry.affine)
    img.set_qform(geometry.qform if geometry.qform_code else None, code=geometry.qform_code or None)
    img.set_sform(geometry.sform if geometry.sform_code else None, code=geometry.sform_code or None)
    img.header.set_xyzt_units(*geometry.xyzt_units)
    img.set_data_dtype(np.uint8)
    img.header.set_slope_inter(None, None)  # labels are stored as they are, never scaled
    with _writing(path) as tmp:
        nib.save(img, tmp)
