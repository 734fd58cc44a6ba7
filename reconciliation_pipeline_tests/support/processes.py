"""Subprocesses of the tests: `dagster` CLI runs in their own process group, the daemon, bounded waits.

Everything stays on loopback and every wait is bounded.  Every process that may outlive its
parent (daemon, `dagster dev`, code servers, run workers) is started in its own session and
killed as a group: `dagster dev` ignores a plain SIGTERM when it is not its session's leader, and
its children would outlive it otherwise.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
DEFS_MODULE = "reconciliation_pipeline.definitions"
JOB = "reconciliation_job"
ASSET = "reconciliation_report"
SCHEDULE = "reconciliation_hourly_schedule"
CHECK_NAMES = {"no_unrepaired_drift", "repair_budget_not_exceeded", "no_dead_outbox_messages", "audit_chain_intact"}


def console_script(name: str, module: str) -> list[str]:
    """The venv's console script next to the running interpreter, else `python -m <module>`."""
    candidate = Path(sys.executable).parent / name
    return [str(candidate)] if candidate.exists() else [sys.executable, "-m", module]


DAGSTER = console_script("dagster", "dagster")
DAGSTER_DAEMON = console_script("dagster-daemon", "dagster._daemon")


def free_port() -> int:
    """A loopback port nothing listens on (bound and released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate: Callable[[], Any], *, timeout: float, interval: float = 0.5, what: str = "condition",
               on_timeout: Callable[[], str] = lambda: "") -> Any:
    """Poll until `predicate()` is truthy and return it; AssertionError with `on_timeout()` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{on_timeout()}")
        time.sleep(interval)


def _group_alive(pgid: int) -> bool:
    """Whether a live (non-zombie) process is left in the group; zombies wait for their reaper."""
    proc_dir = Path("/proc")
    if proc_dir.is_dir():
        for entry in proc_dir.iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state ppid pgrp ...
            if len(fields) > 2 and int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
                return True
        return False
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def kill_group(proc: subprocess.Popen, grace: float = 10) -> None:
    """SIGTERM the process group of `proc` (started with start_new_session), SIGKILL what is left after
    `grace` s (the code servers and run workers a daemon started too); reap the leader as we go, so
    that a zombie leader does not keep the group "alive"."""
    try:
        pgid = os.getpgid(proc.pid)
    except ProcessLookupError:
        pgid = None
    if pgid is None or pgid == os.getpgrp():  # not a group of its own: never signal the test's group
        if proc.poll() is None:
            proc.kill()
    else:
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                proc.poll()
                if not _group_alive(pgid):
                    break
                time.sleep(0.1)
            if not _group_alive(pgid):
                break
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


@dataclass
class CliRun:
    """A finished CLI process: exit code, output, duration."""

    args: list[str]
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def output(self) -> str:
        """stdout then stderr (Dagster logs to stderr; what a check looks for may be in either)."""
        return self.stdout + self.stderr

    def describe(self, tail: int = 12_000) -> str:
        return (f"$ {' '.join(self.args)}\nexit {self.returncode} after {self.seconds:.1f}s\n"
                f"--- stdout\n{self.stdout[-tail:]}\n--- stderr\n{self.stderr[-tail:]}")


class CliProcess:
    """`dagster <args>` in its own session, output into files under `log_dir`; `kill()` kills the group."""

    def __init__(self, args: Sequence[str], env: Mapping[str, str], log_dir: Path | None = None,
                 name: str | None = None, command: Sequence[str] = DAGSTER):
        name = name or uuid.uuid4().hex[:8]
        log_dir = log_dir or Path(tempfile.mkdtemp(prefix="recon-cli-"))
        log_dir.mkdir(parents=True, exist_ok=True)
        self.args = [*command, *args]
        self.out_path, self.err_path = log_dir / f"{name}.out", log_dir / f"{name}.err"
        self._out, self._err = open(self.out_path, "w"), open(self.err_path, "w")  # noqa: SIM115 - closed in kill()
        self.started = time.monotonic()
        self.proc = subprocess.Popen(self.args, env=dict(env), cwd=REPO, stdout=self._out, stderr=self._err,
                                     stdin=subprocess.DEVNULL, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait(self, timeout: float) -> CliRun:
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_group(self.proc)
            raise AssertionError(f"timed out after {timeout}s: {' '.join(self.args)}\n{self.result().describe()}") from None
        return self.result()

    def result(self) -> CliRun:
        for f in (self._out, self._err):
            if not f.closed:
                f.flush()
        return CliRun(self.args, self.proc.returncode if self.proc.returncode is not None else 999,
                      self.out_path.read_text(errors="replace"), self.err_path.read_text(errors="replace"),
                      time.monotonic() - self.started)

    def kill(self, grace: float = 10) -> None:
        kill_group(self.proc, grace)
        for f in (self._out, self._err):
            try:
                f.close()
            except OSError:
                pass


def run_cli(args: Sequence[str], env: Mapping[str, str], log_dir: Path | None = None, *, timeout: float = 240,
            name: str | None = None, watch: Callable[[int], Callable[[], None]] | None = None) -> CliRun:
    """Run `dagster <args>` to completion (bounded), then kill its process group in any case.
    `watch(pid)`, if given, starts observing the process and returns the function that stops it."""
    process = CliProcess(args, env, log_dir, name)
    stop_watching = watch(process.pid) if watch else None
    try:
        result = process.wait(timeout)
    finally:
        if stop_watching:
            stop_watching()
        process.kill()
    print(f"$ {' '.join(result.args)}  -> rc={result.returncode} in {result.seconds:.1f}s")
    return result


def execute_args(partition: str, config: Path | None = None, job: str = JOB, **tags: str) -> list[str]:
    """The arguments of `dagster job execute` for one partition of `job` (and a run config file)."""
    args = ["job", "execute", "-m", DEFS_MODULE, "-j", job, "--tags", json.dumps({"dagster/partition": partition, **tags})]
    if config is not None:
        args += ["-c", str(config)]
    return args


class Daemon:
    """`dagster-daemon run` in its own session, its output in a log file."""

    def __init__(self, env: Mapping[str, str], log_path: Path, workspace_args: Sequence[str] = ("-m", DEFS_MODULE)):
        self.log_path = log_path
        self._log = open(log_path, "w")  # noqa: SIM115 - closed in stop()
        self.cmd = [*DAGSTER_DAEMON, "run", *workspace_args]
        self.proc = subprocess.Popen(self.cmd, env=dict(env), cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self, tail: int = 20_000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-tail:]
        except OSError as exc:
            return f"<no daemon log: {exc}>"

    def stop(self) -> None:
        kill_group(self.proc, grace=20)
        self._log.close()
