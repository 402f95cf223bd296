"""Reading a DICOM Segmentation onto a CT volume's grid (pydicom only).

Implements the reading side of the Segmentation IOD (PS3.3 A.51, Segmentation Image
Module C.8.20.2, Multi-frame Functional Groups C.7.6.16). Used by the node (a reader's
corrected SEG, :mod:`thighnode.corrections`) and by the model kit (DICOM-SEG ground
truth, :mod:`modelkit.segimport`):

* segments come from SegmentSequence (0062,0002); each is matched to the label table by
  its SegmentedPropertyTypeCodeSequence code (SNOMED CT, scheme SCT or SRT) when the
  table has a code for the structure, else by SegmentLabel against the label key, name
  or SNOMED meaning (case, punctuation, "muscle" and side words ignored);
* a segment's side (laterality) is its SegmentedPropertyTypeModifierCodeSequence (CID 244:
  SCT 24028007 right, 7771000 left; how :mod:`dicomout.seg` writes it), else the
  AnatomicRegionModifierSequence of its AnatomicRegionSequence, else the word "right" or
  "left" in its SegmentLabel; none of them: "none" (the side then comes from the midline);
* each frame's segment is PerFrameFunctionalGroupsSequence >
  SegmentIdentificationSequence > ReferencedSegmentNumber, its position
  PlanePositionSequence > ImagePositionPatient (per frame), its orientation and pixel
  spacing PlaneOrientationSequence / PixelMeasuresSequence (shared or per frame);
* frames are pasted onto the CT grid; they must lie in CT slice planes with the CT's
  orientation and pixel spacing (no resampling: what Slicer/dcmqi/highdicom export for
  a segmentation drawn on the CT). A SEG may omit empty frames (ours does), so any
  subset of the CT's slices is accepted. FRACTIONAL segments are thresholded at one half.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset

from pipeline.errors import PipelineError
from pipeline.labels import LabelTable
from pipeline.types import SIDE_LEFT, SIDE_NONE, SIDE_RIGHT

logger = logging.getLogger(__name__)

SEG_SOP_CLASS_UID = "1.2.840.10008.5.1.4.1.1.66.4"
SNOMED_SCHEMES = ("SCT", "SRT")
POSITION_TOLERANCE_MM = 0.1
ORIENTATION_TOLERANCE = 1e-3
LATERALITY_CODES: dict[str, str] = {"24028007": "right", "7771000": "left", "51440002": "none"}
"""CID 244 laterality codes (SNOMED CT) and the side they give."""
_SIDE_VALUES = {"right": SIDE_RIGHT, "left": SIDE_LEFT, "none": SIDE_NONE}


class SegReadError(PipelineError):
    """A DICOM-SEG does not fit the label table or the CT's grid (message: what, value, allowed)."""


@dataclass(frozen=True)
class SegmentMatch:
    """A segment of the SEG, the label id it maps to and its side ("right", "left" or "none")."""

    segment_number: int
    segment_label: str
    code_value: str
    label_id: int
    matched_by: str  # "code" or "label"
    side: str = "none"
    side_from: str = ""  # "modifier", "anatomic region modifier", "label" or "" (no side)


@dataclass(frozen=True)
class SegLabels:
    """A SEG rasterized on a CT grid: label ids and sides (:data:`pipeline.types.SIDE_NAMES`)."""

    label_map: np.ndarray
    side_map: np.ndarray
    matches: tuple[SegmentMatch, ...]
    frames: int


def _code_side(items: object) -> str | None:
    for code in items or ():  # type: ignore[attr-defined]
        side = LATERALITY_CODES.get(str(code.get("CodeValue", "")))
        if side is not None and str(code.get("CodingSchemeDesignator", "")) in SNOMED_SCHEMES:
            return side
    return None


def segment_side(item: Dataset) -> tuple[str, str]:
    """(side, where it was found) of a SegmentSequence item (module docstring)."""
    for code in item.get("SegmentedPropertyTypeCodeSequence", None) or ():
        side = _code_side(code.get("SegmentedPropertyTypeModifierCodeSequence", None))
        if side is not None:
            return side, "modifier"
    for region in item.get("AnatomicRegionSequence", None) or ():
        side = _code_side(region.get("AnatomicRegionModifierSequence", None))
        if side is not None:
            return side, "anatomic region modifier"
    words = set(re.findall(r"[a-z]+", str(item.get("SegmentLabel", "")).lower()))
    if "right" in words and "left" not in words:
        return "right", "label"
    if "left" in words and "right" not in words:
        return "left", "label"
    return "none", ""


