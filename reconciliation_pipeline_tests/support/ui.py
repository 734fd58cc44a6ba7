"""The browser test's helpers: `dagster dev` as a subprocess, its GraphQL API and headless Chromium."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from reconciliation_pipeline_tests.support.env import cli_env, postgres_home, scratch_database
from reconciliation_pipeline_tests.support.processes import DAGSTER, DEFS_MODULE, JOB, REPO, SCHEDULE, free_port, kill_group

ARTIFACTS = REPO / "test-artifacts" / "browser"

# Required on this kind of machine (root in a container, no GPU, no network beyond loopback).
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run", "--disable-quic",
]

def chromium_path() -> str | None:
    """The system Chromium (Debian package), else `chromium` / `chromium-browser` on PATH."""
    if os.access("/usr/bin/chromium", os.X_OK):
        return "/usr/bin/chromium"
    return shutil.which("chromium") or shutil.which("chromium-browser")


@contextmanager
def dev_env(service_env: Mapping[str, str], *, pg_url: str, mongo_db: str, home: Path) -> Iterator[dict[str, str]]:
    """The environment of `dagster dev` over the test's databases: the repository's dagster.yaml in `home`,
    Dagster's storage in a scratch database on the server of DAGSTER_POSTGRES_URL (dropped after)."""
    with scratch_database(service_env.get("DAGSTER_POSTGRES_URL") or service_env["RECON_POSTGRES_URL"]) as storage_url:
        yield cli_env(pg_url=pg_url, mongo_uri=service_env["RECON_MONGO_URI"], mongo_db=mongo_db,
                      dagster_home=postgres_home(home), dagster_postgres_url=storage_url)


