"""The run-scoped IO manager: exact round trips without pickles, cleanup of a successful run, re-execution of a failed one."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pytest
from bson import Decimal128, ObjectId
from bson.tz_util import utc as bson_utc
from hypothesis import given, settings
from hypothesis import strategies as st

from reconciliation_pipeline.run.types import DiffResult, MongoExtract, MongoShard, OutboxResult, RunContext
from reconciliation_pipeline.store.frame_files import FrameParts
from reconciliation_pipeline.io_managers import RUN_FILES_DIR, read_value, write_value
from reconciliation_pipeline_tests.builders import PARTITION
from reconciliation_pipeline_tests.support import (
    JOB, REPO, amounts, execute_args, finding_rows, job_runs, materializations, report_rows, run_cli, run_debug,
)
from reconciliation_pipeline_tests.test_cli_e2e import seed_mismatch_and_missing


def roundtrip(value, tmp_path: Path):
    write_value(value, tmp_path / "out")
    assert not list((tmp_path / "out").glob("*.pickle"))
    return read_value(tmp_path / "out")


def frame():
    return pd.DataFrame({
        "email_id": pd.Series([1, 2, 3], dtype="int64"),
        "amount_cents": pd.array([100, None, 300], dtype="Int64"),
        "received_at": pd.to_datetime(["2026-11-28 09:00:00.000000", None, "2026-11-28 09:30:00.123456"], utc=True),
        "az_key": pd.Series(["542900", None, "1"], dtype=object),
        "in_window": [True, False, True],
        "ratio": [0.5, np.nan, 1.0],
        "mongo_raw": pd.Series(["1.234,56", {"$ne": None}, 12.5], dtype=object),
        "mixed_missing": pd.Series([None, np.nan, pd.NA], dtype=object),
        "s": pd.Series(["a", None, "c"], dtype="str"),
        "s_na": pd.Series(["a", None, "a"], dtype="string[python]"),
        "s_arrow": pd.Series(["a", None, "a"], dtype="string[pyarrow]"),
    }).set_index(pd.Index([4, 7, 9]))


@pytest.mark.parametrize("value", [
    {"expired_keys_deleted": 3, "old_outbox_deleted": 0},
    OutboxResult(retried=2, succeeded=1, failed=1, note="n"),
    RunContext(1, "run", PARTITION, datetime(2026, 11, 28, 8, tzinfo=timezone.utc), datetime(2026, 11, 28, 10, tzinfo=timezone.utc), False),
    {"t": (1, "x"), "f": frozenset({"a"}), 3: [1.5, float("inf"), None]},
], ids=["dict", "outbox", "run_context", "nested"])
def test_values_round_trip(value, tmp_path):
    back = roundtrip(value, tmp_path)
    assert back == value and type(back) is type(value)
    if isinstance(value, RunContext):
        assert back.window_start.tzinfo is timezone.utc


def test_frames_and_dataclasses_with_frames_and_documents_round_trip(tmp_path):
    docs = [{"_id": ObjectId(), "aktenzeichen": "542900", "at": datetime(2026, 1, 1, tzinfo=bson_utc),
             "amount": Decimal128("1.10"), "final_creditor_list": [{"sender_email": "x@y.de", "n": 2**40}]}]
    shard = MongoShard(0, 2, frame(), ("542900",), docs, named_keys=frozenset({"mueller"}))
    back = roundtrip(shard, tmp_path)
    pd.testing.assert_frame_equal(back.emails, shard.emails, check_exact=True)
    assert [type(v) for v in back.emails["mixed_missing"]] == [type(None), float, type(pd.NA)]
    assert back.named_documents == docs
    assert [type(v) for v in back.named_documents[0].values()] == [type(v) for v in docs[0].values()]
    assert (back.aktenzeichen, back.named_keys, back.full_scan) == (shard.aktenzeichen, shard.named_keys, False)
    diff = DiffResult(frame().iloc[:0], 0, True)
    pd.testing.assert_frame_equal(roundtrip(diff, tmp_path).findings, diff.findings)


def test_string_columns_come_back_with_each_distinct_string_once(tmp_path):
    back = roundtrip(frame(), tmp_path)
    for column in ("s_na", "az_key"):
        assert back[column].iloc[0] is not None
    assert back["s_na"].iloc[0] is back["s_na"].iloc[2]  # a million emails name a few thousand creditors


def test_mongo_amounts_keep_their_exact_types(tmp_path):
    raw = pd.Series([12.5, -0.0, float("nan"), 3, True, None, Decimal128("1.10"), "\x00<absent>", 2**63, {"$ne": None}], dtype=object)
    back = roundtrip(pd.DataFrame({"mongo_raw": raw}), tmp_path)["mongo_raw"]
    assert [type(v) for v in back] == [type(v) for v in raw]
    assert [repr(v) for v in back] == [repr(v) for v in raw]  # -0.0 and nan included


def test_frame_parts_are_stored_a_file_each_and_read_back_lazily(tmp_path):
    parts = FrameParts()
    for n in range(3):
        parts.append(frame().iloc[:n])
    extract = MongoExtract(0, parts, FrameParts(), pd.DataFrame({"part": [0]}), pd.DataFrame(), pd.DataFrame())
    write_value(extract, tmp_path / "out")
    manifest = json.loads((tmp_path / "out" / "value.json").read_text())
    assert len(manifest["fields"]["clients"]["$parts"]) == 3  # a file a part
    back = read_value(tmp_path / "out")
    assert (len(back.clients), back.clients.rows, len(back.elements)) == (3, 3, 0)
    for n in range(3):
        pd.testing.assert_frame_equal(back.clients[n], frame().iloc[:n], check_exact=True)


def test_refuses_what_it_cannot_store_exactly(tmp_path):
    with pytest.raises(TypeError):
        write_value(object(), tmp_path / "x")


cells = st.one_of(st.none(), st.text(max_size=5), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                  st.booleans(), st.datetimes(timezones=st.just(timezone.utc)))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(cells, st.one_of(st.none(), st.text(max_size=3)), st.one_of(st.none(), st.integers(-2**62, 2**62))), max_size=8))
def test_hypothesis_object_and_nullable_columns_round_trip(tmp_path_factory, rows):
    df = pd.DataFrame({
        "any": pd.Series([r[0] for r in rows], dtype=object),
        "strings": pd.Series([r[1] for r in rows], dtype=object),
        "ints": pd.array([r[2] for r in rows], dtype="Int64"),
    })
    back = roundtrip(df, tmp_path_factory.mktemp("h"))
    pd.testing.assert_frame_equal(back, df, check_exact=True)
    assert [type(v) for v in back["any"]] == [type(v) for v in df["any"]]


# --- through the CLI ------------------------------------------------------------------------------


def _files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


@pytest.mark.e2e
def test_successful_run_leaves_no_intermediate_outputs(pg, mongo_db, run_env, sqlite_dagster_home):
    seed_mismatch_and_missing(pg, mongo_db)
    result = run_cli(execute_args(PARTITION), run_env)
    assert result.returncode == 0, result.describe()
    storage = sqlite_dagster_home / "storage"
    assert _files(storage / RUN_FILES_DIR) == []
    left = _files(storage)
    assert left and all("compute_logs" in p.parts for p in left), left  # the run page's logs stay
    with dg.DagsterInstance.from_config(str(sqlite_dagster_home)) as instance:
        [record] = materializations(instance, [PARTITION])
        metadata = record.asset_materialization.metadata
        assert "path" not in metadata
        assert metadata["table"].value == "reconciliation_reports"
        assert metadata["report_id"].value == report_rows(pg)[0]["id"]


def reconciliation_job_def() -> dg.JobDefinition:
    """The code location's reconciliation_job (a module-level factory, so `dg.reconstructable` can name it)."""
    from reconciliation_pipeline.definitions import defs

    return defs.resolve_job_def(JOB)


