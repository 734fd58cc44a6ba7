"""`make bench-shards`: 1 vs N compare shards through Dagster, on the data set `make bench` loaded.

    python -m benchmarks.bench_shards [--shards 1,2] [--json-out artifacts/bench_shards.json]

For each shard count, one `dagster job execute -j reconciliation_parallel_job` run (multiprocess
executor: every op in its own process, the shards in parallel) of the partition whose window covers
the bench data, as a dry run (reads and compares everything, writes nothing), with `$in` batches
(`mongo_full_scan_ratio` 2: the sorted full pass is for one shard). Prints the run's wall time and
each shard's extract_mongo + diff time, from Dagster's own step stats; a script that prints numbers, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

from benchmarks.bench import BENCH_DB, REPO, bench_pg_url, mongo_uri, say

JOB = "reconciliation_parallel_job"


def partition_for(window_end: datetime) -> str:
    """The hourly Europe/Berlin partition whose window ends at `window_end`."""
    start = (window_end - timedelta(hours=1)).astimezone(ZoneInfo("Europe/Berlin"))
    return start.strftime("%Y-%m-%d-%H:%M")


def run_once(shards: int, partition: str, lookback: int, home: Path, env: dict[str, str], ratio: float) -> dict:
    import dagster as dg

    config = home / f"shards-{shards}.json"
    config.write_text(json.dumps({"resources": {"settings": {"config": {
        "mongo_shards": shards, "mongo_full_scan_ratio": ratio, "dry_run": True, "lookback_hours": lookback,
    }}}}))
    cmd = [sys.executable, "-m", "dagster", "job", "execute", "-m", "reconciliation_pipeline.definitions", "-j", JOB,
           "-c", str(config), "--tags", json.dumps({"dagster/partition": partition})]
    say(f"{shards} shard(s): dagster job execute -j {JOB} (dry run, partition {partition}, lookback {lookback} h)")
    started = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"run failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    with dg.DagsterInstance.from_config(str(home)) as instance:
        [run] = instance.get_runs(limit=1)
        stats = {s.step_key: (s.end_time or 0) - (s.start_time or 0) for s in instance.get_run_step_stats(run.run_id)}
    compare: dict[str, float] = {}
    for k, v in stats.items():  # extract_mongo[shard_i] + diff[shard_i]
        op = k.split(".")[-1]
        if op.startswith(("extract_mongo[", "diff[")):
            shard = op.split("[", 1)[1]
            compare[shard] = compare.get(shard, 0.0) + v
    return {"shards": shards, "wall_seconds": wall, "steps": stats, "compare_steps": compare,
            "compare_wall": max(compare.values()) if compare else None}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", default="1,2", help="shard counts to run, comma-separated")
    ap.add_argument("--full-scan-ratio", type=float, default=2.0, help="the settings' mongo_full_scan_ratio (2: $in batches)")
    ap.add_argument("--json-out", default="artifacts/bench_shards.json")
    args = ap.parse_args()
    dataset = Path(args.json_out).parent / "bench_dataset.json"
    if not dataset.exists():
        raise SystemExit(f"no {dataset}: run `make bench` first (it loads the data set)")
    info = json.loads(dataset.read_text())
    every_row = datetime.fromisoformat(info["window_end"]) + timedelta(hours=1)  # as `make bench`: every row
    # the partition must have ended (Dagster knows no later one): within the hour after loading, the
    # window ends an hour earlier and looks back an hour further
    window_end = min(every_row, datetime.now(timezone.utc).replace(minute=0, second=0, microsecond=0))
    lookback = 49 + int((every_row - window_end) / timedelta(hours=1))
    partition = partition_for(window_end)
    with tempfile.TemporaryDirectory(prefix="bench-shards-") as tmp:
        home = Path(tmp)
        (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
        env = {**os.environ, "DAGSTER_HOME": str(home), "RECON_POSTGRES_URL": bench_pg_url(), "RECON_MONGO_URI": mongo_uri(),
               "RECON_MONGO_DB": BENCH_DB, "PYTHONPATH": str(REPO)}
        results = [run_once(int(n), partition, lookback, home, env, args.full_scan_ratio) for n in args.shards.split(",")]
    Path(args.json_out).write_text(json.dumps({"dataset_emails": info["emails"], "partition": partition, "results": results}, indent=1))
    base = results[0]
    print(f"\n== compare shards through Dagster ({JOB}, multiprocess executor), {info['emails']:,} emails, "
          f"{os.cpu_count()} CPUs, dry run")
    print(f"{'shards':>7}{'run wall s':>12}{'slowest shard s':>26}{'speed-up (run)':>16}   shards (extract_mongo + diff)")
    for r in results:
        ops = ", ".join(f"{v:.1f}" for v in sorted(r["compare_steps"].values()))
        print(f"{r['shards']:>7}{r['wall_seconds']:>12.1f}{r['compare_wall'] or 0:>26.1f}{base['wall_seconds'] / r['wall_seconds']:>15.2f}x   {ops}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
