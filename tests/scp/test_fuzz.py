"""Bounded fuzzing of the ingress: random bytes and mutations of real PDUs (A-ASSOCIATE-RQ,
P-DATA-TF carrying the C-STORE command and dataset) and datasets, with a C-ECHO between
batches that must always be answered.

Bounded: at most CASES cases and DEADLINE_S seconds; seeded, so a failure repeats. The
PDUs are recorded from a real pynetdicom requestor (EVT_DATA_SENT) storing a small CT.
"""

from __future__ import annotations

import random
import socket
import struct
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt
from pynetdicom.events import Event
from pynetdicom.sop_class import CTImageStorage, Verification

from tests.scp.dicom_factory import write_ct
from tests.scp.tools import AE_TITLE, echo

pytestmark = pytest.mark.integration

CASES = 300
DEADLINE_S = 60.0
BATCH = 25
SEED = 25


def _pdus(stream: bytes) -> list[bytes]:
    """Split a recorded byte stream into whole PDUs (type, reserved, 4-byte length)."""
    out = []
    i = 0
    while i + 6 <= len(stream):
        (length,) = struct.unpack(">L", stream[i + 2 : i + 6])
        out.append(stream[i : i + 6 + length])
        i += 6 + length
    return out


def _record_session(port: int, ct_path: Path) -> list[bytes]:
    """The PDUs a real requestor sends: A-ASSOCIATE-RQ, P-DATA (C-STORE), A-RELEASE-RQ."""
    sent = bytearray()

    def handle_data_sent(event: Event) -> None:
        sent.extend(event.data)

    ae = AE("FUZZER")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", port, ae_title=AE_TITLE, evt_handlers=[(evt.EVT_DATA_SENT, handle_data_sent)])
    assert assoc.is_established
    status = assoc.send_c_store(dcmread(ct_path))
    assert status.Status == 0x0000
    assoc.release()
    return _pdus(bytes(sent))



def _mutate(rng: random.Random, data: bytes) -> bytes:
    buf = bytearray(data)
    how = rng.randrange(5)
    if how == 0 and buf:  # flip bytes
        for _ in range(rng.randint(1, 20)):
            buf[rng.randrange(len(buf))] = rng.randrange(256)
    elif how == 1:  # truncate
        buf = buf[: rng.randrange(len(buf) + 1)]
    elif how == 2 and len(buf) >= 6:  # lie about the PDU length
        buf[2:6] = struct.pack(">L", rng.choice([0, 1, len(buf) * 3, 0xFFFFFFFF, rng.randrange(2**32)]))
    elif how == 3:  # insert garbage
        at = rng.randrange(len(buf) + 1)
        buf[at:at] = rng.randbytes(rng.randint(1, 200))
    else:  # duplicate a slice (repeated items / elements)
        a = rng.randrange(len(buf) + 1)
        b = min(len(buf), a + rng.randint(1, 300))
        buf[b:b] = buf[a:b]
    return bytes(buf)


def _case(rng: random.Random, rq: bytes, pdata: list[bytes], release: bytes) -> list[bytes]:
    """One fuzz case: the PDUs to send in order (after the first, the node's answer is awaited)."""
    kind = rng.randrange(6)
    if kind == 0:
        return [rng.randbytes(rng.randint(1, 3000))]
    if kind == 1:
        return [_mutate(rng, rq)]
    if kind == 2:
        return [rq, _mutate(rng, rng.choice(pdata))]
    if kind == 3:  # command intact, dataset mutated (the C-STORE handler reads it)
        return [rq, pdata[0], *[_mutate(rng, p) for p in pdata[1:]]]
    if kind == 4:
        return [rq, rng.randbytes(rng.randint(1, 500))]
    return [rng.choice([release, bytes([0x07, 0, 0, 0, 0, 4, 0, 0, 0, 0]), rq[:6]]), _mutate(rng, rq)]


def _send_case(port: int, pdus: list[bytes]) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=1.0) as s:
        try:
            for i, pdu in enumerate(pdus):
                s.sendall(pdu)
                if i == 0 and len(pdus) > 1:
                    s.recv(65536)  # the A-ASSOCIATE-AC / RJ (or nothing: closed)
            s.settimeout(0.2)
            s.recv(65536)
        except OSError:
            pass


# pynetdicom's DUL thread may raise InvalidEventError (e.g. Evt9 in Sta13: our C-STORE
# response after the fuzzer aborted) and end; the association ends with it.
@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
@pytest.mark.filterwarnings("ignore:Invalid value for VR UI:UserWarning")
def test_node_keeps_answering_c_echo_under_fuzzed_pdus_and_datasets(start_server, tmp_path: Path) -> None:
    server = start_server(associate_timeout_s=1.0, acse_timeout_s=5.0, dimse_timeout_s=5.0, network_timeout_s=5.0)
    ct = write_ct(tmp_path / "ct.dcm", generate_uid(), generate_uid())
    pdus = _record_session(server.port, ct)
    rq, *pdata, release = pdus
    assert rq[0] == 0x01 and release[0] == 0x05 and len(pdata) >= 2 and all(p[0] == 0x04 for p in pdata)

    rng = random.Random(SEED)
    deadline = time.monotonic() + DEADLINE_S
    done = 0
    while done < CASES and time.monotonic() < deadline:
        for _ in range(BATCH):
            _send_case(server.port, _case(rng, rq, pdata, release))
            done += 1
        assert echo(server.port), f"no C-ECHO answer after {done} fuzz cases (seed {SEED})"
    assert done >= BATCH
    # No association is left holding a slot once its peer has gone.
    settle = time.monotonic() + 30.0
    while server.server.ae.active_associations and time.monotonic() < settle:
        time.sleep(0.1)
    assert server.server.ae.active_associations == []
    assert echo(server.port)
