"""The spool: received instances written durably as ``<spool>/<study>/<series>/<sop>.dcm``.

A file is complete or absent: it is written to a temporary file in its final
directory, flushed and fsync'ed, renamed over the final name with ``os.replace``
(atomic within a file system), and the directory is fsync'ed so the rename itself
survives a power loss. Directories created on the way are fsync'ed into their parents.

File names come only from UIDs checked against the UI VR (PS3.5 6.2 and 9.1), so a
peer cannot make us write outside the spool.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path

from pydicom.dataset import FileMetaDataset
from pynetdicom.dsutils import encode_file_meta

from scp.validate import validate_uid

_TMP_SUFFIX = ".tmp"
_PREAMBLE_AND_PREFIX = b"\x00" * 128 + b"DICM"

Buffer = bytes | bytearray | memoryview


def file_head(file_meta: FileMetaDataset, source_ae_title: str) -> bytes:
    """What precedes a received dataset in its Part 10 file (PS3.10 7.1): the preamble, the
    ``DICM`` prefix and ``file_meta`` with SourceApplicationEntityTitle set to the sender's
    AE title (``file_meta`` is changed in place)."""
    file_meta.SourceApplicationEntityTitle = source_ae_title
    return _PREAMBLE_AND_PREFIX + encode_file_meta(file_meta)


def instance_path(spool_dir: Path, study_uid: str, series_uid: str, sop_uid: str) -> Path:
    """Where an instance is stored (UIDs validated)."""
    return (
        study_dir(spool_dir, study_uid)
        / validate_uid(series_uid, "SeriesInstanceUID")
        / f"{validate_uid(sop_uid, 'SOPInstanceUID')}.dcm"
    )


def write_instance(
    spool_dir: Path,
    study_uid: str,
    series_uid: str,
    sop_uid: str,
    data: Buffer | Sequence[Buffer],
) -> Path:
    """Write ``data`` durably to ``<spool_dir>/<study>/<series>/<sop>.dcm`` and return the path.

    ``data`` is the whole file (preamble, file meta, dataset) or a sequence of buffers
    that form it, written in order without joining them. An existing file of the same
    name is replaced atomically. Raises :class:`InvalidUIDError` before touching the
    disk when a UID is not valid, ``OSError`` when the write fails (no temporary file
    is left behind).
    """
    final = instance_path(spool_dir, study_uid, series_uid, sop_uid)
    series_dir = final.parent
    _ensure_dir(series_dir, stop_at=Path(spool_dir))
    tmp = series_dir / f".{sop_uid}.{uuid.uuid4().hex}{_TMP_SUFFIX}"
    buffers = [data] if isinstance(data, (bytes, bytearray, memoryview)) else list(data)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644)
    try:
        try:
            _write_all(fd, buffers)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, final)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(series_dir)
    return final


def study_dir(spool_dir: Path, study_uid: str) -> Path:
    """The directory that holds a study's series (UID validated)."""
    return Path(spool_dir) / validate_uid(study_uid, "StudyInstanceUID")


def remove_study(spool_dir: Path, study_uid: str) -> None:
    """Delete a study's files from the spool (retention purge); nothing happens when it has none.

    Raises :class:`~scp.errors.InvalidUIDError`, before touching the disk, when
    ``study_uid`` is not a valid UID (so no path outside the spool is ever removed).
    Files that cannot be removed are left (as ``rm -rf`` would, without raising).
    """
    shutil.rmtree(study_dir(spool_dir, study_uid), ignore_errors=True)


def remove_temporaries(spool_dir: Path) -> int:
    """Delete temporary files a crash left in the spool; return how many.

    Call only while nothing writes to the spool (at start-up): every ``.<sop>.<hex>.tmp``
    file then belongs to a write that never reached its rename, so was never answered
    Success nor recorded.
    """
    removed = 0
    for dirpath, _dirnames, filenames in os.walk(spool_dir):
        for name in filenames:
            if name.startswith(".") and name.endswith(_TMP_SUFFIX):
                try:
                    os.unlink(os.path.join(dirpath, name))
                    removed += 1
                except FileNotFoundError:
                    pass
    return removed


def _write_all(fd: int, buffers: list[Buffer]) -> None:
    """os.writev until every byte is written (a write may be short)."""
    views = [memoryview(b).cast("B") for b in buffers if len(b)]
    while views:
        written = os.writev(fd, views)
        while views and written >= len(views[0]):
            written -= len(views[0])
            views.pop(0)
        if views and written:
            views[0] = views[0][written:]


def _ensure_dir(path: Path, stop_at: Path) -> None:
    """Create ``path`` (and missing parents up to ``stop_at``), making each new entry durable."""
    if path.is_dir():
        return
    if path != stop_at and path.parent != path:
        _ensure_dir(path.parent, stop_at)
    try:
        path.mkdir()
    except FileExistsError:
        pass  # another association created it a moment ago: its entry may not be durable yet
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
