"""The frames and Per-Frame Functional Groups of a BINARY Segmentation, built in bulk (PS3.3 A.51, C.8.20).

highdicom's :class:`highdicom.seg.Segmentation` makes one pydicom Dataset per frame and compares each
segment with each slice over the whole 512 x 512 plane; pydicom then writes those items element by
element. For a hip/thigh study (58 segments, 300 slices, ~10,000 frames) that is 7.4 s of a 3 s budget
(issue 24). Here highdicom builds the same Segmentation with **one** segment and one marker pixel per
source slice (the *skeleton*: every attribute outside the frames, and highdicom's own
DerivationImageSequence / PlanePositionSequence of each source slice, PS3.3 C.7.6.16.2.6 / C.7.6.16.2.3),
and this module adds what depends on the pixels:

* the frames, 1 bit per pixel (PS3.5 8.1.1: first pixel in the least significant bit, frames packed
  back to back), each segment compared with the label array only inside its bounding box
  (``scipy.ndimage.find_objects``) and packed with ``numpy.packbits``;
* the PerFrameFunctionalGroupsSequence (PS3.3 C.7.6.16), assembled as Explicit VR Little Endian bytes
  from per-slice parts (DerivationImageSequence, PlanePositionSequence, encoded once per slice by
  pydicom) and per-segment parts (SegmentIdentificationSequence), in highdicom's order: segment by
  segment, within a segment the slices along the normal, frames with no pixel of their segment omitted;
  DimensionIndexValues = [ReferencedSegmentNumber, the slice's rank among the slices that hold any
  segment] (PS3.3 C.7.6.17);
* the SegmentSequence with every segment, NumberOfFrames and PixelData.

The result equals, attribute by attribute and frame by frame, what highdicom builds from the whole label
array (``tests/dicomout/test_seg_frames.py``; only the generated DimensionOrganizationUID and the
content time differ). The PerFrameFunctionalGroupsSequence is held encoded (a raw element that pydicom
writes as it is and parses when it is read): the dataset must be written Explicit VR Little Endian or
Deflated (any other syntax parses it and writes it element by element, correct but slow).
"""

from __future__ import annotations

import io
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pydicom.charset import convert_encodings
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import correct_ambiguous_vr, write_data_element
from pydicom.tag import Tag
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian
from scipy import ndimage

BULK_TRANSFER_SYNTAXES: tuple[UID, ...] = (DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian)
"""File transfer syntaxes whose frames are native: the bulk builder applies (JPEG 2000 frames are left to
highdicom)."""

_PER_FRAME_TAG = Tag(0x5200, 0x9230)  # PerFrameFunctionalGroupsSequence
_PIXEL_DATA_TAG = Tag(0x7FE0, 0x0010)
_ITEM = struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)  # item of undefined length
_ITEM_END = struct.pack("<HHI", 0xFFFE, 0xE00D, 0)  # Item Delimitation Item
# FrameContentSequence (0020,9111) with one item of 24 bytes holding DimensionIndexValues (0020,9157) UL x2.
_FRAME_CONTENT = struct.Struct("<HH2sHIHHIHH2sHII")


class BulkFrameError(ValueError):
    """The skeleton highdicom built is not what the bulk builder expects (dicomout.seg reports it)."""


class FramesBuffer(io.BufferedIOBase):
    """A read-only, seekable view of the packed frames: a buffered Pixel Data value (pydicom writes it in
    chunks), so the frames are not copied into a bytes object as well."""

    def __init__(self, frames: np.ndarray) -> None:
        super().__init__()
        self._view = memoryview(np.ascontiguousarray(frames)).cast("B")
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        end = len(self._view) if size is None or size < 0 else min(len(self._view), self._pos + size)
        chunk = bytes(self._view[self._pos : end])
        self._pos = max(self._pos, end)
        return chunk

    def read1(self, size: int = -1) -> bytes:
        return self.read(size)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._view)}[whence]
        if base + offset < 0:
            raise ValueError(f"seek to {base + offset}: before the start of the frames")
        self._pos = base + offset
        return self._pos

    def tell(self) -> int:
        return self._pos

    def getbuffer(self) -> memoryview:
        """The frames' bytes, without a copy (read-only)."""
        return self._view.toreadonly()


