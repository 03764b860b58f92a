"""Annotated CT that comes as DICOM, as training and scoring data: 3D-IRCADb's image and mask series, and
CT series labelled by DICOM Segmentation objects (TCIA collections such as HCC-TACE-Seg).

    cases = find_dicom_cases("/data/3Dircadb1")              # [] when the folder holds neither layout
    hu, labels, geom = load_dicom_case(cases[0])              # (Z, H, W) HU, (Z, H, W) uint8 0/1/2, Geometry

Two layouts, found at any depth:

- 3D-IRCADb ("ircadb"): a folder per patient holding `PATIENT_DICOM/` and `MASKS_DICOM/` (folders, or the
  `.zip` files as distributed). Liver (1) is the `liver` mask, tumour (2) the union of the `livertumor*`
  masks; any other structure (a `tumor` folder outside the liver included) counts as tumour only when
  named in `DicomOptions.ircadb_tumor`. Each mask series must lie on the CT's grid, slice for slice.
- DICOM SEG ("dicomseg"): CT series and SEG files; a case per referenced CT series (the series a SEG's
  frames derive from), its labels from every SEG that references it. Series no SEG references are
  ignored. Segments are chosen by label (`DicomOptions`), frames placed by the instances they reference,
  or by their positions where they reference none.

The CT goes through `volumes.read_dicom_series`, the reader prediction uses, so orientation, HU and the
canonical (S, P, L) slices are the same code; the labels are built in the series' file order
(columns, rows, slices) and turned into slices by the same `Geometry`.
"""
from __future__ import annotations

import argparse
import os
import re
import tempfile
import warnings
import zipfile
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from volumes import DataError, DicomSeries, Geometry, find_dicom_series, one_line, read_dicom_series, visible_files

LAYOUTS = ("ircadb", "dicomseg")
IRCADB_IMAGE, IRCADB_MASKS = "PATIENT_DICOM", "MASKS_DICOM"
IRCADB_LIVER = "liver"
_IRCADB_TUMOR = re.compile(r"^livertumou?r", re.IGNORECASE)  # livertumor01..07, livertumor1, livertumors
# Default segment choice: a label naming a tumour is tumour; a label naming the liver and no tumour is liver
# (so "Liver tumor", as predict_segmentation.py writes it, is tumour, and "Liver" liver).
_SEG_TUMOR = re.compile(r"tumou?r|lesion|mass|neoplasm|carcinoma|\bhcc\b", re.IGNORECASE)
_SEG_LIVER = re.compile(r"liver", re.IGNORECASE)
_POSITION_TOL_MM = 0.01
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class DicomOptions:
    """Which structures and segments make the labels. Empty tuples mean the defaults (module docstring)."""

    ircadb_tumor: tuple[str, ...] = ()   # further 3D-IRCADb mask folders counted as liver tumour, e.g. "tumor"
    seg_liver: tuple[str, ...] = ()      # SEG segment labels taken as liver (exact, case-insensitive)
    seg_tumor: tuple[str, ...] = ()      # SEG segment labels taken as tumour (exact, case-insensitive)

    def as_record(self) -> tuple:
        """What a cache entry must match: a change of choice reads the labels again."""
        return tuple((k, v) for k, v in (("ircadb_tumor", self.ircadb_tumor), ("seg_liver", self.seg_liver),
                                         ("seg_tumor", self.seg_tumor)) if v)


@dataclass(frozen=True)
class DicomCase:
    """One case of a DICOM layout, with the fields of `dataset.Case` (images, labels: every file read,
    for the cache's fingerprint) and what loading it needs."""

    case_id: str
    layout: str                       # "ircadb" or "dicomseg"
    images: tuple[Path, ...]          # ircadb: PATIENT_DICOM's files or its .zip; dicomseg: the CT series' files
    labels: tuple[Path, ...]          # ircadb: the chosen mask files or MASKS_DICOM.zip; dicomseg: the SEG files
    options: tuple = ()               # DicomOptions.as_record(), part of the cache fingerprint
    folder: Path = field(default=Path("."), compare=False)  # ircadb: the patient folder; dicomseg: the series'
    series_uid: str = ""

    @property
    def name(self) -> str:
        return self.case_id

    def __str__(self) -> str:  # how messages name the case
        return str(self.folder)


def safe_id(text: str) -> str:
    """A case id usable as a file name in the cache (ids name the cache's .npy files)."""
    return _SAFE.sub("_", text).strip("_") or "case"


