"""`thighnode backfill` over a real Orthanc holding 20 phantom thigh CT studies and a real chest CT:
C-FIND by date range, C-MOVE to the running node, every study accounted for (processed, or declined
with the node's reason), a stopped run resumed without redoing finished studies, nothing sent with
--no-send, and `thighnode cohort` producing its tables over the results.

The node runs in-process with a segmenter that returns the phantoms' ground truth (the model is
tested elsewhere); the backfill runs through the CLI's own entry point."""

from __future__ import annotations

import csv
import time
from pathlib import Path

import pydicom
import pytest

from modelkit.phantom import PhantomParams, generate_phantom, write_dicom_series
from pipeline.labels import load_label_table
from tests.support.orthanc import OrthancServer
from tests.support.ports import free_port
from tests.support.truth import TruthSegmenter
from thighnode.cli import main
from thighnode.node import Node
from thighnode.settings import load_settings

pytestmark = pytest.mark.integration

N_PATIENTS = 10  # two studies each (a prior and a follow-up with atrophy): 20 thigh CT studies


def _push_phantoms(pacs: OrthancServer, tmp_path: Path) -> dict[str, object]:
    subjects = [
        generate_phantom(PhantomParams(seed=40 + k, sex="MF"[k % 2], height_m=1.60 + 0.05 * k, spacing_mm=(5.0, 4.0, 4.0)))
        for k in range(2)
    ]
    follow = [
        generate_phantom(PhantomParams(seed=40 + k, sex="MF"[k % 2], height_m=1.60 + 0.05 * k, spacing_mm=(5.0, 4.0, 4.0),
                                       atrophy={"vastus_lateralis:right": 0.85}, scan_seed=7))
        for k in range(2)
    ]
    truth: dict[str, object] = {}
    for p in range(N_PATIENTS):
        for visit, (phantoms, date) in enumerate(((subjects, f"2019{1 + p % 12:02d}10"), (follow, f"2020{1 + p % 12:02d}10"))):
            uid = f"1.2.826.0.1.3680043.8.498.7{p:02d}{visit}"
            phantom = phantoms[p % 2]
            files = write_dicom_series(
                phantom, tmp_path / "cases" / uid, patient_id=f"TN-BF-{p:03d}", patient_name=f"Backfill^P{p}",
                patient_sex="MF"[p % 2], birth_date="19500101", height_m=1.60 + 0.05 * (p % 2), study_uid=uid,
                series_uid=uid + ".1", frame_of_reference_uid=uid + ".2", study_date=date, accession=f"A{p}{visit}",
            )
            for f in files:
                pacs.upload(f)
            truth[uid] = phantom
    return truth


def _wait(predicate, timeout_s: float, what: str) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def test_backfill_accounts_for_every_study_resumes_and_feeds_the_cohort(
    tmp_path: Path, shared_data: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    node_port = free_port()
    with OrthancServer(tmp_path / "pacs", aet="PACS", modalities={"THIGHNODE": ("THIGHNODE", "127.0.0.1", node_port)}) as pacs:
        truth = _push_phantoms(pacs, tmp_path)
        chest = sorted((shared_data / "tcia-pancreas-ct" / "dcm").glob("*.dcm"))
        for f in chest:
            pacs.upload(f)
        chest_uid = str(pydicom.dcmread(chest[0], stop_before_pixels=True).StudyInstanceUID)
        in_pacs = pacs.count_instances()

        env = {
            "THIGHNODE_HOME": str(tmp_path),
            "THIGHNODE_NODE__HOST": "127.0.0.1",
            "THIGHNODE_NODE__PORT": str(node_port),
            "THIGHNODE_NODE__QUIET_PERIOD_S": "1",
            "THIGHNODE_NODE__MIN_FREE_DISK_MB": "1",
            "THIGHNODE_PRIOR__AE_TITLE": "PACS",
            "THIGHNODE_PRIOR__HOST": "127.0.0.1",
            "THIGHNODE_PRIOR__PORT": str(pacs.dicom_port),
            "THIGHNODE_DESTINATIONS": f'[{{name = "pacs", ae_title = "PACS", host = "127.0.0.1", port = {pacs.dicom_port}}}]',
        }
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        settings = load_settings(environ=env)

        # no node running: a clear error, nothing recorded
        assert main(["backfill", "--from", "20100101", "--to", "20241231"]) == 2
        assert "no node is running" in capsys.readouterr().err

        node = Node(settings, segmenter=TruthSegmenter(truth, load_label_table()))
        node.start()
        try:
            # first run: stopped after 8 studies (as a stop in the middle would)
            args = ["backfill", "--from", "20100101", "--to", "20241231", "--no-send", "--poll-s", "0.5"]
            assert main([*args, "--max-studies", "8"]) == 0
            out = capsys.readouterr().out
            assert "21 studies match" in out and "21 new" in out
            first = {s.study_uid: s.state for s in node.backfill.studies()}
            ended_first = {u for u, s in first.items() if s in ("done", "declined", "failed")}
            why = {s.study_uid: (s.state, s.reason) for s in node.backfill.studies()}
            # 8 started (a retrieval that failed under load goes back to pending and counts as started)
            assert 1 <= len(ended_first) <= 8 and sum(s == "pending" for s in first.values()) == 21 - len(ended_first), why

            # second run: the same command resumes; nothing found again is new, nothing ended is redone
            assert main(args) == 0
            out = capsys.readouterr().out
            assert "21 studies match" in out and "0 new" in out
            assert "21/21 ended: 20 done, 1 declined, 0 failed" in out
            rows = {s.study_uid: s for s in node.backfill.studies()}
            assert {u for u, s in rows.items() if s.state == "done"} == set(truth)
            assert rows[chest_uid].state == "declined" and rows[chest_uid].reason, rows[chest_uid]
            for uid, row in rows.items():  # processed once; the chest CT maybe declined before retrieval
                assert len(node.jobs.jobs(study_uid=uid)) == (0 if row.job_id is None else 1), (uid, row)
            assert all(rows[u].job_id is not None for u in truth)
            # --no-send: the outputs stayed on the node
            _wait(lambda: node.outbox.counts().get("pending", 0) == 0, 30, "the outbox")
            assert pacs.count_instances() == in_pacs
            assert all("--no-send" in node.jobs.jobs(study_uid=u)[0].reason for u in truth)
            assert main(["backfill", "--status"]) == 0
            assert f"{chest_uid}" in capsys.readouterr().out
        finally:
            node.stop()

        # the cohort tables over the backfilled studies: one row per patient's comparison
        assert main(["cohort", "--out", str(tmp_path / "cohort")]) == 0
        with open(tmp_path / "cohort" / "total_loss_by_study.csv", newline="") as f:
            totals = list(csv.DictReader(f))
        assert len({r["study_uid"] for r in totals}) == N_PATIENTS, totals[:2]  # the follow-ups, per side
        with open(tmp_path / "cohort" / "cohort_tidy.csv", newline="") as f:
            tidy = list(csv.DictReader(f))
        assert len({r["study_uid"] for r in tidy}) == 20
