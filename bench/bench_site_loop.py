"""The site adaptation loop end to end, as a site walks it, with the commands a site runs (issue 23):

    .venv/bin/python bench/bench_site_loop.py [--patients 8] [--iterations 200] [--out /tmp/site_loop]

1. A node data directory receives ``--patients`` corrected cases (one study per patient) in the layout the node
   writes when a reader sends a corrected SEG (``corrected/<StudyUID>/{case.json, ct/, seg.dcm}``). The cases are
   phantoms *altered against what the demo model learned*: post-operative (every kind of hip implant, cycled),
   obese (fat fraction 0.40-0.50, girth 1.2-1.35), noisier scans (25 HU) and strong atrophy of four muscles
   (0.55-0.75 of normal); the SEG is the phantom's truth written by the node's own SEG builder, as a reader's
   corrected version of the node's SEG would be.
2. ``thighnode train --init site.toml``, the data keys pointed at the node's data directory, and
   ``thighnode train site.toml``: a fine-tune from the deployed demo bundle, patients split by
   ``held_out_fraction``; reported: wall time, seconds per step and per training case.
3. ``thighnode model compare CANDIDATE --node-data-dir DIR --json``: the candidate against the deployed bundle on
   the held-out patients (the baseline is the deployed bundle, measured in the same run).
4. ``thighnode model promote``, ``thighnode status`` (the active model), ``thighnode model rollback``.

Prints each figure; nothing is asserted (tests/modelkit/test_site_training.py and tests/thighnode/test_models.py
test the machinery). CPU only by default; the training uses ``--threads`` threads.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

DEMO = REPO / "bundles" / "thighnode_demo"
STUDY_ROOT = "1.2.826.0.1.3680043.8.498.4242"
KINDS = ("total_hip", "hemi", "nail", "screws", "dhs")
SIDES = ("left", "right", "both")
ATROPHIED = ("gluteus_maximus", "vastus_lateralis", "rectus_femoris", "adductor_longus")


def altered_params(index: int, seed: int):  # -> modelkit.phantom.PhantomParams
    """Subject ``index``: implant kind and side cycled, obese, noisy, four muscles atrophied on one side."""
    import numpy as np

    from modelkit.phantom import PhantomParams

    rng = np.random.default_rng(seed * 1000 + index)
    side = SIDES[index % len(SIDES)]
    atrophy_side = "right" if side == "left" else "left"
    return PhantomParams(
        seed=seed * 100 + index, sex="FM"[index % 2], height_m=float(rng.uniform(1.55, 1.85)),
        size=float(rng.uniform(1.2, 1.35)), fat_fraction=float(rng.uniform(0.40, 0.50)),
        atrophy={f"{k}:{atrophy_side}": float(rng.uniform(0.55, 0.75)) for k in ATROPHIED},
        implant=side, implant_kind=KINDS[index % len(KINDS)], spacing_mm=(3.0, 3.0, 3.0), noise_hu=25.0,
    )


def write_corrected_case(node_dir: Path, index: int, seed: int) -> Path:
    """One corrected study as the node stores it (thighnode.corrections.store_case's layout)."""
    import hashlib

    import numpy as np

    from dicomout.seg import build_seg
    from modelkit.phantom import generate_phantom, write_dicom_series
    from pipeline.labels import load_label_table
    from pipeline.postprocess import split_sides
    from pipeline.types import Segmentation
    from pipeline.volume import load_volume

    params = altered_params(index, seed)
    phantom = generate_phantom(params)
    study = f"{STUDY_ROOT}.{seed}.{index}"
    case = node_dir / "corrected" / study
    patient_id = f"SITE-{seed}-{index:03d}"
    files = write_dicom_series(phantom, case / "ct", patient_id=patient_id, patient_name="Site^Loop",
                               height_m=params.height_m, study_uid=study, series_uid=study + ".1",
                               frame_of_reference_uid=study + ".2", study_date="20260101")
    volume = load_volume(files)
    z_vol = volume.affine_lps[2, 3] + np.arange(volume.shape[0]) * volume.affine_lps[2, 0]
    z_ph = phantom.affine_lps[2, 3] + np.arange(phantom.labels.shape[0]) * phantom.affine_lps[2, 0]
    label_map = phantom.labels[[int(np.argmin(np.abs(z_ph - z))) for z in z_vol]]
    labels = load_label_table()
    seg = Segmentation(label_map, split_sides(label_map, volume.affine_lps, phantom.midline_x_mm), labels,
                       "reader", "corrected", volume.affine_lps)
    ds = build_seg(volume, seg, files, manufacturer="3D Slicer", software_version="5", device_serial="0",
                   series_uid=study + ".9", instance_uid=study + ".9.1", series_description="corrected")
    ds.ContentCreatorName = "Reader^Site"
    ds.save_as(case / "seg.dcm", enforce_file_format=True)
    record = {"study_uid": study, "series_uid": study + ".1",
              "patient_key": hashlib.sha256(f"/{patient_id}".encode()).hexdigest(),
              "seg_sop_instance_uid": study + ".9.1", "observer": "Reader^Site", "received_at": "2026-12-07T10:00:00Z"}
    (case / "case.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return case


def run(cmd: list[str], env: dict[str, str]) -> tuple[float, str]:
    started = time.monotonic()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return time.monotonic() - started, done.stdout


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--patients", type=int, default=8)
    ap.add_argument("--iterations", type=int, default=200)
    ap.add_argument("--held-out-fraction", type=float, default=0.25)
    ap.add_argument("--seed", type=int, default=23)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("/tmp/thighnode_site_loop"))
    args = ap.parse_args(argv)

    import shutil

    if args.out.exists():
        shutil.rmtree(args.out)
    node_dir = args.out / "node"
    node_dir.mkdir(parents=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "OMP_WAIT_POLICY": "PASSIVE"}
    thighnode = [sys.executable, "-m", "thighnode"]
    config = args.out / "node.toml"
    config.write_text(f'[node]\ndata_dir = "{node_dir}"\n[model]\nbundle = "{DEMO}"\ndevice = "cpu"\n', encoding="utf-8")

    t = time.monotonic()
    for i in range(args.patients):
        write_corrected_case(node_dir, i, args.seed)
    print(f"corrected cases: {args.patients} patients written in {time.monotonic() - t:.1f} s ({node_dir}/corrected)")

    site = args.out / "site.toml"
    run(thighnode + ["train", "--init", str(site)], env)
    text = site.read_text(encoding="utf-8")
    text = re.sub(r"^data_dirs = .*$", "data_dirs = []", text, flags=re.M)
    text = re.sub(r"^val_dirs = .*$", "", text, flags=re.M)
    text = re.sub(r"^# node_data_dir = .*$", f'node_data_dir = "{node_dir}"', text, flags=re.M)
    text = re.sub(r"^held_out_fraction = .*$", f"held_out_fraction = {args.held_out_fraction}", text, flags=re.M)
    text = re.sub(r"^output_bundle = .*$", f'output_bundle = "{args.out / "candidate"}"', text, flags=re.M)
    text = re.sub(r"^checkpoint_dir = .*$", f'checkpoint_dir = "{args.out / "checkpoints"}"', text, flags=re.M)
    text = re.sub(r"^seed = .*$", f"seed = {args.seed}", text, flags=re.M)
    text = re.sub(r"^num_threads = .*$", f"num_threads = {args.threads}", text, flags=re.M)
    site.write_text(text, encoding="utf-8")
    seconds, _ = run(thighnode + ["train", str(site), "--iterations", str(args.iterations)], env)
    meta = json.loads((args.out / "candidate" / "configs" / "metadata.json").read_text(encoding="utf-8"))
    held = meta.get("training", {}).get("held_out", {})
    n_train = len(held.get("train_study_uids", [])) or args.patients - len(held.get("study_uids", []))
    print(f"fine-tune: {args.iterations} steps in {seconds:.0f} s ({seconds / args.iterations:.2f} s per step, "
          f"{seconds / max(n_train, 1):.0f} s per training case; {n_train} training, "
          f"{len(held.get('study_uids', []))} held-out studies)")

    seconds, out = run(thighnode + ["model", "compare", "--config", str(config), str(args.out / "candidate"),
                                    "--node-data-dir", str(node_dir), "--json"], env)
    record = json.loads(out)
    m = record["means"]
    print(f"model compare on the held-out patients ({len(record['cases'])} cases, {seconds:.0f} s): "
          f"deployed (baseline) Dice {m['deployed']['dice']:.3f}, volume error {m['deployed']['volume_error_pct']:.2f} %; "
          f"candidate Dice {m['candidate']['dice']:.3f}, volume error {m['candidate']['volume_error_pct']:.2f} %")
    print(f"  verdict: {record['summary']}")
    for role, u in (record.get("uncertainty_calibration") or {}).items():
        if u:
            print(f"  uncertainty, {role}: Spearman entropy vs 1-Dice {u['spearman_entropy_vs_dice_loss']}, AUC "
                  f"{u['auc_entropy_for_failure']}, flag sensitivity {u['flag_sensitivity']}, specificity "
                  f"{u['flag_specificity']}")

    seconds, out = run(thighnode + ["model", "promote", "--config", str(config), str(args.out / "candidate")], env)
    print(f"promote ({seconds:.1f} s): {out.strip().splitlines()[0] if out.strip() else ''}")
    _, status = run(thighnode + ["status", "--config", str(config), "--json"], env)
    print(f"status, active model: {json.dumps(json.loads(status).get('model', {}).get('active', {}))[:300]}")
    seconds, out = run(thighnode + ["model", "rollback", "--config", str(config)], env)
    print(f"rollback ({seconds:.1f} s): {out.strip().splitlines()[0] if out.strip() else ''}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
