"""C-STORE sender and outbox against real peers: Orthanc and small pynetdicom SCPs."""

from __future__ import annotations

import logging
import shutil
from io import BytesIO
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    UID,
    JPEGLSLossless,
)
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification

from dicomout.errors import DestinationError
from dicomout.outbox import STATE_FAILED, STATE_PENDING, STATE_SENT, Outbox, send_pending
from dicomout.sender import (
    MAX_PRESENTATION_CONTEXTS,
    Destination,
    PresentationContextPlan,
    echo,
    plan_contexts,
    send_files,
)
from dicomout.sender import _chunk_by_contexts, _ObjectHeader  # private: the 128-context split
from scp.association import AssociationSettings, RemoteAE
from scp.status import STATUS_SUCCESS
from tests.dicomout.dicom_files import compress_jpegls, write_ct_series
from tests.support.orthanc import OrthancServer
from tests.support.ports import free_port

SEG = "1.2.840.10008.5.1.4.1.1.66.4"
T0 = 1_700_000_000.0


# --- fixtures ----------------------------------------------------------------------------
@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[OrthancServer]:
    with OrthancServer(tmp_path, modalities={"THIGHNODE": ("THIGHNODE", "127.0.0.1", free_port())}) as server:
        yield server


def _orthanc_destination(server: OrthancServer, name: str = "PACS") -> Destination:
    return Destination(name, server.aet, "127.0.0.1", server.dicom_port, timeout_s=20.0)


@dataclass
class _Received:
    datasets: list[Dataset] = field(default_factory=list)
    transfer_syntaxes: list[str] = field(default_factory=list)


@pytest.fixture
def ct_only_scp() -> Iterator[tuple[Destination, _Received]]:
    """A pynetdicom Storage SCP that supports only CT Image Storage, uncompressed."""
    received = _Received()

    def handle_store(event: evt.Event) -> int:
        received.transfer_syntaxes.append(str(event.context.transfer_syntax))
        received.datasets.append(event.dataset)
        return STATUS_SUCCESS

    ae = AE(ae_title="CTONLY")
    ae.add_supported_context(CTImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    ae.add_supported_context(Verification)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, handle_store)])
    try:
        yield Destination("CTONLY", "CTONLY", "127.0.0.1", port, timeout_s=20.0), received
    finally:
        server.shutdown()


