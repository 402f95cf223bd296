"""The real node (`thighnode serve`) configured for DICOM TLS from its TOML file: a TLS port
beside the plain one in mutual mode, and a TLS destination (Orthanc with DICOM TLS)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from tests.conftest import require_tool
from tests.scp.dicom_factory import write_ct
from tests.support.certs import make_pki
from tests.support.node import REPO_ROOT, NodeProcess
from tests.support.orthanc import OrthancServer
from tests.support.ports import free_port, wait_for_port

pytestmark = pytest.mark.integration


def test_node_serves_tls_in_mutual_mode_and_reaches_a_tls_pacs(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    tls_port = free_port()
    with OrthancServer(tmp_path / "pacs", aet="PACS", dicom_tls=(pki.server.certificate, pki.server.private_key, pki.ca)) as pacs:
        extra = f"""
[security]
tls_port = {tls_port}
tls_certificate = "{pki.server.certificate}"
tls_private_key = "{pki.server.private_key}"
tls_ca_certificates = "{pki.ca}"
tls_require_client_certificate = true

[[destinations]]
name = "pacs"
ae_title = "PACS"
host = "127.0.0.1"
port = {pacs.dicom_port}
tls = true
"""
        with NodeProcess(tmp_path / "node", extra_config=extra) as node:
            wait_for_port(tls_port)
            echoscu = require_tool("echoscu")
            with_cert = ("+tls", str(pki.client.private_key), str(pki.client.certificate), "+cf", str(pki.ca))
            ok = subprocess.run([echoscu, *with_cert, "-aec", "THIGHNODE", "127.0.0.1", str(tls_port)], capture_output=True, text=True)
            assert ok.returncode == 0, ok.stderr
            anonymous = subprocess.run(
                [echoscu, "+tla", "+cf", str(pki.ca), "-aec", "THIGHNODE", "127.0.0.1", str(tls_port)],
                capture_output=True, text=True,
            )
            assert anonymous.returncode != 0

            study = generate_uid()
            files = [str(write_ct(tmp_path / f"ct{i}.dcm", study, "1.2.3.77")) for i in range(3)]
            stored = subprocess.run(
                [require_tool("storescu"), *with_cert, "-aec", "THIGHNODE", "127.0.0.1", str(tls_port), *files],
                capture_output=True, text=True,
            )
            assert stored.returncode == 0, stored.stderr
            status = node.wait_for(lambda s: any(st["instances"] == 3 for st in s["studies"]), what="3 instances")
            assert [st["study_uid"] for st in status["studies"] if st["instances"] == 3] == [study]

            echo_pacs = subprocess.run(
                [sys.executable, "-m", "thighnode", "echo", "pacs", "--config", str(node.config)],
                cwd=REPO_ROOT, env=node.env(), capture_output=True, text=True, timeout=60,
            )
            assert echo_pacs.returncode == 0, echo_pacs.stdout + echo_pacs.stderr
            assert "success" in echo_pacs.stdout
            log = node.log()
        assert f":{tls_port} (TLS, client certificate required)" in log
        assert "security: peer 127.0.0.1: TLS handshake refused" in log
