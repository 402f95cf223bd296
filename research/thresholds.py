"""Calibrated CT SMI cut-offs written into the ``[sarcopenia]`` section of a node configuration file."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from pipeline.types import GROUP_ALL
from research.errors import CohortError
from research.rows import CT_GROUPS
from research.stats import RocResult

_HEADER = re.compile(r"^\s*\[\s*([A-Za-z0-9_.\-\"' ]+?)\s*\]\s*(#.*)?$")
_ANY_HEADER = re.compile(r"^\s*\[")


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(float(v))
    return json.dumps(str(v), ensure_ascii=False)


def update_toml_section(text: str, section: str, values: Mapping[str, Any]) -> str:
    """``text`` with the keys of ``[section]`` set to ``values`` (other lines and sections untouched).

    Existing key lines of the section are replaced in place, missing keys are added at the end of
    the section, a missing section is appended. The result is parsed back and checked.
    """
    try:
        before = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise CohortError(f"the threshold file is not valid TOML ({exc}); fix it before writing thresholds") from None
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    start = next((i for i, ln in enumerate(lines) if (m := _HEADER.match(ln)) and m.group(1) == section), None)
    new_lines = [f"{k} = {_toml_value(v)}\n" for k, v in values.items()]
    if start is None:
        sep = ["\n"] if lines and lines[-1].strip() else []
        lines += [*sep, f"[{section}]\n", *new_lines]
    else:
        end = next((i for i in range(start + 1, len(lines)) if _ANY_HEADER.match(lines[i])), len(lines))
        body = lines[start + 1 : end]
        done = set()
        for i, ln in enumerate(body):
            m = re.match(r"^\s*([A-Za-z0-9_\-]+)\s*=", ln)
            if m and m.group(1) in values:
                body[i] = f"{m.group(1)} = {_toml_value(values[m.group(1)])}\n"
                done.add(m.group(1))
        last = len(body)
        while last > 0 and not body[last - 1].strip():
            last -= 1
        missing = [f"{k} = {_toml_value(v)}\n" for k, v in values.items() if k not in done]
        body = body[:last] + missing + body[last:]
        lines = lines[: start + 1] + body + lines[end:]
    result = "".join(lines)
    after = tomllib.loads(result)
    expected = {k: (float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v) for k, v in values.items()}
    got = {k: after.get(section, {}).get(k) for k in values}
    others_same = {k: v for k, v in before.items() if k != section} == {k: v for k, v in after.items() if k != section}
    if got != expected or not others_same:
        raise CohortError(
            f"could not update [{section}] safely (a multi-line value or an unusual layout?); "
            f"edit the file by hand: {', '.join(f'{k} = {_toml_value(v)}' for k, v in values.items())}"
        )
    return result


def write_text_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=str(path.parent))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        if path.exists():
            os.chmod(tmp, path.stat().st_mode & 0o7777)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@dataclass(frozen=True)
class ThresholdUpdate:
    path: Path
    group: str
    threshold_female_kg_m2: float
    threshold_male_kg_m2: float
    source: str


def write_sarcopenia_thresholds(path: Path, results: Mapping[tuple[str, str], RocResult], *, today: dt.date | None = None) -> ThresholdUpdate:
    """Write the Youden cut-offs of CT SMI (configured group, per sex) into ``[sarcopenia]`` of ``path``."""
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    try:
        current = tomllib.loads(text).get("sarcopenia", {})
    except tomllib.TOMLDecodeError as exc:
        raise CohortError(f"threshold file {path} is not valid TOML ({exc})") from None
    group = current.get("group", GROUP_ALL)
    if group not in CT_GROUPS:
        raise CohortError(f"{path}: sarcopenia.group = {group!r}; allowed: {', '.join(CT_GROUPS)}")
    missing = [sex for sex in ("F", "M") if (group, sex) not in results]
    if missing:
        raise CohortError(
            f"cannot calibrate the CT SMI threshold of group {group!r} for "
            f"{' and '.join('women' if s == 'F' else 'men' for s in missing)}: the cohort needs studies of that sex "
            "with DXA sarcopenia labels of both classes; both thresholds are required (nothing was written)"
        )
    f, m = results[(group, "F")], results[(group, "M")]
    day = (today or dt.date.today()).isoformat()
    source = (
        f"thighnode cohort {day}: Youden cut-off of CT SMI ({group}) for DXA sarcopenia; "
        f"women n={f.n} ({f.n_positive} sarcopenic) AUC {f.auc:.3f}; men n={m.n} ({m.n_positive} sarcopenic) AUC {m.auc:.3f}"
    )
    values = {
        "group": group, "threshold_female_kg_m2": round(f.threshold, 3), "threshold_male_kg_m2": round(m.threshold, 3),
        "calibrated_for_ct": True, "source": source,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, update_toml_section(text, "sarcopenia", values))
    return ThresholdUpdate(path, group, values["threshold_female_kg_m2"], values["threshold_male_kg_m2"], source)  # type: ignore[arg-type]