# --- pure parts ------------------------------------------------------------------------
def test_plan_contexts_uncompressed_gets_fallbacks_compressed_own_syntax() -> None:
    plan = plan_contexts(
        [
            (CTImageStorage, ImplicitVRLittleEndian),
            (CTImageStorage, ImplicitVRLittleEndian),
            (CTImageStorage, JPEGLSLossless),
            (SEG, ExplicitVRLittleEndian),
        ]
    )
    assert plan == [
        PresentationContextPlan(CTImageStorage, (ImplicitVRLittleEndian, ExplicitVRLittleEndian)),
        PresentationContextPlan(CTImageStorage, (JPEGLSLossless,)),
        PresentationContextPlan(SEG, (ExplicitVRLittleEndian, ImplicitVRLittleEndian)),
    ]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ae_title": "A" * 17}, "Destination.ae_title is 17 characters long \\('AAAAAAAAAAAAAAAAA'\\)"),
        ({"ae_title": "  "}, "Destination.ae_title '  ' is only spaces"),
        ({"ae_title": "PA\\CS"}, "contains '\\\\\\\\'"),
        ({"calling_ae_title": "NODE\n"}, "Destination.calling_ae_title 'NODE\\\\n' contains"),
        ({"port": 0}, "Destination.port of 'PACS' is 0 \\(allowed: an integer 1-65535\\)"),
        ({"port": 70000}, "is 70000"),
        ({"timeout_s": 0}, "Destination.timeout_s of 'PACS' is 0"),
        ({"max_pdu": 100}, "Destination.max_pdu of 'PACS' is 100"),
        ({"host": ""}, "Destination.host of 'PACS' is ''"),
    ],
)
def test_destination_validation_names_field_value_and_allowed(kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {"name": "PACS", "ae_title": "PACS", "host": "127.0.0.1", "port": 4242}
    args.update(kwargs)
    with pytest.raises(DestinationError, match=message) as info:
        Destination(**args)  # type: ignore[arg-type]
    assert "allowed" in str(info.value)


def test_destination_label() -> None:
    assert Destination("PACS", "PACS", "127.0.0.1", 4242).label == "PACS (PACS@127.0.0.1:4242)"


def test_destination_timeout_bounds_every_wait_and_max_pdu_is_announced() -> None:
    destination = Destination("PACS", "PACS", "127.0.0.1", 4242, calling_ae_title="NODE", timeout_s=7, max_pdu=65536)
    assert destination.association == AssociationSettings("NODE", 7, 7, 7, 7, 65536)
    assert destination.peer == RemoteAE("PACS", "127.0.0.1", 4242)


def test_unreadable_file_is_a_permanent_result_not_an_exception(tmp_path: Path) -> None:
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom at all")
    results = send_files([tmp_path / "missing.dcm", junk], Destination("PACS", "PACS", "127.0.0.1", 9))
    assert [r.ok for r in results] == [False, False]
    assert all(r.permanent and r.status is None for r in results)
    assert "missing.dcm" in results[0].error and "junk.dcm" in results[1].error


# --- against peers ---------------------------------------------------------------------
@pytest.mark.integration
def test_ct_series_is_delivered_to_orthanc_through_the_outbox(
    tmp_path: Path, shared_data: Path, orthanc: OrthancServer
) -> None:
    study_uid = "1.2.826.0.1.3680043.8.498.1001"
    paths = write_ct_series(tmp_path / "ct", 4, study_uid=study_uid)
    real = sorted((shared_data / "tcia-pancreas-ct/dcm").glob("*.dcm"))[:2]
    assert len(real) == 2, f"the TCIA pancreas CT files are missing from {shared_data}"
    outbox = Outbox(tmp_path / "node.db")
    for path in [*paths, *real]:
        ds = dcmread(path, stop_before_pixels=True)
        outbox.enqueue(path, "PACS", job_id=1, study_uid=ds.StudyInstanceUID,
                       sop_class_uid=ds.SOPClassUID, sop_instance_uid=ds.SOPInstanceUID)

    assert send_pending(outbox, {"PACS": _orthanc_destination(orthanc)}) == 6

    assert outbox.counts() == {STATE_PENDING: 0, STATE_SENT: 6, STATE_FAILED: 0}
    assert all(i.sent_at is not None and i.last_status == 0 and i.attempts == 1 for i in outbox.items())
    expected = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in [*paths, *real]}
    assert orthanc.sop_instance_uids() == expected
    assert len(orthanc.studies()) == 2
    ours = [i for i in orthanc.instances() if orthanc.instance_tags(i)["StudyInstanceUID"] == study_uid]
    assert len(ours) == 4
    assert orthanc.instance_metadata(ours[0], "RemoteAET") == "THIGHNODE"
    # a second run has nothing left to do
    assert send_pending(outbox, {"PACS": _orthanc_destination(orthanc)}) == 0


@pytest.mark.integration
def test_orthanc_down_keeps_items_pending_and_a_later_run_delivers(tmp_path: Path, orthanc: OrthancServer) -> None:
    destinations = {"PACS": _orthanc_destination(orthanc)}
    first, *later = write_ct_series(tmp_path / "ct", 3)
    assert send_files([first], destinations["PACS"])[0].ok
    orthanc.stop()

    outbox = Outbox(tmp_path / "node.db")
    for path in later:
        ds = dcmread(path, stop_before_pixels=True)
        outbox.enqueue(path, "PACS", job_id=2, study_uid=ds.StudyInstanceUID, sop_class_uid=ds.SOPClassUID,
                       sop_instance_uid=ds.SOPInstanceUID, now=T0)

    assert send_pending(outbox, destinations, now=T0) == 0
    items = outbox.items()
    assert [(i.state, i.attempts, i.last_status, i.next_attempt_at) for i in items] == [
        (STATE_PENDING, 1, None, T0 + 10.0)
    ] * 2
    assert items[0].last_error.startswith(
        f"cannot open an association with destination PACS (ORTHANC@127.0.0.1:{orthanc.dicom_port})"
    )

    orthanc.start()  # same storage: the first instance is still there
    assert send_pending(outbox, destinations, now=T0 + 5) == 0  # not due yet
    # crash and restart of the node: a new Outbox on the same file resumes
    assert send_pending(Outbox(tmp_path / "node.db"), destinations, now=T0 + 10) == 2
    assert outbox.counts() == {STATE_PENDING: 0, STATE_SENT: 2, STATE_FAILED: 0}
    assert [i.attempts for i in outbox.items()] == [2, 2]
    assert orthanc.count_instances() == 3


