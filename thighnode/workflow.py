"""The workflow that carries one study through the pipeline and dicomout.

Stages, each logged with its duration and recorded in the job's timings::

    select → load → check (the field of view) → segment → measure → compare → outputs → queue

The check (:func:`pipeline.coverage.check_field_of_view`) finds the body regions the series
covers and declines it unless the ``[processing]`` policy accepts one of them; after the
model, a segmentation without a femur is declined too. The regions seen, those the
segmentation supports and the policy are recorded in the job's result (``coverage``).

The outputs are plug-ins (:mod:`dicomout.outputs`), built in the order of ``[outputs]
enabled`` (by default seg → sr → pdf, one stage each) from one
:class:`dicomout.context.StudyContext`; an output that another needs (the SEG, for the
SR) is built and written even when it is not enabled, but only enabled ones are queued.

A :class:`pipeline.errors.DeclinedError` ends the job as *declined* with the message
(the data cannot be processed: tilt, gaps, no hip or femur in the field of view...); nothing is sent. Any
other error ends it as *failed*. Either way the received files stay in the spool for
the retention period.

Outputs are written under ``<data_dir>/outputs/<StudyInstanceUID>/`` (``<name>_<SOPInstanceUID>.dcm``) with UIDs derived
from the source series and the model version (reprocessing replaces them in the PACS),
then queued in the outbox for every configured destination. The job is marked done only
after that, so a crash before it re-runs the job and re-queues the same objects.
"""

from __future__ import annotations

import logging
import os
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Iterator, Protocol

import pydicom

from dicomout.context import ModelInfo, OutputSettings, StudyContext
from dicomout.outputs import plan_outputs
from node_errors import NodeError
from pipeline.bodypart import femur_label_volumes_ml
from pipeline.coverage import CoveragePolicy, check_field_of_view, regions_from_segmentation
from pipeline.errors import DeclinedError
from pipeline.measure import MeasurementSettings, load_measurement_settings, measure
from pipeline.selection import select_series
from pipeline.compare import anatomical_profiles
from pipeline.types import (
    SIDE_BOTH,
    Comparison,
    Measurements,
    PatientInfo,
    PriorSearch,
    Segmentation,
    SelectedSeries,
    Volume,
)
from pipeline.uncertainty import SegmentationUncertainty
from pipeline.volume import load_volume
from scp.index import InstanceIndex
from thighnode import __version__
from thighnode.jobs import DECLINED, DONE, FAILED, Job
from thighnode.priors import PriorFinder
from thighnode.results import ResultsStore
from thighnode.settings import Settings

log = logging.getLogger(__name__)


def _utc_now() -> datetime:
    return datetime.now(timezone.utc)


class SegmenterLike(Protocol):
    def segment(self, volume: Volume) -> Segmentation: ...


class OutboxLike(Protocol):
    def enqueue(
        self, path: Path, destination: str, *, job_id: int, study_uid: str, sop_class_uid: str, sop_instance_uid: str
    ) -> int: ...


@dataclass(frozen=True)
class Outcome:
    """How a job ended: state (done / declined / failed), reason, timings per stage."""

    state: str
    reason: str
    series_uid: str = ""
    timings_s: dict[str, float] = field(default_factory=dict)
    result: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class OutputFile:
    kind: str  # the output builder's name: "seg", "sr", "pdf", ...
    path: Path
    sop_class_uid: str
    sop_instance_uid: str


