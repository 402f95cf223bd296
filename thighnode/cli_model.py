"""``thighnode model``: the node's model registry (:mod:`thighnode.models`) and the comparison of a candidate
bundle with the deployed one (:mod:`modelkit.comparison`).

::

    thighnode model promote BUNDLE      validate, copy into <data_dir>/models/, make it the active model
    thighnode model rollback            back to the model active before the current promotion
    thighnode model list [--json]       the history, the active entry marked
    thighnode model compare CANDIDATE [--data DIR ...] [--node-data-dir DIR] [--json]

A promotion or rollback takes effect when the node next starts (`thighnode status` says which model the
running node loaded and which is active). Errors are one line on stderr, exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path
from typing import Any

from node_errors import NodeError

#: The held-out split of the node's corrected cases when neither the command line nor the candidate bundle's
#: metadata (``training.held_out``, written by a fine-tune on corrected cases) gives one.
HELD_OUT_SEED = 0
HELD_OUT_FRACTION = 0.2


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _fail(message: str) -> int:
    print(f"error: {_one_line(message)}", file=sys.stderr)
    return 2


def _settings(args: argparse.Namespace):  # noqa: ANN202
    from thighnode.settings import load_settings

    return load_settings(args.config)


def _ref_text(ref: dict[str, Any] | None) -> str:
    if not ref:
        return "the configured bundle"
    return f"{ref['name']} {ref['version']} (sha256 {ref['sha256'][:12]})"


def cmd_promote(args: argparse.Namespace) -> int:
    from thighnode.models import models_dir, promote

    settings = _settings(args)
    try:
        entry = promote(settings.node.data_dir, Path(args.bundle))
    except NodeError as exc:
        return _fail(f"not promoted: {exc.message}")
    model = entry.model
    assert model is not None
    print(f"promoted {model.name} {model.version}  sha256 {model.sha256}")
    print(f"  installed in {models_dir(settings.node.data_dir) / model.dir}")
    print(f"  previous: {_ref_text(entry.previous.__dict__ if entry.previous else None)}")
    print("  the node loads it at its next start (restart a running node)")
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    from thighnode.models import rollback

    settings = _settings(args)
    try:
        entry = rollback(settings.node.data_dir)
    except NodeError as exc:
        return _fail(exc.message)
    previous = entry.previous
    assert previous is not None
    now = _ref_text(entry.model.__dict__ if entry.model else None)
    if entry.model is None:
        now += f" {settings.model.bundle}"
    print(f"rolled back {previous.name} {previous.version} (sha256 {previous.sha256[:12]}); active now: {now}")
    print("  the node loads it at its next start (restart a running node)")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from thighnode.models import active_model, history_rows

    settings = _settings(args)
    try:
        rows = history_rows(settings.node.data_dir)
        active = active_model(settings)
    except NodeError as exc:
        return _fail(exc.message)
    if args.json:
        print(json.dumps({"active": active.to_record(), "history": rows}, indent=2))
        return 0
    print(f"active: {active.name} {active.version}  sha256 {active.sha256[:12] or '-'}  source: {active.source}"
          f"  ({active.path})")
    if not rows:
        print("history: none (nothing was ever promoted; the node uses its configured [model] bundle)")
        return 0
    print(f"history ({len(rows)}, oldest first):")
    for i, row in enumerate(rows, 1):
        mark = "*" if row["active"] else " "
        what = _ref_text(row["model"])
        source = f" from {row['source_path']}" if row["source_path"] else ""
        print(f" {mark}{i:>3}  {row['time']}  {row['action']:<8} -> {what}{source}  by {row['user']}"
              f"  (before: {_ref_text(row['previous'])})")
    return 0


def held_out_split(args: argparse.Namespace) -> tuple[int, float, str]:
    """(seed, fraction, where from) of the held-out split: the command line, else the candidate bundle's
    ``training.held_out`` (the split it was trained with, so that it is compared on cases it never saw),
    else the defaults."""
    held: dict[str, Any] = {}
    try:
        meta = json.loads((Path(args.candidate) / "configs" / "metadata.json").read_text(encoding="utf-8"))
        held = dict((meta.get("training") or {}).get("held_out") or {})
    except (OSError, ValueError, TypeError, AttributeError):
        pass  # an unreadable candidate is refused, with its reason, when it is loaded
    seed = args.seed if args.seed is not None else held.get("seed")
    fraction = args.fraction if args.fraction is not None else held.get("held_out_fraction")
    source = "the candidate's training.held_out" if held and (args.seed is None or args.fraction is None) else ""
    seed = HELD_OUT_SEED if seed is None else int(seed)
    fraction = HELD_OUT_FRACTION if fraction is None else float(fraction)
    return seed, fraction, source or ("the command line" if args.seed is not None or args.fraction is not None
                                      else "the defaults")


def _cases(args: argparse.Namespace, settings: Any) -> list:
    """The labelled cases: --data folders, and the node's held-out corrected cases (--node-data-dir, or the
    configured data directory when neither is given)."""
    from modelkit.evaluation import pooled_cases

    node_data_dir = args.node_data_dir
    if not args.data and node_data_dir is None:
        node_data_dir = str(settings.node.data_dir)
    case_dirs: list[Path] = []
    if node_data_dir is not None:
        try:
            sitecases = importlib.import_module("modelkit.sitecases")  # lazily: the model kit, only for this
        except ImportError:
            raise _CommandError(
                "the node's corrected cases (--node-data-dir, or the configured data directory when no --data is "
                "given) need modelkit.sitecases, which this installation lacks; give labelled folders with --data"
            ) from None
        seed, fraction, source = held_out_split(args)
        case_dirs = list(sitecases.held_out_cases(Path(node_data_dir), seed, fraction))
        args.held_out = {"node_data_dir": str(node_data_dir), "seed": seed, "fraction": fraction, "from": source,
                         "cases": len(case_dirs)}
        if not case_dirs:
            raise _CommandError(f"{node_data_dir}: no held-out corrected case (corrected/<StudyUID>/ folders; "
                                f"seed {seed}, fraction {fraction})")
    return pooled_cases([Path(d) for d in args.data or ()], case_dirs=case_dirs)


class _CommandError(Exception):
    pass


def cmd_compare(args: argparse.Namespace) -> int:
    from modelkit.comparison import compare_bundles
    from thighnode.models import active_model

    settings = _settings(args)
    try:
        deployed = active_model(settings)
        cases = _cases(args, settings)
        if args.uncertainty and not 2 <= args.uncertainty <= 4:
            raise _CommandError(f"--uncertainty {args.uncertainty}: allowed 0 (off) or 2..4 samples")
        result = compare_bundles(Path(args.candidate), deployed.path, cases, deployed_source=deployed.source,
                                 device=args.device, uncertainty_samples=args.uncertainty)
    except (NodeError, _CommandError) as exc:
        return _fail(getattr(exc, "message", str(exc)))
    held = getattr(args, "held_out", None)
    if args.json:
        print(json.dumps({**result.to_record(), "held_out": held}, indent=2))
        return 0
    if held:
        print(f"held-out corrected cases of {held['node_data_dir']}: {held['cases']} (seed {held['seed']}, "
              f"fraction {held['fraction']:g}, from {held['from']})")
    print(result.format_table())
    return 0


def add_model_commands(sub: Any) -> None:
    model = sub.add_parser("model", help="the node's model: compare a candidate, promote, roll back, list",
                           description="the node's model: compare a candidate, promote, roll back, list")
    model_sub = model.add_subparsers(dest="model_command", required=True)

    def add(name: str, help_: str) -> argparse.ArgumentParser:
        p = model_sub.add_parser(name, help=help_, description=help_)
        p.add_argument("--config", type=Path, default=None, help="node configuration file (TOML)")
        return p

    p = add("promote", "validate a bundle and install it as the node's model (takes effect at the next start)")
    p.add_argument("bundle", help="bundle folder (configs/metadata.json, configs/inference.json, models/model.pt)")
    p.set_defaults(func=cmd_promote)

    p = add("rollback", "make the model active before the current promotion active again")
    p.set_defaults(func=cmd_rollback)

    p = add("list", "the promotion history; the active entry is marked *")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_list)

    p = add("compare", "Dice and volume error of a candidate bundle and the deployed one on the same labelled cases")
    p.add_argument("candidate", help="the candidate bundle folder")
    p.add_argument("--data", nargs="+", default=None, metavar="DIR",
                   help="labelled folders: NIfTI pairs, or DICOM case folders (CT series + one SEG)")
    p.add_argument("--node-data-dir", default=None, metavar="DIR",
                   help="also the held-out corrected cases of this node data directory (modelkit.sitecases); "
                        "the configured data directory's when no --data is given")
    p.add_argument("--seed", type=int, default=None,
                   help=f"held-out split seed (default: the candidate's training.held_out, else {HELD_OUT_SEED})")
    p.add_argument("--fraction", type=float, default=None,
                   help=f"share of the corrected patients held out (default: the candidate's training.held_out, "
                        f"else {HELD_OUT_FRACTION})")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default %(default)s)")
    p.add_argument("--uncertainty", type=int, default=2, metavar="N",
                   help="test-time augmentation samples for each model's uncertainty calibration (2-4; 0: not "
                        "measured, half the time; default %(default)s, as the node)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_compare, log_level="INFO")
