"""Outputs as plug-ins: each output of a study (SEG, SR, PDF, ...) is an :class:`OutputBuilder`.

Configuration lists the outputs to send (``[outputs] enabled``): a built-in name
(:data:`BUILTIN_OUTPUTS`) or an import path ``"package.module:Name"``. Adding a fourth
output is one module with a builder plus one entry in that list.
"""

from dicomout.outputs.registry import (
    BUILTIN_OUTPUTS,
    OutputBuilder,
    PlannedOutput,
    entry_problem,
    load_output,
    plan_outputs,
)

__all__ = ["BUILTIN_OUTPUTS", "OutputBuilder", "PlannedOutput", "entry_problem", "load_output", "plan_outputs"]