def _options_of(record: tuple) -> DicomOptions:
    return DicomOptions(**dict(record))


# --------------------------------------------------------------------------------------------
# Command-line flags shared by train.py, dataset.py and evaluate.py
# --------------------------------------------------------------------------------------------

def add_dicom_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags that choose labels in the DICOM layouts (the same in every command)."""
    parser.add_argument("--ircadb-tumor", action="append", default=[], metavar="STRUCTURE",
                        help="3D-IRCADb: also count this MASKS_DICOM structure as liver tumour, e.g. 'tumor' "
                             "(repeatable; default: the livertumor* masks only)")
    parser.add_argument("--seg-liver", action="append", default=[], metavar="LABEL",
                        help="DICOM SEG: take segments with this label as liver (repeatable, case-insensitive; "
                             "default: labels naming the liver and no tumour, e.g. 'Liver')")
    parser.add_argument("--seg-tumor", action="append", default=[], metavar="LABEL",
                        help="DICOM SEG: take segments with this label as tumour (repeatable, case-insensitive; "
                             "default: labels naming a tumour, lesion, mass, neoplasm, carcinoma or HCC)")


def options_from_args(args: argparse.Namespace) -> DicomOptions:
    def norm(values) -> tuple[str, ...]:
        return tuple(sorted({v.strip() for v in (values or []) if v.strip()}, key=str.lower))
    return DicomOptions(norm(getattr(args, "ircadb_tumor", ())), norm(getattr(args, "seg_liver", ())),
                        norm(getattr(args, "seg_tumor", ())))


# --------------------------------------------------------------------------------------------
# Finding cases
# --------------------------------------------------------------------------------------------

def find_dicom_cases(root: str | Path, options: DicomOptions | None = None) -> list[DicomCase]:
    """The cases under `root` in the 3D-IRCADb layout, else in the DICOM SEG layout; [] when neither."""
    root = Path(root)
    options = options or DicomOptions()
    cases = find_ircadb_cases(root, options)
    return cases if cases else find_seg_cases(root, options)


def _ircadb_part(folder: Path, part: str) -> Path | None:
    for p in (folder / part, folder / f"{part}.zip"):
        if p.exists():
            return p
    return None


def find_ircadb_cases(root: Path, options: DicomOptions) -> list[DicomCase]:
    """Patient folders (any depth) holding PATIENT_DICOM and MASKS_DICOM, folder or .zip, sorted."""
    cases = []
    for folder, dirs, files in os.walk(root):
        names = set(dirs) | set(files)
        # Never walk into a patient's own series (thousands of files) or hidden folders.
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in (IRCADB_IMAGE, IRCADB_MASKS))
        has_image = IRCADB_IMAGE in names or f"{IRCADB_IMAGE}.zip" in names
        has_masks = IRCADB_MASKS in names or f"{IRCADB_MASKS}.zip" in names
        if not (has_image or has_masks):
            continue
        folder = Path(folder)
        if not has_masks:
            raise DataError(f"{folder}: found {IRCADB_IMAGE} without {IRCADB_MASKS}; expected both (folders or "
                            f".zip files) in each 3D-IRCADb patient folder")
        if not has_image:
            raise DataError(f"{folder}: found {IRCADB_MASKS} without {IRCADB_IMAGE}; expected both (folders or "
                            f".zip files) in each 3D-IRCADb patient folder")
        image, masks = _ircadb_part(folder, IRCADB_IMAGE), _ircadb_part(folder, IRCADB_MASKS)
        images = (image,) if image.is_file() else tuple(visible_files(image))
        if masks.is_file():
            labels = (masks,)
        else:
            chosen = {IRCADB_LIVER, *(s.lower() for s in options.ircadb_tumor)}
            labels = tuple(p for p in visible_files(masks)
                           if p.parent.parent == masks and (p.parent.name.lower() in chosen
                                                            or _IRCADB_TUMOR.match(p.parent.name)))
        case_id = safe_id(folder.name if folder != root else root.name)
        cases.append(DicomCase(case_id, "ircadb", images, labels, options.as_record(), folder))
    _check_unique(cases, root)
    return sorted(cases, key=lambda c: _natural(c.case_id))


def _natural(text: str) -> list:
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", text)]


def _check_unique(cases: Sequence[DicomCase], root: Path) -> None:
    seen: dict[str, DicomCase] = {}
    for c in cases:
        if c.case_id in seen:
            raise DataError(f"{c.folder}: case id {c.case_id} also names {seen[c.case_id].folder}; expected one "
                            f"folder name per patient under {root}")
        seen[c.case_id] = c


def _read_header(path: Path):
    import pydicom
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return pydicom.dcmread(path, stop_before_pixels=True, force=True)
    except Exception as exc:  # pydicom raises many kinds for truncated or foreign files
        raise DataError(f"{path}: cannot read DICOM ({type(exc).__name__}: {one_line(exc)[:160]}); "
                        f"expected a DICOM file") from None


def _looks_dicom(path: Path) -> bool:
    if path.suffix.lower() == ".dcm":
        return True
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return head[128:132] == b"DICM"


def _seg_references(ds) -> set[str]:
    """The series a SEG's header says its frames derive from."""
    found = {str(item.get("SeriesInstanceUID", "")) for item in ds.get("ReferencedSeriesSequence", [])}
    return {uid for uid in found if uid}


