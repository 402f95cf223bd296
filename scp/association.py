"""The one association factory: how the node builds its pynetdicom Application Entities,
requests associations and starts serving them.

Every DICOM conversation of the node goes through here: the ingress SCP
(:mod:`scp.ae`), Query/Retrieve as SCU (:mod:`scp.query`, :mod:`scp.retrieve`) and
the C-STORE sender (:mod:`dicomout.sender`). Timeouts (PS3.8 9.1.6: ARTIM; DIMSE and
network waits) and the Maximum Length we announce (PS3.8 D.1) are set in
:func:`create_ae` only; the transport of an association (plain TCP or TLS, PS3.15
Annex B, see :mod:`scp.tls`) is chosen in :func:`request_association` (the peer's
``tls_context``) and :func:`start_server` (``ssl_context``) only.

:func:`start_server` serves through :class:`GuardedAssociationServer`, which applies
a :class:`scp.security.ConnectionPolicy` before pynetdicom sees a connection: peers
outside the allow-list are closed at TCP accept, each peer holds a bounded number of
connections, the TLS handshake runs on the connection's own thread (never in the
accept loop), and a connection that sends no A-ASSOCIATE-RQ within the policy's
``associate_timeout_s`` is closed without ever becoming an Association (so it takes
no ``maximum_associations`` slot).
"""

from __future__ import annotations

import logging
import select
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from pynetdicom import AE, evt
from pynetdicom.events import EventHandlerType
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

from scp.security import ConnectionPolicy, PeerConnections

if TYPE_CHECKING:  # pragma: no cover
    from pynetdicom.association import Association
    from pynetdicom.pdu_primitives import SCP_SCU_RoleSelectionNegotiation

