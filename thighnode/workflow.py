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

Before the model, the study's SEG instances not yet handled are looked at
(:mod:`thighnode.corrections`): the node's own SEG echoed back is recorded as such; a reader's
corrected SEG is measured on the measured CT series and sent back as a verified SEG/SR/PDF
(UIDs from the correction's SOP Instance UID) and stored as ground truth; an unusable one is
recorded with its reason. When no CT arrived since the model's results, that is the whole job
(``result["kind"] = "correction"``; declined when every SEG was refused): the model does not run again.

Outputs are written under ``<data_dir>/outputs/<StudyInstanceUID>/`` (``<name>_<SOPInstanceUID>.dcm``) with UIDs derived
from the source series and the model version (reprocessing replaces them in the PACS). In the node's
own workers (``on_queued`` given: it wakes the node's sender) each is queued in the outbox for every
configured destination as soon as it is written: the SEG is on its way to the PACS while the SR and
the PDF are built, and a later output that fails leaves the job failed with a reason naming what was
already queued. A Celery worker (no ``on_queued``: the node's sender runs on its own tick) queues them
all when the last one is written, so that a task killed and redelivered sends each output once. The
job is marked done only after the queueing, so a crash before it re-runs the job and re-queues the
same objects (the outbox is idempotent on destination and SOP Instance UID; an output queued early
by the crashed run may be sent again, with the same UIDs, replacing it in the PACS).
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
from typing import Any, Callable, Iterator, Mapping, Protocol

import pydicom

from dicomout.context import ModelInfo, OutputSettings, StudyContext, Verification
from dicomout.files import write_part10
from dicomout.outputs import plan_outputs
from node_errors import NodeError
from pipeline.bodypart import femur_label_volumes_ml
from pipeline.coverage import CoveragePolicy, check_field_of_view, regions_from_segmentation
from dicomout.uids import output_uid
from pipeline.correction import compare_with_model
from pipeline.errors import DeclinedError
from pipeline.labels import LabelTable, load_label_table
from pipeline.segread import SEG_SOP_CLASS_UID, SegReadError, read_seg
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
from scp.types import ReceivedInstance, ReceivedStudy
from thighnode.corrections import (
    ACCEPTED, OWN, REFUSED, VERIFIED_MEASUREMENTS, CorrectionRecord, CorrectionRefused, CorrectionStore, check_coverage, check_references,
    corrected_segmentation, new_ct_since, observer_of, own_sop_instance_uids, pending_segs, store_case,
)
from thighnode import __version__
from thighnode.backfill import BackfillStore
from thighnode.jobs import DECLINED, DONE, FAILED, Job
from thighnode.priors import PriorFinder
from thighnode.results import ResultsStore, StudyResult
from thighnode.settings import Settings

log = logging.getLogger(__name__)

CORRECTION_OUTPUTS = ("seg", "sr", "pdf")
"""The outputs built for a reader's correction (the SR references the SEG of the corrected labels)."""


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


def _no_ct_reason(instance_count: int, excluded_counts: Mapping[str, int]) -> str:
    """Why a study without any CT instance is declined: what it holds instead, by Modality."""
    held = ", ".join(f"{n} {modality or '(no Modality)'}" for modality, n in sorted(excluded_counts.items()))
    return (
        f"the study holds no CT instance (Modality CT): its {instance_count} received instance(s) are "
        f"{held or 'of no modality'}; only CT series are processed"
    )


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
        corrections: CorrectionStore | None = None,
        backfill: BackfillStore | None = None,
        clock: Callable[[], datetime] = _utc_now,
        on_queued: Callable[[], None] | None = None,
    ) -> None:
        self._settings = settings
        self._index = index
        self._segmenter = segmenter
        self._results = results
        self._outbox = outbox
        self._priors = priors
        self._corrections = corrections
        self._backfill = backfill
        self._clock = clock  # the outputs' content time
        self._on_queued = on_queued  # an output was queued: wake the sender (the node's outbox)
        out = settings.outputs
        self._output_settings = OutputSettings(
            seg_type=out.seg_type, labelmap_compression=out.labelmap_compression,
            binary_compression=out.binary_compression, manufacturer=out.manufacturer,
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
            return ended(FAILED, exc.message + _already_queued(result))
        except Exception as exc:  # noqa: BLE001 - a bug must fail the job, not the worker
            log.error("job %d failed with an internal error:\n%s", job.id, traceback.format_exc())
            return ended(FAILED, f"internal error: {type(exc).__name__}: {exc}" + _already_queued(result))

    def _process(self, job: Job, timings: dict[str, float], result: dict[str, Any]) -> str:
        """The stages of one job, recorded in ``timings`` and ``result``; returns the reason of a done job."""
        study = self._index.get_study(job.study_uid)
        result["instances"] = study.instance_count
        result["excluded_non_ct"] = dict(study.excluded_counts)
        corrected = self._handle_corrections(job, study, timings, result)
        if corrected is not None:
            return corrected
        if not study.series:
            raise DeclinedError(_no_ct_reason(study.instance_count, study.excluded_counts), study_uid=job.study_uid)
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
        result["model"] = {"name": segmentation.model_name, "version": segmentation.model_version,
                           "sha256": segmentation.model_sha256}
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
                            demonstration=bool(getattr(bundle, "demonstration", False)), sha256=segmentation.model_sha256),
            settings=self._output_settings, software_version=__version__, content_time=self._clock(),
        )
        held = self._held_reason(job)
        destinations: list[str] = []

        def queue(output: OutputFile) -> None:
            t = time.perf_counter()
            destinations[:] = self._queue(job, [output])
            result.setdefault("queued", []).append(output.kind)
            timings["queue"] = round(timings.get("queue", 0.0) + time.perf_counter() - t, 3)
            if destinations and self._on_queued is not None:
                self._on_queued()

        early = not held and self._on_queued is not None  # the node's own workers (module docstring)
        outputs = self._build_outputs(job, context, timings, queue=queue if early else None)
        result["outputs"] = [{"kind": o.kind, "sop_instance_uid": o.sop_instance_uid, "path": str(o.path)} for o in outputs]
        if held:
            return held
        if not early:
            with _stage(job, "queue", timings):
                destinations = self._queue(job, outputs)
        if destinations:
            reason = f"{'+'.join(o.kind.upper() for o in outputs)} queued to {', '.join(destinations)}"
        else:
            reason = f"processed; no destination configured: outputs kept in {self._study_outputs(job)}"
        if comparison is not None:
            reason += f"; compared with the prior of {comparison.prior_study_date}"
        return reason

    # -- a reader's corrected SEG (thighnode.corrections) ---------------------------------------

    def _handle_corrections(
        self, job: Job, study: ReceivedStudy, timings: dict[str, float], result: dict[str, Any]
    ) -> str | None:
        """Handle the study's SEG instances not handled yet. Returns the job's reason when nothing
        else is to be done (no CT arrived since the model's results), None to run the model too;
        DeclinedError when every SEG was refused and there is nothing else to do."""
        if self._corrections is None or self._results is None:
            return None
        instances = self._index.instances(job.study_uid)
        seg_uids = [i.sop_instance_uid for i in instances if i.sop_class_uid == SEG_SOP_CLASS_UID]
        segs = pending_segs(instances, self._corrections.known(seg_uids))
        if not segs:
            return None
        stored = self._results.get(job.study_uid)
        own = own_sop_instance_uids(self._settings.outputs_dir, job.study_uid)
        if stored is not None:
            own.add(output_uid(stored.series_uid, stored.model_version, "seg.instance"))
        records = []
        with _stage(job, "correct", timings):
            for inst in segs:
                record = self._correction(job, inst, study, stored, own, timings)
                self._corrections.record(record)
                records.append(record)
        result["corrections"] = [r.to_summary() for r in records]
        if study.series and (stored is None or new_ct_since(instances, self._results.saved_at(job.study_uid))):
            return None  # CT arrived too: the model runs as for any late instance
        result["kind"] = "correction"
        reason = "; ".join(f"SEG {r.seg_sop_instance_uid}: {r.reason}" for r in records)
        if all(r.state == REFUSED for r in records):
            raise DeclinedError(f"correction refused: {reason}")
        return reason

    def _correction(
        self, job: Job, inst: ReceivedInstance, study: ReceivedStudy, stored: StudyResult | None, own: set[str],
        timings: dict[str, float],
    ) -> CorrectionRecord:
        """One SEG instance: the node's own, refused (with the reason) or applied."""

        def record(state: str, reason: str, observer: str = "", detail: dict[str, Any] | None = None) -> CorrectionRecord:
            return CorrectionRecord(
                inst.sop_instance_uid, job.study_uid, stored.series_uid if stored else "", job.id, state, reason,
                observer, inst.received_at, time.time(), detail or {},
            )

        if inst.sop_instance_uid in own:
            return record(OWN, "the node's own SEG (a SOPInstanceUID the node wrote) came back; not a correction")
        if stored is None:
            return record(REFUSED, f"SEG for a study the node has not measured (no measurements for {job.study_uid}); "
                                   "a correction must follow the node's results for the study; file kept")
        try:
            ds = _read_seg(inst.path)
            observer = observer_of(ds)
            detail = self._apply_correction(job, inst, ds, study, stored, timings)
        except (CorrectionRefused, SegReadError, DeclinedError) as exc:
            log.warning("job %d: correction SEG %s refused: %s", job.id, inst.sop_instance_uid, exc.message)
            return record(REFUSED, f"{exc.message}; file kept")
        destinations = detail.get("destinations") or []
        sent = f"verified {'+'.join(detail['kinds'])} queued to {', '.join(destinations)}" if destinations else (
            "verified outputs written; no destination configured")
        return record(ACCEPTED, f"correction applied ({detail['changed']} structure/sides changed); {sent}; "
                                "stored as ground truth", observer, detail)

    def _apply_correction(
        self, job: Job, inst: ReceivedInstance, ds: pydicom.Dataset, study: ReceivedStudy, stored: StudyResult,
        timings: dict[str, float],
    ) -> dict[str, Any]:
        """Measure the reader's labels on the measured CT, build and queue the verified outputs, store the case."""
        paths = study.series.get(stored.series_uid)
        if not paths:
            raise CorrectionRefused(f"the measured CT series {stored.series_uid} is no longer in the spool "
                                    "(retention); a correction needs it")
        processing = self._settings.processing
        selected = select_series({stored.series_uid: paths}, study_instance_uid=job.study_uid,
                                 max_slice_thickness_mm=processing.max_slice_thickness_mm, min_slices=processing.min_slices)
        volume = load_volume(selected.paths, headers=selected.headers, min_slices=processing.min_slices)
        check_references(ds, study_uid=job.study_uid, series_uid=stored.series_uid,
                         frame_of_reference_uid=volume.frame_of_reference_uid)
        labels = stored_labels(self._segmenter())
        read = read_seg(ds, volume.shape, volume.affine_lps, labels, volume.frame_of_reference_uid or None, strict=True)
        segmentation = corrected_segmentation(read, volume, labels, model_name=stored.model_name,
                                              model_version=stored.model_version,
                                              model_sha256=str(stored.extra.get("model_sha256", "")))
        measurements = self._measure(volume, segmentation, selected.patient)
        missing = check_coverage(_sided_keys(stored.measurements), _sided_keys(measurements))
        differences = compare_with_model(stored.measurements, measurements)
        bundle = getattr(self._segmenter(), "bundle", None)
        context = StudyContext(
            job_id=job.id, study_uid=job.study_uid, selected=selected, volume=volume, segmentation=segmentation,
            measurements=measurements,
            model=ModelInfo(stored.model_name, stored.model_version, bool(getattr(bundle, "demonstration", False)),
                            segmentation.model_sha256),
            settings=self._output_settings, software_version=__version__, content_time=self._clock(),
            verification=Verification(observer_of(ds), inst.sop_instance_uid, self._clock(), differences),
        )
        outputs = self._build_outputs(job, context, timings, only=CORRECTION_OUTPUTS)
        destinations = self._queue(job, outputs)
        case_dir = store_case(
            self._settings.node.data_dir, study_uid=job.study_uid, series_uid=stored.series_uid,
            patient=selected.patient, seg_sop_instance_uid=inst.sop_instance_uid, observer=observer_of(ds),
            received_at=inst.received_at, ct_paths=selected.paths, seg_path=inst.path,
        )
        changed = [d for d in differences if d.difference_voxels]
        return {
            "series_uid": stored.series_uid, "segments": len(read.matches), "changed": len(changed),
            "differences": [d.to_record() for d in changed], "missing": [f"{k} {s}" for k, s in missing],
            VERIFIED_MEASUREMENTS: [d.to_record() for d in differences],
            "kinds": [o.kind.upper() for o in outputs], "destinations": destinations, "case_dir": str(case_dir),
            "outputs": [{"kind": o.kind, "sop_instance_uid": o.sop_instance_uid, "path": str(o.path)} for o in outputs],
        }

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

    def _held_reason(self, job: Job) -> str:
        """Why this job's outputs are kept, not sent (a requested prior, a --no-send backfill), or ""."""
        if self._priors is not None and self._priors.is_requested_prior(job.study_uid) and not (
            self._settings.prior.send_prior_results
        ):
            return "processed as a prior study; outputs not sent (prior.send_prior_results = false)"
        if self._backfill is not None and self._backfill.holds_outputs(job.study_uid):
            return f"processed for a backfill with --no-send; outputs kept in {self._study_outputs(job)}, not sent"
        return ""

    def _build_outputs(
        self, job: Job, context: StudyContext, timings: dict[str, float], only: tuple[str, ...] | None = None,
        queue: Callable[[OutputFile], None] | None = None,
    ) -> list[OutputFile]:
        """Build and write every planned output (one stage each; ``only``: those of these names);
        returns those to send, in order; ``queue`` receives each of them as soon as it is written."""
        out_dir = self._study_outputs(job)
        out_dir.mkdir(parents=True, exist_ok=True)
        built: dict[str, pydicom.Dataset] = {}
        files: list[OutputFile] = []
        for planned in self._outputs:
            builder = planned.builder
            if only is not None and builder.name not in only:
                continue
            with _stage(job, builder.name, timings):
                ds = builder.build(context, MappingProxyType({name: built[name] for name in builder.needs}))
                output = _write(ds, out_dir, builder.name)
            if any(builder.name in later.builder.needs for later in self._outputs):
                built[builder.name] = ds  # only what a builder reads is held (a BINARY SEG holds 330 MB of frames)
            del ds
            if planned.send:
                files.append(output)
                if queue is not None:
                    queue(output)
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
            extra={"model_sha256": segmentation.model_sha256} if segmentation.model_sha256 else None,
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


def _already_queued(result: Mapping[str, Any]) -> str:
    """The failure reason's tail when outputs built before the failure were already queued."""
    queued = result.get("queued")
    return f" (already queued before the failure: {', '.join(k.upper() for k in queued)})" if queued else ""


def _read_seg(path: Path) -> pydicom.Dataset:
    try:
        return pydicom.dcmread(path)
    except Exception as exc:  # noqa: BLE001 - a file that does not read is a refused correction
        raise CorrectionRefused(f"the SEG file does not read as DICOM ({type(exc).__name__}: {exc})") from exc


def _sided_keys(m: Measurements) -> set[tuple[str, str]]:
    return {(s.key, s.side) for s in m.structures if s.side in ("right", "left") and s.voxel_count > 0}


def stored_labels(segmenter: object) -> LabelTable:
    """The label table of the node's model (its bundle's), else the configured one."""
    bundle = getattr(segmenter, "bundle", None)
    labels = getattr(bundle, "labels", None)
    return labels if isinstance(labels, LabelTable) else load_label_table()


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
    write_part10(ds, tmp)  # save_as's file, without copies of the Pixel Data (a BINARY SEG's 330 MB)
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
