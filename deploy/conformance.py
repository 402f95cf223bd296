"""The code's side of deploy/CONFORMANCE.md: its generated sections, and the check that they agree.

    python deploy/conformance.py            # exit 1, listing every section that disagrees with the code
    python deploy/conformance.py --write    # rewrite the generated sections from the code

The statement (PS3.2 structure) is hand-written prose with generated tables between
``<!-- generated:NAME -->`` and ``<!-- /generated:NAME -->``. Every table below is built from what
the node actually uses: the SOP classes and transfer syntaxes of the ingress AE (:mod:`scp.ae`), the
Implementation Class UID and Version Name of the AEs :func:`scp.association.create_ae` builds, the
C-STORE statuses :mod:`scp.handlers` returns, the Query/Retrieve models :mod:`scp.query` and
:mod:`scp.retrieve` request, the outputs' SOP classes, series and transfer syntaxes (:mod:`dicomout`),
and the defaults of config/node.toml. tests/test_conformance.py fails when the file disagrees, and
checks the IOD annexes against objects the builders make.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from pydicom.uid import UID

STATEMENT_PATH = Path(__file__).resolve().parent / "CONFORMANCE.md"
_BLOCK = re.compile(r"<!-- generated:(?P<name>[a-z0-9-]+) -->\n(?P<body>.*?)<!-- /generated:(?P=name) -->", re.S)


#: Names of UIDs newer than pydicom's dictionary (PS3.6 Annex A).
_NEWER_UID_NAMES = {"1.2.840.10008.5.1.4.1.1.66.7": "Label Map Segmentation Storage"}


def _uid_name(uid: str) -> str:
    return _NEWER_UID_NAMES.get(str(uid), UID(uid).name)


def _uid_rows(uids: Iterable[str]) -> list[str]:
    return [f"| {_uid_name(u)} | `{u}` |" for u in uids]


def _table(header: Sequence[str], rows: Iterable[str]) -> str:
    head = "| " + " | ".join(header) + " |\n|" + "---|" * len(header) + "\n"
    return head + "\n".join(rows) + "\n"


def _default_settings():  # noqa: ANN202 - thighnode.settings.Settings
    from thighnode.settings import load_settings

    return load_settings(None, environ={})


def implementation() -> str:
    """Implementation Class UID / Version Name announced in every association, and the AE's limits."""
    import pynetdicom

    from scp.association import AssociationSettings, create_ae

    ae = create_ae(AssociationSettings.with_timeout("THIGHNODE", 30.0))
    node = _default_settings().node
    rows = [
        f"| Implementation Class UID | `{ae.implementation_class_uid}` |",
        f"| Implementation Version Name | `{ae.implementation_version_name}` |",
        f"| DICOM toolkit | pynetdicom {pynetdicom.__version__} |",
        f"| Maximum PDU length received (`[node] max_pdu_bytes`) | "
        f"{f'{node.max_pdu_bytes} bytes' if node.max_pdu_bytes else 'unlimited (0)'} |",
        f"| Maximum concurrent associations accepted (`[node] max_associations`) | {node.max_associations} |",
    ]
    return _table(("item", "value"), rows)


def configuration() -> str:
    """The defaults of config/node.toml that the statement names (AE title, port, timeouts)."""
    node = _default_settings().node
    rows = [
        f"| `[node] ae_title` | `{node.ae_title}` | the node's AE title (called AE of ingress, calling AE of every SCU association) |",
        f"| `[node] host` | `{node.host}` | listening address |",
        f"| `[node] port` | {node.port} | listening TCP port |",
        f"| `[node] acse_timeout_s` | {node.acse_timeout_s:g} | association negotiation and release (s) |",
        f"| `[node] dimse_timeout_s` | {node.dimse_timeout_s:g} | wait for each DIMSE message (s); also the SCU timeout per destination |",
        f"| `[node] network_timeout_s` | {node.network_timeout_s:g} | a silent connection is closed after (s) |",
        f"| `[node] min_free_disk_mb` | {node.min_free_disk_mb} | below this free space C-STORE answers Out of Resources |",
    ]
    return _table(("key", "default", "meaning"), rows)


