"""Load a CT series into a :class:`pipeline.types.Volume` in Hounsfield units.

A series is single-frame CT Image Storage instances (PS3.3 A.3), or one or more
multi-frame Enhanced CT (A.38) / Legacy Converted Enhanced CT (A.70) instances, or a mix
of those: every *frame* is a slice. Headers are read first (``stop_before_pixels``), or
taken from the caller that read them already (selection), to sort and validate the
geometry; then a float32 array is preallocated and filled slice by slice (frame by
frame for multi-frame objects, through :func:`pydicom.pixels.iter_pixels`), so that
loading holds about one copy of the volume plus one decoded slice (a 512x512x600 series
needs ~630 MB, not several GB). Compressed transfer syntaxes (JPEG Lossless, JPEG-LS,
JPEG 2000, RLE) decode through pydicom's pixel plugins, single- and multi-frame alike.

Multi-frame objects (PS3.3 C.7.6.16 Multi-frame Functional Groups): the attributes a
single-frame instance has at the top level come, for frame ``i``, from the
PerFrameFunctionalGroupsSequence item ``i`` or else the SharedFunctionalGroupsSequence
item (:func:`pipeline.multiframe.frame_headers` lifts them to the top level of one
header per frame): ImagePositionPatient from PlanePositionSequence (C.7.6.16.2.3),
ImageOrientationPatient from PlaneOrientationSequence (C.7.6.16.2.4), PixelSpacing and
SliceThickness from PixelMeasuresSequence (C.7.6.16.2.1), RescaleSlope/Intercept from
PixelValueTransformationSequence (C.7.6.16.2.9), FrameType from CTImageFrameTypeSequence
(C.8.15.3.1), ConvolutionKernel from CTReconstructionSequence (C.8.15.3.7) and
GantryDetectorTilt from CTAcquisitionDetailsSequence (C.8.15.3.3); for a Legacy
Converted object those two may sit in the Unassigned Per-Frame / Shared Converted
Attributes Sequences (C.7.6.16.2.25), and finally at the top level.

**Slices and frames.** ``Volume.sop_instance_uids[k]`` is the SOP Instance UID of the
source of slice ``k``; for a multi-frame source the same UID repeats for each of its
frames. Slice ``k`` of a multi-frame source is frame ``n`` (1-based, as DICOM numbers
frames, e.g. ReferencedFrameNumber) of that instance: :func:`source_frames` gives
``(SOPInstanceUID, frame number)`` for every slice in the volume's order (frame number 1
for a single-frame instance), which is what a DICOM-SEG needs to reference its source
frames (PS3.3 C.7.6.16.2.6 Derivation Image / C.10.9 Referenced Frame Number).

Rules implemented (each failure raises :class:`pipeline.errors.VolumeError` saying what
was checked, the value seen and what is allowed). They apply to slices, that is, to the
frames of multi-frame objects as to single-frame instances:

* Modality ``CT``; SOPClassUID CT Image Storage with one frame (PS3.3 A.3), or Enhanced
  CT / Legacy Converted Enhanced CT with a PerFrameFunctionalGroupsSequence of
  NumberOfFrames items; one SOP class per volume.
* The Image Plane and Image Pixel attributes needed for geometry and HU are present
  (PS3.3 C.7.6.2, C.7.6.3, C.8.2.1: ImagePositionPatient, ImageOrientationPatient,
  PixelSpacing, Rows, Columns, RescaleIntercept, RescaleSlope, PixelData), at the top
  level or, for multi-frame objects, in the functional groups of every frame.
* All slices share ImageOrientationPatient (within :data:`ORIENTATION_TOLERANCE`),
  Rows/Columns, PixelSpacing (within :data:`PIXEL_SPACING_TOLERANCE_MM`),
  SeriesInstanceUID, FrameOfReferenceUID and SOPClassUID.
* No gantry/detector tilt: GantryDetectorTilt (0018,1120) is 0, and the slice positions
  lie along the slice normal (row direction x column direction, PS3.3 C.7.6.2.1.1):
  a slice may be at most :data:`POSITION_LATERAL_TOLERANCE_MM` off that line, or
  :data:`POSITION_ANGLE_TOLERANCE_DEG` seen from slice 0. Tilted series are not resampled.
* No two slices at the same position (closer than :data:`DUPLICATE_TOLERANCE_MM`).
* Even spacing: every distance between neighbouring slices is within
  ``max(SPACING_TOLERANCE_MM, SPACING_TOLERANCE_FRACTION * median)`` (0.05 mm or 1 %) of
  the median; a gap (missing slices) or uneven reconstruction is declined.
* At least ``min_slices`` slices (frames, for multi-frame objects).

Slices are sorted by their position along the normal, ascending, whatever the file
order, InstanceNumber order or PatientPosition. The affine is the one documented on
:class:`pipeline.types.Volume`; its slice column is the normal times the mean spacing
(orthogonal to the image plane, which the tilt check guarantees to within tolerance).

Pixels equal to PixelPaddingValue (or within PixelPaddingValue..PixelPaddingRangeLimit,
PS3.3 C.7.5.1.1.2), compared on stored values before rescaling, become
:data:`PADDING_HU` (air).
"""

