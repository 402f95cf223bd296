"""`thighnode backfill`: the archive's matching studies through the running node (thighnode.backfill)."""

from __future__ import annotations

import argparse
import signal
import threading
from typing import Any, Callable

from node_errors import NodeError


class BackfillCommandError(NodeError):
    """A backfill that cannot start (arguments, node not running, PACS not configured)."""


def cmd_backfill(args: argparse.Namespace) -> int:
    from scp.index import InstanceIndex
    from scp.pacs import QuerySource
    from scp.query import find_series, find_studies_in_range
    from scp.retrieve import retrieve_study
    from thighnode.backfill import Backfill, BackfillCriteria, BackfillProgress, BackfillStore
    from thighnode.jobs import JobStore
    from thighnode.node import data_dir_in_use
    from thighnode.priors import retrieval_sink
    from thighnode.settings import load_settings

    settings = load_settings(args.config)
    store = BackfillStore(settings.database)
    try:
        if args.status:
            _print_status(store)
            return 0
        if not args.date_from or not args.date_to:
            raise BackfillCommandError("--from and --to (YYYYMMDD) are needed to query the archive (or --status)")
        if not data_dir_in_use(settings.node.data_dir) and not args.no_node_check:
            raise BackfillCommandError(
                f"no node is running on data directory {settings.node.data_dir}: start `thighnode serve` with the "
                "same configuration first (the node receives, processes and records each retrieved study)"
            )
        p = settings.prior
        if not p.ae_title or not p.host or not p.port:
            raise BackfillCommandError(
                "the archive is the [prior] query/retrieve source: set [prior] ae_title, host and port "
                f"(found ae_title {p.ae_title!r}, host {p.host!r}, port {p.port!r})"
            )
        method = args.method or p.method
        source = QuerySource(
            name="archive", ae_title=p.ae_title, host=p.host, port=p.port,
            calling_ae_title=settings.node.ae_title, method=method,  # type: ignore[arg-type]
            move_destination_ae=settings.node.ae_title, timeout_s=settings.node.dimse_timeout_s,
        )
        index = InstanceIndex(settings.database) if method == "get" else None
        jobs = JobStore(settings.database)

        def retrieve(study_uid: str, series_uids: tuple[str, ...]) -> str:
            sink = retrieval_sink(settings, index, source.ae_title) if index is not None else None
            return retrieve_study(source, study_uid, series_uids, store=sink)

        def report(progress: BackfillProgress) -> None:
            print(progress.line(), flush=True)

        criteria = BackfillCriteria(
            date_from=args.date_from, date_to=args.date_to, modality=args.modality,
            body_parts=tuple(b.strip().upper() for b in (args.body_part or "").split(",") if b.strip()),
            description=args.description,
        )
        backfill = Backfill(
            store, jobs, find_studies=lambda c: find_studies_in_range(
                source, date_from=c.date_from, date_to=c.date_to, modality=c.modality, study_description=c.description),
            find_series=lambda uid: find_series(source, uid), retrieve=retrieve,
            min_slices=settings.processing.min_slices, arrival_timeout_s=args.arrival_timeout_s, report=report,
        )
        stop = threading.Event()
        previous = _on_signals(lambda *_: stop.set())
        try:
            matches, new = backfill.query(criteria, no_send=args.no_send)
            print(f"{matches} studies match {criteria.date_from}..{criteria.date_to} "
                  f"(modality {criteria.modality or 'any'}); {new} new, the others recorded by an earlier run", flush=True)
            final = backfill.run(criteria, in_flight=args.in_flight, max_studies=args.max_studies,
                                 retry_failed=args.retry_failed, stop=stop, poll_s=args.poll_s)
        finally:
            _restore_signals(previous)
            jobs.close()
            if index is not None:
                index.close()
        print(("stopped: run the same command again to resume. " if stop.is_set() else "") + final.line())
        return 0
    finally:
        store.close()


def _print_status(store: Any) -> None:
    counts = store.counts()
    studies = store.studies()
    print(f"backfill: {len(studies)} studies: {counts}")
    for s in studies:
        job = f" job {s.job_id}" if s.job_id is not None else ""
        print(f"  {s.study_uid}  {s.study_date}  {s.state:<9}{job}  {s.reason}")


def _on_signals(handler: Callable[..., None]) -> dict[int, Any]:
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}


def _restore_signals(previous: dict[int, Any]) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def add_backfill_command(add: Callable[[str, str], argparse.ArgumentParser]) -> None:
    p = add("backfill", "retrieve an archive's matching studies (date range, modality, body part) through the node")
    p.add_argument("--from", dest="date_from", default="", help="first StudyDate, YYYYMMDD (inclusive)")
    p.add_argument("--to", dest="date_to", default="", help="last StudyDate, YYYYMMDD (inclusive)")
    p.add_argument("--modality", default="CT", help="ModalitiesInStudy key (default CT; '' for any)")
    p.add_argument("--body-part", default="",
                   help="comma-separated BodyPartExamined values of the series to take, e.g. HIP,PELVIS,LEG,"
                        "EXTREMITY (series without one are taken; the node's field-of-view check decides)")
    p.add_argument("--description", default="", help="StudyDescription pattern, wildcards * and ? (e.g. '*HIP*')")
    p.add_argument("--no-send", action="store_true",
                   help="keep outputs and results on the node (for `thighnode cohort`); send nothing to the PACS")
    p.add_argument("--in-flight", type=int, default=2, help="studies retrieved and not yet ended at once (default 2)")
    p.add_argument("--max-studies", type=int, default=None, help="start at most this many studies in this run")
    p.add_argument("--retry-failed", action="store_true", help="take studies that failed in earlier runs again")
    p.add_argument("--method", choices=["move", "get"], default=None, help="C-MOVE or C-GET (default: [prior] method)")
    p.add_argument("--arrival-timeout-s", type=float, default=900.0,
                   help="a retrieved study with no job after this long is failed (default 900 s)")
    p.add_argument("--poll-s", type=float, default=2.0, help=argparse.SUPPRESS)
    p.add_argument("--no-node-check", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--status", action="store_true", help="print the backfill's per-study records and exit")
    p.set_defaults(func=cmd_backfill)

