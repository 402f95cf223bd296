"""Coded concepts used by the DICOM-SEG and TID 1500 SR builders, in one place.

Standard codes come from PS3.16 (the CID each is drawn from is noted); where no
standard concept exists the node uses its private coding scheme :data:`PRIVATE_SCHEME`
("99THIGHNODE", PS3.16 section 8: local schemes begin with "99"), which every SR
declares in its CodingSchemeIdentificationSequence (PS3.3 C.12.1.1.1.3,
:func:`private_scheme_identification`).

Structure codes (SegmentedPropertyType, SR Finding and Finding Site) are not here:
they are data, read from the label table (config/labels.toml);
:func:`dicomout.seg.structure_code` turns a label into a code and refuses an empty one.

Everything here is an immutable :class:`pydicom.sr.coding.Code` or a function.
"""

from __future__ import annotations

import logging
from types import MappingProxyType

from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.sr.coding import Code

from pipeline.types import (
    FLAG_PARTIAL_COMMON_RANGE,
    FLAG_EMPTY,
    FLAG_IMPLAUSIBLE_VOLUME,
    FLAG_METAL,
    FLAG_NO_HEIGHT,
    FLAG_PARTIAL_BOTTOM,
    FLAG_PARTIAL_TOP,
    GROUP_ABOVE_KNEE,
    GROUP_ALL,
    GROUP_GLUTEAL,
    SIDE_BOTH,
)

logger = logging.getLogger(__name__)

PRIVATE_SCHEME = "99THIGHNODE"
"""Coding Scheme Designator of the node's private concepts."""
PRIVATE_SCHEME_NAME = "thighnode private concepts"
PRIVATE_SCHEME_RESPONSIBLE = "thighnode project"


def _private(value: str, meaning: str) -> Code:
    return Code(value, PRIVATE_SCHEME, meaning)


# --- Segmentation (PS3.3 C.8.20.2, Segment Description Macro) -------------------------

ANATOMICAL_STRUCTURE = Code("91723000", "SCT", "Anatomical Structure")
"""SegmentedPropertyCategory of every structure (CID 7150). Older dcmqi examples use
SCT 123037004 (the SRT T-D000A mapping); current PS3.16 CID 7150 lists 91723000."""

RIGHT = Code("24028007", "SCT", "Right")
LEFT = Code("7771000", "SCT", "Left")
RIGHT_AND_LEFT = Code("51440002", "SCT", "Right and left")
"""Laterality (CID 244): SegmentedPropertyTypeModifier in SEG, laterality of a finding site in SR."""

ARTIFICIAL_INTELLIGENCE = Code("123110", "DCM", "Artificial Intelligence")
"""Algorithm Family (CID 7162) of the segmentation model."""

# --- SR document (TID 1500 and the measurement group templates) ----------------------

CT_OF_THIGH = Code("241572009", "SCT", "Computed tomography of thigh")
"""Procedure reported (TID 1500 row 4; CID 100 is extensible)."""

SKELETAL_MUSCLE = Code("127954009", "SCT", "Skeletal muscle")
"""Finding of the patient-level group of muscle totals (TID 1501)."""

VOLUME = Code("118565006", "SCT", "Volume")
SUM_OF_SEGMENTED_VOXELS = Code("126030", "DCM", "Sum of segmented voxel method for volume")
"""Volume (CID 7469 via TID 1411) and its method (CID 7474)."""

ATTENUATION_COEFFICIENT = Code("112031", "DCM", "Attenuation Coefficient")
MEAN = Code("373098007", "SCT", "Mean")
STANDARD_DEVIATION = Code("386136009", "SCT", "Standard Deviation")
"""Attenuation (CID 7469) with its derivations (CID 7464)."""

MASS = Code("118538004", "SCT", "Mass")
"""Mass, the property (SNOMED qualifier value); not SCT 4147007, which is a mass lesion."""

FAT_FRACTION = Code("129100", "DCM", "Fat fraction")
"""Fat fraction (CID 7469); here the share of voxels in the fat HU window, in percent."""

BODY_HEIGHT = Code("8302-2", "LN", "Body height")

QUALITY_CONTROL = Code("110002", "DCM", "Quality Control")
"""Concept name of the qualitative evaluations that carry quality flags."""

COMMENT = Code("121106", "DCM", "Comment")
"""Concept name of the free-text messages that go with quality flags."""

YES = Code("373066001", "SCT", "Yes")
NO = Code("373067005", "SCT", "No")

