"""The operator's view: headless Chromium drives `dagster dev` over the demo drift.

One partition of the demo data (every kind of drift) is launched from reconciliation_job's
launchpad in the browser (partition picker, "Launch Run"), and once the run succeeded the test
reads what an operator reads (README "Where to look"):

  * the run page: every op of the job and its log lines with the counts,
  * the asset page of `reconciliation_report`: the latest materialization of the partition with
    the count metadata and the findings table (aktenzeichen, creditor address, kind, amounts,
    action; never client names), and the three asset checks with their results.

Every number and finding the UI shows is compared with the `reconciliation_reports` row and the
`reconciliation_findings` audit rows the run wrote.  Full-page screenshots of every page go to
test-artifacts/browser/ (the log of `dagster dev` too).

Skipped only when no Chromium is installed (`make chromium`; Playwright's own browser download
is not used).  Dagster's storage is a fresh PostgreSQL database with the repository's dagster.yaml,
so the run goes through the QueuedRunCoordinator and the daemon as in production.
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Iterator
from datetime import timezone
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import sqlalchemy as sa
from playwright.sync_api import TimeoutError as PlaywrightTimeoutError
from playwright.sync_api import sync_playwright

from reconciliation_pipeline import demo, ledger
from reconciliation_pipeline.partitions import hourly_partitions
from reconciliation_pipeline.report import TABLE_COLUMNS, TABLE_ROWS
from reconciliation_pipeline_tests.support import ASSET, JOB, ui

CHROMIUM = ui.chromium_path()

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(CHROMIUM is None, reason="no Chromium: /usr/bin/chromium and `chromium` on PATH are absent "
                                               "(install it with `make chromium`)"),
]

PARTITION = "2026-11-28-10:00"  # Europe/Berlin hour; its window ends 2026-11-28 10:00 UTC
WINDOW_END = hourly_partitions.time_window_for_partition_key(PARTITION).end.astimezone(timezone.utc)
CHECKS = ("no_unrepaired_drift", "repair_budget_not_exceeded", "no_dead_outbox_messages")
COUNT_KEYS = ("records_checked", "mismatches_found", "auto_repaired", "failed_repairs", "outbox_retried",
              "outbox_dead", "expired_keys_deleted", "old_outbox_deleted")
# Client names the demo stores (last names in MongoDB, "Last, First" in the emails); the UI must show none.
CLIENT_NAMES = sorted({last for _, _, last in demo.CLIENTS} | {f"{last}, {first}" for _, first, last in demo.CLIENTS})
NUX_TITLE = "Join the Dagster community"
WAIT_MS = 30_000


def graph_ops() -> list[str]:
    """The op names of the job's graph-backed asset, from the definitions themselves."""
    from reconciliation_pipeline.assets import reconciliation_report

    return sorted(node.name for node in reconciliation_report.node_def.nodes)


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture
def demo_drift(pg: sa.Engine, mongo_db: Any) -> dict[str, int]:
    """Every kind of drift for the partition's window, in the session database and a fresh MongoDB database."""
    return demo.seed(pg, mongo_db, WINDOW_END)


@pytest.fixture
def artifacts() -> Path:
    ui.ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for old in ui.ARTIFACTS.glob("*.png"):
        old.unlink()
    return ui.ARTIFACTS


@pytest.fixture
def dagster_ui(demo_drift, pg_url: str, mongo_db: Any, service_env: dict[str, str], tmp_path: Path,
               artifacts: Path) -> Iterator[ui.DagsterDev]:
    """`dagster dev` on a free loopback port over the test's databases, with its own PostgreSQL storage."""
    with ui.dev_env(service_env, pg_url=pg_url, mongo_db=mongo_db.name, home=tmp_path / "dagster_home") as env:
        dev = ui.start_dagster_dev(env, artifacts / "dagster_dev.log", timeout=120)
        try:
            yield dev
        finally:
            dev.stop()


