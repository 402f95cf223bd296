"""DICOM Segmentation of the thigh and hip muscles (PS3.3 A.51 Segmentation IOD).

:func:`build_seg` turns a :class:`pipeline.types.Segmentation` (label map + side map on
a CT volume's grid) into a highdicom :class:`highdicom.seg.Segmentation`:

* one segment per structure and side present in the label map (PS3.3 C.8.20.2,
  Segment Description Macro): SegmentLabel "Gluteus maximus right",
  SegmentedPropertyCategory "Anatomical Structure" (CID 7150), SegmentedPropertyType
  the structure's SNOMED CT code from the label table with the laterality as
  SegmentedPropertyTypeModifier (CID 244), RecommendedDisplayCIELabValue from the
  label colour, SegmentAlgorithmType AUTOMATIC with the model in
  SegmentationAlgorithmIdentificationSequence (family "Artificial Intelligence", CID
  7162), and a deterministic TrackingID / TrackingUID so that the TID 1500 SR can
  reference the segment (:func:`dicomout.uids.tracking_uid`);
* frames on the source grid: the pixel array is passed in the volume's slice order
  together with the source instances in the same order, so highdicom copies each
  frame's PlanePositionSequence from its source slice and references it in
  DerivationImageSequence (PS3.3 C.7.6.16.2.6);
* ``segmentation_type="BINARY"`` (Segmentation Storage, 1 bit per pixel, one frame per
  segment and slice, empty frames omitted; with native or deflated frames highdicom builds the
  object around one marker frame per slice and :mod:`dicomout.seg_frames` adds the frames and
  their per-frame functional groups in bulk: the same dataset, in a third of the time) or ``"LABELMAP"`` (Label Map Segmentation
  Storage, 1.2.840.10008.5.1.4.1.1.66.7, one 8/16-bit frame per non-empty slice whose
  pixel value is the segment number), each with a lossless transfer syntax
  (:data:`BINARY_TRANSFER_SYNTAXES`, :data:`LABELMAP_TRANSFER_SYNTAXES`; by default Deflated
  Explicit VR Little Endian, PS3.5 A.5, applied when the dataset is written).

The source instances are given as paths or as datasets (headers are enough) of the
selected series, in any order; they are matched to the volume's slices by
SOPInstanceUID and their geometry is checked against the volume's affine.

:func:`segment_map` reads back which segment number holds which structure and side.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.sr.coding import Code
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)

from dicomout import codes
from dicomout.errors import OutputError
from dicomout.seg_frames import BulkFrameError, bulk_applies, fill_binary_frames, skeleton_array
from dicomout.uids import SEG_SERIES, output_uid, tracking_uid
from pipeline.labels import Label
from pipeline.types import SIDE_LEFT, SIDE_NAMES, SIDE_NONE, SIDE_RIGHT, Segmentation, Volume

logger = logging.getLogger(__name__)

SEGMENTATION_TYPES: tuple[str, ...] = ("BINARY", "LABELMAP")
"""Allowed ``segmentation_type`` values of :func:`build_seg` (PS3.3 C.8.20.2 SegmentationType)."""

BINARY_TRANSFER_SYNTAXES: tuple[UID, ...] = (DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, JPEG2000Lossless)
"""BINARY: bit-packed native frames (1 bit per pixel), the whole dataset deflated (PS3.5 A.5) or not,
or each frame JPEG 2000 lossless (PS3.5 8.2.4, 8 bits per pixel before compression). The first is the
default: 0.8 % of the source CT's bytes at the uncompressed build time (bench/bench_seg.py)."""

LABELMAP_TRANSFER_SYNTAXES: tuple[UID, ...] = (
    DeflatedExplicitVRLittleEndian, RLELossless, JPEGLSLossless, JPEG2000Lossless, ExplicitVRLittleEndian,
)
"""Lossless transfer syntaxes for LABELMAP; the first is the default (see bench/bench_seg.py)."""

CONTENT_LABEL = "THIGH_MUSCLES"
"""ContentLabel (0070,0080), CS: upper case, at most 16 characters."""

