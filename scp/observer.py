"""What the ingress reports to whoever composes it (the node's audit trail and metrics).

The ingress never imports the composition root: :func:`scp.ae.start_ingress` takes an object with
these methods and calls them where the event happens. Every call is made from an association's
thread and must return quickly and never raise (the handlers also guard against it).
"""

from __future__ import annotations

from typing import Protocol

from scp.types import ReceivedInstance


class IngressObserver(Protocol):
    """Events of the ingress that are audited or counted."""

    def association_refused(self, peer_address: str, calling_ae: str, reason: str) -> None:
        """An A-ASSOCIATE-RQ was answered with A-ASSOCIATE-RJ for ``reason``."""

    def security_alert(self, peer_address: str, reason: str) -> None:
        """A peer failed a security check: an address or AE title outside the allow-lists; the TLS
        handshake or certificate checks (scp/security.py routes its failures here)."""

    def instance_stored(self, instance: ReceivedInstance) -> None:
        """A new instance was written to the spool and recorded in the index (not for duplicates)."""
