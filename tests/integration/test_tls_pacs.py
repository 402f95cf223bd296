"""Orthanc as a DICOM TLS PACS (PS3.15 Annex B): the node's results sent over TLS, the prior
source queried over TLS, and a PACS certificate we do not trust refused."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from dicomout.sender import Destination, send_files
from scp.pacs import QuerySource
from scp.query import find_studies
from scp.tls import TlsConfig
from tests.scp.dicom_factory import write_ct
from tests.support.certs import Pki, make_pki
from tests.support.orthanc import OrthancServer

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tls_orthanc(tmp_path_factory: pytest.TempPathFactory, pki: Pki):
    """Orthanc with DICOM TLS only, client certificates required from our CA."""
    with OrthancServer(
        tmp_path_factory.mktemp("orthanc"),
        dicom_tls=(pki.server.certificate, pki.server.private_key, pki.ca),
        modalities={"THIGHNODE": ("THIGHNODE", "127.0.0.1", 104)},  # Orthanc answers C-FIND to known AEs only
    ) as orthanc:
        yield orthanc


def _node_tls(pki: Pki, trust: Path | None = None) -> TlsConfig:
    """The node's identity (a certificate from the CA, as a site would issue it)."""
    return TlsConfig(pki.client.certificate, pki.client.private_key, trust or pki.ca)


def _destination(orthanc: OrthancServer, tls: TlsConfig | None) -> Destination:
    return Destination("pacs", orthanc.aet, "127.0.0.1", orthanc.dicom_port, "THIGHNODE", timeout_s=15.0, tls=tls)


def test_results_are_stored_in_orthanc_over_tls(tls_orthanc: OrthancServer, pki: Pki, tmp_path: Path) -> None:
    study = generate_uid()
    files = [write_ct(tmp_path / f"r{i}.dcm", study, "1.2.3.9") for i in range(3)]
    results = send_files(files, _destination(tls_orthanc, _node_tls(pki)))
    assert [r.ok for r in results] == [True, True, True], results
    assert {r.sop_instance_uid for r in results} <= tls_orthanc.sop_instance_uids()


def test_pacs_with_an_untrusted_certificate_gets_nothing(tls_orthanc: OrthancServer, pki: Pki, tmp_path: Path) -> None:
    files = [write_ct(tmp_path / "u.dcm", generate_uid(), "1.2.3.10")]
    before = tls_orthanc.count_instances()
    [result] = send_files(files, _destination(tls_orthanc, _node_tls(pki, trust=pki.foreign_ca)))
    assert not result.ok
    assert tls_orthanc.count_instances() == before


def test_plain_sender_is_not_served_by_a_tls_pacs(tls_orthanc: OrthancServer, tmp_path: Path) -> None:
    files = [write_ct(tmp_path / "p.dcm", generate_uid(), "1.2.3.11")]
    before = tls_orthanc.count_instances()
    [result] = send_files(files, _destination(tls_orthanc, None))
    assert not result.ok
    assert tls_orthanc.count_instances() == before


def test_prior_source_is_queried_over_tls(tls_orthanc: OrthancServer, pki: Pki, tmp_path: Path) -> None:
    study = generate_uid()
    path = write_ct(tmp_path / "q.dcm", study, "1.2.3.12")
    tls_orthanc.upload(path)
    patient_id = "SYNTH-1"  # tests.scp.dicom_factory's patient
    source = QuerySource(
        "prior source", tls_orthanc.aet, "127.0.0.1", tls_orthanc.dicom_port, "THIGHNODE",
        method="get", timeout_s=15.0, tls=_node_tls(pki),
    )
    found = find_studies(source, patient_id=patient_id, modality="")
    assert study in {m.study_instance_uid for m in found}
