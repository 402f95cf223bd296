"""The ingress server driven by real dcmtk programs (echoscu, storescu, dcmcjpls, dcmconv)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, JPEGLSLossless, generate_uid

from tests.conftest import require_tool
from tests.scp.dicom_factory import (
    dataset_part,
    transfer_syntax_of,
    write_ct,
    write_secondary_capture,
    write_sr,
)
from tests.scp.tools import AE_TITLE, run_tool, storescp_bit_preserving

pytestmark = pytest.mark.integration


def _wait_for_log(caplog: pytest.LogCaptureFixture, fragment: str, timeout_s: float = 10.0) -> None:
    """The per-association line is written when the server sees the connection close."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if any(fragment in r.getMessage() for r in caplog.records):
            return
        time.sleep(0.05)
    pytest.fail(f"no log line with {fragment!r}: {[r.getMessage() for r in caplog.records]}")


SERIES_DIR = ("tcia-pancreas-ct", "dcm")


def _tcia_files(shared_data: Path, count: int | None = None) -> list[Path]:
    files = sorted(shared_data.joinpath(*SERIES_DIR).glob("*.dcm"))
    assert len(files) == 134, f"expected the 134-file TCIA series, found {len(files)}"
    return files[:count] if count else files


def _storescu(
    port: int, *files: Path, called: str = AE_TITLE, calling: str = "CT_SCANNER", options: tuple[str, ...] = ()
):
    return run_tool(
        require_tool("storescu"), "-v", *options, "-aet", calling, "-aec", called, "127.0.0.1", port, *files
    )


def _echoscu(port: int, called: str = AE_TITLE, calling: str = "ECHOSCU"):
    return run_tool(require_tool("echoscu"), "-v", "-aet", calling, "-aec", called, "127.0.0.1", port)


def test_echoscu_gets_an_answer(start_server) -> None:
    server = start_server()
    result = _echoscu(server.port)
    assert result.returncode == 0, result.stderr
    assert "Received Echo Response (Success)" in result.stderr


@pytest.mark.slow
def test_series_arrives_byte_identical_and_indexed(start_server, shared_data: Path, tmp_path: Path) -> None:
    """What storescu sends is what we store: compared with dcmtk storescp in bit-preserving mode
    fed by the same command (storescu re-encodes on the way, e.g. undefined-length sequences
    get explicit lengths, so the sent bytes are not the original file's; the data elements are)."""
    server = start_server()
    files = _tcia_files(shared_data)
    # -xi: propose Implicit VR LE only, the files' own syntax (by default storescu proposes
    # Explicit VR LE first and converts implicit files before sending).
    result = _storescu(server.port, *files, options=("-xi",))
    assert result.returncode == 0, result.stderr[-3000:]
    with storescp_bit_preserving(tmp_path / "storescp") as reference_port:
        reference = _storescu(reference_port, *files, called="ANY-SCP", options=("-xi",))
    assert reference.returncode == 0, reference.stderr[-3000:]
    received_by_storescp = {
        dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in (tmp_path / "storescp").iterdir()
    }
    assert len(received_by_storescp) == 134

    [activity] = server.index.activity()
    assert activity.instance_count == 134 and activity.non_ct_count == 0
    study = server.index.get_study(activity.study_instance_uid)
    assert study.calling_aes == ("CT_SCANNER",)
    [paths] = study.series.values()
    assert len(paths) == 134
    stored = {dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in paths}
    for original in files:
        sop_uid = dcmread(original, stop_before_pixels=True).SOPInstanceUID
        assert server.index.has(sop_uid)
        assert dataset_part(stored[sop_uid]) == dataset_part(received_by_storescp[sop_uid]), original.name
    for original in files[:5]:  # same data elements as the original file
        ours = dcmread(stored[dcmread(original, stop_before_pixels=True).SOPInstanceUID])
        assert ours == dcmread(original)
    assert {i.transfer_syntax_uid for i in server.index.instances(activity.study_instance_uid)} == {"1.2.840.10008.1.2"}
    assert not list(server.config.spool_dir.rglob("*.tmp"))


