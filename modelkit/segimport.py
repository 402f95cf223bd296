"""Ground truth from DICOM Segmentation objects (e.g. exported by 3D Slicer), read with pydicom only.

The reader itself (segment matching by SNOMED code or label, laterality, pasting the
frames onto the CT grid; PS3.3 A.51, C.8.20.2, C.7.6.16) lives in :mod:`pipeline.segread`,
which the node also uses for a reader's corrected SEG; this module re-exports it and adds
the case-folder helpers of the model kit.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pydicom

from pipeline.labels import LabelTable
from pipeline.segread import (  # noqa: F401 - re-exported for the model kit and its tests
    ORIENTATION_TOLERANCE,
    POSITION_TOLERANCE_MM,
    SEG_SOP_CLASS_UID,
    SNOMED_SCHEMES,
    SegmentMatch,
    SegReadError,
    match_segments,
    rasterize_seg,
)

logger = logging.getLogger(__name__)

SegImportError = SegReadError
"""A DICOM-SEG cannot serve as ground truth for a CT (the reader's error, under the model kit's name)."""


def read_seg_labels(seg_path: Path, shape: tuple[int, int, int], affine_lps: np.ndarray, labels: LabelTable,
                    frame_of_reference_uid: str | None = None) -> np.ndarray:
    """:func:`rasterize_seg` of a SEG file."""
    try:
        ds = pydicom.dcmread(str(seg_path))
    except Exception as exc:
        raise SegImportError(f"{seg_path} is not a readable DICOM file: {exc}") from exc
    return rasterize_seg(ds, shape, affine_lps, labels, frame_of_reference_uid)


def _sop_class(path: Path) -> str:
    try:
        ds = pydicom.dcmread(str(path), stop_before_pixels=True, specific_tags=["SOPClassUID"])
    except Exception:
        return ""
    return str(ds.get("SOPClassUID", ""))


def list_dicom_cases(data_dir: Path) -> list[Path]:
    """Case folders below ``data_dir`` (itself or its sub-folders) holding a SEG file."""
    data_dir = Path(data_dir)
    candidates = [data_dir] + sorted(p for p in data_dir.iterdir() if p.is_dir()) if data_dir.is_dir() else []
    cases = [d for d in candidates if any(_sop_class(p) == SEG_SOP_CLASS_UID for p in d.glob("*") if p.is_file())]
    if not cases:
        raise SegImportError(f"{data_dir} holds no case folder with a DICOM-SEG file")
    return cases


def load_dicom_case(case_dir: Path, labels: LabelTable) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(hu, labels, affine_lps)`` of a folder with one CT series and one SEG (files searched recursively)."""
    from pipeline.volume import load_volume

    files = [p for p in sorted(Path(case_dir).rglob("*")) if p.is_file()]
    segs = [p for p in files if _sop_class(p) == SEG_SOP_CLASS_UID]
    cts = [p for p in files if _sop_class(p) == "1.2.840.10008.5.1.4.1.1.2"]
    if len(segs) != 1:
        raise SegImportError(f"{case_dir}: found {len(segs)} DICOM-SEG files; exactly 1 is required")
    if not cts:
        raise SegImportError(f"{case_dir}: no CT Image Storage files")
    volume = load_volume(cts)
    lab = read_seg_labels(segs[0], volume.shape, volume.affine_lps, labels, volume.frame_of_reference_uid or None)
    return np.asarray(volume.hu, dtype=np.float32), lab, np.asarray(volume.affine_lps)
