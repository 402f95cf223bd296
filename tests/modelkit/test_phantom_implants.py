"""Implants of hip-fracture surgery in the phantom (modelkit/phantom_implants.py, phantom_artifacts.py)
and their share in training phantom sets, on coarse grids."""

from __future__ import annotations

import numpy as np
import pytest

from modelkit.phantom import IMPLANT_KINDS, Phantom, PhantomError, PhantomParams, generate_phantom, ground_truth
from modelkit.phantom_dataset import subject_params
from modelkit.phantom_implants import Shell, implant_parts
from modelkit.phantom_shapes import Femur, draw_subject
from modelkit.train_settings import PhantomDataSettings, TrainSettings
from modelkit.training import phantom_params
from pipeline.labels import LabelTable, load_label_table

SPACING = (4.0, 4.0, 4.0)
SEED = 5
METAL_HU = 3000.0


@pytest.fixture(scope="module")
def table() -> LabelTable:
    return load_label_table()


_CACHE: dict[tuple[str | None, str], Phantom] = {}


def _phantom(side: str | None, kind: str = "total_hip") -> Phantom:
    if (side, kind) not in _CACHE:
        _CACHE[(side, kind)] = generate_phantom(PhantomParams(seed=SEED, spacing_mm=SPACING, implant=side, implant_kind=kind))
    return _CACHE[(side, kind)]


def _coords(p: Phantom) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """z per slice, x per column, y per row (mm)."""
    a = p.affine_lps
    k, r, c = (np.arange(n) for n in p.hu.shape)
    return a[2, 3] + a[2, 0] * k, a[0, 3] + a[0, 2] * c, a[1, 3] + a[1, 1] * r


def _femur(params: PhantomParams) -> Femur:
    """The subject's femoral landmarks (the subject stream is the same as generate_phantom's)."""
    rng = np.random.default_rng(np.random.SeedSequence(params.seed).spawn(1)[0])
    return Femur(draw_subject(params, rng))


@pytest.mark.parametrize("kind", IMPLANT_KINDS)
@pytest.mark.parametrize("side", ["left", "right", "both"])
def test_metal_on_the_chosen_sides_with_label_0(kind: str, side: str) -> None:
    p = _phantom(side, kind)
    metal = p.hu >= METAL_HU
    assert metal.sum() > 20
    assert (p.labels[metal] == 0).all()  # bone (and muscle) labels exclude the metal
    _, x, _ = _coords(p)
    c = np.nonzero(metal)[2]
    left = x[c] > p.midline_x_mm
    if side == "left":
        assert left.all()
    elif side == "right":
        assert not left.any()
    else:
        assert 0.35 < left.mean() < 0.65
    assert "femur" in p.metal_structures


@pytest.mark.parametrize("kind", IMPLANT_KINDS)
def test_metal_lies_where_the_kind_puts_it(kind: str, table: LabelTable) -> None:
    p = _phantom("left", kind)
    f = _femur(p.params)
    z, _, _ = _coords(p)
    metal = p.hu >= METAL_HU
    zk = z[np.nonzero(metal.any(axis=(1, 2)))[0]]
    head_top = f.head[2] + f.head_r
    assert zk.max() <= head_top + 8.0  # nothing above the hip (cup rim at most)
    assert zk.max() >= f.head[2] - 8.0  # every kind reaches into the femoral head
    if kind in ("total_hip", "hemi"):
        assert -300.0 * f.zs < zk.min() < -200.0 * f.zs  # stem down the canal
    elif kind == "nail":
        assert zk.min() < f.gt[2] - 150.0  # >= ~200 mm long
    elif kind == "screws":
        assert zk.min() > f.neck_base[2] - 40.0  # head-neck region only
    else:  # dhs: plate and cortical screws below the trochanter, no long stem
        assert f.neck_base[2] - 120.0 < zk.min() < f.neck_base[2] - 50.0


def test_femur_label_surrounds_a_nail(table: LabelTable) -> None:
    p = _phantom("left", "nail")
    f = _femur(p.params)
    z, x, _ = _coords(p)
    fid = table.by_key("femur").id
    left = x > p.midline_x_mm
    checked = 0
    for k in np.flatnonzero((z < f.gt[2] - 60.0) & (p.hu >= METAL_HU).any(axis=(1, 2))):
        metal = (p.hu[k] >= METAL_HU) & left[None, :]
        femur = (p.labels[k] == fid) & left[None, :]
        mr, mc = np.nonzero(metal)
        fr, fc = np.nonzero(femur)
        if mr.size == 0 or mc.min() < fc.min():  # a distal locking bolt's head may stand out
            continue
        assert fr.min() < mr.min() and mr.max() < fr.max() and fc.min() < mc.min() and mc.max() < fc.max()
        checked += 1
    assert checked >= 20


def test_only_total_hip_has_a_cup() -> None:
    params = PhantomParams(seed=SEED)
    subj = draw_subject(params, np.random.default_rng(np.random.SeedSequence(SEED).spawn(1)[0]))
    for kind in IMPLANT_KINDS:
        metal, _ = implant_parts(PhantomParams(seed=SEED, implant="left", implant_kind=kind), subj)
        cups = [m for m in metal if isinstance(m, Shell) and m.r_in_mm > Femur(subj).head_r]
        assert bool(cups) == (kind == "total_hip"), kind