from __future__ import annotations

import logging
import math
import struct
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pydicom.pixels import iter_pixels
from pydicom.uid import UID

from pipeline.errors import VolumeError
from pipeline.multiframe import (
    CT_IMAGE_STORAGE,
    ENHANCED_CT_IMAGE_STORAGE,
    FRAME_ATTRIBUTES,
    LEGACY_CONVERTED_ENHANCED_CT_IMAGE_STORAGE,
    MULTI_FRAME_CT_STORAGE,
    frame_headers,
    is_multi_frame,
    number_of_frames,
)
from pipeline.types import Volume

logger = logging.getLogger(__name__)

ORIENTATION_TOLERANCE = 1e-4
"""Largest difference between ImageOrientationPatient components of two slices."""
PIXEL_SPACING_TOLERANCE_MM = 1e-4
"""Largest difference between the PixelSpacing values of two slices."""
POSITION_LATERAL_TOLERANCE_MM = 0.05
POSITION_ANGLE_TOLERANCE_DEG = 0.5
DUPLICATE_TOLERANCE_MM = 0.01
SPACING_TOLERANCE_MM = 0.05
SPACING_TOLERANCE_FRACTION = 0.01
TILT_TOLERANCE_DEG = 1e-3
"""|GantryDetectorTilt| above this is a tilt."""
PADDING_HU = -1024.0
"""HU given to padding pixels (outside the reconstruction circle)."""

_REQUIRED = (
    ("ImagePositionPatient", "(0020,0032)"),
    ("ImageOrientationPatient", "(0020,0037)"),
    ("PixelSpacing", "(0028,0030)"),
    ("Rows", "(0028,0010)"),
    ("Columns", "(0028,0011)"),
    ("RescaleIntercept", "(0028,1052)"),
    ("RescaleSlope", "(0028,1053)"),
)


@dataclass(frozen=True)
class _Frame:
    """One slice as read from the headers: a single-frame instance or one frame of a multi-frame one."""

    header: Dataset  # the instance's header, or the frame's (frame_headers)
    path: Path
    frame_number: int  # 1-based within its instance
    multi_frame: bool
    where: str  # "SOPInstanceUID x" or "SOPInstanceUID x frame n"


@dataclass(frozen=True)
class _Slice:
    path: Path
    sop_instance_uid: str
    frame_number: int  # 1-based within its instance
    multi_frame: bool
    position_mm: np.ndarray
    offset_mm: float  # position along the normal
    rescale_slope: float  # of the frame; single-frame slices are rescaled from their file (_fill_slice)
    rescale_intercept: float

    @property
    def label(self) -> str:
        """SOPInstanceUID, with the frame number for a multi-frame source."""
        return f"{self.sop_instance_uid} frame {self.frame_number}" if self.multi_frame else self.sop_instance_uid


@dataclass(frozen=True)
class _Geometry:
    """What the header pass found: slices in volume order and the grid."""

    slices: tuple[_Slice, ...]
    affine: np.ndarray
    rows: int
    cols: int
    padding: Mapping[Path, tuple[int, int] | None]  # multi-frame instances only
    first: Dataset


def _name(ds: Dataset, path: Path) -> str:
    uid = ds.get("SOPInstanceUID")
    return f"SOPInstanceUID {uid}" if uid else f"file {path.name}"