@pytest.mark.integration
def test_refused_sop_class_fails_permanently_while_ct_in_same_batch_is_delivered(
    tmp_path: Path, shared_data: Path, ct_only_scp: tuple[Destination, _Received]
) -> None:
    destination, received = ct_only_scp
    seg = shared_data / "reference-seg-sr/highdicom/seg_image_ct_binary.dcm"
    ct = write_ct_series(tmp_path / "ct", 2)
    outbox = Outbox(tmp_path / "node.db")
    for path in [ct[0], seg, ct[1]]:
        ds = dcmread(path, stop_before_pixels=True)
        outbox.enqueue(path, "CTONLY", job_id=3, study_uid=ds.StudyInstanceUID, sop_class_uid=ds.SOPClassUID,
                       sop_instance_uid=ds.SOPInstanceUID, now=T0)

    assert send_pending(outbox, {"CTONLY": destination}, now=T0) == 2

    items = outbox.items()
    assert [i.state for i in items] == [STATE_SENT, STATE_FAILED, STATE_SENT]
    assert items[1].attempts == 1 and items[1].last_status is None
    assert items[1].last_error == (
        f"destination CTONLY (CTONLY@127.0.0.1:{destination.port}) refused SOP class Segmentation Storage "
        f"({SEG}); nothing sent"
    )
    assert {str(ds.SOPInstanceUID) for ds in received.datasets} == {items[0].sop_instance_uid, items[2].sop_instance_uid}


@pytest.mark.integration
def test_batch_of_only_refused_classes_reports_each_refused(
    shared_data: Path, ct_only_scp: tuple[Destination, _Received]
) -> None:
    destination, received = ct_only_scp
    ref = shared_data / "reference-seg-sr/highdicom"
    results = send_files([ref / "seg_image_ct_binary.dcm", ref / "sr_document.dcm"], destination)
    assert [(r.ok, r.permanent, r.status) for r in results] == [(False, True, None)] * 2
    assert "refused SOP class Segmentation Storage" in results[0].error
    assert "refused SOP class Comprehensive 3D SR Storage (1.2.840.10008.5.1.4.1.1.88.34)" in results[1].error
    assert received.datasets == []


@pytest.mark.integration
def test_jpeg_ls_file_is_delivered_in_its_own_transfer_syntax(tmp_path: Path, orthanc: OrthancServer) -> None:
    (plain,) = write_ct_series(tmp_path / "ct", 1)
    compressed = compress_jpegls(plain, tmp_path / "ct_jpegls.dcm")
    (result,) = send_files([compressed], _orthanc_destination(orthanc))
    assert result.ok and result.status == STATUS_SUCCESS and result.transfer_syntax_uid == JPEGLSLossless
    (instance,) = orthanc.instances()
    assert orthanc.instance_metadata(instance, "TransferSyntax") == JPEGLSLossless
    assert orthanc.instance_tags(instance)["SOPInstanceUID"] == result.sop_instance_uid


