"""Container health check: is the node's DICOM listener up and answering? Exit 0 yes, 1 no.

    python deploy/healthcheck.py [--config FILE] [--timeout S]

Reads the node's settings the way ``thighnode serve`` does (config/node.toml, then ``--config``,
then ``THIGHNODE_*`` environment variables) and requests an association with the node's own AE
title on loopback at its port, proposing Verification (PS3.4 Annex A); then C-ECHO.

Healthy: the C-ECHO answers Success, or the node rejects the association (A-ASSOCIATE-RJ: the
node is up and enforcing ``[security] allowed_calling_aets`` / ``allowed_peers``, which may not
list the health check's calling AE title ``HEALTHCHECK`` or loopback). Not healthy: no TCP
connection, no answer within the timeout, an abort, or a failed C-ECHO. The node listens only
after the model is loaded, so a container is healthy once it can process studies.

Once the node has an HTTP health endpoint (``[metrics] enabled``, ``GET /healthz``), that is the
preferred check; this one needs nothing but the DICOM port.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from scp.association import AssociationSettings, RemoteAE, create_ae, request_association
from scp.status import STATUS_SUCCESS
from thighnode.settings import load_settings

CALLING_AE_TITLE = "HEALTHCHECK"
#: A listening address that means "every interface" -> the loopback address to check it on.
_LOOPBACK_OF_WILDCARD = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}


def check(host: str, port: int, called_ae_title: str, timeout_s: float) -> tuple[bool, str]:
    """(healthy, one line saying what the node answered) for an association to ``host:port``."""
    ae = create_ae(AssociationSettings.with_timeout(CALLING_AE_TITLE, timeout_s))
    ae.add_requested_context("1.2.840.10008.1.1")
    where = f"{called_ae_title}@{host}:{port}"
    try:
        assoc = request_association(ae, RemoteAE(called_ae_title, host, port))
        if assoc.is_rejected:
            return True, f"{where} is up (association rejected by its allow-lists)"
        if not assoc.is_established:
            return False, f"{where} did not accept an association within {timeout_s:g} s (aborted or no answer)"
        try:
            rsp = assoc.send_c_echo()
            status = rsp.get("Status") if rsp else None
        finally:
            assoc.release()
        if status is None:
            return False, f"{where} gave no C-ECHO response within {timeout_s:g} s"
        if int(status) != STATUS_SUCCESS:
            return False, f"{where} answered C-ECHO with status 0x{int(status):04X}; expected 0x0000"
        return True, f"{where} answered C-ECHO: success"
    except OSError as exc:
        return False, f"{where}: {exc}"
    finally:
        ae.shutdown()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="the node's configuration file (as for thighnode serve)")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds for the connection and each answer")
    args = parser.parse_args(argv)
    settings = load_settings(args.config)
    host = _LOOPBACK_OF_WILDCARD.get(settings.node.host, settings.node.host)
    healthy, message = check(host, settings.node.port, settings.node.ae_title, args.timeout)
    print(("healthy: " if healthy else "unhealthy: ") + message, file=sys.stdout if healthy else sys.stderr)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
