"""deploy/CONFORMANCE.md against the code: its generated tables, and its IOD annex against built objects."""

from __future__ import annotations

import re
from pathlib import Path

import pydicom
import pytest
from pydicom.datadict import keyword_for_tag
from pydicom.dataset import Dataset

from deploy.conformance import GENERATORS, STATEMENT_PATH, differences, regenerate, sections_in

ANNEX_ROW = re.compile(r"^\|[^|]*\| [^|]+ \| `(?P<keyword>\w+)` \| \((?P<group>[0-9A-F]{4}),(?P<element>[0-9A-F]{4})\) \| (?P<value>.*) \|$")
LITERAL = re.compile(r"`([^`]*)`")


@pytest.fixture(scope="module")
def statement() -> str:
    return STATEMENT_PATH.read_text(encoding="utf-8")


def test_every_generated_section_agrees_with_the_code(statement: str) -> None:
    assert set(sections_in(statement)) == set(GENERATORS)
    assert differences(statement) == []


def test_a_statement_that_disagrees_with_the_code_is_caught(statement: str) -> None:
    from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID

    wrong_uid = statement.replace(PYNETDICOM_IMPLEMENTATION_UID, "1.2.3.4")
    assert differences(wrong_uid) == [
        "section 'implementation' differs from the code (run: python deploy/conformance.py --write)"
    ]
    no_ts = re.sub(r"<!-- generated:scp-transfer-syntaxes -->.*?<!-- /generated:scp-transfer-syntaxes -->", "", statement,
                   flags=re.S)
    assert differences(no_ts) == ["section 'scp-transfer-syntaxes' is missing from the statement"]
    # --write puts the code's table back.
    assert regenerate(wrong_uid) == statement


def test_the_tables_name_the_codes_classes_and_syntaxes(statement: str) -> None:
    """Spot checks that the generators read the code (a generator returning a constant would pass the first test)."""
    from scp.ae import TRANSFER_SYNTAXES, storage_sop_classes

    sections = sections_in(statement)
    assert all(f"`{uid}`" in sections["scp-sop-classes"] for uid in storage_sop_classes())
    assert sections["scp-sop-classes"].count("\n| ") == len(storage_sop_classes()) + 1  # + Verification
    assert [f"`{uid}`" for uid in TRANSFER_SYNTAXES] == re.findall(r"`[0-9.]+`", sections["scp-transfer-syntaxes"])
    assert "| 11112 |" in sections["configuration"] and "`THIGHNODE`" in sections["configuration"]


@pytest.fixture(scope="module")
def built_outputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Dataset]:
    """SEG, SR and PDF as the node builds them for one small synthetic CT (default [outputs] settings)."""
    from tests.dicomout.test_outputs import build_all_outputs, hand_made_context

    return build_all_outputs(hand_made_context(tmp_path_factory.mktemp("conformance")))


def _annex_rows(statement: str, iod: str) -> list[re.Match[str]]:
    block = re.search(rf"<!-- iod:{iod} -->\n(.*?)<!-- /iod:{iod} -->", statement, re.S)
    assert block is not None, f"CONFORMANCE.md has no <!-- iod:{iod} --> table"
    rows = [m for line in block.group(1).splitlines() if (m := ANNEX_ROW.match(line))]
    assert len(rows) >= 20, f"iod:{iod}: only {len(rows)} attribute rows could be read"
    return rows


def _as_text(value: object) -> str:
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        return "\\".join(str(v) for v in value)
    return str(value)


@pytest.mark.parametrize("iod", ["seg", "sr", "pdf"])
def test_the_iod_annex_lists_what_the_builders_write(statement: str, built_outputs: dict[str, Dataset], iod: str) -> None:
    """Each annex row: the tag is the keyword's, the built object has it, and a fixed value (one `literal`) is the one written."""
    ds = built_outputs[iod]
    problems = []
    for row in _annex_rows(statement, iod):
        keyword, tag = row["keyword"], int(row["group"] + row["element"], 16)
        if keyword_for_tag(tag) != keyword:
            problems.append(f"{keyword}: tag ({row['group']},{row['element']}) is {keyword_for_tag(tag)!r}")
        elif keyword not in ds:
            problems.append(f"{keyword}: not in the built {iod}")
        else:
            literals = LITERAL.findall(row["value"])
            fixed = literals[0] if len(literals) == 1 and row["value"].startswith("`") and "[" not in literals[0] else None
            if fixed is not None and _as_text(ds[keyword].value) != fixed:
                problems.append(f"{keyword}: statement says {fixed!r}, the builder wrote {_as_text(ds[keyword].value)!r}")
    assert problems == []


def test_the_built_objects_are_of_the_documented_classes_and_syntaxes(statement: str, built_outputs: dict[str, Dataset]) -> None:
    storage = sections_in(statement)["scu-storage"]
    rows = {name: next(line for line in storage.splitlines() if f"`{ds.SOPClassUID}`" in line)
            for name, ds in built_outputs.items()}
    assert set(rows) == {"seg", "sr", "pdf"}
    for name, ds in built_outputs.items():
        syntax = pydicom.uid.UID(ds.file_meta.TransferSyntaxUID)
        assert syntax.name in rows[name], f"{name} written in {syntax.name}; the statement's row: {rows[name]}"
    series = sections_in(statement)["output-series"]
    for name, ds in built_outputs.items():
        assert f"| {name} | {ds.SeriesNumber} |" in series


def test_the_statement_keeps_the_ps3_2_structure(statement: str) -> None:
    headings = [line.lstrip("#").strip() for line in statement.splitlines() if line.startswith("#")]
    for required in (
        "1. Conformance Statement Overview", "Table of Contents", "2. Introduction", "3. Networking",
        "3.1 Implementation Model", "3.1.1 Application Data Flow", "3.1.2 Functional Definition of AEs",
        "3.1.3 Sequencing of Real-World Activities", "3.2 AE Specifications", "3.2.1.2 Association Policies",
        "3.2.1.3 Association Initiation Policy", "3.2.1.4 Association Acceptance Policy", "3.3 Network Interfaces",
        "3.4 Configuration", "4. Media Interchange", "5. Support of Character Sets", "6. Security", "7. Annexes",
    ):
        assert required in headings, f"heading {required!r} missing"


def test_the_checker_runs_as_a_script(tmp_path: Path, statement: str) -> None:
    import subprocess
    import sys

    wrong = tmp_path / "CONFORMANCE.md"
    wrong.write_text(statement.replace("| 11112 |", "| 104 |"), encoding="utf-8")
    script = Path(__file__).resolve().parents[1] / "deploy" / "conformance.py"
    run = subprocess.run([sys.executable, str(script), "--statement", str(wrong)], capture_output=True, text=True,
                         cwd=script.parents[1], timeout=120)
    assert run.returncode == 1 and "section 'configuration' differs from the code" in run.stderr
    run = subprocess.run([sys.executable, str(script), "--statement", str(wrong), "--write"], capture_output=True,
                         text=True, cwd=script.parents[1], timeout=120)
    assert run.returncode == 0 and wrong.read_text(encoding="utf-8") == statement
