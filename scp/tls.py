"""DICOM TLS (PS3.15 Annex B, the BCP 195 profiles B.9 / B.10): the node's certificate,
the trust store and the :class:`ssl.SSLContext` objects built from them.

One :class:`TlsConfig` serves both directions: :func:`server_context` for the ingress
listener (optionally requiring a client certificate issued by a trusted CA: mutual
TLS) and :func:`client_context` for the associations the node requests (sender, Q/R),
which verify the peer's certificate and host name against the same trust store and
present the node's certificate. Both allow TLS 1.2 and 1.3 only; TLS 1.2 is limited
to the forward-secret AEAD suites of BCP 195 (RFC 9325 4.2: ECDHE/DHE with AES-GCM or
ChaCha20-Poly1305); TLS 1.3 suites are all AEAD.

:func:`check_tls_files` is run once at start: every file is read, the certificate
must match the key and be within its validity period, so a wrong path or an expired
certificate stops the node with a message naming the file.
"""

from __future__ import annotations

import datetime
import ssl
from dataclasses import dataclass
from pathlib import Path

from scp.errors import TlsConfigError

#: TLS 1.2 cipher suites allowed (OpenSSL names): BCP 195's forward-secret AEAD suites.
BCP195_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:!aNULL:!eNULL:!MD5:!DSS:!SHA1"
#: The lowest protocol version either side accepts.
MINIMUM_TLS_VERSION = ssl.TLSVersion.TLSv1_2


@dataclass(frozen=True)
class TlsConfig:
    """The node's TLS identity and trust, validated when created (paths exist).

    ``certificate`` (PEM, may hold the chain) and ``private_key`` (PEM, unencrypted)
    identify the node as server and as client. ``ca_certificates`` (PEM bundle) is the
    trust store: the CAs whose client certificates the listener accepts and that must
    have issued the certificates of the PACS we connect to; ``None`` uses the system's
    store for peers and accepts no client certificates. ``require_client_certificate``
    turns on mutual TLS at the listener (needs ``ca_certificates``).
    """

    certificate: Path
    private_key: Path
    ca_certificates: Path | None = None
    require_client_certificate: bool = False

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        for name in ("certificate", "private_key", "ca_certificates"):
            value = getattr(self, name)
            if value is None and name == "ca_certificates":
                continue
            if not isinstance(value, (str, Path)) or str(value) == "":
                raise TlsConfigError(f"TLS {name} must be the path of a PEM file; got {value!r}")
            path = Path(value)
            if not path.is_file():
                raise TlsConfigError(f"TLS {name} {path} does not exist or is not a file; allowed: a readable PEM file")
            set_(self, name, path)
        if not isinstance(self.require_client_certificate, bool):
            raise TlsConfigError(
                f"require_client_certificate must be true or false; got {self.require_client_certificate!r}"
            )
        if self.require_client_certificate and self.ca_certificates is None:
            raise TlsConfigError(
                "require_client_certificate is true but no ca_certificates is given: "
                "the CAs that issue client certificates must be named"
            )


def _harden(context: ssl.SSLContext) -> ssl.SSLContext:
    context.minimum_version = MINIMUM_TLS_VERSION
    context.set_ciphers(BCP195_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    return context


def _load_identity(context: ssl.SSLContext, config: TlsConfig) -> None:
    try:
        context.load_cert_chain(config.certificate, config.private_key)
    except ssl.SSLError as exc:
        raise TlsConfigError(
            f"TLS certificate {config.certificate} and private key {config.private_key} cannot be used together "
            f"({exc.reason or exc}); allowed: a PEM certificate and its unencrypted PEM private key"
        ) from None
    except OSError as exc:
        raise TlsConfigError(f"TLS certificate or key cannot be read: {exc}") from None


def _load_trust(context: ssl.SSLContext, config: TlsConfig) -> None:
    if config.ca_certificates is None:
        return
    try:
        context.load_verify_locations(cafile=config.ca_certificates)
    except (ssl.SSLError, OSError) as exc:
        raise TlsConfigError(
            f"TLS ca_certificates {config.ca_certificates} cannot be loaded ({exc}); allowed: a PEM bundle of CA certificates"
        ) from None


def server_context(config: TlsConfig) -> ssl.SSLContext:
    """The listener's context: our certificate; client certificates verified against the
    trust store, required when ``config.require_client_certificate``."""
    context = _harden(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    _load_identity(context, config)
    if config.ca_certificates is not None:
        _load_trust(context, config)
        context.verify_mode = ssl.CERT_REQUIRED if config.require_client_certificate else ssl.CERT_OPTIONAL
    else:
        context.verify_mode = ssl.CERT_NONE
    return context


def client_context(config: TlsConfig) -> ssl.SSLContext:
    """A requestor's context: the peer's certificate and host name are verified against
    the trust store (the system's when none is given); ours is presented on request."""
    context = _harden(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    context.check_hostname = True
    context.verify_mode = ssl.CERT_REQUIRED
    if config.ca_certificates is None:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    else:
        _load_trust(context, config)
    _load_identity(context, config)
    return context


def check_tls_files(config: TlsConfig, now: datetime.datetime | None = None) -> None:
    """Load everything once (start-up check): raises :class:`TlsConfigError` naming the file
    when the certificate and key do not fit, the trust store cannot be read or the
    certificate is outside its validity period at ``now`` (default: the current time)."""
    server_context(config)
    client_context(config)
    from cryptography import x509  # here, not at import: a node without TLS never loads it

    try:
        certificate = x509.load_pem_x509_certificate(config.certificate.read_bytes())
    except ValueError as exc:
        raise TlsConfigError(f"TLS certificate {config.certificate} is not a PEM certificate: {exc}") from None
    moment = now or datetime.datetime.now(datetime.timezone.utc)
    not_before = certificate.not_valid_before_utc
    not_after = certificate.not_valid_after_utc
    if not not_before <= moment <= not_after:
        raise TlsConfigError(
            f"TLS certificate {config.certificate} is valid from {not_before:%Y-%m-%d %H:%M} to "
            f"{not_after:%Y-%m-%d %H:%M} UTC; now is {moment:%Y-%m-%d %H:%M} UTC: renew it"
        )
