"""The results database: measurements of every processed study, and recorded patient heights.

Tables live in the node's SQLite file beside the jobs and the outbox:

- ``patient_heights``: heights recorded by an operator (``thighnode patient set-height``), used when a
  study has no PatientSize;
- ``study_results``: one row per successfully processed study (the latest job wins), with what the
  longitudinal comparison needs to find a prior (PatientID + IssuerOfPatientID, StudyDate);
- ``structure_results`` / ``group_results``: the measurements, one row per structure (or group) and side.

Patient identifiers are stored here because a prior must be found by them; they never go to the logs.
"""

from __future__ import annotations

import json
import zlib
import sqlite3
import time
from dataclasses import dataclass
from typing import Any

from node_errors import NodeError
from pipeline.types import (
    AnatomicalProfiles,
    Comparison,
    GroupMeasurement,
    Measurements,
    QualityFlag,
    StructureChange,
    StructureMeasurement,
    StructureUncertainty,
    BoneProfile,
    StructureProfile,
)
from scp.db import SqliteStore

_SCHEMA = """
CREATE TABLE IF NOT EXISTS patient_heights (
    patient_id TEXT NOT NULL,
    issuer TEXT NOT NULL DEFAULT '',
    height_m REAL NOT NULL,
    recorded_at REAL NOT NULL,
    PRIMARY KEY (patient_id, issuer)
);
CREATE TABLE IF NOT EXISTS study_results (
    study_uid TEXT PRIMARY KEY,
    job_id INTEGER NOT NULL,
    series_uid TEXT NOT NULL,
    patient_id TEXT NOT NULL,
    issuer TEXT NOT NULL DEFAULT '',
    study_date TEXT NOT NULL DEFAULT '',
    sex TEXT NOT NULL DEFAULT '',
    height_m REAL,
    height_source TEXT NOT NULL DEFAULT '',
    model_name TEXT NOT NULL,
    model_version TEXT NOT NULL,
    flags_json TEXT NOT NULL DEFAULT '[]',
    extra_json TEXT NOT NULL DEFAULT '{}',
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS study_results_patient ON study_results(patient_id, issuer, study_date);
CREATE TABLE IF NOT EXISTS structure_results (
    study_uid TEXT NOT NULL,
    key TEXT NOT NULL,
    side TEXT NOT NULL,
    label_id INTEGER NOT NULL,
    name TEXT NOT NULL,
    grp TEXT NOT NULL,
    voxel_count INTEGER NOT NULL,
    volume_ml REAL NOT NULL,
    mean_hu REAL NOT NULL,
    std_hu REAL NOT NULL,
    mass_g REAL NOT NULL,
    fat_fraction REAL NOT NULL,
    flags TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (study_uid, key, side)
);
CREATE TABLE IF NOT EXISTS study_profiles (
    study_uid TEXT PRIMARY KEY,
    profiles_zjson BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS comparisons (
    study_uid TEXT PRIMARY KEY,
    prior_study_uid TEXT NOT NULL,
    comparison_json TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS group_results (
    study_uid TEXT NOT NULL,
    grp TEXT NOT NULL,
    side TEXT NOT NULL,
    volume_ml REAL NOT NULL,
    mass_g REAL NOT NULL,
    volume_per_height2_cm3_m2 REAL,
    smi_kg_m2 REAL,
    includes_partial INTEGER NOT NULL,
    structure_keys TEXT NOT NULL,
    PRIMARY KEY (study_uid, grp, side)
);
"""

MIN_HEIGHT_M = 0.5
MAX_HEIGHT_M = 2.5


class ResultsError(NodeError):
    """Invalid input to the results database (e.g. an impossible height)."""


@dataclass(frozen=True)
class StudyResult:
    """A processed study as stored: identifiers, context and its measurements."""

    study_uid: str
    job_id: int
    series_uid: str
    patient_id: str
    issuer: str
    study_date: str
    sex: str
    height_m: float | None
    height_source: str
    model_name: str
    model_version: str
    measurements: Measurements
    extra: dict[str, Any]


