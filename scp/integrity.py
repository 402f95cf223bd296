"""Integrity checks of a received dataset, cheap enough for the C-STORE handler.

One pass over the encoded dataset's elements (values larger than the element limit and
the pixel data are skipped, never copied, never decoded) checks:

- every element other than Pixel Data (7FE0,0010), at any depth of sequences, is at most
  ``max_element_bytes`` long;
- the instance is at most ``max_instance_bytes`` (for Deflated Explicit VR Little Endian
  the inflated dataset too: a deflate bomb is stopped at the limit);
- no element declares more bytes than the dataset still holds (a stream cut short);
- for a native (uncompressed) transfer syntax, the length of Pixel Data is what the Image
  Pixel Module says it must be (PS3.3 C.7.6.3; PS3.5 8.1.1 and 8.2): Rows x Columns x
  SamplesPerPixel x BitsAllocated / 8 x NumberOfFrames, padded to an even length.

Each problem names the attribute, the value seen and what is allowed, and carries the
named DIMSE status (:mod:`scp.status`) the handler answers with. A stored copy is checked
the same way by :func:`check_file` (to decide whether a duplicate may replace it).
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import BinaryIO

from pydicom.dataset import Dataset
from pydicom.filereader import _read_file_meta_info, data_element_generator, read_preamble
from pydicom.sequence import Sequence
from pydicom.tag import Tag
from pydicom.uid import UID

from scp.status import (
    STATUS_CANNOT_UNDERSTAND,
    STATUS_ELEMENT_TOO_LARGE,
    STATUS_INSTANCE_TOO_LARGE,
    STATUS_PIXEL_DATA_LENGTH,
)

Buffer = bytes | bytearray | memoryview

PIXEL_DATA = Tag(0x7FE0, 0x0010)
_ROWS = Tag(0x0028, 0x0010)
_COLUMNS = Tag(0x0028, 0x0011)
_SAMPLES_PER_PIXEL = Tag(0x0028, 0x0002)
_BITS_ALLOCATED = Tag(0x0028, 0x0100)
_NUMBER_OF_FRAMES = Tag(0x0028, 0x0008)
_UNDEFINED_LENGTH = 0xFFFFFFFF


@dataclass(frozen=True)
class IntegrityLimits:
    """Largest element (other than Pixel Data) and largest instance accepted, in bytes; 0 = no limit."""

    max_element_bytes: int = 0
    max_instance_bytes: int = 0

    def __post_init__(self) -> None:
        for name in ("max_element_bytes", "max_instance_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"IntegrityLimits.{name} is {value!r}; allowed: an integer >= 0 (0 = no limit)")


@dataclass(frozen=True)
class IntegrityProblem:
    """Why a dataset is refused: the DIMSE status, a short Error Comment (VR LO, 64
    characters) and the whole reason (logged and recorded)."""

    status: int
    comment: str
    reason: str


class _TooLarge(Exception):
    def __init__(self, problem: IntegrityProblem) -> None:
        super().__init__(problem.reason)
        self.problem = problem


def check_dataset(data: Buffer, transfer_syntax_uid: str, limits: IntegrityLimits) -> IntegrityProblem | None:
    """Check an encoded dataset (no file meta) in ``transfer_syntax_uid``; None when it passes.

    Raises whatever pydicom raises when the dataset cannot be parsed (the caller answers
    Cannot Understand).
    """
    size = len(data)
    if limits.max_instance_bytes and size > limits.max_instance_bytes:
        return _instance_too_large(size, limits.max_instance_bytes)
    ts = UID(transfer_syntax_uid)
    raw: BinaryIO = BytesIO(data)
    if ts.is_deflated:
        inflated = _inflate(data, limits.max_instance_bytes)
        if isinstance(inflated, IntegrityProblem):
            return inflated
        raw = BytesIO(inflated)
    try:
        values = _scan(raw, ts.is_implicit_VR, ts.is_little_endian, limits.max_element_bytes)
    except _TooLarge as exc:
        return exc.problem
    if not ts.is_encapsulated:
        return _check_pixel_length(values, ts.is_little_endian)
    return None


def check_file(path: Path, limits: IntegrityLimits) -> IntegrityProblem | None:
    """:func:`check_dataset` on the dataset of a stored Part 10 file (its file meta skipped)."""
    ts, data = read_part10(path)
    return check_dataset(data, ts, limits)


def read_part10(path: Path) -> tuple[str, bytes]:
    """The transfer syntax and the encoded dataset (after the File Meta Information) of a Part 10 file."""
    with open(path, "rb") as fp:
        return split_part10(fp)


def split_part10(fp: BinaryIO) -> tuple[str, bytes]:
    """The transfer syntax and the encoded dataset of the Part 10 file read from ``fp`` (PS3.10 7.1)."""
    read_preamble(fp, force=False)
    meta = _read_file_meta_info(fp)  # leaves fp at the first element of the dataset
    return str(meta.TransferSyntaxUID), fp.read()


def dataset_sha256(data: Buffer) -> str:
    """SHA-256 of an encoded dataset, as hex."""
    return hashlib.sha256(data).hexdigest()


def file_dataset_sha256(path: Path) -> str:
    """SHA-256 of the dataset of a stored Part 10 file (the bytes the sender sent, without our file meta)."""
    return dataset_sha256(read_part10(path)[1])


def _instance_too_large(size: int, limit: int) -> IntegrityProblem:
    return IntegrityProblem(
        STATUS_INSTANCE_TOO_LARGE,
        f"instance of {size} bytes over max_instance_bytes {limit}",
        f"the instance is {size} bytes; allowed: at most max_instance_bytes = {limit}",
    )


def _inflate(data: Buffer, limit: int) -> bytes | IntegrityProblem:
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    if not limit:
        return inflater.decompress(data)
    inflated = inflater.decompress(data, limit + 1)
    if len(inflated) > limit:
        return IntegrityProblem(
            STATUS_INSTANCE_TOO_LARGE,
            f"inflated dataset over max_instance_bytes {limit}",
            f"the deflated dataset inflates to more than {limit} bytes; allowed: at most max_instance_bytes = {limit}",
        )
    return inflated


def _scan(fp: BinaryIO, implicit: bool, little: bool, max_element: int) -> dict[int, tuple[int, bytes | None]]:
    """(length, value) of the top-level elements; every element at any depth is checked against
    ``max_element`` (Pixel Data excepted). Values over ``max_element`` are skipped, not read.

    A defined-length sequence is checked as one element: what it nests is shorter than it.
    Undefined-length sequences (parsed by pydicom into items) are checked item by item."""
    values: dict[int, tuple[int, bytes | None]] = {}
    defer = max_element or None
    size = fp.seek(0, 2)
    fp.seek(0)
    for elem in data_element_generator(fp, implicit, little, defer_size=defer):
        tag = int(elem.tag)
        value = elem.value
        length = int(getattr(elem, "length", 0) or 0)
        value_tell = getattr(elem, "value_tell", None)
        if length != _UNDEFINED_LENGTH and value_tell is not None and value_tell + length > size:
            raise _TooLarge(_cut_short(tag, length, size - value_tell))
        if isinstance(value, Sequence):
            _check_items(value, max_element)
        elif tag != PIXEL_DATA and max_element and length != _UNDEFINED_LENGTH and length > max_element:
            raise _TooLarge(_element_too_large(tag, length, max_element))
        values[tag] = (length, value if isinstance(value, bytes) else None)
    return values


def _check_items(seq: Sequence, max_element: int) -> None:
    for item in seq:
        for elem in _raw_elements(item):
            value = elem.value
            length = int(getattr(elem, "length", 0) or 0)
            if isinstance(value, Sequence):
                _check_items(value, max_element)
            elif max_element and length != _UNDEFINED_LENGTH and length > max_element:
                raise _TooLarge(_element_too_large(int(elem.tag), length, max_element))


def _raw_elements(item: Dataset) -> Iterator[object]:
    """The elements of a sequence item as read (raw, not converted)."""
    for tag in list(item.keys()):
        yield item.get_item(tag)


def _cut_short(tag: int, length: int, remaining: int) -> IntegrityProblem:
    where = f"({tag >> 16:04X},{tag & 0xFFFF:04X})"
    status = STATUS_PIXEL_DATA_LENGTH if tag == PIXEL_DATA else STATUS_CANNOT_UNDERSTAND
    return IntegrityProblem(
        status,
        f"dataset ends inside element {where}",
        f"element {where} declares {length} bytes but the dataset ends {max(remaining, 0)} bytes into it; "
        "allowed: a dataset that holds every element it declares",
    )


def _element_too_large(tag: int, length: int, limit: int) -> IntegrityProblem:
    where = f"({tag >> 16:04X},{tag & 0xFFFF:04X})"
    return IntegrityProblem(
        STATUS_ELEMENT_TOO_LARGE,
        f"element {where} of {length} bytes over max_element_bytes",
        f"element {where} is {length} bytes long; allowed: at most max_element_bytes = {limit} "
        "(Pixel Data excepted)",
    )


def _us(value: bytes | None, little: bool, default: int | None) -> int | None:
    if value is None or len(value) < 2:
        return default
    return int.from_bytes(value[:2], "little" if little else "big")


def _is(value: bytes | None, default: int) -> int | None:
    if value is None:
        return default
    text = value.decode("ascii", "replace").strip(" \x00")
    if not text:
        return default
    try:
        return int(text)
    except ValueError:
        return None


def expected_pixel_bytes(rows: int, columns: int, samples: int, bits_allocated: int, frames: int) -> int:
    """Length of native Pixel Data (PS3.5 8.1.1): bits packed for BitsAllocated 1, padded to even."""
    total_bits = rows * columns * samples * bits_allocated * frames
    length = (total_bits + 7) // 8
    return length + (length % 2)


def _check_pixel_length(values: dict[int, tuple[int, bytes | None]], little: bool) -> IntegrityProblem | None:
    pixel = values.get(PIXEL_DATA)
    if pixel is None:
        return None
    length = pixel[0]
    if length == _UNDEFINED_LENGTH:
        return IntegrityProblem(
            STATUS_PIXEL_DATA_LENGTH,
            "encapsulated Pixel Data in a native transfer syntax",
            "Pixel Data (7FE0,0010) has undefined length (encapsulated) in a native transfer syntax; "
            "allowed: a defined length",
        )
    rows = _us(values.get(_ROWS, (0, None))[1], little, None)
    columns = _us(values.get(_COLUMNS, (0, None))[1], little, None)
    samples = _us(values.get(_SAMPLES_PER_PIXEL, (0, None))[1], little, 1)
    bits = _us(values.get(_BITS_ALLOCATED, (0, None))[1], little, None)
    frames = _is(values.get(_NUMBER_OF_FRAMES, (0, None))[1], 1)
    if None in (rows, columns, samples, bits, frames):
        return IntegrityProblem(
            STATUS_PIXEL_DATA_LENGTH,
            "Pixel Data without a readable Image Pixel Module",
            f"Pixel Data is present but Rows={rows}, Columns={columns}, SamplesPerPixel={samples}, "
            f"BitsAllocated={bits}, NumberOfFrames={frames}; allowed: all present and numeric",
        )
    assert rows is not None and columns is not None and samples is not None and bits is not None
    assert frames is not None
    expected = expected_pixel_bytes(rows, columns, samples, bits, frames)
    if length == expected:
        return None
    return IntegrityProblem(
        STATUS_PIXEL_DATA_LENGTH,
        f"Pixel Data is {length} bytes, expected {expected}",
        f"Pixel Data (7FE0,0010) is {length} bytes; Rows {rows} x Columns {columns} x SamplesPerPixel {samples} "
        f"x BitsAllocated {bits} / 8 x NumberOfFrames {frames} = {expected} bytes (padded to even) is allowed",
    )
