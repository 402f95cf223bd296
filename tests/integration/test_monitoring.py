"""The audit trail and the metrics endpoint of a real `thighnode serve`: dcmtk storescu pushes a study, the
node sends its results to a real Orthanc, a stranger is refused; the audit file tells the study's life in
order with the PS3.15 A.5 codes, and holds the canary patient's name and ID, which the application log
does not (nor the birth date); /metrics counts what happened."""

from __future__ import annotations

import json
import stat
import subprocess
import urllib.request
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from modelkit.phantom import PhantomParams, generate_phantom, write_dicom_series
from tests.conftest import require_tool
from tests.support.audit_schema import schema_errors
from tests.support.node import NodeProcess
from tests.support.orthanc import OrthancServer
from tests.support.ports import free_port, wait_for_port
from tests.support.prometheus import parse_exposition, value
from tests.support.synthetic_ct import DEFAULT_PATIENT, write_ct_series

pytestmark = pytest.mark.integration

CT = "1.2.840.10008.5.1.4.1.1.2"
SEG = "1.2.840.10008.5.1.4.1.1.66.4"
SR_3D = "1.2.840.10008.5.1.4.1.1.88.34"
PDF = "1.2.840.10008.5.1.4.1.1.104.1"
CANARY_NAME, CANARY_ID, CANARY_BIRTH = "Canaryname^Tweety", "CANARY-PID-4711", "19310704"


