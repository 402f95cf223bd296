"""``thighnode cohort`` on a synthetic cohort written into a real ResultsStore.

20 patients (10 women, 10 men; femoral neck / intertrochanteric), each with a baseline CT and a
follow-up CT with a comparison; volumes, losses and DXA values are known arrays of this test, and
every expected table entry is computed here with numpy from those arrays, not from the code's rows.
"""

from __future__ import annotations

import csv
import io
import itertools
import sys
from dataclasses import dataclass
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

import numpy as np
import pytest

from pipeline.types import Comparison, GroupMeasurement, Measurements, StructureChange, StructureMeasurement
from research.cohort import run_cohort
from research.errors import SiteCsvError
from research.rows import patient_key
from thighnode.cli import build_parser
from thighnode.results import ResultsStore

MUSCLES = [("sartorius", "anterior"), ("adductor_magnus", "medial"), ("gluteus_maximus", "gluteal"),
           ("biceps_femoris", "posterior")]
OTHERS = [("psoas", "other"), ("femur", "bone")]  # measured but not part of the muscle tables
SIDES = ("left", "right")
N = 20
PNG = b"\x89PNG\r\n\x1a\n"


@dataclass
class Cohort:
    pid: list[str]
    sex: list[str]
    fracture: list[str]
    height: np.ndarray
    prior: np.ndarray  # (patient, muscle, side) ml
    current: np.ndarray
    not_compared: tuple[int, int, int]  # (patient, muscle, side) whose change is not compared
    smi_all: np.ndarray  # CT SMI of group "all" at baseline
    mass_all: np.ndarray  # kg
    dxa_smi: np.ndarray
    dxa_lean: np.ndarray


def _cohort() -> Cohort:
    rng = np.random.default_rng(42)
    sex = ["F" if i % 2 == 0 else "M" for i in range(N)]
    fracture = ["femoral_neck" if i % 4 < 2 else "intertrochanteric" for i in range(N)]
    height = np.round(rng.uniform(1.50, 1.85, N), 2)
    prior = rng.uniform(50, 600, (N, len(MUSCLES), 2)).round(1)
    loss_frac = np.array([0.10 if f == "femoral_neck" else 0.25 for f in fracture])
    current = (prior * (1 - loss_frac[:, None, None] * rng.uniform(0.5, 1.5, prior.shape))).round(1)
    dxa_smi = np.array([rng.uniform(4.4, 6.4) if s == "F" else rng.uniform(6.0, 8.0) for s in sex]).round(2)
    dxa_smi[:4] = [4.9, 6.5, 5.9, 7.6]  # both classes for each sex (F: 4.9 yes, 5.9 no; M: 6.5 yes, 7.6 no)
    smi_all = (dxa_smi * 1.3 + rng.normal(0, 0.4, N)).round(3)
    return Cohort(
        pid=[f"PID-{i:04d}" for i in range(N)], sex=sex, fracture=fracture, height=height, prior=prior,
        current=current, not_compared=(3, 2, 0), smi_all=smi_all, mass_all=smi_all * height**2,
        dxa_smi=dxa_smi, dxa_lean=(dxa_smi * height**2 * 2.2 + rng.normal(0, 0.5, N)).round(2),
    )


def _measurements(c: Cohort, i: int, vols: np.ndarray, smi_all: float) -> Measurements:
    structures = []
    for m, (key, group) in enumerate([*MUSCLES, *OTHERS]):
        for side_i, side in enumerate((*SIDES, "both")):
            if m < len(MUSCLES):
                v = float(vols[m].sum()) if side == "both" else float(vols[m, side_i])
            else:
                v = 100.0 * (2 if side == "both" else 1)
            structures.append(StructureMeasurement(
                label_id=m + 1, key=key, name=key.replace("_", " ").capitalize(), group=group, side=side,
                voxel_count=int(v * 1000), volume_ml=v, mean_hu=50.0, std_hu=10.0, mass_g=v * 1.05, fat_fraction=0.05,
            ))
    h2 = float(c.height[i]) ** 2
    groups = tuple(
        GroupMeasurement(group=g, side="both", structure_keys=("x",), volume_ml=smi_all * f * h2 * 1000,
                         mass_g=smi_all * f * h2 * 1000, volume_per_height2_cm3_m2=smi_all * f * 1000,
                         smi_kg_m2=smi_all * f, includes_partial=False)
        for g, f in (("gluteal", 0.3), ("above_knee", 0.6), ("all", 1.0))
    )
    return Measurements(structures=tuple(structures), groups=groups, flags=(), height_m=float(c.height[i]),
                        height_source="PatientSize", sex=c.sex[i], density_formula="test")


