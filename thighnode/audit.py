"""The DICOM audit trail: audit messages of PS3.15 A.5 (the RFC 3881-derived DICOM Audit Message schema).

:class:`AuditTrail` is the one API the node calls where an auditable event happens: the application
started or stopped (A.5.3.1 Application Activity), an association was refused (A.5.3.11 User
Authentication, Login failed), a study's instances were received or its results sent (A.5.3.4 DICOM
Instances Transferred, EventActionCode C / R), a security alert (A.5.3.12 Security Alert, Node
Authentication: a TLS failure, a disallowed peer). Each message is one ``<AuditMessage>`` XML document
on one line, handed to the sinks of :mod:`thighnode.audit_sinks` (a local file, optionally syslog
RFC 5424).

The messages carry the Patient ID (ParticipantObjectIDTypeCode 2, "Patient Number") and the patient's
name: the audit trail is PHI-bearing and access-restricted, unlike the application log, which carries
identifiers only. Nothing here ever writes a message into the application log.
"""

from __future__ import annotations

import base64
import logging
import os
import re
import socket
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Protocol

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Code:
    """A coded value of the audit schema (CodedValueType: csd-code, codeSystemName, originalText)."""

    code: str
    system: str
    meaning: str


# EventID (CID 400 Audit Event ID), EventTypeCode (CID 401, 402), RoleIDCode (CID 402),
# ParticipantObjectIDTypeCode (CID 404, RFC 3881) as PS3.15 A.5.3 uses them.
APPLICATION_ACTIVITY = Code("110100", "DCM", "Application Activity")
APPLICATION_START = Code("110120", "DCM", "Application Start")
APPLICATION_STOP = Code("110121", "DCM", "Application Stop")
INSTANCES_TRANSFERRED = Code("110104", "DCM", "DICOM Instances Transferred")
SECURITY_ALERT = Code("110113", "DCM", "Security Alert")
USER_AUTHENTICATION = Code("110114", "DCM", "User Authentication")
LOGIN = Code("110122", "DCM", "Login")
NODE_AUTHENTICATION = Code("110126", "DCM", "Node Authentication")
ROLE_APPLICATION = Code("110150", "DCM", "Application")
ROLE_DESTINATION = Code("110152", "DCM", "Destination Role ID")
ROLE_SOURCE = Code("110153", "DCM", "Source Role ID")
STUDY_INSTANCE_UID = Code("110180", "DCM", "Study Instance UID")
PATIENT_NUMBER = Code("2", "RFC-3881", "Patient Number")
URI = Code("12", "RFC-3881", "URI")

OUTCOME_SUCCESS = "0"
OUTCOME_MINOR_FAILURE = "4"
OUTCOME_SERIOUS_FAILURE = "8"
ACTION_CREATE = "C"
ACTION_READ = "R"
ACTION_EXECUTE = "E"

#: ParticipantObjectTypeCode / ParticipantObjectTypeCodeRole values (PS3.15 A.5.1.2).
TYPE_PERSON, TYPE_SYSTEM_OBJECT = "1", "2"
ROLE_PATIENT, ROLE_REPORT, ROLE_SECURITY_RESOURCE = "1", "3", "13"
#: NetworkAccessPointTypeCode: 1 machine name, 2 IP address.
ACCESS_POINT_NAME, ACCESS_POINT_IP = "1", "2"
#: AuditSourceTypeCode 4: application server process.
SOURCE_TYPE_APPLICATION_SERVER = "4"

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_IP = re.compile(r"^[0-9.]+$|:")


class AuditSink(Protocol):
    """Where audit messages go: the file, syslog (thighnode.audit_sinks)."""

    def emit(self, message: str) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class Participant:
    """An ActiveParticipant: a DICOM application (AE title) at a network address."""

    user_id: str
    is_requestor: bool
    roles: tuple[Code, ...] = ()
    address: str = ""
    ae_titles: tuple[str, ...] = ()
    process_id: str = ""


@dataclass(frozen=True)
class ParticipantObject:
    """A ParticipantObjectIdentification: a study (with its SOP classes), a patient, an alert subject."""

    object_id: str
    id_type: Code
    type_code: str
    role: str
    name: str = ""
    sop_class_counts: tuple[tuple[str, int], ...] = ()
    details: tuple[tuple[str, str], ...] = ()


def _clean(text: str) -> str:
    """One line of XML-safe text: control characters and line breaks become spaces."""
    return _CONTROL.sub(" ", str(text)).replace("\r", " ").replace("\n", " ").strip()


def _code(parent: ET.Element, tag: str, code: Code) -> None:
    ET.SubElement(parent, tag, {"csd-code": code.code, "codeSystemName": code.system, "originalText": code.meaning})


