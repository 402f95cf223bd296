"""scp.spool: the durable write (UID checks: tests/scp/test_validate.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from scp.errors import InvalidUIDError
from scp.spool import instance_path, remove_study, remove_temporaries, write_instance

STUDY = "1.2.826.0.1.3680043.8.498.1"
SERIES = "1.2.826.0.1.3680043.8.498.1.2"
SOP = "1.2.826.0.1.3680043.8.498.1.2.3"


def test_write_creates_file_with_identical_content_and_no_temporaries(tmp_path: Path) -> None:
    data = os.urandom(300_000)
    path = write_instance(tmp_path, STUDY, SERIES, SOP, data)
    assert path == tmp_path / STUDY / SERIES / f"{SOP}.dcm"
    assert path == instance_path(tmp_path, STUDY, SERIES, SOP)
    assert path.read_bytes() == data
    assert sorted(p.name for p in path.parent.iterdir()) == [f"{SOP}.dcm"]


def test_write_joins_a_sequence_of_buffers_in_order(tmp_path: Path) -> None:
    head = b"\x00" * 128 + b"DICM"
    body = bytearray(os.urandom(70_000))
    path = write_instance(tmp_path, STUDY, SERIES, SOP, (head, memoryview(body), b""))
    assert path.read_bytes() == head + bytes(body)


def test_write_replaces_an_existing_file_atomically(tmp_path: Path) -> None:
    write_instance(tmp_path, STUDY, SERIES, SOP, b"first")
    path = write_instance(tmp_path, STUDY, SERIES, SOP, b"second")
    assert path.read_bytes() == b"second"
    assert len(list(path.parent.iterdir())) == 1


@pytest.mark.parametrize(
    ("study", "series", "sop"),
    [("..", SERIES, SOP), (STUDY, "1.2/../../x", SOP), (STUDY, SERIES, "1.02"), (STUDY, SERIES, "")],
)
def test_invalid_uid_writes_nothing(tmp_path: Path, study: str, series: str, sop: str) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    with pytest.raises(InvalidUIDError):
        write_instance(spool, study, series, sop, b"data")
    assert list(spool.rglob("*")) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spool"]


def test_failed_write_leaves_no_temporary(tmp_path: Path) -> None:
    class Exploding:
        def __len__(self) -> int:
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        write_instance(tmp_path, STUDY, SERIES, SOP, [b"ok", Exploding()])  # type: ignore[list-item]
    series_dir = tmp_path / STUDY / SERIES
    assert series_dir.is_dir()
    assert list(series_dir.iterdir()) == []


def test_remove_temporaries_deletes_only_leftover_temporaries(tmp_path: Path) -> None:
    kept = write_instance(tmp_path, STUDY, SERIES, SOP, b"kept")
    leftover = kept.parent / f".{SOP}.0123abcd.tmp"
    leftover.write_bytes(b"half")
    other = kept.parent / "notes.tmp"  # not ours: no leading dot
    other.write_bytes(b"x")
    assert remove_temporaries(tmp_path) == 1
    assert not leftover.exists()
    assert kept.read_bytes() == b"kept" and other.exists()


def test_remove_study_deletes_only_that_study(tmp_path: Path) -> None:
    kept = write_instance(tmp_path, "1.2.9", "1.2.9.1", "1.2.9.1.1", b"other")
    write_instance(tmp_path, STUDY, SERIES, SOP, b"data")
    write_instance(tmp_path, STUDY, SERIES + ".7", SOP + ".7", b"data")
    remove_study(tmp_path, STUDY)
    assert not (tmp_path / STUDY).exists()
    assert kept.read_bytes() == b"other"
    remove_study(tmp_path, STUDY)  # nothing left: no error


def test_remove_study_refuses_an_invalid_uid_before_touching_the_disk(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    outside = tmp_path / "keep.txt"
    outside.write_text("x")
    with pytest.raises(InvalidUIDError, match="StudyInstanceUID"):
        remove_study(spool, "..")
    assert outside.read_text() == "x" and spool.is_dir()
