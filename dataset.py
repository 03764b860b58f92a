"""LiTS training data: cases on disk -> prepared slice cache -> patient-level split -> slice dataset.

    python dataset.py synth --out-dir data/synthetic --cases 12 --size 128 --seed 0
    python dataset.py prepare --data-dir data/synthetic --cache-dir data/cache

Files are read through `volumes.py` (the same functions the predict scripts use, so training and
prediction cannot drift apart): volumes arrive as axial slices in (S, P, L) order, see there.
The synthetic phantom that `synth` writes lives in `phantom.py`.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import random
import re
import sys
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler

from dicom_datasets import LAYOUTS as DICOM_LAYOUTS
from dicom_datasets import (DicomOptions, add_dicom_arguments, find_dicom_cases, load_dicom_case, options_from_args,
                            safe_id)
from volumes import (IMAGE_SUFFIXES, WINDOW_HU, DataError, atomic_output, atomic_write_text, check_output,
                     context_indices, int_at_least, load_label_volume, load_slice_image, load_slice_mask, load_volume,
                     one_line, ordered_pair, resize_slices, run_cli, visible_files, window_hu)

# Bump when the cache format or the preprocessing changes (2: anatomy checks in meta; 3: slice folders
# windowed with the cache's window, not the default one, and their runs of consecutive slices in meta).
CACHE_VERSION = 3


# --------------------------------------------------------------------------------------------
# Finding cases on disk
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    """One patient. NIfTI layouts hold one image and one label path; slice folders hold one per slice,
    with each slice's number (the stem's index; None where it is not a number, e.g. `f103`)."""

    case_id: str
    layout: str  # "lits", "msd" or "slices"
    images: tuple[Path, ...]
    labels: tuple[Path, ...]
    numbers: tuple[int | None, ...] = ()  # slice folders only


_LITS_VOL = re.compile(r"^volume-(\d+)\.nii(\.gz)?$")
_LITS_SEG = re.compile(r"^segmentation-(\d+)\.nii(\.gz)?$")
_MSD = re.compile(r"^(liver_\d+)\.nii(\.gz)?$")


def _unique_by_key(paths, pattern, what):
    found: dict[str, Path] = {}
    for p in paths:
        m = pattern.match(p.name)
        if m:
            key = m.group(1)
            if key in found:
                raise DataError(f"{p}: duplicate {what} {key} (also {found[key]}); expected one file per case")
            found[key] = p
    return found


def find_cases(data_dir: str | Path, dicom_options: DicomOptions | None = None) -> list[Case]:
    """Find the cases under `data_dir` in one of five layouts (tried in this order):

    - LiTS: volume-N.nii[.gz] with segmentation-N.nii[.gz], at any depth;
    - MSD Task03_Liver: imagesTr/liver_N.nii.gz with labelsTr/liver_N.nii.gz;
    - slice folders: images/ and masks/ with matching stems (PNG, JPG or NPY); the case id is the
      stem before its last underscore (liver_17_0093.png -> liver_17), the rest the slice's index:
      slices sort by number (indices that are not numbers, such as f103, after them), and only
      slices numbered one apart are each other's 2.5D context (`slice_runs`);
    - 3D-IRCADb: patient folders holding PATIENT_DICOM/ and MASKS_DICOM/ (or their .zip), at any depth;
    - DICOM SEG: CT series with the DICOM SEG files that reference them, at any depth.
    The two DICOM layouts (`dicom_datasets.py`, labels chosen by `dicom_options`) give cases with the
    fields of `Case` and the options that chose their labels.
    """
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"{root}: data directory not found; expected a folder of LiTS, MSD, slice, 3D-IRCADb "
                        f"or DICOM SEG data")
    files = list(visible_files(root))

    vols = _unique_by_key(files, _LITS_VOL, "volume")
    segs = _unique_by_key(files, _LITS_SEG, "segmentation")
    if vols or segs:
        for n, p in sorted(segs.items()):
            if n not in vols:
                raise DataError(f"{p}: segmentation without a volume; expected volume-{n}.nii[.gz] beside it")
        cases = []
        for n, p in sorted(vols.items(), key=lambda kv: int(kv[0])):
            if n not in segs:
                raise DataError(f"{p}: volume without a segmentation; expected segmentation-{n}.nii[.gz]")
            cases.append(Case(f"volume-{n}", "lits", (p,), (segs[n],)))
        return cases

    msd_imgs = _unique_by_key([p for p in files if p.parent.name == "imagesTr"], _MSD, "image")
    msd_lbls = _unique_by_key([p for p in files if p.parent.name == "labelsTr"], _MSD, "label")
    if msd_imgs or msd_lbls:
        for k, p in sorted(msd_lbls.items()):
            if k not in msd_imgs:
                raise DataError(f"{p}: label without an image; expected imagesTr/{p.name}")
        cases = []
        for k, p in sorted(msd_imgs.items(), key=lambda kv: int(kv[0].split("_")[1])):
            if k not in msd_lbls:
                raise DataError(f"{p}: image without a label; expected labelsTr/{p.name}")
            cases.append(Case(k, "msd", (p,), (msd_lbls[k],)))
        return cases

    slice_imgs = {p.with_suffix("").name: p for p in files
                  if p.parent.name == "images" and p.suffix.lower() in IMAGE_SUFFIXES}
    slice_masks = {p.with_suffix("").name: p for p in files
                   if p.parent.name == "masks" and p.suffix.lower() in IMAGE_SUFFIXES}
    if slice_imgs or slice_masks:
        for stem, p in sorted(slice_masks.items()):
            if stem not in slice_imgs:
                raise DataError(f"{p}: mask without an image; expected images/{stem}.png|.jpg|.npy")
        groups: dict[str, list[tuple[str, Path, Path]]] = {}
        for stem, p in slice_imgs.items():
            if stem not in slice_masks:
                raise DataError(f"{p}: image without a mask; expected masks/{stem}.png|.npy")
            if "_" not in stem:
                raise DataError(f"{p}: found stem {stem!r}; expected <case>_<slice>, e.g. liver_17_0093")
            case_id, idx = stem.rsplit("_", 1)
            groups.setdefault(case_id, []).append((idx, p, slice_masks[stem]))
        cases = []
        for case_id, items in sorted(groups.items()):
            items.sort(key=lambda it: (int(it[0]) if it[0].isdigit() else math.inf, it[0]))
            cases.append(Case(case_id, "slices", tuple(i[1] for i in items), tuple(i[2] for i in items),
                              tuple(int(i[0]) if i[0].isdigit() else None for i in items)))
        return cases

    dicom_cases = find_dicom_cases(root, dicom_options)
    if dicom_cases:
        return dicom_cases
    raise DataError(f"{root}: found no cases; expected volume-N.nii[.gz] with segmentation-N.nii[.gz], "
                    f"imagesTr/ with labelsTr/, images/ with masks/, 3D-IRCADb PATIENT_DICOM/ with MASKS_DICOM/, "
                    f"or CT series with DICOM SEG files")


def slice_runs(numbers: Sequence[int | None]) -> list[list[int]]:
    """[start, stop) ranges of a slice folder case's sorted slices that are true neighbours: numbers
    that follow each other one by one. A slice whose index is not a number, or whose number's
    neighbours are missing, is a run of its own, so its 2.5D context is itself (as at a volume's
    end), never an unrelated slice that happens to sort beside it."""
    runs: list[list[int]] = []
    for i, n in enumerate(numbers):
        if runs and n is not None and numbers[i - 1] is not None and n == numbers[i - 1] + 1:
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1])
    return runs


# --------------------------------------------------------------------------------------------
# The prepared cache: each case once, as memory-mapped arrays at the training resolution
# --------------------------------------------------------------------------------------------

@dataclass
class PreparedCase:
    """A case in the cache: `image` (Z, S, S) float16 in [0, 1] and `label` (Z, S, S) uint8 .npy files,
    plus per-slice pixel counts at the native resolution (for classification targets and sampling)."""

    case_id: str
    image_path: Path
    label_path: Path
    num_slices: int
    liver_pixels: np.ndarray  # (Z,) int64, label >= 1, native resolution
    tumor_pixels: np.ndarray  # (Z,) int64, label == 2, native resolution
    spacing: tuple[float, float, float]
    meta: dict = field(default_factory=dict, repr=False)
    # [start, stop) ranges of slices that neighbour each other; the 2.5D context stays inside its
    # slice's run. Empty: the whole case is one run (a volume).
    runs: tuple[tuple[int, int], ...] = ()


def _fingerprint(case: Case) -> list[list]:
    out = []
    for p in case.images + case.labels:
        st = p.stat()
        out.append([str(p.resolve()), st.st_size, st.st_mtime_ns])
    options = getattr(case, "options", ())  # the DICOM layouts' choice of structures and segments
    if options:
        out.append(["options", [[k, list(v)] for k, v in options]])
    return out


def cache_params(image_size: int, window: Sequence[float]) -> dict:
    return {"version": CACHE_VERSION, "image_size": int(image_size), "window": [float(w) for w in window]}


def cache_folder(cache_dir: str | Path, data_dir: str | Path, image_size: int,
                 window: Sequence[float]) -> Path:
    """The cache for one data folder and one set of preprocessing parameters: a change to any of
    them gives a new folder, so a stale cache is never read."""
    key = dict(cache_params(image_size, window), data_dir=str(Path(data_dir).resolve()))
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return Path(cache_dir) / f"prep-{digest}"


def _atomic_save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_output(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, array)


def _load_case_arrays(case: Case, window: Sequence[float]
                      ) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float], bool]:
    """Returns (image (Z,H,W) float32, label (Z,H,W) uint8, spacing, image_is_windowed): volumes in HU,
    slices windowed with `window` as they are read (`load_slice_image`, as the predict scripts read them)."""
    if case.layout in DICOM_LAYOUTS:
        hu, lab, geom = load_dicom_case(case)
        return hu, lab, geom.spacing, False
    if case.layout in ("lits", "msd"):
        hu, geom = load_volume(case.images[0])
        lab, _ = load_label_volume(case.labels[0], expected_shape=geom.shape, image_path=case.images[0])
        return hu, lab, geom.spacing, False
    images, masks = [], []
    for ip, mp in zip(case.images, case.labels):
        img, msk = load_slice_image(ip, window), load_slice_mask(mp)
        if img.shape != msk.shape:
            raise DataError(f"{mp}: found shape {msk.shape}; expected {img.shape} as its image {ip.name}")
        if images and img.shape != images[0].shape:
            raise DataError(f"{ip}: found shape {img.shape}; expected {images[0].shape} like the "
                            f"other slices of {case.case_id}")
        images.append(img)
        masks.append(msk)
    return np.stack(images), np.stack(masks), (1.0, 1.0, 1.0), True


def anatomy_warnings(hu: np.ndarray, labels: np.ndarray) -> list[str]:
    """What looks mirrored in a volume after reorientation to display order (S, P, L), from its own
    anatomy: the labelled liver should lie on the patient's right (the image's left half) and the
    spine behind the body's centre (the image's lower half). A file whose affine is wrong (LiTS holds
    some stored with an identity affine) fails one or both. hu, labels (Z, H, W). Returns one
    phrase per failed check, empty when all is as expected or nothing can be judged."""
    liver = labels >= 1
    zs = np.flatnonzero(liver.any(axis=(1, 2)))
    if len(zs) == 0:
        return []
    hu, liver = hu[zs], liver[zs]  # the liver's slices: the upper abdomen
    body = hu > -500
    if not body.any():
        return []
    _, rows, cols = np.nonzero(body)
    body_row, body_col = rows.mean(), cols.mean()
    found = []
    # Columns run from the patient's right to left: the liver's bulk has a smaller column than the body's.
    if np.nonzero(liver)[2].mean() > body_col:
        found.append("the labelled liver lies mostly on the patient's left")
    # Dense bone inside the body is mostly spine (and the ribs beside it), behind the body's centre.
    bone = (hu > 300) & body
    if bone.sum() > 0.002 * body.sum() and np.nonzero(bone)[1].mean() < body_row:
        found.append("the bone (spine) lies in front of the body's centre")
    return found


def _prepare_case(case: Case, folder: Path, image_size: int, window: Sequence[float],
                  single_thread: bool = False) -> dict:
    if single_thread:
        torch.set_num_threads(1)
    image, label, spacing, windowed = _load_case_arrays(case, window)
    unit = image if windowed else window_hu(image, window)  # (Z, H, W) float32 in [0, 1]
    small = resize_slices(unit, image_size, "image").numpy().astype(np.float16)
    small_lab = resize_slices(label, image_size, "label").numpy()
    meta = {
        "case_id": case.case_id,
        "layout": case.layout,
        "source": _fingerprint(case),
        "num_slices": int(label.shape[0]),
        "native_shape": [int(s) for s in label.shape],
        "spacing": [float(s) for s in spacing],
        "liver_pixels": (label >= 1).sum(axis=(1, 2)).astype(int).tolist(),
        "tumor_pixels": (label == 2).sum(axis=(1, 2)).astype(int).tolist(),
        "runs": slice_runs(case.numbers) if case.layout == "slices" else [[0, int(label.shape[0])]],
        # Volumes in HU only: windowed slice exports hold no HU to find the bone with.
        "anatomy_warnings": [] if windowed else anatomy_warnings(image, label),
    }
    _atomic_save_npy(folder / f"{case.case_id}.image.npy", small)
    _atomic_save_npy(folder / f"{case.case_id}.label.npy", small_lab)
    # The meta file is written last: its presence with a matching fingerprint marks a complete entry.
    atomic_write_text(folder / f"{case.case_id}.json", json.dumps(meta))
    return meta


def _fresh_meta(case: Case, folder: Path) -> dict | None:
    meta_path = folder / f"{case.case_id}.json"
    if not meta_path.exists():
        return None
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return None
    complete = all((folder / f"{case.case_id}.{k}.npy").exists() for k in ("image", "label"))
    return meta if complete and meta.get("source") == _fingerprint(case) else None


def _as_prepared(folder: Path, meta: dict) -> PreparedCase:
    cid = meta["case_id"]
    return PreparedCase(cid, folder / f"{cid}.image.npy", folder / f"{cid}.label.npy", meta["num_slices"],
                        np.asarray(meta["liver_pixels"], dtype=np.int64),
                        np.asarray(meta["tumor_pixels"], dtype=np.int64), tuple(meta["spacing"]), meta,
                        tuple((int(a), int(b)) for a, b in meta["runs"]))


def prepare_cases(cases: Sequence[Case], cache_dir: str | Path, data_dir: str | Path, image_size: int = 256,
                  window: Sequence[float] = WINDOW_HU, workers: int | None = None,
                  progress: bool = True) -> list[PreparedCase]:
    """Bring every case into the cache (only those missing or stale), in parallel over cases."""
    folder = cache_folder(cache_dir, data_dir, image_size, window)
    folder.mkdir(parents=True, exist_ok=True)
    params = json.dumps(dict(cache_params(image_size, window), data_dir=str(Path(data_dir).resolve())), indent=2)
    params_path = folder / "params.json"
    if not params_path.exists() or params_path.read_text() != params:  # a ready cache may be read-only
        atomic_write_text(params_path, params)
    metas: dict[str, dict] = {}
    todo = []
    for case in cases:
        meta = _fresh_meta(case, folder)
        if meta is None:
            todo.append(case)
        else:
            metas[case.case_id] = meta
    if todo:
        from tqdm import tqdm
        workers = max(1, min(workers or os.cpu_count() or 1, len(todo)))
        # The bar shows from the first finished case on (delay), and is cleared on an error, so a bad
        # file gives the one-line error message alone rather than glued to a 0% frame.
        bar = tqdm(total=len(todo), desc=f"preparing {len(todo)} case(s)", unit="case", disable=not progress,
                   file=sys.stderr, delay=0.5)
        try:
            if workers == 1:
                for case in todo:
                    metas[case.case_id] = _prepare_case(case, folder, image_size, window)
                    bar.update()
            else:
                # Forked workers start at once (no re-import); each runs one torch thread, as DataLoader
                # workers do, which is what makes torch safe to use after a fork.
                with ProcessPoolExecutor(workers, mp_context=get_context("fork")) as pool:
                    futures = [pool.submit(_prepare_case, c, folder, image_size, window, True) for c in todo]
                    for fut in futures:
                        meta = fut.result()
                        metas[meta["case_id"]] = meta
                        bar.update()
        except BaseException:
            bar.leave = False
            raise
        finally:
            bar.close()
    for case in cases:
        found = metas[case.case_id].get("anatomy_warnings", [])
        if found:
            sys.stderr.write(f"warning: {case.images[0]}: after reorientation {' and '.join(found)}; its affine "
                             f"is probably wrong (anatomy mirrored), so check this file's orientation\n")
    return [_as_prepared(folder, metas[c.case_id]) for c in cases]


# 3D-IRCADb-01's 20 patients are LiTS's volumes 28-47 (LiTS took them over; MSD Task03_Liver's liver_28..47
# are the same files): in a mixture they would be one patient in two cases, possibly in two splits.
IRCADB_IN_LITS = range(28, 48)


def _lits_number(case) -> int | None:
    m = re.search(r"(\d+)$", case.case_id) if case.layout in ("lits", "msd") else None
    return int(m.group(1)) if m else None


def prepare_datasets(data_dirs: Sequence[str | Path], cache_dir: str | Path, image_size: int = 256,
                     window: Sequence[float] = WINDOW_HU, workers: int | None = None, progress: bool = True,
                     dicom_options: DicomOptions | None = None,
                     drop_ircadb_duplicates: bool = True) -> tuple[list[PreparedCase], list[dict]]:
    """Find and prepare the cases of one or several data folders (each its own layout and cache folder).

    With several folders, case ids carry the folder's name (`LiTS/volume-3`, `3Dircadb1/3Dircadb1.17`),
    so one patient is one case whatever the mixture; one folder keeps the ids as they are (and existing
    split files working). When a 3D-IRCADb folder is mixed with LiTS or MSD data, LiTS volumes 28-47
    (MSD liver_28..47), the same patients as 3D-IRCADb-01's, are left out unless
    `drop_ircadb_duplicates` is false. Returns (prepared cases, one record per folder: name, data_dir,
    layout, cases, dropped)."""
    dirs = [Path(d) for d in data_dirs]
    if not dirs:
        raise ValueError("no data folder given")
    names = [safe_id(d.resolve().name) for d in dirs]
    for i, name in enumerate(names):
        if names.index(name) != i:
            raise DataError(f"{dirs[i]}: named {name} as {dirs[names.index(name)]} is; expected data folders of "
                            f"different names (the name prefixes their case ids)")
    found = [find_cases(d, dicom_options) for d in dirs]
    has_ircadb = any(c.layout == "ircadb" for cases in found for c in cases)
    records, prepared = [], []
    for d, name, cases in zip(dirs, names, found):
        dropped = []
        if has_ircadb and len(dirs) > 1:
            dropped = [c for c in cases if _lits_number(c) in IRCADB_IN_LITS]
            if dropped and drop_ircadb_duplicates:
                cases = [c for c in cases if c not in dropped]
                sys.stderr.write(f"note: {d}: left out {len(dropped)} case(s) numbered 28-47, the 3D-IRCADb-01 "
                                 f"patients also given as 3D-IRCADb (--no-drop-ircadb-duplicates keeps them)\n")
            elif dropped:
                sys.stderr.write(f"warning: {d}: {len(dropped)} case(s) numbered 28-47 are the 3D-IRCADb-01 "
                                 f"patients also given as 3D-IRCADb: the same patients twice\n")
                dropped = []
            if not cases:
                raise DataError(f"{d}: no case left once LiTS volumes 28-47 (3D-IRCADb-01's patients) are left "
                                f"out; expected other cases, or --no-drop-ircadb-duplicates")
        ready = prepare_cases(cases, cache_dir, d, image_size, window, workers=workers, progress=progress)
        if len(dirs) > 1:
            ready = [dataclasses.replace(c, case_id=f"{name}/{c.case_id}") for c in ready]
        prepared += ready
        records.append({"name": name, "data_dir": str(d.resolve()), "layout": cases[0].layout,
                        "cases": len(ready), "dropped": len(dropped)})
    return prepared, records


def training_data_record(records: Sequence[dict], split: dict[str, list[str]]) -> list[dict]:
    """What a checkpoint records of its data: per data folder its name, layout and how many of its cases
    each part of the split holds."""
    multi = len(records) > 1
    out = []
    for r in records:
        def count(part: str) -> int:
            return sum(1 for cid in split.get(part, []) if not multi or cid.startswith(r["name"] + "/"))
        out.append({"name": r["name"], "layout": r["layout"], "data_dir": r["data_dir"], "cases": r["cases"],
                    **{part: count(part) for part in ("train", "val", "test")}})
    return out


# --------------------------------------------------------------------------------------------
# Patient-level split
# --------------------------------------------------------------------------------------------

def split_cases(case_ids: Sequence[str], val_fraction: float = 0.15, test_fraction: float = 0.15,
                seed: int = 0, has_tumor: dict[str, bool] | None = None) -> dict[str, list[str]]:
    """Split case ids (patients, never slices) into train/val/test, seeded and reproducible.

    With `has_tumor`, cases with and without tumor are split separately, so a small data set still
    gets tumor cases in every part. Each part with a fraction > 0 gets at least one case when there
    are at least three cases."""
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(f"fractions must be in [0, 1) with val + test < 1, got {val_fraction}, {test_fraction}")
    ids = sorted(set(case_ids))
    if len(ids) != len(case_ids):
        raise ValueError("case ids must be unique")
    rng = random.Random(seed)
    groups = [ids] if has_tumor is None else [[c for c in ids if has_tumor[c]], [c for c in ids if not has_tumor[c]]]
    parts: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for group in groups:
        group = list(group)
        rng.shuffle(group)
        n_test, n_val = round(len(group) * test_fraction), round(len(group) * val_fraction)
        parts["test"] += group[:n_test]
        parts["val"] += group[n_test:n_test + n_val]
        parts["train"] += group[n_test + n_val:]
    for name, frac in (("test", test_fraction), ("val", val_fraction)):
        if frac > 0 and not parts[name] and len(parts["train"]) >= 2 and len(ids) >= 3:
            parts[name].append(parts["train"].pop())
    return {k: sorted(v) for k, v in parts.items()}


SPLIT_PARTS: tuple[str, ...] = ("train", "val", "test")


def read_split(path: str | Path) -> dict[str, list[str]]:
    """The case ids of each part of a `splits.json` as train.py writes it (train, val, test)."""
    path = Path(path)
    try:
        split = json.loads(path.read_text())
        return {k: [str(c) for c in split[k]] for k in SPLIT_PARTS}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{path}: cannot read split ({one_line(exc)}); expected JSON with train, val and test lists") from None


def split_part(path: str | Path, part: str) -> list[str]:
    """The case ids of one part of a `splits.json`, for scoring or predicting exactly a run's test (or
    validation, or training) patients; an empty part is an error, not an empty selection."""
    ids = read_split(path)[part]
    if not ids:
        raise DataError(f"{path}: found no {part} cases; expected a split whose {part} part lists case ids")
    return ids


def load_split(path: str | Path, known_ids: Sequence[str]) -> dict[str, list[str]]:
    path = Path(path)
    parts = read_split(path)
    seen: dict[str, str] = {}
    for name, ids in parts.items():
        for cid in ids:
            if cid in seen:
                raise DataError(f"{path}: case {cid} is in both {seen[cid]} and {name}; expected each case in one part")
            if cid not in known_ids:
                raise DataError(f"{path}: case {cid} is not in the data directory; expected one of the found cases")
            seen[cid] = name
    return parts


# --------------------------------------------------------------------------------------------
# Slice dataset and batched augmentation
# --------------------------------------------------------------------------------------------

class LiTSSliceDataset(Dataset):
    """Axial slices from prepared cases.

    Items are (image, target): image (2k+1, S, S) float32 in [0, 1] (k = context_slices neighbours on
    each side as channels, clamped at the ends of the slice's run of true neighbours, see
    `PreparedCase.runs`: the end slice repeats, as at a volume's ends); target (S, S) int64 in {0, 1, 2}
    for segmentation, or a scalar int64 (1 when the slice holds at least `min_tumor_pixels` tumor pixels
    at native resolution) for classification, whose items also carry the slice's label map (S, S) uint8
    as a third element (the classifier's deep supervision: where the tumour is). `liver_only` keeps only
    slices that show liver. With `return_case`, items end with the index of their case in `cases` (for
    per-patient and per-volume metrics).
    """

    def __init__(self, cases: Sequence[PreparedCase], task: str, context_slices: int = 0,
                 min_tumor_pixels: int = 1, liver_only: bool = False, return_case: bool = False):
        if task not in ("segmentation", "classification"):
            raise ValueError(f"task must be 'segmentation' or 'classification', got {task!r}")
        self.cases = list(cases)
        self.task = task
        self.context_slices = int(context_slices)
        self.return_case = return_case
        index = []
        for ci, c in enumerate(self.cases):
            zs = np.flatnonzero(c.liver_pixels > 0) if liver_only else np.arange(c.num_slices)
            index.append(np.stack([np.full(len(zs), ci), zs], axis=1))
        self.index = np.concatenate(index) if index else np.zeros((0, 2), dtype=np.int64)
        self.tumor = np.array([self.cases[ci].tumor_pixels[z] >= min_tumor_pixels for ci, z in self.index],
                              dtype=bool)
        # For each case, the first slice of each slice's run and the run's length.
        self._runs = []
        for c in self.cases:
            start, length = np.zeros(c.num_slices, np.int64), np.full(c.num_slices, c.num_slices, np.int64)
            for a, b in c.runs:
                start[a:b], length[a:b] = a, b - a
            self._runs.append((start, length))
        self._arrays: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return len(self.index)

    def _open(self, ci: int) -> tuple[np.ndarray, np.ndarray]:
        # Opened lazily, so each DataLoader worker maps the files itself after it starts.
        if ci not in self._arrays:
            c = self.cases[ci]
            self._arrays[ci] = (np.load(c.image_path, mmap_mode="r"), np.load(c.label_path, mmap_mode="r"))
        return self._arrays[ci]

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_arrays"] = {}
        return state

    def __getitem__(self, i: int):
        ci, z = (int(v) for v in self.index[i])
        images, labels = self._open(ci)
        start, length = (int(v[z]) for v in self._runs[ci])
        zs = start + context_indices(z - start, length, self.context_slices)
        # The fancy index copies out of the memory map; torch's float16 -> float32 cast is vectorised
        # where numpy's is a scalar loop (about 5x slower, most of the item's time at 256x256).
        image = torch.from_numpy(images[zs]).float()  # (2k+1, S, S)
        if self.task == "classification":
            item = (image, torch.tensor(int(self.tumor[i]), dtype=torch.int64), torch.from_numpy(labels[z].copy()))
        else:
            item = (image, torch.from_numpy(labels[z].astype(np.int64)))  # target (S, S)
        return item + (ci,) if self.return_case else item


def _random_signs(n: int, negative: float, device) -> torch.Tensor:
    """(n,) of -1.0 with probability `negative`, else 1.0, from torch's global RNG."""
    return torch.where(torch.rand(n, device=device) < negative, -1.0, 1.0)


def augment_batch(images: torch.Tensor, masks: torch.Tensor | None = None, max_rotation: float = 10.0,
                  scale: tuple[float, float] = (0.9, 1.1), contrast: float = 0.1, brightness: float = 0.05,
                  noise: float = 0.02, hflip: bool = False, vflip: bool = False):
    """Random geometric and intensity augmentation of a batch, on whatever device it is on.

    images (N, C, H, W) in [0, 1]; masks (N, H, W) integer labels or None. The same rotation,
    scaling and flips move image and mask (bilinear for the image, nearest for the mask); intensity
    jitter touches the image only. `hflip` / `vflip` mirror half the batch left-right / top-bottom:
    anatomy that reaches the model mirrored (a wrong affine, as in some LiTS files, or slices
    exported flipped) then looks like something seen in training. Draws from torch's global RNG,
    so a seeded run repeats."""
    n, dev = images.shape[0], images.device
    angle = (torch.rand(n, device=dev) * 2 - 1) * math.radians(max_rotation)
    s = torch.empty(n, device=dev).uniform_(*scale)
    cos, sin = torch.cos(angle) / s, torch.sin(angle) / s
    flip_x = _random_signs(n, 0.5, dev) if hflip else torch.ones(n, device=dev)
    flip_y = _random_signs(n, 0.5, dev) if vflip else torch.ones(n, device=dev)
    theta = torch.zeros(n, 2, 3, device=dev)
    theta[:, 0, 0], theta[:, 0, 1] = cos * flip_x, -sin * flip_y
    theta[:, 1, 0], theta[:, 1, 1] = sin * flip_x, cos * flip_y
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    out = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    gain = 1 + (torch.rand(n, 1, 1, 1, device=dev) * 2 - 1) * contrast
    shift = (torch.rand(n, 1, 1, 1, device=dev) * 2 - 1) * brightness
    out = out * gain + shift + torch.randn_like(out) * noise
    out = out.clamp_(0.0, 1.0).to(images.dtype)
    if masks is None:
        return out, None
    m = F.grid_sample(masks[:, None].float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return out, m[:, 0].to(masks.dtype)


def _random_pixel(mask: torch.Tensor) -> tuple[int, int]:
    """(row, column) of one pixel of a 2D boolean mask that holds some, drawn uniformly from torch's
    global RNG: where a pasted lesion or a foreground window is centred."""
    spots = torch.nonzero(mask)
    return tuple(int(v) for v in spots[torch.randint(len(spots), (1,), device=mask.device)][0])


def paste_tumors(images: torch.Tensor, labels: torch.Tensor, probability: float):
    """Tumour copy-paste between slices (TumorCP, Yang et al., MICCAI 2021): each slice of the batch,
    with `probability`, receives the tumour of another slice of the batch (mostly another patient's),
    moved to a random place of its liver.

    images (N, C, H, W) in [0, 1]; labels (N, H, W) integer maps {0, 1, 2}. The donor's tumour keeps
    its contrast to the donor's liver: pasted values are the donor's pixels (every channel, as
    stacked) minus the donor's mean liver value plus the recipient's, on the centre channel. The
    paste is cut to the recipient's liver (labels >= 1), where it becomes tumour (2). Returns
    (images, labels, pasted (N,) bool), new tensors; a slice without liver, or a batch without a
    second slice holding tumour, is left as it is. Draws from torch's global RNG, so a seeded run
    repeats. A few patients carry few lesions; pasting shows each lesion against other livers,
    positions and neighbours, which is what a classifier trained on them fails to generalise."""
    n, c, h, w = images.shape
    centre = c // 2
    source, source_labels = images, labels  # read from; the pastes go into copies
    images, labels = images.clone(), labels.clone()
    pasted = torch.zeros(n, dtype=torch.bool, device=images.device)
    donors = torch.nonzero((source_labels == 2).flatten(1).any(1))[:, 0]

    def liver_reference(k: int) -> torch.Tensor:
        """Where slice k's liver value is read: its healthy liver, or all of it where tumour fills it."""
        healthy = source_labels[k] == 1
        return healthy if healthy.any() else source_labels[k] >= 1

    draws = torch.rand(n, device=images.device)
    for i in range(n):
        liver = source_labels[i] >= 1
        others = donors[donors != i]
        if draws[i] >= probability or len(others) == 0 or not liver.any():
            continue
        d = int(others[torch.randint(len(others), (1,), device=images.device)])
        ys, xs = torch.nonzero(source_labels[d] == 2, as_tuple=True)
        cy, cx = _random_pixel(liver)
        dy = cy - (int(ys.min()) + int(ys.max())) // 2  # the lesion's box centred on the chosen spot
        dx = cx - (int(xs.min()) + int(xs.max())) // 2
        ty, tx = ys + dy, xs + dx
        inside = (ty >= 0) & (ty < h) & (tx >= 0) & (tx < w)
        keep = inside & liver[ty.clamp(0, h - 1), tx.clamp(0, w - 1)]  # on the slice and in its liver
        ys, xs, ty, tx = ys[keep], xs[keep], ty[keep], tx[keep]
        if len(ys) == 0:
            continue
        offset = source[i, centre][liver_reference(i)].mean() - source[d, centre][liver_reference(d)].mean()
        images[i][:, ty, tx] = (source[d][:, ys, xs] + offset).clamp(0.0, 1.0)
        labels[i][ty, tx] = 2
        pasted[i] = True
    return images, labels, pasted


# Ranges of `vary_appearance`: nnU-Net's intensity augmentation (Isensee et al., Nature Methods 2021)
# for the scanner, plus the two that tell contrast phases and lesion types apart.
LESION_CONTRAST = (0.4, 1.5)    # |k|: the tumour's difference to its liver times k ...
HYPERDENSE = 0.5                # ... negative (the lesion flips to the liver's other side) this often
LIVER_SHIFT = 0.15              # liver (tumour with it) against the rest, in window units: ±68 HU at 450
GAMMA = (0.7, 1.5)
GAIN = (0.75, 1.25)             # contrast about the slice's mean
BLUR_SIGMA = (0.5, 1.0)         # pixels
LOW_RES = (1.0, 2.0)            # down by this factor and back up
NOISE_SIGMA = (0.0, 0.05)


def _uniform(n: int, low: float, high: float, device) -> torch.Tensor:
    return torch.empty(n, device=device).uniform_(low, high)


def vary_appearance(images: torch.Tensor, labels: torch.Tensor, probability: float) -> torch.Tensor:
    """How slices look on other scanners, in other contrast phases and with other lesions: each of
    the following, independently, with `probability` per slice (blur and low resolution at half of it,
    as nnU-Net does):

    - lesion contrast: the tumour's difference to the slice's mean healthy liver times k, |k| in
      `LESION_CONTRAST`, negative in a share `HYPERDENSE` of them, so that a hypodense lesion may
      come out fainter, darker or hyperdense (never invisible: a label on nothing teaches nothing);
    - liver enhancement: liver and tumour shifted together by up to `LIVER_SHIFT` against the rest
      (an unenhanced or a late-phase liver), the shift softened over the liver's edge by a 5-pixel box;
    - gamma, contrast about the slice's mean, Gaussian blur, low resolution, Gaussian noise.

    images (N, C, H, W) in [0, 1] (C stacked neighbours: the centre slice's labels place the edits on
    every channel); labels (N, H, W) {0, 1, 2}. Returns new images in [0, 1]; labels are unchanged.
    Draws from torch's global RNG, so a seeded run repeats."""
    from torchvision.transforms.v2.functional import gaussian_blur

    if probability <= 0:
        return images
    n, c, h, w = images.shape
    dev = images.device
    out = images.float()  # read only: every step below makes a new tensor before any writes in place
    pick = lambda share=1.0: (torch.rand(n, device=dev) < probability * share).view(n, 1, 1, 1)  # noqa: E731
    view = lambda t: t.view(n, 1, 1, 1)  # noqa: E731

    healthy, tumour = (labels == 1).float()[:, None], (labels == 2).float()[:, None]
    count = healthy.flatten(1).sum(1)
    liver_mean = view((out[:, c // 2:c // 2 + 1] * healthy).flatten(1).sum(1) / count.clamp(min=1))
    k = _uniform(n, *LESION_CONTRAST, dev) * _random_signs(n, HYPERDENSE, dev)
    k = torch.where(pick() & view(count > 0), view(k), 1.0)
    out = out + tumour * (k - 1) * (out - liver_mean)

    liver = F.avg_pool2d((labels >= 1).float()[:, None], 5, stride=1, padding=2, count_include_pad=False)
    out = out + liver * torch.where(pick(), view(_uniform(n, -LIVER_SHIFT, LIVER_SHIFT, dev)), 0.0)
    out = out.clamp(0.0, 1.0)

    gamma = torch.where(pick(), view(torch.exp(_uniform(n, *(float(g) for g in np.log(GAMMA)), dev))), 1.0)
    out = out ** gamma
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    out = mean + (out - mean) * torch.where(pick(), view(_uniform(n, *GAIN, dev)), 1.0)

    blur = pick(0.5)[:, 0, 0, 0]
    if blur.any():  # one sigma per batch: torchvision blurs a batch with one kernel
        sigma = float(_uniform(1, *BLUR_SIGMA, dev))
        out[blur] = gaussian_blur(out[blur], kernel_size=[5, 5], sigma=[sigma, sigma])
    coarse = pick(0.5)[:, 0, 0, 0]
    if coarse.any():
        factor = float(_uniform(1, *LOW_RES, dev))
        small = F.interpolate(out[coarse], size=(max(1, round(h / factor)), max(1, round(w / factor))), mode="area")
        out[coarse] = F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)
    sigma = torch.where(pick(), view(_uniform(n, *NOISE_SIGMA, dev)), 0.0)
    out = out + torch.randn_like(out) * sigma
    return out.clamp_(0.0, 1.0).to(images.dtype)


def tumor_sampler(tumor: np.ndarray, fraction: float, num_samples: int | None = None,
                  seed: int = 0) -> WeightedRandomSampler:
    """Sample with replacement so that tumor slices make up `fraction` of each epoch in expectation."""
    n_pos = int(tumor.sum())
    n_neg = len(tumor) - n_pos
    if n_pos == 0 or n_neg == 0:
        weights = np.ones(len(tumor))
    else:
        weights = np.where(tumor, fraction / n_pos, (1 - fraction) / n_neg)
    gen = torch.Generator().manual_seed(seed)
    return WeightedRandomSampler(torch.as_tensor(weights, dtype=torch.double), num_samples or len(tumor),
                                 replacement=True, generator=gen)


# --------------------------------------------------------------------------------------------
# LightningDataModule
# --------------------------------------------------------------------------------------------

def choose_split(prepared: dict[str, PreparedCase], split_file: Path | None, val_fraction: float,
                 test_fraction: float, seed: int) -> dict[str, list[str]]:
    """The patient-level split of the prepared cases: `split_file` when given, else a seeded draw
    with the cases that hold tumour spread over the parts (`split_cases`)."""
    if split_file is not None:
        return load_split(split_file, list(prepared))
    has_tumor = {cid: bool((c.tumor_pixels > 0).any()) for cid, c in prepared.items()}
    return split_cases(list(prepared), val_fraction, test_fraction, seed, has_tumor)


def slice_loader(ds: LiTSSliceDataset, batch_size: int, num_workers: int, train: bool,
                 oversample_tumor: float = 0.0, seed: int = 0) -> DataLoader:
    """A DataLoader of one part: shuffled for training, or drawn with tumour slices oversampled
    (`tumor_sampler`) when `oversample_tumor` > 0; in order otherwise."""
    sampler = tumor_sampler(ds.tumor, oversample_tumor, seed=seed) if train and oversample_tumor > 0 else None
    return DataLoader(ds, batch_size=batch_size, shuffle=train and sampler is None, sampler=sampler,
                      num_workers=num_workers, pin_memory=torch.cuda.is_available(),
                      persistent_workers=num_workers > 0, drop_last=False)


def crop_patches(images: torch.Tensor, labels: torch.Tensor, size: int, foreground: float):
    """Patch training (nnU-Net's 2D sampling, Isensee et al., Nature Methods 2021): a size x size window
    of each slice, centred with probability `foreground` on a random pixel of its rarest class present
    (tumour if the slice holds any, else liver), otherwise at a uniformly drawn place. A window that would
    leave the slice is moved back onto it, so every pixel of a patch is the slice's own.

    images (N, C, H, W); labels (N, H, W). Returns (images (N, C, size, size), labels (N, size, size)),
    new tensors. A fully convolutional network trained on patches segments whole slices; each step
    then costs (size / H)**2 of a whole slice's, and the windows drawn on lesions make tumour a larger
    share of what is learnt than its share of the slice. Draws from torch's global RNG."""
    n, _, h, w = images.shape
    if size > h or size > w:
        raise ValueError(f"patch of {size} pixels from slices of {h}x{w}; expected at most the slice's size")
    if size == h == w:
        return images, labels
    dev = images.device
    forced = torch.rand(n, device=dev) < foreground
    anywhere = torch.stack([torch.randint(0, h - size + 1, (n,), device=dev),
                            torch.randint(0, w - size + 1, (n,), device=dev)], 1)
    out_images, out_labels = [], []
    for i in range(n):
        top, left = (int(v) for v in anywhere[i])
        if forced[i]:
            for cls in (2, 1):
                present = labels[i] == cls
                if present.any():
                    cy, cx = _random_pixel(present)
                    top = min(max(cy - size // 2, 0), h - size)
                    left = min(max(cx - size // 2, 0), w - size)
                    break
        out_images.append(images[i, :, top:top + size, left:left + size])
        out_labels.append(labels[i, top:top + size, left:left + size])
    return torch.stack(out_images), torch.stack(out_labels)


def augment_training_batch(batch: tuple, task: str, paste_tumor: float = 0.0, flip: bool = False,
                           rotation: float = 10.0, scale: tuple[float, float] = (0.9, 1.1),
                           appearance: float = 0.0, patch_size: int = 0, foreground: float = 0.33,
                           min_tumor_pixels: int = 1) -> tuple:
    """One training batch augmented, on its device: tumours pasted between slices (`paste_tumors`)
    first, then the geometric and intensity augmentation (`augment_batch`), which apply to them too,
    then, with `appearance` > 0, other scanners, phases and lesion contrasts (`vary_appearance`), and
    last, with `patch_size` > 0, windows of the slices (`crop_patches`).

    The label map moves with the image: the target for segmentation; for classification the third
    element, which supervises where the tumour is (the second is the slice label, set to tumour on
    a slice that received a lesion, and recomputed for a window: tumour from `min_tumor_pixels` in it)."""
    at = 1 if task == "segmentation" else 2
    items = list(batch)
    images, labels = items[0], items[at]
    if paste_tumor > 0:
        images, labels, pasted = paste_tumors(images, labels, paste_tumor)
        if task == "classification":
            items[1] = items[1].masked_fill(pasted, 1)
    items[0], items[at] = augment_batch(images, labels, hflip=flip, vflip=flip, max_rotation=rotation, scale=scale)
    if appearance > 0:
        items[0] = vary_appearance(items[0], items[at], appearance)
    if patch_size > 0:
        items[0], items[at] = crop_patches(items[0], items[at], patch_size, foreground)
        if task == "classification":  # the label is the window's: tumour only if the window holds it
            items[1] = ((items[at] == 2).flatten(1).sum(1) >= min_tumor_pixels).to(items[1].dtype)
    return tuple(items)


def _datamodule_class():
    # Lightning takes seconds to import; the CLI and the predict scripts do not need it.
    import pytorch_lightning as pl

    class LiTSDataModule(pl.LightningDataModule):
        """Finds, prepares and splits the cases (by patient), then serves slices for one task.

        Training batches are augmented on the device they land on (`on_after_batch_transfer`), which
        keeps the DataLoader workers to memory-mapped reads."""

        def __init__(self, data_dir: str | Path, task: str, cache_dir: str | Path = "data/cache",
                     image_size: int = 256, window: Sequence[float] = WINDOW_HU, context_slices: int = 1,
                     batch_size: int = 16, num_workers: int = 2, val_fraction: float = 0.15,
                     test_fraction: float = 0.15, seed: int = 0, split_file: str | Path | None = None,
                     output_dir: str | Path | None = None, oversample_tumor: float = 0.0,
                     min_tumor_pixels: int = 1, liver_only: bool | None = None, augment: bool = True,
                     flip: bool = False, prepare_workers: int | None = None, rotation: float = 10.0,
                     scale: Sequence[float] = (0.9, 1.1), paste_tumor: float = 0.0, appearance: float = 0.0,
                     dicom_options: DicomOptions | None = None, drop_ircadb_duplicates: bool = True,
                     patch_size: int = 0, foreground: float = 0.33):
            super().__init__()
            # One data folder, or several trained on together (`prepare_datasets`).
            self.data_dirs = [Path(d) for d in (data_dir if isinstance(data_dir, (list, tuple)) else [data_dir])]
            self.dicom_options, self.drop_ircadb_duplicates = dicom_options, bool(drop_ircadb_duplicates)
            self.data_records: list[dict] = []
            self.training_data: list[dict] = []  # per data folder: its cases in each part of the split
            self.data_dir, self.task, self.cache_dir = self.data_dirs[0], task, Path(cache_dir)
            self.image_size, self.window, self.context_slices = int(image_size), tuple(window), int(context_slices)
            self.batch_size, self.num_workers = int(batch_size), int(num_workers)
            self.val_fraction, self.test_fraction, self.seed = val_fraction, test_fraction, int(seed)
            self.split_file = Path(split_file) if split_file else None
            self.output_dir = Path(output_dir) if output_dir else None
            self.oversample_tumor, self.min_tumor_pixels = float(oversample_tumor), int(min_tumor_pixels)
            self.liver_only = (task == "classification") if liver_only is None else bool(liver_only)
            self.augment, self.flip, self.prepare_workers = augment, bool(flip), prepare_workers
            self.rotation, self.scale = float(rotation), (float(scale[0]), float(scale[1]))
            self.paste_tumor, self.appearance = float(paste_tumor), float(appearance)
            self.patch_size, self.foreground = int(patch_size), float(foreground)
            self.split: dict[str, list[str]] | None = None
            self.datasets: dict[str, LiTSSliceDataset] = {}

        def _prepare(self) -> list[PreparedCase]:
            prepared, self.data_records = prepare_datasets(
                self.data_dirs, self.cache_dir, self.image_size, self.window, workers=self.prepare_workers,
                dicom_options=self.dicom_options, drop_ircadb_duplicates=self.drop_ircadb_duplicates)
            return prepared

        def prepare_data(self) -> None:
            self._prepare()

        def setup(self, stage: str | None = None) -> None:
            if self.datasets:
                return
            prepared = {c.case_id: c for c in self._prepare()}
            self.split = choose_split(prepared, self.split_file, self.val_fraction, self.test_fraction, self.seed)
            self.training_data = training_data_record(self.data_records, self.split)
            if self.output_dir is not None:
                self.output_dir.mkdir(parents=True, exist_ok=True)
                dirs = [str(d.resolve()) for d in self.data_dirs]
                record = dict(self.split, seed=self.seed, val_fraction=self.val_fraction,
                              test_fraction=self.test_fraction, data_dir=dirs[0] if len(dirs) == 1 else dirs,
                              datasets=self.training_data)
                atomic_write_text(self.output_dir / "splits.json", json.dumps(record, indent=2))
            for part in ("train", "val", "test"):
                self.datasets[part] = LiTSSliceDataset(
                    [prepared[c] for c in self.split[part]], self.task, self.context_slices,
                    self.min_tumor_pixels, self.liver_only,
                    return_case=part == "test" or (part == "val" and self.task == "classification"))

        def train_dataloader(self) -> DataLoader:
            return slice_loader(self.datasets["train"], self.batch_size, self.num_workers, True,
                                self.oversample_tumor, self.seed)

        def val_dataloader(self) -> DataLoader:
            return slice_loader(self.datasets["val"], self.batch_size, self.num_workers, False)

        def test_dataloader(self) -> DataLoader:
            return slice_loader(self.datasets["test"], self.batch_size, self.num_workers, False)

        def on_after_batch_transfer(self, batch, dataloader_idx: int):
            trainer = getattr(self, "trainer", None)
            if self.augment and trainer is not None and trainer.training:
                return augment_training_batch(batch, self.task, self.paste_tumor, self.flip, self.rotation, self.scale,
                                              self.appearance, self.patch_size, self.foreground, self.min_tumor_pixels)
            return batch

    LiTSDataModule.__module__ = __name__
    LiTSDataModule.__qualname__ = "LiTSDataModule"
    return LiTSDataModule


def __getattr__(name: str):
    if name == "LiTSDataModule":
        cls = globals()[name] = _datamodule_class()
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="LiTS data tools: write synthetic phantoms, prepare the cache.")
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("synth", help="write synthetic CT phantoms in the LiTS layout")
    s.add_argument("--out-dir", required=True, type=Path, help="folder to write volume-N/segmentation-N into")
    s.add_argument("--cases", type=int_at_least(1), default=12, help="number of cases (default: 12)")
    s.add_argument("--size", type=int_at_least(32), default=128, help="in-plane size in voxels (default: 128)")
    s.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    s.add_argument("--compress", action="store_true", help="write .nii.gz instead of .nii (default: off)")
    p = sub.add_parser("prepare", help="prepare the slice cache for a data folder")
    p.add_argument("--data-dir", required=True, type=Path, action="append",
                   help="LiTS, MSD, slice-folder, 3D-IRCADb or DICOM SEG data; repeat it to prepare several "
                        "folders as one mixture (case ids then carry the folder's name)")
    p.add_argument("--drop-ircadb-duplicates", action=argparse.BooleanOptionalAction, default=True,
                   help="with 3D-IRCADb and LiTS or MSD folders together, leave out LiTS volumes 28-47 (MSD "
                        "liver_28..47), the same patients as 3D-IRCADb-01's (default: on)")
    add_dicom_arguments(p)
    p.add_argument("--cache-dir", type=Path, default=Path("data/cache"), help="cache root (default: data/cache)")
    p.add_argument("--image-size", type=int_at_least(32), default=256,
                   help="training resolution in pixels (default: 256)")
    p.add_argument("--window", type=float, nargs=2, action=ordered_pair(), default=list(WINDOW_HU),
                   metavar=("LOW", "HIGH"),
                   help="HU window (default: -200 250)")
    p.add_argument("--workers", type=int_at_least(1), default=None, help="parallel processes (default: one per core)")
    return parser


def main(args: argparse.Namespace) -> int:
    if args.command == "synth":
        check_output(args.out_dir, "--out-dir", folder=True)
        from phantom import write_synthetic_lits  # phantoms are demo data, not part of training
        paths = write_synthetic_lits(args.out_dir, args.cases, args.size, args.seed, args.compress, progress=True)
        sys.stderr.write(f"wrote {len(paths)} synthetic case(s) to {args.out_dir}\n")
    else:
        check_output(args.cache_dir, "--cache-dir", folder=True)
        prepared, records = prepare_datasets(args.data_dir, args.cache_dir, args.image_size, args.window,
                                             args.workers, dicom_options=options_from_args(args),
                                             drop_ircadb_duplicates=args.drop_ircadb_duplicates)
        slices = sum(c.num_slices for c in prepared)
        folders = sorted({str(c.image_path.parent) for c in prepared})
        sys.stderr.write(f"prepared {len(prepared)} case(s), {slices} slices, in {', '.join(folders)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, get_args_parser()))
