"""The run-scoped IO manager: exact round trips without pickles, cleanup of a successful run, re-execution of a failed one."""

from __future__ import annotations

import json
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

from reconciliation_pipeline import steps
from reconciliation_pipeline.io_managers import RUN_FILES_DIR, read_value, write_value
from reconciliation_pipeline_tests.builders import PARTITION
from reconciliation_pipeline_tests.e2e_support import DEFS_MODULE, JOB, describe, materializations, report_rows, run_cli
from reconciliation_pipeline_tests.test_cli_e2e import cli_env, seed_mismatch_and_missing, sqlite_home  # noqa: F401 (fixtures)


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
    }).set_index(pd.Index([4, 7, 9]))


@pytest.mark.parametrize("value", [
    {"expired_keys_deleted": 3, "old_outbox_deleted": 0},
    steps.OutboxResult(retried=2, succeeded=1, failed=1, note="n"),
    steps.RunContext(1, "run", PARTITION, datetime(2026, 11, 28, 8, tzinfo=timezone.utc), datetime(2026, 11, 28, 10, tzinfo=timezone.utc), False),
    {"t": (1, "x"), "f": frozenset({"a"}), 3: [1.5, float("inf"), None]},
], ids=["dict", "outbox", "run_context", "nested"])
def test_values_round_trip(value, tmp_path):
    back = roundtrip(value, tmp_path)
    assert back == value and type(back) is type(value)
    if isinstance(value, steps.RunContext):
        assert back.window_start.tzinfo is timezone.utc


def test_frames_and_dataclasses_with_frames_and_documents_round_trip(tmp_path):
    docs = [{"_id": ObjectId(), "aktenzeichen": "542900", "at": datetime(2026, 1, 1, tzinfo=bson_utc),
             "amount": Decimal128("1.10"), "final_creditor_list": [{"sender_email": "x@y.de", "n": 2**40}]}]
    shard = steps.MongoShard(0, 2, frame(), ("542900",), docs, named_keys=frozenset({"mueller"}))
    back = roundtrip(shard, tmp_path)
    pd.testing.assert_frame_equal(back.emails, shard.emails, check_exact=True)
    assert [type(v) for v in back.emails["mixed_missing"]] == [type(None), float, type(pd.NA)]
    assert back.named_documents == docs
    assert [type(v) for v in back.named_documents[0].values()] == [type(v) for v in docs[0].values()]
    assert (back.aktenzeichen, back.named_keys, back.full_scan) == (shard.aktenzeichen, shard.named_keys, False)
    diff = steps.DiffResult(frame().iloc[:0], 0, True)
    pd.testing.assert_frame_equal(roundtrip(diff, tmp_path).findings, diff.findings)


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
def test_successful_run_leaves_no_intermediate_outputs(pg, mongo_db, cli_env, sqlite_home):
    seed_mismatch_and_missing(pg, mongo_db)
    result = run_cli(["job", "execute", "-m", DEFS_MODULE, "-j", JOB, "--tags", json.dumps({"dagster/partition": PARTITION})], cli_env)
    assert result.returncode == 0, describe(result)
    storage = sqlite_home / "storage"
    assert _files(storage / RUN_FILES_DIR) == []
    left = _files(storage)
    assert left and all("compute_logs" in p.parts for p in left), left  # the run page's logs stay
    with dg.DagsterInstance.from_config(str(sqlite_home)) as instance:
        [record] = materializations(instance, [PARTITION])
        metadata = record.asset_materialization.metadata
        assert "path" not in metadata
        assert metadata["table"].value == "reconciliation_reports"
        assert metadata["report_id"].value == report_rows(pg)[0]["id"]