# Re-execution from failure through Dagster's public API, in its own process against the DAGSTER_HOME instance.
REEXECUTE_FROM_FAILURE = """
import sys
import dagster as dg
from reconciliation_pipeline_tests.test_io_manager import reconciliation_job_def

with dg.DagsterInstance.get() as instance:
    options = dg.ReexecutionOptions.from_failure(sys.argv[1], instance)
    parent = instance.get_run_by_id(sys.argv[1])  # execute_job does not copy them (the UI and run retries do)
    result = dg.execute_job(dg.reconstructable(reconciliation_job_def), instance, tags=parent.tags, reexecution_options=options)
    print("REEXECUTION", result.run_id, result.success)
    sys.exit(0 if result.success else 1)
"""


@pytest.mark.e2e
def test_failed_run_keeps_its_files_and_is_reexecuted_from_failure(pg, mongo_db, run_env, sqlite_dagster_home):
    expected = seed_mismatch_and_missing(pg, mongo_db)
    storage = sqlite_dagster_home / "storage"

    # 1. the last op raises: every other step has succeeded and stored its output
    failing = run_cli(execute_args(PARTITION),
                      {**run_env, "RECON_FAULT_RAISE_AT": "before_report_finished"})
    assert failing.returncode != 0, failing.describe()
    assert "fault injected at before_report_finished" in failing.output, failing.describe()
    with dg.DagsterInstance.from_config(str(sqlite_dagster_home)) as instance:
        [failed] = job_runs(instance)
        assert failed.status == dg.DagsterRunStatus.FAILURE, run_debug(instance)
        assert materializations(instance, [PARTITION]) == []
    kept = _files(storage / RUN_FILES_DIR / failed.run_id)
    # step keys of the graph-backed asset: reconciliation_report.<op>
    assert {p.relative_to(storage / RUN_FILES_DIR / failed.run_id).parts[0].rpartition(".")[2] for p in kept} >= {
        "open_report", "retry_outbox", "extract_postgres", "repair_mongo", "cleanup"}, kept
    assert not [p for p in _files(storage) if p.suffix in (".pickle", ".pkl")]
    [report] = report_rows(pg)
    assert report["status"] == "failed" and report["run_id"] == failed.run_id, report  # the failure hook's record
    assert "finish_report" in report["error_message"] and "InjectedFault" in report["error_message"], report
    assert amounts(mongo_db) == expected  # repair_mongo ran in the failed run

    # 2. re-executed from failure: only finish_report runs, its inputs read from the failed run's files
    reexec = subprocess.run([sys.executable, "-c", REEXECUTE_FROM_FAILURE, failed.run_id], env=run_env, cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert reexec.returncode == 0, f"exit {reexec.returncode}\n{reexec.stdout[-8000:]}\n{reexec.stderr[-8000:]}"
    with dg.DagsterInstance.from_config(str(sqlite_dagster_home)) as instance:
        runs = job_runs(instance)
        assert len(runs) == 2, run_debug(instance)
        child = next(r for r in runs if r.run_id != failed.run_id)
        assert child.status == dg.DagsterRunStatus.SUCCESS, run_debug(instance)
        assert child.parent_run_id == failed.run_id and child.root_run_id == failed.run_id
        assert child.tags.get("dagster/partition") == PARTITION
        started = {e.step_key for e in instance.all_logs(child.run_id, of_type=dg.DagsterEventType.STEP_START)}
        assert {key.rpartition(".")[2] for key in started} == {"finish_report"}, started
        [record] = materializations(instance, [PARTITION])
        assert record.run_id == child.run_id
        metadata = record.asset_materialization.metadata
        assert "path" not in metadata and metadata["table"].value == "reconciliation_reports"
    [report] = report_rows(pg)  # one report row for the partition, completed by the re-execution
    assert report["status"] == "completed" and report["error_message"] is None, report
    assert report["run_id"] == failed.run_id  # opened by the failed run (re-execution keeps the root's row)
    assert metadata["report_id"].value == report["id"]
    assert (report["records_checked"], report["mismatches_found"], report["auto_repaired"]) == (2, 2, 2)
    assert sorted(f["action"] for f in finding_rows(pg, report["id"])) == ["repaired", "repaired"]

    # 3. the successful re-execution dropped its own files and the failed run's; the compute logs stay
    assert _files(storage / RUN_FILES_DIR) == []
    left = _files(storage)
    assert left and all("compute_logs" in p.parts for p in left), left
