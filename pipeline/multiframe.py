"""Multi-frame CT objects: their SOP classes and one header per frame.

Enhanced CT (PS3.3 A.38) and Legacy Converted Enhanced CT (A.70) objects hold many
frames, each a slice. The attributes a single-frame CT Image (A.3) has at the top level
come, for frame ``i``, from the PerFrameFunctionalGroupsSequence item ``i`` or else the
SharedFunctionalGroupsSequence item (PS3.3 C.7.6.16 Multi-frame Functional Groups);
:func:`frame_headers` lifts them to the top level of one header per frame, so that
selection and loading read a frame as they read a single-frame instance.
"""

from __future__ import annotations

from collections.abc import Mapping

from pydicom.dataset import Dataset

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"
LEGACY_CONVERTED_ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.2"
MULTI_FRAME_CT_STORAGE: tuple[str, ...] = (ENHANCED_CT_IMAGE_STORAGE, LEGACY_CONVERTED_ENHANCED_CT_IMAGE_STORAGE)
"""Multi-frame CT SOP classes whose frames are read as slices (PS3.3 A.38, A.70)."""

# Where a frame's attribute lives in the Multi-frame Functional Groups: the functional
# group sequences searched in order, each first in the frame's PerFrameFunctionalGroupsSequence
# item, then in the SharedFunctionalGroupsSequence item (PS3.3 C.7.6.16.1.1: a macro is in one
# or the other). Keywords in _TOP_LEVEL_FALLBACK are finally taken from the top level.
FRAME_ATTRIBUTES: Mapping[str, tuple[str, ...]] = {
    "ImagePositionPatient": ("PlanePositionSequence",),
    "ImageOrientationPatient": ("PlaneOrientationSequence",),
    "PixelSpacing": ("PixelMeasuresSequence",),
    "SliceThickness": ("PixelMeasuresSequence",),
    "SpacingBetweenSlices": ("PixelMeasuresSequence",),
    "RescaleIntercept": ("PixelValueTransformationSequence",),
    "RescaleSlope": ("PixelValueTransformationSequence",),
    "RescaleType": ("PixelValueTransformationSequence",),
    "FrameType": ("CTImageFrameTypeSequence",),
    "ConvolutionKernel": (
        "CTReconstructionSequence",
        "UnassignedPerFrameConvertedAttributesSequence",
        "UnassignedSharedConvertedAttributesSequence",
    ),
    "GantryDetectorTilt": (
        "CTAcquisitionDetailsSequence",
        "UnassignedPerFrameConvertedAttributesSequence",
        "UnassignedSharedConvertedAttributesSequence",
    ),
}
_TOP_LEVEL_FALLBACK = frozenset({"ConvolutionKernel", "GantryDetectorTilt"})
_INSTANCE_ATTRIBUTES: tuple[str, ...] = (
    "SOPClassUID",
    "SOPInstanceUID",
    "Modality",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SeriesDescription",
    "SeriesNumber",
    "FrameOfReferenceUID",
    "ImageType",
    "NumberOfFrames",
    "Rows",
    "Columns",
    "SamplesPerPixel",
    "PixelRepresentation",
    "PixelPaddingValue",
    "PixelPaddingRangeLimit",
)


def is_multi_frame(ds: Dataset) -> bool:
    """Whether ``ds`` is an Enhanced / Legacy Converted Enhanced CT object, whose frames are slices."""
    return str(ds.get("SOPClassUID", "")) in MULTI_FRAME_CT_STORAGE


def number_of_frames(ds: Dataset) -> int:
    """NumberOfFrames (0028,0008) of ``ds``; 1 when absent or unreadable (a single-frame instance)."""
    frames = ds.get("NumberOfFrames")
    try:
        return int(frames) if frames not in (None, "") else 1
    except (TypeError, ValueError):
        return 1


def _group_item(container: Dataset | None, sequence_keyword: str) -> Dataset | None:
    if container is None:
        return None
    seq = container.get(sequence_keyword)
    return seq[0] if seq else None


def frame_headers(ds: Dataset) -> list[Dataset]:
    """One header per frame of ``ds``, with the frame's attributes at the top level.

    For a single-frame instance that is ``[ds]``. For an Enhanced / Legacy Converted
    Enhanced CT object it is one new :class:`Dataset` per PerFrameFunctionalGroupsSequence
    item (frame ``i + 1`` at index ``i``), holding the instance attributes the loader and
    the selection need (SOPInstanceUID, SeriesInstanceUID, Rows, ImageType ...) and each
    keyword of the functional groups table in this module taken from the frame's
    per-frame item, else the shared item (PS3.3 C.7.6.16.1.1). The elements are shared
    with ``ds``, not copied: treat the result as read-only. A missing attribute stays
    missing (callers name it); items beyond NumberOfFrames are ignored.
    """
    if not is_multi_frame(ds):
        return [ds]
    shared = _group_item(ds, "SharedFunctionalGroupsSequence")
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    instance = Dataset()
    for kw in _INSTANCE_ATTRIBUTES:
        elem = ds.data_element(kw) if kw in ds else None
        if elem is not None:
            instance[elem.tag] = elem
    views: list[Dataset] = []
    for frame_item in list(per_frame)[: number_of_frames(ds)]:
        view = Dataset()
        view.update(instance)
        for kw, sequences in FRAME_ATTRIBUTES.items():
            for seq_kw in sequences:
                found = None
                for container in (frame_item, shared):
                    item = _group_item(container, seq_kw)
                    if item is not None and kw in item and item[kw].value not in (None, ""):
                        found = item.data_element(kw)
                        break
                if found is not None:
                    view[found.tag] = found
                    break
            else:
                if kw in _TOP_LEVEL_FALLBACK and kw in ds:
                    elem = ds.data_element(kw)
                    if elem is not None:
                        view[elem.tag] = elem
        views.append(view)
    return views