def find_seg_cases(root: Path, options: DicomOptions) -> list[DicomCase]:
    """A case per CT series that DICOM SEG files under `root` reference; [] when `root` holds no SEG."""
    segs: dict[str, list[Path]] = {}
    for path in (p for p in visible_files(root) if _looks_dicom(p)):
        ds = _read_header(path)
        if str(ds.get("Modality", "")).upper() != "SEG":
            continue
        refs = _seg_references(ds)
        if len(refs) != 1:
            raise DataError(f"{path}: a DICOM SEG referencing {len(refs)} series "
                            f"({', '.join(sorted(refs)) or 'none in ReferencedSeriesSequence'}); expected the one "
                            f"CT series its frames were drawn on")
        segs.setdefault(refs.pop(), []).append(path)
    if not segs:
        return []
    series = {s.uid: s for s in find_dicom_series(root) if s.uid}
    cases = []
    for uid, paths in segs.items():
        if uid not in series:
            known = ", ".join(f"{s.uid} ({s.folder.name})" for s in list(series.values())[:4]) or "none"
            raise DataError(f"{paths[0]}: a DICOM SEG referencing series {uid}, which is not among the CT series "
                            f"under {root} (found: {known}); expected the referenced CT series beside its SEG")
        s = series[uid]
        rel = s.folder.relative_to(root) if s.folder != root else Path(root.name)
        cases.append((rel, s, tuple(sorted(paths))))
    # The case id is the folder under `root` that holds the study (a patient folder in TCIA's layout);
    # studies that share it are numbered.
    tops = [rel.parts[0] for rel, _, _ in cases]
    out = []
    for (rel, s, paths), top in sorted(zip(cases, tops), key=lambda t: (_natural(str(t[0][0])), t[0][1].uid)):
        case_id = safe_id(top)
        if tops.count(top) > 1:
            case_id += f"_{sum(1 for c in out if c.case_id.startswith(safe_id(top) + '_')) + 1}"
        out.append(DicomCase(case_id, "dicomseg", s.files, paths, options.as_record(), s.folder, uid))
    _check_unique(out, root)
    return out


# --------------------------------------------------------------------------------------------
# Loading a case: CT through volumes.py, labels on its grid
# --------------------------------------------------------------------------------------------

def load_dicom_case(case) -> tuple[np.ndarray, np.ndarray, Geometry]:
    """A case of a DICOM layout (a DicomCase, or a `dataset.Case` made from one): HU slices (Z, H, W)
    float32 in (S, P, L) order, labels (Z, H, W) uint8 in {0, 1, 2} on the same slices, and the CT's
    Geometry (`geom.to_file(labels)` is the label volume on the series' own grid)."""
    options = _options_of(getattr(case, "options", ()))
    if case.layout == "ircadb":
        return _load_ircadb(case, options)
    if case.layout == "dicomseg":
        return _load_seg(case, options)
    raise ValueError(f"not a DICOM layout: {case.layout!r}")


def ground_truth_image(case):
    """The labels of a case on its CT series' grid, as an in-memory NIfTI image and its array (the file's
    voxel order), for scoring predictions written on that grid (`evaluate.py --gt`)."""
    import nibabel as nib
    _, labels, geom = load_dicom_case(case)
    file_labels = geom.to_file(labels)
    img = nib.Nifti1Image(file_labels, geom.affine)
    return img, file_labels


