"""Writing an output dataset as a DICOM Part 10 file (PS3.10 7.1) without copies of its Pixel Data.

pydicom's ``save_as`` encodes each element into a buffer of its own and, for Deflated Explicit VR Little
Endian (PS3.5 A.5), the whole dataset into memory before compressing it: a BINARY SEG of 330 MB of
frames passes through two or three such copies (issue 24: end-to-end memory). :func:`write_part10`
writes the file meta information and every element other than native Pixel Data with pydicom, then the
Pixel Data (bytes, or a buffer with ``getbuffer()`` such as :class:`io.BytesIO` or
:class:`dicomout.seg_frames.FramesBuffer`) in slices of :data:`CHUNK_BYTES` straight to the file, through one zlib stream where the
transfer syntax is Deflated. Encapsulated (compressed-frame) Pixel Data is left to pydicom.
"""

from __future__ import annotations

import io
import zlib
from pathlib import Path
from struct import error as struct_error
from typing import BinaryIO

from pydicom.dataset import Dataset
from pydicom.filebase import DicomFileLike
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.tag import Tag
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

CHUNK_BYTES = 16 * 1024 * 1024
"""Pixel Data is written (and deflated) this many bytes at a time."""

DEFLATE_LEVEL = 6
"""zlib level of a Deflated file: pydicom's (zlib's default), so the file is the one ``save_as`` writes."""

_PIXEL_DATA = Tag(0x7FE0, 0x0010)
_STREAMED = (ExplicitVRLittleEndian, DeflatedExplicitVRLittleEndian)


class _Deflater:
    """A write-only file object that deflates (raw DEFLATE, no zlib header: PS3.5 A.5) into ``out``."""

    def __init__(self, out: BinaryIO, level: int) -> None:
        self._out = out
        self._zlib = zlib.compressobj(level, zlib.DEFLATED, -zlib.MAX_WBITS)
        self.written = 0
        self.consumed = 0

    def write(self, data: bytes | memoryview) -> int:
        self.consumed += len(data)
        chunk = self._zlib.compress(data)
        self._out.write(chunk)
        self.written += len(chunk)
        return len(data)

    def finish(self) -> None:
        tail = self._zlib.flush()
        self._out.write(tail)
        self.written += len(tail)
        if self.written % 2:  # an even number of bytes, as pydicom pads it
            self._out.write(b"\0")

    def tell(self) -> int:
        """Bytes given so far (before deflating): pydicom's writers use differences of positions."""
        return self.consumed

    def seek(self, offset: int, whence: int = 0) -> int:
        raise io.UnsupportedOperation("a deflated stream is written forward only")

    def flush(self) -> None:
        self._out.flush()


def write_part10(ds: Dataset, path: Path) -> None:
    """Write ``ds`` (with ``file_meta``) to ``path`` as a Part 10 file, in ``file_meta.TransferSyntaxUID``.

    Explicit VR Little Endian and Deflated Explicit VR Little Endian with native Pixel Data are streamed as
    described above; anything else is written by ``save_as(enforce_file_format=True)``.
    """
    ts = ds.file_meta.TransferSyntaxUID
    pixel_elem = ds.get_item(_PIXEL_DATA) if _PIXEL_DATA in ds else None
    native = pixel_elem is None or (
        not pixel_elem.is_raw
        and (isinstance(pixel_elem.value, bytes) or callable(getattr(pixel_elem.value, "getbuffer", None)))
        and not ts.is_encapsulated
    )
    after_pixels = any(tag > _PIXEL_DATA for tag in ds.keys())  # e.g. DataSetTrailingPadding: pydicom orders it
    if ts not in _STREAMED or not native or after_pixels:
        ds.save_as(path, enforce_file_format=True)
        return
    meta = ds.file_meta
    if "MediaStorageSOPClassUID" not in meta and "SOPClassUID" in ds:  # as save_as(enforce_file_format=True)
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
    if "MediaStorageSOPInstanceUID" not in meta and "SOPInstanceUID" in ds:
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    head = Dataset()
    for tag in ds.keys():
        if tag != _PIXEL_DATA:
            head[tag] = ds.get_item(tag)  # raw elements stay raw
    if ds.original_encoding == (False, True):
        head.set_original_encoding(False, True, ds.original_character_set)
    with open(path, "wb") as f:
        f.write(getattr(ds, "preamble", None) or b"\0" * 128)
        f.write(b"DICM")
        write_file_meta_info(DicomFileLike(f), meta, enforce_standard=True)
        sink: BinaryIO | _Deflater = _Deflater(f, DEFLATE_LEVEL) if ts == DeflatedExplicitVRLittleEndian else f
        fp = DicomFileLike(sink)
        fp.is_little_endian, fp.is_implicit_VR = True, False
        write_dataset(fp, head)
        if pixel_elem is not None:
            value = memoryview(pixel_elem.value) if isinstance(pixel_elem.value, bytes) else pixel_elem.value.getbuffer()
            vr = pixel_elem.VR if pixel_elem.VR in ("OB", "OW") else ("OW" if int(ds.get("BitsAllocated", 8)) > 8 else "OB")
            padded = len(value) + len(value) % 2
            fp.write_tag(_PIXEL_DATA)
            fp.write(vr.encode() + b"\0\0")
            fp.write_UL(padded)
            for start in range(0, len(value), CHUNK_BYTES):
                sink.write(value[start : start + CHUNK_BYTES])
            if padded != len(value):
                sink.write(b"\0")
        if isinstance(sink, _Deflater):
            sink.finish()


INFLATE_STEP = 1024 * 1024
"""A Deflated file's stream is inflated this many bytes at a time by :func:`read_leading`."""


def read_leading(path: Path, last_tag: int) -> Dataset:
    """The top-level elements of a Part 10 file up to ``last_tag`` (inclusive; never its Pixel Data), with
    ``file_meta``; for a Deflated file only as much of the stream is inflated as they need.

    pydicom's ``dcmread`` inflates a Deflated dataset whole, even with ``stop_before_pixels``: 730 MB in
    memory to read the SOP Instance UID of the BINARY SEG of a 1000-slice CT (issue 24: the outbox's header
    read and the audit's patient read, while the next output is built). Raises like ``dcmread`` for a file
    that is not Part 10.
    """
    from pydicom import dcmread
    from pydicom.filereader import read_dataset
    from pynetdicom.dsutils import split_dataset

    meta, offset = split_dataset(path)
    ts = meta.get("TransferSyntaxUID")
    if ts is None or not ts.is_deflated:
        return dcmread(path, stop_before_pixels=True)

    def stop(tag: int, vr: str | None, length: int) -> bool:
        return tag > last_tag or tag == _PIXEL_DATA

    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    inflated = bytearray()
    with open(path, "rb") as f:
        f.seek(offset)
        pending, eof = b"", False
        while True:
            if not pending and not eof:
                pending = f.read(INFLATE_STEP)
                eof = not pending
            inflated += inflater.decompress(pending, INFLATE_STEP) if pending else inflater.flush()
            pending = inflater.unconsumed_tail
            done = eof and not pending
            if done and not inflater.eof:
                raise ValueError(f"{Path(path).name}: the Deflated dataset ends before its stream does (a cut file)")
            buffer = io.BytesIO(bytes(inflated))
            try:
                ds = read_dataset(buffer, False, True, stop_when=stop)
            except (EOFError, OSError, ValueError, struct_error):
                if done:
                    raise
                continue
            if buffer.tell() < len(inflated) or done:  # stopped at a later tag, or the whole dataset read
                ds.file_meta = meta
                return ds
