"""Phantom data sets: varied subjects drawn from one seed, written as studies (NIfTI, truth, DICOM),
optionally with a follow-up of known atrophy, and listed in ``dataset.json`` (``thighnode phantom``)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from modelkit.phantom import generate_phantom
from modelkit.phantom_io import phantom_uid, write_dicom_series, write_ground_truth, write_nifti_pair
from modelkit.phantom_types import IMPLANT_KINDS, PhantomError, PhantomParams
from pipeline.labels import LabelTable, load_label_table

FOLLOW_UP_MUSCLES = (
    "vastus_lateralis",
    "vastus_medialis",
    "vastus_intermedius",
    "rectus_femoris",
    "gluteus_medius",
    "gluteus_maximus",
    "adductor_magnus",
    "biceps_femoris",
    "semimembranosus",
    "sartorius",
)


@dataclass(frozen=True)
class DatasetEntry:
    """One written study of a dataset (a row of ``dataset.json``)."""

    name: str
    directory: Path
    ct_path: Path | None
    label_path: Path | None
    truth_path: Path
    dicom_dir: Path | None
    patient_id: str
    study_uid: str
    role: str  # "baseline" or "follow_up"
    baseline: str  # name of the baseline study (itself for a baseline)


def subject_params(
    index: int,
    seed: int,
    *,
    spacing_mm: tuple[float, float, float] = (2.0, 2.0, 2.0),
    variation: bool = True,
    implant_fraction: float = 0.0,
    cut_fov_fraction: float = 0.0,
) -> PhantomParams:
    """The parameters of subject ``index`` of a dataset drawn from ``seed``.

    With probability ``implant_fraction`` the subject has an implant: its side is drawn as before
    (left or right, same stream), then a stream of its own turns 20 % of them into "both" and picks
    the kind uniformly over IMPLANT_KINDS.
    """
    rng = np.random.default_rng([seed, index, 11])
    subject_seed = int(rng.integers(0, 2**31 - 1))
    if not variation:
        return PhantomParams(seed=subject_seed, spacing_mm=spacing_mm)
    sex = "F" if rng.random() < 0.5 else "M"
    height = float(rng.normal(1.64, 0.06) if sex == "F" else rng.normal(1.77, 0.07))
    fat = float(rng.uniform(0.18, 0.42) if sex == "F" else rng.uniform(0.1, 0.3))
    implant, kind = None, "total_hip"
    if rng.random() < implant_fraction:
        implant = "left" if rng.random() < 0.5 else "right"  # today's draw, kept: later draws stay the same
        both, kind_u = np.random.default_rng([seed, index, 13]).random(2)
        kind = IMPLANT_KINDS[min(int(kind_u * len(IMPLANT_KINDS)), len(IMPLANT_KINDS) - 1)]
        if both < 0.2:
            implant = "both"  # left 40 %, right 40 %, both 20 %
    top = bottom = None
    if rng.random() < cut_fov_fraction:
        if rng.random() < 0.5:
            top = float(rng.uniform(-90.0, -30.0))
        else:
            bottom = float(rng.uniform(-420.0, -300.0))
    return PhantomParams(
        seed=subject_seed,
        sex=sex,
        height_m=float(np.clip(height, 1.45, 2.0)),
        size=float(np.clip(rng.normal(1.0, 0.1), 0.82, 1.22)),
        fat_fraction=fat,
        implant=implant,
        implant_kind=kind,
        fov_top_mm=top,
        fov_bottom_mm=bottom,
        spacing_mm=spacing_mm,
        noise_hu=float(rng.uniform(8.0, 20.0)),
    )


def follow_up_atrophy(params: PhantomParams, index: int) -> dict[str, float]:
    """Known right-side atrophy of a follow-up: 3..5 muscles, each losing 5..25 %."""
    rng = np.random.default_rng([params.seed, index, 23])
    n = int(rng.integers(3, 6))
    keys = rng.choice(len(FOLLOW_UP_MUSCLES), size=n, replace=False)
    return {f"{FOLLOW_UP_MUSCLES[i]}:right": round(float(rng.uniform(0.75, 0.95)), 3) for i in sorted(keys)}


def generate_dataset(
    out_dir: Path,
    *,
    n_subjects: int,
    seed: int,
    spacing_mm: tuple[float, float, float] = (2.0, 2.0, 2.0),
    nifti: bool = True,
    dicom: bool = False,
    follow_up: bool = False,
    variation: bool = True,
    implant_fraction: float = 0.0,
    cut_fov_fraction: float = 0.0,
    labels: LabelTable | None = None,
) -> list[Path]:
    """Write ``n_subjects`` phantoms under ``out_dir`` and return their study directories.

    Each study goes to ``out_dir/<name>/``: ``<name>_ct.nii.gz`` + ``<name>_label.nii.gz``
    (when ``nifti``), ``<name>_truth.json`` (always) and ``dicom/`` (when ``dicom``).
    Names are ``subject_000``...; with ``follow_up`` every subject also gets
    ``subject_000_fu``: the same patient (PatientID, anatomy) scanned again a year later
    with known right-side atrophy (see the truth's ``params.atrophy``). ``dataset.json``
    in ``out_dir`` lists every study (:class:`DatasetEntry` fields). Returned: the study
    directories in order (baseline, then its follow-up).
    """
    if n_subjects < 1:
        raise PhantomError(f"generate_dataset: n_subjects is {n_subjects}; allowed: >= 1")
    table = labels if labels is not None else load_label_table()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    entries: list[DatasetEntry] = []
    for i in range(n_subjects):
        base = subject_params(
            i, seed, spacing_mm=spacing_mm, variation=variation,
            implant_fraction=implant_fraction, cut_fov_fraction=cut_fov_fraction,
        )
        name = f"subject_{i:03d}"
        patient_id = f"PH{seed % 100000:05d}{i:04d}"
        studies = [(name, base, "baseline", "20230110")]
        if follow_up:
            fu = PhantomParams(**{**base.to_record(), "spacing_mm": base.spacing_mm,
                                  "atrophy": follow_up_atrophy(base, i), "scan_seed": base.seed + 1_000_003})
            studies.append((f"{name}_fu", fu, "follow_up", "20240115"))
        for study_name, params, role, date in studies:
            phantom = generate_phantom(params, table)
            sdir = out_dir / study_name
            sdir.mkdir(parents=True, exist_ok=True)
            ct = lab = None
            if nifti:
                ct, lab = write_nifti_pair(phantom, sdir, study_name)
            truth = sdir / f"{study_name}_truth.json"
            write_ground_truth(phantom, truth, table)
            study_uid = phantom_uid("dataset", seed, i, role)
            dicom_dir = None
            if dicom:
                dicom_dir = sdir / "dicom"
                write_dicom_series(
                    phantom, dicom_dir, patient_id=patient_id, patient_name=f"Phantom^{name}",
                    birth_date="19580612", study_uid=study_uid,
                    series_uid=phantom_uid("dataset-series", seed, i, role),
                    frame_of_reference_uid=phantom_uid("dataset-for", seed, i, role),
                    study_date=date, accession=f"A{seed % 1000:03d}{i:04d}{'F' if role == 'follow_up' else 'B'}",
                )
            entries.append(DatasetEntry(study_name, sdir, ct, lab, truth, dicom_dir, patient_id, study_uid, role, name))
    index = [
        {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(e).items()} for e in entries
    ]
    (out_dir / "dataset.json").write_text(json.dumps(index, indent=1), encoding="utf-8")
    return [e.directory for e in entries]
