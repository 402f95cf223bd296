"""The output builder protocol and the registry that turns ``[outputs] enabled`` into builders.

A builder has a ``name`` (the output's short name: file prefix, stage name, the job
record's kind), ``needs`` (names of outputs whose datasets it reads) and
``build(context, built) -> Dataset``, where ``built`` maps each name in ``needs`` to that
output's dataset. :func:`plan_outputs` orders the builders so that every output comes
after what it needs; an output that is needed but not enabled is built (and written)
but not sent: the SR references the SEG's segments, so the SEG is built even when only
the SR is sent.

This module imports no builder until asked (:func:`load_output`), so the configuration
can be checked without loading highdicom.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from pydicom.dataset import Dataset

from dicomout.context import StudyContext
from dicomout.errors import OutputPluginError

BUILTIN_OUTPUTS: Mapping[str, str] = {
    "seg": "dicomout.outputs.seg:SegOutput",
    "sr": "dicomout.outputs.sr:SrOutput",
    "pdf": "dicomout.outputs.pdf:PdfOutput",
}
"""Built-in output names and the builders they stand for, in the default order."""

_IMPORT_PATH = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*")


@runtime_checkable
class OutputBuilder(Protocol):
    """Builds one output object of a study (one DICOM dataset, written and queued by the workflow)."""

    name: str
    needs: tuple[str, ...]

    def build(self, context: StudyContext, built: Mapping[str, Dataset]) -> Dataset: ...


@dataclass(frozen=True)
class PlannedOutput:
    """A builder in build order; ``send`` is false for an output built only because another needs it."""

    builder: OutputBuilder
    send: bool


def entry_problem(entry: object) -> str:
    """Why ``entry`` cannot be an ``enabled`` entry ("" when its form is right; nothing is imported)."""
    if not isinstance(entry, str):
        return f"must be a string, not {type(entry).__name__}"
    if entry in BUILTIN_OUTPUTS or _IMPORT_PATH.fullmatch(entry):
        return ""
    return f"allowed: {', '.join(BUILTIN_OUTPUTS)} or an import path 'package.module:Name'"


def load_output(entry: str) -> OutputBuilder:
    """The builder an entry names: a built-in name or ``"package.module:Name"``.

    ``Name`` is a class (instantiated without arguments) or a builder object.

    Raises:
        OutputPluginError: the entry's form, the import, or the object is wrong.
    """
    problem = entry_problem(entry)
    if problem:
        raise OutputPluginError(f"outputs.enabled entry {entry!r}: {problem}")
    module_name, _, attribute = BUILTIN_OUTPUTS.get(entry, entry).partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise OutputPluginError(f"outputs.enabled entry {entry!r}: module {module_name} cannot be imported ({exc})") from exc
    if not hasattr(module, attribute):
        raise OutputPluginError(f"outputs.enabled entry {entry!r}: module {module_name} has no {attribute!r}")
    obj = getattr(module, attribute)
    builder = obj() if isinstance(obj, type) else obj
    if not isinstance(builder, OutputBuilder) or not isinstance(builder.name, str) or not builder.name:
        raise OutputPluginError(
            f"outputs.enabled entry {entry!r}: {attribute} is not an output builder "
            "(allowed: an object with name (non-empty str), needs (tuple of names) and build(context, built))"
        )
    return builder


def plan_outputs(enabled: Sequence[str]) -> tuple[PlannedOutput, ...]:
    """The builders of ``enabled`` and of what they need (by name: built-in or enabled), in build order.

    Raises:
        OutputPluginError: an entry cannot be loaded, two builders share a name, a needed
            output is unknown, or the needs form a cycle.
    """
    by_name: dict[str, OutputBuilder] = {}
    for entry in enabled:
        builder = load_output(entry)
        if builder.name in by_name:
            raise OutputPluginError(f"outputs.enabled entry {entry!r}: a second output named {builder.name!r}")
        by_name[builder.name] = builder
    sent = set(by_name)
    order: list[str] = []

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if name in order:
            return
        if name in chain:
            raise OutputPluginError(f"outputs.enabled: outputs need each other in a cycle: {' -> '.join((*chain, name))}")
        if name not in by_name:
            if name not in BUILTIN_OUTPUTS:
                raise OutputPluginError(
                    f"outputs.enabled: output {chain[-1]!r} needs {name!r}, which is neither enabled nor built in "
                    f"(built in: {', '.join(BUILTIN_OUTPUTS)})"
                )
            by_name[name] = load_output(name)
        for needed in by_name[name].needs:
            visit(needed, (*chain, name))
        order.append(name)

    for name in list(by_name):
        visit(name, ())
    return tuple(PlannedOutput(by_name[name], name in sent) for name in order)