def match_segments(ds: Dataset, labels: LabelTable) -> list[SegmentMatch]:
    """Map every segment of a SEG dataset to a label id and side; raise on a segment that fits none."""
    if "SegmentSequence" not in ds:
        raise SegReadError("DICOM-SEG lacks SegmentSequence (0062,0002)")
    by_code = {l.snomed_code: l.id for l in labels.labels if l.snomed_code}
    out: list[SegmentMatch] = []
    for item in ds.SegmentSequence:
        number = int(item.SegmentNumber)
        seg_label = str(getattr(item, "SegmentLabel", ""))
        code_value, scheme = "", ""
        if "SegmentedPropertyTypeCodeSequence" in item and len(item.SegmentedPropertyTypeCodeSequence):
            code = item.SegmentedPropertyTypeCodeSequence[0]
            code_value, scheme = str(code.get("CodeValue", "")), str(code.get("CodingSchemeDesignator", ""))
        side, side_from = segment_side(item)
        if code_value and scheme in SNOMED_SCHEMES and code_value in by_code:
            out.append(SegmentMatch(number, seg_label, code_value, by_code[code_value], "code", side, side_from))
        elif (by_name := labels.id_for_name(seg_label)) is not None:
            out.append(SegmentMatch(number, seg_label, code_value, by_name, "label", side, side_from))
        else:
            raise SegReadError(
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
    ds: Dataset, item: Dataset, f: int, affine: np.ndarray, shape: tuple[int, int, int], segments: set[int]
) -> tuple[int, tuple[int, int, int]]:
    """Frame ``f``'s segment number and the CT voxel (k, r, c) of its first pixel; SegReadError when the
    frame is not on the CT's grid (orientation, spacing, position) or names an undefined segment."""
    inverse = np.linalg.inv(affine)
    ct_row_step = affine[:3, 1]  # moving one row: + column direction x PixelSpacing[0]
    ct_col_step = affine[:3, 2]
    ident = _functional(ds, item, "SegmentIdentificationSequence")
    position = _functional(ds, item, "PlanePositionSequence")
    orientation = _functional(ds, item, "PlaneOrientationSequence")
    measures = _functional(ds, item, "PixelMeasuresSequence")
    if ident is None or position is None or orientation is None or measures is None:
        raise SegReadError(f"frame {f + 1}: segment identification, plane position/orientation or pixel measures missing")
    segment = int(ident.ReferencedSegmentNumber)
    if segment not in segments:
        raise SegReadError(f"frame {f + 1} references segment {segment}, which SegmentSequence does not define")
    iop = np.asarray([float(v) for v in orientation.ImageOrientationPatient])
    spacing = [float(v) for v in measures.PixelSpacing]
    row_step = iop[3:6] * spacing[0]
    col_step = iop[0:3] * spacing[1]
    if not (np.allclose(row_step, ct_row_step, atol=ORIENTATION_TOLERANCE * max(spacing) + 1e-3)
            and np.allclose(col_step, ct_col_step, atol=ORIENTATION_TOLERANCE * max(spacing) + 1e-3)):
        raise SegReadError(
            f"frame {f + 1}: orientation {iop.round(4).tolist()} / spacing {spacing} differ from the CT grid "
            f"(row step {ct_row_step.round(4).tolist()}, column step {ct_col_step.round(4).tolist()}); "
            "only SEGs on the CT's grid are supported"
        )
    ipp = np.asarray([float(v) for v in position.ImagePositionPatient] + [1.0])
    index = inverse @ ipp
    nearest = np.round(index[:3])
    error_mm = np.linalg.norm(affine[:3, :3] @ (index[:3] - nearest))
    if error_mm > POSITION_TOLERANCE_MM:
        raise SegReadError(
            f"frame {f + 1}: ImagePositionPatient {ipp[:3].round(3).tolist()} lies {error_mm:.3f} mm off the CT "
            f"grid (allowed {POSITION_TOLERANCE_MM} mm)"
        )
    k, r0, c0 = (int(v) for v in nearest)
    if not 0 <= k < shape[0]:
        raise SegReadError(f"frame {f + 1}: slice index {k} is outside the CT's {shape[0]} slices (0..{shape[0] - 1})")
    return segment, (k, r0, c0)


