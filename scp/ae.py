"""The ingress Application Entity: a pynetdicom C-STORE / C-ECHO SCP on its own threads.

:func:`start_ingress` builds the AE from an :class:`~scp.types.IngressConfig`, binds
the handlers of :mod:`scp.handlers` and starts serving without blocking; each
association is served on its own thread. :meth:`IngressServer.stop` shuts it down.

Presentation contexts (PS3.4 Annex A Verification, Annex B Storage): Verification and
every Storage SOP Class pynetdicom knows (170, including all a CT study can carry:
CT, Enhanced CT, Legacy Converted Enhanced CT, every Secondary Capture, the dose SRs,
Comprehensive / Enhanced / 3D SR, presentation states, Raw Data, Encapsulated PDF,
Segmentation, Key Object Selection...). The 128-context limit of PS3.8 applies to
the contexts an association *proposes*, not to those an acceptor supports, so the
SCP supports all of them. Each is offered with the uncompressed, deflated, JPEG,
JPEG-LS, JPEG 2000, HTJ2K and RLE transfer syntaxes; the sender's first proposed
syntax among these is accepted and stored as received.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    UID,
    BasicTextSRStorage,
    Comprehensive3DSRStorage,
    ComprehensiveSRStorage,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    EncapsulatedPDFStorage,
    EnhancedCTImageStorage,
    EnhancedSRStorage,
    EnhancedXRayRadiationDoseSRStorage,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    GrayscaleSoftcopyPresentationStateStorage,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    KeyObjectSelectionDocumentStorage,
    LegacyConvertedEnhancedCTImageStorage,
    MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
    MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
    MultiFrameSingleBitSecondaryCaptureImageStorage,
    MultiFrameTrueColorSecondaryCaptureImageStorage,
    PatientRadiationDoseSRStorage,
    RawDataStorage,
    RLELossless,
    SecondaryCaptureImageStorage,
    SegmentationStorage,
    SpatialRegistrationStorage,
    XRayRadiationDoseSRStorage,
)
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.events import EventHandlerType

from scp.association import GuardedAssociationServer, create_ae, start_server
from scp.handlers import (
    AssociationLog,
    handle_accepted,
    handle_conn_close,
    handle_echo,
    handle_rejected,
    handle_requested,
    handle_store,
)
from scp.index import InstanceIndex
from scp.observer import IngressObserver
from scp.refusals import KIND_ASSOCIATION, Refusal, RefusalLog
from scp.security import ConnectionPolicy, security_alert
from scp.spool import remove_temporaries
from scp.tls import check_tls_files, server_context
from scp.types import IngressConfig

LOGGER = logging.getLogger(__name__)

#: Verification SOP Class (PS3.4 Annex A), for C-ECHO.
VERIFICATION_SOP_CLASS = UID("1.2.840.10008.1.1")

#: Transfer syntaxes accepted for every storage SOP class (PS3.5 Section 10, Annex A).
#: The order is only a fallback: the sender's proposal order decides (see
#: :func:`scp.handlers.prefer_requestor_transfer_syntaxes`).
TRANSFER_SYNTAXES: tuple[UID, ...] = (
    ImplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    DeflatedExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    HTJ2K,
    RLELossless,
)

#: Storage SOP classes that a CT study can contain; all of them must be supported.
CT_STUDY_SOP_CLASSES: tuple[UID, ...] = (
    CTImageStorage,
    EnhancedCTImageStorage,
    LegacyConvertedEnhancedCTImageStorage,
    SecondaryCaptureImageStorage,
    MultiFrameSingleBitSecondaryCaptureImageStorage,
    MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
    MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
    MultiFrameTrueColorSecondaryCaptureImageStorage,
    XRayRadiationDoseSRStorage,
    EnhancedXRayRadiationDoseSRStorage,
    PatientRadiationDoseSRStorage,
    ComprehensiveSRStorage,
    Comprehensive3DSRStorage,
    EnhancedSRStorage,
    BasicTextSRStorage,
    GrayscaleSoftcopyPresentationStateStorage,
    RawDataStorage,
    EncapsulatedPDFStorage,
    SegmentationStorage,
    KeyObjectSelectionDocumentStorage,
    SpatialRegistrationStorage,
)


def storage_sop_classes() -> tuple[UID, ...]:
    """Every storage SOP class the SCP supports: pynetdicom's full list plus
    :data:`CT_STUDY_SOP_CLASSES` (already in it today; kept explicit so that a
    pynetdicom upgrade cannot silently drop one)."""
    classes = [UID(cx.abstract_syntax) for cx in AllStoragePresentationContexts if cx.abstract_syntax]
    classes.extend(uid for uid in CT_STUDY_SOP_CLASSES if uid not in classes)
    return tuple(classes)


class IngressServer:
    """A running ingress SCP (a plain listener, a TLS listener, or both on one AE);
    :meth:`stop` shuts it down (idempotent)."""

    def __init__(
        self,
        ae: AE,
        plain: GuardedAssociationServer | None,
        config: IngressConfig,
        tls: GuardedAssociationServer | None = None,
    ) -> None:
        self._ae = ae
        self._plain = plain
        self._tls = tls
        self._config = config
        self._stopped = False

    @property
    def ae(self) -> AE:
        return self._ae

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) of the plain listener (of the TLS one when there is no plain one)."""
        server = self._plain or self._tls
        assert server is not None
        host, port = server.server_address[:2]
        return str(host), int(port)

    @property
    def tls_address(self) -> tuple[str, int] | None:
        """(host, port) of the TLS listener, None without one."""
        if self._tls is None:
            return None
        host, port = self._tls.server_address[:2]
        return str(host), int(port)

    @property
    def serving(self) -> bool:
        """True while the listening socket is open and not stopped (the node's /healthz)."""
        try:
            servers = [srv for srv in (self._plain, self._tls) if srv is not None]
            return not self._stopped and bool(servers) and all(srv.socket.fileno() != -1 for srv in servers)
        except (OSError, AttributeError):
            return False

    def stop(self) -> None:
        """Stop accepting, abort associations still open, close the socket."""
        if self._stopped:
            return
        self._stopped = True
        self._ae.shutdown()
        LOGGER.info("ingress %s on %s stopped", self._config.ae_title, _ports(self._config))

    def __enter__(self) -> IngressServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def build_ae(config: IngressConfig, transfer_syntaxes: Sequence[str] = TRANSFER_SYNTAXES) -> AE:
    """An AE configured from ``config`` (titles, timeouts, PDU size, contexts), not started."""
    ae = create_ae(config.association)
    ae.maximum_associations = config.maximum_associations
    # Rejections: called AE must be ours (diagnostic 7), calling AE in the list when
    # one is given (diagnostic 3); peers are checked by handlers.handle_requested.
    ae.require_called_aet = True
    ae.require_calling_aet = list(config.allowed_calling_aets)
    ae.add_supported_context(VERIFICATION_SOP_CLASS)
    for sop_class in storage_sop_classes():
        ae.add_supported_context(sop_class, list(transfer_syntaxes))
    return ae


