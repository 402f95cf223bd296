"""scp.association: the one AE factory (timeouts, maximum PDU) and association requests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from pynetdicom import evt
from pynetdicom.events import Event
from pynetdicom.sop_class import Verification

from scp.association import (
    DEFAULT_MAXIMUM_PDU_SIZE,
    AssociationSettings,
    RemoteAE,
    create_ae,
    request_association,
    start_server,
)
from tests.support.ports import free_port


def test_create_ae_sets_title_timeouts_and_pdu_size() -> None:
    settings = AssociationSettings("NODE", 11.0, 12.0, 13.0, connection_timeout_s=14.0, maximum_pdu_size=65536)
    ae = create_ae(settings)
    assert ae.ae_title == "NODE"
    assert (ae.acse_timeout, ae.dimse_timeout, ae.network_timeout, ae.connection_timeout) == (11.0, 12.0, 13.0, 14.0)
    assert ae.maximum_pdu_size == 65536
    assert ae.requested_contexts == [] and ae.supported_contexts == []


def test_with_timeout_bounds_every_wait() -> None:
    settings = AssociationSettings.with_timeout("SCU", 7.5)
    assert settings == AssociationSettings("SCU", 7.5, 7.5, 7.5, 7.5, DEFAULT_MAXIMUM_PDU_SIZE)
    assert AssociationSettings.with_timeout("SCU", 7.5, 0).maximum_pdu_size == 0


@pytest.fixture
def echo_scp() -> Iterator[RemoteAE]:
    port = free_port()
    ae = create_ae(AssociationSettings("ECHOSCP", 5.0, 5.0, 5.0, maximum_pdu_size=32768))
    ae.add_supported_context(Verification)
    start_server(ae, "127.0.0.1", port, [])
    try:
        yield RemoteAE("ECHOSCP", "127.0.0.1", port)
    finally:
        ae.shutdown()


def test_request_association_announces_the_aes_maximum_pdu(echo_scp: RemoteAE) -> None:
    announced: list[int] = []

    def handle_accepted(event: Event) -> None:
        announced.append(event.assoc.requestor.maximum_length)

    ae = create_ae(AssociationSettings.with_timeout("SCU", 5.0, 20000))
    ae.add_requested_context(Verification)
    assoc = request_association(ae, echo_scp, evt_handlers=[(evt.EVT_ACCEPTED, handle_accepted)])
    try:
        assert assoc.is_established
        assert assoc.acceptor.ae_title == "ECHOSCP"
        assert announced == [20000]
        assert assoc.acceptor.maximum_length == 32768
        assert int(assoc.send_c_echo().Status) == 0
    finally:
        assoc.release()
        ae.shutdown()