POSITION_TOLERANCE_FRACTION = 0.25
"""A source slice may lie at most this fraction of the slice step from where the volume's
affine puts slice k (the loader accepts 1 % uneven spacing; a mismatched series is off by
whole slices)."""
ORIENTATION_TOLERANCE = 1e-3
"""Largest difference between the source ImageOrientationPatient and the affine's directions."""

_SIDE_ORDER = (SIDE_RIGHT, SIDE_LEFT, SIDE_NONE)


class BuildError(OutputError):
    """An output object (SEG, SR) cannot be built from the inputs given."""


SourceInput = Path | str | Dataset
"""A source CT instance: a file path or a dataset (``stop_before_pixels`` is enough)."""


@dataclass(frozen=True)
class SegmentSpec:
    """One segment of the SEG: a structure of the label table on one side.

    ``side`` is "right", "left" or "none" (:data:`pipeline.types.SIDE_NAMES`).
    """

    number: int
    label: Label
    side: str
    voxel_count: int
    tracking_id: str
    tracking_uid: str

    @property
    def segment_label(self) -> str:
        """SegmentLabel (0062,0005): the structure name and the side, e.g. "Gluteus maximus right"."""
        return self.label.name if self.side == "none" else f"{self.label.name} {self.side}"


def structure_code(label: Label) -> Code:
    """SNOMED CT code of a structure from the label table (SegmentedPropertyType, SR finding).

    Raises:
        BuildError: the label has no SNOMED CT concept id (digits) or no meaning.
    """
    code = label.snomed_code.strip()
    meaning = label.snomed_meaning.strip()
    if not code.isdigit():
        raise BuildError(
            f"label {label.id} ({label.key}): snomed_code is {label.snomed_code!r}; "
            "allowed: a SNOMED CT concept id (digits) in config/labels.toml"
        )
    if not meaning:
        raise BuildError(f"label {label.id} ({label.key}): snomed_meaning is empty; a CodeMeaning is required")
    return Code(code, "SCT", meaning)


def make_tracking_id(key: str, side: str) -> str:
    """TrackingID (0062,0020) of a segment: ``"<structure key> <side>"``, e.g. "gluteus_maximus right"."""
    return f"{key} {side}"


def parse_tracking_id(tracking_id: str) -> tuple[str, str]:
    """Inverse of :func:`make_tracking_id`.

    Raises:
        BuildError: the value is not ``"<key> <right|left|none>"``.
    """
    key, _, side = str(tracking_id).rpartition(" ")
    if not key or side not in SIDE_NAMES.values():
        raise BuildError(
            f"TrackingID {tracking_id!r} is not '<structure key> <side>' with side in {tuple(SIDE_NAMES.values())}"
        )
    return key, side


def read_source_datasets(sources: Sequence[SourceInput]) -> list[Dataset]:
    """Headers of the source instances (paths are read with ``stop_before_pixels``).

    Raises:
        BuildError: a path is not a readable DICOM file, or no source was given.
    """
    if len(sources) == 0:
        raise BuildError("no source instances were given; the SEG/SR need the CT series they describe")
    datasets = []
    for src in sources:
        if isinstance(src, Dataset):
            datasets.append(src)
            continue
        try:
            datasets.append(pydicom.dcmread(src, stop_before_pixels=True))
        except (InvalidDicomError, OSError) as exc:
            raise BuildError(f"source instance {src} is not a readable DICOM file: {exc}") from exc
    return datasets


