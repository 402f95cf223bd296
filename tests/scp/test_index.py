"""scp.index: durable, thread-safe record of received instances."""

from __future__ import annotations

import itertools
import sqlite3
import threading
from dataclasses import replace
from pathlib import Path

import pydicom
import pytest

from scp.errors import IngressError, UnknownStudyError
from scp.index import InstanceIndex
from scp.types import ReceivedInstance

STUDY = "1.2.3.4"


def _inst(
    sop: str,
    series: str = "1.2.3.4.1",
    modality: str = "CT",
    at: float = 1000.0,
    study: str = STUDY,
    calling_ae: str = "CT_SCANNER",
) -> ReceivedInstance:
    return ReceivedInstance(
        sop_instance_uid=sop,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2" if modality == "CT" else "1.2.840.10008.5.1.4.1.1.7",
        study_instance_uid=study,
        series_instance_uid=series,
        modality=modality,
        transfer_syntax_uid="1.2.840.10008.1.2",
        path=Path(f"/spool/{study}/{series}/{sop}.dcm"),
        size_bytes=1234,
        calling_ae=calling_ae,
        peer_address="127.0.0.1",
        received_at=at,
    )


@pytest.fixture
def index(database: Path | str):
    idx = InstanceIndex(database)
    yield idx
    idx.close()


def test_record_new_then_duplicate(index: InstanceIndex) -> None:
    assert not index.has("1.2.3.4.1.1")
    assert index.record(_inst("1.2.3.4.1.1")) is True
    assert index.has("1.2.3.4.1.1")
    assert index.record(_inst("1.2.3.4.1.1", at=2000.0)) is False
    [activity] = index.activity()
    assert activity.instance_count == 1
    assert activity.last_received_at == 1000.0
    assert index.instances(STUDY) == [_inst("1.2.3.4.1.1")]


def test_activity_tracks_first_last_and_counts(index: InstanceIndex) -> None:
    index.record(_inst("1.2.3.4.1.1", at=1000.0))
    index.record(_inst("1.2.3.4.1.2", at=1005.0))
    index.record(_inst("1.2.3.4.9.1", series="1.2.3.4.9", modality="SR", at=1010.0))
    index.record(_inst("5.6.1.1", study="5.6", series="5.6.1", at=900.0))
    activity = {a.study_instance_uid: a for a in index.activity()}
    assert [a.study_instance_uid for a in index.activity()] == ["5.6", STUDY]  # least recent first
    study = activity[STUDY]
    assert (study.first_received_at, study.last_received_at) == (1000.0, 1010.0)
    assert (study.instance_count, study.non_ct_count) == (3, 1)
    assert activity["5.6"].instance_count == 1


def test_last_received_at_moves_forward_on_every_new_instance_even_if_clock_steps_back(index: InstanceIndex) -> None:
    index.record(_inst("1.2.3.4.1.1", at=1000.0))
    seen = [index.activity()[0].last_received_at]
    for n, at in enumerate([999.0, 1000.0, 500.0], start=2):
        index.record(_inst(f"1.2.3.4.1.{n}", at=at))
        seen.append(index.activity()[0].last_received_at)
    assert all(b > a for a, b in itertools.pairwise(seen)), seen
    index.record(_inst("1.2.3.4.1.2", at=5000.0))  # duplicate: nothing moves
    assert index.activity()[0].last_received_at == seen[-1]


def test_get_study_groups_ct_by_series_and_counts_the_rest(index: InstanceIndex) -> None:
    index.record(_inst("1.2.3.4.1.1", series="1.2.3.4.1", at=1.0))
    index.record(_inst("1.2.3.4.2.1", series="1.2.3.4.2", at=2.0, calling_ae="PACS"))
    index.record(_inst("1.2.3.4.1.2", series="1.2.3.4.1", at=3.0))
    index.record(_inst("1.2.3.4.7.1", series="1.2.3.4.7", modality="OT", at=4.0))
    index.record(_inst("1.2.3.4.8.1", series="1.2.3.4.8", modality="SR", at=5.0))
    index.record(_inst("1.2.3.4.8.2", series="1.2.3.4.8", modality="SR", at=6.0))
    study = index.get_study(STUDY)
    assert study.study_instance_uid == STUDY
    assert dict(study.series) == {
        "1.2.3.4.1": (
            Path(f"/spool/{STUDY}/1.2.3.4.1/1.2.3.4.1.1.dcm"),
            Path(f"/spool/{STUDY}/1.2.3.4.1/1.2.3.4.1.2.dcm"),
        ),
        "1.2.3.4.2": (Path(f"/spool/{STUDY}/1.2.3.4.2/1.2.3.4.2.1.dcm"),),
    }
    assert dict(study.excluded_counts) == {"OT": 1, "SR": 2}
    assert study.instance_count == 6
    assert study.calling_aes == ("CT_SCANNER", "PACS")
    assert study.last_received_at == 6.0
    with pytest.raises(TypeError):
        study.series["x"] = ()  # type: ignore[index]


