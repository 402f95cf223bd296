"""DIMSE statuses by name, their ranges, and how messages describe them.

One table for every service the node uses: Verification (PS3.4 Annex A), Storage
(PS3.4 B.2.3; we are SCP on ingress and on C-GET, SCU when sending), and
Query/Retrieve as SCU (PS3.4 C.4.1.1.4 C-FIND, C.4.2.1.5 C-MOVE, C.4.3.1.4 C-GET);
general statuses from PS3.7 Annex C.
"""

from __future__ import annotations

from types import MappingProxyType

from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS, VERIFICATION_SERVICE_CLASS_STATUS

# --- general (PS3.7 C) -------------------------------------------------------------------
STATUS_SUCCESS = 0x0000
STATUS_PENDING = 0xFF00
#: Pending, one or more Optional Keys were not supported (C-FIND).
STATUS_PENDING_WARNING = 0xFF01
STATUS_CANCEL = 0xFE00
#: Warning: Attribute List Error (PS3.7 C.4.2); the object was stored.
STATUS_WARNING_ATTRIBUTE_LIST = 0x0001
#: Failure: Processing Failure (PS3.7 C.5.1) - an unexpected error (I/O, database).
STATUS_PROCESSING_FAILURE = 0x0110
#: Failure: Duplicate SOP Instance (PS3.7 C.5.9) - permanent.
STATUS_DUPLICATE_SOP_INSTANCE = 0x0111
#: Failure: Invalid SOP Instance (PS3.7 C.5.8) - e.g. an Affected SOP Instance UID that is not a UID.
STATUS_INVALID_SOP_INSTANCE = 0x0117
#: Refused: SOP Class not supported (PS3.7 C.5.20) - permanent.
STATUS_SOP_CLASS_NOT_SUPPORTED = 0x0122
#: Refused: Not Authorized (PS3.7 C.5.21) - permanent until someone reconfigures the peer.
STATUS_NOT_AUTHORIZED = 0x0124

# --- Storage (PS3.4 B.2.3) ---------------------------------------------------------------
#: Refused: Out of Resources - the spool's free space is below the floor, or disk full.
STATUS_OUT_OF_RESOURCES = 0xA700
#: Error: Cannot Understand - the dataset's header could not be parsed.
STATUS_CANNOT_UNDERSTAND = 0xC000
#: Error: Cannot Understand - StudyInstanceUID or SeriesInstanceUID is missing (our choice in C000-CFFF).
STATUS_MISSING_UID = 0xC001
#: Error: Cannot Understand - StudyInstanceUID or SeriesInstanceUID is not a valid UID (ours too).
STATUS_INVALID_UID = 0xC002
#: Error: Cannot Understand - native Pixel Data whose length does not match the Image Pixel Module
#: (Rows x Columns x SamplesPerPixel x BitsAllocated x NumberOfFrames), e.g. a truncated instance.
STATUS_PIXEL_DATA_LENGTH = 0xC003
#: Error: Cannot Understand - an element other than Pixel Data is over ``[security] max_element_bytes``.
STATUS_ELEMENT_TOO_LARGE = 0xC004
#: Error: Cannot Understand - the instance is over ``[security] max_instance_bytes`` (permanent: a retry
#: of the same object cannot pass, so not Out of Resources, which senders retry).
STATUS_INSTANCE_TOO_LARGE = 0xC005
#: Warning: Elements Discarded (PS3.4 B.2.3) - answered to a duplicate SOP Instance whose bytes differ from
#: the valid copy already stored: the first copy is kept, the new one discarded and a conflict recorded.
#: A warning, not the failure 0x0111 (Duplicate SOP Instance, PS3.7 C.5.9): the SOP Instance *is* stored,
#: so the sender must not retry, yet its log shows that this copy was not taken.
STATUS_WARNING_ELEMENTS_DISCARDED = 0xB006

# --- Query/Retrieve (PS3.4 C.4) ----------------------------------------------------------
STATUS_OUT_OF_RESOURCES_MATCHES = 0xA701
STATUS_OUT_OF_RESOURCES_SUBOPERATIONS = 0xA702
STATUS_MOVE_DESTINATION_UNKNOWN = 0xA801
STATUS_IDENTIFIER_MISMATCH = 0xA900
#: Warning: sub-operations complete, one or more failures or warnings (C-MOVE/C-GET).
STATUS_SUBOPERATIONS_WARNING = 0xB000