@pytest.fixture
def page(artifacts: Path):
    """A Chromium page (system Chromium; the flags in ui.CHROMIUM_ARGS are required on this machine)."""
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ui.CHROMIUM_ARGS, timeout=60_000)
        context = browser.new_context(viewport={"width": 1600, "height": 1200}, locale="en-US", timezone_id="UTC")
        # No add_init_script for the first-visit pop-up: the UI shows it only while the server's
        # `shouldShowNux` is true or localStorage["communityNux"] is unset; the setNuxSeen mutation
        # (see the test) makes the former false for the whole instance, which is enough.
        page = context.new_page()
        page.set_default_timeout(WAIT_MS)
        try:
            yield page
        finally:
            context.close()
            browser.close()


# ------------------------------------------------------------------------------------------ helpers


def shot(page, name: str, height: int | None = None) -> Path:
    """A full-page screenshot.  Dagster's pages scroll inside panes, so the viewport is made tall enough."""
    if height:
        page.set_viewport_size({"width": page.viewport_size["width"], "height": height})
    path = ui.ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def assert_no_nux(page) -> None:
    assert page.get_by_text(NUX_TITLE).count() == 0, "Dagster's first-visit pop-up is showing"


def visible(page_or_locator, text: str | re.Pattern, exact: bool = False, timeout: int = WAIT_MS):
    loc = page_or_locator.get_by_text(text, exact=exact).first
    loc.wait_for(state="visible", timeout=timeout)
    return loc


def assert_metadata(page, key: str, expected: Any, timeout: float = 15) -> None:
    """A metadata table row shows `expected` (overview: key | timestamp | value; partition: key | value | ...)."""
    row = page.locator("tr").filter(has=page.get_by_text(key, exact=True)).first
    row.wait_for(state="visible")
    deadline = time.monotonic() + timeout
    while True:
        cells = [c.strip() for c in row.locator(":scope > td").all_inner_texts()[1:]]
        if str(expected) in cells:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"metadata {key}: expected {expected!r}, the row shows {cells!r}")
        time.sleep(0.2)


def report_row(engine: sa.Engine) -> dict:
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT * FROM reconciliation_reports WHERE partition_key = :p ORDER BY id"),
                            {"p": PARTITION}).mappings().all()
    assert len(rows) == 1, rows
    return dict(rows[0])


def euros(cents: int | None) -> str:
    """A float cell as the UI prints it (JavaScript's number formatting: 10.0 -> "10")."""
    if cents is None:
        return ""
    value = cents / 100
    return str(int(value)) if value == int(value) else repr(value)


def finding_cells(engine: sa.Engine, report_id: int) -> list[dict[str, str]]:
    """The run's findings (audit rows without the outbox deliveries) as the findings table shows them, with
    the drift ledger's times_seen and cause of each."""
    with engine.connect() as conn:
        rows = pd.read_sql(sa.text(
            "SELECT client_aktenzeichen AS aktenzeichen, creditor_email, kind, pg_amount_cents, "
            "mongo_amount_cents_before, action, email_id, client_id, creditor_pos AS pos "
            "FROM reconciliation_findings_current WHERE report_id = :r AND kind <> 'outbox_delivery' ORDER BY id"),
            conn, params={"r": report_id}, dtype=object)
        rows = rows.where(rows.notna(), None)
        described = ledger.describe(conn, rows)
    return [{"aktenzeichen": az or "", "creditor": creditor or "", "kind": kind, "postgres_eur": euros(pg_cents),
             "mongo_eur": euros(mongo_cents), "action": action, "times_seen": "" if pd.isna(seen) else str(int(seen)),
             "cause": cause or ""}
            for az, creditor, kind, pg_cents, mongo_cents, action, seen, cause in zip(
                rows["aktenzeichen"], rows["creditor_email"], rows["kind"], rows["pg_amount_cents"],
                rows["mongo_amount_cents_before"], rows["action"], described["times_seen"], described["cause"])]


