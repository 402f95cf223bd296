"""Checks of the two value representations every network edge of the node validates:
AE titles (VR AE) and UIDs (VR UI), PS3.5 Section 6.2 and Chapter 9.

Each check names the field, the value seen and what is allowed. The error class is a
parameter, so each caller raises its own stage's error (an ingress setting, a PACS to
query, a destination, a builder argument) with the same wording.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from node_errors import NodeError
from scp.errors import IngressConfigError, InvalidUIDError

#: Largest AE title (PS3.5 Table 6.2-1, VR AE).
AE_TITLE_MAX_CHARS = 16

#: Longest UI value (PS3.5 Table 6.2-1).
UID_MAX_CHARS = 64

# Components of digits, no leading zero unless the component is "0" (PS3.5 9.1).
_UID_PATTERN = re.compile(r"(?:0|[1-9][0-9]*)(?:\.(?:0|[1-9][0-9]*))*")

ErrorFactory = Callable[[str], NodeError]


def validate_ae_title(value: object, field_name: str, error: ErrorFactory = IngressConfigError) -> str:
    """Check ``value`` against the AE VR and return it without its insignificant spaces.

    PS3.5 Table 6.2-1: at most 16 characters of the default character repertoire,
    excluding backslash and control characters; leading and trailing spaces are not
    significant, and a title of spaces only is not allowed (PS3.8 7.1.1.x). Raises
    ``error(message)``.
    """
    allowed = "1 to 16 printable ASCII characters, no backslash, not only spaces"
    if not isinstance(value, str):
        raise error(f"{field_name} must be a string ({allowed}); got {value!r}")
    if not 1 <= len(value) <= AE_TITLE_MAX_CHARS:
        raise error(f"{field_name} is {len(value)} characters long ({value!r}); allowed: {allowed}")
    bad = [c for c in value if not (" " <= c <= "~") or c == "\\"]
    if bad:
        raise error(f"{field_name} {value!r} contains {bad[0]!r}, which the AE VR does not allow; allowed: {allowed}")
    if not value.strip(" "):
        raise error(f"{field_name} {value!r} is only spaces; allowed: {allowed}")
    return value.strip(" ")


def is_valid_uid(value: object) -> bool:
    """True when ``value`` is a UI value: 1 to 64 digits and dots, no empty component,
    no leading zero in a component other than ``0`` (PS3.5 9.1)."""
    return isinstance(value, str) and 0 < len(value) <= UID_MAX_CHARS and _UID_PATTERN.fullmatch(value) is not None


def validate_uid(value: object, keyword: str, error: ErrorFactory = InvalidUIDError) -> str:
    """Return ``value`` if it is a valid UI value (see :func:`is_valid_uid`), else raise
    ``error(message)``; ``keyword`` names the attribute (e.g. ``"StudyInstanceUID"``)."""
    allowed = (
        f"1 to {UID_MAX_CHARS} characters of digits and dots, "
        "no empty component, no leading zero in a component other than '0'"
    )
    if not isinstance(value, str):
        raise error(f"{keyword} must be a UID string ({allowed}); got {value!r}")
    if not value:
        raise error(f"{keyword} is empty; allowed: {allowed}")
    if len(value) > UID_MAX_CHARS:
        raise error(f"{keyword} {value!r} is {len(value)} characters long; allowed: {allowed}")
    if not is_valid_uid(value):
        raise error(f"{keyword} {value!r} is not a valid UID; allowed: {allowed}")
    return value
