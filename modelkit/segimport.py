"""Ground truth from DICOM Segmentation objects (e.g. exported by 3D Slicer), read with pydicom only.

Implements the reading side of the Segmentation IOD (PS3.3 A.51, Segmentation Image
Module C.8.20.2, Multi-frame Functional Groups C.7.6.16):

* segments come from SegmentSequence (0062,0002); each is matched to the label table by
  its SegmentedPropertyTypeCodeSequence code (SNOMED CT, scheme SCT or SRT) when the
  table has a code for the structure, else by SegmentLabel against the label key, name
  or SNOMED meaning (case, punctuation, "muscle" and side words ignored);
* each frame's segment is PerFrameFunctionalGroupsSequence >
  SegmentIdentificationSequence > ReferencedSegmentNumber, its position
  PlanePositionSequence > ImagePositionPatient (per frame), its orientation and pixel
  spacing PlaneOrientationSequence / PixelMeasuresSequence (shared or per frame);
* frames are pasted onto the CT grid; they must lie in CT slice planes with the CT's
  orientation and pixel spacing (no resampling: what Slicer/dcmqi/highdicom export for
  a segmentation drawn on the CT). FRACTIONAL segments are thresholded at one half.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from pipeline.errors import PipelineError
from pipeline.labels import LabelTable

logger = logging.getLogger(__name__)

SEG_SOP_CLASS_UID = "1.2.840.10008.5.1.4.1.1.66.4"
SNOMED_SCHEMES = ("SCT", "SRT")
POSITION_TOLERANCE_MM = 0.1
ORIENTATION_TOLERANCE = 1e-3


class SegImportError(PipelineError):
    """A DICOM-SEG cannot serve as ground truth for a CT (message: what, value, allowed)."""


@dataclass(frozen=True)
class SegmentMatch:
    """A segment of the SEG and the label id it maps to."""

    segment_number: int
    segment_label: str
    code_value: str
    label_id: int
    matched_by: str  # "code" or "label"


def match_segments(ds: Dataset, labels: LabelTable) -> list[SegmentMatch]:
    """Map every segment of a SEG dataset to a label id; raise on a segment that fits none."""
    if "SegmentSequence" not in ds:
        raise SegImportError("DICOM-SEG lacks SegmentSequence (0062,0002)")
    by_code = {l.snomed_code: l.id for l in labels.labels if l.snomed_code}
    out: list[SegmentMatch] = []
    for item in ds.SegmentSequence:
        number = int(item.SegmentNumber)
        seg_label = str(getattr(item, "SegmentLabel", ""))
        code_value, scheme = "", ""
        if "SegmentedPropertyTypeCodeSequence" in item and len(item.SegmentedPropertyTypeCodeSequence):
            code = item.SegmentedPropertyTypeCodeSequence[0]
            code_value, scheme = str(code.get("CodeValue", "")), str(code.get("CodingSchemeDesignator", ""))
        if code_value and scheme in SNOMED_SCHEMES and code_value in by_code:
            out.append(SegmentMatch(number, seg_label, code_value, by_code[code_value], "code"))
        elif (by_name := labels.id_for_name(seg_label)) is not None:
            out.append(SegmentMatch(number, seg_label, code_value, by_name, "label"))
        else:
            raise SegImportError(
                f"segment {number} (SegmentLabel {seg_label!r}, property type {scheme}:{code_value}) matches no "
                f"structure of the label table by SNOMED code or by key/name (keys: {', '.join(labels.keys())})"
            )
    return out


def _functional(ds: Dataset, frame: Dataset | None, sequence: str) -> Dataset | None:
    """An item of a functional group macro: per-frame first, else shared."""
    for holder in (frame, ds.SharedFunctionalGroupsSequence[0] if "SharedFunctionalGroupsSequence" in ds else None):
        if holder is not None and sequence in holder and len(holder[sequence].value):
            return holder[sequence].value[0]
    return None


def _frame_origin(
    ds: Dataset, item: Dataset, f: int, affine: np.ndarray, shape: tuple[int, int, int], matches: dict
) -> tuple[int, tuple[int, int, int]]:
    """Frame ``f``'s segment number and the CT voxel (k, r, c) of its first pixel; SegImportError when the
    frame is not on the CT's grid (orientation, spacing, position) or names an undefined segment."""
    inverse = np.linalg.inv(affine)
    ct_row_step = affine[:3, 1]  # moving one row: + column direction x PixelSpacing[0]
    ct_col_step = affine[:3, 2]
    ident = _functional(ds, item, "SegmentIdentificationSequence")
    position = _functional(ds, item, "PlanePositionSequence")
    orientation = _functional(ds, item, "PlaneOrientationSequence")
    measures = _functional(ds, item, "PixelMeasuresSequence")
    if ident is None or position is None or orientation is None or measures is None:
        raise SegImportError(f"frame {f + 1}: segment identification, plane position/orientation or pixel measures missing")
    segment = int(ident.ReferencedSegmentNumber)
    if segment not in matches:
        raise SegImportError(f"frame {f + 1} references segment {segment}, which SegmentSequence does not define")
    iop = np.asarray([float(v) for v in orientation.ImageOrientationPatient])
    spacing = [float(v) for v in measures.PixelSpacing]
    row_step = iop[3:6] * spacing[0]
    col_step = iop[0:3] * spacing[1]
    if not (np.allclose(row_step, ct_row_step, atol=ORIENTATION_TOLERANCE * max(spacing) + 1e-3)
            and np.allclose(col_step, ct_col_step, atol=ORIENTATION_TOLERANCE * max(spacing) + 1e-3)):
        raise SegImportError(
            f"frame {f + 1}: orientation {iop.round(4).tolist()} / spacing {spacing} differ from the CT grid "
            f"(row step {ct_row_step.round(4).tolist()}, column step {ct_col_step.round(4).tolist()}); "
            "only SEGs on the CT's grid are supported"
        )
    ipp = np.asarray([float(v) for v in position.ImagePositionPatient] + [1.0])
    index = inverse @ ipp
    nearest = np.round(index[:3])
    error_mm = np.linalg.norm(affine[:3, :3] @ (index[:3] - nearest))
    if error_mm > POSITION_TOLERANCE_MM:
        raise SegImportError(
            f"frame {f + 1}: ImagePositionPatient {ipp[:3].round(3).tolist()} lies {error_mm:.3f} mm off the CT "
            f"grid (allowed {POSITION_TOLERANCE_MM} mm)"
        )
    k, r0, c0 = (int(v) for v in nearest)
    if not 0 <= k < shape[0]:
        raise SegImportError(f"frame {f + 1}: slice index {k} is outside the CT's {shape[0]} slices")
    return segment, (k, r0, c0)


