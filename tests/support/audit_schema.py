"""The DICOM Audit Message schema of PS3.15 A.5.1 (Relax NG compact there), as a checker (test support).

:func:`schema_errors` walks one ``<AuditMessage>`` and returns what breaks the schema: element order
(EventIdentification, ActiveParticipant+, AuditSourceIdentification, ParticipantObjectIdentification*),
required attributes and their enumerated values, the CodedValueType attributes (csd-code,
codeSystemName, originalText), xsd:dateTime, xsd:boolean, xsd:integer and base64 values, and the order
of the children of EventIdentification and ParticipantObjectIdentification. An empty list: valid.
"""

from __future__ import annotations

import base64
import binascii
import re
import xml.etree.ElementTree as ET

_DATETIME = re.compile(r"^-?\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})?$")
_ACTIONS = {"C", "R", "U", "D", "E"}
_OUTCOMES = {"0", "4", "8", "12"}
_ACCESS_POINT_TYPES = {"1", "2", "3", "4", "5"}
_OBJECT_TYPES = {"1", "2", "3", "4"}
_OBJECT_ROLES = {str(n) for n in range(1, 27)}
_LIFE_CYCLES = {str(n) for n in range(1, 16)}


def _coded(el: ET.Element, where: str, errors: list[str]) -> None:
    allowed = {"csd-code", "codeSystemName", "displayName", "originalText"}
    for required in ("csd-code", "codeSystemName", "originalText"):
        if not el.get(required):
            errors.append(f"{where}: CodedValueType needs {required}")
    extra = set(el.attrib) - allowed
    if extra or len(el):
        errors.append(f"{where}: unexpected attributes {sorted(extra)} or children {[c.tag for c in el]}")


def _in_order(children: list[ET.Element], order: list[tuple[str, str]], where: str, errors: list[str]) -> None:
    """``order``: (tag, cardinality in "1", "?", "*", "+") in sequence."""
    i = 0
    for tag, card in order:
        n = 0
        while i < len(children) and children[i].tag == tag:
            i, n = i + 1, n + 1
        if card in ("1", "+") and n == 0:
            errors.append(f"{where}: missing {tag}")
        if card in ("1", "?") and n > 1:
            errors.append(f"{where}: {tag} {n} times, at most once allowed")
    if i < len(children):
        errors.append(f"{where}: unexpected or misplaced {children[i].tag} (allowed in order: {[t for t, _ in order]})")


def _event(el: ET.Element, errors: list[str]) -> None:
    where = "EventIdentification"
    if el.get("EventActionCode") is not None and el.get("EventActionCode") not in _ACTIONS:
        errors.append(f"{where}: EventActionCode {el.get('EventActionCode')!r} not in {sorted(_ACTIONS)}")
    if not _DATETIME.match(el.get("EventDateTime", "")):
        errors.append(f"{where}: EventDateTime {el.get('EventDateTime')!r} is not an xsd:dateTime")
    if el.get("EventOutcomeIndicator") not in _OUTCOMES:
        errors.append(f"{where}: EventOutcomeIndicator {el.get('EventOutcomeIndicator')!r} not in {sorted(_OUTCOMES)}")
    _in_order(list(el), [("EventID", "1"), ("EventTypeCode", "*"), ("EventOutcomeDescription", "?")], where, errors)
    for child in el:
        if child.tag in ("EventID", "EventTypeCode"):
            _coded(child, f"{where}/{child.tag}", errors)


def _participant(el: ET.Element, errors: list[str]) -> None:
    where = f"ActiveParticipant {el.get('UserID')!r}"
    if el.get("UserID") is None:
        errors.append(f"{where}: UserID missing")
    if el.get("UserIsRequestor") not in ("true", "false", "1", "0"):
        errors.append(f"{where}: UserIsRequestor {el.get('UserIsRequestor')!r} is not an xsd:boolean")
    kind = el.get("NetworkAccessPointTypeCode")
    if kind is not None and kind not in _ACCESS_POINT_TYPES:
        errors.append(f"{where}: NetworkAccessPointTypeCode {kind!r} not in {sorted(_ACCESS_POINT_TYPES)}")
    _in_order(list(el), [("RoleIDCode", "*"), ("MediaIdentifier", "?")], where, errors)
    for child in el.findall("RoleIDCode"):
        _coded(child, f"{where}/RoleIDCode", errors)