def _comparison(c: Cohort, i: int) -> Comparison:
    h2 = float(c.height[i]) ** 2
    changes = []
    for m, (key, group) in enumerate(MUSCLES):
        for s, side in enumerate(SIDES):
            p, q = float(c.prior[i, m, s]), float(c.current[i, m, s])
            ok = (i, m, s) != c.not_compared
            changes.append(StructureChange(
                key=key, name=key.replace("_", " ").capitalize(), group=group, side=side, compared=ok,
                reason="" if ok else "metal", common_range_mm=(-300.0, 0.0) if ok else None,
                prior_volume_ml=p if ok else None, current_volume_ml=q if ok else None,
                change_ml=q - p if ok else None, change_ratio=(q - p) / p if ok else None,
                change_per_height2_cm3_m2=(q - p) / h2 if ok else None,
                prior_mass_g=None, current_mass_g=None, change_mass_g=None, prior_mean_hu=None, current_mean_hu=None,
                change_mean_hu=None, prior_fat_fraction=None, current_fat_fraction=None, change_fat_fraction=None,
            ))
    return Comparison(prior_study_uid=f"1.2.{i}.1", prior_study_date="20230101", current_study_date="20230701",
                      interval_days=181, landmark="femoral head", method="test", changes=tuple(changes),
                      operated_side="left" if i == 3 else "", height_m=float(c.height[i]))


def _store(db: Path, c: Cohort, *, comparisons: bool = True) -> None:
    store = ResultsStore(db)
    for i in range(N):
        common = dict(series_uid=f"1.3.{i}", patient_id=c.pid[i], issuer="HOSP", model_name="m", model_version="1")
        store.save(study_uid=f"1.2.{i}.1", job_id=2 * i + 1, study_date="20230101",
                   measurements=_measurements(c, i, c.prior[i], float(c.smi_all[i])), **common)
        if comparisons:
            store.save(study_uid=f"1.2.{i}.2", job_id=2 * i + 2, study_date="20230701",
                       measurements=_measurements(c, i, c.current[i], float(c.smi_all[i]) * 0.9), **common)
            store.save_comparison(f"1.2.{i}.2", _comparison(c, i))
    store.close()


def _site_csv(path: Path, c: Cohort) -> None:
    lines = ["patient_id,issuer,study_date,fracture_type,sex,dxa_lean_mass_kg,dxa_smi_kg_m2,dxa_sarcopenia"]
    for i in range(N):
        threshold = 5.4 if c.sex[i] == "F" else 7.0
        explicit = str(int(c.dxa_smi[i] < threshold)) if i % 3 == 0 else ""  # others derived (AWGS 2014)
        lines.append(f"{c.pid[i]},HOSP,2023-01-01,{c.fracture[i]},{c.sex[i]},{c.dxa_lean[i]},{c.dxa_smi[i]},{explicit}")
    lines.append("PID-9999,HOSP,20230101,femoral_neck,F,30,5.0,1")  # unknown patient
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