def launch_from_launchpad(page, base_url: str, repo_address: str) -> str:
    """Jobs -> reconciliation_job -> launchpad: pick the partition, "Launch Run"; returns the new run's id."""
    page.goto(f"{base_url}/locations/{repo_address}/jobs/{JOB}/playground")
    partition_input = page.get_by_placeholder("Partition")
    partition_input.wait_for(state="visible")
    # The picker loads the ~17k partition keys asynchronously and may drop what is typed before
    # that: type, wait for the suggestion, else clear and type again (bounded).
    option = page.get_by_role("menuitem", name=PARTITION, exact=True)
    deadline = time.monotonic() + WAIT_MS / 1000
    while True:
        partition_input.click()
        partition_input.fill("")
        partition_input.press_sequentially(PARTITION, delay=10)
        try:
            option.wait_for(state="visible", timeout=3_000)
            break
        except PlaywrightTimeoutError:
            if time.monotonic() > deadline:
                raise
    option.click()
    # picking a partition adds the partition tags (shown without their dagster/ prefix) and its config
    visible(page, f"partition: {PARTITION}", exact=True)
    visible(page, "reconciliation/mongo-writer: 1", exact=True)
    assert_no_nux(page)
    shot(page, "01_launchpad")
    page.get_by_role("button", name="Launch Run").click()
    page.wait_for_url(re.compile(r".*/runs/[0-9a-f-]{36}"), timeout=WAIT_MS)
    return re.search(r"/runs/([0-9a-f-]{36})", page.url).group(1)


# ------------------------------------------------------------------------------------------ the test


def test_operator_launches_a_partition_and_reads_run_and_report(dagster_ui: ui.DagsterDev, page, pg: sa.Engine):
    base = dagster_ui.base_url
    ui.set_nux_seen(base)  # the first-visit pop-up would cover the pages (GraphQL, as its "Skip" button does)
    repository, location = ui.job_location(base)
    # reconciliation_hourly_schedule is RUNNING by default; stopped so that no tick (at :05) launches a
    # second run over the test's data while the browser reads the first one.
    assert ui.stop_schedule(base, repository, location) == "STOPPED"
    repo_address = location if repository == "__repository__" else f"{repository}@{location}"

    try:
        run_id = launch_from_launchpad(page, base, repo_address)

        # the run: queued, dequeued by the daemon, executed; it is reconciliation_job with its tags
        status = ui.wait_for_run(base, run_id, timeout=150, on_timeout=dagster_ui.log)
        assert status == "SUCCESS", f"run {run_id}: {status}\n{ui.run_failure_events(base, run_id)}"
        [run] = ui.runs(base)
        tags = {t["key"]: t["value"] for t in run["tags"]}
        assert (run["runId"], run["jobName"]) == (run_id, JOB)
        assert tags.get("dagster/partition") == PARTITION and tags.get("reconciliation/mongo-writer") == "1", tags
        report = report_row(pg)
        assert report["status"] == "completed" and report["run_id"] == run_id, report
        findings = finding_cells(pg, report["id"])
        assert {f["kind"] for f in findings} >= {"data_mismatch", "missing_in_mongo", "extra_in_mongo"}, findings

        check_run_page(page, base, run_id, report)
        check_asset_pages(page, base, report, findings)
    except BaseException:
        try:
            shot(page, "99_failure")
        finally:
            print(f"--- dagster dev log ({dagster_ui.log_path}) ---\n{dagster_ui.log()}")
        raise


def check_run_page(page, base_url: str, run_id: str, report: dict) -> None:
    # tall enough for the step chart and every op's log lines at once (the events list is virtualized)
    page.set_viewport_size({"width": 1600, "height": 2200})
    page.goto(f"{base_url}/runs/{run_id}")
    visible(page, "RUN_SUCCESS", exact=True)
    visible(page, f"partition: {PARTITION}", exact=True)
    # Only the ops' own log lines (levels without "event"): one line per step with its counts.
    page.get_by_role("button", name=re.compile(r"Levels \(\d+.\d+\)")).click()
    page.locator("label[for=menu-check-EVENT]").click()
    page.keyboard.press("Escape")
    visible(page, re.compile(r"records_checked="))

    counts = ", ".join(f"{k}={report[k]}" for k in ("records_checked", "mismatches_found", "auto_repaired", "failed_repairs"))
    visible(page, re.compile(rf"^report {report['id']}: {re.escape(counts)}, outbox_retried={report['outbox_retried']}"))
    visible(page, f"partition {PARTITION}", timeout=5_000)  # open_report: the window it reconciles
    visible(page, re.compile(rf"\b{report['records_checked']} pairs compared, {report['mismatches_found']} findings"))
    missing = [op for op in graph_ops() if page.get_by_text(re.compile(rf"↳\s*{re.escape(op)}\b")).count() == 0]
    assert not missing, f"ops without a log line on the run page: {missing}"
    assert_no_client_names(page, "run page (op log lines)")
    assert_no_nux(page)
    page.mouse.move(0, 0)  # no hover marker over the step chart
    shot(page, "02_run_page")