def _source(el: ET.Element, errors: list[str]) -> None:
    if not el.get("AuditSourceID"):
        errors.append("AuditSourceIdentification: AuditSourceID missing")
    _in_order(list(el), [("AuditSourceTypeCode", "*")], "AuditSourceIdentification", errors)
    for child in el:
        if not child.get("csd-code"):
            errors.append("AuditSourceTypeCode: csd-code missing")


def _description(el: ET.Element, where: str, errors: list[str]) -> None:
    order = [("MPPS", "*"), ("Accession", "*"), ("SOPClass", "*"), ("ParticipantObjectContainsStudy", "?"),
             ("Encrypted", "?"), ("Anonymized", "?")]
    _in_order(list(el), order, f"{where}/ParticipantObjectDescription", errors)
    for sop in el.findall("SOPClass"):
        if not re.fullmatch(r"-?\d+", sop.get("NumberOfInstances", "")):
            errors.append(f"{where}/SOPClass: NumberOfInstances {sop.get('NumberOfInstances')!r} is not an xsd:integer")


def _participant_object(el: ET.Element, errors: list[str]) -> None:
    where = f"ParticipantObjectIdentification {el.get('ParticipantObjectID')!r}"
    if el.get("ParticipantObjectID") is None:
        errors.append(f"{where}: ParticipantObjectID missing")
    for attr, allowed in (("ParticipantObjectTypeCode", _OBJECT_TYPES), ("ParticipantObjectTypeCodeRole", _OBJECT_ROLES),
                          ("ParticipantObjectDataLifeCycle", _LIFE_CYCLES)):
        if el.get(attr) is not None and el.get(attr) not in allowed:
            errors.append(f"{where}: {attr} {el.get(attr)!r} not allowed")
    children = list(el)
    if len([c for c in children if c.tag in ("ParticipantObjectName", "ParticipantObjectQuery")]) > 1:
        errors.append(f"{where}: either ParticipantObjectName or ParticipantObjectQuery, once")
    name_or_query = "ParticipantObjectName" if el.find("ParticipantObjectName") is not None else "ParticipantObjectQuery"
    order = [("ParticipantObjectIDTypeCode", "1"), (name_or_query, "?"), ("ParticipantObjectDetail", "*"),
             ("ParticipantObjectDescription", "*")]
    _in_order(children, order, where, errors)
    for child in children:
        if child.tag == "ParticipantObjectIDTypeCode":
            _coded(child, f"{where}/ParticipantObjectIDTypeCode", errors)
        elif child.tag == "ParticipantObjectDetail":
            try:
                ok = bool(child.get("type")) and child.get("value") is not None
                base64.b64decode(child.get("value", ""), validate=True)
            except (binascii.Error, ValueError):
                ok = False
            if not ok:
                errors.append(f"{where}/ParticipantObjectDetail: needs type and a base64 value")
        elif child.tag == "ParticipantObjectDescription":
            _description(child, where, errors)


def schema_errors(xml_text: str) -> list[str]:
    """What in ``xml_text`` breaks the PS3.15 A.5.1 Audit Message schema (empty: valid)."""
    try:
        root = ET.fromstring(xml_text)
    except ET.ParseError as exc:
        return [f"not well-formed XML: {exc}"]
    if root.tag != "AuditMessage":
        return [f"root is {root.tag}, not AuditMessage"]
    errors: list[str] = []
    order = [("EventIdentification", "1"), ("ActiveParticipant", "+"), ("AuditSourceIdentification", "1"),
             ("ParticipantObjectIdentification", "*")]
    _in_order(list(root), order, "AuditMessage", errors)
    checks = {"EventIdentification": _event, "ActiveParticipant": _participant,
              "AuditSourceIdentification": _source, "ParticipantObjectIdentification": _participant_object}
    for child in root:
        check = checks.get(child.tag)
        if check is not None:
            check(child, errors)
    if sum(1 for p in root.findall("ActiveParticipant") if p.get("UserIsRequestor") in ("true", "1")) > 1:
        errors.append("AuditMessage: more than one ActiveParticipant with UserIsRequestor true (PS3.15 A.5.2.4)")
    return errors
