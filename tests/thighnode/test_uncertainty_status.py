"""Uncertainty (pipeline.uncertainty) through the workflow, in the results store and in `thighnode status`."""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from pathlib import Path

import pytest

from pipeline.types import StructureUncertainty
from tests.thighnode.test_results import _measurements
from tests.thighnode.test_workflow import phantom_study  # noqa: F401  (module fixture)
from thighnode.cli import main
from thighnode.results import ResultsStore


def test_uncertainty_round_trips_and_older_rows_load_without_it(tmp_path: Path) -> None:
    m = _measurements(500.0)
    u = StructureUncertainty("tta", 2, 0.0734, 3.25, low_confidence=True)
    m = dataclasses.replace(m, structures=(dataclasses.replace(m.structures[0], uncertainty=u),))
    db = tmp_path / "r.db"
    store = ResultsStore(db)
    common = dict(series_uid="1.2.3.9", patient_id="P1", issuer="", model_name="m", model_version="1")
    store.save(study_uid="1.2.3", job_id=1, study_date="20240101", measurements=m, **common)
    store.save(study_uid="1.2.4", job_id=2, study_date="20240601", measurements=m, **common)
    got = store.get("1.2.3")
    assert got is not None and got.measurements.structure("gluteus_maximus", "right").uncertainty == u  # type: ignore[union-attr]
    assert "uncertainty" not in got.extra
    store.close()
    # a row stored before uncertainty existed has no "uncertainty" key in extra_json
    con = sqlite3.connect(db)
    extra = json.loads(con.execute("SELECT extra_json FROM study_results WHERE study_uid = '1.2.4'").fetchone()[0])
    del extra["uncertainty"]
    con.execute("UPDATE study_results SET extra_json = ? WHERE study_uid = '1.2.4'", (json.dumps(extra),))
    con.commit()
    con.close()
    store = ResultsStore(db)
    old = store.get("1.2.4")
    assert old is not None and old.measurements.structure("gluteus_maximus", "right").uncertainty is None  # type: ignore[union-attr]
    store.close()


def test_status_shows_the_structures_flagged_low_confidence(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    from thighnode.jobs import DONE, JobStore, StudyProgress

    cfg = tmp_path / "node.toml"
    cfg.write_text(f'[node]\ndata_dir = "{tmp_path / "var"}"\n', encoding="utf-8")
    jobs = JobStore(tmp_path / "var" / "thighnode.db")
    jobs.sync([StudyProgress("1.2.3", 0.0), StudyProgress("1.2.4", 0.0)], now=100.0, quiet_period_s=1)
    uncertainty = {
        "method": "tta", "samples": 2, "threshold": {"mean_entropy": 0.1, "volume_cv_pct": 2.0},
        "low_confidence": [{"structure": "gracilis", "side": "left", "mean_entropy": 0.21, "volume_cv_pct": 4.2}],
    }
    first = jobs.claim_next()
    jobs.finish(first.id, DONE, "ok", result={"uncertainty": uncertainty})
    second = jobs.claim_next()
    jobs.finish(second.id, DONE, "ok", result={})
    jobs.close()
    assert main(["status", "--config", str(cfg)]) == 0
    assert "low confidence (tta): gracilis left" in capsys.readouterr().out
    assert main(["status", "--json", "--config", str(cfg)]) == 0
    rows = {r["study_uid"]: r for r in json.loads(capsys.readouterr().out)["jobs"]}
    assert rows["1.2.3"]["uncertainty"]["low_confidence"][0]["structure"] == "gracilis"
    assert rows["1.2.3"]["uncertainty"] == uncertainty
    assert rows["1.2.4"]["uncertainty"] == {}


class _UncertainSegmenter:
    """The phantom's truth with a TTA summary: identical samples except the gracilis on the left,
    whose volume differs between the two samples (and whose entropy is high), so only it is flagged."""

    def __init__(self, truth) -> None:  # noqa: ANN001
        self._truth = truth

    def segment(self, volume):  # noqa: ANN001, ANN201
        import numpy as np

        from pipeline.types import SIDE_LEFT
        from pipeline.uncertainty import SegmentationUncertainty, UncertaintyThresholds, bin_counts, summarise

        seg = self._truth.segment(volume)
        labels = seg.labels
        gracilis = labels.by_key("gracilis").id
        n = len(labels.labels)
        first = bin_counts(seg.label_map, seg.side_map, n)
        second = first.copy()
        second[gracilis * 3 + SIDE_LEFT] = int(first[gracilis * 3 + SIDE_LEFT] * 0.8)
        entropy = np.where((seg.label_map == gracilis) & (seg.side_map == SIDE_LEFT), 200, 5).astype(np.uint8)
        thresholds = UncertaintyThresholds(0.3, 5.0)
        structures = summarise(entropy, seg.label_map, seg.side_map, [first, second], n, thresholds=thresholds,
                               entropy_scale=1 / 255)
        return dataclasses.replace(seg, uncertainty=SegmentationUncertainty("tta", 2, structures, entropy, thresholds))


def test_a_study_with_uncertainty_records_its_low_confidence_structures(tmp_path: Path, phantom_study) -> None:  # noqa: ANN001
    import highdicom as hd

    from dicomout import codes
    from tests.support.dciodvfy import dciodvfy_errors
    from tests.support.truth import TruthSegmenter
    from tests.thighnode.test_workflow import STUDY, _run

    phantom, labels, _ = phantom_study
    segmenter = _UncertainSegmenter(TruthSegmenter({STUDY: phantom}, labels))
    _, outcome, results, _ = _run(tmp_path, phantom_study, segmenter=segmenter)
    assert outcome.result["uncertainty"]["low_confidence"] == [
        {"structure": "gracilis", "side": "left", "mean_entropy": pytest.approx(200 / 255, abs=1e-3),
         "volume_cv_pct": pytest.approx(100 / 9, abs=0.05)}]
    assert outcome.result["uncertainty"]["threshold"] == {"mean_entropy": 0.3, "volume_cv_pct": 5.0}
    stored = results.get(STUDY).measurements  # type: ignore[union-attr]
    assert stored.structure("gracilis", "left").uncertainty.low_confidence  # type: ignore[union-attr]
    assert not stored.structure("gracilis", "right").uncertainty.low_confidence  # type: ignore[union-attr]
    sr_path = next(Path(o["path"]) for o in outcome.result["outputs"] if o["kind"] == "sr")
    assert dciodvfy_errors(sr_path) == []
    flagged = [
        g.tracking_identifier for g in hd.sr.srread(sr_path).content.get_volumetric_roi_measurement_groups()
        if g.get_qualitative_evaluations(name=codes.LOW_CONFIDENCE)[0].value == codes.YES
    ]
    assert len(flagged) == 1