def scp_sop_classes() -> str:
    """Every SOP class the ingress AE accepts as SCP."""
    from scp.ae import VERIFICATION_SOP_CLASS, storage_sop_classes

    return _table(("SOP class", "UID"), _uid_rows([VERIFICATION_SOP_CLASS, *storage_sop_classes()]))


def scp_transfer_syntaxes() -> str:
    """The transfer syntaxes accepted for every storage SOP class (Verification: the uncompressed ones)."""
    from scp.ae import TRANSFER_SYNTAXES

    return _table(("transfer syntax", "UID"), _uid_rows(TRANSFER_SYNTAXES))


def store_statuses() -> str:
    """The C-STORE statuses scp/handlers.py returns, by the names it uses from scp/status.py."""
    import scp.handlers
    import scp.status

    source = Path(scp.handlers.__file__).read_text(encoding="utf-8")
    used = sorted({n for n in re.findall(r"\bSTATUS_[A-Z_]+\b", source) if hasattr(scp.status, n)},
                  key=lambda n: getattr(scp.status, n))
    reasons: dict[str, list[str]] = {}
    for name, reason in re.findall(r'_Refusal\((STATUS_[A-Z_]+), f?"([^"]+)"', source):
        reasons.setdefault(name, []).append(re.sub(r"\{[^}]*\}", "…", reason))
    reasons["STATUS_SUCCESS"] = ["stored durably and indexed, or a SOP Instance UID already stored (not stored twice)"]
    rows = [f"| `0x{getattr(scp.status, n):04X}` | `{n.removeprefix('STATUS_')}` | "
            f"{scp.status.describe_status(getattr(scp.status, n)).split(' ', 1)[1].strip('()')} | "
            f"{'; '.join(reasons.get(n, []))} |" for n in used]
    return _table(("status", "name in scp/status.py", "meaning", "returned when"), rows)


def scu_storage() -> str:
    """The outputs' SOP classes, series and transfer syntaxes, as the builders and the sender use them."""
    from pydicom.uid import Comprehensive3DSRStorage, SegmentationStorage

    from dicomout.outputs.seg import BINARY_SYNTAXES, LABELMAP_SYNTAXES
    from dicomout.pdf import ENCAPSULATED_PDF_STORAGE
    from dicomout.sender import _FALLBACK_SYNTAXES
    from dicomout.uids import OUTPUT_SERIES

    fallback = ", ".join(f"{s.name}" for s in _FALLBACK_SYNTAXES)
    binary = ", ".join(f"`{k}`: {v.name}" for k, v in BINARY_SYNTAXES.items())
    labelmap = ", ".join(f"`{k}`: {v.name}" for k, v in LABELMAP_SYNTAXES.items())
    label_map_storage = UID("1.2.840.10008.5.1.4.1.1.66.7")
    rows = [
        f"| {SegmentationStorage.name} | `{SegmentationStorage}` | {OUTPUT_SERIES['seg'].number} | "
        f"`[outputs] binary_compression` ({binary}); {fallback} |",
        f"| {_uid_name(label_map_storage)} (`seg_type = \"LABELMAP\"`) | `{label_map_storage}` | {OUTPUT_SERIES['seg'].number} | "
        f"`[outputs] labelmap_compression` ({labelmap}); {fallback} |",
        f"| {Comprehensive3DSRStorage.name} | `{Comprehensive3DSRStorage}` | {OUTPUT_SERIES['sr'].number} | {fallback} |",
        f"| {ENCAPSULATED_PDF_STORAGE.name} | `{ENCAPSULATED_PDF_STORAGE}` | {OUTPUT_SERIES['pdf'].number} | {fallback} |",
    ]
    return _table(("SOP class", "UID", "series", "transfer syntaxes proposed"), rows)


