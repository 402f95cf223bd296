"""The node's model registry: promoted bundles, their history, rollback, and which model is in use.

::

    <data_dir>/models/
      <name>-<version>-<sha12>/   a copy of each promoted bundle (configs/, models/model.pt, docs/)
      history.json                every promotion and rollback, oldest first (what `thighnode model list` shows)
      loaded.json                 what the node process loaded at its last start (name, version, sha256,
                                  source, path, pid, time): `thighnode status` tells it from what is active
      .lock                       serialises promote / rollback (flock)

The active model is the top of a stack replayed from the history: a promotion pushes its bundle, a rollback
pops the top (back to the previous promotion, or, past the first one, to the configured ``[model] bundle``).
With no promotion, or everything rolled back, the node uses the configured bundle. The node reads this once
at start (:func:`active_model`): a promotion or rollback takes effect at the next start; a running node keeps
the model it loaded, which ``loaded.json`` records.

Why a JSON file and not a table in ``thighnode.db``: the registry is the folder of bundle copies plus their
history, and the two belong together (copied, backed up or inspected as one folder, readable without the
node's code); promotion is a rare administrative act, done while the node may be running or before the
database exists, and a file written by atomic rename under an flock needs no schema migration of the node's
database. The job store and results store keep the model of each study (name, version, sha256 in the job's
result) as before.
"""

from __future__ import annotations

import fcntl
import getpass
import json
import logging
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from node_errors import NodeError

log = logging.getLogger(__name__)

MODELS_DIR = "models"
HISTORY_FILE = "history.json"
LOADED_FILE = "loaded.json"
LOCK_FILE = ".lock"
PROMOTE = "promote"
ROLLBACK = "rollback"
PROMOTED = "promoted"
CONFIGURED = "configured"
HISTORY_SCHEMA = 1


class ModelRegistryError(NodeError):
    """A promotion, rollback or registry read that cannot be done (the message says why, on one line)."""


@dataclass(frozen=True)
class ModelRef:
    """A model: bundle name, version, sha256 of models/model.pt, and its registry folder ("" = the configured
    bundle, which is not copied into the registry)."""

    name: str
    version: str
    sha256: str
    dir: str = ""

    @property
    def label(self) -> str:
        where = self.dir or CONFIGURED
        return f"{self.name} {self.version} (sha256 {self.sha256[:12]}, {where})"


@dataclass(frozen=True)
class HistoryEntry:
    """One promotion or rollback: when, by whom, what became active, from which path, and what was before."""

    action: str  # PROMOTE | ROLLBACK
    time: str  # ISO 8601 UTC
    user: str  # the OS user who ran the command
    model: ModelRef | None  # what became active (None: the configured bundle, after rolling back the first promotion)
    source_path: str  # promote: the bundle folder given; rollback: ""
    previous: ModelRef | None  # what was active before (None: the configured bundle)

    def to_record(self) -> dict[str, Any]:
        return {
            "action": self.action, "time": self.time, "user": self.user,
            "model": asdict(self.model) if self.model else None, "source_path": self.source_path,
            "previous": asdict(self.previous) if self.previous else None,
        }

    @classmethod
    def from_record(cls, rec: dict[str, Any], where: Path) -> "HistoryEntry":
        try:
            return cls(
                action=str(rec["action"]), time=str(rec["time"]), user=str(rec.get("user", "")),
                model=ModelRef(**rec["model"]) if rec.get("model") else None,
                source_path=str(rec.get("source_path", "")),
                previous=ModelRef(**rec["previous"]) if rec.get("previous") else None,
            )
        except (KeyError, TypeError) as exc:
            raise ModelRegistryError(f"{where}: a history entry is malformed ({exc!r}): {json.dumps(rec)[:200]}") from exc


@dataclass(frozen=True)
class ActiveModel:
    """The bundle the node loads at its next start, and why: ``source`` is "promoted" (the registry's top) or
    "configured" (``[model] bundle``)."""

    path: Path
    source: str
    name: str
    version: str
    sha256: str

    def to_record(self) -> dict[str, Any]:
        return {"path": str(self.path), "source": self.source, "name": self.name, "version": self.version,
                "sha256": self.sha256}


def models_dir(data_dir: Path) -> Path:
    return Path(data_dir) / MODELS_DIR


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name in the environment (a container): the uid will do
        return f"uid {os.getuid()}"


def _safe(text: str) -> str:
    """A bundle name or version as part of a folder name."""
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", text).strip("._-") or "model"


def registry_folder_name(name: str, version: str, sha256: str) -> str:
    """``<name>-<version>-<sha12>`` (characters outside ``A-Za-z0-9._+-`` become ``_``)."""
    return f"{_safe(name)}-{_safe(version)}-{sha256[:12]}"