def start_ingress(
    config: IngressConfig, index: InstanceIndex, observer: IngressObserver | None = None,
    refusals: RefusalLog | None = None,
) -> IngressServer:
    """Start the C-STORE SCP described by ``config``, recording into ``index`` (and every refused
    C-STORE or association into ``refusals``); returns at once.

    ``observer`` hears of refused associations, security alerts and stored instances (audit, metrics)."""
    config.spool_dir.mkdir(parents=True, exist_ok=True)
    leftovers = remove_temporaries(config.spool_dir)
    if leftovers:
        LOGGER.warning("removed %d temporary files left in %s by an interrupted run", leftovers, config.spool_dir)
    ae = build_ae(config)
    association_log = AssociationLog()
    handlers: list[EventHandlerType] = [
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_C_STORE, handle_store, [index, config, association_log, observer, refusals]),
        (evt.EVT_REQUESTED, handle_requested, [config, observer, refusals]),
        (evt.EVT_REJECTED, handle_rejected, [observer, refusals]),
        (evt.EVT_ACCEPTED, handle_accepted, [association_log]),
        (evt.EVT_CONN_CLOSE, handle_conn_close, [association_log]),
    ]
    policy = ConnectionPolicy(
        peer_allowed=config.peer_allowed,
        associate_timeout_s=config.associate_timeout_s,
        max_connections_per_peer=config.max_connections_per_peer,
        alert=_alert_to(observer, refusals),
    )
    tls_context = None
    if config.tls is not None and config.tls_port:
        check_tls_files(config.tls)  # before binding anything: a bad file stops the start with its name
        tls_context = server_context(config.tls)
    plain = start_server(ae, config.host, config.port, handlers, policy=policy) if config.plain_port_enabled else None
    try:
        tls = (
            start_server(ae, config.host, config.tls_port, handlers, policy=policy, ssl_context=tls_context)
            if tls_context is not None
            else None
        )
    except BaseException:
        ae.shutdown()
        raise
    LOGGER.info(
        "ingress %s listening on %s (spool %s, %d storage SOP classes, %d transfer syntaxes, "
        "associate timeout %g s, %d connections per peer)",
        config.ae_title,
        _ports(config),
        config.spool_dir,
        len(ae.supported_contexts) - 1,
        len(TRANSFER_SYNTAXES),
        config.associate_timeout_s,
        config.max_connections_per_peer,
    )
    return IngressServer(ae, plain, config, tls)


def _alert_to(observer: IngressObserver | None, refusals: RefusalLog | None) -> Callable[[str, str], None]:
    """The listener's refusals (peer not allowed, per-peer limit, TLS handshake failed, silent
    connection): logged by :func:`scp.security.security_alert`, recorded in ``refusals`` and told to
    ``observer`` (the audit trail's Security Alert); neither may break the listener."""

    def alert(peer_address: str, reason: str) -> None:
        security_alert(peer_address, reason)
        if refusals is not None:
            try:
                refusals.record(Refusal(at=time.time(), kind=KIND_ASSOCIATION, calling_ae="", peer_address=peer_address,
                                        status=None, reason=f"connection refused: {reason}"))
            except Exception:  # noqa: BLE001
                LOGGER.exception("could not record the refusal of %s", peer_address)
        if observer is not None:
            try:
                observer.security_alert(peer_address, reason)
            except Exception:  # noqa: BLE001
                LOGGER.exception("ingress observer security_alert failed")

    return alert


def _ports(config: IngressConfig) -> str:
    ports = [f"{config.host}:{config.port}"] if config.plain_port_enabled else []
    if config.tls is not None and config.tls_port:
        mutual = ", client certificate required" if config.tls.require_client_certificate else ""
        ports.append(f"{config.host}:{config.tls_port} (TLS{mutual})")
    return " and ".join(ports)
