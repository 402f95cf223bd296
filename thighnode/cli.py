"""The ``thighnode`` command line.

Every command takes ``--config FILE`` (the node configuration, read over the
defaults in config/node.toml). Logging is set up here and only here; logs carry
identifiers (UIDs, job ids), never patient names, IDs or birth dates.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import signal
import sys
from pathlib import Path
from typing import Any, Sequence

from node_errors import NodeError

log = logging.getLogger("thighnode")


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level, logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s [%(threadName)s]: %(message)s",
        stream=sys.stderr,
    )
    # pynetdicom is chatty at INFO (and its DEBUG dumps datasets, i.e. patient data).
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("apscheduler").setLevel(logging.WARNING)


def _settings(args: argparse.Namespace):  # noqa: ANN202
    from thighnode.settings import load_settings

    return load_settings(args.config)


# -- serve -------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    from thighnode.node import Node

    settings = _settings(args)
    _setup_logging(settings.node.log_level)
    node = Node(settings, load_model=not args.no_model)

    def _stop(signum: int, _frame: Any) -> None:
        log.info("signal %d received, stopping", signum)
        node._stopping.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    node.start()
    try:
        node.wait()
    finally:
        node.stop()
    return 0


# -- echo --------------------------------------------------------------------------------


def cmd_echo(args: argparse.Namespace) -> int:
    from dicomout.sender import echo
    from thighnode.node import destinations_of

    settings = _settings(args)
    _setup_logging("WARNING")
    destinations = destinations_of(settings)
    if args.destination not in destinations:
        known = ", ".join(destinations) or "none configured"
        print(f"error: destination {args.destination!r} is not configured; configured: {known}", file=sys.stderr)
        return 2
    dest = destinations[args.destination]
    result = echo(dest)
    where = f"{dest.ae_title}@{dest.host}:{dest.port}"
    if result.ok:
        print(f"C-ECHO {args.destination} ({where}): success")
        return 0
    print(f"C-ECHO {args.destination} ({where}) failed: {result.error}", file=sys.stderr)
    return 1


# -- status ------------------------------------------------------------------------------


def _when(ts: float | None) -> str:
    if not ts:
        return "-"
    return dt.datetime.fromtimestamp(ts, tz=dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


def status_report(settings: Any) -> dict[str, Any]:
    """Studies, jobs and outbox with states and reasons (what `thighnode status` prints)."""
    from dicomout.outbox import Outbox
    from scp.index import InstanceIndex
    from thighnode.jobs import JobStore

    if not settings.db_path.exists():
        return {"data_dir": str(settings.node.data_dir), "studies": [], "jobs": [], "outbox": [], "outbox_counts": {}}
    from thighnode.priors import PriorRequests

    index = InstanceIndex(settings.db_path)
    jobs = JobStore(settings.db_path)
    outbox = Outbox(settings.db_path)
    priors = PriorRequests(settings.db_path)
    try:
        studies = [
            {
                "study_uid": a.study_instance_uid,
                "instances": a.instance_count,
                "non_ct": a.non_ct_count,
                "first_received": _when(a.first_received_at),
                "last_received": _when(a.last_received_at),
            }
            for a in index.activity()
        ]
        job_rows = [
            {
                "job": j.id,
                "study_uid": j.study_uid,
                "state": j.state,
                "reason": j.reason,
                "attempts": j.attempts,
                "series_uid": j.series_uid,
                "updated": _when(j.updated_at),
                "timings_s": j.timings_s,
            }
            for j in jobs.jobs()
        ]
        items = [
            {
                "item": i.id,
                "destination": i.destination,
                "sop_instance_uid": i.sop_instance_uid,
                "study_uid": i.study_instance_uid,
                "job": i.job_id,
                "state": i.state,
                "attempts": i.attempts,
                "next_attempt": _when(i.next_attempt_at) if i.state == "pending" else "-",
                "last_error": i.last_error,
            }
            for i in outbox.items()
        ]
        prior_rows = [
            {
                "prior_study_uid": r.prior_study_uid,
                "for_study_uid": r.for_study_uid,
                "state": r.state,
                "attempts": r.attempts,
                "last_error": r.last_error,
            }
            for s in studies
            for r in priors.for_study(s["study_uid"])
        ]
        return {
            "data_dir": str(settings.node.data_dir),
            "studies": studies,
            "prior_requests": prior_rows,
            "jobs": job_rows,
            "job_counts": jobs.counts(),
            "outbox": items,
            "outbox_counts": outbox.counts(),
        }
    finally:
        for store in (index, jobs, outbox, priors):
            close = getattr(store, "close", None)
            if close is not None:
                close()


def cmd_status(args: argparse.Namespace) -> int:
    settings = _settings(args)
    report = status_report(settings)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"data directory: {report['data_dir']}")
    print(f"\nstudies ({len(report['studies'])}):")
    for s in report["studies"]:
        print(f"  {s['study_uid']}  instances={s['instances']} non-CT={s['non_ct']}  last received {s['last_received']}")
    print(f"\njobs ({len(report['jobs'])}): {report.get('job_counts', {})}")
    for j in report["jobs"]:
        timings = " ".join(f"{k}={v:.2f}s" for k, v in j["timings_s"].items())
        print(f"  job {j['job']:>5}  {j['state']:<9} study {j['study_uid']}  attempts={j['attempts']}  {timings}")
        if j["reason"]:
            print(f"             reason: {j['reason']}")
    if report.get("prior_requests"):
        print(f"\nprior studies requested from the PACS ({len(report['prior_requests'])}):")
        for r in report["prior_requests"]:
            print(f"  prior {r['prior_study_uid']} for {r['for_study_uid']}: {r['state']} (attempts {r['attempts']})")
            if r["last_error"]:
                print(f"             error: {r['last_error']}")
    print(f"\noutbox ({len(report['outbox'])}): {report['outbox_counts']}")
    for i in report["outbox"]:
        print(
            f"  item {i['item']:>5}  {i['state']:<8} -> {i['destination']}  {i['sop_instance_uid']}  "
            f"attempts={i['attempts']} next={i['next_attempt']}"
        )
        if i["last_error"]:
            print(f"             error: {i['last_error']}")
    return 0


def cmd_retry(args: argparse.Namespace) -> int:
    from thighnode.jobs import JobStore

    settings = _settings(args)
    store = JobStore(settings.db_path)
    try:
        store.retry(args.job)
    finally:
        store.close()
    print(f"job {args.job} is ready again; a running node will pick it up")
    return 0


def cmd_patient_set_height(args: argparse.Namespace) -> int:
    from thighnode.results import ResultsStore

    settings = _settings(args)
    store = ResultsStore(settings.db_path)
    try:
        store.set_height(args.patient_id, args.height_m, issuer=args.issuer)
    finally:
        store.close()
    print(f"height {args.height_m:.2f} m recorded; used for this patient's studies without PatientSize")
    return 0


# -- phantom / train / evaluate ------------------------------------------------------------


def cmd_phantom(args: argparse.Namespace) -> int:
    from modelkit.phantom import generate_dataset

    _setup_logging("INFO")
    spacing = tuple(float(v) for v in args.spacing.split(","))
    if len(spacing) == 1:
        spacing = spacing * 3
    paths = generate_dataset(
        Path(args.out),
        n_subjects=args.subjects,
        seed=args.seed,
        spacing_mm=spacing,  # type: ignore[arg-type]
        nifti=not args.no_nifti,
        dicom=args.dicom,
        follow_up=args.follow_up,
    )
    print(f"wrote {len(paths)} phantom subject(s) under {args.out}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from modelkit.training import main as train_main

    _setup_logging("INFO")
    argv = ["--config", str(args.train_config)]
    if args.resume:
        argv += ["--resume", str(args.resume)]
    if args.init_weights:
        argv += ["--init-weights", str(args.init_weights)]
    if args.iterations:
        argv += ["--iterations", str(args.iterations)]
    if args.output:
        argv += ["--output", str(args.output)]
    return int(train_main(argv) or 0)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from modelkit.evaluation import evaluate_bundle

    _setup_logging("INFO")
    data = [Path(d) for d in args.data] if args.data else None
    if data is None:
        from modelkit.phantom import generate_dataset
        import tempfile

        tmp = Path(tempfile.mkdtemp(prefix="thighnode-eval-"))
        generate_dataset(tmp, n_subjects=args.phantoms, seed=args.seed, spacing_mm=(2.0, 2.0, 2.0))
        data = tmp
    report = evaluate_bundle(Path(args.bundle), data, csv_path=Path(args.csv) if args.csv else None)
    print(report.format_table())
    if args.side_check:
        from modelkit.sidecheck import run_sidecheck

        result = run_sidecheck(Path(args.bundle))
        print("\nside check: one phantom leg atrophied (modelkit.sidecheck)")
        print(result.format_table())
        if not result.passed:
            return 1
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from modelkit.calibration import calibrate_bundle, format_result

    _setup_logging("INFO")
    iterations = {} if args.iterations is None else {"iterations": args.iterations}
    result = calibrate_bundle(Path(args.bundle), [Path(d) for d in args.data], write=not args.dry_run,
                              objective=args.objective, **iterations)
    print(format_result(result))
    return 0


# -- parser ------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="thighnode", description="thighnode: a DICOM node that segments and measures thigh and hip muscles on CT"
    )
    parser.add_argument("--version", action="version", version="thighnode 0.1.0")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        p.add_argument("--config", type=Path, default=None, help="node configuration file (TOML)")
        return p

    p = add("serve", "run the node: DICOM ingress, processing, outbox")
    p.add_argument("--no-model", action="store_true", help="receive and assemble only; do not load the model")
    p.set_defaults(func=cmd_serve)

    p = add("echo", "C-ECHO a configured destination")
    p.add_argument("destination", help="the destination's name in the configuration")
    p.set_defaults(func=cmd_echo)

    p = add("status", "studies, jobs and outbox with states and reasons")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_status)

    p = add("retry", "put a failed job back in the queue")
    p.add_argument("job", type=int)
    p.set_defaults(func=cmd_retry)

    patient = sub.add_parser("patient", help="patient data the node uses (height)")
    patient_sub = patient.add_subparsers(dest="patient_command", required=True)
    p = patient_sub.add_parser("set-height", help="record a patient's height (when studies lack PatientSize)")
    p.add_argument("--config", type=Path, default=None, help="node configuration file (TOML)")
    p.add_argument("patient_id", help="PatientID (0010,0020) as in the studies")
    p.add_argument("height_m", type=float, help="height in metres, e.g. 1.72")
    p.add_argument("--issuer", default="", help="IssuerOfPatientID (0010,0021), if the site uses one")
    p.set_defaults(func=cmd_patient_set_height)

    p = add("phantom", "generate labelled thigh CT phantoms (NIfTI pairs, DICOM series, ground truth)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--subjects", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--spacing", default="2.0", help="voxel size in mm: one value or dz,dy,dx")
    p.add_argument("--dicom", action="store_true", help="also write DICOM CT series")
    p.add_argument("--no-nifti", action="store_true", help="do not write NIfTI pairs")
    p.add_argument("--follow-up", action="store_true", help="also write a follow-up study with known atrophy")
    p.set_defaults(func=cmd_phantom)

    p = add("train", "train a model bundle from labelled CTs (NIfTI pairs or DICOM CT + DICOM-SEG)")
    p.add_argument("train_config", type=Path, help="training settings (TOML), e.g. config/train_demo.toml")
    p.add_argument("--resume", type=Path, default=None, help="checkpoint to resume from")
    p.add_argument("--init-weights", type=Path, default=None,
                   help="start from this bundle's weights (fine-tuning; same architecture)")
    p.add_argument("--iterations", type=int, default=None, help="total iterations (overrides the settings)")
    p.add_argument("--output", type=Path, default=None, help="bundle folder (overrides output_bundle)")
    p.set_defaults(func=cmd_train)

    from research.cohort import add_cohort_parser

    add_cohort_parser(sub)

    p = add("calibrate", "fit a bundle's per-class volume calibration on labelled cases (a validation set)")
    p.add_argument("--bundle", required=True)
    p.add_argument("--data", required=True, nargs="+", help="folder(s) of NIfTI pairs; never the test set")
    p.add_argument("--iterations", type=int, default=None,
                   help="at most this many rounds (default modelkit.calibration.MAX_ITERATIONS); the fit stops "
                        "when every class is within modelkit.calibration.TOLERANCE or after PATIENCE rounds "
                        "without improvement, keeping the best round")
    p.add_argument("--objective", choices=("pooled", "median"), default="pooled",
                   help="match per class the volumes pooled over the cases, or the median case's ratio "
                        "(each subject counts once; default %(default)s)")
    p.add_argument("--dry-run", action="store_true", help="print the fit without writing the bundle")
    p.set_defaults(func=cmd_calibrate)

    p = add("evaluate", "per-structure Dice and volume difference of a bundle on a labelled set")
    p.add_argument("--bundle", required=True)
    p.add_argument("--data", default=None, nargs="+",
                   help="labelled folders (NIfTI pairs), pooled in one table; default: fresh phantoms")
    p.add_argument("--phantoms", type=int, default=4, help="number of held-out phantoms when --data is not given")
    p.add_argument("--seed", type=int, default=9000, help="seed of the held-out phantoms")
    p.add_argument("--csv", default=None, help="write the table as CSV")
    p.add_argument("--side-check", action="store_true",
                   help="also segment a phantom pair with one leg atrophied: is the loss on that side only? (exit 1 if not)")
    p.set_defaults(func=cmd_evaluate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except NodeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
