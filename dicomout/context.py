"""What every output builder is given: one study, processed, as a frozen context.

The workflow builds a :class:`StudyContext` once per job, after the measure and compare
stages, and hands the same object to each builder (:mod:`dicomout.outputs`). A builder
reads only the context (and the datasets of the outputs it depends on), so given a
context its result is deterministic: the content time is in the context, not read from
the clock.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from dicomout.uids import correction_uid, output_uid
from pipeline.correction import StructureDifference
from pipeline.types import Comparison, Measurements, PriorSearch, Segmentation, SelectedSeries, Volume

SEG_TYPES: tuple[str, ...] = ("BINARY", "LABELMAP")
"""Allowed :attr:`OutputSettings.seg_type` values (PS3.3 C.8.20.2 SegmentationType)."""

LABELMAP_COMPRESSIONS: tuple[str, ...] = ("RLE", "JPEGLS", "JPEG2000", "deflate", "none")
"""Allowed :attr:`OutputSettings.labelmap_compression` values."""

BINARY_COMPRESSIONS: tuple[str, ...] = ("deflate", "JPEG2000", "none")
"""Allowed :attr:`OutputSettings.binary_compression` values."""


@dataclass(frozen=True)
class Equipment:
    """General Equipment (PS3.3 C.7.5.1) of the node's outputs, and the SR's device observer."""

    manufacturer: str
    software_version: str
    device_serial: str
    institution_name: str = ""  # InstitutionName, written when not empty


@dataclass(frozen=True)
class OutputSettings:
    """How the outputs are written (the workflow maps the node's ``[outputs]`` section to this)."""

    seg_type: str = "BINARY"
    labelmap_compression: str = "deflate"
    binary_compression: str = "deflate"
    manufacturer: str = "thighnode"
    institution_name: str = ""
    device_serial: str = "0001"

    def __post_init__(self) -> None:
        if self.seg_type not in SEG_TYPES:
            raise ValueError(f"OutputSettings.seg_type is {self.seg_type!r}; allowed: {', '.join(SEG_TYPES)}")
        if self.binary_compression not in BINARY_COMPRESSIONS:
            raise ValueError(
                f"OutputSettings.binary_compression is {self.binary_compression!r}; "
                f"allowed: {', '.join(BINARY_COMPRESSIONS)}"
            )
        if self.labelmap_compression not in LABELMAP_COMPRESSIONS:
            raise ValueError(
                f"OutputSettings.labelmap_compression is {self.labelmap_compression!r}; "
                f"allowed: {', '.join(LABELMAP_COMPRESSIONS)}"
            )


@dataclass(frozen=True)
class ModelInfo:
    """The segmentation model: name, version, whether it is a demonstration model
    (bundle metadata ``demonstration``: the report then says "not for clinical use"), and the sha256 of its
    weights file ("" when unknown), printed in the report."""

    name: str
    version: str
    demonstration: bool = False
    sha256: str = ""


@dataclass(frozen=True)
class Verification:
    """A reader's correction of the model's segmentation (the outputs are then marked verified).

    ``observer_name`` is the correction SEG's ContentCreatorName (a person's name, PN: never
    logged); ``seg_sop_instance_uid`` that SEG's SOPInstanceUID, from which the outputs' UIDs
    are derived (:func:`dicomout.uids.correction_uid`); ``differences`` the model's values
    against the corrected ones (:func:`pipeline.correction.compare_with_model`).
    """

    observer_name: str
    seg_sop_instance_uid: str
    verified_at: datetime
    differences: tuple[StructureDifference, ...]
    organization: str = ""

    def __post_init__(self) -> None:
        if not self.seg_sop_instance_uid:
            raise ValueError("Verification.seg_sop_instance_uid is empty; the correction SEG's SOPInstanceUID is required")

    @property
    def observer_display(self) -> str:
        """The observer's name for text ("Reader^Test" -> "Test Reader"); "unknown reader" when empty."""
        parts = [p for p in self.observer_name.split("^")[:2] if p.strip()]
        return " ".join(reversed(parts)) if parts else "unknown reader"

    def difference(self, key: str, side: str) -> StructureDifference | None:
        return next((d for d in self.differences if d.key == key and d.side == side), None)


@dataclass(frozen=True)
class StudyContext:
    """One processed study: everything an output builder may read.

    ``selected`` carries the chosen series' pixel-less headers (``selected.headers``, read
    once by selection), the patient data and StudyDate. ``content_time`` is "now" for the
    outputs' ContentDate/Time (injected by the workflow).
    """

    job_id: int
    study_uid: str
    selected: SelectedSeries
    volume: Volume
    segmentation: Segmentation
    measurements: Measurements
    model: ModelInfo
    settings: OutputSettings
    software_version: str
    content_time: datetime
    comparison: Comparison | None = None
    prior_search: PriorSearch | None = None
    verification: Verification | None = None

    def output_uid(self, kind: str) -> str:
        """An output's UID: from the source series and the model version, or, for outputs of a
        reader's correction, from the correction SEG's SOPInstanceUID (:mod:`dicomout.uids`)."""
        if self.verification is not None:
            return correction_uid(self.verification.seg_sop_instance_uid, kind)
        return output_uid(self.selected.series_instance_uid, self.model.version, kind)

    @property
    def equipment(self) -> Equipment:
        """The node as General Equipment, from the settings and the software version."""
        return Equipment(
            manufacturer=self.settings.manufacturer,
            software_version=self.software_version,
            device_serial=self.settings.device_serial,
            institution_name=self.settings.institution_name,
        )