def _floats(ds: Dataset, keyword: str, tag: str, n: int, where: str) -> np.ndarray:
    value = ds.get(keyword)
    try:
        arr = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise VolumeError(f"{keyword} {tag} of {where} is {value!r}: not {n} numbers ({exc})") from exc
    if arr.shape != (n,) or not np.all(np.isfinite(arr)):
        raise VolumeError(f"{keyword} {tag} of {where} is {list(value)}; allowed: {n} finite numbers")
    return arr


def _float(ds: Dataset, keyword: str, tag: str, where: str) -> float:
    value = ds.get(keyword)
    try:
        v = float(value)
    except (TypeError, ValueError) as exc:
        raise VolumeError(f"{keyword} {tag} of {where} is {value!r}: not a number ({exc})") from exc
    if not math.isfinite(v):
        raise VolumeError(f"{keyword} {tag} of {where} is {value!r}; allowed: a finite number")
    return v


def _read_headers(paths: Sequence[Path]) -> list[Dataset]:
    headers = []
    for p in paths:
        try:
            headers.append(pydicom.dcmread(p, stop_before_pixels=True))
        except (InvalidDicomError, OSError) as exc:
            raise VolumeError(f"{p} is not readable as a DICOM file: {exc}") from exc
    return headers


def _check_instance(ds: Dataset, path: Path) -> None:
    where = _name(ds, path)
    modality = ds.get("Modality", "")
    if modality != "CT":
        raise VolumeError(f"Modality (0008,0060) of {where} is {modality!r}; allowed: 'CT'")
    sop_class = str(ds.get("SOPClassUID", ""))
    name = UID(sop_class).name if sop_class else "missing"
    n_frames = number_of_frames(ds)
    if sop_class in MULTI_FRAME_CT_STORAGE:
        per_frame = ds.get("PerFrameFunctionalGroupsSequence")
        if per_frame is None:
            raise VolumeError(
                f"SOPClassUID (0008,0016) of {where} is {sop_class} ({name}) but PerFrameFunctionalGroupsSequence "
                "(5200,9230) is missing; allowed: a multi-frame object whose Multi-frame Functional Groups "
                "(PS3.3 C.7.6.16) give the geometry of every frame"
            )
        if n_frames < 1 or len(per_frame) != n_frames:
            raise VolumeError(
                f"{where} has NumberOfFrames (0028,0008) {ds.get('NumberOfFrames')!r} but "
                f"{len(per_frame)} PerFrameFunctionalGroupsSequence (5200,9230) item(s); allowed: one item per frame"
            )
    elif n_frames > 1:
        raise VolumeError(
            f"{where} is a multi-frame object (NumberOfFrames {n_frames}, SOPClassUID {sop_class}); "
            f"allowed: one frame for {CT_IMAGE_STORAGE} (CT Image Storage); multi-frame CT must be "
            f"{ENHANCED_CT_IMAGE_STORAGE} (Enhanced CT) or {LEGACY_CONVERTED_ENHANCED_CT_IMAGE_STORAGE} "
            "(Legacy Converted Enhanced CT) with functional groups"
        )
    elif sop_class != CT_IMAGE_STORAGE:
        raise VolumeError(
            f"SOPClassUID (0008,0016) of {where} is {sop_class or '(missing)'} ({name}); "
            f"allowed: {CT_IMAGE_STORAGE} (CT Image Storage), {ENHANCED_CT_IMAGE_STORAGE} (Enhanced CT Image "
            f"Storage), {LEGACY_CONVERTED_ENHANCED_CT_IMAGE_STORAGE} (Legacy Converted Enhanced CT Image Storage)"
        )
    multi = sop_class in MULTI_FRAME_CT_STORAGE
    for keyword, tag in _REQUIRED:
        if multi and keyword in FRAME_ATTRIBUTES:
            continue  # checked per frame (_frames_of)
        if ds.get(keyword) in (None, ""):
            raise VolumeError(f"{keyword} {tag} is missing or empty in {where}; it is required to build the volume")
    spp = int(ds.get("SamplesPerPixel", 1) or 1)
    if spp != 1:
        raise VolumeError(f"SamplesPerPixel (0028,0002) of {where} is {spp}; allowed: 1")