VOLUME_PER_HEIGHT2 = _private("TN0001", "Muscle volume per height squared")
SKELETAL_MUSCLE_INDEX = _private("TN0002", "Skeletal muscle index (mass per height squared)")
SMI_BELOW_THRESHOLD = _private("TN0003", "Skeletal muscle index below sarcopenia threshold")
SMI_THRESHOLD = _private("TN0004", "Sarcopenia threshold of skeletal muscle index")
THRESHOLD_CALIBRATION = _private("TN0005", "Sarcopenia threshold calibration")
HEIGHT_SOURCE = _private("TN0006", "Source of body height")
MASS_DERIVATION = _private("TN0007", "Derivation of mass from attenuation")
GROUP_NOT_REPORTED = _private("TN0008", "Muscle group total not reported")
"""Qualitative evaluation whose value is a GROUP_CODES entry: the field of view does not cover
the group's muscles, so it has no numeric value (the reason is a TEXT "Comment")."""
SARCOPENIA_SCREEN = _private("TN0009", "Sarcopenia screen")
"""TEXT: why the sarcopenia screen was not assessed, and which group's SMI was measured instead."""

GROUP_CODES: MappingProxyType[str, Code] = MappingProxyType(
    {
        GROUP_GLUTEAL: _private("TN0010", "Gluteal muscles"),
        GROUP_ABOVE_KNEE: _private("TN0011", "Thigh muscles above the knee"),
        GROUP_ALL: _private("TN0012", "All measured muscles"),
    }
)
"""Finding site of a muscle-group total (GroupMeasurement.group)."""

FLAG_CODES: MappingProxyType[str, Code] = MappingProxyType(
    {
        FLAG_PARTIAL_TOP: _private("TN0101", "Cut by the superior end of the field of view"),
        FLAG_PARTIAL_BOTTOM: _private("TN0102", "Cut by the inferior end of the field of view"),
        FLAG_METAL: _private("TN0103", "Metal near the structure"),
        FLAG_IMPLAUSIBLE_VOLUME: _private("TN0104", "Implausible volume"),
        FLAG_NO_HEIGHT: _private("TN0105", "No body height"),
        FLAG_EMPTY: _private("TN0106", "Structure not found"),
    }
)
"""Value of a quality-control evaluation per QualityFlag.code (pipeline.types)."""

UNKNOWN_FLAG = _private("TN0199", "Other quality flag")


# --- Longitudinal comparison with the prior study (dicomout.sr, prior=Comparison) ----

STUDY_INSTANCE_UID = Code("110180", "DCM", "Study Instance UID")
"""UIDREF of the prior study in the comparison group (CID 10001 "UID Types")."""
STUDY_DATE = Code("111060", "DCM", "Study Date")
"""DATE of the prior study in the comparison group."""
COMPARISON_WITH_PRIOR_DONE = Code("122140", "DCM", "Comparison with Prior Study Done")
"""Qualitative evaluation (value :data:`YES` / :data:`NO`): per structure and side whether it
was compared, and in the patient-level group whether any prior study was compared."""

VOLUME_CHANGE = _private("TN0201", "Volume change since prior study")
VOLUME_CHANGE_RATIO = _private("TN0202", "Volume change since prior study relative to prior volume")
VOLUME_CHANGE_PER_HEIGHT2 = _private("TN0203", "Volume change since prior study per height squared")
MASS_CHANGE = _private("TN0204", "Mass change since prior study")
MEAN_ATTENUATION_CHANGE = _private("TN0205", "Mean attenuation change since prior study")
FAT_FRACTION_CHANGE = _private("TN0206", "Fat fraction change since prior study")
PRIOR_VOLUME_COMMON_RANGE = _private("TN0207", "Prior study volume over the common range")
CURRENT_VOLUME_COMMON_RANGE = _private("TN0208", "Current study volume over the common range")
COMMON_RANGE_INFERIOR = _private("TN0209", "Inferior limit of the common range from the landmark")
COMMON_RANGE_SUPERIOR = _private("TN0210", "Superior limit of the common range from the landmark")
"""Change values over the part of the leg both scans cover (StructureChange, pipeline.types);
no PS3.16 concept names a change of a measurement between two studies."""
COMPARISON_INTERVAL = _private("TN0211", "Interval since prior study")
COMPARISON_METHOD = _private("TN0212", "Comparison method")
COMPARISON_LANDMARK = _private("TN0213", "Alignment landmark")
COMPARISON_NOTE = _private("TN0214", "Comparison note")
"""TEXT: why a structure was not compared, or over which range / with which caveat it was."""
COMPARISON_FLAG = _private("TN0215", "Comparison quality flag")
"""Concept name of the qualitative evaluations carrying StructureChange.flags."""
OPERATED_SIDE = _private("TN0216", "Side with metal in either study")
"""Qualitative evaluation (value: laterality, CID 244) of Comparison.operated_side."""
PRIOR_STUDY_SEARCH = _private("TN0217", "Prior study search")
"""TEXT: where the node looked for a prior study and what it found."""