def order_sources(volume: Volume, sources: Sequence[SourceInput]) -> list[Dataset]:
    """The source datasets in the volume's slice order k, geometry checked.

    Each volume slice ``k`` must have a source with SOPInstanceUID
    ``volume.sop_instance_uids[k]`` whose ImagePositionPatient lies where the affine puts
    slice k, whose ImageOrientationPatient matches the affine's row and column directions
    (PS3.3 C.7.6.2.1.1), with the volume's Rows/Columns and FrameOfReferenceUID. Sources
    not in the volume are ignored (logged).

    Raises:
        BuildError: a slice has no source, or a source contradicts the volume's geometry.
    """
    datasets = read_source_datasets(sources)
    if not volume.sop_instance_uids:
        raise BuildError("the volume has no source SOP Instance UIDs; cannot reference the source CT")
    by_uid = {str(ds.SOPInstanceUID): ds for ds in datasets}
    missing = [uid for uid in volume.sop_instance_uids if uid not in by_uid]
    if missing:
        raise BuildError(
            f"{len(missing)} of {len(volume.sop_instance_uids)} volume slices have no source instance "
            f"(first missing SOPInstanceUID {missing[0]}); the sources given are {len(datasets)} instances "
            f"of series {sorted({str(ds.get('SeriesInstanceUID', '')) for ds in datasets})}"
        )
    extra = len(by_uid) - len(volume.sop_instance_uids)
    if extra:
        logger.info("order_sources: %d source instance(s) not in the volume ignored", extra)

    affine = volume.affine_lps
    step = affine[:3, 0]
    step_mm = float(np.linalg.norm(step))
    col_dir = affine[:3, 1] / np.linalg.norm(affine[:3, 1])
    row_dir = affine[:3, 2] / np.linalg.norm(affine[:3, 2])
    expected_iop = np.concatenate([row_dir, col_dir])
    tolerance_mm = POSITION_TOLERANCE_FRACTION * step_mm
    _, rows, cols = volume.shape
    ordered = []
    for k, uid in enumerate(volume.sop_instance_uids):
        ds = by_uid[uid]
        where = f"source SOPInstanceUID {uid} (slice k={k})"
        if (int(ds.Rows), int(ds.Columns)) != (rows, cols):
            raise BuildError(
                f"{where}: Rows/Columns {int(ds.Rows)}x{int(ds.Columns)}; the volume's slices are {rows}x{cols}"
            )
        if str(ds.get("FrameOfReferenceUID", "")) != volume.frame_of_reference_uid:
            raise BuildError(
                f"{where}: FrameOfReferenceUID {ds.get('FrameOfReferenceUID')!r}; "
                f"allowed: the volume's {volume.frame_of_reference_uid!r}"
            )
        iop = np.asarray([float(v) for v in ds.ImageOrientationPatient])
        if np.max(np.abs(iop - expected_iop)) > ORIENTATION_TOLERANCE:
            raise BuildError(
                f"{where}: ImageOrientationPatient {iop.round(4).tolist()}; the volume's affine has "
                f"{expected_iop.round(4).tolist()} (allowed difference {ORIENTATION_TOLERANCE:g})"
            )
        ipp = np.asarray([float(v) for v in ds.ImagePositionPatient])
        expected = affine[:3, 3] + k * step
        off = float(np.linalg.norm(ipp - expected))
        if off > tolerance_mm:
            raise BuildError(
                f"{where}: ImagePositionPatient {ipp.round(3).tolist()} mm is {off:.2f} mm from where the "
                f"volume's affine puts slice {k} ({expected.round(3).tolist()}); allowed: <= {tolerance_mm:.2f} mm"
            )
        ordered.append(ds)
    return ordered


def plan_segments(segmentation: Segmentation, seg_instance_uid: str) -> tuple[list[SegmentSpec], np.ndarray]:
    """The segments present (by label id, then right, left, none) and the segment-number array.

    Returns:
        ``(segments, array)``: ``array[k, r, c]`` is the segment number of the voxel (0 =
        background), uint8 or uint16, in the segmentation's axis order.

    Raises:
        BuildError: label or side values outside the label table / 0..2.
    """
    labels = segmentation.labels
    label_map, side_map = segmentation.label_map, segmentation.side_map
    n_labels = len(labels.labels)
    lmin, lmax = int(label_map.min()), int(label_map.max())
    if lmin < 0 or lmax > n_labels:
        raise BuildError(f"label_map values {lmin}..{lmax}; allowed: 0..{n_labels} (the label table's ids)")
    smin, smax = int(side_map.min()), int(side_map.max())
    if smin < 0 or smax > 2:
        raise BuildError(f"side_map values {smin}..{smax}; allowed: 0 (none), 1 (right), 2 (left)")

    # Combined code label*3 + side, counted slice by slice (no full-size int64 temporary).
    n_codes = (n_labels + 1) * 3
    code_dtype = np.uint8 if n_codes <= 256 else np.uint16
    combined = label_map.astype(code_dtype) * code_dtype(3) + side_map.astype(code_dtype)
    counts = np.zeros(n_codes, dtype=np.int64)
    for k in range(combined.shape[0]):
        counts += np.bincount(combined[k].ravel(), minlength=n_codes)

    segments: list[SegmentSpec] = []
    lut = np.zeros(n_codes, dtype=np.uint16)
    for label in labels.labels:
        for side_value in _SIDE_ORDER:
            n = int(counts[label.id * 3 + side_value])
            if n == 0:
                continue
            side = SIDE_NAMES[side_value]
            number = len(segments) + 1
            segments.append(
                SegmentSpec(
                    number=number,
                    label=label,
                    side=side,
                    voxel_count=n,
                    tracking_id=make_tracking_id(label.key, side),
                    tracking_uid=tracking_uid(seg_instance_uid, label.key, side),
                )
            )
            lut[label.id * 3 + side_value] = number
    array_dtype = np.uint8 if len(segments) <= 255 else np.uint16
    lut = lut.astype(array_dtype)
    array = np.empty(combined.shape, dtype=array_dtype)
    for k in range(combined.shape[0]):  # slice by slice: the index temporaries stay small
        array[k] = lut[combined[k]]
    return segments, array