@contextmanager
def _unzipped(path: Path, part: str):
    """A folder holding `part` (PATIENT_DICOM or MASKS_DICOM): the folder itself, or a .zip extracted to a
    temporary folder (removed afterwards). zipfile keeps members inside the target folder."""
    if path.is_dir():
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="ircadb-") as tmp:
        try:
            with zipfile.ZipFile(path) as zf:
                zf.extractall(tmp)
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            raise DataError(f"{path}: cannot read the zip file ({type(exc).__name__}: {one_line(exc)[:120]}); "
                            f"expected {part}.zip as 3D-IRCADb distributes it") from None
        inner = Path(tmp) / part
        yield inner if inner.is_dir() else Path(tmp)


def _mask_pixels(ds, path: Path) -> np.ndarray:
    """A mask slice's values as DICOM defines them (rescale applied where the file sets one)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pixels = ds.pixel_array
    except Exception as exc:
        raise DataError(f"{path}: cannot decode its pixel data ({type(exc).__name__}: {one_line(exc)[:120]}); "
                        f"expected a mask image") from None
    slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
    intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
    return pixels.astype(np.float32) * np.float32(slope) + np.float32(intercept)


def _read_mask_series(folder: Path, geom: Geometry, structure: str) -> np.ndarray:
    """A 3D-IRCADb mask series on the CT's grid: a bool volume in the series' file order (columns, rows,
    slices). Each mask slice is placed at the CT slice of the same ImagePositionPatient, or, for files
    without one, of the same file name; the mask must cover every CT slice once, with the CT's size."""
    import pydicom
    headers = geom.dicom
    positions = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in headers])
    names = {Path(str(getattr(ds, "filename", ""))).name: k for k, ds in enumerate(headers)}
    step = float(np.linalg.norm(positions[-1] - positions[0]) / max(len(headers) - 1, 1))
    cols, rows, nz = geom.shape
    out = np.zeros((cols, rows, nz), dtype=bool)
    seen: dict[int, Path] = {}
    files = list(visible_files(folder))
    for path in files:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(path, force=True)
        except Exception as exc:
            raise DataError(f"{path}: cannot read DICOM ({type(exc).__name__}: {one_line(exc)[:120]}); "
                            f"expected a 3D-IRCADb mask slice") from None
        if "ImagePositionPatient" in ds:
            pos = np.array([float(v) for v in ds.ImagePositionPatient])
            dist = np.linalg.norm(positions - pos, axis=1)
            k = int(np.argmin(dist))
            if dist[k] > max(_POSITION_TOL_MM, 0.01 * step):
                raise DataError(f"{path}: a {structure} mask slice at {list(np.round(pos, 2))} mm, where the CT has "
                                f"no slice; expected mask series on the CT's grid, slice for slice")
        elif path.name in names:
            k = names[path.name]
        else:
            raise DataError(f"{path}: a {structure} mask slice with neither ImagePositionPatient nor the name of a "
                            f"CT file; expected mask slices named as the CT's (image_N) or carrying positions")
        iop = ds.get("ImageOrientationPatient")
        if iop is not None and np.abs(np.array([float(v) for v in iop])
                                      - np.array([float(v) for v in headers[0].ImageOrientationPatient])).max() > 1e-3:
            raise DataError(f"{path}: a {structure} mask slice oriented {list(iop)} where the CT is "
                            f"{list(headers[0].ImageOrientationPatient)}; expected mask series on the CT's grid")
        if (int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)) != (rows, cols):
            raise DataError(f"{path}: a {structure} mask slice of {ds.get('Rows')}x{ds.get('Columns')} pixels; "
                            f"expected {rows}x{cols} as the CT's slices")
        if k in seen:
            raise DataError(f"{path}: a second {structure} mask slice for CT slice {k} (also {seen[k].name}); "
                            f"expected one mask slice per CT slice")
        seen[k] = path
        out[:, :, k] = _mask_pixels(ds, path).T > 0
    if len(seen) != nz:
        missing = [k for k in range(nz) if k not in seen]
        ct_name = Path(str(getattr(headers[missing[0]], "filename", ""))).name or f"slice {missing[0]}"
        raise DataError(f"{folder}: found {len(seen)} {structure} mask slice(s); expected {nz}, one per CT slice "
                        f"(none for {len(missing)} slice(s), e.g. at CT file {ct_name})")
    return out


