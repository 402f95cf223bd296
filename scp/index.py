"""The instance index: which instances were received, where they are, and per-study activity.

It lives in the node's SQLite file beside other modules' tables (jobs, outbox); it
creates and touches only ``instances``, ``studies`` and ``instance_conflicts`` (and the
index ``instances_by_study``).

Durability: the database is in WAL mode. With ``synchronous="FULL"`` (the default)
:meth:`InstanceIndex.record` returns only once the WAL has been fsync'ed. The running
node opens it with ``synchronous="NORMAL"`` instead: the received file itself is already
durable (fsync of the file and of its directory) before the index is written, so the file
is the record of truth; a commit lost to a power failure is restored from the spool by
:meth:`InstanceIndex.reconcile`, which the node runs at every start before it accepts
associations. This saves one fsync per instance on the C-STORE path.

Threads: pynetdicom serves each association on its own thread. The index keeps ONE
connection behind a lock rather than one per thread: SQLite admits one writer at a time
anyway, so per-thread connections would buy no write concurrency, would add
SQLITE_BUSY waits between our own threads, and would leak a connection for every
association thread that ends (they are short-lived and not ours to clean up).
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

from scp.db import Synchronous, open_db
from scp.errors import IngressError, UnknownStudyError
from scp.types import ReceivedInstance, ReceivedStudy, StudyActivity

@dataclass(frozen=True)
class InstanceConflict:
    """A duplicate SOP Instance whose bytes differ from the valid copy kept (epoch seconds, SHA-256 hex
    of each copy's dataset as sent)."""

    at: float
    sop_instance_uid: str
    study_instance_uid: str
    calling_ae: str
    peer_address: str
    stored_sha256: str
    received_sha256: str
    reason: str

LOGGER = logging.getLogger(__name__)

#: The modality whose instances go into ReceivedStudy.series.
CT_MODALITY = "CT"

#: last_received_at moves forward by at least this much on each new instance (s).
_MIN_STEP_S = 1e-3

_SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    sop_instance_uid    TEXT PRIMARY KEY,
    sop_class_uid       TEXT NOT NULL,
    study_instance_uid  TEXT NOT NULL,
    series_instance_uid TEXT NOT NULL,
    modality            TEXT NOT NULL,
    transfer_syntax_uid TEXT NOT NULL,
    path                TEXT NOT NULL,
    size_bytes          INTEGER NOT NULL,
    calling_ae          TEXT NOT NULL,
    peer_address        TEXT NOT NULL,
    received_at         REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS instances_by_study ON instances (study_instance_uid);
CREATE TABLE IF NOT EXISTS studies (
    study_instance_uid TEXT PRIMARY KEY,
    first_received_at  REAL NOT NULL,
    last_received_at   REAL NOT NULL,
    instance_count     INTEGER NOT NULL,
    non_ct_count       INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS instance_conflicts (
    id                 INTEGER PRIMARY KEY AUTOINCREMENT,
    at                 REAL NOT NULL,
    sop_instance_uid   TEXT NOT NULL,
    study_instance_uid TEXT NOT NULL,
    calling_ae         TEXT NOT NULL,
    peer_address       TEXT NOT NULL,
    stored_sha256      TEXT NOT NULL,
    received_sha256    TEXT NOT NULL,
    reason             TEXT NOT NULL
);
"""

_INSERT_INSTANCE = """
INSERT OR IGNORE INTO instances (
    sop_instance_uid, sop_class_uid, study_instance_uid, series_instance_uid, modality,
    transfer_syntax_uid, path, size_bytes, calling_ae, peer_address, received_at
) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
"""

# last_received_at strictly increases on every new instance, even if the clock steps
# back, so that the job store sees every late arrival.
_UPSERT_STUDY = f"""
INSERT INTO studies (
    study_instance_uid, first_received_at, last_received_at, instance_count, non_ct_count
) VALUES (?, ?, ?, 1, ?)
ON CONFLICT (study_instance_uid) DO UPDATE SET
    last_received_at = max(excluded.last_received_at, studies.last_received_at + {_MIN_STEP_S}),
    first_received_at = min(studies.first_received_at, excluded.first_received_at),
    instance_count = studies.instance_count + 1,
    non_ct_count = studies.non_ct_count + excluded.non_ct_count
"""

_INSTANCE_COLUMNS = (
    "sop_instance_uid, sop_class_uid, study_instance_uid, series_instance_uid, modality, "
    "transfer_syntax_uid, path, size_bytes, calling_ae, peer_address, received_at"
)


class InstanceIndex:
    """Thread-safe SQLite index of received instances (see the module docstring)."""

    def __init__(self, db_path: Path, *, synchronous: Synchronous = "FULL") -> None:
        self._db_path = Path(db_path)
        self._lock = threading.Lock()
        conn = open_db(self._db_path, _SCHEMA, synchronous=synchronous)
        self._conn: sqlite3.Connection | None = conn

    @property
    def db_path(self) -> Path:
        return self._db_path

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise IngressError(f"the instance index {self._db_path} is closed")
        return self._conn

    def record(self, inst: ReceivedInstance) -> bool:
        """Record ``inst`` and update its study's activity in one durable transaction.

        Returns True when the instance is new, False when its SOP Instance UID was
        already recorded (then nothing changes). Returns after the commit is on disk.
        """
        non_ct = 0 if inst.modality == CT_MODALITY else 1
        with self._lock:
            conn = self._connection()
            conn.execute("BEGIN IMMEDIATE")
            try:
                cur = conn.execute(
                    _INSERT_INSTANCE,
                    (
                        inst.sop_instance_uid,
                        inst.sop_class_uid,
                        inst.study_instance_uid,
                        inst.series_instance_uid,
                        inst.modality,
                        inst.transfer_syntax_uid,
                        str(inst.path),
                        inst.size_bytes,
                        inst.calling_ae,
                        inst.peer_address,
                        inst.received_at,
                    ),
                )
                if cur.rowcount == 0:
                    conn.execute("ROLLBACK")
                    return False
                conn.execute(
                    _UPSERT_STUDY,
                    (inst.study_instance_uid, inst.received_at, inst.received_at, non_ct),
                )
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        return True

    def replace(self, inst: ReceivedInstance) -> None:
        """Replace the recorded copy of ``inst``'s SOP Instance (same study) by ``inst``, and move its
        study's ``last_received_at`` forward as a new instance would (so the study is assembled again).

        Raises :class:`IngressError` when the SOP Instance is not recorded in that study.
        """
        with self._lock:
            conn = self._connection()
            conn.execute("BEGIN IMMEDIATE")
            try:
                cur = conn.execute(
                    "UPDATE instances SET sop_class_uid = ?, series_instance_uid = ?, modality = ?, "
                    "transfer_syntax_uid = ?, path = ?, size_bytes = ?, calling_ae = ?, peer_address = ?, "
                    "received_at = ? WHERE sop_instance_uid = ? AND study_instance_uid = ?",
                    (inst.sop_class_uid, inst.series_instance_uid, inst.modality, inst.transfer_syntax_uid,
                     str(inst.path), inst.size_bytes, inst.calling_ae, inst.peer_address, inst.received_at,
                     inst.sop_instance_uid, inst.study_instance_uid),
                )
                if cur.rowcount == 0:
                    raise IngressError(
                        f"cannot replace SOP Instance {inst.sop_instance_uid}: not recorded in study "
                        f"{inst.study_instance_uid}"
                    )
                conn.execute(
                    "UPDATE studies SET last_received_at = max(?, last_received_at + ?) WHERE study_instance_uid = ?",
                    (inst.received_at, _MIN_STEP_S, inst.study_instance_uid),
                )
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    def get_instance(self, sop_uid: str) -> ReceivedInstance | None:
        """The recorded instance with this SOP Instance UID, or None."""
        with self._lock:
            row = self._connection().execute(
                f"SELECT {_INSTANCE_COLUMNS} FROM instances WHERE sop_instance_uid = ?", (sop_uid,)
            ).fetchone()
        return None if row is None else _instance_from_row(row)

    def record_conflict(self, conflict: InstanceConflict) -> None:
        """Record a duplicate SOP Instance that differs from the copy kept."""
        with self._lock:
            self._connection().execute(
                "INSERT INTO instance_conflicts (at, sop_instance_uid, study_instance_uid, calling_ae, peer_address, "
                "stored_sha256, received_sha256, reason) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (conflict.at, conflict.sop_instance_uid, conflict.study_instance_uid, conflict.calling_ae,
                 conflict.peer_address, conflict.stored_sha256, conflict.received_sha256, conflict.reason),
            )

    def conflicts(self, limit: int = 100) -> list[InstanceConflict]:
        """The last ``limit`` conflicts, newest first."""
        with self._lock:
            rows = self._connection().execute(
                "SELECT at, sop_instance_uid, study_instance_uid, calling_ae, peer_address, stored_sha256, "
                "received_sha256, reason FROM instance_conflicts ORDER BY id DESC LIMIT ?",
                (limit,),
            ).fetchall()
        return [InstanceConflict(float(r[0]), *(str(v) for v in tuple(r)[1:])) for r in rows]

    def has(self, sop_uid: str) -> bool:
        """True when an instance with this SOP Instance UID is recorded."""
        with self._lock:
            row = (
                self._connection().execute("SELECT 1 FROM instances WHERE sop_instance_uid = ?", (sop_uid,)).fetchone()
            )
        return row is not None

    def activity(self) -> list[StudyActivity]:
        """Every study's activity, least recently received first."""
        with self._lock:
            rows = (
                self._connection()
                .execute(
                    "SELECT study_instance_uid, first_received_at, last_received_at, instance_count, "
                    "non_ct_count FROM studies ORDER BY last_received_at, study_instance_uid"
                )
                .fetchall()
            )
        return [StudyActivity(*row) for row in rows]

    def instances(self, study_uid: str) -> list[ReceivedInstance]:
        """The study's instances, every modality, in the order they were recorded."""
        with self._lock:
            rows = (
                self._connection()
                .execute(
                    f"SELECT {_INSTANCE_COLUMNS} FROM instances WHERE study_instance_uid = ? ORDER BY rowid",
                    (study_uid,),
                )
                .fetchall()
            )
        return [_instance_from_row(row) for row in rows]

    def get_study(self, study_uid: str) -> ReceivedStudy:
        """The study as received so far: CT files by series, non-CT instances counted.

        Raises :class:`UnknownStudyError` when no instance of the study is recorded.
        """
        with self._lock:
            conn = self._connection()
            study = conn.execute(
                "SELECT last_received_at FROM studies WHERE study_instance_uid = ?", (study_uid,)
            ).fetchone()
            rows = conn.execute(
                "SELECT series_instance_uid, modality, path, calling_ae FROM instances "
                "WHERE study_instance_uid = ? ORDER BY rowid",
                (study_uid,),
            ).fetchall()
        if study is None or not rows:
            raise UnknownStudyError("no instance of this study is recorded in the instance index", study_uid=study_uid)
        series: dict[str, list[Path]] = {}
        excluded: dict[str, int] = {}
        calling_aes: dict[str, None] = {}
        for series_uid, modality, path, calling_ae in rows:
            calling_aes.setdefault(calling_ae, None)
            if modality == CT_MODALITY:
                series.setdefault(series_uid, []).append(Path(path))
            else:
                excluded[modality] = excluded.get(modality, 0) + 1
        return ReceivedStudy(
            study_instance_uid=study_uid,
            calling_aes=tuple(calling_aes),
            series={uid: tuple(paths) for uid, paths in series.items()},
            excluded_counts=excluded,
            instance_count=len(rows),
            last_received_at=float(study[0]),
        )

    def reconcile(self, spool_dir: Path) -> int:
        """Index every spooled file that the index lacks (after a crash); returns how many.

        A file in ``<spool>/<study>/<series>/<sop>.dcm`` exists only after it was written and
        fsync'ed in full (temporary name, then an atomic rename), so each one found is complete.
        Files that do not read as DICOM are logged and left alone.
        """
        import pydicom

        spool_dir = Path(spool_dir)
        if not spool_dir.is_dir():
            return 0
        with self._lock:
            known = {row[0] for row in self._connection().execute("SELECT sop_instance_uid FROM instances")}
        restored = 0
        for path in sorted(spool_dir.glob("*/*/*.dcm")):
            if path.stem in known:
                continue
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True)
                inst = ReceivedInstance(
                    sop_instance_uid=str(ds.SOPInstanceUID),
                    sop_class_uid=str(ds.SOPClassUID),
                    study_instance_uid=str(ds.StudyInstanceUID),
                    series_instance_uid=str(ds.SeriesInstanceUID),
                    modality=str(ds.get("Modality", "") or ""),
                    transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
                    path=path,
                    size_bytes=path.stat().st_size,
                    calling_ae=str(ds.file_meta.get("SourceApplicationEntityTitle", "") or "(recovered)"),
                    peer_address="",
                    received_at=path.stat().st_mtime,
                )
            except Exception as exc:  # noqa: BLE001 - one bad file must not stop the start
                LOGGER.error("spool file %s could not be indexed: %s", path, exc)
                continue
            if self.record(inst):
                restored += 1
        if restored:
            LOGGER.warning("re-indexed %d spooled instance(s) whose index entry was lost", restored)
        return restored

    def forget(self, study_uid: str) -> int:
        """Remove a study's instances and activity (retention purge); returns the instance count."""
        with self._lock:
            conn = self._connection()
            conn.execute("BEGIN IMMEDIATE")
            try:
                n = conn.execute("DELETE FROM instances WHERE study_instance_uid = ?", (study_uid,)).rowcount
                conn.execute("DELETE FROM studies WHERE study_instance_uid = ?", (study_uid,))
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        return int(n)

    def close(self) -> None:
        """Close the connection (idempotent)."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> InstanceIndex:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _instance_from_row(row: sqlite3.Row) -> ReceivedInstance:
    (sop, sop_class, study, series, modality, ts, path, size, calling_ae, peer, received_at) = row
    return ReceivedInstance(
        sop_instance_uid=sop,
        sop_class_uid=sop_class,
        study_instance_uid=study,
        series_instance_uid=series,
        modality=modality,
        transfer_syntax_uid=ts,
        path=Path(path),
        size_bytes=int(size),
        calling_ae=calling_ae,
        peer_address=peer,
        received_at=float(received_at),
    )