# --- ranges (first, last inclusive) --------------------------------------------------------
#: Storage warnings (coercion of data elements, elements discarded, data set does not
#: match SOP Class ...); the object was stored.
STATUS_WARNING_FIRST = 0xB000
STATUS_WARNING_LAST = 0xBFFF
#: Refused: Out of Resources (PS3.4 B.2.3) - transient.
STATUS_OUT_OF_RESOURCES_FIRST = 0xA700
STATUS_OUT_OF_RESOURCES_LAST = 0xA7FF
#: Error: Data Set does not match SOP Class (PS3.4 B.2.3) - permanent.
STATUS_DATASET_MISMATCH_FIRST = 0xA900
STATUS_DATASET_MISMATCH_LAST = 0xA9FF
#: Storage: Error: Cannot understand; Query/Retrieve: Failed: Unable to process - permanent.
STATUS_CANNOT_UNDERSTAND_FIRST = 0xC000
STATUS_CANNOT_UNDERSTAND_LAST = 0xCFFF

PENDING_STATUSES = (STATUS_PENDING, STATUS_PENDING_WARNING)

_PERMANENT_STATUSES = frozenset(
    {
        STATUS_SOP_CLASS_NOT_SUPPORTED,
        STATUS_INVALID_SOP_INSTANCE,
        STATUS_NOT_AUTHORIZED,
        STATUS_DUPLICATE_SOP_INSTANCE,
    }
)

_STORAGE_RANGES = (
    (STATUS_WARNING_FIRST, STATUS_WARNING_LAST, "Warning"),
    (STATUS_OUT_OF_RESOURCES_FIRST, STATUS_OUT_OF_RESOURCES_LAST, "Refused: Out of Resources"),
    (STATUS_DATASET_MISMATCH_FIRST, STATUS_DATASET_MISMATCH_LAST, "Error: Data Set does not match SOP Class"),
    (STATUS_CANNOT_UNDERSTAND_FIRST, STATUS_CANNOT_UNDERSTAND_LAST, "Error: Cannot understand"),
)

_RETRIEVE_TEXT = MappingProxyType(
    {
        STATUS_SUCCESS: "Success",
        STATUS_PENDING: "Pending",
        STATUS_PENDING_WARNING: "Pending (optional keys not supported)",
        STATUS_CANCEL: "Cancelled",
        STATUS_SUBOPERATIONS_WARNING: "Sub-operations complete with failures or warnings",
        STATUS_OUT_OF_RESOURCES: "Out of resources",
        STATUS_OUT_OF_RESOURCES_MATCHES: "Out of resources: unable to calculate number of matches",
        STATUS_OUT_OF_RESOURCES_SUBOPERATIONS: "Out of resources: unable to perform sub-operations",
        STATUS_MOVE_DESTINATION_UNKNOWN: "Move destination unknown",
        STATUS_IDENTIFIER_MISMATCH: "Identifier does not match SOP Class",
        STATUS_SOP_CLASS_NOT_SUPPORTED: "SOP Class not supported",
        STATUS_NOT_AUTHORIZED: "Not authorized",
    }
)


def is_stored(status: int) -> bool:
    """True for Success (0x0000) and Warning (0x0001, 0xB000-0xBFFF) C-STORE statuses."""
    return (
        status == STATUS_SUCCESS
        or status == STATUS_WARNING_ATTRIBUTE_LIST
        or STATUS_WARNING_FIRST <= status <= STATUS_WARNING_LAST
    )


def is_permanent_failure(status: int) -> bool:
    """True when a failed C-STORE status means retrying the same object cannot help."""
    return (
        status in _PERMANENT_STATUSES
        or STATUS_DATASET_MISMATCH_FIRST <= status <= STATUS_DATASET_MISMATCH_LAST
        or STATUS_CANNOT_UNDERSTAND_FIRST <= status <= STATUS_CANNOT_UNDERSTAND_LAST
    )


def describe_status(status: int) -> str:
    """A C-STORE or C-ECHO status for logs and errors: ``0xA700 (Refused: Out of Resources)``."""
    known = STORAGE_SERVICE_CLASS_STATUS.get(status) or VERIFICATION_SERVICE_CLASS_STATUS.get(status)
    if known is not None:
        return f"0x{status:04X} ({known[1] or known[0]})"
    for first, last, text in _STORAGE_RANGES:
        if first <= status <= last:
            return f"0x{status:04X} ({text})"
    return f"0x{status:04X}"


def describe_retrieve_status(status: int) -> str:
    """A C-FIND / C-MOVE / C-GET status and its meaning: ``0xA801 Move destination unknown``."""
    text = _RETRIEVE_TEXT.get(status)
    if text is None:
        if STATUS_CANNOT_UNDERSTAND_FIRST <= status <= STATUS_CANNOT_UNDERSTAND_LAST:
            text = "Unable to process"
        else:
            text = "unknown status"
    return f"0x{status:04X} {text}"