def _check_header(ds: Dataset, frame_of_reference_uid: str | None) -> None:
    if str(ds.get("SOPClassUID", "")) != SEG_SOP_CLASS_UID:
        raise SegReadError(f"SOPClassUID is {ds.get('SOPClassUID', '')!r}; a Segmentation ({SEG_SOP_CLASS_UID}) is required")
    if frame_of_reference_uid and str(ds.get("FrameOfReferenceUID", "")) != frame_of_reference_uid:
        raise SegReadError(
            f"SEG FrameOfReferenceUID {ds.get('FrameOfReferenceUID', '')!r} differs from the CT's {frame_of_reference_uid!r}"
        )


def read_seg(
    ds: Dataset,
    shape: tuple[int, int, int],
    affine_lps: np.ndarray,
    labels: LabelTable,
    frame_of_reference_uid: str | None = None,
    *,
    strict: bool = False,
) -> SegLabels:
    """Label and side maps (uint8, ``shape``, the CT's (k, r, c) grid) from a SEG dataset.

    Where segments overlap, the one with the higher segment number wins (logged). With
    ``strict`` a segment pixel outside the CT's rows/columns raises (a partial SEG),
    otherwise it is clipped with a warning.
    """
    _check_header(ds, frame_of_reference_uid)
    matches = {m.segment_number: m for m in match_segments(ds, labels)}
    affine = np.asarray(affine_lps, dtype=np.float64)
    n_frames = int(ds.get("NumberOfFrames", 1))
    frames = ds.pixel_array.reshape(n_frames, int(ds.Rows), int(ds.Columns))
    fractional = str(ds.get("SegmentationType", "BINARY")) == "FRACTIONAL"
    threshold = 0.5 * float(ds.get("MaximumFractionalValue", 255)) if fractional else 0.5
    label_map = np.zeros(shape, dtype=np.uint8)
    side_map = np.zeros(shape, dtype=np.uint8)
    overlaps = 0
    per_frame = ds.PerFrameFunctionalGroupsSequence
    origins = [_frame_origin(ds, per_frame[f], f, affine, shape, set(matches)) for f in range(n_frames)]
    for f in sorted(range(n_frames), key=lambda f: origins[f][0]):
        segment, (k, r0, c0) = origins[f]
        mask = frames[f] > threshold
        rr0, cc0 = max(0, r0), max(0, c0)
        rr1, cc1 = min(shape[1], r0 + mask.shape[0]), min(shape[2], c0 + mask.shape[1])
        part = mask[rr0 - r0: rr1 - r0, cc0 - c0: cc1 - c0] if rr1 > rr0 and cc1 > cc0 else mask[:0, :0]
        outside = int(mask.sum() - part.sum())
        if outside:
            if strict:
                raise SegReadError(
                    f"frame {f + 1} (segment {segment}): {outside} segment pixels lie outside the CT's "
                    f"{shape[1]} x {shape[2]} grid; the whole segment must lie on the CT"
                )
            logger.warning("frame %d: %d segment pixels lie outside the CT grid", f + 1, outside)
        if part.size == 0:
            continue
        target = label_map[k, rr0:rr1, cc0:cc1]
        overlaps += int(np.count_nonzero(part & (target > 0)))
        target[part] = matches[segment].label_id
        side_map[k, rr0:rr1, cc0:cc1][part] = _SIDE_VALUES[matches[segment].side]
    if overlaps:
        logger.warning("SEG segments overlap on %d voxels; the higher segment number was kept", overlaps)
    return SegLabels(label_map, side_map, tuple(matches.values()), n_frames)


def rasterize_seg(
    ds: Dataset,
    shape: tuple[int, int, int],
    affine_lps: np.ndarray,
    labels: LabelTable,
    frame_of_reference_uid: str | None = None,
) -> np.ndarray:
    """The label map of :func:`read_seg` (sides dropped; pixels off the CT grid clipped)."""
    return read_seg(ds, shape, affine_lps, labels, frame_of_reference_uid).label_map