def check_asset_pages(page, base_url: str, report: dict, findings: list[dict[str, str]]) -> None:
    asset_url = f"{base_url}/assets/{ASSET}"
    page.set_viewport_size({"width": 1920, "height": 1200})

    # 1. Overview: the latest materialization is the partition's, with its metadata
    page.goto(asset_url)
    status = page.get_by_text("Latest materialization", exact=True).first
    status.wait_for(state="visible")
    visible(page, PARTITION, exact=True)
    for key in COUNT_KEYS:
        assert_metadata(page, key, report[key])
    assert_findings_table(page, findings, "03b_findings_table")
    assert_no_client_names(page, "asset overview")
    shot(page, "03_asset_overview", height=2400)

    # 2. the partition's own view (what an operator opens for a past hour)
    page.set_viewport_size({"width": 1920, "height": 1200})
    page.goto(f"{asset_url}?view=partitions&partition={PARTITION}")
    visible(page, "Latest materialization", exact=True)
    for key in COUNT_KEYS:
        assert_metadata(page, key, report[key])
    assert_findings_table(page, findings, "04b_findings_table_partition")
    assert_no_client_names(page, "asset partition view")
    shot(page, "04_asset_partition", height=2200)

    # 3. the asset checks and their results for this materialization
    page.set_viewport_size({"width": 1600, "height": 1000})
    page.goto(f"{asset_url}?view=checks")
    expected = {
        "no_unrepaired_drift": "Failed" if report["mismatches_found"] > report["auto_repaired"] else "Succeeded",
        "repair_budget_not_exceeded": "Failed" if report["repairs_halted"] else "Succeeded",
        "no_dead_outbox_messages": "Failed" if report["outbox_dead"] else "Succeeded",
    }
    for name in CHECKS:
        visible(page, name, exact=True)
    text = " ".join(page.locator("body").inner_text().split())  # the list: "<name> [<name>] <result>"
    for name, result in expected.items():
        assert re.search(rf"{name}( {name})? {result}\b", text), f"{name}: expected {result} in {text!r}"
    assert_no_client_names(page, "asset checks")
    shot(page, "05_asset_checks")


def assert_findings_table(page, findings: list[dict[str, str]], screenshot: str,
                          must_show: tuple[str, ...] = ("data_mismatch", "542900", "aktenzeichen")) -> None:
    """The findings metadata renders as a table with the expected columns and exactly the run's findings."""
    row = page.locator("tr").filter(has=page.get_by_text("findings", exact=True)).first
    table = row.locator("table").first
    table.wait_for(state="visible")
    row.screenshot(path=str(ui.ARTIFACTS / f"{screenshot}.png"))
    header = [h.strip() for h in table.locator("th").all_inner_texts()]
    columns = list(TABLE_COLUMNS)
    assert sorted(header) == sorted(columns), header
    cells = table.locator("tbody tr").evaluate_all(
        "rows => rows.map(r => Array.from(r.querySelectorAll('td')).map(td => td.innerText.trim()))")
    shown = sorted(tuple(dict(zip(header, c))[col] for col in columns) for c in cells)
    expected = sorted(tuple(f[col] for col in columns) for f in findings)
    if len(expected) > TABLE_ROWS:  # the table lists the first TABLE_ROWS findings, all are in the audit table
        assert len(shown) == TABLE_ROWS and set(shown) <= set(expected), shown
    else:
        assert shown == expected, f"findings table {shown} != audit rows {expected}"
    # e.g. the demo's data_mismatch of client 542900
    for text in must_show:
        assert table.get_by_text(text, exact=True).first.is_visible(), text


def assert_no_client_names(page, where: str) -> None:
    text, html = page.locator("body").inner_text(), page.content()
    leaked = [name for name in CLIENT_NAMES if name in text or name in html]
    assert not leaked, f"client names on the {where}: {leaked}"


# ------------------------------------------------------------------------------------------ a day of history

