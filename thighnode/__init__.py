"""thighnode composition root: CLI, settings, job store, scheduler and the workflow."""

__version__ = "0.1.0"
