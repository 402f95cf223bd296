"""A prior that exists only in the PACS is found by C-FIND, retrieved with C-MOVE, measured, and the
follow-up is reprocessed with the comparison; the results in the PACS are replaced, not duplicated.

Runs the node in-process with a segmenter that returns the phantoms' ground truth, so the
comparison can be checked against the known atrophy (the model is tested elsewhere)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import highdicom as hd
import pytest

from pipeline.labels import load_label_table
from modelkit.phantom import PhantomParams, generate_phantom, write_dicom_series
from tests.conftest import require_tool
from tests.support.orthanc import OrthancServer
from tests.support.ports import free_port
from tests.support.truth import TruthSegmenter
from thighnode.node import Node
from thighnode.settings import load_settings

pytestmark = pytest.mark.integration

PRIOR = "1.2.826.0.1.3680043.8.498.55001"
FOLLOW = "1.2.826.0.1.3680043.8.498.55002"
ATROPHY = {"vastus_lateralis:right": 0.8, "gluteus_maximus:right": 0.9}


def _study(phantom, out: Path, study_uid: str, date: str) -> list[Path]:  # noqa: ANN001
    return write_dicom_series(
        phantom, out, patient_id="TN-PRIOR-7", patient_name="Prior^Test", patient_sex="M", birth_date="19480101",
        height_m=1.75, study_uid=study_uid, series_uid=study_uid + ".1", frame_of_reference_uid=study_uid + ".2",
        study_date=date, accession=date,
    )


def test_prior_only_in_pacs_is_retrieved_measured_and_compared(tmp_path: Path) -> None:
    storescu = require_tool("storescu")
    labels = load_label_table()
    params = dict(seed=21, sex="M", height_m=1.75, spacing_mm=(4.0, 3.0, 3.0))
    prior = generate_phantom(PhantomParams(**params))
    follow = generate_phantom(PhantomParams(**params, atrophy=ATROPHY, scan_seed=99))
    prior_files = _study(prior, tmp_path / "prior", PRIOR, "20240105")
    follow_files = _study(follow, tmp_path / "follow", FOLLOW, "20240410")

    node_port = free_port()
    with OrthancServer(tmp_path / "pacs", aet="PACS", modalities={"THIGHNODE": ("THIGHNODE", "127.0.0.1", node_port)}) as pacs:
        for f in prior_files:
            pacs.upload(f)
        assert pacs.count_instances() == len(prior_files)
        env = {
            "THIGHNODE_HOME": str(tmp_path),
            "THIGHNODE_NODE__HOST": "127.0.0.1",
            "THIGHNODE_NODE__PORT": str(node_port),
            "THIGHNODE_NODE__QUIET_PERIOD_S": "1",
            "THIGHNODE_NODE__MIN_FREE_DISK_MB": "1",
            "THIGHNODE_OUTBOX__SEND_INTERVAL_S": "0.5",
            "THIGHNODE_PRIOR__QUERY": "true",
            "THIGHNODE_PRIOR__AE_TITLE": "PACS",
            "THIGHNODE_PRIOR__PORT": str(pacs.dicom_port),
            "THIGHNODE_DESTINATIONS": f'[{{name = "pacs", ae_title = "PACS", host = "127.0.0.1", port = {pacs.dicom_port}}}]',
        }
        settings = load_settings(environ=env)
        node = Node(settings, segmenter=TruthSegmenter({PRIOR: prior, FOLLOW: follow}, labels))
        node.start()
        try:
            sent = subprocess.run(
                [storescu, "-aet", "CTSCANNER", "-aec", "THIGHNODE", "127.0.0.1", str(node_port), *map(str, follow_files)],
                capture_output=True, text=True, timeout=120,
            )
            assert sent.returncode == 0, sent.stderr
            deadline = time.monotonic() + 300
            comparison = None
            while time.monotonic() < deadline:
                comparison = node.results.comparison(FOLLOW)
                jobs = node.jobs.jobs(study_uid=FOLLOW)
                if comparison is not None and jobs and jobs[0].state == "done" and node.outbox.counts().get("pending", 0) == 0:
                    break
                time.sleep(0.5)
            follow_jobs = node.jobs.jobs(study_uid=FOLLOW)
            prior_jobs = node.jobs.jobs(study_uid=PRIOR)
        finally:
            node.stop()

        assert comparison is not None, [(j.state, j.reason, j.result.get("prior")) for j in follow_jobs]
        # The first job said where it looked; the prior was retrieved and processed; the follow-up reprocessed.
        assert [j.state for j in follow_jobs] == ["done", "done"]
        first = follow_jobs[-1].result["prior"]
        assert first["found"] is False and any("PACS" in w for w in first["looked_in"])
        assert prior_jobs and prior_jobs[0].state == "done"
        assert "not sent" in prior_jobs[0].reason
        assert comparison.prior_study_uid == PRIOR
        assert comparison.interval_days == 96

        # The losses match the known atrophy on the right only.
        for key, kept in (("vastus_lateralis", 0.8), ("gluteus_maximus", 0.9)):
            right = comparison.change(key, "right")
            left = comparison.change(key, "left")
            assert right is not None and right.compared, right
            assert right.change_ratio == pytest.approx(kept - 1.0, abs=0.02)
            assert left is not None and abs(left.change_ratio) < 0.01

        # The PACS holds the follow-up's SEG, SR and PDF once (the second version replaced the first),
        # and none of the prior's outputs.
        modalities = {}
        for iid in pacs.instances():
            tags = pacs.get_json(f"/instances/{iid}/simplified-tags")
            if tags.get("Modality") in ("SEG", "SR", "DOC"):
                modalities.setdefault(tags["StudyInstanceUID"], []).append(tags["Modality"])
        assert sorted(modalities.get(FOLLOW, [])) == ["DOC", "SEG", "SR"]
        assert PRIOR not in modalities
        sr_id = next(
            iid for iid in pacs.instances()
            if pacs.get_json(f"/instances/{iid}/simplified-tags").get("Modality") == "SR"
        )
        sr_path = tmp_path / "sr.dcm"
        sr_path.write_bytes(pacs.get_bytes(f"/instances/{sr_id}/file"))
        sr = hd.sr.srread(sr_path)
        assert PRIOR in str(sr)
