"""Throwaway X.509 certificates for the DICOM TLS tests (test support), made with
``cryptography`` in a temporary directory; nothing here is ever committed.

:func:`make_pki` writes a CA, a server certificate for 127.0.0.1 / localhost, a
client certificate, an expired client certificate (same CA) and a client certificate
of a foreign CA, each as ``<name>.crt`` / ``<name>.key`` (PEM, key unencrypted,
RSA 2048 as the BCP 195 suites of dcmtk need).
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Pair:
    """A certificate and its private key (PEM files)."""

    certificate: Path
    private_key: Path


@dataclass(frozen=True)
class Pki:
    ca: Path  # the trusted CA's certificate (PEM)
    server: Pair  # for 127.0.0.1 and localhost, issued by ca
    client: Pair  # issued by ca
    expired_client: Pair  # issued by ca, expired yesterday
    foreign_client: Pair  # issued by another CA
    foreign_ca: Path


def _key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write(directory: Path, stem: str, cert: x509.Certificate, key: rsa.RSAPrivateKey) -> Pair:
    crt = directory / f"{stem}.crt"
    pem = directory / f"{stem}.key"
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return Pair(crt, pem)


def _ca(common_name: str) -> tuple[x509.Certificate, rsa.RSAPrivateKey]:
    key = _key()
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _leaf(
    common_name: str,
    issuer: tuple[x509.Certificate, rsa.RSAPrivateKey],
    *,
    server: bool,
    not_before: datetime.datetime,
    not_after: datetime.datetime,
) -> tuple[x509.Certificate, rsa.RSAPrivateKey]:
    key = _key()
    ca_cert, ca_key = issuer
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return builder.sign(ca_key, hashes.SHA256()), key


def make_pki(directory: Path) -> Pki:
    """Write the certificates of :class:`Pki` into ``directory`` (created)."""
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    valid = {"not_before": now - datetime.timedelta(hours=1), "not_after": now + datetime.timedelta(days=7)}
    ca = _ca("thighnode test CA")
    foreign = _ca("foreign test CA")
    ca_path = directory / "ca.crt"
    ca_path.write_bytes(ca[0].public_bytes(serialization.Encoding.PEM))
    foreign_path = directory / "foreign-ca.crt"
    foreign_path.write_bytes(foreign[0].public_bytes(serialization.Encoding.PEM))
    expired = {"not_before": now - datetime.timedelta(days=10), "not_after": now - datetime.timedelta(days=1)}
    return Pki(
        ca=ca_path,
        server=_write(directory, "server", *_leaf("127.0.0.1", ca, server=True, **valid)),
        client=_write(directory, "client", *_leaf("scanner", ca, server=False, **valid)),
        expired_client=_write(directory, "expired", *_leaf("old scanner", ca, server=False, **expired)),
        foreign_client=_write(directory, "foreign", *_leaf("stranger", foreign, server=False, **valid)),
        foreign_ca=foreign_path,
    )