# the demo's 24 hours end with the last closed hour: the UI plots only the latest partitions, so a
# fixed date slides out of the plot as the calendar moves on
HISTORY_LAST = hourly_partitions.get_last_partition_key()
BACKFILL = ["2026-11-27-08:00", "2026-11-27-09:00", "2026-11-27-10:00"]  # older hours, not materialized yet
HISTORY_ARTIFACTS = ui.ARTIFACTS / "history"
LINE_PIXELS_JS = """c => {
    const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
    const cols = new Set();
    for (let y = 0; y < c.height; y++) for (let x = 0; x < c.width; x++) {
        const i = (y * c.width + x) * 4, r = d[i], g = d[i + 1], b = d[i + 2], a = d[i + 3];
        if (a > 150 && b > 170 && r < 140 && g < 130 && b - r > 60) cols.add(x);  // the plot line's blue
    }
    return cols.size;
}"""


@pytest.fixture
def history_ui(pg: sa.Engine, pg_url: str, mongo_db: Any, service_env: dict[str, str], tmp_path: Path,
               monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[ui.DagsterDev, list]]:
    """The demo's day of history (24 real runs) in a fresh PostgreSQL-backed instance, then `dagster dev` over it."""
    import dagster as dg

    HISTORY_ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for old in HISTORY_ARTIFACTS.glob("*.png"):
        old.unlink()
    with ui.dev_env(service_env, pg_url=pg_url, mongo_db=mongo_db.name, home=tmp_path / "dagster_home") as env:
        for name in ("RECON_POSTGRES_URL", "RECON_MONGO_URI", "RECON_MONGO_DB", "DAGSTER_HOME", "DAGSTER_POSTGRES_URL"):
            monkeypatch.setenv(name, env[name])
        with dg.DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
            results = demo.replay_history(pg, mongo_db, instance, demo.history_partitions(HISTORY_LAST),
                                          tmp_path / "demo-runs.log", out=sys.stdout)
        assert all(h.success for h in results)
        dev = ui.start_dagster_dev(env, HISTORY_ARTIFACTS / "dagster_dev.log", timeout=120)
        try:
            yield dev, results
        finally:
            dev.stop()
            print(f"screenshots and the dagster dev log: {HISTORY_ARTIFACTS}")


def history_shot(page, name: str) -> Path:
    path = HISTORY_ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


BACKFILLS_QUERY = """{ partitionBackfillsOrError(limit: 10) { __typename ... on PartitionBackfills { results {
    id status partitionNames runs { runId status tags { key value } } } } } }"""


def wait_for_backfill(base_url: str, partitions: list[str], timeout: float, on_timeout) -> dict:
    """Until the UI's backfill of `partitions` has a finished run for each; returns it."""
    deadline = time.monotonic() + timeout
    backfill: dict = {}
    while time.monotonic() < deadline:
        results = ui.graphql(base_url, BACKFILLS_QUERY)["partitionBackfillsOrError"]["results"]
        backfill = next((b for b in results if sorted(b["partitionNames"] or []) == sorted(partitions)), {})
        runs = backfill.get("runs") or []
        if len(runs) == len(partitions) and all(r["status"] in ui.FINISHED for r in runs):
            return backfill
        time.sleep(2)
    raise AssertionError(f"backfill of {partitions} not finished after {timeout}s: {backfill}\n{on_timeout()}")