def scu_query_retrieve() -> str:
    """The Query/Retrieve information models the prior search and retrieval request."""
    import scp.query
    import scp.retrieve

    rows = [
        f"| {m.name} | `{m}` | SCU | {use} |"
        for m, use in (
            (UID(scp.query.StudyRootQueryRetrieveInformationModelFind), "prior search, STUDY and SERIES level"),
            (UID(scp.retrieve.StudyRootQueryRetrieveInformationModelMove), "prior retrieval, SERIES level (`method = \"move\"`)"),
            (UID(scp.retrieve.StudyRootQueryRetrieveInformationModelGet), "prior retrieval, SERIES level (`method = \"get\"`)"),
        )
    ]
    return _table(("SOP class", "UID", "role", "use"), rows)


def cget_storage() -> str:
    """The storage SOP classes proposed with the SCP role on a C-GET association (scp/retrieve.py)."""
    from scp.ae import CT_STUDY_SOP_CLASSES

    return _table(("SOP class (SCP role, SCP/SCU Role Selection)", "UID"), _uid_rows(CT_STUDY_SOP_CLASSES))


def output_series() -> str:
    """Series number and description of each output and of the outputs of a reader's correction
    (dicomout/uids.py)."""
    from dicomout import uids

    rows = [f"| {name} | {s.number} | {s.title} (<model name> <model version>) |" for name, s in uids.OUTPUT_SERIES.items()]
    rows += [
        f"| {name} after a reader's correction | {s.number} | {s.title} (<model name> <model version>) |"
        for name, s in (("seg", uids.SEG_VERIFIED_SERIES), ("sr", uids.SR_VERIFIED_SERIES), ("pdf", uids.PDF_VERIFIED_SERIES))
    ]
    return _table(("output", "SeriesNumber", "SeriesDescription"), rows)


GENERATORS: dict[str, Callable[[], str]] = {
    "implementation": implementation,
    "configuration": configuration,
    "scp-sop-classes": scp_sop_classes,
    "scp-transfer-syntaxes": scp_transfer_syntaxes,
    "store-statuses": store_statuses,
    "scu-storage": scu_storage,
    "scu-query-retrieve": scu_query_retrieve,
    "cget-storage": cget_storage,
    "output-series": output_series,
}
"""Generated section name -> the function that writes it from the code."""


def sections_in(text: str) -> dict[str, str]:
    """The generated sections of a statement's text, by name."""
    return {m["name"]: m["body"] for m in _BLOCK.finditer(text)}


def differences(text: str) -> list[str]:
    """One line per generated section that is missing, unknown or differs from the code; [] when all agree."""
    found = sections_in(text)
    problems = [f"section {n!r} is missing from the statement" for n in GENERATORS if n not in found]
    problems += [f"section {n!r} is not generated by deploy/conformance.py" for n in found if n not in GENERATORS]
    for name, body in found.items():
        if name in GENERATORS and body != GENERATORS[name]():
            problems.append(f"section {name!r} differs from the code (run: python deploy/conformance.py --write)")
    return problems


def regenerate(text: str) -> str:
    """``text`` with every generated section replaced by what the code says now."""
    def replace(m: re.Match[str]) -> str:
        name = m["name"]
        body = GENERATORS[name]() if name in GENERATORS else m["body"]
        return f"<!-- generated:{name} -->\n{body}<!-- /generated:{name} -->"

    return _BLOCK.sub(replace, text)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="check (or --write) the generated sections of CONFORMANCE.md")
    parser.add_argument("--write", action="store_true", help="rewrite the generated sections from the code")
    parser.add_argument("--statement", type=Path, default=STATEMENT_PATH)
    args = parser.parse_args(argv)
    text = args.statement.read_text(encoding="utf-8")
    if args.write:
        args.statement.write_text(regenerate(text), encoding="utf-8")
    problems = differences(args.statement.read_text(encoding="utf-8"))
    for problem in problems:
        print(f"{args.statement}: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    # Run as a script, read the code of this checkout (not whichever one the venv has installed).
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