def _push(port: int, files: list[Path], calling: str = "CTSCANNER") -> None:
    done = subprocess.run(
        [require_tool("storescu"), "-aet", calling, "-aec", "THIGHNODE", "127.0.0.1", str(port), *map(str, files)],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr


def _echo_refused(port: int, calling: str) -> None:
    done = subprocess.run([require_tool("echoscu"), "-aet", calling, "-aec", "THIGHNODE", "127.0.0.1", str(port)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "reject" in (done.stdout + done.stderr).lower()


def _events(audit_file: Path) -> list[ET.Element]:
    lines = audit_file.read_text(encoding="utf-8").splitlines()
    for line in lines:
        assert schema_errors(line) == [], line
    return [ET.fromstring(line) for line in lines]


def _summary(root: ET.Element) -> tuple[str, str, str]:
    """(EventID code, EventTypeCode code or "", EventActionCode) of one message."""
    ident = root.find("EventIdentification")
    assert ident is not None
    event_id, event_type = ident.find("EventID"), ident.find("EventTypeCode")
    assert event_id is not None
    return (event_id.get("csd-code", ""), "" if event_type is None else event_type.get("csd-code", ""),
            ident.get("EventActionCode", ""))


def _sop_counts(root: ET.Element) -> dict[str, int]:
    return {s.get("UID", ""): int(s.get("NumberOfInstances", "0")) for s in root.iter("SOPClass")}


def _objects(root: ET.Element) -> dict[str, str]:
    """ParticipantObjectIDTypeCode code -> ParticipantObjectID."""
    out = {}
    for obj in root.findall("ParticipantObjectIdentification"):
        code = obj.find("ParticipantObjectIDTypeCode")
        assert code is not None
        out[code.get("csd-code", "")] = obj.get("ParticipantObjectID", "")
    return out


def _scrape(port: int, path: str) -> tuple[int, str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
        return response.status, response.read().decode()


def test_metrics_count_a_received_study_and_health_is_ok(tmp_path: Path) -> None:
    study = "1.2.826.0.1.3680043.8.498.99001"
    files = write_ct_series(tmp_path / "in", n_slices=24, rows=48, cols=48, study_uid=study, seed=5)
    metrics_port = free_port()
    extra = f'[metrics]\nenabled = true\nport = {metrics_port}\n'
    with NodeProcess(tmp_path / "node", extra_config=extra) as node:
        wait_for_port(metrics_port)  # the endpoint starts after the DICOM listener NodeProcess waits for
        status, body = _scrape(metrics_port, "/healthz")
        assert status == 200 and json.loads(body) == {"status": "ok", "listener": True, "scheduler": True}
        _push(node.port, files)
        _push(node.port, files[:3])  # duplicates: acknowledged, not counted
        node.wait_for(lambda s: any(j["state"] == "done" for j in s["jobs"]), what="the study's job")
        status, text = _scrape(metrics_port, "/metrics")
    assert status == 200
    samples = parse_exposition(text)
    assert value(samples, "thighnode_instances_received_total") == len(files)
    assert value(samples, "thighnode_jobs", state="done") == 1
    assert value(samples, "thighnode_jobs", state="failed") == 0
    assert value(samples, "thighnode_stage_duration_seconds_count", stage="select") == 1
    assert value(samples, "thighnode_stage_duration_seconds_sum", stage="total") > 0
    assert value(samples, "thighnode_outbox_oldest_age_seconds") == 0  # no destination, nothing queued
    assert value(samples, "thighnode_disk_free_bytes", path=str(node.data_dir)) > 0
    assert value(samples, "thighnode_up", component="listener") == 1
    assert not [k for k in samples if k[0] == "thighnode_outbox_backlog"]
    for secret in (DEFAULT_PATIENT["PatientName"], DEFAULT_PATIENT["PatientID"]):
        assert secret not in text


@pytest.fixture(scope="module")
def canary_study(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[Path]]:
    study = "1.2.826.0.1.3680043.8.498.99101"
    phantom = generate_phantom(PhantomParams(seed=12, sex="F", height_m=1.65, spacing_mm=(3.0, 2.0, 2.0)))
    files = write_dicom_series(
        phantom, tmp_path_factory.mktemp("canary") / "ct", patient_id=CANARY_ID, patient_name=CANARY_NAME,
        patient_sex="F", birth_date=CANARY_BIRTH, height_m=1.65, study_uid=study, series_uid=study + ".1",
        frame_of_reference_uid=study + ".2", study_date="20240612", accession="CANARY1",
    )
    return study, files


def test_a_study_life_is_in_the_audit_file_in_order_and_its_phi_not_in_the_log(
    tmp_path: Path, canary_study: tuple[str, list[Path]]
) -> None:
    study, files = canary_study
    with OrthancServer(tmp_path / "pacs", aet="PACS") as pacs:
        # Uncertainty off: one inference pass; what is audited does not depend on it.
        extra = (f'[model]\nuncertainty = "off"\n[security]\nallowed_calling_aets = ["CTSCANNER"]\n'
                 f'[[destinations]]\nname = "pacs"\nae_title = "PACS"\nhost = "127.0.0.1"\nport = {pacs.dicom_port}\n')
        with NodeProcess(tmp_path / "node", extra_config=extra, load_model=True) as node:
            _push(node.port, files)
            node.wait_for(
                lambda s: any(j["state"] == "done" for j in s["jobs"]) and s["outbox_counts"].get("sent", 0) >= 3
                and s["outbox_counts"].get("pending", 0) == 0,
                timeout_s=900, what="the study's results in the PACS",
            )
            _echo_refused(node.port, "INTRUDER")
        app_log = node.log()
    audit_file = node.data_dir / "audit" / "audit.log"
    assert stat.S_IMODE(audit_file.stat().st_mode) == 0o600
    events = _events(audit_file)
    summaries = [_summary(e) for e in events]
    sent_code = ("110104", "", "R")
    # The results may leave in more than one outbox batch: one "sent" message per batch; collapse them.
    collapsed = [s for i, s in enumerate(summaries) if not (i and s == summaries[i - 1] == sent_code)]
    assert collapsed == [
        ("110100", "110120", "E"),  # Application Activity: Application Start
        ("110104", "", "C"),        # DICOM Instances Transferred: received
        sent_code,                  # DICOM Instances Transferred: results sent
        ("110114", "110122", "E"),  # User Authentication: Login refused
        ("110113", "110126", "E"),  # Security Alert: Node Authentication
        ("110100", "110121", "E"),  # Application Activity: Application Stop
    ]
    received, (refused, alert, _stop) = events[1], events[-3:]
    sent_all = [e for e, s in zip(events, summaries) if s == sent_code]
    assert _objects(received) == {"110180": study, "2": CANARY_ID}
    assert _sop_counts(received) == {CT: len(files)}
    assert received.find("ParticipantObjectIdentification/ParticipantObjectName").text == CANARY_NAME  # type: ignore[union-attr]
    assert received.findall("ActiveParticipant")[0].get("UserID") == "CTSCANNER"
    sent_counts: dict[str, int] = {}
    for message in sent_all:
        assert _objects(message) == {"110180": study, "2": CANARY_ID}
        assert message.findall("ActiveParticipant")[1].get("UserID") == "PACS"
        for uid, n in _sop_counts(message).items():
            sent_counts[uid] = sent_counts.get(uid, 0) + n
    assert sent_counts == {SEG: 1, SR_3D: 1, PDF: 1}
    assert refused.findall("ActiveParticipant")[0].get("UserID") == "INTRUDER"
    assert refused.findtext("EventIdentification/EventOutcomeDescription") == "association refused: calling AE not recognised"
    assert alert.findall("ActiveParticipant")[1].get("NetworkAccessPointID") == "127.0.0.1"
    # The audit trail is PHI-bearing; the application log is not.
    assert "INTRUDER" in app_log and study in app_log
    for secret in (CANARY_NAME, "Canaryname", CANARY_ID, CANARY_BIRTH):
        assert secret not in app_log, secret