def _segment_description(spec: SegmentSpec, algorithm: hd.AlgorithmIdentificationSequence) -> hd.seg.SegmentDescription:
    """Segment Description Macro item (PS3.3 C.8.20.2, Table C.8.20-2 / 10-23)."""
    desc = hd.seg.SegmentDescription(
        segment_number=spec.number,
        segment_label=spec.segment_label[:64],
        segmented_property_category=codes.ANATOMICAL_STRUCTURE,
        segmented_property_type=structure_code(spec.label),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
        tracking_uid=spec.tracking_uid,
        tracking_id=spec.tracking_id,
        display_color=hd.color.CIELabColor.from_rgb(*spec.label.color),
    )
    modifier = codes.laterality(spec.side)
    if modifier is not None:
        # SegmentedPropertyTypeModifierCodeSequence (0062,0011) nests in the type item.
        desc.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
            hd.sr.CodedConcept.from_code(modifier)
        ]
    return desc


WEIGHTS_SHA256_PARAMETER = "weights_sha256"
"""AlgorithmParameters (0066,0032) key of the model weights' sha256 (``weights_sha256=<64 hex>``): the exact
model, beside AlgorithmName / AlgorithmVersion; the SR takes it from there."""


def _segment_descriptions(
    segments: Sequence[SegmentSpec], segmentation: Segmentation, manufacturer: str, series_uid: str
) -> list[hd.seg.SegmentDescription]:
    """The Segment Description items, each naming the model as its algorithm (CID 7162 family AI).

    Raises:
        BuildError: no segment (the label map has no labelled voxel).
    """
    if not segments:
        raise BuildError(
            f"the label map of series {series_uid} has no labelled voxel; a Segmentation needs at least one segment"
        )
    algorithm = hd.AlgorithmIdentificationSequence(
        name=segmentation.model_name[:64],
        family=codes.ARTIFICIAL_INTELLIGENCE,
        version=segmentation.model_version[:64],
        source=manufacturer[:64] or None,
        parameters={WEIGHTS_SHA256_PARAMETER: segmentation.model_sha256} if segmentation.model_sha256 else None,
    )
    return [_segment_description(spec, algorithm) for spec in segments]


def _transfer_syntax(segmentation_type: str, transfer_syntax_uid: str | None) -> UID:
    """The transfer syntax of the SEG: the type's default, or the one asked for when the type allows it."""
    if segmentation_type not in SEGMENTATION_TYPES:
        raise BuildError(f"segmentation_type {segmentation_type!r} is not allowed; allowed: {SEGMENTATION_TYPES}")
    allowed_ts = BINARY_TRANSFER_SYNTAXES if segmentation_type == "BINARY" else LABELMAP_TRANSFER_SYNTAXES
    ts = UID(transfer_syntax_uid) if transfer_syntax_uid is not None else allowed_ts[0]
    if ts not in allowed_ts:
        raise BuildError(
            f"transfer syntax {ts} ({ts.name}) is not allowed for {segmentation_type}; "
            f"allowed: {[f'{u} ({u.name})' for u in allowed_ts]}"
        )
    return ts