# -- reading ------------------------------------------------------------------------------------


def read_history(data_dir: Path) -> list[HistoryEntry]:
    """The history, oldest first (empty when nothing was ever promoted)."""
    path = models_dir(data_dir) / HISTORY_FILE
    if not path.is_file():
        return []
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelRegistryError(f"{path} cannot be read as JSON ({exc}); fix or move it away") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("entries"), list):
        raise ModelRegistryError(f"{path} has no 'entries' list; it is not a thighnode model history")
    return [HistoryEntry.from_record(rec, path) for rec in doc["entries"]]


def active_stack(history: list[HistoryEntry]) -> list[ModelRef]:
    """Replay the history: a promotion pushes, a rollback pops; the top is the active promoted model."""
    stack: list[ModelRef] = []
    for entry in history:
        if entry.action == PROMOTE and entry.model is not None:
            stack.append(entry.model)
        elif entry.action == ROLLBACK and stack:
            stack.pop()
    return stack


def active_promoted(data_dir: Path) -> ModelRef | None:
    """The active promoted model, or None when the node uses its configured bundle."""
    stack = active_stack(read_history(data_dir))
    return stack[-1] if stack else None


def active_model(settings: Any) -> ActiveModel:
    """The bundle the node loads at start: the active promoted one (its registry copy) if any, else
    ``[model] bundle``. The configured bundle's sha256 is computed here (reading models/model.pt)."""
    from pipeline.bundle import weights_sha256

    data_dir = settings.node.data_dir
    promoted = active_promoted(data_dir)
    if promoted is not None:
        path = models_dir(data_dir) / promoted.dir
        if not path.is_dir():
            raise ModelRegistryError(
                f"the active promoted model {promoted.label} is missing from {path}; "
                "restore the folder or run `thighnode model rollback`"
            )
        return ActiveModel(path, PROMOTED, promoted.name, promoted.version, promoted.sha256)
    bundle = Path(settings.model.bundle)
    name, version = _name_version(bundle)
    try:
        sha256 = weights_sha256(bundle)
    except OSError:
        sha256 = ""
    return ActiveModel(bundle, CONFIGURED, name, version, sha256)


def _name_version(bundle: Path) -> tuple[str, str]:
    """Name and version from configs/metadata.json without loading the network ("?" when unreadable)."""
    try:
        meta = json.loads((bundle / "configs" / "metadata.json").read_text(encoding="utf-8"))
        return str(meta.get("name", "?")), str(meta.get("version", "?"))
    except (OSError, json.JSONDecodeError, AttributeError):
        return "?", "?"


# -- what a node loaded -------------------------------------------------------------------------


def record_loaded(data_dir: Path, active: ActiveModel, *, pid: int | None = None) -> Path:
    """Write ``loaded.json``: the model this node process loaded (called by the node after loading it)."""
    record = {**active.to_record(), "pid": os.getpid() if pid is None else pid, "loaded_at": _now()}
    return _write_json(models_dir(data_dir) / LOADED_FILE, record)


def read_loaded(data_dir: Path) -> dict[str, Any] | None:
    """``loaded.json`` with ``running``: whether the process that wrote it is alive (None: never written)."""
    path = models_dir(data_dir) / LOADED_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    record["running"] = _alive(int(record.get("pid", 0) or 0))
    return record


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


# -- changing -----------------------------------------------------------------------------------