class Workflow:
    """Runs one job end to end; shared by the worker threads (holds no per-job state)."""

    def __init__(
        self,
        settings: Settings,
        index: InstanceIndex,
        segmenter: Callable[[], SegmenterLike | None],
        *,
        results: ResultsStore | None = None,
        outbox: OutboxLike | None = None,
        measurement_settings: MeasurementSettings | None = None,
        priors: PriorFinder | None = None,
        clock: Callable[[], datetime] = _utc_now,
    ) -> None:
        self._settings = settings
        self._index = index
        self._segmenter = segmenter
        self._results = results
        self._outbox = outbox
        self._priors = priors
        self._clock = clock  # the outputs' content time
        out = settings.outputs
        self._output_settings = OutputSettings(
            seg_type=out.seg_type, labelmap_compression=out.labelmap_compression, manufacturer=out.manufacturer,
            institution_name=out.institution_name, device_serial=out.device_serial,
        )
        self._outputs = plan_outputs(out.enabled)  # imports the builders: a wrong entry stops the start
        base = measurement_settings or load_measurement_settings()
        sarc = settings.sarcopenia
        self._measurement_settings = replace(
            base,
            sarcopenia_group=sarc.group,
            threshold_female_kg_m2=sarc.threshold_female_kg_m2,
            threshold_male_kg_m2=sarc.threshold_male_kg_m2,
            calibrated_for_ct=sarc.calibrated_for_ct,
            threshold_source=sarc.source,
        )

    # -- the job -----------------------------------------------------------------------------

    def run(self, job: Job) -> Outcome:
        timings: dict[str, float] = {}
        result: dict[str, Any] = {}
        t0 = time.perf_counter()

        def ended(state: str, reason: str) -> Outcome:
            timings["total"] = round(time.perf_counter() - t0, 3)
            series_uid = result.get("selected_series", {}).get("series_uid", "")
            return Outcome(state, reason, series_uid, timings, result)

        try:
            return ended(DONE, self._process(job, timings, result))
        except DeclinedError as exc:
            exc.with_context(job_id=job.id, study_uid=job.study_uid)
            log.warning("job %d declined: %s", job.id, exc.message)
            return ended(DECLINED, exc.message)
        except NodeError as exc:
            exc.with_context(job_id=job.id, study_uid=job.study_uid)
            log.error("job %d failed: %s", job.id, exc.message)
            return ended(FAILED, exc.message)
        except Exception as exc:  # noqa: BLE001 - a bug must fail the job, not the worker
            log.error("job %d failed with an internal error:\n%s", job.id, traceback.format_exc())
            return ended(FAILED, f"internal error: {type(exc).__name__}: {exc}")

    def _process(self, job: Job, timings: dict[str, float], result: dict[str, Any]) -> str:
        """The stages of one job, recorded in ``timings`` and ``result``; returns the reason of a done job."""
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
        result["selected_series"] = _selection_summary(selected)
        with _stage(job, "load", timings):
            volume = load_volume(selected.paths, headers=selected.headers, min_slices=self._settings.processing.min_slices)
        result["volume"] = {"shape": list(volume.shape), "spacing_mm": [round(s, 4) for s in volume.spacing_mm]}
        segmenter = self._segmenter()
        if segmenter is None:
            return "received, selected and loaded; segmentation is off (node started with --no-model)"
        processing = self._settings.processing
        policy = CoveragePolicy(processing.accept_regions, processing.min_region_mm)
        result["coverage"] = {"policy": policy.to_record()}
        with _stage(job, "check", timings):
            coverage = check_field_of_view(volume, policy)  # image-based, before spending time on the model
        result["coverage"].update(regions=coverage.to_record(), evidence=coverage.evidence)
        with _stage(job, "segment", timings):
            segmentation = segmenter.segment(volume)
        result["coverage"]["from_segmentation"] = list(regions_from_segmentation(segmentation, volume.voxel_volume_ml))
        _check_femur_label(volume, segmentation)
        result["model"] = {"name": segmentation.model_name, "version": segmentation.model_version}
        with _stage(job, "measure", timings):
            measurements = self._measure(volume, segmentation, selected.patient)
        result["measurements"] = _summary(measurements)
        if segmentation.uncertainty is not None:
            result["uncertainty"] = _uncertainty_summary(measurements, segmentation.uncertainty)
        with _stage(job, "compare", timings):
            comparison, prior_search = self._compare(job, selected, volume, segmentation, measurements)
        result["prior"] = _prior_summary(comparison, prior_search)
        bundle = getattr(segmenter, "bundle", None)
        context = StudyContext(
            job_id=job.id, study_uid=job.study_uid, selected=selected, volume=volume, segmentation=segmentation,
            measurements=measurements, comparison=comparison, prior_search=prior_search,
            model=ModelInfo(segmentation.model_name, segmentation.model_version,
                            demonstration=bool(getattr(bundle, "demonstration", False))),
            settings=self._output_settings, software_version=__version__, content_time=self._clock(),
        )
        outputs = self._build_outputs(job, context, timings)
        result["outputs"] = [{"kind": o.kind, "sop_instance_uid": o.sop_instance_uid, "path": str(o.path)} for o in outputs]
        if self._priors is not None and self._priors.is_requested_prior(job.study_uid) and not (
            self._settings.prior.send_prior_results
        ):
            return "processed as a prior study; outputs not sent (prior.send_prior_results = false)"
        with _stage(job, "queue", timings):
            destinations = self._queue(job, outputs)
        if destinations:
            reason = f"{'+'.join(o.kind.upper() for o in outputs)} queued to {', '.join(destinations)}"
        else:
            reason = f"processed; no destination configured: outputs kept in {self._study_outputs(job)}"
        if comparison is not None:
            reason += f"; compared with the prior of {comparison.prior_study_date}"
        return reason

    # -- stages ------------------------------------------------------------------------------

    def _measure(self, volume: Volume, segmentation: Segmentation, patient: PatientInfo) -> Measurements:
        height_m, source = None, ""
        if self._results is not None and patient.patient_id:
            recorded = self._results.height(patient.patient_id, patient.issuer_of_patient_id)
            if recorded is not None and patient.height_m is None:
                height_m, source = recorded, "recorded"
        return measure(volume, segmentation, patient, self._measurement_settings, height_m=height_m, height_source=source)

    def _compare(
        self,
        job: Job,
        selected: SelectedSeries,
        volume: Volume,
        segmentation: Segmentation,
        measurements: Measurements,
    ) -> tuple[Comparison | None, PriorSearch | None]:
        """Save this study's results and profiles, then look for the prior study and compare."""
        profiles = anatomical_profiles(volume, segmentation)
        if self._results is not None:
            self._save_results(job, selected, segmentation, measurements)
            self._results.save_profiles(job.study_uid, profiles)
        if self._priors is None:
            return None, None
        return self._priors.find(
            study_uid=job.study_uid, study_date=selected.study_date, patient=selected.patient,
            measurements=measurements, profiles=profiles,
        )

    def _study_outputs(self, job: Job) -> Path:
        return self._settings.outputs_dir / job.study_uid

    def _build_outputs(self, job: Job, context: StudyContext, timings: dict[str, float]) -> list[OutputFile]:
        """Build and write every planned output (one stage each); returns those to send, in order."""
        out_dir = self._study_outputs(job)
        out_dir.mkdir(parents=True, exist_ok=True)
        built: dict[str, pydicom.Dataset] = {}
        files: list[OutputFile] = []
        for planned in self._outputs:
            builder = planned.builder
            with _stage(job, builder.name, timings):
                ds = builder.build(context, MappingProxyType({name: built[name] for name in builder.needs}))
                output = _write(ds, out_dir, builder.name)
            built[builder.name] = ds
            if planned.send:
                files.append(output)
        return files

    def _save_results(
        self,
        job: Job,
        selected: SelectedSeries,
        segmentation: Segmentation,
        measurements: Measurements,
    ) -> None:
        assert self._results is not None
        self._results.save(
            study_uid=job.study_uid,
            job_id=job.id,
            series_uid=selected.series_instance_uid,
            patient_id=selected.patient.patient_id,
            issuer=selected.patient.issuer_of_patient_id,
            study_date=selected.study_date,
            model_name=segmentation.model_name,
            model_version=segmentation.model_version,
            measurements=measurements,
        )

    def _queue(self, job: Job, outputs: list[OutputFile]) -> list[str]:
        if self._outbox is None or not self._settings.destinations:
            return []
        names = []
        for dest in self._settings.destinations:
            for o in outputs:
                self._outbox.enqueue(
                    o.path, dest.name, job_id=job.id, study_uid=job.study_uid,
                    sop_class_uid=o.sop_class_uid, sop_instance_uid=o.sop_instance_uid,
                )
            names.append(dest.name)
        return names


