"""scp.query, scp.retrieve, scp.instance_sink: Query/Retrieve SCU against a real Orthanc
(C-FIND, C-MOVE into the ingress, C-GET).

One Orthanc per module holds (all CT unless said, 32x32 slices):

* patient A (issuer HOSP-A): the prior study (2023-01-10, series 1 with 20 slices and
  series 2 with 5), the current study (2024-03-15) and an MR study (2021-01-01);
* the same PatientID under another issuer (HOSP-B): a CT study (2022-05-05);
* patient B: a CT study (2023-06-01).

Orthanc knows the node as THIGHNODE at a port chosen up front; the tests that need
the ingress start it on that port.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.events import Event
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
)

from scp.association import DEFAULT_MAXIMUM_PDU_SIZE, AssociationSettings, RemoteAE
from scp.errors import InvalidUIDError, QueryArgumentError, QueryFailedError, QuerySourceError
from scp.index import InstanceIndex
from scp.instance_sink import store_into
from scp.pacs import QuerySource
from scp.query import find_series, find_studies
from scp.retrieve import RetrieveResult, retrieve_series
from scp.status import STATUS_MOVE_DESTINATION_UNKNOWN, STATUS_SUCCESS, describe_retrieve_status
from tests.scp.conftest import RunningIngress
from tests.support.orthanc import OrthancServer
from tests.support.ports import free_port
from tests.support.synthetic_ct import write_ct_series

NODE_AE = "THIGHNODE"
PATIENT_A = "TN-PRIOR-A"
PATIENT_B = "TN-PRIOR-B"
ROWS = COLS = 32


def _uid(*parts: str) -> str:
    return generate_uid(entropy_srcs=["test_retrieve", *parts])


@dataclass(frozen=True)
class Study:
    study_uid: str
    date: str
    series: dict[str, list[str]]  # SeriesInstanceUID -> SOPInstanceUIDs


@dataclass(frozen=True)
class Pacs:
    orthanc: OrthancServer
    ingress_port: int
    prior: Study
    current: Study
    mr: Study
    other_issuer: Study
    other_patient: Study

    def source(self, **overrides: object) -> QuerySource:
        values: dict[str, object] = {
            "name": "PACS",
            "ae_title": self.orthanc.aet,
            "host": "127.0.0.1",
            "port": self.orthanc.dicom_port,
            "calling_ae_title": NODE_AE,
            "method": "move",
            "move_destination_ae": NODE_AE,
            "timeout_s": 30.0,
        }
        values.update(overrides)
        return QuerySource(**values)  # type: ignore[arg-type]


def _write_study(
    root: Path,
    name: str,
    *,
    patient: dict[str, str],
    date: str,
    series_slices: tuple[int, ...],
    modality: str = "CT",
) -> tuple[Study, list[Path]]:
    study_uid = _uid("study", name)
    series: dict[str, list[str]] = {}
    files: list[Path] = []
    for number, n_slices in enumerate(series_slices, start=1):
        series_uid = _uid("series", name, str(number))
        paths = write_ct_series(
            root / name / str(number),
            n_slices=n_slices,
            rows=ROWS,
            cols=COLS,
            study_uid=study_uid,
            series_uid=series_uid,
            series_number=number,
            modality=modality,
            description=f"{name} series {number}",
            patient=patient,
            extra={"StudyDate": date, "SeriesDate": date, "AccessionNumber": f"ACC-{name}"},
            seed=name,
        )
        series[series_uid] = [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths]
        files.extend(paths)
    return Study(study_uid, date, series), files


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pacs]:
    root = tmp_path_factory.mktemp("retrieve")
    patient_a = {"PatientID": PATIENT_A, "IssuerOfPatientID": "HOSP-A", "PatientName": "Prior^Alice"}
    patient_a_b = {"PatientID": PATIENT_A, "IssuerOfPatientID": "HOSP-B", "PatientName": "Other^Anna"}
    patient_b = {"PatientID": PATIENT_B, "IssuerOfPatientID": "HOSP-A", "PatientName": "Prior^Bob"}
    prior, f1 = _write_study(root / "dicom", "prior", patient=patient_a, date="20230110", series_slices=(20, 5))
    current, f2 = _write_study(root / "dicom", "current", patient=patient_a, date="20240315", series_slices=(20,))
    mr, f3 = _write_study(
        root / "dicom", "mr", patient=patient_a, date="20210101", series_slices=(5,), modality="MR"
    )
    other_issuer, f4 = _write_study(
        root / "dicom", "issuer-b", patient=patient_a_b, date="20220505", series_slices=(5,)
    )
    other_patient, f5 = _write_study(
        root / "dicom", "patient-b", patient=patient_b, date="20230601", series_slices=(5,)
    )
    ingress_port = free_port()
    with OrthancServer(root, modalities={NODE_AE: (NODE_AE, "127.0.0.1", ingress_port)}) as orthanc:
        for path in (*f1, *f2, *f3, *f4, *f5):
            orthanc.upload(path)
        assert len(orthanc.studies()) == 5
        yield Pacs(orthanc, ingress_port, prior, current, mr, other_issuer, other_patient)


def _prior_ct_series(pacs: Pacs) -> tuple[str, list[str]]:
    series_uid, sops = next(iter(pacs.prior.series.items()))
    assert len(sops) == 20
    return series_uid, sops


# --- C-FIND -----------------------------------------------------------------------------
@pytest.mark.integration
def test_find_studies_before_date_returns_only_earlier_ct_studies_of_the_patient(pacs: Pacs) -> None:
    studies = find_studies(pacs.source(), patient_id=PATIENT_A, before_date="20240315")
    # Newest first; the current study (same date) is not strictly earlier, the MR study has no CT,
    # patient B's study is another patient. Without an issuer HOSP-B's study shares the PatientID.
    assert [s.study_instance_uid for s in studies] == [pacs.prior.study_uid, pacs.other_issuer.study_uid]
    prior = studies[0]
    assert prior.study_date == "20230110"
    assert prior.study_time == "101500"
    assert prior.study_description == "CT THIGHS"
    assert prior.accession_number == "ACC-prior"
    assert "CT" in prior.modalities_in_study
    assert prior.number_of_series == 2


@pytest.mark.integration
def test_find_studies_respects_the_issuer_of_patient_id(pacs: Pacs) -> None:
    studies = find_studies(pacs.source(), patient_id=PATIENT_A, issuer_of_patient_id="HOSP-A", before_date="20240315")
    assert [s.study_instance_uid for s in studies] == [pacs.prior.study_uid]
    studies = find_studies(pacs.source(), patient_id=PATIENT_A, issuer_of_patient_id="HOSP-B")
    assert [s.study_instance_uid for s in studies] == [pacs.other_issuer.study_uid]


@pytest.mark.integration
def test_find_studies_before_date_is_exclusive(pacs: Pacs) -> None:
    studies = find_studies(pacs.source(), patient_id=PATIENT_A, before_date=pacs.prior.date)
    assert [s.study_instance_uid for s in studies] == [pacs.other_issuer.study_uid]


@pytest.mark.integration
def test_find_studies_without_date_or_modality_lists_every_study_of_the_patient(pacs: Pacs) -> None:
    studies = find_studies(pacs.source(), patient_id=PATIENT_A, modality="")
    assert [s.study_instance_uid for s in studies] == [
        pacs.current.study_uid,
        pacs.prior.study_uid,
        pacs.other_issuer.study_uid,
        pacs.mr.study_uid,
    ]
    mr_only = find_studies(pacs.source(), patient_id=PATIENT_A, modality="MR")
    assert [s.study_instance_uid for s in mr_only] == [pacs.mr.study_uid]
    assert find_studies(pacs.source(), patient_id="TN-NOBODY") == []


@pytest.mark.integration
def test_find_series_lists_the_series_of_the_study(pacs: Pacs) -> None:
    series = find_series(pacs.source(), pacs.prior.study_uid)
    assert [s.series_instance_uid for s in series] == list(pacs.prior.series)
    assert [s.series_number for s in series] == [1, 2]
    assert [s.number_of_instances for s in series] == [20, 5]
    assert {s.modality for s in series} == {"CT"}
    assert {s.body_part_examined for s in series} == {"LEG"}
    assert series[0].series_description == "prior series 1"


@pytest.mark.integration
def test_logs_carry_no_patient_id(pacs: Pacs, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="scp"):
        studies = find_studies(pacs.source(), patient_id=PATIENT_A, issuer_of_patient_id="HOSP-A")
        find_series(pacs.source(), studies[0].study_instance_uid)
    ours = [r.getMessage() for r in caplog.records if r.name.startswith("scp.")]
    assert ours, "scp logged nothing"
    assert any(pacs.prior.study_uid in m for m in ours)
    assert not [m for m in ours if PATIENT_A in m or "Prior^Alice" in m or "HOSP-A" in m]


# --- C-MOVE -----------------------------------------------------------------------------
@pytest.mark.integration
def test_move_puts_every_instance_into_the_running_ingress(
    pacs: Pacs, start_server: Callable[..., RunningIngress]
) -> None:
    node = start_server(port=pacs.ingress_port, ae_title=NODE_AE)
    series_uid, sops = _prior_ct_series(pacs)

    result = retrieve_series(pacs.source(), pacs.prior.study_uid, series_uid)

    assert result.ok, result.error
    assert (result.completed, result.failed, result.warning) == (20, 0, 0)
    assert result.status == STATUS_SUCCESS
    assert result.error == ""
    assert result.received_sop_uids == ()  # they arrived on the ingress
    indexed = node.index.instances(pacs.prior.study_uid)
    assert sorted(i.sop_instance_uid for i in indexed) == sorted(sops)
    assert {i.series_instance_uid for i in indexed} == {series_uid}
    assert {i.calling_ae for i in indexed} == {pacs.orthanc.aet}
    for inst in indexed:
        assert pydicom.dcmread(inst.path).SOPInstanceUID == inst.sop_instance_uid


@pytest.mark.integration
def test_move_to_an_unknown_destination_fails_with_a_clear_error(pacs: Pacs) -> None:
    series_uid, _ = _prior_ct_series(pacs)
    result = retrieve_series(pacs.source(move_destination_ae="NOSUCHNODE"), pacs.prior.study_uid, series_uid)
    assert not result.ok
    # PS3.4 C.4.2.1.5 has 0xA801 for this; Orthanc 1.10 answers a bare 0xC000 (no Error Comment).
    assert result.status in (STATUS_MOVE_DESTINATION_UNKNOWN, 0xC000)
    assert (result.completed, result.failed) == (0, 0)
    assert result.error.startswith(f"PACS ({pacs.orthanc.aet}@127.0.0.1:{pacs.orthanc.dicom_port}) refused C-MOVE: ")
    assert describe_retrieve_status(result.status) in result.error
    assert "move destination NOSUCHNODE, add it" in result.error


@pytest.mark.integration
def test_move_while_the_ingress_is_down_reports_the_failed_suboperations(pacs: Pacs) -> None:
    series_uid, _ = _prior_ct_series(pacs)
    result = retrieve_series(pacs.source(), pacs.prior.study_uid, series_uid)  # nothing on ingress_port
    assert not result.ok
    assert result.status is not None and result.status != STATUS_SUCCESS
    assert "PACS (" in result.error
    assert describe_retrieve_status(result.status) in result.error


# --- C-GET ------------------------------------------------------------------------------
@pytest.mark.integration
def test_get_stores_and_indexes_every_instance_without_a_running_scp(pacs: Pacs, tmp_path: Path) -> None:
    series_uid, sops = _prior_ct_series(pacs)
    spool = tmp_path / "spool"
    with InstanceIndex(tmp_path / "node.sqlite") as index:
        store = store_into(index, spool, pacs.orthanc.aet, "127.0.0.1")
        source = pacs.source(method="get", move_destination_ae="")

        result = retrieve_series(source, pacs.prior.study_uid, series_uid, store=store)

        assert result.ok, result.error
        assert (result.completed, result.failed, result.warning) == (20, 0, 0)
        assert sorted(result.received_sop_uids) == sorted(sops)
        indexed = index.instances(pacs.prior.study_uid)
        assert sorted(i.sop_instance_uid for i in indexed) == sorted(sops)
        for inst in indexed:
            assert inst.path.parent == spool / pacs.prior.study_uid / series_uid
            assert inst.path.stat().st_size == inst.size_bytes
            assert inst.calling_ae == pacs.orthanc.aet
            assert inst.modality == "CT"
            ds = pydicom.dcmread(inst.path)
            assert ds.SOPInstanceUID == inst.sop_instance_uid
            assert ds.file_meta.SourceApplicationEntityTitle == pacs.orthanc.aet
            assert ds.pixel_array.shape == (ROWS, COLS)
        study = index.get_study(pacs.prior.study_uid)
        assert len(study.series[series_uid]) == 20

        again = retrieve_series(source, pacs.prior.study_uid, series_uid, store=store)
        assert again.ok, again.error
        assert len(index.instances(pacs.prior.study_uid)) == 20  # duplicates ignored
        assert index.activity()[0].instance_count == 20


@pytest.mark.integration
def test_get_reports_instances_the_store_refused(pacs: Pacs) -> None:
    _, sops = next(iter(pacs.other_issuer.series.items()))
    series_uid = next(iter(pacs.other_issuer.series))

    def refuse(data: bytes) -> None:
        raise OSError("read-only file system")

    source = pacs.source(method="get", move_destination_ae="")
    result = retrieve_series(source, pacs.other_issuer.study_uid, series_uid, store=refuse)
    assert not result.ok
    assert result.failed == len(sops)
    assert result.completed == 0
    assert result.received_sop_uids == ()
    assert "PACS (" in result.error


@pytest.mark.integration
def test_get_of_an_unknown_series_is_not_ok(pacs: Pacs, tmp_path: Path) -> None:
    with InstanceIndex(tmp_path / "node.sqlite") as index:
        store = store_into(index, tmp_path / "spool", pacs.orthanc.aet)
        source = pacs.source(method="get", move_destination_ae="")
        result = retrieve_series(source, pacs.prior.study_uid, _uid("no such series"), store=store)
        assert not result.ok
        assert result.completed == 0
        assert "PACS (" in result.error
        assert index.activity() == []


# --- PACS down / refusing -----------------------------------------------------------------
@pytest.mark.integration
def test_a_pacs_that_is_down_gives_a_connection_error_naming_it() -> None:
    port = free_port()  # nothing listens there
    for method in ("move", "get"):
        source = QuerySource(
            name="OLDPACS",
            ae_title="ARCHIVE",
            host="127.0.0.1",
            port=port,
            calling_ae_title=NODE_AE,
            method=method,  # type: ignore[arg-type]
            move_destination_ae=NODE_AE,
            timeout_s=5.0,
        )
        result = retrieve_series(source, _uid("s"), _uid("se"), store=lambda data: None)
        assert result == RetrieveResult(
            ok=False,
            completed=0,
            failed=0,
            warning=0,
            status=None,
            error=result.error,
            received_sop_uids=(),
        )
        assert f"OLDPACS (ARCHIVE@127.0.0.1:{port})" in result.error
        assert "could not connect" in result.error
    with pytest.raises(QueryFailedError, match=rf"OLDPACS \(ARCHIVE@127\.0\.0\.1:{port}\).*could not connect"):
        find_studies(source, patient_id=PATIENT_A)
    with pytest.raises(QueryFailedError, match="could not connect"):
        find_series(source, _uid("s"))


@pytest.mark.integration
def test_a_pacs_that_does_not_know_our_ae_refuses_the_query(pacs: Pacs) -> None:
    source = pacs.source(calling_ae_title="STRANGER")
    with pytest.raises(QueryFailedError, match=r"PACS \(ORTHANC@127\.0\.0\.1:\d+\)"):
        find_studies(source, patient_id=PATIENT_A)
    series_uid, _ = _prior_ct_series(pacs)
    result = retrieve_series(source, pacs.prior.study_uid, series_uid)
    assert not result.ok
    assert "PACS (ORTHANC@127.0.0.1:" in result.error


# --- validation (no network) ------------------------------------------------------------
def _source(**overrides: object) -> QuerySource:
    values: dict[str, object] = {
        "name": "PACS",
        "ae_title": "PACS",
        "host": "10.0.0.5",
        "port": 104,
        "calling_ae_title": NODE_AE,
        "move_destination_ae": NODE_AE,
    }
    values.update(overrides)
    return QuerySource(**values)  # type: ignore[arg-type]


def test_query_source_defaults_and_label() -> None:
    source = _source(ae_title=" PACS ")
    assert source.ae_title == "PACS"
    assert source.method == "move"
    assert source.timeout_s == 60.0
    assert source.label == "PACS (PACS@10.0.0.5:104)"
    assert replace(source, method="get", move_destination_ae="").method == "get"


def test_query_source_timeout_bounds_every_wait() -> None:
    source = _source(timeout_s=9)
    assert source.association == AssociationSettings(NODE_AE, 9.0, 9.0, 9.0, 9.0, DEFAULT_MAXIMUM_PDU_SIZE)
    assert source.peer == RemoteAE("PACS", "10.0.0.5", 104)


@pytest.mark.parametrize(
    ("overrides", "pattern"),
    [
        ({"ae_title": "A" * 17}, r"ae_title is 17 characters long .*allowed: 1 to 16"),
        ({"calling_ae_title": "BAD\\AE"}, r"calling_ae_title 'BAD\\\\AE' contains '\\\\'"),
        ({"ae_title": "   "}, r"ae_title '   ' is only spaces"),
        ({"port": 0}, r"port is 0; allowed: an integer 1\.\.65535"),
        ({"port": 70000}, r"port is 70000"),
        ({"port": True}, r"port is True"),
        ({"method": "push"}, r"method is 'push'; allowed: 'move', 'get'"),
        ({"move_destination_ae": ""}, r"move_destination_ae is empty; method 'move' needs it"),
        ({"timeout_s": 0}, r"timeout_s is 0; allowed"),
        ({"timeout_s": float("nan")}, r"timeout_s must be a finite number"),
        ({"host": ""}, r"host must be a host name"),
        ({"name": " "}, r"name must be a non-empty string"),
    ],
)
def test_query_source_refuses_invalid_fields(overrides: dict[str, object], pattern: str) -> None:
    with pytest.raises(QuerySourceError, match=pattern):
        _source(**overrides)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"patient_id": ""}, r"patient_id is empty"),
        ({"patient_id": "TN*"}, r"patient_id contains '\*'"),
        ({"patient_id": "A?B"}, r"patient_id contains '\?'"),
        ({"patient_id": "A\\B"}, r"patient_id contains '\\\\'"),
        ({"patient_id": "X" * 65}, r"patient_id is 65 characters long"),
        ({"patient_id": "P1", "issuer_of_patient_id": "H*"}, r"issuer_of_patient_id contains"),
        ({"patient_id": "P1", "before_date": "2024-03-15"}, r"before_date is '2024-03-15'; allowed: a date YYYYMMDD"),
        ({"patient_id": "P1", "before_date": "20240230"}, r"not a calendar date"),
        ({"patient_id": "P1", "modality": "C*"}, r"modality is 'C\*'"),
        ({"patient_id": "P1", "modality": "ct"}, r"modality is 'ct'"),
    ],
)
def test_find_studies_refuses_invalid_arguments_before_connecting(kwargs: dict[str, object], pattern: str) -> None:
    with pytest.raises(QueryArgumentError, match=pattern):
        find_studies(_source(port=1), **kwargs)  # type: ignore[arg-type]


def test_retrieve_refuses_invalid_arguments_before_connecting() -> None:
    with pytest.raises(InvalidUIDError, match="SeriesInstanceUID"):
        retrieve_series(_source(port=1), "1.2.3", "1.2.03")
    with pytest.raises(QueryArgumentError, match="method 'get' needs a store callable"):
        retrieve_series(_source(port=1, method="get"), "1.2.3", "1.2.4")
    with pytest.raises(InvalidUIDError, match="StudyInstanceUID"):
        find_series(_source(port=1), "../etc")


def _study_identifier(uid: str, patient_id: str, issuer: str, date: str, modalities: list[str]) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.PatientID = patient_id
    ds.IssuerOfPatientID = issuer
    ds.StudyInstanceUID = uid
    ds.StudyDate = date
    ds.StudyTime = "0800"
    ds.ModalitiesInStudy = modalities
    ds.NumberOfStudyRelatedSeries = "3"
    return ds


#: What the sloppy PACS returns to any STUDY query: (uid, PatientID, issuer, date, modalities).
_SLOPPY_STUDIES = (
    ("1.2.3.1", "P1", "H1", "20230101", ["CT"]),  # kept
    ("1.2.3.2", "P1", "H1", "20221201", []),  # kept: ModalitiesInStudy not returned
    ("1.2.3.3", "P1", "", "20220101", ["CT", "SR"]),  # kept: issuer not returned
    ("1.2.3.4", "P1", "H1", "20231231.5", ["CT"]),  # invalid date: dropped
    ("1.2.3.5", "P12", "H1", "20230101", ["CT"]),  # another patient: dropped
    ("1.2.3.6", "P1", "H2", "20230101", ["CT"]),  # another issuer: dropped
    ("1.2.3.7", "P1", "H1", "20240101", ["CT"]),  # not strictly before: dropped
    ("1.2.3.8", "P1", "H1", "", ["CT"]),  # no StudyDate: dropped
    ("1.2.3.9", "P1", "H1", "20230101", ["MR"]),  # no CT: dropped
    ("1.2.03", "P1", "H1", "20230101", ["CT"]),  # invalid UID: dropped
    ("1.2.3.10", "P1", "H1", "20230101", ["CT"]),  # kept, same date as 1.2.3.1, larger time below
)


def _handle_sloppy_find(event: Event) -> Iterator[tuple[int, Dataset | None]]:
    for uid, patient_id, issuer, date, modalities in _SLOPPY_STUDIES:
        ds = _study_identifier(uid, patient_id, issuer, date, modalities)
        if uid == "1.2.3.10":
            ds.StudyTime = "0915"
        yield 0xFF00, ds


def _handle_unknown_destination(event: Event) -> Iterator[object]:
    yield None, None  # pynetdicom answers 0xA801 Move destination unknown


@pytest.fixture
def sloppy_pacs() -> Iterator[QuerySource]:
    ae = AE(ae_title="SLOPPY")
    ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
    ae.add_supported_context(StudyRootQueryRetrieveInformationModelMove)
    port = free_port()
    ae.start_server(
        ("127.0.0.1", port),
        block=False,
        evt_handlers=[(evt.EVT_C_FIND, _handle_sloppy_find), (evt.EVT_C_MOVE, _handle_unknown_destination)],
    )
    try:
        yield _source(name="PACS", ae_title="SLOPPY", host="127.0.0.1", port=port, timeout_s=10.0)
    finally:
        ae.shutdown()


@pytest.mark.integration
@pytest.mark.filterwarnings("ignore:Invalid value for VR")  # the sloppy PACS's invalid date and UID
def test_find_studies_checks_again_what_the_pacs_returns(sloppy_pacs: QuerySource) -> None:
    studies = find_studies(sloppy_pacs, patient_id="P1", issuer_of_patient_id="H1", before_date="20240101")
    assert [s.study_instance_uid for s in studies] == ["1.2.3.10", "1.2.3.1", "1.2.3.2", "1.2.3.3"]
    assert studies[1].modalities_in_study == ("CT",)
    assert studies[2].modalities_in_study == ()
    assert studies[3].modalities_in_study == ("CT", "SR")
    assert studies[0].number_of_series == 3


@pytest.mark.integration
def test_move_destination_unknown_names_the_pacs_and_what_to_do(sloppy_pacs: QuerySource) -> None:
    result = retrieve_series(sloppy_pacs, "1.2.3.1", "1.2.3.1.1")
    assert not result.ok
    assert result.status == STATUS_MOVE_DESTINATION_UNKNOWN
    assert result.error == (
        f"PACS (SLOPPY@127.0.0.1:{sloppy_pacs.port}) refused C-MOVE: 0xA801 Move destination unknown - "
        "add THIGHNODE (this node's ingress AE title, host and port) to its modalities"
    )
