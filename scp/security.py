"""Association-level defence of the listener: who may connect, how many connections one
peer may hold, how long a connection may stay silent before its A-ASSOCIATE-RQ, and the
one place where security events go (:func:`security_alert`).

The checks run in :class:`scp.association.GuardedAssociationServer` before pynetdicom
creates an Association: a connection refused here never takes one of the
``maximum_associations`` slots (pynetdicom counts every live acceptor thread, also one
still waiting for its A-ASSOCIATE-RQ).
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass

LOGGER = logging.getLogger(__name__)


def security_alert(peer_address: str, reason: str) -> None:
    """Record a security event about ``peer_address`` (an IP address; never PHI).

    The single sink for refused peers, failed TLS handshakes, connection floods and
    silent connections; today one WARNING log line (the audit trail of PS3.15 Annex A.5
    is attached here).
    """
    LOGGER.warning("security: peer %s: %s", peer_address, reason)


@dataclass(frozen=True)
class ConnectionPolicy:
    """What the listener checks before a connection becomes an association.

    ``peer_allowed`` says whether an IP address (text) may connect at all (checked at
    TCP accept). ``max_connections_per_peer`` bounds the connections one address holds
    at once (pending or associated). ``associate_timeout_s`` bounds the time from TCP
    accept to a complete A-ASSOCIATE-RQ, TLS handshake included. ``alert`` receives every
    refusal as ``(peer_address, reason)``: :func:`security_alert` unless the caller adds a
    listener of its own (an audit trail) around it.
    """

    peer_allowed: Callable[[str], bool]
    associate_timeout_s: float = 5.0
    max_connections_per_peer: int = 8
    alert: Callable[[str, str], None] = security_alert

    def __post_init__(self) -> None:
        t = self.associate_timeout_s
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
            raise ValueError(f"associate_timeout_s must be a finite number of seconds > 0; got {t!r}")
        n = self.max_connections_per_peer
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"max_connections_per_peer must be an integer >= 1; got {n!r}")


class PeerConnections:
    """Thread-safe count of open connections per peer address."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._counts: dict[str, int] = {}
        self._lock = threading.Lock()

    def acquire(self, address: str) -> bool:
        """Count one more connection from ``address``; False (nothing counted) at the limit."""
        with self._lock:
            n = self._counts.get(address, 0)
            if n >= self._limit:
                return False
            self._counts[address] = n + 1
            return True

    def release(self, address: str) -> None:
        with self._lock:
            n = self._counts.get(address, 0) - 1
            if n > 0:
                self._counts[address] = n
            else:
                self._counts.pop(address, None)

    def count(self, address: str) -> int:
        with self._lock:
            return self._counts.get(address, 0)
