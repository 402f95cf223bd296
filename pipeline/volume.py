"""Load a single-frame CT series into a :class:`pipeline.types.Volume` in Hounsfield units.

Headers are read first (``stop_before_pixels``) to sort and validate the geometry;
then a float32 array is preallocated and filled slice by slice, so that loading holds
about one copy of the volume plus one decoded slice (a 512x512x600 series needs
~630 MB, not several GB). Compressed transfer syntaxes (JPEG Lossless, JPEG-LS,
JPEG 2000, RLE) decode through pydicom's pixel plugins.

Rules implemented (each failure raises :class:`pipeline.errors.VolumeError` saying what
was checked, the value seen and what is allowed):

* Modality ``CT`` and SOPClassUID CT Image Storage, single frame (PS3.3 A.3); multi-frame
  objects (Enhanced CT, NumberOfFrames > 1) are declined.
* The Image Plane and Image Pixel attributes needed for geometry and HU are present
  (PS3.3 C.7.6.2, C.7.6.3, C.8.2.1: ImagePositionPatient, ImageOrientationPatient,
  PixelSpacing, Rows, Columns, RescaleIntercept, RescaleSlope, PixelData).
* All slices share ImageOrientationPatient (within :data:`ORIENTATION_TOLERANCE`),
  Rows/Columns, PixelSpacing (within :data:`PIXEL_SPACING_TOLERANCE_MM`),
  SeriesInstanceUID and FrameOfReferenceUID.
* No gantry/detector tilt: GantryDetectorTilt (0018,1120) is 0, and the slice positions
  lie along the slice normal (row direction x column direction, PS3.3 C.7.6.2.1.1):
  a slice may be at most :data:`POSITION_LATERAL_TOLERANCE_MM` off that line, or
  :data:`POSITION_ANGLE_TOLERANCE_DEG` seen from slice 0. Tilted series are not resampled.
* No two slices at the same position (closer than :data:`DUPLICATE_TOLERANCE_MM`).
* Even spacing: every distance between neighbouring slices is within
  ``max(SPACING_TOLERANCE_MM, SPACING_TOLERANCE_FRACTION * median)`` (0.05 mm or 1 %) of
  the median; a gap (missing slices) or uneven reconstruction is declined.
* At least ``min_slices`` slices.

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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

from pipeline.errors import VolumeError
from pipeline.types import Volume

logger = logging.getLogger(__name__)

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"

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
class _Slice:
    path: Path
    sop_instance_uid: str
    position_mm: np.ndarray
    offset_mm: float  # position along the normal


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
    frames = ds.get("NumberOfFrames")
    try:
        n_frames = int(frames) if frames not in (None, "") else 1
    except (TypeError, ValueError):
        n_frames = 1
    if n_frames > 1:
        raise VolumeError(
            f"{where} is a multi-frame object (NumberOfFrames {n_frames}, SOPClassUID {sop_class}); "
            "allowed: single-frame CT Image Storage (multi-frame is not supported)"
        )
    if sop_class != CT_IMAGE_STORAGE:
        name = UID(sop_class).name if sop_class else "missing"
        raise VolumeError(
            f"SOPClassUID (0008,0016) of {where} is {sop_class or '(missing)'} ({name}); "
            f"allowed: {CT_IMAGE_STORAGE} (CT Image Storage, single frame; Enhanced CT is not supported)"
        )
    for keyword, tag in _REQUIRED:
        if ds.get(keyword) in (None, ""):
            raise VolumeError(f"{keyword} {tag} is missing or empty in {where}; it is required to build the volume")
    spp = int(ds.get("SamplesPerPixel", 1) or 1)
    if spp != 1:
        raise VolumeError(f"SamplesPerPixel (0028,0002) of {where} is {spp}; allowed: 1")


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


def load_volume(paths: Sequence[Path], *, min_slices: int = 20) -> Volume:
    """Read a single-frame CT series into a :class:`Volume` in HU (float32, axes (k, r, c)).

    ``paths`` are the instance files of one series, in any order. Raises
    :class:`VolumeError` when the series is not a regular axial-stack volume (see the
    module docstring for every check and its tolerance).
    """
    started = time.monotonic()
    paths = [Path(p) for p in paths]
    if len(paths) < max(min_slices, 1):
        raise VolumeError(f"the series has {len(paths)} instance(s); at least {max(min_slices, 1)} required")
    headers = _read_headers(paths)
    for ds, p in zip(headers, paths):
        _check_instance(ds, p)

    first = headers[0]
    series_uid = str(first.get("SeriesInstanceUID", ""))
    logger.info("load_volume start: series %s, %d instances", series_uid, len(paths))

    # Consistency of the plane and grid.
    iop0 = _floats(first, "ImageOrientationPatient", "(0020,0037)", 6, _name(first, paths[0]))
    ps0 = _floats(first, "PixelSpacing", "(0028,0030)", 2, _name(first, paths[0]))
    rows, cols = int(first.Rows), int(first.Columns)
    for ds, p in zip(headers[1:], paths[1:]):
        where = _name(ds, p)
        iop = _floats(ds, "ImageOrientationPatient", "(0020,0037)", 6, where)
        if np.max(np.abs(iop - iop0)) > ORIENTATION_TOLERANCE:
            raise VolumeError(
                f"mixed ImageOrientationPatient (0020,0037): {where} has {iop.tolist()}, "
                f"{_name(first, paths[0])} has {iop0.tolist()}; allowed: all equal within {ORIENTATION_TOLERANCE:g}"
            )
        if (int(ds.Rows), int(ds.Columns)) != (rows, cols):
            raise VolumeError(
                f"mixed Rows/Columns (0028,0010)/(0028,0011): {where} is {int(ds.Rows)}x{int(ds.Columns)}, "
                f"{_name(first, paths[0])} is {rows}x{cols}; allowed: all equal"
            )
        ps = _floats(ds, "PixelSpacing", "(0028,0030)", 2, where)
        if np.max(np.abs(ps - ps0)) > PIXEL_SPACING_TOLERANCE_MM:
            raise VolumeError(
                f"mixed PixelSpacing (0028,0030): {where} has {ps.tolist()} mm, "
                f"{_name(first, paths[0])} has {ps0.tolist()} mm; "
                f"allowed: all equal within {PIXEL_SPACING_TOLERANCE_MM:g} mm"
            )
        for keyword, tag in (("SeriesInstanceUID", "(0020,000E)"), ("FrameOfReferenceUID", "(0020,0052)")):
            if str(ds.get(keyword, "")) != str(first.get(keyword, "")):
                raise VolumeError(
                    f"mixed {keyword} {tag}: {where} has {ds.get(keyword)!r}, "
                    f"{_name(first, paths[0])} has {first.get(keyword)!r}; allowed: one value per volume"
                )

    row_dir, col_dir = iop0[:3], iop0[3:]
    if (
        abs(np.linalg.norm(row_dir) - 1.0) > 1e-3
        or abs(np.linalg.norm(col_dir) - 1.0) > 1e-3
        or abs(float(row_dir @ col_dir)) > 1e-3
    ):
        raise VolumeError(
            f"ImageOrientationPatient (0020,0037) {iop0.tolist()} is not two orthogonal unit vectors "
            "(allowed: |row| = |col| = 1 and row . col = 0 within 0.001)"
        )
    row_dir = row_dir / np.linalg.norm(row_dir)
    col_dir = col_dir / np.linalg.norm(col_dir)
    normal = np.cross(row_dir, col_dir)
    normal /= np.linalg.norm(normal)

    # Tilt from the header.
    for ds, p in zip(headers, paths):
        tilt_value = ds.get("GantryDetectorTilt")
        if tilt_value in (None, ""):
            continue
        tilt = float(tilt_value)
        if abs(tilt) > TILT_TOLERANCE_DEG:
            raise VolumeError(
                f"gantry/detector tilt: GantryDetectorTilt (0018,1120) of {_name(ds, p)} is {tilt:g} degrees"
                f"{_geometric_tilt_note(headers, paths, normal)}; allowed: 0 (tilted series are not resampled)"
            )

    slices = sorted(
        (
            _Slice(
                path=p,
                sop_instance_uid=str(ds.get("SOPInstanceUID", "")),
                position_mm=pos,
                offset_mm=float(pos @ normal),
            )
            for ds, p, pos in (
                (ds, p, _floats(ds, "ImagePositionPatient", "(0020,0032)", 3, _name(ds, p)))
                for ds, p in zip(headers, paths)
            )
        ),
        key=lambda s: s.offset_mm,
    )
    del headers

    # Positions along the normal (tilt seen in the geometry).
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

    # Duplicates.
    offsets = np.asarray([s.offset_mm for s in slices])
    gaps = np.diff(offsets)
    for i in np.flatnonzero(gaps < DUPLICATE_TOLERANCE_MM):
        a, b = slices[i], slices[i + 1]
        raise VolumeError(
            f"duplicate slice position {[round(v, 3) for v in a.position_mm.tolist()]} mm: SOPInstanceUID "
            f"{a.sop_instance_uid} and {b.sop_instance_uid} (distance {abs(gaps[i]):.3f} mm along the normal); "
            f"allowed: one slice per position (>= {DUPLICATE_TOLERANCE_MM:g} mm apart)"
        )

    # Even spacing.
    if len(slices) >= 2:
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
                f"SOPInstanceUID {slices[worst].sop_instance_uid} and {slices[worst + 1].sop_instance_uid}){hint}; "
                f"allowed: every gap within {tol:.3f} mm of the median (1% or {SPACING_TOLERANCE_MM:g} mm, "
                "whichever is larger)"
            )
        step_mm = (offsets[-1] - offsets[0]) / (len(slices) - 1)
    else:
        step_mm = float(first.get("SliceThickness") or 1.0)

    affine = np.eye(4)
    affine[:3, 0] = normal * step_mm
    affine[:3, 1] = col_dir * ps0[0]
    affine[:3, 2] = row_dir * ps0[1]
    affine[:3, 3] = p0

    hu = np.empty((len(slices), rows, cols), dtype=np.float32)
    for k, s in enumerate(slices):
        _fill_slice(hu[k], s.path, rows, cols)

    volume = Volume(
        hu=hu,
        affine_lps=affine,
        frame_of_reference_uid=str(first.get("FrameOfReferenceUID", "")),
        study_instance_uid=str(first.get("StudyInstanceUID", "")),
        series_instance_uid=series_uid,
        sop_class_uid=str(first.SOPClassUID),
        sop_instance_uids=tuple(s.sop_instance_uid for s in slices),
    )
    logger.info(
        "load_volume end: series %s, shape %s, spacing %s mm in %.2f s",
        series_uid,
        volume.shape,
        tuple(round(v, 4) for v in volume.spacing_mm),
        time.monotonic() - started,
    )
    return volume


def _geometric_tilt_note(headers: Sequence[Dataset], paths: Sequence[Path], normal: np.ndarray) -> str:
    """', positions x degrees off the normal' from the two outermost slices, or ''."""
    try:
        pos = np.asarray([[float(v) for v in ds.ImagePositionPatient] for ds in headers])
    except (AttributeError, TypeError, ValueError):
        return ""
    along = pos @ normal
    a, b = pos[int(np.argmin(along))], pos[int(np.argmax(along))]
    d = b - a
    dn = float(d @ normal)
    if len(pos) < 2 or np.linalg.norm(d) == 0:
        return ""
    angle = math.degrees(math.atan2(float(np.linalg.norm(d - dn * normal)), abs(dn)))
    return f" (slice positions deviate {angle:.1f} degrees from the slice normal)"


def _fill_slice(out: np.ndarray, path: Path, rows: int, cols: int) -> None:
    """Decode one instance into ``out`` (rows x cols, float32) in HU."""
    ds = pydicom.dcmread(path)
    where = _name(ds, path)
    if "PixelData" not in ds:
        raise VolumeError(f"PixelData (7FE0,0010) is missing in {where}; required for every slice")
    ts = ds.file_meta.get("TransferSyntaxUID", "") if hasattr(ds, "file_meta") else ""
    try:
        stored: Any = ds.pixel_array
    except Exception as exc:  # the decoders raise many types; name the file and syntax
        name = UID(str(ts)).name if ts else "unknown"
        raise VolumeError(
            f"cannot decode the pixel data of {where} (TransferSyntaxUID {ts} {name}): {exc}; "
            "allowed: uncompressed, JPEG Lossless, JPEG-LS, JPEG 2000, RLE"
        ) from exc
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