def _frame_syntax(ts: UID) -> UID:
    """The syntax highdicom encodes the frames in: Deflate applies to the whole Part 10 body, not to
    frames (PS3.5 A.5), so a deflated SEG's frames are built native."""
    return ExplicitVRLittleEndian if ts == DeflatedExplicitVRLittleEndian else ts


def _check_grid(volume: Volume, segmentation: Segmentation) -> None:
    """The label map must lie on the volume's grid (same shape, same affine or none given)."""
    if segmentation.label_map.shape != volume.shape:
        raise BuildError(
            f"segmentation shape {segmentation.label_map.shape} differs from the volume's {volume.shape}; "
            "the label map must be on the volume's grid"
        )
    if not (
        np.allclose(segmentation.affine_lps, volume.affine_lps, atol=1e-3)
        or np.array_equal(segmentation.affine_lps, np.eye(4))
    ):
        raise BuildError(
            "segmentation affine_lps differs from the volume's (by up to "
            f"{np.max(np.abs(segmentation.affine_lps - volume.affine_lps)):.4g} mm); "
            "the label map must be on the volume's grid"
        )


def build_seg(
    volume: Volume,
    segmentation: Segmentation,
    source_datasets: Sequence[SourceInput],
    *,
    segmentation_type: str = "BINARY",
    transfer_syntax_uid: str | None = None,
    manufacturer: str, software_version: str, device_serial: str, manufacturer_model_name: str = "thighnode",
    series_number: int = SEG_SERIES.number, instance_number: int = 1,
    workers: int = 0, omit_empty_frames: bool = True,
    series_uid: str | None = None, instance_uid: str | None = None, series_description: str | None = None,
    highdicom_frames: bool = False,
) -> Dataset:
    """Build the DICOM Segmentation (PS3.3 A.51, or A.51.x Label Map Segmentation) of a study.

    Args:
        volume: the CT volume the segmentation was computed on.
        segmentation: label map and side map on ``volume``'s grid, with the label table and
            model name/version.
        source_datasets: the source CT instances (paths or datasets), any order.
        segmentation_type: "BINARY" (Segmentation Storage) or "LABELMAP" (Label Map
            Segmentation Storage).
        transfer_syntax_uid: ``None`` for the type's default; BINARY allows
            :data:`BINARY_TRANSFER_SYNTAXES`, LABELMAP :data:`LABELMAP_TRANSFER_SYNTAXES`.
        manufacturer, ..., instance_number: General / Enhanced General Equipment (PS3.3 C.7.5.1,
            C.7.5.2), SeriesNumber, InstanceNumber; workers: highdicom's frame-compression processes.
        omit_empty_frames: leave out frames with no pixel of their segment (highdicom's default; each
            frame kept has its PlanePositionSequence: readers place it by position, not by index).
        series_uid, instance_uid, series_description: instead of those from the source series and model.
        highdicom_frames: highdicom builds every frame even where :mod:`dicomout.seg_frames` applies
            (the same dataset, 2-3x slower: bench/bench_seg.py's baseline).

    Returns:
        The Segmentation: a :class:`highdicom.seg.Segmentation`, or (:mod:`dicomout.seg_frames`) a plain
        Dataset with the same attributes (``hd.seg.segread`` reads it once written).

    Raises:
        BuildError: the inputs are inconsistent (shape, geometry, missing sources, empty
            label map, empty SNOMED code, unsupported type or transfer syntax).
    """
    started = time.monotonic()
    ts = _transfer_syntax(segmentation_type, transfer_syntax_uid)
    _check_grid(volume, segmentation)
    ordered = order_sources(volume, source_datasets)

    series_uid = series_uid or output_uid(volume.series_instance_uid, segmentation.model_version, "seg.series")
    instance_uid = instance_uid or output_uid(volume.series_instance_uid, segmentation.model_version, "seg.instance")
    segments, array = plan_segments(segmentation, instance_uid)
    descriptions = _segment_descriptions(segments, segmentation, manufacturer, volume.series_instance_uid)

    rows, cols = volume.shape[1:]
    bulk = not highdicom_frames and bulk_applies(segmentation_type, ts, omit_empty_frames, len(segments), rows, cols)
    highdicom_seg = functools.partial(
        _highdicom_seg, source_images=ordered, segmentation_type=segmentation_type, ts=ts,
        series_uid=series_uid, series_number=series_number, instance_uid=instance_uid,
        instance_number=instance_number, manufacturer=manufacturer, manufacturer_model_name=manufacturer_model_name,
        software_version=software_version, device_serial=device_serial,
        content_description=f"Thigh and hip muscles by {segmentation.model_name} {segmentation.model_version}"[:64],
        omit_empty_frames=omit_empty_frames, workers=workers,
    )

    seg: Dataset | None = None
    if bulk:
        try:
            seg = fill_binary_frames(
                highdicom_seg(skeleton_array(array), descriptions[:1]), array, descriptions, volume.sop_instance_uids
            )
        except BulkFrameError as exc:  # not expected: highdicom then builds every frame, as before
            logger.warning("build_seg: series %s: bulk frames not possible (%s); highdicom builds them",
                           volume.series_instance_uid, exc)
        except (ValueError, TypeError) as exc:
            raise BuildError(f"bulk frames of the Segmentation ({segmentation_type}, {ts.name}): {exc}") from exc
    if seg is None:
        seg = highdicom_seg(array, descriptions)
    seg.file_meta.TransferSyntaxUID = ts  # Deflated: pydicom deflates the dataset when it is written
    seg.SeriesDescription = series_description or SEG_SERIES.description(segmentation.model_name, segmentation.model_version)
    logger.info("build_seg end: series %s, %s %s, %d segments, %d frames in %.2f s", volume.series_instance_uid,
                segmentation_type, ts.name, len(segments), int(seg.NumberOfFrames), time.monotonic() - started)
    return seg


