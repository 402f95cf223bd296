"""A strict reader of the Prometheus text exposition format 0.0.4 (test support).

:func:`parse_exposition` returns ``{(name, ((label, value), ...)): float}`` and raises AssertionError on
what the format does not allow: a sample without its family's HELP and TYPE lines before it, an unknown
TYPE, a bad metric or label name, an unescaped label value, a value that is not a float.
"""

from __future__ import annotations

import re

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_SAMPLE = re.compile(rf"^(?P<name>{_NAME})(?:\{{(?P<labels>[^}}]*)\}})? (?P<value>\S+)(?: -?\d+)?$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\["\\n])*)"(?:,|$)')
_TYPES = {"counter", "gauge", "summary", "histogram", "untyped"}
_SUFFIXES = {"summary": ("_sum", "_count", ""), "histogram": ("_sum", "_count", "_bucket")}

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _family_of(name: str, types: dict[str, str]) -> str:
    if name in types:
        return name
    for family, kind in types.items():
        if any(suffix and name == family + suffix for suffix in _SUFFIXES.get(kind, ())):
            return family
    raise AssertionError(f"sample {name} has no TYPE line before it")


def _labels(text: str | None) -> tuple[tuple[str, str], ...]:
    if not text:
        return ()
    pairs, pos = [], 0
    while pos < len(text):
        match = _LABEL.match(text, pos)
        assert match is not None, f"bad label syntax at {text[pos:]!r}"
        value = match[2].replace("\\n", "\n").replace('\\"', '"').replace("\\\\", "\\")
        pairs.append((match[1], value))
        pos = match.end()
    return tuple(sorted(pairs))


def parse_exposition(text: str) -> Samples:
    assert text.endswith("\n"), "the exposition must end with a line feed"
    helps: set[str] = set()
    types: dict[str, str] = {}
    samples: Samples = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        if line.startswith("# HELP "):
            name = line.split(" ", 3)[2]
            assert re.fullmatch(_NAME, name) and name not in helps, line
            helps.add(name)
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            assert re.fullmatch(_NAME, name) and kind in _TYPES and name not in types, line
            types[name] = kind
        elif line.startswith("#"):
            continue
        else:
            match = _SAMPLE.match(line)
            assert match is not None, f"not a sample line: {line!r}"
            family = _family_of(match["name"], types)
            assert family in helps, f"{family} has no HELP line"
            key = (match["name"], _labels(match["labels"]))
            assert key not in samples, f"duplicate sample {key}"
            samples[key] = float(match["value"])
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    assert key in samples, f"{key} not among {sorted(samples)}"
    return samples[key]