def test_operator_sees_a_day_of_drift_and_backfills_three_hours(history_ui, page, pg: sa.Engine):
    dev, results = history_ui
    base = dev.base_url
    ui.set_nux_seen(base)
    repository, location = ui.job_location(base)
    assert ui.stop_schedule(base, repository, location) == "STOPPED"
    asset_url = f"{base}/assets/{ASSET}"
    latest = results[-1]
    try:
        # 1. the plots: every count over the 24 partitions (a line, not a dot)
        page.set_viewport_size({"width": 1600, "height": 2600})
        page.goto(asset_url)
        visible(page, "Latest materialization", exact=True)
        page.get_by_role("button", name="Plots").first.click()
        title = visible(page, "mismatches_found", exact=True)
        canvas = title.locator("xpath=ancestor::*[.//canvas][1]").locator("canvas").first
        canvas.wait_for(state="visible")
        # the chart animates in (slowly on a loaded machine): wait for the line, up to 20 s
        deadline = time.monotonic() + 20
        while (line_columns := canvas.evaluate(LINE_PIXELS_JS)) < 20 and time.monotonic() < deadline:
            time.sleep(0.5)
        history_shot(page, "01_plots")
        canvas.screenshot(path=str(HISTORY_ARTIFACTS / "01b_plot_mismatches_found.png"))
        assert line_columns >= 20, f"the mismatches_found plot draws {line_columns} pixel columns: a dot, not a line"
        found = {h.partition: h.report["mismatches_found"] for h in results}
        assert len(set(found.values())) >= 3, found  # what the line plots: at least 3 different points
        for key in ("auto_repaired", "outbox_dead", "records_checked"):
            assert page.get_by_text(key, exact=True).count() >= 1, key
        assert_no_client_names(page, "asset plots")

        # 2. the latest hour's findings table (the partition's own view)
        page.set_viewport_size({"width": 1920, "height": 1400})
        page.goto(f"{asset_url}?view=partitions&partition={latest.partition}")
        visible(page, "Latest materialization", exact=True)
        assert_metadata(page, "mismatches_found", latest.report["mismatches_found"])
        assert_findings_table(page, finding_cells(pg, latest.report["id"]), "history/02b_findings_table",
                              must_show=("client_not_found", "999999", "aktenzeichen"))
        assert_no_client_names(page, "asset partition view")
        history_shot(page, "02_findings")

        # 3. the checks tab: the latest hour has a dead outbox message and open drift, its budget held
        page.set_viewport_size({"width": 1600, "height": 1000})
        page.goto(f"{asset_url}?view=checks")
        for name in CHECKS:
            visible(page, name, exact=True)
        text = " ".join(page.locator("body").inner_text().split())
        expected = {"no_unrepaired_drift": "Failed", "repair_budget_not_exceeded": "Succeeded",
                    "no_dead_outbox_messages": "Failed"}
        for name, result in expected.items():
            assert re.search(rf"{name}( {name})? {result}\b", text), f"{name}: expected {result} in {text!r}"
        history_shot(page, "03_checks")

        # 4. a backfill of 3 partitions from the Partitions tab; the daemon runs them
        page.set_viewport_size({"width": 1600, "height": 1200})
        page.goto(f"{asset_url}?view=partitions")
        visible(page, f"Materialized ({len(results)})", exact=True)
        page.get_by_role("button", name="Materialize…").first.click()
        dialog = page.get_by_role("dialog")
        selection = dialog.locator("input[type=text]").first
        selection.click()
        selection.fill(f"[{BACKFILL[0]}...{BACKFILL[-1]}]")
        selection.press("Enter")
        visible(dialog, "3 partitions", exact=True)
        history_shot(page, "04_backfill_dialog")
        dialog.get_by_role("button", name="Launch backfill").click()
        backfill = wait_for_backfill(base, BACKFILL, timeout=300, on_timeout=dev.log)
        statuses = {ui.partition_of(r): r["status"] for r in backfill["runs"]}
        assert statuses == {p: "SUCCESS" for p in BACKFILL}, (statuses, [ui.run_failure_events(base, r["runId"])
                                                                      for r in backfill["runs"]])
        with pg.connect() as conn:
            rows = conn.execute(sa.text("SELECT partition_key, status FROM reconciliation_reports "
                                        "WHERE partition_key = ANY(:p)"), {"p": BACKFILL}).all()
        assert sorted(rows) == [(p, "completed") for p in BACKFILL], rows
        page.goto(f"{base}/runs/b/{backfill['id']}")  # the backfill's page: its range, 3 of 3 succeeded
        visible(page, re.compile(rf"^{re.escape(BACKFILL[0])}\W+{re.escape(BACKFILL[-1])}$"))
        visible(page, "100% completed", exact=True)
        visible(page, "Succeeded", exact=True)
        history_shot(page, "05_backfill_page")
        page.goto(f"{asset_url}?view=partitions")
        visible(page, f"Materialized ({len(results) + len(BACKFILL)})", exact=True)
        history_shot(page, "06_partitions_after_backfill")
    except BaseException:
        try:
            history_shot(page, "99_failure")
        finally:
            print(f"--- dagster dev log ({dev.log_path}) ---\n{dev.log()}")
        raise
