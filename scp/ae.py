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
from collections.abc import Sequence

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
from pynetdicom.transport import ThreadedAssociationServer

from scp.association import create_ae, start_server
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
from scp.refusals import RefusalLog
from scp.spool import remove_temporaries
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
    """A running ingress SCP; :meth:`stop` shuts it down (idempotent)."""

    def __init__(self, ae: AE, server: ThreadedAssociationServer, config: IngressConfig) -> None:
        self._ae = ae
        self._server = server
        self._config = config
        self._stopped = False

    @property
    def ae(self) -> AE:
        return self._ae

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) the server listens on."""
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    @property
    def serving(self) -> bool:
        """True while the listening socket is open and not stopped (the node's /healthz)."""
        try:
            return not self._stopped and self._server.socket.fileno() != -1
        except (OSError, AttributeError):
            return False

    def stop(self) -> None:
        """Stop accepting, abort associations still open, close the socket."""
        if self._stopped:
            return
        self._stopped = True
        self._ae.shutdown()
        LOGGER.info("ingress %s on %s:%d stopped", self._config.ae_title, self._config.host, self._config.port)

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
    server = start_server(ae, config.host, config.port, handlers)
    LOGGER.info(
        "ingress %s listening on %s:%d (spool %s, %d storage SOP classes, %d transfer syntaxes)",
        config.ae_title,
        config.host,
        config.port,
        config.spool_dir,
        len(ae.supported_contexts) - 1,
        len(TRANSFER_SYNTAXES),
    )
    return IngressServer(ae, server, config)
