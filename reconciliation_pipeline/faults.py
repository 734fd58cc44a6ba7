"""Named crash points for the fault-injection tests.

`RECON_FAULT_KILL_AT=<point>` makes the process SIGKILL itself when it reaches that point, so the
tests can prove that a run killed exactly there converges on the next run. Unset (always, in
production) it does nothing.
"""

import os
import signal

POINTS = ("after_report_created", "after_outbox_mongo_write", "after_repair_mongo_write", "mid_cleanup")


def checkpoint(point: str) -> None:
    """Kill this process with SIGKILL if the environment asks for a crash at `point`."""
    if os.environ.get("RECON_FAULT_KILL_AT") == point:
        os.kill(os.getpid(), signal.SIGKILL)