def validate_height_m(value: float) -> float:
    if not MIN_HEIGHT_M <= value <= MAX_HEIGHT_M:
        raise ResultsError(
            f"height {value!r} m: allowed {MIN_HEIGHT_M}..{MAX_HEIGHT_M} (metres; e.g. 1.72, not 172)"
        )
    return float(value)


class ResultsStore(SqliteStore):
    """Measurements and recorded heights in SQLite; thread-safe (one connection behind a lock)."""

    SCHEMA = _SCHEMA

    # -- heights ---------------------------------------------------------------------------

    def set_height(self, patient_id: str, height_m: float, *, issuer: str = "", now: float | None = None) -> None:
        if not patient_id:
            raise ResultsError("patient id is empty: give the PatientID (0010,0020) of the patient")
        height_m = validate_height_m(height_m)
        with self._lock:
            self._db.execute(
                "INSERT INTO patient_heights(patient_id, issuer, height_m, recorded_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT(patient_id, issuer) DO UPDATE SET height_m = excluded.height_m, "
                "recorded_at = excluded.recorded_at",
                (patient_id, issuer, height_m, time.time() if now is None else now),
            )

    def height(self, patient_id: str, issuer: str = "") -> float | None:
        """A recorded height for the patient (an issuer-less record matches any issuer)."""
        with self._lock:
            row = self._db.execute(
                "SELECT height_m FROM patient_heights WHERE patient_id = ? AND issuer IN (?, '') "
                "ORDER BY issuer = '' LIMIT 1",
                (patient_id, issuer),
            ).fetchone()
        return None if row is None else float(row["height_m"])

    # -- results ---------------------------------------------------------------------------

    def save(
        self,
        *,
        study_uid: str,
        job_id: int,
        series_uid: str,
        patient_id: str,
        issuer: str,
        study_date: str,
        model_name: str,
        model_version: str,
        measurements: Measurements,
        extra: dict[str, Any] | None = None,
        now: float | None = None,
    ) -> None:
        """Store (replace) the measurements of a study in one transaction."""
        m = measurements
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for table in ("study_results", "structure_results", "group_results"):
                    self._db.execute(f"DELETE FROM {table} WHERE study_uid = ?", (study_uid,))
                self._db.execute(
                    "INSERT INTO study_results(study_uid, job_id, series_uid, patient_id, issuer, study_date, sex, "
                    "height_m, height_source, model_name, model_version, flags_json, extra_json, created_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        study_uid, job_id, series_uid, patient_id, issuer, study_date, m.sex, m.height_m,
                        m.height_source, model_name, model_version,
                        json.dumps([f.__dict__ for f in m.flags]),
                        json.dumps(
                            {
                                **(extra or {}),
                                "density_formula": m.density_formula,
                                "voxel_volume_ml": m.voxel_volume_ml,
                                # what pipeline.compare's metal withholding decides from (a prior's too)
                                "metal_proximity_mm": m.metal_proximity_mm,
                                "near_metal_voxels": {
                                    f"{s.key}:{s.side}": s.near_metal_voxels for s in m.structures if s.near_metal_voxels
                                },
                                # pipeline.uncertainty summaries (absent in rows stored before them)
                                "uncertainty": {
                                    f"{s.key}:{s.side}": s.uncertainty.to_record()
                                    for s in m.structures if s.uncertainty is not None
                                },
                            }
                        ),
                        time.time() if now is None else now,
                    ),
                )
                self._db.executemany(
                    "INSERT INTO structure_results VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [
                        (
                            study_uid, s.key, s.side, s.label_id, s.name, s.group, s.voxel_count, s.volume_ml,
                            s.mean_hu, s.std_hu, s.mass_g, s.fat_fraction, ",".join(s.flags),
                        )
                        for s in m.structures
                    ],
                )
                self._db.executemany(
                    "INSERT INTO group_results VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [
                        (
                            study_uid, g.group, g.side, g.volume_ml, g.mass_g, g.volume_per_height2_cm3_m2,
                            g.smi_kg_m2, int(g.includes_partial), ",".join(g.structure_keys),
                        )
                        for g in m.groups
                        if g.reported  # a withheld group (field of view) has no values to store
                    ],
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def save_profiles(self, study_uid: str, profiles: AnatomicalProfiles) -> None:
        """Store (replace) the anatomical profiles the comparison with a later study needs."""
        payload = {
            "landmark": profiles.landmark,
            "landmark_z_mm": profiles.landmark_z_mm,
            "fov_z_mm": profiles.fov_z_mm,
            "metal_z_mm": profiles.metal_z_mm,
            "profiles": [p.__dict__ for p in profiles.profiles],
            "bone": {side: (b.__dict__ if b is not None else None) for side, b in profiles.bone.items()},
            "landmark_reliable": profiles.landmark_reliable,
        }
        blob = zlib.compress(json.dumps(payload).encode("utf-8"), 6)
        with self._lock:
            self._db.execute(
                "INSERT INTO study_profiles(study_uid, profiles_zjson) VALUES (?, ?) "
                "ON CONFLICT(study_uid) DO UPDATE SET profiles_zjson = excluded.profiles_zjson",
                (study_uid, blob),
            )

    def profiles(self, study_uid: str) -> AnatomicalProfiles | None:
        """The stored profiles of a study, or None. Profiles stored before the bone profiles (and
        landmark reliability) existed load without them: no bone-profile registration for that study."""
        with self._lock:
            row = self._db.execute(
                "SELECT profiles_zjson FROM study_profiles WHERE study_uid = ?", (study_uid,)
            ).fetchone()
        if row is None:
            return None
        d = json.loads(zlib.decompress(row["profiles_zjson"]).decode("utf-8"))

        def pair(v: Any) -> tuple[float, float] | None:
            return None if v is None else (float(v[0]), float(v[1]))

        return AnatomicalProfiles(
            landmark=d["landmark"],
            landmark_z_mm=dict(d["landmark_z_mm"]),
            fov_z_mm={k: pair(v) for k, v in d["fov_z_mm"].items()},
            metal_z_mm={k: pair(v) for k, v in d["metal_z_mm"].items()},
            profiles=tuple(
                StructureProfile(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in p.items()})
                for p in d["profiles"]
            ),
            bone={side: _bone_profile(b) for side, b in d.get("bone", {}).items()},
            landmark_reliable={side: bool(v) for side, v in d.get("landmark_reliable", {}).items()},
        )

    def saved_at(self, study_uid: str) -> float | None:
        """When the study's measurements were last saved (epoch s); None when it has none."""
        with self._lock:
            row = self._db.execute("SELECT created_at FROM study_results WHERE study_uid = ?", (study_uid,)).fetchone()
        return None if row is None else float(row[0])

    def get(self, study_uid: str) -> StudyResult | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM study_results WHERE study_uid = ?", (study_uid,)).fetchone()
            if row is None:
                return None
            srows = self._db.execute(
                "SELECT * FROM structure_results WHERE study_uid = ? ORDER BY label_id, side", (study_uid,)
            ).fetchall()
            grows = self._db.execute("SELECT * FROM group_results WHERE study_uid = ?", (study_uid,)).fetchall()
        return _study_result(row, srows, grows)

    def studies_of_patient(self, patient_id: str, issuer: str = "") -> list[StudyResult]:
        """All processed studies of a patient, oldest first (by StudyDate, then processing time)."""
        with self._lock:
            uids = [
                r["study_uid"]
                for r in self._db.execute(
                    "SELECT study_uid FROM study_results WHERE patient_id = ? AND issuer = ? "
                    "ORDER BY study_date, created_at",
                    (patient_id, issuer),
                ).fetchall()
            ]
        return [r for r in (self.get(u) for u in uids) if r is not None]

    def save_comparison(self, study_uid: str, comparison: Comparison, now: float | None = None) -> None:
        """Store (replace) the comparison of a study with its prior."""
        payload = {**comparison.__dict__, "changes": [c.__dict__ for c in comparison.changes]}
        with self._lock:
            self._db.execute(
                "INSERT INTO comparisons(study_uid, prior_study_uid, comparison_json, created_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT(study_uid) DO UPDATE SET prior_study_uid = excluded.prior_study_uid, "
                "comparison_json = excluded.comparison_json, created_at = excluded.created_at",
                (study_uid, comparison.prior_study_uid, json.dumps(payload), time.time() if now is None else now),
            )

    def comparison(self, study_uid: str) -> Comparison | None:
        with self._lock:
            row = self._db.execute(
                "SELECT comparison_json FROM comparisons WHERE study_uid = ?", (study_uid,)
            ).fetchone()
        return None if row is None else _comparison(json.loads(row["comparison_json"]))

    def comparisons(self) -> dict[str, Comparison]:
        """Every stored comparison, by the current study's UID."""
        with self._lock:
            rows = self._db.execute("SELECT study_uid, comparison_json FROM comparisons").fetchall()
        return {r["study_uid"]: _comparison(json.loads(r["comparison_json"])) for r in rows}

    def all_studies(self) -> list[StudyResult]:
        with self._lock:
            uids = [r["study_uid"] for r in self._db.execute(
                "SELECT study_uid FROM study_results ORDER BY patient_id, study_date").fetchall()]
        return [r for r in (self.get(u) for u in uids) if r is not None]


