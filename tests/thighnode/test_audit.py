"""thighnode.audit and thighnode.audit_sinks: PS3.15 A.5 messages, the 0600 file with rotation, syslog RFC 5424
over real UDP and TCP listeners."""

from __future__ import annotations

import base64
import re
import socket
import stat
import threading
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tests.support.audit_schema import schema_errors
from thighnode.audit import AuditTrail, Recipient
from thighnode.audit_sinks import AuditFile, SyslogSender

CT = "1.2.840.10008.5.1.4.1.1.2"
SEG = "1.2.840.10008.5.1.4.1.1.66.4"
STUDY = "1.2.826.0.1.3680043.8.498.77001"
T0 = 1_800_000_000.25  # 2027-01-15T08:00:00.250Z


class Memory:
    """A sink that keeps what it is given (the file and syslog sinks are tested on their own below)."""

    def __init__(self) -> None:
        self.messages: list[str] = []

    def emit(self, message: str) -> None:
        self.messages.append(message)

    def close(self) -> None:
        pass


def _trail() -> tuple[AuditTrail, Memory]:
    memory = Memory()
    return AuditTrail("THIGHNODE", [memory], host_name="node1.example", clock=lambda: T0), memory


def _code(el: ET.Element | None) -> tuple[str | None, str | None, str | None]:
    assert el is not None
    return el.get("csd-code"), el.get("codeSystemName"), el.get("originalText")


def _every_event(trail: AuditTrail) -> None:
    trail.application_started()
    trail.instances_received(STUDY, "PID-1", {CT: 120, SEG: 1}, "CTSCANNER", "10.0.0.7", patient_name="Doe^Jane")
    trail.results_sent(STUDY, "PID-1", Recipient("pacs", "PACS", "10.0.0.9", 104), {SEG: 1}, patient_name="Doe^Jane")
    trail.association_refused("10.0.0.66", "INTRUDER", "calling AE not recognised")
    trail.security_alert("10.0.0.66", "TLS handshake failed: certificate unknown")
    trail.application_stopped()


def test_every_message_is_one_line_valid_against_the_ps3_15_a5_schema() -> None:
    trail, memory = _trail()
    _every_event(trail)
    assert len(memory.messages) == 6
    for message in memory.messages:
        assert "\n" not in message
        assert schema_errors(message) == [], message


def test_the_schema_checker_catches_what_breaks_the_schema() -> None:
    trail, memory = _trail()
    trail.association_refused("10.0.0.66", "INTRUDER", "x")
    good = memory.messages[0]
    assert schema_errors(good.replace('EventOutcomeIndicator="4"', 'EventOutcomeIndicator="3"'))
    assert schema_errors(good.replace("<EventID ", "<EventId "))
    root = ET.fromstring(good)
    source = root.find("AuditSourceIdentification")
    assert source is not None
    root.remove(source)
    root.insert(1, source)  # before the participants
    assert any("misplaced" in e for e in schema_errors(ET.tostring(root, encoding="unicode")))


def test_application_start_and_stop() -> None:
    trail, memory = _trail()
    trail.application_started()
    trail.application_stopped()
    for message, event_type in zip(memory.messages, ("110120", "110121"), strict=True):
        root = ET.fromstring(message)
        ident = root.find("EventIdentification")
        assert ident is not None
        assert (ident.get("EventActionCode"), ident.get("EventOutcomeIndicator")) == ("E", "0")
        assert ident.get("EventDateTime") == "2027-01-15T08:00:00.250Z"
        assert _code(ident.find("EventID")) == ("110100", "DCM", "Application Activity")
        assert _code(ident.find("EventTypeCode"))[0] == event_type
        (us,) = root.findall("ActiveParticipant")
        assert us.get("UserID") == "THIGHNODE" and us.get("AlternativeUserID", "").startswith("AETITLES=THIGHNODE")
        assert _code(us.find("RoleIDCode"))[0] == "110150"
        source = root.find("AuditSourceIdentification")
        assert source is not None and source.get("AuditSourceID") == "THIGHNODE@node1.example"