def _frames_of(ds: Dataset, path: Path) -> list[_Frame]:
    """The slices of one checked instance, with the per-frame required attributes checked."""
    if not is_multi_frame(ds):
        return [_Frame(header=ds, path=path, frame_number=1, multi_frame=False, where=_name(ds, path))]
    frames = []
    for i, view in enumerate(frame_headers(ds)):
        where = f"{_name(ds, path)} frame {i + 1}"
        for keyword, tag in _REQUIRED:
            if keyword in FRAME_ATTRIBUTES and view.get(keyword) in (None, ""):
                groups = "/".join(FRAME_ATTRIBUTES[keyword])
                raise VolumeError(
                    f"{keyword} {tag} is missing or empty in {where} (looked in its PerFrameFunctionalGroupsSequence "
                    f"item and the SharedFunctionalGroupsSequence, {groups}); it is required to build the volume"
                )
        frames.append(_Frame(header=view, path=path, frame_number=i + 1, multi_frame=True, where=where))
    return frames


def _padding_range(ds: Dataset) -> tuple[int, int] | None:
    """Stored-value range of padding pixels, or None (PS3.3 C.7.5.1.1.2)."""

    def value(keyword: str) -> int | None:
        v = ds.get(keyword)
        if v is None or v == "":
            return None
        if isinstance(v, bytes):  # US or SS left undecided by an Implicit VR reader
            fmt = "<h" if int(ds.get("PixelRepresentation", 0)) == 1 else "<H"
            return int(struct.unpack(fmt, v[:2])[0])
        return int(v)

    pad = value("PixelPaddingValue")
    if pad is None:
        return None
    limit = value("PixelPaddingRangeLimit")
    if limit is None:
        return pad, pad
    return min(pad, limit), max(pad, limit)


def _geometry(
    paths: Sequence[Path], *, min_slices: int, headers: Sequence[Dataset] | None = None
) -> _Geometry:
    """Validate the headers of a series; the slices sorted along the normal and the affine.

    ``headers`` are the pixel-less headers of ``paths`` in the same order when the caller
    has read them already; without them (None or empty) they are read here
    (``stop_before_pixels``).
    """
    required = max(min_slices, 1)
    if not paths:
        raise VolumeError(f"the series has 0 instance(s); at least {required} required")
    if not headers:
        headers = _read_headers(paths)
    elif len(headers) != len(paths):
        raise ValueError(f"{len(headers)} header(s) given for {len(paths)} path(s); allowed: one per path, same order")
    frames, padding = _frames_of_series(headers, paths, required)
    first = frames[0].header
    iop0, ps0 = _check_grid(frames)
    row_dir, col_dir, normal = _plane_axes(iop0)
    positions = [_floats(fr.header, "ImagePositionPatient", "(0020,0032)", 3, fr.where) for fr in frames]
    _check_header_tilt(frames, positions, normal)
    slices = _sorted_slices(frames, positions, normal)
    _check_positions_along_normal(slices, normal)
    offsets = np.asarray([s.offset_mm for s in slices])
    gaps = np.diff(offsets)
    _check_no_duplicates(slices, gaps)
    if len(slices) >= 2:
        step_mm = _even_step_mm(slices, offsets, gaps)
    else:
        step_mm = float(first.get("SliceThickness") or 1.0)

    affine = np.eye(4)
    affine[:3, 0] = normal * step_mm
    affine[:3, 1] = col_dir * ps0[0]
    affine[:3, 2] = row_dir * ps0[1]
    affine[:3, 3] = slices[0].position_mm
    rows, cols = int(first.Rows), int(first.Columns)
    return _Geometry(slices=tuple(slices), affine=affine, rows=rows, cols=cols, padding=padding, first=first)