def test_raw_bytes_sent_by_pynetdicom_are_stored_byte_identical(
    start_server, shared_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sender that does not re-encode (pynetdicom sending a file without decoding it):
    the stored dataset part equals the original file's, undefined-length sequences included."""
    from pynetdicom import AE, _config
    from pynetdicom.sop_class import CTImageStorage

    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    server = start_server()
    files = _tcia_files(shared_data, 3)
    scu = AE(ae_title="RAWSCU")
    scu.add_requested_context(CTImageStorage, ["1.2.840.10008.1.2"])
    assoc = scu.associate("127.0.0.1", server.port, ae_title=AE_TITLE)
    assert assoc.is_established
    try:
        statuses = [assoc.send_c_store(f).Status for f in files]
    finally:
        assoc.release()
    assert statuses == [0, 0, 0]
    stored = {i.sop_instance_uid: i.path for i in server.index.instances(server.index.activity()[0].study_instance_uid)}
    for original in files:
        sop_uid = dcmread(original, stop_before_pixels=True).SOPInstanceUID
        assert dataset_part(stored[sop_uid]) == dataset_part(original), original.name


def test_sender_first_proposed_syntax_is_kept_in_a_combined_context(
    start_server, shared_data: Path, tmp_path: Path
) -> None:
    """+C proposes [Explicit LE, Explicit BE, Implicit LE] in one context: we must take Explicit LE,
    the sender's first, so the explicit file travels unchanged (pynetdicom alone would pick ours)."""
    server = start_server()
    explicit = tmp_path / "explicit.dcm"
    converted = run_tool(require_tool("dcmconv"), "+te", _tcia_files(shared_data, 1)[0], explicit)
    assert converted.returncode == 0, converted.stderr
    result = _storescu(server.port, explicit, options=("+C", "-R"))
    assert result.returncode == 0, result.stderr[-3000:]
    [inst] = server.index.instances(server.index.activity()[0].study_instance_uid)
    assert inst.transfer_syntax_uid == ExplicitVRLittleEndian
    assert dataset_part(inst.path) == dataset_part(explicit)


def test_duplicate_push_is_acknowledged_and_stored_once(
    start_server, shared_data: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = start_server()
    files = _tcia_files(shared_data, 5)
    caplog.set_level(logging.INFO, logger="scp")
    assert _storescu(server.port, *files).returncode == 0
    _wait_for_log(caplog, "association CT_SCANNER -> THIGHNODE from 127.0.0.1 released: 5 stored")
    first = {p: p.stat().st_mtime_ns for p in server.config.spool_dir.rglob("*.dcm")}
    activity = server.index.activity()
    again = _storescu(server.port, *files)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("Received Store Response (Success)") == 5
    assert {p: p.stat().st_mtime_ns for p in server.config.spool_dir.rglob("*.dcm")} == first
    assert server.index.activity() == activity
    assert activity[0].instance_count == 5
    _wait_for_log(caplog, "released: 0 stored (0.0 MB), 5 duplicates, 0 failed")


def test_calling_ae_outside_the_allow_list_is_refused(start_server, caplog: pytest.LogCaptureFixture) -> None:
    server = start_server(allowed_calling_aets=("CT_SCANNER",))
    with caplog.at_level(logging.WARNING, logger="scp"):
        refused = _echoscu(server.port, calling="INTRUDER")
    assert refused.returncode != 0
    assert "Calling AE Title Not Recognized" in refused.stderr
    [line] = [r.getMessage() for r in caplog.records if "rejected association" in r.getMessage()]
    assert "INTRUDER" in line and "127.0.0.1" in line and "calling AE not recognised" in line
    allowed = _echoscu(server.port, calling="CT_SCANNER")
    assert allowed.returncode == 0, allowed.stderr


def test_wrong_called_ae_is_refused(start_server, caplog: pytest.LogCaptureFixture) -> None:
    server = start_server()
    with caplog.at_level(logging.WARNING, logger="scp"):
        refused = _echoscu(server.port, called="ANY-SCP")
    assert refused.returncode != 0
    assert "Called AE Title Not Recognized" in refused.stderr
    [line] = [r.getMessage() for r in caplog.records if "rejected association" in r.getMessage()]
    assert "ANY-SCP" in line and "127.0.0.1" in line and "called AE not recognised" in line


def test_peer_outside_allowed_peers_is_refused(start_server, caplog: pytest.LogCaptureFixture) -> None:
    """Closed at TCP accept (scp.security), before an association slot is taken: the
    peer sees the connection end without an A-ASSOCIATE-AC."""
    refusing = start_server(allowed_peers=("10.0.0.0/8", "::1"))
    with caplog.at_level(logging.WARNING, logger="scp"):
        refused = _echoscu(refusing.port)
    assert refused.returncode != 0
    assert "Association Request Failed" in refused.stderr
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("security:")]
    assert "127.0.0.1" in line and "allowed_peers" in line
    accepting = start_server(allowed_peers=("127.0.0.0/8",))
    assert _echoscu(accepting.port).returncode == 0


def test_disk_floor_answers_out_of_resources(start_server, shared_data: Path) -> None:
    server = start_server(min_free_disk_mb=10**9)
    result = _storescu(server.port, *_tcia_files(shared_data, 1))
    assert result.returncode != 0
    assert "Refused: OutOfResources" in result.stderr
    assert "0xa700" in result.stderr.lower() or "OutOfResources" in result.stderr
    assert server.index.activity() == []
    assert list(server.config.spool_dir.rglob("*.dcm")) == []


def test_jpeg_ls_file_is_accepted_as_sent(start_server, shared_data: Path, tmp_path: Path) -> None:
    server = start_server()
    compressed = tmp_path / "jls.dcm"
    made = run_tool(require_tool("dcmcjpls"), _tcia_files(shared_data, 1)[0], compressed)
    assert made.returncode == 0, made.stderr
    assert transfer_syntax_of(compressed) == JPEGLSLossless
    result = _storescu(server.port, compressed, options=("-xt",))  # -xt: propose JPEG-LS lossless first
    assert result.returncode == 0, result.stderr[-3000:]
    [inst] = server.index.instances(server.index.activity()[0].study_instance_uid)
    assert inst.transfer_syntax_uid == JPEGLSLossless
    assert transfer_syntax_of(inst.path) == JPEGLSLossless
    assert dataset_part(inst.path) == dataset_part(compressed)


def test_non_ct_instances_are_stored_and_counted_as_excluded(start_server, tmp_path: Path) -> None:
    server = start_server()
    study, ct_series = generate_uid(), generate_uid()
    files = [
        write_ct(tmp_path / "in" / "ct1.dcm", study, ct_series),
        write_ct(tmp_path / "in" / "ct2.dcm", study, ct_series),
        write_secondary_capture(tmp_path / "in" / "sc.dcm", study, generate_uid(), modality="OT"),
        write_sr(tmp_path / "in" / "sr.dcm", study, generate_uid()),
    ]
    result = _storescu(server.port, *files)
    assert result.returncode == 0, result.stderr[-3000:]
    received = server.index.get_study(study)
    assert list(received.series) == [ct_series]
    assert len(received.series[ct_series]) == 2
    assert dict(received.excluded_counts) == {"OT": 1, "SR": 1}
    assert received.instance_count == 4
    [activity] = server.index.activity()
    assert (activity.instance_count, activity.non_ct_count) == (4, 2)
    assert len(list(server.config.spool_dir.rglob("*.dcm"))) == 4
