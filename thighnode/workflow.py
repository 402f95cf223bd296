"""The workflow that carries one study through the pipeline and dicomout.

Stages, each logged with its duration and recorded in the job's timings::

    select → load → check (a thigh CT?) → segment → measure → seg → sr → pdf → queue

A :class:`pipeline.errors.DeclinedError` ends the job as *declined* with the message
(the data cannot be processed: tilt, gaps, not a thigh CT...); nothing is sent. Any
other error ends it as *failed*. Either way the received files stay in the spool for
the retention period.

Outputs are written under ``<data_dir>/outputs/<StudyInstanceUID>/`` with UIDs derived
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
from typing import Any, Callable, Iterator, Protocol

import pydicom
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless

from node_errors import NodeError
from pipeline.bodypart import check_thigh_ct, femur_label_volumes_ml
from pipeline.errors import DeclinedError
from pipeline.measure import MeasurementSettings, load_measurement_settings, measure
from pipeline.selection import read_patient_info, select_series
from pipeline.compare import anatomical_profiles
from pipeline.types import Comparison, Measurements, PatientInfo, PriorSearch, Segmentation, SelectedSeries, Volume
from pipeline.volume import load_volume
from scp.index import InstanceIndex
from thighnode import __version__
from thighnode.jobs import DECLINED, DONE, FAILED, Job
from thighnode.priors import PriorFinder
from thighnode.results import ResultsStore
from thighnode.settings import Settings

log = logging.getLogger(__name__)

_LABELMAP_SYNTAXES = {"RLE": RLELossless, "JPEGLS": JPEGLSLossless, "JPEG2000": JPEG2000Lossless, "none": None}


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
    kind: str  # "seg", "sr", "pdf"
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
    ) -> None:
        self._settings = settings
        self._index = index
        self._segmenter = segmenter
        self._results = results
        self._outbox = outbox
        self._priors = priors
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
        series_uid = ""
        t0 = time.perf_counter()

        def ended(state: str, reason: str) -> Outcome:
            timings["total"] = round(time.perf_counter() - t0, 3)
            return Outcome(state, reason, series_uid, timings, result)

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
            result["volume"] = {"shape": list(volume.shape), "spacing_mm": [round(s, 4) for s in volume.spacing_mm]}
            segmenter = self._segmenter()
            if segmenter is None:
                return ended(DONE, "received, selected and loaded; segmentation is off (node started with --no-model)")
            with _stage(job, "check", timings):
                check_thigh_ct(volume)  # image-based, before spending time on the model
            with _stage(job, "segment", timings):
                segmentation = segmenter.segment(volume)
            _check_femur_label(volume, segmentation)
            result["model"] = {"name": segmentation.model_name, "version": segmentation.model_version}
            patient = read_patient_info(selected.paths[0])
            study_date = _study_date(selected.paths[0])
            with _stage(job, "measure", timings):
                measurements = self._measure(volume, segmentation, patient)
            result["measurements"] = _summary(measurements)
            comparison: Comparison | None = None
            prior_search: PriorSearch | None = None
            with _stage(job, "compare", timings):
                profiles = anatomical_profiles(volume, segmentation)
                if self._results is not None:
                    self._save_results(job, selected, patient, study_date, segmentation, measurements)
                    self._results.save_profiles(job.study_uid, profiles)
                if self._priors is not None:
                    comparison, prior_search = self._priors.find(
                        study_uid=job.study_uid, study_date=study_date, patient=patient,
                        measurements=measurements, profiles=profiles,
                    )
            result["prior"] = {
                "found": bool(prior_search and prior_search.found),
                "prior_study_uid": comparison.prior_study_uid if comparison else "",
                "looked_in": list(prior_search.looked_in) if prior_search else [],
                "message": prior_search.message if prior_search else "",
            }
            outputs = self._build_outputs(
                job, selected, volume, segmentation, measurements, patient, timings, comparison, prior_search
            )
            result["outputs"] = [
                {"kind": o.kind, "sop_instance_uid": o.sop_instance_uid, "path": str(o.path)} for o in outputs
            ]
            if self._priors is not None and self._priors.is_requested_prior(job.study_uid) and not (
                self._settings.prior.send_prior_results
            ):
                return ended(DONE, "processed as a prior study; outputs not sent (prior.send_prior_results = false)")
            with _stage(job, "queue", timings):
                destinations = self._queue(job, outputs)
            if destinations:
                reason = f"{'+'.join(o.kind.upper() for o in outputs)} queued to {', '.join(destinations)}"
            else:
                reason = f"processed; no destination configured: outputs kept in {self._study_outputs(job)}"
            if comparison is not None:
                reason += f"; compared with the prior of {comparison.prior_study_date}"
            return ended(DONE, reason)
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

    # -- stages ------------------------------------------------------------------------------

    def _measure(self, volume: Volume, segmentation: Segmentation, patient: PatientInfo) -> Measurements:
        height_m, source = None, ""
        if self._results is not None and patient.patient_id:
            recorded = self._results.height(patient.patient_id, patient.issuer_of_patient_id)
            if recorded is not None and patient.height_m is None:
                height_m, source = recorded, "recorded"
        return measure(volume, segmentation, patient, self._measurement_settings, height_m=height_m, height_source=source)

    def _study_outputs(self, job: Job) -> Path:
        return self._settings.outputs_dir / job.study_uid

    def _build_outputs(
        self,
        job: Job,
        selected: SelectedSeries,
        volume: Volume,
        segmentation: Segmentation,
        measurements: Measurements,
        patient: PatientInfo,
        timings: dict[str, float],
        comparison: Comparison | None = None,
        prior_search: PriorSearch | None = None,
    ) -> list[OutputFile]:
        from dicomout.pdf import build_encapsulated_pdf
        from dicomout.report import ReportHeader, render_report
        from dicomout.seg import build_seg, read_source_datasets
        from dicomout.sr import build_sr
        from dicomout.uids import PDF_SERIES, output_uid

        out = self._settings.outputs
        out_dir = self._study_outputs(job)
        out_dir.mkdir(parents=True, exist_ok=True)
        sources = read_source_datasets(list(selected.paths))
        common = dict(manufacturer=out.manufacturer, software_version=__version__, device_serial=out.device_serial)
        files: list[OutputFile] = []
        with _stage(job, "seg", timings):
            syntax = _LABELMAP_SYNTAXES[out.labelmap_compression] if out.seg_type == "LABELMAP" else None
            seg = build_seg(
                volume, segmentation, sources, segmentation_type=out.seg_type, transfer_syntax_uid=syntax, **common
            )
            seg_file = _write(seg, out_dir, "seg")
        if out.send_seg:
            files.append(seg_file)
        if out.send_sr:
            with _stage(job, "sr", timings):
                sr = build_sr(
                    measurements, seg, sources, volume=volume, labels=segmentation.labels,
                    prior=comparison, prior_search=prior_search,
                    institution_name=out.institution_name or None, **common,
                )
                files.append(_write(sr, out_dir, "sr"))
        if out.send_pdf:
            with _stage(job, "pdf", timings):
                bundle = getattr(self._segmenter(), "bundle", None)
                intended_use = str(getattr(bundle, "metadata", {}).get("intended_use", ""))
                demo = "demonstration" in intended_use.lower() or "not for clinical" in intended_use.lower()
                header = ReportHeader.from_dataset(
                    sources[0], node_version=__version__, model_name=segmentation.model_name,
                    model_version=segmentation.model_version, demonstration_model=demo,
                )
                pdf_bytes = render_report(
                    volume, segmentation, measurements, patient, study=header,
                    comparison=comparison, prior_search=prior_search,
                )
                pdf = build_encapsulated_pdf(
                    pdf_bytes,
                    sources[0],
                    series_uid=output_uid(selected.series_instance_uid, segmentation.model_version, "pdf.series"),
                    sop_uid=output_uid(selected.series_instance_uid, segmentation.model_version, "pdf.instance"),
                    document_title="Thigh and hip muscle CT measurements",
                    manufacturer=out.manufacturer,
                    software_version=__version__,
                    content_datetime=datetime.now(timezone.utc),
                    series_number=PDF_SERIES.number,
                    source_instances=[(ds.SOPClassUID, ds.SOPInstanceUID) for ds in sources],
                    institution_name=out.institution_name or None,
                )
                files.append(_write(pdf, out_dir, "pdf"))
        return files

    def _save_results(
        self,
        job: Job,
        selected: SelectedSeries,
        patient: PatientInfo,
        study_date: str,
        segmentation: Segmentation,
        measurements: Measurements,
    ) -> None:
        assert self._results is not None
        self._results.save(
            study_uid=job.study_uid,
            job_id=job.id,
            series_uid=selected.series_instance_uid,
            patient_id=patient.patient_id,
            issuer=patient.issuer_of_patient_id,
            study_date=study_date,
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


def _study_date(path: Path) -> str:
    header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["StudyDate"])
    return str(header.get("StudyDate", "") or "").strip()


def _check_femur_label(volume: Volume, segmentation: Segmentation, min_ml: float = 30.0) -> None:
    """Decline when the model found no femur: the study is not a thigh CT (or the model failed on it)."""
    volumes = femur_label_volumes_ml(segmentation, volume.voxel_volume_ml)
    if volumes is None or max(volumes) < min_ml:
        right, left = volumes or (0.0, 0.0)
        raise DeclinedError(
            f"not a thigh CT: the segmentation found femur right {right:.1f} cm³, left {left:.1f} cm³ "
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


def _summary(m: Measurements) -> dict[str, Any]:
    """A compact summary for the job record (what `thighnode status --json` shows)."""
    groups = {
        f"{g.group}/{g.side}": {
            "volume_ml": round(g.volume_ml, 1),
            "mass_g": round(g.mass_g, 1),
            "smi_kg_m2": None if g.smi_kg_m2 is None else round(g.smi_kg_m2, 3),
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


@contextmanager
def _stage(job: Job, name: str, timings: dict[str, float]) -> Iterator[None]:
    log.info("job %d: stage %s started", job.id, name)
    t = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = round(time.perf_counter() - t, 3)
        log.info("job %d: stage %s ended after %.2f s", job.id, name, timings[name])