def _check_femur_label(volume: Volume, segmentation: Segmentation, min_ml: float = 30.0) -> None:
    """Decline when the model found no femur: no hip or thigh to measure (or the model failed on it)."""
    volumes = femur_label_volumes_ml(segmentation, volume.voxel_volume_ml)
    if volumes is None or max(volumes) < min_ml:
        right, left = volumes or (0.0, 0.0)
        raise DeclinedError(
            f"no femur in the segmentation: it found femur right {right:.1f} cm³, left {left:.1f} cm³ "
            f"(at least {min_ml:.0f} cm³ on one side is required); nothing is reported"
        )


def _write(ds: pydicom.Dataset, out_dir: Path, kind: str) -> OutputFile:
    """Write an output durably (temporary file, fsync, atomic rename), named by its SOP Instance UID."""
    path = out_dir / f"{kind}_{ds.SOPInstanceUID}.dcm"
    tmp = path.with_suffix(".tmp")
    ds.save_as(tmp, enforce_file_format=True)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return OutputFile(kind, path, str(ds.SOPClassUID), str(ds.SOPInstanceUID))


def _selection_summary(selected: SelectedSeries) -> dict[str, Any]:
    return {
        "series_uid": selected.series_instance_uid,
        "rule": selected.rule,
        "description": selected.description,
        "rejected": [list(r) for r in selected.rejected],
    }


