"""`thighnode serve` whose workflow kills its own process (SIGKILL) on one study: the test-only crash of
issue 25's job-attempt cap.

Run as ``python -m tests.support.crashing_node serve --config FILE`` with TEST_CRASH_STUDY_UID set. The hook
lives only here, in the tests: the node's code has no crash switch that a production configuration could turn
on. It wraps :meth:`thighnode.workflow.Workflow.run`, so the job has been claimed (its attempt counted and
committed) before the process dies, exactly as when a real study crashes the node.
"""

from __future__ import annotations

import os
import signal
import sys

from thighnode import workflow
from thighnode.cli import main


def _install(crash_study_uid: str) -> None:
    original = workflow.Workflow.run

    def run(self: workflow.Workflow, job: workflow.Job) -> workflow.Outcome:
        if job.study_uid == crash_study_uid:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, job)

    workflow.Workflow.run = run  # type: ignore[method-assign]


if __name__ == "__main__":
    _install(os.environ["TEST_CRASH_STUDY_UID"])
    sys.exit(main(sys.argv[1:]))
