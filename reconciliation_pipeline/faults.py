"""Named crash points for the fault-injection tests.

`RECON_FAULT_KILL_AT=<point>` makes the process SIGKILL itself when it reaches that point, so the
tests can prove that a run killed exactly there converges on the next run;
`RECON_FAULT_RAISE_AT=<point>` raises `InjectedFault` there instead (the step fails, the run ends
`failed` and can be re-executed from failure). Unset (always, in production) they do nothing.
"""

import os
import signal

POINTS = ("after_report_created", "after_outbox_mongo_write", "after_repair_mongo_write", "mid_cleanup")  # SIGKILL points; RECON_FAULT_RAISE_AT also takes "before_report_finished"


class InjectedFault(RuntimeError):
    """The failure RECON_FAULT_RAISE_AT asked for."""


def checkpoint(point: str) -> None:
    """Kill this process with SIGKILL, or raise, if the environment asks for a crash at `point`."""
    if os.environ.get("RECON_FAULT_KILL_AT") == point:
        os.kill(os.getpid(), signal.SIGKILL)
    if os.environ.get("RECON_FAULT_RAISE_AT") == point:
        raise InjectedFault(f"fault injected at {point} (RECON_FAULT_RAISE_AT)")