class DagsterDev:
    """`dagster dev -h 127.0.0.1 -p <port> -m reconciliation_pipeline.definitions` in its own session."""

    def __init__(self, env: Mapping[str, str], log_path: Path, port: int | None = None):
        self.port = port or free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.cmd = [*DAGSTER, "dev", "-h", "127.0.0.1", "-p", str(self.port), "-m", DEFS_MODULE]
        self._log = open(log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(self.cmd, env=dict(env), cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)

    def log(self, tail: int = 20_000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-tail:]
        except OSError as exc:
            return f"<no dagster dev log: {exc}>"

    def wait_ready(self, timeout: float = 120) -> None:
        """Until /server_info answers and the code location has loaded (its job is in the workspace)."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"dagster dev exited with {self.proc.returncode}\n$ {' '.join(self.cmd)}\n{self.log()}")
            try:
                with urllib.request.urlopen(self.base_url + "/server_info", timeout=5) as resp:
                    if resp.status == 200 and job_location(self.base_url):
                        return
            except CodeLocationError as exc:
                raise AssertionError(f"{exc}\n$ {' '.join(self.cmd)}\n{self.log()}") from None
            except (OSError, urllib.error.URLError, GraphQLError) as exc:
                last = repr(exc)
            time.sleep(0.5)
        raise AssertionError(f"dagster dev not ready after {timeout}s (last error: {last})\n"
                             f"$ {' '.join(self.cmd)}\n{self.log()}")

    def stop(self) -> None:
        kill_group(self.proc)
        self._log.close()


def start_dagster_dev(env: Mapping[str, str], log_path: Path, timeout: float = 120) -> DagsterDev:
    """Start `dagster dev` on a free port and wait until it serves the code location.

    A free port can be taken between probing and binding; then it is started once more on another.
    """
    for attempt in (1, 2):
        dev = DagsterDev(env, log_path)
        try:
            dev.wait_ready(timeout=timeout)
            return dev
        except AssertionError:
            dev.stop()
            if attempt == 2 or "address already in use" not in dev.log().lower():
                raise
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------------------- GraphQL


class GraphQLError(Exception):
    pass


def graphql(base_url: str, query: str, variables: Mapping[str, Any] | None = None, timeout: float = 30) -> dict:
    """POST a query to the webserver's /graphql; the `data` of the answer (errors raise)."""
    body = json.dumps({"query": query, "variables": dict(variables or {})}).encode()
    req = urllib.request.Request(base_url + "/graphql", data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            answer = json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        raise GraphQLError(f"HTTP {exc.code}: {exc.read()[:2000]!r}") from exc
    if answer.get("errors"):
        raise GraphQLError(json.dumps(answer["errors"])[:4000])
    return answer["data"]


def set_nux_seen(base_url: str) -> Any:
    """Mark Dagster's first-visit pop-up ("Join the Dagster community") as seen for the instance.

    The webserver writes $DAGSTER_HOME/.nux/nux.yaml; its `shouldShowNux` query then answers false.
    """
    data = graphql(base_url, "mutation { setNuxSeen }")
    assert graphql(base_url, "{ shouldShowNux }")["shouldShowNux"] is False, "setNuxSeen did not take"
    return data["setNuxSeen"]


class CodeLocationError(AssertionError):
    pass


def job_location(base_url: str, job: str = JOB) -> tuple[str, str] | None:
    """(repository name, location name) of the loaded code location that has `job`; None while loading."""
    data = graphql(base_url, """
        { workspaceOrError { __typename ... on Workspace { locationEntries { name loadStatus locationOrLoadError {
            __typename ... on RepositoryLocation { repositories { name pipelines { name } } }
            ... on PythonError { message } } } } } }""")
    workspace = data["workspaceOrError"]
    for entry in workspace.get("locationEntries") or []:
        location = entry.get("locationOrLoadError") or {}
        if location.get("__typename") == "PythonError":
            raise CodeLocationError(f"code location {entry['name']} failed to load: {location['message']}")
        for repo in location.get("repositories") or []:
            if any(p["name"] == job for p in repo["pipelines"]):
                return repo["name"], entry["name"]
    return None


def stop_schedule(base_url: str, repository: str, location: str, schedule: str = SCHEDULE) -> str:
    """Stop a (default RUNNING) schedule so that it cannot launch runs while the test drives the UI."""
    data = graphql(base_url, """
        query($sel: ScheduleSelector!) { scheduleOrError(scheduleSelector: $sel) {
            __typename ... on Schedule { id scheduleState { id status } } } }""",
                   {"sel": {"repositoryName": repository, "repositoryLocationName": location, "scheduleName": schedule}})
    state = data["scheduleOrError"]["scheduleState"]
    if state["status"] == "STOPPED":
        return "STOPPED"
    result = graphql(base_url, """
        mutation($id: String!) { stopRunningSchedule(id: $id) {
            __typename ... on ScheduleStateResult { scheduleState { status } }
            ... on PythonError { message } } }""", {"id": state["id"]})["stopRunningSchedule"]
    assert result["__typename"] == "ScheduleStateResult", result
    return result["scheduleState"]["status"]


RUNS_QUERY = """
query($filter: RunsFilter) { runsOrError(filter: $filter) { __typename
    ... on Runs { results { runId status jobName tags { key value } } }
    ... on PythonError { message } } }"""


def runs(base_url: str, job: str = JOB) -> list[dict]:
    data = graphql(base_url, RUNS_QUERY, {"filter": {"pipelineName": job}})["runsOrError"]
    assert data["__typename"] == "Runs", data
    return data["results"]


def partition_of(run: Mapping[str, Any]) -> str | None:
    return next((t["value"] for t in run["tags"] if t["key"] == "dagster/partition"), None)


FINISHED = {"SUCCESS", "FAILURE", "CANCELED"}


def wait_for_run(base_url: str, run_id: str, timeout: float = 120, on_timeout: Callable[[], str] = lambda: "") -> str:
    """Poll the run's status until it finished; returns the final status."""
    deadline = time.monotonic() + timeout
    status = "?"
    while time.monotonic() < deadline:
        data = graphql(base_url, "query($id: ID!) { runOrError(runId: $id) { __typename ... on Run { status } } }",
                       {"id": run_id})["runOrError"]
        status = data.get("status", data["__typename"])
        if status in FINISHED:
            return status
        time.sleep(1)
    raise AssertionError(f"run {run_id} not finished after {timeout}s (status {status})\n{on_timeout()}")


def run_failure_events(base_url: str, run_id: str) -> str:
    """The run's error-level log messages (for assertion messages)."""
    data = graphql(base_url, """
        query($id: ID!) { logsForRun(runId: $id) { __typename ... on EventConnection { events {
            __typename ... on MessageEvent { message level } } } } }""", {"id": run_id})["logsForRun"]
    events = data.get("events") or []
    return "\n".join(e["message"][:2000] for e in events if e.get("level") in ("ERROR", "CRITICAL"))[-8000:]