@dataclass(frozen=True)
class _Settings:
    db_path: Path


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    tmp = tmp_path_factory.mktemp("cohort")
    c = _cohort()
    _store(tmp / "r.db", c)
    _site_csv(tmp / "site.csv", c)
    thresholds = tmp / "node.toml"
    thresholds.write_text(
        '# site config\n[node]\nport = 11113 # ours\n\n[sarcopenia]\n# the group whose SMI is assessed\ngroup = "all"\n'
        'threshold_female_kg_m2 = 5.4\nthreshold_male_kg_m2 = 7.0 # AWGS 2014\ncalibrated_for_ct = false\n'
        'source = "AWGS 2014 (DXA)"\n\n[[destinations]]\nname = "pacs"\nport = 4242\n',
        encoding="utf-8",
    )
    out = io.StringIO()
    summary = run_cohort(_Settings(tmp / "r.db"), out_dir=tmp / "out", site_csv=tmp / "site.csv",
                         write_thresholds=thresholds, stream=out)
    return c, tmp, summary, out.getvalue()


def _read(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _groups(c: Cohort) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for i in range(N):
        out.setdefault(f"{c.fracture[i]} / {c.sex[i]}", []).append(i)
    return out


def test_tidy_csv_has_one_row_per_study_structure_side_and_no_patient_id(run) -> None:  # noqa: ANN001
    c, tmp, summary, _ = run
    text = (tmp / "out" / "cohort_tidy.csv").read_text(encoding="utf-8")
    rows = _read(tmp / "out" / "cohort_tidy.csv")
    assert len(rows) == 2 * N * (len(MUSCLES) + len(OTHERS)) * 3 == summary.n_tidy_rows
    assert "PID-" not in text
    assert {r["patient_key"] for r in rows} == {patient_key(p, "HOSP") for p in c.pid}
    follow = [r for r in rows if r["study_uid"] == "1.2.5.2" and r["structure_key"] == "sartorius" and r["side"] == "right"]
    assert float(follow[0]["change_ml"]) == pytest.approx(c.current[5, 0, 1] - c.prior[5, 0, 1])
    assert follow[0]["fracture_type"] == c.fracture[5]  # inherited from the baseline row of the patient
    assert follow[0]["dxa_smi_kg_m2"] == ""  # DXA belongs to the baseline study only
    assert summary.join.unknown_patient_lines == (N + 2,) and summary.join.matched_rows == N


def test_table1_composition_matches_numpy(run) -> None:  # noqa: ANN001
    c, tmp, _, _ = run
    t1 = _read(tmp / "out" / "table1_composition.csv")
    for label, idx in _groups(c).items():
        both = c.prior[idx].sum(axis=2)  # (patients, muscles)
        pct = 100 * both / both.sum(axis=1, keepdims=True)
        for m, (key, _) in enumerate(MUSCLES):
            row = next(r for r in t1 if r["cohort_group"] == label and r["side"] == "both" and r["structure_key"] == key)
            assert int(row["n"]) == len(idx)
            assert float(row["mean_pct"]) == pytest.approx(pct[:, m].mean())
            assert float(row["sd_pct"]) == pytest.approx(pct[:, m].std(ddof=1))
    assert not any(r["structure_key"] in ("psoas", "femur") for r in t1)


def test_table2_total_loss_matches_numpy(run) -> None:  # noqa: ANN001
    c, tmp, _, _ = run
    t2 = _read(tmp / "out" / "table2_total_loss.csv")
    bad = c.not_compared[0]
    for label, idx in _groups(c).items():
        for s, side in enumerate(SIDES):
            keep = [i for i in idx if not (i == bad and s == c.not_compared[2])]
            loss = (c.prior[keep, :, s] - c.current[keep, :, s]).sum(axis=1)
            row = next(r for r in t2 if r["cohort_group"] == label and r["side"] == side)
            assert int(row["n"]) == len(keep) and int(row["n_excluded"]) == len(idx) - len(keep)
            assert float(row["loss_ml_mean"]) == pytest.approx(loss.mean())
            assert float(row["loss_ml_std"]) == pytest.approx(loss.std(ddof=1))
            q1, med, q3 = np.percentile(loss, [25, 50, 75])
            assert (float(row["loss_ml_q1"]), float(row["loss_ml_median"]), float(row["loss_ml_q3"])) == pytest.approx((q1, med, q3))
            assert (float(row["loss_ml_min"]), float(row["loss_ml_max"])) == pytest.approx((loss.min(), loss.max()))
            per_h2 = loss / c.height[keep] ** 2
            assert float(row["loss_per_height2_mean"]) == pytest.approx(per_h2.mean())
        both = next(r for r in t2 if r["cohort_group"] == label and r["side"] == "both")
        keep = [i for i in idx if i != bad]
        loss = (c.prior[keep] - c.current[keep]).sum(axis=(1, 2))
        assert float(both["loss_ml_median"]) == pytest.approx(np.median(loss))
        ratio = 100 * loss / c.prior[keep].sum(axis=(1, 2))
        assert float(both["mean_loss_ratio_pct"]) == pytest.approx(ratio.mean())


def test_table3_per_muscle_loss_matches_numpy(run) -> None:  # noqa: ANN001
    c, tmp, _, _ = run
    t3 = _read(tmp / "out" / "table3_muscle_loss.csv")
    for label, idx in _groups(c).items():
        for (m, (key, _)), (s, side) in itertools.product(enumerate(MUSCLES), enumerate(SIDES)):
            keep = [i for i in idx if (i, m, s) != c.not_compared]
            loss = c.prior[keep, m, s] - c.current[keep, m, s]
            row = next(r for r in t3 if r["cohort_group"] == label and r["side"] == side and r["structure_key"] == key)
            assert int(row["n"]) == len(keep)
            assert float(row["mean_loss_ml"]) == pytest.approx(loss.mean())
            assert float(row["mean_loss_ratio_pct"]) == pytest.approx((100 * loss / c.prior[keep, m, s]).mean())
            assert float(row["mean_loss_per_height2"]) == pytest.approx((loss / c.height[keep] ** 2).mean())


def _pairwise_auc(smi: np.ndarray, sarc: np.ndarray) -> float:
    wins = 0.0
    for p, n in itertools.product(smi[sarc == 1], smi[sarc == 0]):
        wins += 1.0 if p < n else 0.5 if p == n else 0.0
    return wins / (int(sarc.sum()) * int((sarc == 0).sum()))


def test_roc_auc_and_written_thresholds(run) -> None:  # noqa: ANN001
    c, tmp, summary, _ = run
    roc = _read(tmp / "out" / "roc_smi.csv")
    written = tomllib.loads((tmp / "node.toml").read_text(encoding="utf-8"))
    for sex, key in (("F", "threshold_female_kg_m2"), ("M", "threshold_male_kg_m2")):
        idx = [i for i in range(N) if c.sex[i] == sex]
        smi = c.smi_all[idx]
        sarc = (c.dxa_smi[idx] < (5.4 if sex == "F" else 7.0)).astype(int)
        for group, f in (("gluteal", 0.3), ("all", 1.0)):
            row = next(r for r in roc if r["ct_group"] == group and r["sex"] == sex)
            assert int(row["n"]) == len(idx) and int(row["n_sarcopenia"]) == sarc.sum()
            assert float(row["auc"]) == pytest.approx(_pairwise_auc(smi * f, sarc))
        # the written cut-off (group "all") is the best Youden cut between distinct SMI values
        s = np.unique(smi)
        cuts = (s[:-1] + s[1:]) / 2
        js = [(smi[sarc == 1] < t).mean() + (smi[sarc == 0] >= t).mean() - 1 for t in cuts]
        cut = written["sarcopenia"][key]
        j_cut = (smi[sarc == 1] < cut).mean() + (smi[sarc == 0] >= cut).mean() - 1
        assert j_cut == pytest.approx(max(js))
        assert summary.rocs[("all", sex)].auc == pytest.approx(_pairwise_auc(smi, sarc))
    assert written["sarcopenia"]["calibrated_for_ct"] is True
    assert written["sarcopenia"]["group"] == "all"
    assert f"n={N // 2}" in written["sarcopenia"]["source"]
    assert written["node"] == {"port": 11113} and written["destinations"] == [{"name": "pacs", "port": 4242}]
    text = (tmp / "node.toml").read_text(encoding="utf-8")
    assert text.startswith("# site config\n[node]\nport = 11113 # ours\n")
    assert "# the group whose SMI is assessed\n" in text


def test_correlation_and_figures_are_written(run) -> None:  # noqa: ANN001
    c, tmp, summary, printed = run
    corr = _read(tmp / "out" / "smi_dxa_correlation.csv")
    row = next(r for r in corr if r["ct_group"] == "all" and r["ct_measure"] == "mass_kg")
    from scipy.stats import spearmanr

    assert float(row["rho"]) == pytest.approx(spearmanr(c.mass_all, c.dxa_lean).statistic)
    assert int(row["n"]) == N
    for name in ("fig6_total_loss_box.png", "fig7_muscle_loss_bar.png", "fig8_loss_ratio_bar.png",
                 "fig_roc_smi.png", "fig_mass_vs_dxa.png"):
        assert (tmp / "out" / name).read_bytes()[:8] == PNG
        assert name in summary.files
    assert not summary.skipped
    assert "Table 2. Total muscle volume loss" in printed and "1 unknown patient(s)" in printed


def test_figures_are_skipped_with_a_reason_without_comparisons_or_dxa(tmp_path: Path) -> None:
    _store(tmp_path / "r.db", _cohort(), comparisons=False)
    out = io.StringIO()
    summary = run_cohort(_Settings(tmp_path / "r.db"), out_dir=tmp_path / "out", stream=out)
    assert set(summary.skipped) == {"fig6_total_loss_box.png", "fig7_muscle_loss_bar.png", "fig8_loss_ratio_bar.png",
                                    "fig_roc_smi.png", "fig_mass_vs_dxa.png"}
    assert "skipped fig_roc_smi.png: no DXA sarcopenia labels" in out.getvalue()
    assert summary.group_by == ("sex",)  # fracture_type needs the site CSV
    assert (tmp_path / "out" / "table1_composition.csv").exists()


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ("PID-0000,HOSP,20230101,femoral_neck,F,30,five,", r"line 2, column 'dxa_smi_kg_m2': value 'five'"),
        ("PID-0000,HOSP,20230101,femoral_neck,X,30,5.0,", r"line 2, column 'sex': value 'X'"),
        ("PID-0000,HOSP,2023-13-45,femoral_neck,F,30,5.0,", r"line 2, column 'study_date'"),
        ("PID-0000,HOSP,20230101,femoral_neck,F,30", r"line 2: 6 fields, the header has 8"),
        ("PID-0000,HOSP,20230101,femoral_neck,F,31000,5.0,", r"column 'dxa_lean_mass_kg'.*grams"),
    ],
)
def test_malformed_csv_names_line_and_column(tmp_path: Path, line: str, match: str) -> None:
    _store(tmp_path / "r.db", _cohort(), comparisons=False)
    site = tmp_path / "site.csv"
    site.write_text("patient_id,issuer,study_date,fracture_type,sex,dxa_lean_mass_kg,dxa_smi_kg_m2,dxa_sarcopenia\n"
                    f"{line}\n", encoding="utf-8")
    with pytest.raises(SiteCsvError, match=match):
        run_cohort(_Settings(tmp_path / "r.db"), out_dir=tmp_path / "out", site_csv=site, stream=io.StringIO())


def test_cli_parser_runs_the_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _store(tmp_path / "var" / "thighnode.db", _cohort(), comparisons=False)
    config = tmp_path / "node.toml"
    config.write_text(f'[node]\ndata_dir = "{(tmp_path / "var").as_posix()}"\n', encoding="utf-8")
    parser = build_parser()
    args = parser.parse_args(["cohort", "--config", str(config), "--out", str(tmp_path / "out"), "--group-by", "sex"])
    assert args.func(args) == 0
    assert "cohort: 20 studies, 0 with a prior" in capsys.readouterr().out
    bad = parser.parse_args(["cohort", "--config", str(config), "--out", str(tmp_path / "o2"), "--group-by", "nope"])
    from research.errors import CohortError

    with pytest.raises(CohortError, match="--group-by column 'nope'"):
        bad.func(bad)