def test_beam_hardening_darkens_soft_tissue_between_the_two_stems(table: LabelTable) -> None:
    both, plain = _phantom("both"), _phantom(None)
    f = _femur(both.params)
    z, x, y = _coords(both)
    k = int(np.argmin(np.abs(z - (f.neck_base[2] - 70.0))))
    metal = both.hu[k] >= METAL_HU
    left = (x > both.midline_x_mm)[None, :] & np.ones_like(metal)
    rr, cc = np.nonzero(metal & left)
    rl, cl = np.nonzero(metal & ~left)
    (x1, y1), (x2, y2) = (x[cc].mean(), y[rr].mean()), (x[cl].mean(), y[rl].mean())
    X, Y = np.meshgrid(x, y)
    length = np.hypot(x2 - x1, y2 - y1)
    along = ((X - x1) * (x2 - x1) + (Y - y1) * (y2 - y1)) / length
    perp = np.abs((X - x1) * (y2 - y1) - (Y - y1) * (x2 - x1)) / length
    soft = np.isin(plain.labels[k], [lab.id for lab in table.labels if not lab.is_bone])
    line = soft & (perp <= 4.0) & (along > 30.0) & (along < length - 30.0)
    assert line.sum() >= 10
    drop = float(plain.hu[k][line].mean() - both.hu[k][line].mean())
    assert drop > 80.0


def test_halo_and_metal_hu() -> None:
    p = _phantom("right", "screws")
    metal = p.hu >= METAL_HU
    assert metal.any() and float(p.hu[metal].min()) >= METAL_HU


@pytest.mark.parametrize(("field", "value", "allowed"), [
    ("implant", "middle", "'both'"), ("implant_kind", "plate", "'dhs'"), ("implant_kind", None, "'nail'"),
])
def test_invalid_implant_rejected(field: str, value: object, allowed: str) -> None:
    with pytest.raises(PhantomError, match=f"{field} is {value!r}.*{allowed}"):
        PhantomParams(seed=1, **{field: value})


def test_truth_records_implant_side_and_kind(table: LabelTable) -> None:
    gt = ground_truth(_phantom("both", "dhs"), table)
    assert gt["params"]["implant"] == "both" and gt["params"]["implant_kind"] == "dhs"


def test_training_set_implant_draw_leaves_other_subjects_alone() -> None:
    plain = PhantomDataSettings(300, 7, (4.0, 4.0, 4.0))
    some = PhantomDataSettings(300, 7, (4.0, 4.0, 4.0), implant_fraction=0.5)
    drawn = [(phantom_params(plain, i), phantom_params(some, i)) for i in range(300)]
    assert all(a.implant is None for a, _ in drawn)
    with_implant = [b for _, b in drawn if b.implant is not None]
    assert 110 < len(with_implant) < 190
    for a, b in drawn:  # only the implant differs
        assert a.to_record() | {"implant": b.implant, "implant_kind": b.implant_kind} == b.to_record()
    assert {b.implant_kind for b in with_implant} == set(IMPLANT_KINDS)
    sides = [b.implant for b in with_implant]
    assert 0.1 < sides.count("both") / len(sides) < 0.3
    assert 0.3 < sides.count("left") / len(sides) < 0.5


def test_implant_fraction_read_and_validated_from_toml_tables(tmp_path) -> None:
    base = {"data_dirs": [str(tmp_path)], "output_bundle": str(tmp_path / "b"), "checkpoint_dir": str(tmp_path / "c")}
    entry = {"dir": str(tmp_path / "p"), "n_subjects": 2, "seed": 1}
    s = TrainSettings.from_dict({**base, "phantoms": [{**entry, "implant_fraction": 0.3}]})
    assert s.phantoms[str(tmp_path / "p")].implant_fraction == 0.3
    assert TrainSettings.from_dict({**base, "phantoms": [entry]}).phantoms[str(tmp_path / "p")].implant_fraction == 0.0
    with pytest.raises(ValueError, match="implant_fraction is 1.5"):
        TrainSettings.from_dict({**base, "phantoms": [{**entry, "implant_fraction": 1.5}]})
    with pytest.raises(ValueError, match="implant_fractoin"):
        TrainSettings.from_dict({**base, "phantoms": [{**entry, "implant_fractoin": 0.3}]})


def test_dataset_subjects_draw_kind_and_side() -> None:
    drawn = [subject_params(i, 3, implant_fraction=1.0) for i in range(120)]
    assert {p.implant_kind for p in drawn} == set(IMPLANT_KINDS)
    assert {p.implant for p in drawn} == {"left", "right", "both"}
    assert all(subject_params(i, 3).implant is None for i in range(20))


def test_training_set_fov_cut_draw_limits_fields_of_view_and_nothing_else() -> None:
    plain = PhantomDataSettings(300, 7, (4.0, 4.0, 4.0))
    cut = PhantomDataSettings(300, 7, (4.0, 4.0, 4.0), fov_cut_fraction=0.5)
    drawn = [(phantom_params(plain, i), phantom_params(cut, i)) for i in range(300)]
    assert all(a.fov_top_mm is None and a.fov_bottom_mm is None for a, _ in drawn)
    for a, b in drawn:  # only the field of view differs
        assert a.to_record() | {"fov_top_mm": b.fov_top_mm, "fov_bottom_mm": b.fov_bottom_mm} == b.to_record()
    hip = [b.fov_bottom_mm for _, b in drawn if b.fov_bottom_mm is not None]
    thigh = [b.fov_top_mm for _, b in drawn if b.fov_top_mm is not None]
    assert 0.35 < (len(hip) + len(thigh)) / 300 < 0.65 and len(hip) > len(thigh) > 0
    assert all(-200.0 <= z <= -110.0 for z in hip) and all(-150.0 <= z <= -70.0 for z in thigh)
    with pytest.raises(ValueError, match="fov_cut_fraction is 2"):
        PhantomDataSettings(3, 7, fov_cut_fraction=2)