def test_get_study_of_unknown_study_names_it(index: InstanceIndex) -> None:
    with pytest.raises(UnknownStudyError) as info:
        index.get_study("9.9.9")
    assert info.value.study_uid == "9.9.9"
    assert "9.9.9" in str(info.value)
    assert index.instances("9.9.9") == []


def test_reopening_the_file_keeps_everything(database: Path | str) -> None:
    db = database
    first = InstanceIndex(db)
    first.record(_inst("1.2.3.4.1.1", at=10.0))
    first.record(_inst("1.2.3.4.1.2", at=11.0))
    first.close()
    again = InstanceIndex(db)
    try:
        assert again.has("1.2.3.4.1.1")
        assert again.record(_inst("1.2.3.4.1.1")) is False
        assert again.record(_inst("1.2.3.4.1.3", at=12.0)) is True
        assert again.activity()[0].instance_count == 3
        assert len(again.get_study(STUDY).series["1.2.3.4.1"]) == 3
    finally:
        again.close()


def test_wal_mode_and_other_tables_are_left_alone(tmp_path: Path) -> None:
    db = tmp_path / "node.sqlite"
    other = sqlite3.connect(db)
    other.execute("CREATE TABLE jobs (id INTEGER PRIMARY KEY, study TEXT)")
    other.execute("INSERT INTO jobs (study) VALUES ('x')")
    other.commit()
    other.close()
    index = InstanceIndex(db)
    index.record(_inst("1.2.3.4.1.1"))
    index.close()
    check = sqlite3.connect(db)
    try:
        assert check.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        tables = {r[0] for r in check.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert tables == {"jobs", "instances", "studies", "instance_conflicts", "sqlite_sequence"}
        assert check.execute("SELECT study FROM jobs").fetchall() == [("x",)]
    finally:
        check.close()


def test_concurrent_records_from_many_threads(index: InstanceIndex) -> None:
    errors: list[BaseException] = []

    def worker(t: int) -> None:
        try:
            for i in range(25):
                index.record(_inst(f"1.2.3.4.{t}.{i + 1}", series=f"1.2.3.4.{t}", at=float(i)))
                index.record(_inst(f"1.2.3.4.0.{i + 1}", series="1.2.3.4.0", at=float(i)))  # shared: duplicates
                index.has(f"1.2.3.4.{t}.{i + 1}")
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(1, 9)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []
    assert index.activity()[0].instance_count == 8 * 25 + 25
    assert len(index.instances(STUDY)) == 8 * 25 + 25


def test_closed_index_says_so(database: Path | str) -> None:
    index = InstanceIndex(database)
    index.close()
    index.close()  # idempotent
    with pytest.raises(IngressError, match="closed"):
        index.has("1.2")


def test_instances_round_trip_every_field(index: InstanceIndex) -> None:
    inst = replace(
        _inst("1.2.3.4.1.1"), transfer_syntax_uid="1.2.840.10008.1.2.4.80", size_bytes=99, peer_address="::1"
    )
    index.record(inst)
    assert index.instances(STUDY) == [inst]


def test_reconcile_restores_spooled_files_whose_index_entry_was_lost(tmp_path: Path, database: Path | str) -> None:
    """A power loss may drop the last index commits (synchronous=NORMAL); the files were fsync'ed
    before Success, so reconcile() must bring every one of them back into the index."""
    from scp.spool import write_instance
    from tests.support.synthetic_ct import write_ct_series

    files = write_ct_series(tmp_path / "in", n_slices=5, rows=16, cols=16, study_uid="1.2.3.4", seed=1)
    spool = tmp_path / "spool"
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        write_instance(spool, "1.2.3.4", ds.SeriesInstanceUID, ds.SOPInstanceUID, f.read_bytes())
    (spool / "1.2.3.4" / "junk.txt").write_text("not dicom")
    index = InstanceIndex(database, synchronous="NORMAL")
    assert index.reconcile(spool) == 5
    assert index.reconcile(spool) == 0
    study = index.get_study("1.2.3.4")
    assert study.instance_count == 5
    assert index.forget("1.2.3.4") == 5
    assert index.activity() == []
    index.close()
