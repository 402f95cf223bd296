"""Frozen hand-off types of the ingress: received instances, study activity, received
studies, and the ingress configuration (validated once, when it is created).
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from scp.association import AssociationSettings
from scp.errors import IngressConfigError
from scp.integrity import IntegrityLimits
from scp.tls import TlsConfig
from scp.validate import validate_ae_title

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class ReceivedInstance:
    """One instance as written to the spool and recorded in the index.

    ``received_at`` is seconds since the epoch (``time.time()``) when the C-STORE
    request reached the handler; ``modality`` is the Modality (0008,0060) value, ``""``
    when the dataset has none.
    """

    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    modality: str
    transfer_syntax_uid: str
    path: Path
    size_bytes: int
    calling_ae: str
    peer_address: str
    received_at: float


@dataclass(frozen=True)
class StudyActivity:
    """What the job store needs to decide that a study is complete (epoch seconds).

    ``last_received_at`` strictly increases with every new (non-duplicate) instance of
    the study, even if the wall clock steps back, so a late arrival is always visible.
    """

    study_instance_uid: str
    first_received_at: float
    last_received_at: float
    instance_count: int
    non_ct_count: int


@dataclass(frozen=True)
class ReceivedStudy:
    """A study as received so far, ready to hand to the pipeline.

    ``series`` maps SeriesInstanceUID to the files of that series whose Modality is
    CT, in the order they were received; every SOP class is kept (localizers, dose
    screens with Modality CT...) and the pipeline selects. Instances of any other
    modality are stored but kept out of ``series``; ``excluded_counts`` counts them
    per Modality value. ``instance_count`` counts all instances, CT or not.
    """

    study_instance_uid: str
    calling_aes: tuple[str, ...]
    series: Mapping[str, tuple[Path, ...]]
    excluded_counts: Mapping[str, int]
    instance_count: int
    last_received_at: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "calling_aes", tuple(self.calling_aes))
        object.__setattr__(self, "series", MappingProxyType({k: tuple(v) for k, v in self.series.items()}))
        object.__setattr__(self, "excluded_counts", MappingProxyType(dict(self.excluded_counts)))


def _parse_network(value: object, field_name: str) -> IPNetwork:
    allowed = "an IPv4/IPv6 address or a CIDR network with no host bits set (e.g. 10.0.0.0/24)"
    if not isinstance(value, str):
        raise IngressConfigError(f"{field_name} entries must be strings ({allowed}); got {value!r}")
    try:
        return ipaddress.ip_network(value.strip(), strict=True)
    except ValueError as exc:
        raise IngressConfigError(f"{field_name} entry {value!r} is not {allowed}: {exc}") from None


def _check_positive_seconds(value: object, field_name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise IngressConfigError(f"{field_name} must be a number of seconds > 0; got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise IngressConfigError(f"{field_name} must be a finite number of seconds > 0; got {value!r}")
    return float(value)


def _check_int(value: object, field_name: str, low: int, high: int | None, allowed: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise IngressConfigError(f"{field_name} must be an integer ({allowed}); got {value!r}")
    if value < low or (high is not None and value > high):
        raise IngressConfigError(f"{field_name} is {value}; allowed: {allowed}")
    return value


@dataclass(frozen=True)
class IngressConfig:
    """Settings of the C-STORE SCP, validated once when created.

    ``allowed_calling_aets`` and ``allowed_peers`` restrict who may associate; empty
    means anyone. ``allowed_peers`` holds IPv4/IPv6 addresses or CIDR networks.
    ``maximum_pdu_size`` is the Maximum Length we announce (PS3.8 D.1), 0 for no limit.
    ``min_free_disk_mb`` is the free space the spool's file system must keep: below it
    every C-STORE is answered Out of Resources (0xA700).

    DICOM TLS (PS3.15 Annex B): with ``tls`` and ``tls_port`` > 0 a second listener
    serves TLS on ``tls_port``; ``plain_port_enabled`` false leaves TLS only (``port`` is
    then unused). Association-level defence (:class:`scp.security.ConnectionPolicy`):
    ``associate_timeout_s`` bounds the time from TCP accept to a complete
    A-ASSOCIATE-RQ (TLS handshake included), ``max_connections_per_peer`` the
    connections one address holds at once.
    ``max_element_bytes`` (any element but Pixel Data) and ``max_instance_bytes`` bound what
    one C-STORE may carry; 0 = no limit (see :mod:`scp.integrity`).
    """

    ae_title: str
    host: str
    port: int
    spool_dir: Path
    db_path: Path
    allowed_calling_aets: tuple[str, ...] = ()
    allowed_peers: tuple[str, ...] = ()
    min_free_disk_mb: int = 1024
    acse_timeout_s: float = 30.0
    dimse_timeout_s: float = 60.0
    network_timeout_s: float = 60.0
    maximum_pdu_size: int = 131072
    maximum_associations: int = 16
    max_element_bytes: int = 0
    max_instance_bytes: int = 0
    tls: TlsConfig | None = None
    tls_port: int = 0
    plain_port_enabled: bool = True
    associate_timeout_s: float = 5.0
    max_connections_per_peer: int = 8
    _peer_networks: tuple[IPNetwork, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "ae_title", validate_ae_title(self.ae_title, "ae_title"))
        if not isinstance(self.host, str):
            raise IngressConfigError(f"host must be a string (address or name to listen on); got {self.host!r}")
        set_(self, "port", _check_int(self.port, "port", 1, 65535, "1..65535"))
        for name in ("spool_dir", "db_path"):
            value = getattr(self, name)
            if not isinstance(value, (str, Path)) or str(value) == "":
                raise IngressConfigError(f"{name} must be a non-empty path; got {value!r}")
            set_(self, name, Path(value))
        if isinstance(self.allowed_calling_aets, str):
            raise IngressConfigError(
                f"allowed_calling_aets must be a list of AE titles, not a string; got {self.allowed_calling_aets!r}"
            )
        set_(
            self,
            "allowed_calling_aets",
            tuple(validate_ae_title(v, "allowed_calling_aets entry") for v in self.allowed_calling_aets),
        )
        if isinstance(self.allowed_peers, str):
            raise IngressConfigError(
                f"allowed_peers must be a list of addresses or networks, not a string; got {self.allowed_peers!r}"
            )
        set_(self, "allowed_peers", tuple(self.allowed_peers))
        set_(self, "_peer_networks", tuple(_parse_network(v, "allowed_peers") for v in self.allowed_peers))
        set_(self, "min_free_disk_mb", _check_int(self.min_free_disk_mb, "min_free_disk_mb", 0, None, ">= 0"))
        for name in ("acse_timeout_s", "dimse_timeout_s", "network_timeout_s"):
            set_(self, name, _check_positive_seconds(getattr(self, name), name))
        pdu = _check_int(self.maximum_pdu_size, "maximum_pdu_size", 0, 2**32 - 1, "0 (no limit) or 4096..4294967295")
        if 0 < pdu < 4096:
            raise IngressConfigError(f"maximum_pdu_size is {pdu}; allowed: 0 (no limit) or 4096..4294967295")
        set_(
            self,
            "maximum_associations",
            _check_int(self.maximum_associations, "maximum_associations", 1, None, ">= 1"),
        )
        set_(self, "associate_timeout_s", _check_positive_seconds(self.associate_timeout_s, "associate_timeout_s"))
        set_(
            self,
            "max_connections_per_peer",
            _check_int(self.max_connections_per_peer, "max_connections_per_peer", 1, None, ">= 1"),
        )
        set_(self, "tls_port", _check_int(self.tls_port, "tls_port", 0, 65535, "0 (no TLS listener) or 1..65535"))
        if self.tls is not None and not isinstance(self.tls, TlsConfig):
            raise IngressConfigError(f"tls must be a TlsConfig or None; got {type(self.tls).__name__}")
        if self.tls_port and self.tls is None:
            raise IngressConfigError(
                f"tls_port is {self.tls_port} but no TLS certificate and key are given; allowed: tls_port 0, "
                "or a certificate and private key"
            )
        if not isinstance(self.plain_port_enabled, bool):
            raise IngressConfigError(f"plain_port_enabled must be true or false; got {self.plain_port_enabled!r}")
        if not self.plain_port_enabled and not self.tls_port:
            raise IngressConfigError(
                "plain_port_enabled is false and tls_port is 0: the node would not listen at all; "
                "allowed: a plain port, a TLS port, or both"
            )
        if self.plain_port_enabled and self.tls_port == self.port:
            raise IngressConfigError(
                f"tls_port {self.tls_port} is the plain port too; allowed: a different port, or plain_port_enabled false"
            )

        for name in ("max_element_bytes", "max_instance_bytes"):
            set_(self, name, _check_int(getattr(self, name), name, 0, None, ">= 0 (0 = no limit)"))

    @property
    def integrity_limits(self) -> IntegrityLimits:
        """The size limits :func:`scp.integrity.check_dataset` applies to each received instance."""
        return IntegrityLimits(self.max_element_bytes, self.max_instance_bytes)

    @property
    def association(self) -> AssociationSettings:
        """Our side of every association the ingress accepts: title, timeouts, maximum PDU."""
        return AssociationSettings(
            ae_title=self.ae_title,
            acse_timeout_s=self.acse_timeout_s,
            dimse_timeout_s=self.dimse_timeout_s,
            network_timeout_s=self.network_timeout_s,
            maximum_pdu_size=self.maximum_pdu_size,
        )

    def peer_allowed(self, address: str) -> bool:
        """True when ``address`` (an IP address as text) may associate.

        IPv4-mapped IPv6 addresses (``::ffff:10.0.0.1``) are compared as IPv4.
        """
        if not self._peer_networks:
            return True
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip.version == net.version and ip in net for net in self._peer_networks)