COMPARISON_FLAG_CODES: MappingProxyType[str, Code] = MappingProxyType(
    {
        FLAG_PARTIAL_COMMON_RANGE: _private("TN0107", "Compared over the common range only"),
        FLAG_METAL: _private("TN0108", "Metal near the structure in either study: HU values withheld"),
    }
)
"""Value of a comparison-flag evaluation per StructureChange flag (pipeline.compare)."""


# --- Segmentation uncertainty (pipeline.uncertainty; StructureMeasurement.uncertainty) ---------

SEGMENTATION_ENTROPY = _private("TN0301", "Mean normalized voxel entropy of the segmentation")
"""Numeric (UCUM "1", 0..1): mean over the structure's voxels of the entropy of the test-time
augmentation samples' mean class probabilities, divided by log(number of classes)."""
VOLUME_SPREAD = _private("TN0302", "Volume coefficient of variation across augmentation samples")
"""Numeric (%): population SD / mean of the structure's volume over the samples."""
LOW_CONFIDENCE = _private("TN0303", "Low segmentation confidence")
"""Qualitative evaluation, value :data:`YES` / :data:`NO`: either value above the bundle's
threshold (calibrated on labelled phantoms). No PS3.16 concept names a segmentation's own
uncertainty, hence private concepts."""
TEST_TIME_AUGMENTATION = _private("TN0304", "Test-time augmentation")
"""Measurement method of the two values above."""

# --- UCUM units (PS3.16 CID 82 "Units of Measurement") --------------------------------

UNIT_CM3 = Code("cm3", "UCUM", "cubic centimeter")
UNIT_HU = Code("[hnsf'U]", "UCUM", "Hounsfield unit")
UNIT_G = Code("g", "UCUM", "gram")
UNIT_PERCENT = Code("%", "UCUM", "percent")
UNIT_M = Code("m", "UCUM", "meter")
UNIT_CM3_PER_M2 = Code("cm3/m2", "UCUM", "cubic centimeter per square meter")
UNIT_KG_PER_M2 = Code("kg/m2", "UCUM", "kilogram per square meter")
UNIT_MM = Code("mm", "UCUM", "millimeter")
UNIT_DAY = Code("d", "UCUM", "day")
UNIT_ONE = Code("1", "UCUM", "no units")


def laterality(side: str) -> Code | None:
    """Laterality code of a side ("right", "left", "both"); ``None`` for "none" or ""."""
    return {"right": RIGHT, "left": LEFT, SIDE_BOTH: RIGHT_AND_LEFT}.get(side)


def flag_code(flag: str) -> Code:
    """Coded value of a quality flag; unknown flags get :data:`UNKNOWN_FLAG` (logged)."""
    code = FLAG_CODES.get(flag)
    if code is None:
        logger.warning("quality flag %r has no code; using %s", flag, UNKNOWN_FLAG.value)
        return UNKNOWN_FLAG
    return code


def comparison_flag_code(flag: str) -> Code:
    """Coded value of a comparison flag; unknown flags get :data:`UNKNOWN_FLAG` (logged)."""
    code = COMPARISON_FLAG_CODES.get(flag)
    if code is None:
        logger.warning("comparison flag %r has no code; using %s", flag, UNKNOWN_FLAG.value)
        return UNKNOWN_FLAG
    return code


def private_scheme_identification() -> CodingSchemeIdentificationItem:
    """Item of CodingSchemeIdentificationSequence (0008,0110) declaring :data:`PRIVATE_SCHEME`
    (PS3.3 C.12.1.1.1.3, SOP Common Module)."""
    return CodingSchemeIdentificationItem(
        designator=PRIVATE_SCHEME,
        name=PRIVATE_SCHEME_NAME,
        responsible_organization=PRIVATE_SCHEME_RESPONSIBLE,
    )