def _frames_of_series(
    headers: Sequence[Dataset], paths: Sequence[Path], required: int
) -> tuple[list[_Frame], dict[Path, tuple[int, int] | None]]:
    """Every checked instance's slices, the padding range of each multi-frame instance; at least ``required``."""
    frames: list[_Frame] = []
    padding: dict[Path, tuple[int, int] | None] = {}
    for ds, p in zip(headers, paths):
        _check_instance(ds, p)
        frames.extend(_frames_of(ds, p))
        if is_multi_frame(ds):
            padding[p] = _padding_range(ds)
    n_multi = sum(1 for ds in headers if is_multi_frame(ds))
    if len(frames) < required:
        if n_multi:
            raise VolumeError(
                f"the series has {len(frames)} slice(s) (frames of {n_multi} multi-frame instance(s) and "
                f"{len(paths) - n_multi} single-frame instance(s)); at least {required} required"
            )
        raise VolumeError(f"the series has {len(paths)} instance(s); at least {required} required")
    return frames, padding


def _check_grid(frames: Sequence[_Frame]) -> tuple[np.ndarray, np.ndarray]:
    """Every slice on the first one's plane and grid; its ImageOrientationPatient and PixelSpacing."""
    first, where0 = frames[0].header, frames[0].where
    iop0 = _floats(first, "ImageOrientationPatient", "(0020,0037)", 6, where0)
    ps0 = _floats(first, "PixelSpacing", "(0028,0030)", 2, where0)
    rows, cols = int(first.Rows), int(first.Columns)
    for fr in frames[1:]:
        ds, where = fr.header, fr.where
        iop = _floats(ds, "ImageOrientationPatient", "(0020,0037)", 6, where)
        if np.max(np.abs(iop - iop0)) > ORIENTATION_TOLERANCE:
            raise VolumeError(
                f"mixed ImageOrientationPatient (0020,0037): {where} has {iop.tolist()}, "
                f"{where0} has {iop0.tolist()}; allowed: all equal within {ORIENTATION_TOLERANCE:g}"
            )
        if (int(ds.Rows), int(ds.Columns)) != (rows, cols):
            raise VolumeError(
                f"mixed Rows/Columns (0028,0010)/(0028,0011): {where} is {int(ds.Rows)}x{int(ds.Columns)}, "
                f"{where0} is {rows}x{cols}; allowed: all equal"
            )
        ps = _floats(ds, "PixelSpacing", "(0028,0030)", 2, where)
        if np.max(np.abs(ps - ps0)) > PIXEL_SPACING_TOLERANCE_MM:
            raise VolumeError(
                f"mixed PixelSpacing (0028,0030): {where} has {ps.tolist()} mm, "
                f"{where0} has {ps0.tolist()} mm; "
                f"allowed: all equal within {PIXEL_SPACING_TOLERANCE_MM:g} mm"
            )
        for keyword, tag in (
            ("SeriesInstanceUID", "(0020,000E)"),
            ("FrameOfReferenceUID", "(0020,0052)"),
            ("SOPClassUID", "(0008,0016)"),
        ):
            if str(ds.get(keyword, "")) != str(first.get(keyword, "")):
                raise VolumeError(
                    f"mixed {keyword} {tag}: {where} has {ds.get(keyword)!r}, "
                    f"{where0} has {first.get(keyword)!r}; allowed: one value per volume"
                )
    return iop0, ps0