def _highdicom_seg(
    pixel_array: np.ndarray, segment_descriptions: list[hd.seg.SegmentDescription], *,
    source_images: list[Dataset], segmentation_type: str, ts: UID, series_uid: str, series_number: int,
    instance_uid: str, instance_number: int, manufacturer: str, manufacturer_model_name: str,
    software_version: str, device_serial: str, content_description: str, omit_empty_frames: bool, workers: int,
) -> Dataset:
    """highdicom's Segmentation constructor with build_seg's arguments; its refusals as BuildError."""
    try:
        return hd.seg.Segmentation(
            source_images=source_images,
            pixel_array=pixel_array,
            segmentation_type=segmentation_type,
            segment_descriptions=segment_descriptions,
            series_instance_uid=series_uid,
            series_number=series_number,
            sop_instance_uid=instance_uid,
            instance_number=instance_number,
            manufacturer=manufacturer,
            manufacturer_model_name=manufacturer_model_name,
            software_versions=software_version,
            device_serial_number=device_serial,
            content_label=CONTENT_LABEL,
            content_description=content_description,
            transfer_syntax_uid=_frame_syntax(ts),
            omit_empty_frames=omit_empty_frames,
            workers=workers,
        )
    except (ValueError, TypeError) as exc:
        raise BuildError(f"highdicom refused the Segmentation ({segmentation_type}, {ts.name}): {exc}") from exc


def segment_map(seg_dataset: Dataset) -> dict[tuple[str, str], int]:
    """``{(structure key, side): SegmentNumber}`` of a SEG built by :func:`build_seg`.

    Reads TrackingID of each SegmentSequence item; the LABELMAP background (segment 0,
    no TrackingID) is skipped.

    Raises:
        BuildError: a segment other than the background has no or a malformed TrackingID.
    """
    result: dict[tuple[str, str], int] = {}
    for item in seg_dataset.SegmentSequence:
        number = int(item.SegmentNumber)
        if number == 0:
            continue
        if "TrackingID" not in item:
            raise BuildError(f"segment {number} ({item.get('SegmentLabel', '')!r}) has no TrackingID (0062,0020)")
        result[parse_tracking_id(item.TrackingID)] = number
    return result


def segment_tracking_uids(seg_dataset: Dataset) -> dict[int, str]:
    """``{SegmentNumber: TrackingUID}`` of the segments that have one."""
    return {
        int(item.SegmentNumber): str(item.TrackingUID)
        for item in seg_dataset.SegmentSequence
        if "TrackingUID" in item
    }
