"""The one association factory: how the node builds its pynetdicom Application Entities,
requests associations and starts serving them.

Every DICOM conversation of the node goes through here: the ingress SCP
(:mod:`scp.ae`), Query/Retrieve as SCU (:mod:`scp.query`, :mod:`scp.retrieve`) and
the C-STORE sender (:mod:`dicomout.sender`). Timeouts (PS3.8 9.1.6: ARTIM; DIMSE and
network waits) and the Maximum Length we announce (PS3.8 D.1) are set in
:func:`create_ae` only; the transport of an association (today plain TCP; TLS, PS3.15
Annex B, belongs here too) is chosen in :func:`request_association` and
:func:`start_server` only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from pynetdicom import AE
from pynetdicom.events import EventHandlerType

if TYPE_CHECKING:  # pragma: no cover
    from pynetdicom.association import Association
    from pynetdicom.pdu_primitives import SCP_SCU_RoleSelectionNegotiation
    from pynetdicom.transport import ThreadedAssociationServer

#: The Maximum Length pynetdicom announces unless told otherwise (bytes, PS3.8 D.1).
DEFAULT_MAXIMUM_PDU_SIZE = 16382


@dataclass(frozen=True)
class AssociationSettings:
    """Our side of every association an AE takes part in (titles already validated).

    Times are seconds: ``connection_timeout_s`` bounds the TCP connect of a request
    (``None``: the operating system's), ``acse_timeout_s`` the association
    negotiation and release, ``dimse_timeout_s`` the wait for each DIMSE message,
    ``network_timeout_s`` a silent connection. ``maximum_pdu_size`` is the Maximum
    Length we announce and accept (PS3.8 D.1), 0 for no limit.
    """

    ae_title: str
    acse_timeout_s: float
    dimse_timeout_s: float
    network_timeout_s: float
    connection_timeout_s: float | None = None
    maximum_pdu_size: int = DEFAULT_MAXIMUM_PDU_SIZE

    @classmethod
    def with_timeout(
        cls, ae_title: str, timeout_s: float, maximum_pdu_size: int = DEFAULT_MAXIMUM_PDU_SIZE
    ) -> AssociationSettings:
        """Settings where one ``timeout_s`` bounds connecting and every wait (an SCU's)."""
        return cls(ae_title, timeout_s, timeout_s, timeout_s, timeout_s, maximum_pdu_size)


@dataclass(frozen=True)
class RemoteAE:
    """The peer of an association we request: its AE title and where it listens."""

    ae_title: str
    host: str
    port: int


def create_ae(settings: AssociationSettings) -> AE:
    """An AE with ``settings``' title, timeouts and maximum PDU size; no contexts yet."""
    ae = AE(ae_title=settings.ae_title)
    ae.connection_timeout = settings.connection_timeout_s
    ae.acse_timeout = settings.acse_timeout_s
    ae.dimse_timeout = settings.dimse_timeout_s
    ae.network_timeout = settings.network_timeout_s
    ae.maximum_pdu_size = settings.maximum_pdu_size
    return ae


def request_association(
    ae: AE,
    peer: RemoteAE,
    *,
    ext_neg: list[SCP_SCU_RoleSelectionNegotiation] | None = None,
    evt_handlers: list[EventHandlerType] | None = None,
) -> Association:
    """Request an association with ``peer`` proposing ``ae``'s requested contexts.

    Announces ``ae.maximum_pdu_size`` (PS3.8 D.1). Returns pynetdicom's association
    whatever the outcome (established, rejected, aborted): the caller says what it
    means for its peer. Raises only what the socket layer raises (e.g. an unresolvable
    host name).
    """
    return ae.associate(
        peer.host,
        peer.port,
        ae_title=peer.ae_title,
        max_pdu=ae.maximum_pdu_size,
        ext_neg=ext_neg,
        evt_handlers=evt_handlers,
    )


def start_server(ae: AE, host: str, port: int, evt_handlers: list[EventHandlerType]) -> ThreadedAssociationServer:
    """Serve associations on ``(host, port)`` with ``ae``'s supported contexts; returns at once.

    Each association runs on its own thread; ``ae.shutdown()`` stops the server.
    """
    server = ae.start_server((host, port), block=False, evt_handlers=evt_handlers)
    if server is None:  # pragma: no cover - only with block=True
        raise RuntimeError("pynetdicom returned no server for a non-blocking start")
    return server