def _load_ircadb(case, options: DicomOptions) -> tuple[np.ndarray, np.ndarray, Geometry]:
    folder = Path(case.folder) if getattr(case, "folder", None) else case.images[0].parent.parent
    image = _ircadb_part(folder, IRCADB_IMAGE)
    masks = _ircadb_part(folder, IRCADB_MASKS)
    with _unzipped(image, IRCADB_IMAGE) as image_dir:
        files = tuple(visible_files(image_dir))
        if not files:
            raise DataError(f"{image}: found no files; expected the patient's CT series as DICOM files")
        series = DicomSeries(image_dir if image.is_dir() else image, files, "", safe_id(folder.name))
        hu, geom = read_dicom_series(series)
    tumor_names = {s.lower() for s in options.ircadb_tumor}
    with _unzipped(masks, IRCADB_MASKS) as masks_dir:
        structures = {p.name: p for p in masks_dir.iterdir() if p.is_dir() and not p.name.startswith(".")}
        liver = next((p for n, p in structures.items() if n.lower() == IRCADB_LIVER), None)
        if liver is None:
            raise DataError(f"{masks}: found structures {', '.join(sorted(structures)) or 'none'}; expected a "
                            f"'{IRCADB_LIVER}' mask series")
        unknown = tumor_names - {n.lower() for n in structures}
        if unknown:
            raise DataError(f"{masks}: found no structure {', '.join(sorted(unknown))} (--ircadb-tumor); expected "
                            f"one of {', '.join(sorted(structures))}")
        file_labels = _read_mask_series(liver, geom, liver.name).astype(np.uint8)
        for name, path in sorted(structures.items()):
            if _IRCADB_TUMOR.match(name) or name.lower() in tumor_names:
                file_labels[_read_mask_series(path, geom, name)] = 2
    return hu, geom.to_slices(file_labels), geom


def _segment_choice(labels: dict[tuple[Path, int], str], options: DicomOptions) -> tuple[list, list]:
    """(liver, tumour) lists of (SEG file, segment number), chosen by label."""
    def named(label: str, wanted: tuple[str, ...]) -> bool:
        return label.strip().lower() in {w.lower() for w in wanted}
    liver, tumor = [], []
    for key, label in labels.items():
        is_tumor = named(label, options.seg_tumor) if options.seg_tumor else bool(_SEG_TUMOR.search(label))
        if is_tumor:
            tumor.append(key)
        elif named(label, options.seg_liver) if options.seg_liver else bool(_SEG_LIVER.search(label)):
            liver.append(key)
    return liver, tumor


def _frame_references(seg) -> tuple[list[set[str]], list[np.ndarray | None]]:
    """Per frame: the SOP instances it derives from and its ImagePositionPatient (None where absent)."""
    refs, positions = [], []
    for item in seg.get("PerFrameFunctionalGroupsSequence", []):
        found = set()
        for derivation in item.get("DerivationImageSequence", []):
            for source in derivation.get("SourceImageSequence", []):
                found.add(str(source.ReferencedSOPInstanceUID))
        refs.append(found)
        plane = item.get("PlanePositionSequence")
        positions.append(np.array([float(v) for v in plane[0].ImagePositionPatient]) if plane else None)
    return refs, positions