def test_instances_received_names_the_peer_the_study_its_sop_classes_and_the_patient() -> None:
    trail, memory = _trail()
    trail.instances_received(STUDY, "PID-1", {CT: 120, SEG: 1}, "CTSCANNER", "10.0.0.7", patient_name="Doe^Jane")
    root = ET.fromstring(memory.messages[0])
    ident = root.find("EventIdentification")
    assert ident is not None and ident.get("EventActionCode") == "C"
    assert _code(ident.find("EventID")) == ("110104", "DCM", "DICOM Instances Transferred")
    source, dest = root.findall("ActiveParticipant")
    assert (source.get("UserID"), source.get("UserIsRequestor"), source.get("NetworkAccessPointID")) == (
        "CTSCANNER", "true", "10.0.0.7")
    assert source.get("NetworkAccessPointTypeCode") == "2"
    assert _code(source.find("RoleIDCode"))[0] == "110153"
    assert (dest.get("UserID"), dest.get("UserIsRequestor")) == ("THIGHNODE", "false")
    assert _code(dest.find("RoleIDCode"))[0] == "110152"
    study, patient = root.findall("ParticipantObjectIdentification")
    assert study.get("ParticipantObjectID") == STUDY
    assert (study.get("ParticipantObjectTypeCode"), study.get("ParticipantObjectTypeCodeRole")) == ("2", "3")
    assert _code(study.find("ParticipantObjectIDTypeCode")) == ("110180", "DCM", "Study Instance UID")
    sops = {s.get("UID"): s.get("NumberOfInstances") for s in study.iter("SOPClass")}
    assert sops == {CT: "120", SEG: "1"}
    assert patient.get("ParticipantObjectID") == "PID-1"
    assert (patient.get("ParticipantObjectTypeCode"), patient.get("ParticipantObjectTypeCodeRole")) == ("1", "1")
    assert _code(patient.find("ParticipantObjectIDTypeCode")) == ("2", "RFC-3881", "Patient Number")
    assert patient.findtext("ParticipantObjectName") == "Doe^Jane"


def test_results_sent_is_a_read_transfer_from_us_to_the_destination() -> None:
    trail, memory = _trail()
    trail.results_sent(STUDY, "PID-1", Recipient("pacs", "PACS", "10.0.0.9", 104), {SEG: 1})
    root = ET.fromstring(memory.messages[0])
    ident = root.find("EventIdentification")
    assert ident is not None and ident.get("EventActionCode") == "R"
    us, dest = root.findall("ActiveParticipant")
    assert (us.get("UserID"), us.get("UserIsRequestor"), _code(us.find("RoleIDCode"))[0]) == ("THIGHNODE", "true", "110153")
    assert (dest.get("UserID"), dest.get("NetworkAccessPointID"), _code(dest.find("RoleIDCode"))[0]) == (
        "PACS", "10.0.0.9", "110152")
    assert [p.get("ParticipantObjectID") for p in root.findall("ParticipantObjectIdentification")] == [STUDY, "PID-1"]


def test_refused_association_is_a_failed_user_authentication_and_a_security_alert_names_the_peer() -> None:
    trail, memory = _trail()
    trail.association_refused("10.0.0.66", "INTRUDER", "calling AE not recognised")
    trail.security_alert("10.0.0.66", "peer address 10.0.0.66 not in allowed_peers")
    refused, alert = (ET.fromstring(m) for m in memory.messages)
    ident = refused.find("EventIdentification")
    assert ident is not None
    assert _code(ident.find("EventID"))[0] == "110114" and _code(ident.find("EventTypeCode"))[0] == "110122"
    assert ident.get("EventOutcomeIndicator") == "4"
    assert ident.findtext("EventOutcomeDescription") == "association refused: calling AE not recognised"
    peer = refused.findall("ActiveParticipant")[0]
    assert (peer.get("UserID"), peer.get("NetworkAccessPointID"), peer.get("UserIsRequestor")) == (
        "INTRUDER", "10.0.0.66", "true")
    ident = alert.find("EventIdentification")
    assert ident is not None
    assert _code(ident.find("EventID"))[0] == "110113" and _code(ident.find("EventTypeCode"))[0] == "110126"
    assert ident.get("EventOutcomeIndicator") == "8"
    (subject,) = alert.findall("ParticipantObjectIdentification")
    assert subject.get("ParticipantObjectID") == "dicom://10.0.0.66"
    detail = subject.find("ParticipantObjectDetail")
    assert detail is not None and detail.get("type") == "Alert Description"
    assert base64.b64decode(detail.get("value", "")).decode() == "peer address 10.0.0.66 not in allowed_peers"


def test_text_with_markup_and_line_breaks_stays_one_well_formed_line() -> None:
    trail, memory = _trail()
    trail.security_alert("10.0.0.66", 'bad <cert> & "name"\nsecond line')
    assert "\n" not in memory.messages[0] and schema_errors(memory.messages[0]) == []
    ident = ET.fromstring(memory.messages[0]).find("EventIdentification")
    assert ident is not None and ident.findtext("EventOutcomeDescription") == 'bad <cert> & "name" second line'