def rasterize_seg(
    ds: Dataset,
    shape: tuple[int, int, int],
    affine_lps: np.ndarray,
    labels: LabelTable,
    frame_of_reference_uid: str | None = None,
) -> np.ndarray:
    """Label map (uint8, ``shape``, the CT's (k, r, c) grid) from a SEG dataset.

    Where segments overlap, the one with the higher segment number wins (logged).
    """
    if str(ds.get("SOPClassUID", "")) != SEG_SOP_CLASS_UID:
        raise SegImportError(f"SOPClassUID is {ds.get('SOPClassUID', '')!r}; a Segmentation ({SEG_SOP_CLASS_UID}) is required")
    if frame_of_reference_uid and str(ds.get("FrameOfReferenceUID", "")) != frame_of_reference_uid:
        raise SegImportError(
            f"SEG FrameOfReferenceUID {ds.get('FrameOfReferenceUID', '')!r} differs from the CT's {frame_of_reference_uid!r}"
        )
    matches = {m.segment_number: m for m in match_segments(ds, labels)}
    affine = np.asarray(affine_lps, dtype=np.float64)
    frames = ds.pixel_array
    n_frames = int(ds.get("NumberOfFrames", 1))
    frames = frames.reshape(n_frames, int(ds.Rows), int(ds.Columns))
    fractional = str(ds.get("SegmentationType", "BINARY")) == "FRACTIONAL"
    threshold = 0.5 * float(ds.get("MaximumFractionalValue", 255)) if fractional else 0.5
    out = np.zeros(shape, dtype=np.uint8)
    overlaps = 0
    per_frame = ds.PerFrameFunctionalGroupsSequence
    order = sorted(range(n_frames), key=lambda f: int(
        _functional(ds, per_frame[f], "SegmentIdentificationSequence").ReferencedSegmentNumber))  # type: ignore[union-attr]
    for f in order:
        item = per_frame[f]
        segment, (k, r0, c0) = _frame_origin(ds, item, f, affine, shape, matches)
        mask = frames[f] > threshold
        # clip the frame to the CT's rows/columns
        rr0, cc0 = max(0, r0), max(0, c0)
        rr1, cc1 = min(shape[1], r0 + mask.shape[0]), min(shape[2], c0 + mask.shape[1])
        if rr1 <= rr0 or cc1 <= cc0:
            continue
        part = mask[rr0 - r0: rr1 - r0, cc0 - c0: cc1 - c0]
        if part.sum() != mask.sum():
            logger.warning("frame %d: %d segment pixels lie outside the CT grid", f + 1, int(mask.sum() - part.sum()))
        target = out[k, rr0:rr1, cc0:cc1]
        overlaps += int(np.count_nonzero(part & (target > 0)))
        target[part] = matches[segment].label_id
    if overlaps:
        logger.warning("SEG segments overlap on %d voxels; the higher segment number was kept", overlaps)
    return out


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
    volume, lab = load_dicom_case_volume(case_dir, labels)
    return np.asarray(volume.hu, dtype=np.float32), lab, np.asarray(volume.affine_lps)


def load_dicom_case_volume(case_dir: Path, labels: LabelTable):  # -> tuple[pipeline.types.Volume, np.ndarray]
    """The CT of a case folder (one CT series + one SEG, searched recursively) as the Volume the Segmenter
    takes, and the SEG rasterised on its grid (label ids of ``labels``)."""
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
    return volume, lab
