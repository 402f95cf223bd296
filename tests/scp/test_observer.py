"""scp.observer: the ingress tells its observer of refused associations, security alerts and stored instances
(real associations on loopback)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Callable

import pydicom
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification

from scp.types import ReceivedInstance
from tests.scp.conftest import RunningIngress
from tests.scp.dicom_factory import write_ct

STUDY = "1.2.826.0.1.3680043.8.498.88001"
SERIES = STUDY + ".1"


class Recording:
    """An observer that records each call (thread-safe); ``fail`` makes every call raise after recording."""

    def __init__(self, fail: bool = False) -> None:
        self.calls: list[tuple[str, tuple[object, ...]]] = []
        self._lock = threading.Lock()
        self._fail = fail

    def _note(self, name: str, *args: object) -> None:
        with self._lock:
            self.calls.append((name, args))
        if self._fail:
            raise RuntimeError("observer broken")

    def association_refused(self, peer_address: str, calling_ae: str, reason: str) -> None:
        self._note("association_refused", peer_address, calling_ae, reason)

    def security_alert(self, peer_address: str, reason: str) -> None:
        self._note("security_alert", peer_address, reason)

    def instance_stored(self, instance: ReceivedInstance) -> None:
        self._note("instance_stored", instance.sop_instance_uid, instance.calling_ae)


def _echo(port: int, calling: str, called: str = "THIGHNODE") -> bool:
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    ok = assoc.is_established
    if ok:
        assoc.release()
    return ok


def test_a_calling_ae_outside_the_allow_list_is_refused_and_a_security_alert(start_server: Callable[..., RunningIngress]) -> None:
    observer = Recording()
    server = start_server(observer=observer, allowed_calling_aets=("CTSCANNER",))
    assert _echo(server.port, "CTSCANNER")
    assert not _echo(server.port, "INTRUDER")
    assert not _echo(server.port, "CTSCANNER", called="OTHER")
    assert observer.calls == [
        ("association_refused", ("127.0.0.1", "INTRUDER", "calling AE not recognised")),
        ("security_alert", ("127.0.0.1", "calling AE INTRUDER not in allowed_calling_aets")),
        ("association_refused", ("127.0.0.1", "CTSCANNER", "called AE not recognised")),
    ]


def test_a_peer_outside_allowed_peers_is_refused_and_a_security_alert(start_server: Callable[..., RunningIngress]) -> None:
    observer = Recording()
    server = start_server(observer=observer, allowed_peers=("10.0.0.0/8",))
    assert not _echo(server.port, "CTSCANNER")
    # closed at TCP accept (before an association slot is taken, issue 25): no A-ASSOCIATE was read,
    # so no calling AE is known; the refusal is a security alert
    assert observer.calls == [
        ("security_alert", ("127.0.0.1", "connection refused at accept: peer address not in allowed_peers")),
    ]


def _store(port: int, paths: list[Path]) -> list[int]:
    ae = AE(ae_title="CTSCANNER")
    ae.add_requested_context(CTImageStorage, [pydicom.uid.ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", port, ae_title="THIGHNODE")
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(pydicom.dcmread(p)).Status) for p in paths]
    finally:
        assoc.release()


def test_each_new_instance_is_reported_once_and_a_broken_observer_changes_no_status(
    start_server: Callable[..., RunningIngress], tmp_path: Path
) -> None:
    paths = [write_ct(tmp_path / f"{i}.dcm", STUDY, SERIES) for i in range(3)]
    uids = [str(pydicom.dcmread(p).SOPInstanceUID) for p in paths]
    observer = Recording()
    server = start_server(observer=observer)
    assert _store(server.port, paths + paths[:1]) == [0, 0, 0, 0]  # the last one is a duplicate
    assert observer.calls == [("instance_stored", (uid, "CTSCANNER")) for uid in uids]

    broken = Recording(fail=True)
    other = start_server(observer=broken, allowed_calling_aets=("CTSCANNER",))
    assert _store(other.port, paths) == [0, 0, 0]
    assert not _echo(other.port, "INTRUDER")
    assert [name for name, _ in broken.calls] == ["instance_stored"] * 3 + ["association_refused", "security_alert"]
    assert len(other.index.instances(STUDY)) == 3