def test_file_is_created_0600_in_a_0700_folder_appended_and_rotated(tmp_path: Path) -> None:
    path = tmp_path / "audit" / "audit.log"
    sink = AuditFile(path, max_bytes=2000, keep=2)
    trail = AuditTrail("THIGHNODE", [sink], host_name="node1", clock=lambda: T0)
    trail.application_started()
    sink.close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    trail.application_stopped()  # reopens and appends
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 2 and "110120" in lines[0] and "110121" in lines[1]
    for _ in range(12):  # ~1.3 kB each: rotates several times, keeps 2 old files
        trail.security_alert("10.0.0.66", "x" * 100)
    sink.close()
    rotated = sorted(p.name for p in path.parent.iterdir())
    assert rotated == ["audit.log", "audit.log.1", "audit.log.2"]
    for p in path.parent.iterdir():
        assert p.stat().st_size <= 2000
        assert all(schema_errors(line) == [] for line in p.read_text(encoding="utf-8").splitlines())
        assert stat.S_IMODE(p.stat().st_mode) == 0o600


_RFC5424 = re.compile(
    rb"^<(?P<pri>\d{1,3})>1 (?P<ts>\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{1,6}Z) (?P<host>[!-~]{1,255}) "
    rb"(?P<app>[!-~]{1,48}) (?P<procid>[!-~]{1,128}) (?P<msgid>[!-~]{1,32}) - \xef\xbb\xbf(?P<msg>.*)$",
    re.DOTALL,
)


def _check_frame(frame: bytes) -> ET.Element:
    match = _RFC5424.match(frame)
    assert match is not None, frame[:120]
    assert int(match["pri"]) == 10 * 8 + 5  # authpriv.notice
    assert (match["host"], match["app"], match["msgid"]) == (b"node1.example", b"thighnode", b"IHE+RFC-3881")
    assert match["procid"].isdigit()
    message = match["msg"].decode("utf-8")
    assert schema_errors(message) == []
    return ET.fromstring(message)


def test_syslog_over_udp_sends_one_rfc_5424_datagram_per_message() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.settimeout(10)
        sender = SyslogSender("127.0.0.1", listener.getsockname()[1], "udp", host_name="node1.example")
        trail = AuditTrail("THIGHNODE", [sender], host_name="node1.example")
        trail.application_started()
        trail.association_refused("10.0.0.66", "INTRUDER", "calling AE not recognised")
        frames = [listener.recv(65535), listener.recv(65535)]
        trail.close()
    events = [_check_frame(f).find("EventIdentification/EventID") for f in frames]
    assert [e.get("csd-code") for e in events if e is not None] == ["110100", "110114"]


def _tcp_listener() -> tuple[socket.socket, list[bytes], threading.Thread]:
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(10)
    received: list[bytes] = []

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            conn.settimeout(10)
            while chunk := conn.recv(65536):
                received.append(chunk)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return server, received, thread


def _octet_frames(stream: bytes) -> list[bytes]:
    """RFC 6587 3.4.1 octet counting: MSG-LEN SP SYSLOG-MSG, repeated."""
    frames = []
    while stream:
        length, _, rest = stream.partition(b" ")
        assert length.isdigit() and not length.startswith(b"0"), stream[:20]
        frames.append(rest[: int(length)])
        assert len(frames[-1]) == int(length)
        stream = rest[int(length):]
    return frames


def test_syslog_over_tcp_uses_octet_counting_framing() -> None:
    server, received, thread = _tcp_listener()
    try:
        sender = SyslogSender("127.0.0.1", server.getsockname()[1], "tcp", host_name="node1.example")
        trail = AuditTrail("THIGHNODE", [sender], host_name="node1.example")
        trail.application_started()
        trail.instances_received(STUDY, "PID-1", {CT: 3}, "CTSCANNER", "10.0.0.7", patient_name="Doe^Jane")
        trail.close()
        thread.join(timeout=10)
    finally:
        server.close()
    frames = _octet_frames(b"".join(received))
    assert len(frames) == 2
    roots = [_check_frame(f) for f in frames]
    assert roots[1].find("ParticipantObjectIdentification[@ParticipantObjectID='PID-1']") is not None


def test_an_unreachable_syslog_does_not_stop_the_file_and_is_logged_without_phi(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    path = tmp_path / "audit.log"
    trail = AuditTrail("THIGHNODE", [SyslogSender("127.0.0.1", port, "tcp", timeout_s=1), AuditFile(path)])
    trail.instances_received(STUDY, "CANARY-ID-9", {CT: 1}, "CTSCANNER", "10.0.0.7", patient_name="Canary^Name")
    trail.close()
    assert "CANARY-ID-9" in path.read_text(encoding="utf-8")
    assert "not recorded by SyslogSender" in caplog.text
    assert "CANARY" not in caplog.text and "Canary" not in caplog.text
