"""The workflow that carries one study through the pipeline and dicomout.

Stages (each logged with its duration, recorded in the job's timings):
``select`` (choose the series) → ``load`` (HU volume + LPS affine) →
``segment`` (UNETR) → later stages add measurement and the DICOM outputs.

A :class:`pipeline.errors.DeclinedError` ends the job as *declined* with the
message (the data cannot be processed); any other error ends it as *failed*.
Either way the received files stay in the spool for the retention period.
"""

from __future__ import annotations

import logging
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol

from node_errors import NodeError
from pipeline.errors import DeclinedError
from pipeline.selection import select_series
from pipeline.types import Segmentation, SelectedSeries, Volume
from pipeline.volume import load_volume
from scp.index import InstanceIndex
from thighnode.jobs import DECLINED, DONE, FAILED, Job
from thighnode.settings import Settings

log = logging.getLogger(__name__)


class SegmenterLike(Protocol):
    def segment(self, volume: Volume) -> Segmentation: ...


@dataclass(frozen=True)
class Outcome:
    """How a job ended: state (done / declined / failed), reason, timings per stage."""

    state: str
    reason: str
    series_uid: str = ""
    timings_s: dict[str, float] = field(default_factory=dict)
    result: dict[str, Any] = field(default_factory=dict)


class Workflow:
    """Runs one job end to end; shared by the worker threads (holds no per-job state)."""

    def __init__(
        self,
        settings: Settings,
        index: InstanceIndex,
        segmenter: Callable[[], SegmenterLike | None],
    ) -> None:
        self._settings = settings
        self._index = index
        self._segmenter = segmenter

    def run(self, job: Job) -> Outcome:
        timings: dict[str, float] = {}
        result: dict[str, Any] = {}
        series_uid = ""
        t0 = time.perf_counter()
        try:
            study = self._index.get_study(job.study_uid)
            result["instances"] = study.instance_count
            result["excluded_non_ct"] = dict(study.excluded_counts)
            with _stage(job, "select", timings):
                selected: SelectedSeries = select_series(
                    study.series,
                    study_instance_uid=job.study_uid,
                    max_slice_thickness_mm=self._settings.processing.max_slice_thickness_mm,
                    min_slices=self._settings.processing.min_slices,
                )
            series_uid = selected.series_instance_uid
            result["selected_series"] = {
                "series_uid": selected.series_instance_uid,
                "rule": selected.rule,
                "description": selected.description,
                "rejected": [list(r) for r in selected.rejected],
            }
            with _stage(job, "load", timings):
                volume = load_volume(selected.paths, min_slices=self._settings.processing.min_slices)
            result["volume"] = {
                "shape": list(volume.shape),
                "spacing_mm": [round(s, 4) for s in volume.spacing_mm],
            }
            segmenter = self._segmenter()
            if segmenter is not None:
                with _stage(job, "segment", timings):
                    segmentation = segmenter.segment(volume)
                result["model"] = {"name": segmentation.model_name, "version": segmentation.model_version}
            timings["total"] = round(time.perf_counter() - t0, 3)
            return Outcome(DONE, "processed", series_uid, timings, result)
        except DeclinedError as exc:
            exc.with_context(job_id=job.id, study_uid=job.study_uid)
            log.warning("job %d declined: %s", job.id, exc.message)
            timings["total"] = round(time.perf_counter() - t0, 3)
            return Outcome(DECLINED, exc.message, series_uid, timings, result)
        except NodeError as exc:
            exc.with_context(job_id=job.id, study_uid=job.study_uid)
            log.error("job %d failed: %s", job.id, exc.message)
            timings["total"] = round(time.perf_counter() - t0, 3)
            return Outcome(FAILED, exc.message, series_uid, timings, result)
        except Exception as exc:  # noqa: BLE001 - a bug must fail the job, not the worker
            log.error("job %d failed with an internal error:\n%s", job.id, traceback.format_exc())
            timings["total"] = round(time.perf_counter() - t0, 3)
            return Outcome(FAILED, f"internal error: {type(exc).__name__}: {exc}", series_uid, timings, result)


@contextmanager
def _stage(job: Job, name: str, timings: dict[str, float]) -> Iterator[None]:
    log.info("job %d: stage %s started", job.id, name)
    t = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = round(time.perf_counter() - t, 3)
        log.info("job %d: stage %s ended after %.2f s", job.id, name, timings[name])