def test_a_file_in_an_accepted_syntax_is_sent_as_stored_without_decoding_it(
    tmp_path: Path, orthanc: OrthancServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sender reads only the header of a file the peer takes as it is: a deflated BINARY SEG of a
    300-slice CT inflates to 222 MB in memory (and is deflated again by pynetdicom) when it is decoded."""
    import dicomout.sender

    full_reads: list[str] = []
    real = dicomout.sender.dcmread

    def counting(path, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        if not kwargs.get("stop_before_pixels"):
            full_reads.append(str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(dicomout.sender, "dcmread", counting)
    plain, other = write_ct_series(tmp_path / "ct", 2)
    compressed = compress_jpegls(plain, tmp_path / "ct_jpegls.dcm")
    deflated = tmp_path / "ct_deflated.dcm"
    ds = dcmread(other)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(deflated, enforce_file_format=True)
    results = send_files([compressed, deflated], _orthanc_destination(orthanc))
    assert [r.ok for r in results] == [True, True] and full_reads == []
    assert [r.transfer_syntax_uid for r in results] == [JPEGLSLossless, DeflatedExplicitVRLittleEndian]
    stored = {orthanc.instance_tags(i)["SOPInstanceUID"]: i for i in orthanc.instances()}
    assert set(stored) == {r.sop_instance_uid for r in results}
    for path in (compressed, deflated):
        instance = stored[dcmread(path, stop_before_pixels=True).SOPInstanceUID]
        kept = dcmread(BytesIO(orthanc.get_bytes(f"/instances/{instance}/file")))
        assert kept.PixelData == dcmread(path).PixelData  # the stored bytes arrived unchanged


@pytest.mark.integration
def test_jpeg_ls_file_is_decompressed_when_peer_accepts_only_uncompressed(
    tmp_path: Path, ct_only_scp: tuple[Destination, _Received]
) -> None:
    destination, received = ct_only_scp
    (plain,) = write_ct_series(tmp_path / "ct", 1)
    compressed = compress_jpegls(plain, tmp_path / "ct_jpegls.dcm")
    (result,) = send_files([compressed], destination)
    assert result.ok and result.transfer_syntax_uid in (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
    (ds,) = received.datasets
    assert ds.SOPInstanceUID == result.sop_instance_uid == dcmread(compressed).SOPInstanceUID  # same instance
    ds.file_meta = Dataset()
    ds.file_meta.TransferSyntaxUID = received.transfer_syntaxes[0]
    assert np.array_equal(ds.pixel_array, dcmread(plain).pixel_array)


@pytest.mark.integration
def test_echo_against_orthanc_and_a_closed_port(orthanc: OrthancServer) -> None:
    good = echo(_orthanc_destination(orthanc))
    assert (good.ok, good.status, good.error) == (True, STATUS_SUCCESS, "")
    closed_port = free_port()
    bad = echo(Destination("PACS", "PACS", "127.0.0.1", closed_port, timeout_s=5.0))
    assert not bad.ok and bad.status is None
    assert bad.error.startswith(f"cannot open an association with destination PACS (PACS@127.0.0.1:{closed_port})")


@pytest.mark.integration
def test_rejected_association_is_a_transient_error_naming_destination_and_reason(tmp_path: Path) -> None:
    ae = AE(ae_title="STRICT")
    ae.add_supported_context(CTImageStorage)
    ae.add_supported_context(Verification)
    ae.require_called_aet = True
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False)
    try:
        destination = Destination("STRICT", "WRONGAET", "127.0.0.1", port, timeout_s=10.0)
        results = send_files(write_ct_series(tmp_path / "ct", 2), destination)
        assert echo(destination).ok is False
    finally:
        server.shutdown()
    assert [(r.ok, r.permanent) for r in results] == [(False, False)] * 2
    assert results[0].error == (
        f"destination STRICT (WRONGAET@127.0.0.1:{port}) rejected the association from calling AE "
        "'THIGHNODE': Rejected Permanent, Called AE title not recognised"
    )


@pytest.mark.integration
def test_send_pending_logs_batch_and_failures_with_identifiers_only(
    tmp_path: Path, shared_data: Path, ct_only_scp: tuple[Destination, _Received], caplog: pytest.LogCaptureFixture
) -> None:
    destination, _ = ct_only_scp
    seg = tmp_path / "seg.dcm"
    shutil.copy(shared_data / "reference-seg-sr/highdicom/seg_image_ct_binary.dcm", seg)
    (ct,) = write_ct_series(tmp_path / "ct", 1)
    outbox = Outbox(tmp_path / "node.db")
    for path in (ct, seg):
        ds = dcmread(path, stop_before_pixels=True)
        outbox.enqueue(path, "CTONLY", job_id=4, study_uid=ds.StudyInstanceUID, sop_class_uid=ds.SOPClassUID,
                       sop_instance_uid=ds.SOPInstanceUID)
    with caplog.at_level(logging.INFO, logger="dicomout.outbox"):
        send_pending(outbox, {"CTONLY": destination})
    lines = [r.getMessage() for r in caplog.records if r.name == "dicomout.outbox"]
    seg_uid = str(dcmread(seg, stop_before_pixels=True).SOPInstanceUID)
    assert any("outbox batch to CTONLY" in line and "1 sent" in line and "1 failed" in line for line in lines)
    assert any(seg_uid in line and "refused SOP class" in line for line in lines)
    assert not any("Synthetic" in line or "SYN0001" in line for line in lines)


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_file_with_invalid_sop_class_uid_is_a_permanent_result(tmp_path: Path) -> None:
    (path,) = write_ct_series(tmp_path / "ct", 1)
    ds = dcmread(path)
    ds.SOPClassUID = "1.2.abc"
    ds.save_as(path)
    (result,) = send_files([path], Destination("PACS", "PACS", "127.0.0.1", 9))
    assert (result.ok, result.permanent) == (False, True)
    assert "invalid SOPClassUID 1.2.abc" in result.error


def test_batches_needing_more_than_128_contexts_are_split_by_sop_class() -> None:
    headers = [
        _ObjectHeader(i, Path(f"/{i}.dcm"), UID(f"1.2.840.99999.{i // 2}"), f"1.2.3.{i}", UID(ImplicitVRLittleEndian))
        for i in range(300)
    ]
    chunks = list(_chunk_by_contexts(headers))
    assert [len(c) for _, c in chunks] == [128, 22]
    assert all(len(c) <= MAX_PRESENTATION_CONTEXTS for _, c in chunks)
    assert sorted(h.index for chunk, _ in chunks for h in chunk) == list(range(300))
    first_classes = {h.sop_class_uid for h in chunks[0][0]}
    assert not first_classes & {h.sop_class_uid for h in chunks[1][0]}