def bulk_applies(
    segmentation_type: str, transfer_syntax_uid: UID, omit_empty_frames: bool, n_segments: int, rows: int, cols: int
) -> bool:
    """Whether :func:`fill_binary_frames` can build this SEG: BINARY, native frames, empty frames omitted,
    at least two segments (one segment goes in the shared functional groups) and whole bytes per frame."""
    return (
        segmentation_type == "BINARY"
        and transfer_syntax_uid in BULK_TRANSFER_SYNTAXES
        and omit_empty_frames
        and n_segments >= 2
        and (rows * cols) % 8 == 0
    )


def skeleton_array(array: np.ndarray) -> np.ndarray:
    """The pixel array of the skeleton: segment 1 at pixel (0, 0) of every slice, nothing else.

    Every slice then has a frame (highdicom omits empty ones), so the skeleton holds highdicom's
    per-frame items of every source slice, in its order along the normal.
    """
    marker = np.zeros(array.shape, dtype=np.uint8)
    marker[:, 0, 0] = 1
    return marker


@dataclass(frozen=True)
class SegmentFrames:
    """Where one segment has pixels: the slices (volume index k) in frame order, and its first frame's index."""

    number: int
    slices: np.ndarray
    first_frame: int


def pack_frames(array: np.ndarray, numbers: Sequence[int], rank: np.ndarray) -> tuple[list[SegmentFrames], np.ndarray]:
    """Each segment's non-empty frames, 1 bit per pixel, segment after segment, each segment's slices in the
    order of ``rank`` (the slice's place along the normal), and the Pixel Data holding them (uint8, one row
    per frame).

    ``array[k, r, c]`` is the segment number of the voxel (0 = background); it is compared with each segment
    only inside that segment's bounding box, and only the box is packed where whole bytes of a row hold
    whole columns (columns a multiple of 8).
    """
    n_slices, rows, cols = array.shape
    frame_bytes = rows * cols // 8
    boxes = ndimage.find_objects(array, max_label=max(numbers))
    aligned = cols % 8 == 0
    segments: list[SegmentFrames] = []
    crops: list[tuple[slice, int, int, np.ndarray]] = []
    n_frames = 0
    for number in numbers:
        box = boxes[number - 1]
        if box is None:
            continue
        ks, rs, cs = box
        if aligned:  # widened to whole bytes
            c0, c1 = cs.start // 8 * 8, min(cols, -(-cs.stop // 8) * 8)
        else:
            c0, c1 = cs.start, cs.stop
        inside = array[ks, rs, c0:c1] == number
        present = np.flatnonzero(inside.any(axis=(1, 2)))
        order = np.argsort(rank[ks.start + present], kind="stable")
        inside = inside[present[order]]
        crops.append((rs, c0, c1, np.packbits(inside, axis=-1, bitorder="little") if aligned else inside))
        segments.append(SegmentFrames(number, ks.start + present[order], n_frames))
        n_frames += len(present)
    frames = np.zeros((n_frames, frame_bytes), dtype=np.uint8)
    for seg, (rs, c0, c1, crop) in zip(segments, crops, strict=True):
        block = frames[seg.first_frame : seg.first_frame + len(seg.slices)]
        if aligned:
            block.reshape(len(seg.slices), rows, cols // 8)[:, rs, c0 // 8 : c1 // 8] = crop
        else:
            full = np.zeros((len(seg.slices), rows, cols), dtype=bool)
            full[:, rs, c0:c1] = crop
            block[:] = np.packbits(full.reshape(len(seg.slices), -1), axis=-1, bitorder="little")
    del crops
    return segments, frames


def _encode(element: DataElement) -> bytes:
    """One data element in Explicit VR Little Endian (PS3.5 7.1.2)."""
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_data_element(fp, element)
    return fp.getvalue()


def _frame_content(segment_number: int, position: int) -> bytes:
    """FrameContentSequence with DimensionIndexValues [segment number, position], defined lengths."""
    return _FRAME_CONTENT.pack(
        0x0020, 0x9111, b"SQ", 0, 24,  # tag, VR, reserved, sequence length
        0xFFFE, 0xE000, 16,  # item of 16 bytes
        0x0020, 0x9157, b"UL", 8, segment_number, position,  # DimensionIndexValues
    )


def fill_binary_frames(
    skeleton: Dataset,
    array: np.ndarray,
    segment_descriptions: Sequence[Dataset],
    sop_instance_uids: Sequence[str],
) -> Dataset:
    """Complete the skeleton (built by highdicom from :func:`skeleton_array` and the first segment
    description) into the BINARY Segmentation of ``array``: all segments, their frames and per-frame
    functional groups, as a new plain Dataset (the skeleton's elements are shared, not copied).

    ``sop_instance_uids[k]`` is the source instance of ``array[k]``.

    Raises:
        BulkFrameError: the skeleton does not have one frame per source slice referencing it.
    """
    per_frame = skeleton.PerFrameFunctionalGroupsSequence
    if len(per_frame) != len(sop_instance_uids):
        raise BulkFrameError(
            f"skeleton has {len(per_frame)} frames; expected one per source slice ({len(sop_instance_uids)})"
        )
    k_of_uid = {uid: k for k, uid in enumerate(sop_instance_uids)}
    rank = np.empty(len(sop_instance_uids), dtype=np.int64)
    slice_parts: list[tuple[bytes, bytes] | None] = [None] * len(sop_instance_uids)
    for j, item in enumerate(per_frame):
        uid = str(item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        k = k_of_uid.get(uid)
        if k is None or slice_parts[k] is not None:
            raise BulkFrameError(f"skeleton frame {j + 1} references {uid}, not one distinct source slice")
        rank[k] = j
        slice_parts[k] = (
            _encode(item["DerivationImageSequence"]),
            _encode(item["PlanePositionSequence"]),
        )

    segments, frames = pack_frames(array, [int(d.SegmentNumber) for d in segment_descriptions], rank)
    # DimensionIndexValues' position: rank among the slices that hold any segment (highdicom drops the others).
    used = np.zeros(len(rank), dtype=bool)
    for seg in segments:
        used[seg.slices] = True
    position = np.zeros(len(rank), dtype=np.int64)
    used_by_rank = np.flatnonzero(used)[np.argsort(rank[used], kind="stable")]
    position[used_by_rank] = np.arange(1, len(used_by_rank) + 1)

    items: list[bytes] = []
    for seg in segments:
        identification = Dataset()
        identification.add(DataElement(0x0062000B, "US", seg.number))  # ReferencedSegmentNumber
        segment_part = _encode(DataElement(0x0062000A, "SQ", [identification]))  # SegmentIdentificationSequence
        for k in seg.slices.tolist():
            derivation, plane = slice_parts[k]  # type: ignore[misc]  # every slice has its part
            items += (_ITEM, derivation, _frame_content(seg.number, int(position[k])), plane, segment_part, _ITEM_END)

    result = Dataset()
    for element in skeleton:  # a plain Dataset: highdicom's frame look-up tables would describe the skeleton
        if element.tag not in (_PER_FRAME_TAG, _PIXEL_DATA_TAG):
            result.add(element)
    result.file_meta = skeleton.file_meta
    result.preamble = getattr(skeleton, "preamble", None)
    shared = result.SharedFunctionalGroupsSequence[0]
    if "SegmentIdentificationSequence" in shared:  # one segment: highdicom shares it; here each frame has its own
        del shared.SegmentIdentificationSequence
    if "DimensionOrganizationType" in result:  # several segments: highdicom sets none
        del result.DimensionOrganizationType
    result.SegmentSequence = list(segment_descriptions)
    result.NumberOfFrames = sum(len(seg.slices) for seg in segments)
    correct_ambiguous_vr(result, True)  # while every sequence is still a Dataset
    if frames.size % 2:  # padded to an even length (PS3.5 7.1.1): a copy, only for small odd frames
        pixel_value: bytes | FramesBuffer = frames.tobytes() + b"\0"
    else:  # the frames as they are, no copy: pydicom reads them from the buffer when writing
        pixel_value = FramesBuffer(frames)
    result.add(DataElement(_PIXEL_DATA_TAG, "OB", pixel_value))
    del frames
    result[_PER_FRAME_TAG] = RawDataElement(_PER_FRAME_TAG, "SQ", 0xFFFFFFFF, b"".join(items), 0, False, True)
    # Encoded as Explicit VR Little Endian already: the writer keeps the raw element as it is.
    result.set_original_encoding(False, True, convert_encodings(result.get("SpecificCharacterSet", "ISO_IR 6")))
    return result