def _plane_axes(iop: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unit row direction, column direction and slice normal (row x column, PS3.3 C.7.6.2.1.1)."""
    row_dir, col_dir = iop[:3], iop[3:]
    if (
        abs(np.linalg.norm(row_dir) - 1.0) > 1e-3
        or abs(np.linalg.norm(col_dir) - 1.0) > 1e-3
        or abs(float(row_dir @ col_dir)) > 1e-3
    ):
        raise VolumeError(
            f"ImageOrientationPatient (0020,0037) {iop.tolist()} is not two orthogonal unit vectors "
            "(allowed: |row| = |col| = 1 and row . col = 0 within 0.001)"
        )
    row_dir = row_dir / np.linalg.norm(row_dir)
    col_dir = col_dir / np.linalg.norm(col_dir)
    normal = np.cross(row_dir, col_dir)
    normal /= np.linalg.norm(normal)
    return row_dir, col_dir, normal


def _check_header_tilt(frames: Sequence[_Frame], positions: Sequence[np.ndarray], normal: np.ndarray) -> None:
    """No slice declares a GantryDetectorTilt (0018,1120) beyond :data:`TILT_TOLERANCE_DEG`."""
    for fr in frames:
        tilt_value = fr.header.get("GantryDetectorTilt")
        if tilt_value in (None, ""):
            continue
        tilt = float(tilt_value)
        if abs(tilt) > TILT_TOLERANCE_DEG:
            raise VolumeError(
                f"gantry/detector tilt: GantryDetectorTilt (0018,1120) of {fr.where} is {tilt:g} degrees"
                f"{_geometric_tilt_note(positions, normal)}; allowed: 0 (tilted series are not resampled)"
            )


def _sorted_slices(frames: Sequence[_Frame], positions: Sequence[np.ndarray], normal: np.ndarray) -> list[_Slice]:
    """The slices ascending along the normal (a multi-frame slice carries its frame's rescale)."""
    return sorted(
        (
            _Slice(
                path=fr.path,
                sop_instance_uid=str(fr.header.get("SOPInstanceUID", "")),
                frame_number=fr.frame_number,
                multi_frame=fr.multi_frame,
                position_mm=pos,
                offset_mm=float(pos @ normal),
                rescale_slope=_float(fr.header, "RescaleSlope", "(0028,1053)", fr.where) if fr.multi_frame else 1.0,
                rescale_intercept=(
                    _float(fr.header, "RescaleIntercept", "(0028,1052)", fr.where) if fr.multi_frame else 0.0
                ),
            )
            for fr, pos in zip(frames, positions)
        ),
        key=lambda s: s.offset_mm,
    )


def _check_positions_along_normal(slices: Sequence[_Slice], normal: np.ndarray) -> None:
    """Tilt seen in the geometry: every slice position on the normal through slice 0, within tolerance."""
    p0 = slices[0].position_mm
    worst_angle, worst_lateral = 0.0, 0.0
    for s in slices[1:]:
        d = s.position_mm - p0
        along = float(d @ normal)
        lateral = float(np.linalg.norm(d - along * normal))
        angle = math.degrees(math.atan2(lateral, abs(along))) if lateral > 0 else 0.0
        if lateral > POSITION_LATERAL_TOLERANCE_MM and angle > POSITION_ANGLE_TOLERANCE_DEG and angle > worst_angle:
            worst_angle, worst_lateral = angle, lateral
    if worst_angle > 0:
        raise VolumeError(
            f"gantry/detector tilt: slice positions (ImagePositionPatient) are not along the slice normal; "
            f"they deviate {worst_angle:.1f} degrees ({worst_lateral:.2f} mm sideways); allowed: "
            f"<= {POSITION_ANGLE_TOLERANCE_DEG:g} degrees or <= {POSITION_LATERAL_TOLERANCE_MM:g} mm"
        )


def _check_no_duplicates(slices: Sequence[_Slice], gaps: np.ndarray) -> None:
    """No two neighbouring slices closer than :data:`DUPLICATE_TOLERANCE_MM` along the normal."""
    for i in np.flatnonzero(gaps < DUPLICATE_TOLERANCE_MM):
        a, b = slices[i], slices[i + 1]
        raise VolumeError(
            f"duplicate slice position {[round(v, 3) for v in a.position_mm.tolist()]} mm: SOPInstanceUID "
            f"{a.label} and {b.label} (distance {abs(gaps[i]):.3f} mm along the normal); "
            f"allowed: one slice per position (>= {DUPLICATE_TOLERANCE_MM:g} mm apart)"
        )


def _even_step_mm(slices: Sequence[_Slice], offsets: np.ndarray, gaps: np.ndarray) -> float:
    """The mean slice step (mm) of at least two slices, after checking that every gap is near the median."""
    median = float(np.median(gaps))
    tol = max(SPACING_TOLERANCE_MM, SPACING_TOLERANCE_FRACTION * median)
    bad = np.flatnonzero(np.abs(gaps - median) > tol)
    if bad.size:
        worst = int(bad[np.argmax(np.abs(gaps[bad] - median))])
        missing = round(float(gaps[worst]) / median) - 1 if gaps[worst] > median else 0
        hint = f"; the largest gap looks like {missing} missing slice(s)" if missing >= 1 else ""
        raise VolumeError(
            f"uneven slice spacing along the normal: min {gaps.min():.3f}, median {median:.3f}, "
            f"max {gaps.max():.3f} mm ({bad.size} of {gaps.size} gaps off the median; worst between "
            f"SOPInstanceUID {slices[worst].label} and {slices[worst + 1].label}){hint}; "
            f"allowed: every gap within {tol:.3f} mm of the median (1% or {SPACING_TOLERANCE_MM:g} mm, "
            "whichever is larger)"
        )
    return (offsets[-1] - offsets[0]) / (len(slices) - 1)


def load_volume(paths: Sequence[Path], *, min_slices: int = 20, headers: Sequence[Dataset] | None = None) -> Volume:
    """Read a CT series into a :class:`Volume` in HU (float32, axes (k, r, c)).

    ``paths`` are the instance files of one series, in any order: single-frame CT Image
    Storage, and/or Enhanced CT / Legacy Converted Enhanced CT objects whose frames are
    slices (a series split over several multi-frame instances is one volume).
    ``min_slices`` counts slices, i.e. frames of multi-frame objects. Raises
    :class:`VolumeError` when the series is not a regular axial-stack volume (see the
    module docstring for every check and its tolerance). ``sop_instance_uids[k]`` is
    the source instance of slice k (repeated per frame; :func:`source_frames` gives the
    frame numbers).

    ``headers``, when given, are the pixel-less headers of ``paths`` in the same order
    (``SelectedSeries.headers``: selection read them once); they replace this function's
    own header pass, so that a job parses each header once. Each file is then read once
    more to decode its pixels: that pixel read is the one unavoidable second read.
    Without ``headers`` (None or empty, as ``SelectedSeries.headers`` defaults to: model
    kit, tests) the headers are read here first.
    """
    started = time.monotonic()
    paths = [Path(p) for p in paths]
    logger.info("load_volume start: %d instance file(s)", len(paths))
    geo = _geometry(paths, min_slices=min_slices, headers=headers)
    first = geo.first
    series_uid = str(first.get("SeriesInstanceUID", ""))

    hu = np.empty((len(geo.slices), geo.rows, geo.cols), dtype=np.float32)
    by_instance: dict[Path, dict[int, tuple[int, _Slice]]] = {}
    for k, s in enumerate(geo.slices):
        if s.multi_frame:
            by_instance.setdefault(s.path, {})[s.frame_number - 1] = (k, s)
        else:
            _fill_slice(hu[k], s.path, geo.rows, geo.cols)
    for path, wanted in by_instance.items():
        _fill_frames(hu, path, wanted, geo.rows, geo.cols, geo.padding.get(path))

    volume = Volume(
        hu=hu,
        affine_lps=geo.affine,
        frame_of_reference_uid=str(first.get("FrameOfReferenceUID", "")),
        study_instance_uid=str(first.get("StudyInstanceUID", "")),
        series_instance_uid=series_uid,
        sop_class_uid=str(first.SOPClassUID),
        sop_instance_uids=tuple(s.sop_instance_uid for s in geo.slices),
    )
    logger.info(
        "load_volume end: series %s, %d instance(s) (%d multi-frame), shape %s, spacing %s mm in %.2f s",
        series_uid,
        len(paths),
        len(by_instance),
        volume.shape,
        tuple(round(v, 4) for v in volume.spacing_mm),
        time.monotonic() - started,
    )
    return volume


def source_frames(paths: Sequence[Path], *, headers: Sequence[Dataset] | None = None) -> list[tuple[str, int]]:
    """``(SOPInstanceUID, frame number)`` of every slice, in the order of :func:`load_volume`'s Volume.

    Element ``k`` is the source of ``Volume.hu[k]`` for the same ``paths``: the frame
    number is 1-based within its instance (PS3.3 C.7.6.16, as ReferencedFrameNumber
    counts) and 1 for a single-frame instance. Reads headers only, and none when
    ``headers`` (those of ``paths``, same order) are given; raises :class:`VolumeError`
    for the same header problems as :func:`load_volume` (any slice count is accepted).
    """
    geo = _geometry([Path(p) for p in paths], min_slices=1, headers=headers)
    return [(s.sop_instance_uid, s.frame_number) for s in geo.slices]


def _geometric_tilt_note(positions: Sequence[np.ndarray], normal: np.ndarray) -> str:
    """', positions x degrees off the normal' from the two outermost slices, or ''."""
    if len(positions) < 2:
        return ""
    pos = np.asarray(positions)
    along = pos @ normal
    a, b = pos[int(np.argmin(along))], pos[int(np.argmax(along))]
    d = b - a
    dn = float(d @ normal)
    if np.linalg.norm(d) == 0:
        return ""
    angle = math.degrees(math.atan2(float(np.linalg.norm(d - dn * normal)), abs(dn)))
    return f" (slice positions deviate {angle:.1f} degrees from the slice normal)"


def _decode_error(where: str, ts: Any, exc: Exception) -> VolumeError:
    name = UID(str(ts)).name if ts else "unknown"
    return VolumeError(
        f"cannot decode the pixel data of {where} (TransferSyntaxUID {ts} {name}): {exc}; "
        "allowed: uncompressed, JPEG Lossless, JPEG-LS, JPEG 2000, RLE"
    )


def _fill_slice(out: np.ndarray, path: Path, rows: int, cols: int) -> None:
    """Decode one single-frame instance into ``out`` (rows x cols, float32) in HU."""
    ds = pydicom.dcmread(path)
    where = _name(ds, path)
    if "PixelData" not in ds:
        raise VolumeError(f"PixelData (7FE0,0010) is missing in {where}; required for every slice")
    ts = ds.file_meta.get("TransferSyntaxUID", "") if hasattr(ds, "file_meta") else ""
    try:
        stored: Any = ds.pixel_array
    except Exception as exc:  # the decoders raise many types; name the file and syntax
        raise _decode_error(where, ts, exc) from exc
    if stored.shape != (rows, cols):
        raise VolumeError(f"pixel data of {where} has shape {stored.shape}; allowed: {(rows, cols)} (Rows x Columns)")
    slope = float(ds.RescaleSlope)
    intercept = float(ds.RescaleIntercept)
    np.multiply(stored, slope, out=out, casting="unsafe")
    out += np.float32(intercept)
    padding = _padding_range(ds)
    if padding is not None:
        lo, hi = padding
        out[(stored >= lo) & (stored <= hi)] = PADDING_HU


def _fill_frames(
    hu: np.ndarray,
    path: Path,
    wanted: Mapping[int, tuple[int, _Slice]],
    rows: int,
    cols: int,
    padding: tuple[int, int] | None,
) -> None:
    """Decode the frames of one multi-frame instance into their slices of ``hu``, one frame at a time.

    ``wanted`` maps a 0-based frame index to (slice k, slice); each frame gets its own
    RescaleSlope/Intercept (Pixel Value Transformation, PS3.3 C.7.6.16.2.9).
    """
    some = next(iter(wanted.values()))[1]
    where = f"SOPInstanceUID {some.sop_instance_uid}" if some.sop_instance_uid else f"file {path.name}"
    indices = sorted(wanted)
    decoded = 0
    try:
        meta = read_file_meta_info(path)
        ts = meta.get("TransferSyntaxUID", "")
    except (InvalidDicomError, OSError):
        ts = ""
    frames = iter_pixels(path, indices=indices)
    while True:
        try:
            stored = next(frames)
        except StopIteration:
            break
        except AttributeError as exc:  # pydicom: no Pixel Data element
            raise VolumeError(
                f"PixelData (7FE0,0010) is missing in {where} ({exc}); required for every frame"
            ) from exc
        except Exception as exc:  # the decoders raise many types; name the file and syntax
            raise _decode_error(where, ts, exc) from exc
        index = indices[decoded]
        decoded += 1
        k, s = wanted[index]
        if stored.shape != (rows, cols):
            raise VolumeError(
                f"pixel data of {s.label} has shape {stored.shape}; allowed: {(rows, cols)} (Rows x Columns)"
            )
        out = hu[k]
        np.multiply(stored, s.rescale_slope, out=out, casting="unsafe")
        out += np.float32(s.rescale_intercept)
        if padding is not None:
            lo, hi = padding
            out[(stored >= lo) & (stored <= hi)] = PADDING_HU
    if decoded != len(indices):
        raise VolumeError(
            f"pixel data of {where} gave {decoded} frame(s); allowed: the {len(indices)} frame(s) "
            "that NumberOfFrames (0028,0008) and PerFrameFunctionalGroupsSequence (5200,9230) announce"
        )