def _seg_masks(path: Path, seg, numbers: list[int], geom: Geometry) -> np.ndarray:
    """The chosen segments of one SEG on the CT's slices: bool (slices in file order k, rows, columns,
    len(numbers)). Frames go to the instances they reference (highdicom), or, where frames reference none,
    to the CT slice at their position."""
    uids = [str(ds.SOPInstanceUID) for ds in geom.dicom]
    refs, positions = _frame_references(seg)
    known = set(uids)
    if refs and all(refs):
        stray = sorted(set().union(*refs) - known)
        if stray:
            raise DataError(f"{path}: {len(stray)} referenced instance(s) (e.g. {stray[0]}) are not slices of CT "
                            f"series {geom.dicom[0].SeriesInstanceUID}; expected frames drawn on that series' slices")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pixels = seg.get_pixels_by_source_instance(uids, segment_numbers=numbers, skip_overlap_checks=True,
                                                       assert_missing_frames_are_empty=True,
                                                       ignore_spatial_locations=True)
        return np.asarray(pixels) >= 0.5 if np.asarray(pixels).dtype.kind == "f" else np.asarray(pixels) > 0
    # Frames without references: placed by position, which every SEG of the multi-frame IOD carries.
    ct_pos = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in geom.dicom])
    step = float(np.linalg.norm(ct_pos[-1] - ct_pos[0]) / max(len(uids) - 1, 1))
    cols, rows, nz = geom.shape
    out = np.zeros((nz, rows, cols, len(numbers)), dtype=bool)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        frames = np.asarray(seg.pixel_array).reshape(len(positions), int(seg.Rows), int(seg.Columns))
    for i, (frame, pos, item) in enumerate(zip(frames, positions, seg.PerFrameFunctionalGroupsSequence)):
        number = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        if number not in numbers:
            continue
        dist = np.linalg.norm(ct_pos - pos, axis=1) if pos is not None else np.array([np.inf])
        k = int(np.argmin(dist))
        if pos is None or dist[k] > max(_POSITION_TOL_MM, 0.01 * step) or frame.shape != (rows, cols):
            where = "no position" if pos is None else f"position {list(np.round(pos, 2))} mm"
            raise DataError(f"{path}: frame {i + 1} ({where}, {frame.shape[0]}x{frame.shape[1]}) matches no slice of "
                            f"CT series {geom.dicom[0].SeriesInstanceUID}; expected frames on that series' slices")
        out[k, :, :, numbers.index(number)] |= frame > 0
    return out


def _load_seg(case, options: DicomOptions) -> tuple[np.ndarray, np.ndarray, Geometry]:
    import highdicom as hd
    files = tuple(case.images)
    folder = Path(os.path.commonpath([str(p.parent) for p in files]))
    uid = getattr(case, "series_uid", "") or ""
    hu, geom = read_dicom_series(DicomSeries(folder, files, uid, case.case_id))
    segs, labels = {}, {}
    for path in case.labels:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                segs[path] = hd.seg.segread(path)
        except Exception as exc:  # highdicom refuses malformed SEGs with many kinds
            raise DataError(f"{path}: cannot read the DICOM SEG ({type(exc).__name__}: {one_line(exc)[:160]}); "
                            f"expected a DICOM Segmentation object") from None
        for item in segs[path].SegmentSequence:
            labels[(path, int(item.SegmentNumber))] = str(item.get("SegmentLabel", "") or "")
    liver, tumor = _segment_choice(labels, options)
    shown = ", ".join(repr(v) for v in labels.values()) or "none"
    names = ", ".join(p.name for p in case.labels)
    if not liver:
        raise DataError(f"{names}: found segments {shown}; expected one labelled as the liver "
                        f"(name it with --seg-liver LABEL)")
    cols, rows, nz = geom.shape
    liver_mask = np.zeros((nz, rows, cols), dtype=bool)
    tumor_masks: list[tuple[str, np.ndarray]] = []
    for path, seg in segs.items():
        chosen = [n for p, n in liver + tumor if p == path]
        if not chosen:
            continue
        if (int(seg.Rows), int(seg.Columns)) != (rows, cols):
            raise DataError(f"{path}: frames of {seg.Rows}x{seg.Columns} pixels; expected {rows}x{cols} as the slices "
                            f"of CT series {geom.dicom[0].SeriesInstanceUID} it references")
        masks = _seg_masks(path, seg, chosen, geom)
        for j, number in enumerate(chosen):
            if (path, number) in tumor:
                tumor_masks.append((labels[(path, number)], masks[..., j]))
            else:
                liver_mask |= masks[..., j]
    tumor_mask = np.zeros_like(liver_mask)
    for label, mask in tumor_masks:
        both = tumor_mask & mask
        if both.any():
            other = next(lab for lab, m in tumor_masks if m is not mask and (m & mask).any())
            k = int(np.flatnonzero(both.any(axis=(1, 2)))[0])
            raise DataError(f"{names}: tumour segments {other!r} and {label!r} overlap ({int(both.sum())} pixels, "
                            f"e.g. on CT slice {k}); expected disjoint tumour segments (name the ones to use "
                            f"with --seg-tumor LABEL)")
        tumor_mask |= mask
    file_labels = np.where(tumor_mask, 2, np.where(liver_mask, 1, 0)).astype(np.uint8)  # (slices, rows, columns)
    return hu, geom.to_slices(np.ascontiguousarray(np.transpose(file_labels, (2, 1, 0)))), geom