def _comparison(payload: dict[str, Any]) -> Comparison:
    changes = []
    for c in payload.pop("changes"):
        if c.get("common_range_mm") is not None:
            c["common_range_mm"] = tuple(c["common_range_mm"])
        c["flags"] = tuple(c.get("flags", ()))
        changes.append(StructureChange(**c))
    return Comparison(**payload, changes=tuple(changes))


def _study_result(row: sqlite3.Row, srows: list[sqlite3.Row], grows: list[sqlite3.Row]) -> StudyResult:
    extra = json.loads(row["extra_json"])
    near = extra.pop("near_metal_voxels", {})
    uncertainty = extra.pop("uncertainty", {})
    measurements = Measurements(
        structures=tuple(
            StructureMeasurement(
                label_id=s["label_id"], key=s["key"], name=s["name"], group=s["grp"], side=s["side"],
                voxel_count=s["voxel_count"], volume_ml=s["volume_ml"], mean_hu=s["mean_hu"], std_hu=s["std_hu"],
                mass_g=s["mass_g"], fat_fraction=s["fat_fraction"],
                flags=tuple(f for f in s["flags"].split(",") if f),
                near_metal_voxels=int(near.get(f"{s['key']}:{s['side']}", 0)),
                uncertainty=_uncertainty(uncertainty.get(f"{s['key']}:{s['side']}")),
            )
            for s in srows
        ),
        groups=tuple(
            GroupMeasurement(
                group=g["grp"], side=g["side"], structure_keys=tuple(k for k in g["structure_keys"].split(",") if k),
                volume_ml=g["volume_ml"], mass_g=g["mass_g"],
                volume_per_height2_cm3_m2=g["volume_per_height2_cm3_m2"], smi_kg_m2=g["smi_kg_m2"],
                includes_partial=bool(g["includes_partial"]),
            )
            for g in grows
        ),
        flags=tuple(QualityFlag(**f) for f in json.loads(row["flags_json"])),
        height_m=row["height_m"],
        height_source=row["height_source"],
        sex=row["sex"],
        density_formula=extra.pop("density_formula", ""),
        voxel_volume_ml=extra.pop("voxel_volume_ml", 0.0),
        metal_proximity_mm=extra.pop("metal_proximity_mm", 15.0),
    )
    return StudyResult(
        study_uid=row["study_uid"], job_id=row["job_id"], series_uid=row["series_uid"],
        patient_id=row["patient_id"], issuer=row["issuer"], study_date=row["study_date"], sex=row["sex"],
        height_m=row["height_m"], height_source=row["height_source"], model_name=row["model_name"],
        model_version=row["model_version"], measurements=measurements, extra=extra,
    )


def _uncertainty(record: list | None) -> StructureUncertainty | None:
    return None if record is None else StructureUncertainty.from_record(record)


def _bone_profile(d: dict[str, Any] | None) -> BoneProfile | None:
    if d is None:
        return None
    return BoneProfile(
        z_mm=tuple(float(v) for v in d["z_mm"]),
        area_mm2=tuple(float(v) for v in d["area_mm2"]),
        metal=tuple(bool(v) for v in d["metal"]),
        slice_mm=float(d["slice_mm"]),
    )