def event_time(epoch_s: float) -> str:
    """EventDateTime (xsd:dateTime in UTC, PS3.15 A.5.2.5), millisecond precision."""
    moment = datetime.fromtimestamp(epoch_s, tz=timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def _participant(root: ET.Element, p: Participant) -> None:
    attrs = {"UserID": _clean(p.user_id), "UserIsRequestor": "true" if p.is_requestor else "false"}
    alternative = []
    if p.ae_titles:
        alternative.append("AETITLES=" + ";".join(_clean(t) for t in p.ae_titles))
    if p.process_id:
        alternative.append(p.process_id)
    if alternative:
        attrs["AlternativeUserID"] = " ".join(alternative)
    if p.address:
        attrs["NetworkAccessPointID"] = _clean(p.address)
        attrs["NetworkAccessPointTypeCode"] = ACCESS_POINT_IP if _IP.search(p.address) else ACCESS_POINT_NAME
    element = ET.SubElement(root, "ActiveParticipant", attrs)
    for role in p.roles:
        _code(element, "RoleIDCode", role)


def _participant_object(root: ET.Element, o: ParticipantObject) -> None:
    element = ET.SubElement(
        root,
        "ParticipantObjectIdentification",
        {"ParticipantObjectID": _clean(o.object_id), "ParticipantObjectTypeCode": o.type_code,
         "ParticipantObjectTypeCodeRole": o.role},
    )
    _code(element, "ParticipantObjectIDTypeCode", o.id_type)
    if o.name:
        ET.SubElement(element, "ParticipantObjectName").text = _clean(o.name)
    for kind, value in o.details:
        ET.SubElement(element, "ParticipantObjectDetail",
                      {"type": kind, "value": base64.b64encode(value.encode("utf-8")).decode("ascii")})
    if o.sop_class_counts:
        description = ET.SubElement(element, "ParticipantObjectDescription")
        for uid, count in o.sop_class_counts:
            ET.SubElement(description, "SOPClass", {"UID": _clean(uid), "NumberOfInstances": str(int(count))})


@dataclass(frozen=True)
class AuditEvent:
    """One audit message's content, in the order of the schema's AuditMessage."""

    event_id: Code
    action: str
    outcome: str
    at: float
    participants: tuple[Participant, ...]
    source_id: str
    event_types: tuple[Code, ...] = ()
    outcome_description: str = ""
    objects: tuple[ParticipantObject, ...] = ()

    def to_xml(self) -> str:
        """The AuditMessage (PS3.15 A.5.1) as one line of XML."""
        root = ET.Element("AuditMessage")
        identification = ET.SubElement(
            root, "EventIdentification",
            {"EventActionCode": self.action, "EventDateTime": event_time(self.at),
             "EventOutcomeIndicator": self.outcome},
        )
        _code(identification, "EventID", self.event_id)
        for event_type in self.event_types:
            _code(identification, "EventTypeCode", event_type)
        if self.outcome_description:
            ET.SubElement(identification, "EventOutcomeDescription").text = _clean(self.outcome_description)
        for participant in self.participants:
            _participant(root, participant)
        source = ET.SubElement(root, "AuditSourceIdentification", {"AuditSourceID": _clean(self.source_id)})
        ET.SubElement(source, "AuditSourceTypeCode", {"csd-code": SOURCE_TYPE_APPLICATION_SERVER})
        for obj in self.objects:
            _participant_object(root, obj)
        return ET.tostring(root, encoding="unicode")


@dataclass(frozen=True)
class Recipient:
    """Where results went: a destination's name, AE title and address."""

    name: str
    ae_title: str
    host: str
    port: int


class AuditTrail:
    """Builds and records the node's audit messages; safe to call from any thread, never raises.

    ``sinks`` receive each message (one line of XML); a sink that fails is logged (without the
    message) and the others still receive it. ``ae_title`` is this node's AE title.
    """

    def __init__(
        self,
        ae_title: str,
        sinks: Sequence[AuditSink],
        *,
        host_name: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.ae_title = ae_title
        self.host_name = host_name or socket.gethostname()
        self.source_id = f"{ae_title}@{self.host_name}"
        self._sinks = tuple(sinks)
        self._clock = clock

    # -- the events ----------------------------------------------------------------------

    def application_started(self) -> None:
        """A.5.3.1 Application Activity, Application Start."""
        self._record(APPLICATION_ACTIVITY, ACTION_EXECUTE, OUTCOME_SUCCESS, (self._us(False, ROLE_APPLICATION),),
                     event_types=(APPLICATION_START,))

    def application_stopped(self) -> None:
        """A.5.3.1 Application Activity, Application Stop."""
        self._record(APPLICATION_ACTIVITY, ACTION_EXECUTE, OUTCOME_SUCCESS, (self._us(False, ROLE_APPLICATION),),
                     event_types=(APPLICATION_STOP,))

    def association_refused(self, peer_address: str, calling_ae: str, reason: str) -> None:
        """A.5.3.11 User Authentication, Login, minor failure: the peer (``calling_ae`` at ``peer_address``)
        asked for an association and was refused for ``reason``."""
        peer = Participant(user_id=calling_ae or peer_address, is_requestor=True, address=peer_address,
                           ae_titles=(calling_ae,) if calling_ae else ())
        self._record(USER_AUTHENTICATION, ACTION_EXECUTE, OUTCOME_MINOR_FAILURE, (peer, self._us(False)),
                     event_types=(LOGIN,), outcome_description=f"association refused: {reason}")

    def instances_received(
        self,
        study_uid: str,
        patient_id: str,
        sop_class_counts: Mapping[str, int],
        peer_ae: str,
        peer_address: str,
        *,
        patient_name: str = "",
    ) -> None:
        """A.5.3.4 DICOM Instances Transferred, EventActionCode C: ``peer_ae`` sent us these instances."""
        source = Participant(user_id=peer_ae or peer_address, is_requestor=True, roles=(ROLE_SOURCE,),
                             address=peer_address, ae_titles=(peer_ae,) if peer_ae else ())
        objects = _study_and_patient(study_uid, patient_id, patient_name, sop_class_counts)
        self._record(INSTANCES_TRANSFERRED, ACTION_CREATE, OUTCOME_SUCCESS,
                     (source, self._us(False, ROLE_DESTINATION)), objects=objects)

    def results_sent(
        self,
        study_uid: str,
        patient_id: str,
        destination: Recipient,
        sop_class_counts: Mapping[str, int],
        *,
        patient_name: str = "",
    ) -> None:
        """A.5.3.4 DICOM Instances Transferred, EventActionCode R: we stored these objects at ``destination``
        (after its C-STORE confirmed them)."""
        target = Participant(user_id=destination.ae_title, is_requestor=False, roles=(ROLE_DESTINATION,),
                             address=destination.host, ae_titles=(destination.ae_title,))
        objects = _study_and_patient(study_uid, patient_id, patient_name, sop_class_counts)
        self._record(INSTANCES_TRANSFERRED, ACTION_READ, OUTCOME_SUCCESS,
                     (self._us(True, ROLE_SOURCE), target), objects=objects)

    def security_alert(self, peer_address: str, reason: str) -> None:
        """A.5.3.12 Security Alert, Node Authentication, serious failure: ``peer_address`` failed a check
        (TLS handshake, certificate, allowed peers / AE titles) for ``reason``."""
        peer = Participant(user_id=peer_address, is_requestor=False, address=peer_address)
        subject = ParticipantObject(object_id=f"dicom://{peer_address}", id_type=URI, type_code=TYPE_SYSTEM_OBJECT,
                                    role=ROLE_SECURITY_RESOURCE, details=(("Alert Description", reason),))
        self._record(SECURITY_ALERT, ACTION_EXECUTE, OUTCOME_SERIOUS_FAILURE, (self._us(True), peer),
                     event_types=(NODE_AUTHENTICATION,), outcome_description=reason, objects=(subject,))

    def close(self) -> None:
        for sink in self._sinks:
            try:
                sink.close()
            except OSError as exc:
                log.warning("audit sink %s could not be closed: %s", type(sink).__name__, exc)

    # -- building and recording -------------------------------------------------------------

    def _us(self, is_requestor: bool, *roles: Code) -> Participant:
        return Participant(user_id=self.ae_title, is_requestor=is_requestor, roles=roles, address=self.host_name,
                           ae_titles=(self.ae_title,), process_id=f"PID={os.getpid()}")

    def _record(
        self,
        event_id: Code,
        action: str,
        outcome: str,
        participants: tuple[Participant, ...],
        *,
        event_types: tuple[Code, ...] = (),
        outcome_description: str = "",
        objects: tuple[ParticipantObject, ...] = (),
    ) -> None:
        try:
            message = AuditEvent(event_id, action, outcome, self._clock(), participants, self.source_id,
                                 event_types, outcome_description, objects).to_xml()
        except Exception as exc:  # noqa: BLE001 - auditing must never stop the node
            # the exception's text may quote patient data: its type only, and no traceback
            log.error("audit message %s could not be built: %s", event_id.meaning, type(exc).__name__)
            return
        for sink in self._sinks:
            try:
                sink.emit(message)
            except OSError as exc:  # the file system's or the network's words: no patient data
                log.error("audit message %s not recorded by %s: %s: %s",
                          event_id.meaning, type(sink).__name__, type(exc).__name__, exc)
            except Exception as exc:  # noqa: BLE001
                log.error("audit message %s not recorded by %s: %s", event_id.meaning, type(sink).__name__,
                          type(exc).__name__)


def _study_and_patient(
    study_uid: str, patient_id: str, patient_name: str, sop_class_counts: Mapping[str, int]
) -> tuple[ParticipantObject, ...]:
    study = ParticipantObject(object_id=study_uid, id_type=STUDY_INSTANCE_UID, type_code=TYPE_SYSTEM_OBJECT,
                              role=ROLE_REPORT, sop_class_counts=tuple(sorted(sop_class_counts.items())))
    patient = ParticipantObject(object_id=patient_id, id_type=PATIENT_NUMBER, type_code=TYPE_PERSON,
                                role=ROLE_PATIENT, name=patient_name)
    return (study, patient)