@contextmanager
def _locked(data_dir: Path) -> Iterator[Path]:
    root = models_dir(data_dir)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / LOCK_FILE, "a+", encoding="utf-8") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield root
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _write_json(path: Path, doc: Any) -> Path:
    """Write durably: temporary file, fsync, atomic rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(json.dumps(doc, indent=2) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def _append(root: Path, history: list[HistoryEntry], entry: HistoryEntry) -> None:
    records = [e.to_record() for e in [*history, entry]]
    _write_json(root / HISTORY_FILE, {"schema": HISTORY_SCHEMA, "entries": records})


def _current(history: list[HistoryEntry]) -> ModelRef | None:
    stack = active_stack(history)
    return stack[-1] if stack else None


def validate_bundle(bundle_dir: Path) -> Any:
    """Load ``bundle_dir`` as the node would (metadata, label table against the node's, weights into the
    declared network; on the CPU); returns the :class:`pipeline.bundle.Bundle`. BundleError says why not."""
    from pipeline.bundle import load_bundle
    from pipeline.errors import BundleError
    from pipeline.labels import load_label_table

    if not Path(bundle_dir).is_dir():
        raise BundleError(f"bundle {bundle_dir} is not a folder")
    return load_bundle(Path(bundle_dir), load_label_table(), device="cpu")


def promote(data_dir: Path, bundle_dir: Path) -> HistoryEntry:
    """Validate ``bundle_dir``, copy it into the registry (once per name, version and sha256) and make it the
    active model. Raises BundleError (the bundle does not load) or ModelRegistryError."""
    bundle_dir = Path(bundle_dir).resolve()
    bundle = validate_bundle(bundle_dir)
    ref = ModelRef(bundle.name, bundle.version, bundle.weights_sha256,
                   registry_folder_name(bundle.name, bundle.version, bundle.weights_sha256))
    with _locked(data_dir) as root:
        history = read_history(data_dir)
        previous = _current(history)
        if previous is not None and previous.sha256 == ref.sha256 and previous.dir == ref.dir:
            raise ModelRegistryError(f"{ref.label} is already the active model; nothing to promote")
        target = root / ref.dir
        if not target.is_dir():
            _copy_bundle(bundle_dir, target, ref.sha256)
        entry = HistoryEntry(PROMOTE, _now(), _user(), ref, str(bundle_dir), previous)
        _append(root, history, entry)
    log.info("promoted %s from %s (previous: %s)", ref.label, bundle_dir, previous.label if previous else CONFIGURED)
    return entry


def _copy_bundle(source: Path, target: Path, sha256: str) -> None:
    """Copy into a temporary folder beside ``target``, check the weights' sha256 of the copy, rename."""
    from pipeline.bundle import weights_sha256

    tmp = Path(tempfile.mkdtemp(prefix=".incoming-", dir=target.parent))
    try:
        shutil.copytree(source, tmp, dirs_exist_ok=True)
        copied = weights_sha256(tmp)
        if copied != sha256:
            raise ModelRegistryError(
                f"the copy of {source} in {tmp} has weights sha256 {copied[:12]}, the bundle loaded {sha256[:12]}: "
                "was the bundle changed during the copy? nothing was promoted"
            )
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def rollback(data_dir: Path) -> HistoryEntry:
    """Make the model before the active promoted one active again (a previous promotion, or the configured
    bundle after the first). Raises ModelRegistryError when no promoted model is active."""
    with _locked(data_dir) as root:
        history = read_history(data_dir)
        stack = active_stack(history)
        if not stack:
            raise ModelRegistryError(
                f"nothing to roll back: no promoted model is active in {root} "
                "(the node uses its configured [model] bundle)"
            )
        back_to = stack[-2] if len(stack) > 1 else None
        if back_to is not None and not (root / back_to.dir).is_dir():
            raise ModelRegistryError(
                f"cannot roll back to {back_to.label}: its folder {root / back_to.dir} is missing"
            )
        entry = HistoryEntry(ROLLBACK, _now(), _user(), back_to, "", stack[-1])
        _append(root, history, entry)
    log.info("rolled back %s; active: %s", stack[-1].label, back_to.label if back_to else CONFIGURED)
    return entry


def history_rows(data_dir: Path) -> list[dict[str, Any]]:
    """The history as rows, oldest first, the entry that made the active model marked ``active``."""
    history = read_history(data_dir)
    stack = active_stack(history)
    active = stack[-1] if stack else None
    # the last entry made the current state (every promotion or rollback changes the active model)
    rows = [e.to_record() for e in history]
    for i, row in enumerate(rows):
        row["active"] = i == len(rows) - 1 and active is not None
    return rows



def model_status(settings: Any) -> dict[str, Any]:
    """What `thighnode status` says about the model: ``active`` (what the node loads at its next start, with
    its source), ``loaded`` (what a node process loaded at its last start, and whether it still runs), and a
    one-line ``summary``; ``error`` when the registry cannot be read."""
    try:
        active = active_model(settings).to_record()
    except NodeError as exc:
        return {"active": None, "loaded": read_loaded(settings.node.data_dir), "error": exc.message,
                "summary": f"model registry error: {exc.message}"}
    loaded = read_loaded(settings.node.data_dir)
    same = loaded is not None and loaded.get("sha256") == active["sha256"] and loaded.get("path") == active["path"]
    if loaded is None or not loaded.get("running"):
        summary = "no node is running; the next start loads the active model"
    elif same:
        summary = f"the running node (pid {loaded['pid']}) uses the active model"
    else:
        summary = (f"the running node (pid {loaded['pid']}) uses {loaded.get('name')} {loaded.get('version')} "
                   f"(sha256 {str(loaded.get('sha256', ''))[:12]}, {loaded.get('source')}); the active model takes "
                   "effect at its next start")
    return {"active": active, "loaded": loaded, "summary": summary}
