"""`make demo`: Orthanc as the PACS, the node, a phantom thigh CT pushed like a scanner would.

Starts a real Orthanc and `thighnode serve` (demonstration bundle) on free loopback ports under
./demo-out, generates a phantom study (with a prior study in the node's results database, so the
report shows a comparison), sends both with dcmtk's storescu, waits for the SEG, SR and PDF to arrive
in Orthanc, then prints where to see them and the report's table. Press Enter (or Ctrl-C) to stop;
`--no-wait` stops at once (for scripts).

It uses the test suite's small Orthanc and node launchers (tests/support), which start and always stop
the real programs.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from modelkit.phantom import PhantomParams, generate_phantom, write_dicom_series  # noqa: E402
from tests.support.node import NodeProcess  # noqa: E402
from tests.support.orthanc import OrthancServer  # noqa: E402
from tests.support.ports import free_port  # noqa: E402
from thighnode.results import ResultsStore  # noqa: E402

PATIENT = dict(patient_id="DEMO-0001", patient_name="Demo^Phantom", patient_sex="F", birth_date="19520314", height_m=1.62)


def _push(port: int, files: list[Path]) -> None:
    storescu = shutil.which("storescu")
    if storescu is None:
        sys.exit("storescu (Debian package dcmtk) is needed for the demo: apt-get install dcmtk")
    done = subprocess.run(
        [storescu, "-aet", "DEMO_CT", "-aec", "THIGHNODE", "127.0.0.1", str(port), *map(str, files)],
        capture_output=True, text=True,
    )
    if done.returncode != 0:
        sys.exit(f"storescu failed: {done.stderr}")


def _wait_done(node: NodeProcess, study_uid: str, timeout_s: float = 1800) -> dict:
    def finished(s: dict) -> bool:
        jobs = [j for j in s["jobs"] if j["study_uid"] == study_uid]
        return bool(jobs) and jobs[0]["state"] in ("done", "declined", "failed") and s["outbox_counts"].get("pending", 0) == 0

    status = node.wait_for(finished, timeout_s=timeout_s, what=f"study {study_uid}")
    return next(j for j in status["jobs"] if j["study_uid"] == study_uid)


def _truth_pct(prior, follow) -> dict[tuple[str, str], float]:  # noqa: ANN001 - modelkit.phantom.Phantom
    """True change (%) per muscle and side from the phantoms' own labels (both cover the whole anatomy)."""
    from modelkit.phantom import ground_truth

    before, after = ground_truth(prior)["structures"], ground_truth(follow)["structures"]
    return {
        (key, side): 100.0 * (after[key][side]["volume_ml"] / v[side]["volume_ml"] - 1.0)
        for key, v in before.items() for side in ("right", "left") if v[side]["volume_ml"] > 0
    }


def _print_changes(comparison, truth: dict[tuple[str, str], float]) -> None:  # noqa: ANN001 - Comparison
    """Each muscle change against the phantoms' truth: within 5 pp, or withheld with its reason."""
    shown, wrong, withheld = 0, [], []
    for c in comparison.changes:
        true = truth.get((c.key, c.side))
        if true is None or c.group == "bone":
            continue
        if c.compared and c.change_ratio is not None:
            shown += 1
            if abs(100 * c.change_ratio - true) > 5.0:
                wrong.append(f"{c.name} {c.side}: shown {100 * c.change_ratio:+.1f} %, truth {true:+.1f} %")
        else:
            withheld.append(f"{c.name} {c.side} (truth {true:+.1f} %): {c.reason}")
    print(f"\n  changes against the phantoms' truth: {shown} shown, {len(wrong)} of them off by more than 5 pp, "
          f"{len(withheld)} withheld")
    for line in wrong:
        print(f"    OFF  {line}")
    for line in withheld:
        print(f"    withheld  {line}")


