"""The ``thighnode`` command line.

Every command takes ``--config FILE`` (the node configuration, read over the
defaults in config/node.toml). Logging is set up here and only here; logs carry
identifiers (UIDs, job ids), never patient names, IDs or birth dates.

The node's commands (serve, worker, echo, status, retry, resend, patient) are here; the offline ones (phantom, train,
evaluate, calibrate, sidecheck, realcheck: :mod:`modelkit`; cohort: :mod:`research`) are in
:mod:`thighnode.cli_offline`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import signal
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from node_errors import NodeError
from thighnode.cli_backfill import add_backfill_command
from thighnode.cli_model import add_model_commands
from thighnode.cli_offline import add_offline_commands

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


def cmd_worker(args: argparse.Namespace) -> int:
    """A Celery worker ([compute] backend = "celery"): one process, one task at a time (thighnode.compute)."""
    try:
        from thighnode.compute import run_worker
    except ImportError as exc:
        print(f"error: thighnode worker needs Celery ({exc}); pip install 'thighnode[celery]'", file=sys.stderr)
        return 2
    from thighnode.node import build_segmenter

    settings = _settings(args)
    _setup_logging(settings.node.log_level)
    logging.getLogger("celery").setLevel(logging.WARNING)
    if settings.compute.backend != "celery":
        log.warning("[compute] backend is %r: the node does not send jobs to workers", settings.compute.backend)
    run_worker(settings, (lambda _s: None) if args.no_model else build_segmenter, name=args.name,
               log_level=settings.node.log_level)
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


def _uid_name(uid: str) -> str:
    """The registered name of a UID ("Deflated Explicit VR Little Endian"), else the UID ("" stays "")."""
    from pydicom.uid import UID

    return UID(uid).name if uid else ""


def _job_row(j: Any) -> dict[str, Any]:
    """One job of `thighnode status --json`: its state, timings, coverage and low-confidence structures."""
    return {
        "job": j.id,
        "study_uid": j.study_uid,
        "state": j.state,
        "reason": j.reason,
        "attempts": j.attempts,
        "series_uid": j.series_uid,
        "updated": _when(j.updated_at),
        "timings_s": j.timings_s,
        "coverage": j.result.get("coverage", {}), **({"kind": j.result["kind"]} if "kind" in j.result else {}),
        "uncertainty": j.result.get("uncertainty", {}),
    }


def status_report(settings: Any, refusals: int = 10) -> dict[str, Any]:
    """The model (active and loaded: thighnode.models.model_status), studies, jobs and outbox with states and
    reasons, the last ``refusals`` receive-time refusals with counts, and duplicate conflicts (what
    `thighnode status` prints)."""
    from thighnode.models import model_status

    stores = _stores_report(settings)
    return {"data_dir": stores.pop("data_dir"), "model": model_status(settings), **stores,
            **_receive_report(settings.database, refusals)}


def _receive_report(db_path: Any, last: int) -> dict[str, Any]:
    """Receive-time refusals (scp.refusals: the last ``last``, counts per status over all time and the last
    24 h) and duplicate SOP Instances that differed from the copy kept (scp.index conflicts)."""
    import time

    from scp.index import InstanceIndex
    from scp.refusals import RefusalLog

    if isinstance(db_path, Path) and not db_path.exists():
        return {"refusals": {"counts": {}, "counts_24h": {}, "recent": []}, "conflicts": []}
    log_ = RefusalLog(db_path)
    index = InstanceIndex(db_path)
    try:
        refusals = {
            "counts": log_.counts(),
            "counts_24h": log_.counts(since=time.time() - 86400.0),
            "recent": [
                {"at": _when(r.at), "kind": r.kind, "calling_ae": r.calling_ae, "peer_address": r.peer_address,
                 "status": None if r.status is None else f"0x{r.status:04X}", "reason": r.reason,
                 "sop_instance_uid": r.sop_instance_uid}
                for r in log_.recent(last)
            ],
        }
        conflicts = [
            {"at": _when(c.at), "sop_instance_uid": c.sop_instance_uid, "study_uid": c.study_instance_uid,
             "calling_ae": c.calling_ae, "peer_address": c.peer_address, "stored_sha256": c.stored_sha256,
             "received_sha256": c.received_sha256, "reason": c.reason}
            for c in index.conflicts()
        ]
    finally:
        log_.close()
        index.close()
    return {"refusals": refusals, "conflicts": conflicts}


def _stores_report(settings: Any) -> dict[str, Any]:
    """Studies, jobs and outbox with states and reasons."""
    from dicomout.outbox import Outbox
    from scp.index import InstanceIndex
    from thighnode.jobs import JobStore

    if isinstance(settings.database, Path) and not settings.db_path.exists():
        return {"data_dir": str(settings.node.data_dir), "studies": [], "jobs": [], "outbox": [], "outbox_counts": {}}
    from thighnode.priors import PriorRequests

    index = InstanceIndex(settings.database)
    jobs = JobStore(settings.database)
    outbox = Outbox(settings.database)
    priors = PriorRequests(settings.database)
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
        job_rows = [_job_row(j) for j in jobs.jobs()]
        items = [
            {
                "item": i.id,
                "destination": i.destination,
                "transport": i.transport,
                "sop_class": _uid_name(i.sop_class_uid),
                "transfer_syntax_uid": i.transfer_syntax_uid,
                "transfer_syntax": _uid_name(i.transfer_syntax_uid),
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
            "corrections": _correction_rows(settings.database),
        }
    finally:
        for store in (index, jobs, outbox, priors):
            close = getattr(store, "close", None)
            if close is not None:
                close()


def _correction_rows(db_path: Any) -> list[dict[str, Any]]:
    """SEGs received from readers (thighnode.corrections): own, accepted or refused with the reason."""
    from thighnode.corrections import CorrectionStore

    store = CorrectionStore(db_path)
    try:
        return [{"job": c.job_id, "study_uid": c.study_uid, "handled": _when(c.handled_at), **c.to_summary()}
                for c in store.records()]
    finally:
        store.close()


def format_coverage(coverage: dict[str, Any]) -> str:
    """One line: the regions the image shows (patient z), what the segmentation supports, the policy.

    E.g. "hip 94..181 mm, pelvis 187..220 mm; segmentation: hip, thigh (cut); policy: hip or thigh over >= 20 mm".
    """
    regions = coverage.get("regions")
    if regions is None:
        seen = "not checked"
    else:
        seen = ", ".join(f"{name} {z[0]:.0f}..{z[1]:.0f} mm" for name, z in regions.items()) or "no region seen"
    parts = [seen]
    if "from_segmentation" in coverage:
        parts.append(f"segmentation: {', '.join(coverage['from_segmentation']) or 'none'}")
    policy = coverage.get("policy")
    if policy:
        parts.append(f"policy: {' or '.join(policy['accept_regions'])} over >= {policy['min_region_mm']:g} mm")
    return "; ".join(parts)


def format_model_status(model: dict[str, Any]) -> list[str]:
    """The `model:` lines of `thighnode status`: the active model and its source, what a node loaded."""
    active = model.get("active")
    if active is None:
        return [f"model: {model.get('summary', '')}"]
    lines = [f"model: {active['name']} {active['version']}  sha256 {active['sha256'] or '-'}  source: {active['source']}",
             f"       {active['path']}"]
    loaded = model.get("loaded")
    if loaded:
        state = f"running, pid {loaded['pid']}" if loaded.get("running") else "not running"
        lines.append(f"       last loaded by a node ({state}) at {loaded.get('loaded_at', '-')}: {loaded.get('name')} "
                     f"{loaded.get('version')}  sha256 {str(loaded.get('sha256', ''))[:12]}  source: {loaded.get('source')}")
    lines.append(f"       {model['summary']}")
    return lines


def cmd_status(args: argparse.Namespace) -> int:
    settings = _settings(args)
    report = status_report(settings, refusals=args.refusals)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"data directory: {report['data_dir']}")
    for line in format_model_status(report["model"]):
        print(line)
    print(f"\nstudies ({len(report['studies'])}):")
    for s in report["studies"]:
        print(f"  {s['study_uid']}  instances={s['instances']} non-CT={s['non_ct']}  last received {s['last_received']}")
    print(f"\njobs ({len(report['jobs'])}): {report.get('job_counts', {})}")
    for j in report["jobs"]:
        timings = " ".join(f"{k}={v:.2f}s" for k, v in j["timings_s"].items())
        print(f"  job {j['job']:>5}  {j['state']:<9} study {j['study_uid']}  attempts={j['attempts']}  {timings}")
        if j["reason"]:
            print(f"             reason: {j['reason']}")
        if j.get("coverage"):
            print(f"             coverage: {format_coverage(j['coverage'])}")
        if j.get("uncertainty"):
            low = j["uncertainty"].get("low_confidence", [])
            names = ", ".join(f"{x['structure']} {x['side']}" for x in low) or "none"
            print(f"             low confidence ({j['uncertainty'].get('method')}): {names}")
    if report.get("prior_requests"):
        print(f"\nprior studies requested from the PACS ({len(report['prior_requests'])}):")
        for r in report["prior_requests"]:
            print(f"  prior {r['prior_study_uid']} for {r['for_study_uid']}: {r['state']} (attempts {r['attempts']})")
            if r["last_error"]:
                print(f"             error: {r['last_error']}")
    if report.get("corrections"):
        print(f"\nSEGs received from readers ({len(report['corrections'])}):")
        for c in report["corrections"]:
            print(f"  SEG {c['seg_sop_instance_uid']}  {c['state']:<8} study {c['study_uid']}  job {c['job']}")
            print(f"             reason: {c['reason']}")
    print(f"\noutbox ({len(report['outbox'])}): {report['outbox_counts']}")
    for i in report["outbox"]:
        print(
            f"  item {i['item']:>5}  {i['state']:<8} -> {i['destination']} ({i['transport']})  {i['sop_instance_uid']}  "
            f"attempts={i['attempts']} next={i['next_attempt']}"
        )
        if i["transfer_syntax_uid"]:
            print(f"             sent as {i['transfer_syntax']} ({i['sop_class']})")
        if i["last_error"]:
            print(f"             error: {i['last_error']}")
    _print_receive_report(report)
    return 0


def _print_receive_report(report: dict[str, Any]) -> None:
    refusals = report.get("refusals", {})
    if refusals.get("counts"):
        print(f"\nrefused at receipt: {refusals['counts']} (last 24 h: {refusals.get('counts_24h', {})})")
        for r in refusals.get("recent", []):
            what = f"C-STORE {r['status']} {r['sop_instance_uid']}" if r["kind"] == "c-store" else "association"
            print(f"  {r['at']}  {what}  from {r['calling_ae']} at {r['peer_address']}")
            print(f"             reason: {r['reason']}")
    if report.get("conflicts"):
        print(f"\nduplicate SOP Instances that differ from the copy kept ({len(report['conflicts'])}):")
        for c in report["conflicts"]:
            print(f"  {c['at']}  {c['sop_instance_uid']}  study {c['study_uid']}  from {c['calling_ae']} at "
                  f"{c['peer_address']}")
            print(f"             kept sha256 {c['stored_sha256'][:16]}, received {c['received_sha256'][:16]}: "
                  f"{c['reason']}")


def cmd_retry(args: argparse.Namespace) -> int:
    from thighnode.jobs import JobStore

    settings = _settings(args)
    store = JobStore(settings.database)
    try:
        store.retry(args.job)
    finally:
        store.close()
    print(f"job {args.job} is ready again; a running node will pick it up")
    return 0


def cmd_resend(args: argparse.Namespace) -> int:
    """Queue outbox items again: one item, a job's items, or a destination's failed items."""
    from dicomout.outbox import Outbox

    settings = _settings(args)
    if args.destination is not None:
        names = [d.name for d in settings.destinations]
        if args.destination not in names:
            print(f"error: destination {args.destination!r} is not configured; configured: "
                  f"{', '.join(names) or 'none'}", file=sys.stderr)
            return 2
        if not args.failed:
            print("error: --destination needs --failed (only a destination's failed items are sent again)",
                  file=sys.stderr)
            return 2
    outbox = Outbox(settings.database)
    try:
        items = outbox.resend(item_id=args.item, job_id=args.job, destination=args.destination,
                              failed_only=args.failed)
    finally:
        close = getattr(outbox, "close", None)
        if close is not None:
            close()
    if not items:
        print("nothing to send again: no matching item that is failed or sent (pending items are already queued)")
        return 0
    for item in items:
        print(f"item {item.id} -> {item.destination}: SOP Instance UID {item.sop_instance_uid} (job {item.job_id})")
    print(f"{len(items)} item(s) queued again; a running node sends them within "
          f"{settings.outbox.send_interval_s:g} s")
    return 0


def cmd_patient_set_height(args: argparse.Namespace) -> int:
    from thighnode.results import ResultsStore

    settings = _settings(args)
    store = ResultsStore(settings.database)
    try:
        store.set_height(args.patient_id, args.height_m, issuer=args.issuer)
    finally:
        store.close()
    print(f"height {args.height_m:.2f} m recorded; used for this patient's studies without PatientSize")
    return 0


# -- parser ------------------------------------------------------------------------------


def _add_node_commands(add: Callable[[str, str], argparse.ArgumentParser]) -> None:
    p = add("serve", "run the node: DICOM ingress, processing, outbox")
    p.add_argument("--no-model", action="store_true", help="receive and assemble only; do not load the model")
    p.set_defaults(func=cmd_serve)

    p = add("worker", "run one Celery worker: takes the node's jobs from RabbitMQ ([compute] backend = \"celery\")")
    p.add_argument("--no-model", action="store_true", help="do not load the model (jobs end after loading)")
    p.add_argument("--name", default="", help="the worker's Celery hostname (default thighnode-<pid>@<host>)")
    p.set_defaults(func=cmd_worker)

    p = add("echo", "C-ECHO a configured destination")
    p.add_argument("destination", help="the destination's name in the configuration")
    p.set_defaults(func=cmd_echo)

    p = add("status", "studies, jobs and outbox with states and reasons, refusals at receipt, conflicts")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--refusals", type=int, default=10, metavar="N", help="show the last N refusals (default 10)")
    p.set_defaults(func=cmd_status)

    p = add("retry", "put a failed job back in the queue")
    p.add_argument("job", type=int)
    p.set_defaults(func=cmd_retry)

    p = add("resend", "send outbox items again (same objects, same SOP Instance UIDs)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--item", type=int, help="one outbox item (failed or sent)")
    which.add_argument("--job", type=int, help="every item of this job that is not pending")
    which.add_argument("--destination", help="a destination's items (with --failed)")
    p.add_argument("--failed", action="store_true", help="only failed items")
    p.set_defaults(func=cmd_resend)


def _add_patient_commands(sub: Any) -> None:
    patient = sub.add_parser("patient", help="patient data the node uses (height)")
    patient_sub = patient.add_subparsers(dest="patient_command", required=True)
    p = patient_sub.add_parser("set-height", help="record a patient's height (when studies lack PatientSize)")
    p.add_argument("--config", type=Path, default=None, help="node configuration file (TOML)")
    p.add_argument("patient_id", help="PatientID (0010,0020) as in the studies")
    p.add_argument("height_m", type=float, help="height in metres, e.g. 1.72")
    p.add_argument("--issuer", default="", help="IssuerOfPatientID (0010,0021), if the site uses one")
    p.set_defaults(func=cmd_patient_set_height)


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

    _add_node_commands(add)
    add_backfill_command(add)
    _add_patient_commands(sub)
    add_model_commands(sub)
    add_offline_commands(add)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "log_level", None):  # the offline commands (thighnode.cli_offline) log at this level
        _setup_logging(args.log_level)
    try:
        return int(args.func(args) or 0)
    except NodeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
