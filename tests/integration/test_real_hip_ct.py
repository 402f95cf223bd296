"""The real hip CT (TotalSegmentator example: pelvis to proximal femur, left hip prosthesis), written as a
DICOM CT series and pushed with dcmtk storescu into a real `thighnode serve` with the shipped demonstration
bundle: the field-of-view check accepts it by its hips (it was declined as "not a thigh CT"), the job ends
done, and `thighnode status` shows the coverage."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.compare import compare_studies
from tests.integration.test_end_to_end import BUNDLE, _finished, _push
from tests.support.niftict import write_nifti_ct_as_dicom
from tests.support.node import REPO_ROOT, NodeProcess

pytestmark = pytest.mark.integration

STUDY = "1.2.826.0.1.3680043.8.498.66101"


def test_the_real_hip_ct_is_processed_and_its_coverage_shown(tmp_path: Path, shared_data: Path) -> None:
    assert (BUNDLE / "models" / "model.pt").is_file(), "the shipped bundle is missing"
    files = write_nifti_ct_as_dicom(
        shared_data / "totalseg-hip-ct" / "example_ct.nii.gz", tmp_path / "ct", study_uid=STUDY,
        patient_id="TN-HIP-1", height_m=1.75, reverse_slices=True,
    )
    with NodeProcess(tmp_path / "node", quiet_period_s=1.0, load_model=True) as node:
        _push(node.port, files)
        status = node.wait_for(_finished(STUDY), timeout_s=900, what="the hip CT's job")
        job = next(j for j in status["jobs"] if j["study_uid"] == STUDY)
        assert job["state"] == "done", job
        coverage = job["coverage"]
        assert coverage["policy"] == {"accept_regions": ["hip", "thigh"], "min_region_mm": 20.0}
        z0, z1 = coverage["regions"]["hip"]
        assert z1 - z0 >= 45.0 and "thigh" not in coverage["regions"]
        assert any(r.startswith("hip") for r in coverage["from_segmentation"]), coverage  # the gluteal muscles
        text = subprocess.run(
            [sys.executable, "-m", "thighnode", "status", "--config", str(node.config)],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, env=node.env(),
        )
        assert text.returncode == 0, text.stderr
        assert "coverage: pelvis " in text.stdout and f"hip {z0:.0f}..{z1:.0f} mm" in text.stdout
    _assert_sr_reports_only_the_gluteal_group(node.data_dir / "outputs" / STUDY)


def _assert_sr_reports_only_the_gluteal_group(out_dir: Path) -> None:
    """Paper 004 on a hip CT: the gluteal group's SMI (height 1.75 m given) is in the SR; the above-knee and
    all-muscle groups, whose thigh muscles the field of view cuts, have no number."""
    import highdicom as hd

    from dicomout import codes
    from dicomout.sr import PATIENT_TOTALS_ID

    (sr_path,) = sorted(out_dir.glob("sr_*.dcm"))
    report = hd.sr.srread(sr_path).content
    assert isinstance(report, hd.sr.MeasurementReport)
    totals = {g.tracking_identifier: g for g in report.get_image_measurement_groups()}[PATIENT_TOTALS_ID]
    smi_sites = [
        next(k for k, c in codes.GROUP_CODES.items() if c == m.finding_sites[0].value)
        for m in totals.get_measurements(name=codes.SKELETAL_MUSCLE_INDEX)
        if m.finding_sites
    ]
    assert set(smi_sites) == {"gluteal"} and len(smi_sites) == 3, smi_sites  # right, left, both
    assert all(float(m.value) > 0 for m in totals.get_measurements(name=codes.SKELETAL_MUSCLE_INDEX))


def test_the_real_hip_ct_sent_twice_as_prior_and_follow_up_reports_no_change(tmp_path: Path, shared_data: Path) -> None:
    """The same images under two studies of one patient, six months apart: the follow-up is compared with the
    prior, and reports no change: every compared structure within 0.5 % and 0.5 mL, a structure not compared
    says why. The node's metal rules withhold what lies in the prosthesis' slices (config prior.metal_withhold_*),
    so the gluteal muscles are compared or withheld for the metal; the same stored results compared with the
    rules off must compare the right gluteals with no change. Where no femoral-head landmark is found (the
    demonstration model's femur label may run up the scan), a side is aligned by the model-free bone-profile
    registration (pipeline.boneshift), which must give shift 0 at correlation 1."""
    from thighnode.results import ResultsStore

    prior_uid, follow_uid = STUDY + ".7", STUDY + ".8"
    ct = shared_data / "totalseg-hip-ct" / "example_ct.nii.gz"
    prior = write_nifti_ct_as_dicom(ct, tmp_path / "prior", study_uid=prior_uid, patient_id="TN-HIP-3",
                                    height_m=1.75, study_date="20240101")
    follow = write_nifti_ct_as_dicom(ct, tmp_path / "follow", study_uid=follow_uid, patient_id="TN-HIP-3",
                                     height_m=1.75, study_date="20240701", reverse_slices=True)
    with NodeProcess(tmp_path / "node", quiet_period_s=1.0, load_model=True) as node:
        _push(node.port, prior)
        node.wait_for(_finished(prior_uid), timeout_s=900, what="the prior's job")
        _push(node.port, follow)
        status = node.wait_for(_finished(follow_uid), timeout_s=900, what="the follow-up's job")
        job = next(j for j in status["jobs"] if j["study_uid"] == follow_uid)
        assert job["state"] == "done" and "compared with the prior of 20240101" in job["reason"], job
        store = ResultsStore(node.data_dir / "thighnode.db")
        try:
            comparison = store.comparison(follow_uid)
            stored = {uid: (store.get(uid), store.profiles(uid)) for uid in (prior_uid, follow_uid)}
        finally:
            store.close()
    assert comparison is not None and comparison.prior_study_uid == prior_uid and comparison.changes
    _assert_no_change(comparison)
    compared = {(c.key, c.side) for c in comparison.changes if c.compared}
    assert compared, [(c.key, c.side, c.reason) for c in comparison.changes]  # whole structures away from metal
    for key in ("gluteus_maximus", "gluteus_medius", "gluteus_minimus"):
        for side in ("right", "left"):  # the node's defaults: compared, or withheld for the metal (left prosthesis)
            c = comparison.change(key, side)  # or because this hip CT's field of view cuts it ([prior] withhold_partial)
            assert c is not None and (
                c.compared or "metal" in c.reason or c.reason.startswith("the field of view cuts it")), (key, side, c)
    # the numbers behind the withholding: the same stored results compared with the metal rules off must compare
    # every gluteal muscle on both sides, with no change (the alignment and the common range, not the rule)
    (prior_result, prior_profiles), (follow_result, follow_profiles) = stored[prior_uid], stored[follow_uid]
    assert prior_result is not None and follow_result is not None and prior_profiles and follow_profiles
    unruled = compare_studies(
        follow_result.measurements, follow_profiles, prior_result.measurements, prior_profiles,
        current_study_date="20240701", prior_study_date="20240101", prior_study_uid=prior_uid, height_m=1.75,
        metal_withhold_near_pct=None, metal_withhold_slices_pct=None,
    )
    _assert_no_change(unruled)
    for key in ("gluteus_maximus", "gluteus_medius", "gluteus_minimus"):
        assert unruled.change(key, "right").compared, (key, unruled.change(key, "right").reason)
    # aligned on the femoral head, or (no head found: the demonstration model's femur runs up the scan) by the
    # bone profiles, which for one scan twice must give shift 0 at correlation 1
    registrations = re.findall(r"bone profile registration \(correlation ([0-9.]+), shift ([+-][0-9.]+) mm\)",
                               comparison.method)
    assert all(float(r) >= 0.995 and abs(float(z)) < 0.05 for r, z in registrations), comparison.method


def _assert_no_change(comparison) -> None:
    for c in comparison.changes:
        if c.compared:
            assert abs(c.change_ml) <= 0.5 and abs(c.change_ratio) <= 0.005, (c.key, c.side, c.change_ml)
        else:
            assert c.reason and c.change_ml is None and c.change_ratio is None, (c.key, c.side, c.reason)
