"""DICOM helpers for the tests, written from the DICOM standard and nibabel alone (not from volumes.py),
so what volumes.py reads and writes is checked against an independent computation."""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom

import phantom


def dicom_twin(folder: Path, volume: Path, **kwargs) -> list[Path]:
    """Write the NIfTI phantom `volume` again as a DICOM series in `folder` (its NIfTI twin)."""
    img = nib.load(str(volume))
    return phantom.write_phantom_dicom(folder, np.asanyarray(img.dataobj), img.affine, **kwargs)


def read_series_by_tags(files) -> tuple[np.ndarray, np.ndarray, list]:
    """A series as the standard defines it: datasets sorted by ImagePositionPatient along the normal
    of ImageOrientationPatient; the array (columns, rows, slices) in HU = pixel * slope + intercept;
    the affine (RAS) that maps its indices to the world: PixelSpacing[1] along the row direction,
    PixelSpacing[0] along the column direction, the first-to-last position step along the slices,
    LPS turned into RAS. Returns (array, affine, datasets)."""
    datasets = [pydicom.dcmread(p) for p in files]
    iop = np.array(datasets[0].ImageOrientationPatient, dtype=float)
    normal = np.cross(iop[:3], iop[3:])
    datasets.sort(key=lambda d: float(np.dot(np.array(d.ImagePositionPatient, dtype=float), normal)))
    array = np.stack([d.pixel_array.T * float(d.RescaleSlope) + float(d.RescaleIntercept) for d in datasets], axis=2)
    first, last = (np.array(d.ImagePositionPatient, dtype=float) for d in (datasets[0], datasets[-1]))
    row_spacing, column_spacing = (float(v) for v in datasets[0].PixelSpacing)
    lps = np.eye(4)
    lps[:3, 0] = iop[:3] * column_spacing
    lps[:3, 1] = iop[3:] * row_spacing
    lps[:3, 2] = (last - first) / (len(datasets) - 1)
    lps[:3, 3] = first
    return array, np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps, datasets


def canonical_slices(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """nibabel's closest canonical (RAS) image of (array, affine), as slices (S, P, L): (Z, H, W), and
    the canonical image's affine (world position of every voxel)."""
    canon = nib.as_closest_canonical(nib.Nifti1Image(array, affine))
    ras = np.asanyarray(canon.dataobj)
    return np.ascontiguousarray(ras.transpose(2, 1, 0)[:, ::-1, ::-1]), canon.affine


def seg_label_frames(seg_path: Path) -> tuple[dict[str, np.ndarray], pydicom.Dataset]:
    """A DICOM SEG read back with pydicom alone: {referenced SOPInstanceUID: labels (rows, columns)}
    with label = the segment number of the frame's segment (0 where no segment), and the dataset."""
    seg = pydicom.dcmread(seg_path)
    pixels = seg.pixel_array.reshape(int(seg.NumberOfFrames), int(seg.Rows), int(seg.Columns))
    out: dict[str, np.ndarray] = {}
    for frame, item in zip(pixels, seg.PerFrameFunctionalGroupsSequence):
        uid = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        number = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        labels = out.setdefault(uid, np.zeros(frame.shape, np.uint8))
        assert not (labels[frame > 0]).any(), "segments overlap"
        labels[frame > 0] = number
    return out, seg