def _prior_summary(comparison: Comparison | None, prior_search: PriorSearch | None) -> dict[str, Any]:
    return {
        "found": bool(prior_search and prior_search.found),
        "prior_study_uid": comparison.prior_study_uid if comparison else "",
        "looked_in": list(prior_search.looked_in) if prior_search else [],
        "message": prior_search.message if prior_search else "",
    }


def _rounded(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def _summary(m: Measurements) -> dict[str, Any]:
    """A compact summary for the job record (what `thighnode status --json` shows)."""
    groups = {
        f"{g.group}/{g.side}": {
            "volume_ml": _rounded(g.volume_ml, 1),
            "mass_g": _rounded(g.mass_g, 1),
            "smi_kg_m2": _rounded(g.smi_kg_m2, 3),
            **({"withheld": g.withheld_reason} if g.withheld_reason else {}),
        }
        for g in m.groups
    }
    return {
        "structures": len([s for s in m.structures if s.voxel_count > 0]),
        "groups": groups,
        "flags": [f"{f.code}: {f.message}" for f in m.flags],
        "height_m": m.height_m,
        "height_source": m.height_source,
    }


def _uncertainty_summary(m: Measurements, u: SegmentationUncertainty) -> dict[str, Any]:
    """The job record's ``uncertainty`` (`thighnode status --json`): the method, the threshold and
    the structure-sides flagged low confidence, each with its mean entropy and volume CV."""
    return {
        "method": u.method,
        "samples": u.n_samples,
        "threshold": None if u.thresholds is None else {
            "mean_entropy": u.thresholds.mean_entropy, "volume_cv_pct": u.thresholds.volume_cv_pct},
        "low_confidence": [
            {"structure": s.key, "side": s.side, "mean_entropy": round(s.uncertainty.mean_entropy, 4),
             "volume_cv_pct": round(s.uncertainty.volume_cv_pct, 2)}
            for s in m.structures
            if s.uncertainty is not None and s.uncertainty.low_confidence and s.side != SIDE_BOTH
        ],
    }


@contextmanager
def _stage(job: Job, name: str, timings: dict[str, float]) -> Iterator[None]:
    log.info("job %d: stage %s started", job.id, name)
    t = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = round(time.perf_counter() - t, 3)
        log.info("job %d: stage %s ended after %.2f s", job.id, name, timings[name])
