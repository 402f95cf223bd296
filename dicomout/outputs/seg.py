"""The SEG output: the segmentation as a DICOM Segmentation (PS3.3 A.51; :mod:`dicomout.seg`)."""

from __future__ import annotations

from collections.abc import Mapping

from pydicom.dataset import Dataset
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)

from dicomout.context import OutputSettings, StudyContext
from dicomout.seg import build_seg
from dicomout.uids import SEG_VERIFIED_SERIES

LABELMAP_SYNTAXES: Mapping[str, UID] = {
    "RLE": RLELossless,
    "JPEGLS": JPEGLSLossless,
    "JPEG2000": JPEG2000Lossless,
    "deflate": DeflatedExplicitVRLittleEndian,
    "none": ExplicitVRLittleEndian,
}
"""OutputSettings.labelmap_compression -> transfer syntax of a LABELMAP SEG."""

BINARY_SYNTAXES: Mapping[str, UID] = {
    "deflate": DeflatedExplicitVRLittleEndian,
    "JPEG2000": JPEG2000Lossless,
    "none": ExplicitVRLittleEndian,
}
"""OutputSettings.binary_compression -> transfer syntax of a BINARY SEG (see bench/bench_seg.py)."""


def seg_transfer_syntax(settings: OutputSettings) -> UID:
    """The SEG's transfer syntax from ``[outputs]``: binary_compression or labelmap_compression by seg_type."""
    if settings.seg_type == "LABELMAP":
        return LABELMAP_SYNTAXES[settings.labelmap_compression]
    return BINARY_SYNTAXES[settings.binary_compression]


class SegOutput:
    """BINARY or LABELMAP Segmentation of the selected series, as the output settings say."""

    name = "seg"
    needs: tuple[str, ...] = ()

    def build(self, context: StudyContext, built: Mapping[str, Dataset]) -> Dataset:
        settings = context.settings
        return build_seg(
            context.volume,
            context.segmentation,
            context.selected.headers,
            segmentation_type=settings.seg_type,
            transfer_syntax_uid=seg_transfer_syntax(settings),
            manufacturer=settings.manufacturer,
            software_version=context.software_version,
            device_serial=settings.device_serial,
            **_correction_identity(context),
        )


def _correction_identity(context: StudyContext) -> dict[str, object]:
    """UIDs, series number and description of the SEG of a reader's correction (none otherwise)."""
    if context.verification is None:
        return {}
    return {
        "series_uid": context.output_uid("seg.series"), "instance_uid": context.output_uid("seg.instance"),
        "series_number": SEG_VERIFIED_SERIES.number,
        "series_description": SEG_VERIFIED_SERIES.description(context.model.name, context.model.version),
    }