def _print_table(db: Path, study_uid: str, truth: dict[tuple[str, str], float] | None = None) -> None:
    store = ResultsStore(db)
    try:
        result = store.get(study_uid)
        comparison = store.comparison(study_uid)
    finally:
        store.close()
    if result is None:
        print("  (no measurements stored)")
        return
    m = result.measurements
    print(f"\n  {'structure':<22}{'right cm³':>10}{'left cm³':>10}{'mean HU R/L':>14}{'change R/L %':>16}  flags")
    for key in dict.fromkeys(s.key for s in m.structures):
        r, l = m.structure(key, "right"), m.structure(key, "left")
        if r is None or l is None:
            continue
        change = ""
        if comparison is not None:
            cr, cl = comparison.change(key, "right"), comparison.change(key, "left")
            fmt = lambda c: f"{100 * c.change_ratio:+.1f}" if c is not None and c.change_ratio is not None else (  # noqa: E731
                "withheld" if c is not None else "-")
            change = f"{fmt(cr)}/{fmt(cl)}"
        flags = ",".join(sorted(set(r.flags) | set(l.flags)))
        print(f"  {r.name:<22}{r.volume_ml:>10.1f}{l.volume_ml:>10.1f}{r.mean_hu:>7.0f}/{l.mean_hu:<6.0f}{change:>16}  {flags}")
    for g in m.groups:
        if g.side == "both" and not g.reported:
            print(f"  group {g.group:<11} {g.withheld_reason}")
        elif g.side == "both":
            smi = f"{g.smi_kg_m2:.2f} kg/m²" if g.smi_kg_m2 is not None else "-"
            print(f"  group {g.group:<11} volume {g.volume_ml:8.1f} cm³  mass {g.mass_g / 1000:6.2f} kg  SMI {smi}")
    if m.sarcopenia is not None:
        s = m.sarcopenia
        print(f"  sarcopenia screen ({s.group}): SMI {s.smi_kg_m2:.2f} vs {s.threshold_kg_m2:.2f} kg/m² "
              f"-> {'below' if s.below_threshold else 'above'}; {s.source}")
    if comparison is not None and truth:
        _print_changes(comparison, truth)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-wait", action="store_true", help="stop everything as soon as the results are in")
    parser.add_argument("--out", default=str(REPO / "demo-out"))
    args = parser.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)

    print("generating a phantom patient: prior and follow-up CT (right-sided atrophy) ...")
    params = dict(seed=4, sex="F", height_m=PATIENT["height_m"], spacing_mm=(3.0, 1.5, 1.5))
    prior = generate_phantom(PhantomParams(**params))
    follow = generate_phantom(PhantomParams(**params, scan_seed=8, implant="right",
                                            atrophy={"vastus_lateralis:right": 0.8, "gluteus_maximus:right": 0.88}))
    studies = []
    for name, phantom, date in (("prior", prior, "20240110"), ("followup", follow, "20240502")):
        uid = f"1.2.826.0.1.3680043.8.498.4242{1 if name == 'prior' else 2}"
        files = write_dicom_series(
            phantom, out / name, **PATIENT, study_uid=uid, series_uid=uid + ".1", frame_of_reference_uid=uid + ".2",
            study_date=date, accession=f"DEMO{date}",
        )
        studies.append((name, uid, files))

    node_port = free_port()
    with OrthancServer(out, aet="PACS", modalities={"THIGHNODE": ("THIGHNODE", "127.0.0.1", node_port)}) as pacs:
        extra = (
            f'[[destinations]]\nname = "pacs"\nae_title = "PACS"\nhost = "127.0.0.1"\nport = {pacs.dicom_port}\n'
        )
        node = NodeProcess(out, quiet_period_s=2.0, extra_config=extra, load_model=True, port=node_port)
        print(f"starting the node (AE THIGHNODE, port {node_port}) with the demonstration model ...")
        node.start(timeout_s=300)
        try:
            for name, uid, files in studies:
                print(f"sending the {name} study ({len(files)} slices) with storescu ...")
                t = time.perf_counter()
                _push(node.port, files)
                job = _wait_done(node, uid)
                print(f"  job {job['job']}: {job['state']} in {time.perf_counter() - t:.0f} s - {job['reason']}")
                print("  stage timings: " + ", ".join(f"{k} {v:.1f} s" for k, v in job["timings_s"].items()))
            follow_uid = studies[-1][1]
            outputs = sorted((node.data_dir / "outputs" / follow_uid).glob("*.dcm"))
            print("\nresults of the follow-up study:")
            for p in outputs:
                print(f"  {p}")
            print(f"\nPACS (Orthanc) explorer: {pacs.url}/app/explorer.html  (studies of patient DEMO-0001)")
            print(f"node status:             .venv/bin/thighnode status --config {node.config}")
            print(f"PDF report:              {out / 'report.pdf'}")
            pdf = next((p for p in outputs if p.name.startswith("pdf_")), None)
            if pdf is not None:
                import pydicom

                (out / "report.pdf").write_bytes(bytes(pydicom.dcmread(pdf).EncapsulatedDocument).rstrip(b"\0"))
            _print_table(node.data_dir / "thighnode.db", follow_uid, _truth_pct(prior, follow))
            if not args.no_wait:
                try:
                    input("\nPress Enter to stop Orthanc and the node ... ")
                except (EOFError, KeyboardInterrupt):
                    pass
        finally:
            node.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