LOGGER = logging.getLogger(__name__)

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
    """The peer of an association we request: its AE title, where it listens and, for a
    peer reached over DICOM TLS, the client context (:func:`scp.tls.client_context`) that
    verifies its certificate against ``host``."""

    ae_title: str
    host: str
    port: int
    tls_context: ssl.SSLContext | None = None


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
    host name). With ``peer.tls_context`` the connection is TLS; a failed handshake (peer
    certificate not trusted or not for ``peer.host``) ends as an aborted association.
    """
    tls_args = None if peer.tls_context is None else (peer.tls_context, peer.host)
    return ae.associate(
        peer.host,
        peer.port,
        ae_title=peer.ae_title,
        max_pdu=ae.maximum_pdu_size,
        ext_neg=ext_neg,
        evt_handlers=evt_handlers,
        tls_args=tls_args,
    )


#: How often a connection's thread looks whether its peer left before the A-ASSOCIATE-RQ (s).
_CLOSED_POLL_S = 0.1


def allow_any_peer(address: str) -> bool:
    """The allow-list of a policy that admits every peer."""
    return True


class GuardedRequestHandler(RequestHandler):
    """Runs one association on the connection's thread and returns when it has ended.

    Until the A-ASSOCIATE-RQ is complete the association waits at most the policy's
    ``associate_timeout_s`` (ACSE timeout and socket timeout); :func:`end_associate_phase`
    restores the AE's own values once it has arrived.
    """

    server: GuardedAssociationServer

    def handle(self) -> None:
        assoc = self._create_association()
        limit_s = self.server.policy.associate_timeout_s
        acse_s = self.ae.acse_timeout
        assoc.acse_timeout = limit_s if acse_s is None else min(acse_s, limit_s)
        evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
        assoc.start()
        while assoc.is_alive():
            assoc.join(_CLOSED_POLL_S)
            dul_ended = assoc.dul.ident is not None and not assoc.dul.is_alive()  # started, then stopped
            if assoc.is_alive() and assoc.requestor.primitive is None and dul_ended:
                # The connection ended before its A-ASSOCIATE-RQ: pynetdicom would keep the
                # association (and its maximum_associations slot) waiting for the ACSE
                # timeout; an empty primitive ends that wait as a timeout does.
                assoc.dul.to_user_queue.put(None)  # type: ignore[arg-type]
                assoc.join()


def end_associate_phase(assoc: Association) -> None:
    """The A-ASSOCIATE-RQ of ``assoc`` has arrived: give it the AE's ACSE and network
    timeouts instead of the short ones of :class:`GuardedRequestHandler`."""
    assoc.acse_timeout = assoc.ae.acse_timeout
    sock = getattr(assoc.dul.socket, "socket", None)
    if sock is not None:
        sock.settimeout(assoc.ae.network_timeout)


class GuardedAssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with the checks of a :class:`ConnectionPolicy` and TLS
    wrapping on the connection's thread (see the module docstring).

    Threads are daemons and :meth:`server_close` does not wait for them: ``AE.shutdown``
    aborts the associations, and a connection still before its A-ASSOCIATE-RQ ends
    within ``associate_timeout_s``.
    """

    daemon_threads = True
    block_on_close = False

    def __init__(
        self,
        ae: AE,
        address: tuple[str, int],
        ae_title: str,
        contexts: list[Any],
        ssl_context: ssl.SSLContext | None = None,
        evt_handlers: list[EventHandlerType] | None = None,
        *,
        policy: ConnectionPolicy,
    ) -> None:
        # pynetdicom would wrap (and handshake) in the accept loop: one silent peer
        # would stall every other; the context is applied in process_request_thread.
        self.tls_context = ssl_context
        self.policy = policy
        self.connections = PeerConnections(policy.max_connections_per_peer)
        super().__init__(ae, address, ae_title, contexts, None, evt_handlers, request_handler=GuardedRequestHandler)

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        assert self.socket is not None
        client_socket, address = self.socket.accept()
        client_socket.setblocking(True)
        return client_socket, address

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """At TCP accept, before any thread or slot: allowed peer, per-peer limit."""
        address = str(client_address[0])
        if not self.policy.peer_allowed(address):
            self.policy.alert(address, "connection refused at accept: peer address not in allowed_peers")
            return False
        if not self.connections.acquire(address):
            self.policy.alert(
                address,
                f"connection refused at accept: peer already holds {self.policy.max_connections_per_peer} "
                "connections (max_connections_per_peer)",
            )
            return False
        return True

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        address = str(client_address[0])
        try:
            sock = self._await_associate_request(request, address)
            if sock is not None:
                self.finish_request(sock, client_address)
        except Exception:  # noqa: BLE001 - one connection's failure must not reach the server
            LOGGER.exception("connection from %s ended with an error", address)
            self.shutdown_request(request)
        finally:
            self.connections.release(address)

    def _await_associate_request(self, request: socket.socket, address: str) -> socket.socket | None:
        """TLS handshake (when configured) and the first bytes of the A-ASSOCIATE-RQ, both
        within ``associate_timeout_s``; None (connection closed) otherwise."""
        timeout_s = self.policy.associate_timeout_s
        deadline = time.monotonic() + timeout_s
        sock: socket.socket = request
        if self.tls_context is not None:
            request.settimeout(timeout_s)
            try:
                sock = self.tls_context.wrap_socket(request, server_side=True)
            except (ssl.SSLError, OSError) as exc:
                self.policy.alert(address, f"TLS handshake refused: {_handshake_failure(exc)}")
                self.shutdown_request(request)
                return None
        pending = isinstance(sock, ssl.SSLSocket) and sock.pending() > 0
        if not pending:
            readable, _, _ = select.select([sock], [], [], max(0.0, deadline - time.monotonic()))
            if not readable:
                self.policy.alert(address, f"no A-ASSOCIATE-RQ within {timeout_s:g} s (associate_timeout_s): closed")
                self.shutdown_request(sock)
                return None
            if not isinstance(sock, ssl.SSLSocket):
                try:
                    first = sock.recv(1, socket.MSG_PEEK)
                except OSError:
                    first = b""
                if not first:  # closed before sending anything
                    self.shutdown_request(sock)
                    return None
        # A stalled, half-sent A-ASSOCIATE-RQ ends the connection too (see end_associate_phase).
        sock.settimeout(max(0.1, deadline - time.monotonic()))
        return sock


def _handshake_failure(exc: OSError) -> str:
    """What went wrong in a TLS handshake, in OpenSSL's words where it gives them."""
    verify = getattr(exc, "verify_message", None)
    reason = getattr(exc, "reason", None)
    if verify:
        return f"{reason}: {verify}" if reason else str(verify)
    return str(reason or exc or type(exc).__name__)


def start_server(
    ae: AE,
    host: str,
    port: int,
    evt_handlers: list[EventHandlerType],
    *,
    policy: ConnectionPolicy | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> GuardedAssociationServer:
    """Serve associations on ``(host, port)`` with ``ae``'s supported contexts; returns at once.

    Connections pass ``policy`` first (:class:`GuardedAssociationServer`); with
    ``ssl_context`` (:func:`scp.tls.server_context`) every connection is DICOM TLS. Each
    association runs on its own thread; ``ae.shutdown()`` stops every server of ``ae``
    (one AE may serve a plain and a TLS port; they share ``maximum_associations``).
    Without ``policy``: any peer, the defaults of :class:`ConnectionPolicy`.
    """
    if policy is None:
        policy = ConnectionPolicy(peer_allowed=allow_any_peer)
    server = ae.make_server(
        (host, port),
        ssl_context=ssl_context,
        evt_handlers=evt_handlers,
        server_class=GuardedAssociationServer,
        policy=policy,
    )
    timestamp = datetime.now().strftime("%Y%m%d%H%M%S")
    thread = threading.Thread(target=server.serve_forever, name=f"AcceptorServer@{timestamp}", daemon=True)
    thread.start()
    ae._servers.append(server)  # so that ae.shutdown() stops it, as AE.start_server does
    return server
