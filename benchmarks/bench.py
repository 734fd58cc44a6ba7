"""`make bench`: load synthetic data and measure one reconciliation run against its floor.

    python -m benchmarks.bench [--emails N] [--clients N] [--creditors N] [--drift F]
        [--repeats 3] [--skip-load] [--rowwise-sample 10000] [--json-out artifacts/bench.json] [--profile]

Uses the PostgreSQL database `recon_bench` (created on the server of RECON_POSTGRES_URL) and the
MongoDB database `recon_bench` (on RECON_MONGO_URI). Side by side, in one run:

1. the floor: reading exactly the compared fields from both stores with no processing
   (PostgreSQL `COPY (<the window query>) TO STDOUT`; MongoDB a projected `find` of the clients the
   window's emails name, cursor batch size 1000);
2. `reconciliation_job` itself (its graph, IO manager, hooks and checks; `graph_run.run_graph`) for
   the partition of a window covering every row, in process in a fresh subprocess (so its peak RSS
   is the run's), each op measured between its Dagster step events;
3. the diff core alone (`core.diff.diff`) on in-memory frames of all the window's documents at
   once (prepared after the run, outside its timing and peak RSS): pairs per second;
4. the row-by-row approach of the original plan (one `find_one` per email, Python comparison) on a
   sample, extrapolated;
5. a second run with no drift left, which must write nothing to MongoDB;
6. the real path: `dagster job execute` of the same partition in a new process (process start to
   exit, and the report row's start to end), beside the in-process figure of run 2.

Figures go to the JSON file; a table with ratios and the targets goes to stdout; progress to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

BENCH_DB = "recon_bench"
REPO = Path(__file__).resolve().parent.parent
MB = 1024 * 1024
T0 = time.perf_counter()


def say(msg: str) -> None:
    print(f"[bench {time.perf_counter() - T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def _median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, datetime):
        return value.isoformat()
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    return value


# --- services -----------------------------------------------------------------------------------

def bench_pg_url() -> str:
    import sqlalchemy as sa
    from sqlalchemy.engine import make_url

    base = os.environ.get("RECON_POSTGRES_URL")
    if not base:
        raise SystemExit("RECON_POSTGRES_URL is not set: source .devservices/env.sh (or run `make bench`)")
    admin = sa.create_engine(make_url(base).set(database="postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        if not conn.execute(sa.text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": BENCH_DB}).first():
            conn.execute(sa.text(f'CREATE DATABASE "{BENCH_DB}"'))
            say(f"created PostgreSQL database {BENCH_DB}")
    admin.dispose()
    return make_url(base).set(database=BENCH_DB).render_as_string(hide_password=False)


def mongo_uri() -> str:
    uri = os.environ.get("RECON_MONGO_URI")
    if not uri:
        raise SystemExit("RECON_MONGO_URI is not set: source .devservices/env.sh (or run `make bench`)")
    return uri


# --- the floor ----------------------------------------------------------------------------------

def floor_postgres(engine: Any, start: datetime, end: datetime) -> dict[str, float]:
    """COPY (the window query's compared columns) TO STDOUT, bytes discarded."""
    from reconciliation_pipeline.store.postgres import _EMAIL_SELECT

    sql = _EMAIL_SELECT.format(in_window="true") + (
        f" AND created_at >= '{start.isoformat()}'::timestamptz AND created_at < '{end.isoformat()}'::timestamptz"
    )
    raw = engine.raw_connection()
    try:
        cur = raw.driver_connection.cursor()
        t = time.perf_counter()
        rows = nbytes = 0
        with cur.copy(f"COPY ({sql}) TO STDOUT") as copy:
            for block in copy:
                nbytes += len(block)
                rows += bytes(block).count(b"\n")
        elapsed = time.perf_counter() - t
        raw.driver_connection.rollback()
    finally:
        raw.close()
    return {"seconds": elapsed, "rows": rows, "bytes": nbytes}


def concerned_aktenzeichen(engine: Any, start: datetime, end: datetime) -> list[str]:
    """The aktenzeichen the window's emails name (computed outside the timed part)."""
    import sqlalchemy as sa

    with engine.connect() as conn:
        rows = conn.execute(sa.text(
            "SELECT DISTINCT btrim(extracted_data->>'client_aktenzeichen') FROM incoming_emails "
            "WHERE sync_status = 'synced' AND json_typeof(extracted_data) = 'object' "
            "AND strpos(extracted_data::text, '\"debt_amount\"') > 0 AND created_at >= :s AND created_at < :e "
            "AND extracted_data->>'client_aktenzeichen' IS NOT NULL"
        ), {"s": start, "e": end}).scalars().all()
    return [r for r in rows if r]


def floor_mongo(collection: Any, aktenzeichen: list[str], chunk: int = 20_000) -> dict[str, float]:
    """Projected find of the concerned client documents, cursor batch size 1000, nothing else."""
    from reconciliation_pipeline.store.mongo import COMPARED_FIELDS

    t = time.perf_counter()
    docs = 0
    for i in range(0, len(aktenzeichen), chunk):
        for _ in collection.find({"aktenzeichen": {"$in": aktenzeichen[i : i + chunk]}}, COMPARED_FIELDS).batch_size(1000):
            docs += 1
    return {"seconds": time.perf_counter() - t, "documents": docs}


# --- row by row (the original plan) -------------------------------------------------------------

def rowwise(engine: Any, collection: Any, start: datetime, end: datetime, sample: int) -> dict[str, Any]:
    """One find_one per email and a Python comparison, as /work/shared/seed/01-03-PLAN.md describes."""
    import sqlalchemy as sa

    from reconciliation_pipeline.core.amounts import try_cents

    with engine.connect() as conn:
        total = conn.execute(sa.text(
            "SELECT count(*) FROM incoming_emails WHERE sync_status = 'synced' AND created_at >= :s AND created_at < :e"
        ), {"s": start, "e": end}).scalar_one()
    step = max(1, total // max(1, sample))
    t = time.perf_counter()
    with engine.connect() as conn:
        rows = conn.execute(sa.text(
            "SELECT id, from_email, extracted_data::text FROM incoming_emails WHERE sync_status = 'synced' "
            "AND created_at >= :s AND created_at < :e AND id % :k = 0 ORDER BY id LIMIT :n"
        ), {"s": start, "e": end, "k": step, "n": sample}).all()
    outcome: Counter = Counter()
    for _id, from_email, text in rows:
        data = json.loads(text) if text else None
        if not isinstance(data, dict) or "debt_amount" not in data:
            outcome["skipped"] += 1
            continue
        az = data.get("client_aktenzeichen")
        doc = None
        if isinstance(az, str):
            doc = collection.find_one({"aktenzeichen": az.strip()})
        if doc is None and isinstance(data.get("client_name"), str):
            name = data["client_name"]
            last, _, first = name.partition(",") if "," in name else (name.split()[-1], "", " ".join(name.split()[:-1]))
            doc = collection.find_one({"lastName": last.strip(), "firstName": first.strip()})
        if doc is None:
            outcome["client_not_found"] += 1
            continue
        sender = (from_email or "").strip().lower()
        element = next((e for e in doc.get("final_creditor_list") or [] if (e.get("sender_email") or "").lower() == sender), None)
        if element is None:
            element = next((e for e in doc.get("final_creditor_list") or [] if e.get("sender_name") == data.get("creditor_name")), None)
        if element is None:
            outcome["creditor_not_found"] += 1
            continue
        pg_cents, _ = try_cents(data["debt_amount"])
        mongo_cents, _ = try_cents(element.get("creditor_response_amount"))
        outcome["equal" if pg_cents == mongo_cents else "differs"] += 1
    elapsed = time.perf_counter() - t
    per_email = elapsed / max(1, len(rows))
    return {
        "sample": len(rows), "seconds": elapsed, "ms_per_email": per_email * 1000, "window_emails": int(total),
        "extrapolated_seconds": per_email * total, "outcomes": dict(outcome),
    }


# --- the pipeline run (in a fresh subprocess) ---------------------------------------------------

class _RssSampler(threading.Thread):
    """Samples this process's RSS every `interval` seconds; peak per labelled step."""

    def __init__(self, interval: float = 0.02) -> None:
        super().__init__(daemon=True)
        import psutil

        self.process = psutil.Process()
        self.interval = interval
        self.label = "startup"
        self.peaks: dict[str, int] = defaultdict(int)
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            rss = self.process.memory_info().rss
            label = self.label
            if rss > self.peaks[label]:
                self.peaks[label] = rss
            self.stop.wait(self.interval)


class CpuMeter:
    """CPU seconds of this process, of the MongoDB server process and of the PostgreSQL backends serving
    the bench database, plus the 1-minute load average: wall time alone is unreliable on a shared machine."""

    def __init__(self, mongo_uri_: str, pg_database: str = BENCH_DB) -> None:
        import psutil

        self.psutil = psutil
        self.me = psutil.Process()
        self.pg_database = pg_database
        self.mongo = None
        port = _port_of(mongo_uri_)
        try:
            for conn in psutil.net_connections(kind="tcp"):
                if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
                    self.mongo = psutil.Process(conn.pid)
                    break
        except (psutil.Error, OSError):
            self.mongo = None

    def _cpu(self, proc: Any) -> float:
        try:
            t = proc.cpu_times()
            return t.user + t.system
        except Exception:  # noqa: BLE001 - a process that ended counts as nothing
            return 0.0

    def _pg(self) -> dict[int, float]:
        out = {}
        for proc in self.psutil.process_iter(["cmdline"]):
            cmd = " ".join(proc.info.get("cmdline") or [])
            if cmd.startswith("postgres:") and f" {self.pg_database} " in f" {cmd} ":
                out[proc.pid] = self._cpu(proc)
        return out

    def snapshot(self) -> dict[str, Any]:
        return {"wall": time.perf_counter(), "client": self._cpu(self.me),
                "mongo": self._cpu(self.mongo) if self.mongo else None, "pg": self._pg()}

    @staticmethod
    def delta(a: dict[str, Any], b: dict[str, Any]) -> dict[str, float | None]:
        pg = sum(v - a["pg"].get(pid, 0.0) for pid, v in b["pg"].items())
        return {
            "wall": b["wall"] - a["wall"], "client_cpu": b["client"] - a["client"],
            "mongo_server_cpu": None if a["mongo"] is None or b["mongo"] is None else b["mongo"] - a["mongo"],
            "pg_backend_cpu": pg, "load1": os.getloadavg()[0],
        }


def _port_of(uri: str) -> int:
    from pymongo.uri_parser import parse_uri

    host, port = parse_uri(uri)["nodelist"][0]
    return int(port or 27017)


def _command_listener(counts: dict[str, Counter], state: dict[str, str], updates: list[dict]) -> Any:
    from pymongo import monitoring

    class Listener(monitoring.CommandListener):
        def started(self, event: Any) -> None:
            step = state["step"]
            counts[step][event.command_name] += 1
            if event.command_name == "update":
                for u in event.command.get("updates", []):
                    q = u.get("q", {})
                    updates.append({"step": step, "id": str(q.get("_id")), "cas": "$expr" in q})

        def succeeded(self, event: Any) -> None:
            pass

        def failed(self, event: Any) -> None:
            pass

    return Listener()


def _settings_default(name: str, fallback: int) -> int:
    """The default of a ReconciliationSettings field (what the op passes), else `fallback`."""
    try:
        from reconciliation_pipeline.resources import ReconciliationSettings

        field = ReconciliationSettings.model_fields.get(name)
        return int(field.default) if field is not None and isinstance(field.default, int) else fallback
    except Exception:  # noqa: BLE001 - an older or newer settings class
        return fallback


def _high_water_rss() -> int:
    """This process's peak resident set (VmHWM). Not getrusage's ru_maxrss: on Linux that survives
    fork and exec, so a child of the bench (which held the generated data) would report the parent's."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _settings_default_float(name: str, fallback: float) -> float:
    try:
        from reconciliation_pipeline.resources import ReconciliationSettings

        return float(ReconciliationSettings.model_fields[name].default)
    except Exception:  # noqa: BLE001 - an older settings class
        return fallback


def child_run(args: argparse.Namespace) -> int:
    """Run `reconciliation_job` for the bench partition in this process (graph_run), measuring each op;
    then, outside the run's figures, the diff core alone; write the figures to args.child_out."""
    sampler = _RssSampler()
    sampler.start()
    t_import = time.perf_counter()
    import sqlalchemy as sa
    from pymongo import MongoClient, monitoring

    from benchmarks import graph_run
    from reconciliation_pipeline.core import diff as core_diff
    from reconciliation_pipeline.run import diff as diff_step
    from reconciliation_pipeline.run import extract as extract_step
    from reconciliation_pipeline.run.types import RunContext

    import_seconds = time.perf_counter() - t_import
    rss_after_import = sampler.process.memory_info().rss
    log = logging.getLogger("bench.pipeline")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr,
                        format="  [pipeline] %(message)s")

    state = {"step": "setup"}
    commands: dict[str, Counter] = defaultdict(Counter)
    updates: list[dict] = []
    # every MongoClient the run's resources create reports its commands, labelled with the running op
    monitoring.register(_command_listener(commands, state, updates))
    engine = sa.create_engine(args.pg_url)
    start = datetime.fromisoformat(args.window_start)
    end = datetime.fromisoformat(args.window_end)
    meter = CpuMeter(args.mongo_uri)
    keys_per_query = args.mongo_keys_per_query or _settings_default("mongo_keys_per_query", args.mongo_batch)
    settings = {
        "max_repairs": args.max_repairs, "mongo_batch_size": args.mongo_batch, "outbox_batch_size": args.outbox_batch,
        "mongo_keys_per_query": keys_per_query, "mongo_shards": args.shards, "mongo_full_scan_ratio": args.full_scan_ratio,
        "repair_lock_wait_seconds": 5,
    }

    def on_step(name: str) -> None:
        state["step"] = name
        sampler.label = name
        if name != "dagster":
            print(f"  [pipeline] {name} ...", file=sys.stderr, flush=True)

    ran = graph_run.run_graph(
        pg_url=args.pg_url, mongo_uri=args.mongo_uri, mongo_db=args.mongo_db, start=start, end=end, settings=settings,
        snapshot=meter.snapshot, delta=CpuMeter.delta, on_step=on_step, high_water=_high_water_rss, verbose=args.verbose,
    )
    peak_pipeline = _high_water_rss()
    for name, sec in ran["steps"].items():
        c = ran["cpu"][name]
        print(f"  [pipeline] {name}: {sec:.2f}s (client CPU {c['client_cpu']:.2f}s, MongoDB server CPU "
              f"{c['mongo_server_cpu'] or 0:.2f}s, PostgreSQL CPU {c['pg_backend_cpu']:.2f}s)", file=sys.stderr, flush=True)
    with engine.connect() as conn:
        report = conn.execute(sa.text(
            "SELECT records_checked, details FROM reconciliation_reports WHERE id = :r"
        ), {"r": ran["report_id"]}).mappings().one()
    details = report["details"] or {}
    by_kind, by_action = details.get("by_kind", {}), details.get("by_action", {})

    # untimed, after the run's peak RSS was taken: the window's emails and every client document it
    # names as in-memory frames (the run itself never holds them all at once), for the diff core alone
    sampler.label = state["step"] = "diff_core"
    ctx = RunContext(ran["report_id"], ran["run_id"], ran["partition_key"], start, end, True)
    emails = extract_step.extract_postgres(engine, ctx, log=log)
    from reconciliation_pipeline.core.frames import prepare_clients
    from reconciliation_pipeline.store import mongo as mongo_store

    client = MongoClient(args.mongo_uri, tz_aware=True, socketTimeoutMS=600_000)
    docs = []
    for _keys, batch in mongo_store.iter_all_clients(client[args.mongo_db]["clients"], 10_000):
        docs += batch
    core_clients, core_elements = prepare_clients(docs)
    del docs
    options = diff_step.diff_options(ctx, tolerance_cents=0, repair_low_confidence=False)
    core_times = []
    checked = 0
    for _ in range(max(1, args.diff_repeats)):
        t = time.perf_counter()
        _, checked = core_diff.diff(emails, core_clients, core_elements, options)
        core_times.append(time.perf_counter() - t)
        if core_times[0] > 30:  # repeat only while cheap
            break
    sampler.stop.set()
    sampler.join()

    meta = ran["metadata"]
    repair_updates = [u for u in updates if u["step"] == "repair_mongo"]
    outbox_updates = [u for u in updates if u["step"] == "retry_outbox"]
    result = {
        "label": args.label,
        "import_seconds": import_seconds,
        "partition_key": ran["partition_key"],
        "steps": ran["steps"],
        "cpu": ran["cpu"],
        "dagster_between_steps_seconds": ran["dagster_between_steps_seconds"],
        "run_files_left": ran["run_files_left"],
        "mongo_keys_per_query": keys_per_query,
        "total_seconds": ran["total_seconds"],
        "profiled": bool(args.profiled),
        "rss_after_import": rss_after_import,
        "peak_rss": peak_pipeline,
        "peak_rss_after_step": ran["peak_rss_after_step"],
        "sampled_peak_rss_per_step": dict(sampler.peaks),
        "rows": {
            "emails_read": int(len(emails)), "emails_in_window": int(emails["in_window"].sum()),
            "client_documents": int(len(core_clients)), "creditor_elements": int(len(core_elements)),
            "records_checked": int(report["records_checked"]),
        },
        "findings_by_kind": {k: int(v) for k, v in by_kind.items()},
        "actions": {k: int(v) for k, v in by_action.items()},
        "repairable": int(sum(v for k, v in by_action.items() if k != "reported")),
        "repairs_halted": bool(meta.get("repairs_halted", False)),
        "counts": {k: v for k, v in meta.items() if isinstance(v, int) and not isinstance(v, bool)},
        "outbox": {"retried": meta.get("outbox_retried", 0), "succeeded": meta.get("outbox_succeeded", 0),
                   "failed": meta.get("outbox_failed", 0), "deferred": meta.get("outbox_deferred", 0),
                   "dead": meta.get("outbox_dead", 0)},
        "mongo_commands": {k: dict(v) for k, v in commands.items()},
        "repair_writes": {
            "update_statements": len(repair_updates),
            "distinct_clients": len({u["id"] for u in repair_updates}),
            "all_compare_and_swap": all(u["cas"] for u in repair_updates),
            "bulk_write_commands": int(commands["repair_mongo"].get("update", 0)),
        },
        "outbox_writes": {"update_statements": len(outbox_updates), "distinct_clients": len({u["id"] for u in outbox_updates})},
        "diff_core": {"seconds": core_times, "median_seconds": _median(core_times), "pairs": int(checked),
                      "email_rows": int(len(emails)), "elements": int(len(core_elements)),
                      "pairs_per_second": checked / _median(core_times) if core_times else None,
                      "email_rows_per_second": len(emails) / _median(core_times) if core_times else None},
    }
    Path(args.child_out).write_text(json.dumps(_jsonable(result), indent=1))
    client.close()
    engine.dispose()
    return 0


def run_pipeline(args: argparse.Namespace, pg_url: str, start: datetime, end: datetime, label: str,
                 profile_out: Path | None = None) -> dict[str, Any]:
    out = Path(args.json_out).parent / f".pipeline-{label}.json"
    cmd = [
        sys.executable, "-m", "benchmarks.bench", "--child-run",
        "--child-out", str(out), "--pg-url", pg_url, "--mongo-uri", mongo_uri(), "--mongo-db", BENCH_DB,
        "--window-start", start.isoformat(), "--window-end", end.isoformat(), "--label", label,
        "--diff-repeats", str(args.repeats), "--max-repairs", str(args.max_repairs),
        "--mongo-batch", str(args.mongo_batch), "--outbox-batch", str(args.outbox_batch),
        "--shards", str(args.shards), "--full-scan-ratio", str(args.full_scan_ratio),
    ] + (["--mongo-keys-per-query", str(args.mongo_keys_per_query)] if args.mongo_keys_per_query else [])
    cmd += ["--verbose"] if args.verbose else []
    if profile_out is not None:
        cmd.append("--profiled")
        py_spy = Path(sys.executable).parent / "py-spy"
        cmd = [str(py_spy), "record", "--idle", "--rate", "50", "--format", "speedscope", "-o", str(profile_out), "--"] + cmd
    say(f"pipeline run '{label}' in a fresh subprocess" + (" under py-spy" if profile_out else ""))
    wall = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=REPO)
    result = json.loads(out.read_text())
    result["subprocess_wall_seconds"] = time.perf_counter() - wall
    out.unlink()
    return result


# --- profile summary ----------------------------------------------------------------------------

def cli_pipeline(pg_url: str, start: datetime, end: datetime) -> dict[str, Any]:
    """`dagster job execute` of the bench partition with a throwaway DAGSTER_HOME (SQLite instance)."""
    import tempfile

    from benchmarks import graph_run

    with tempfile.TemporaryDirectory(prefix="bench-dagster-home-") as home:
        env = {"DAGSTER_HOME": home, "RECON_POSTGRES_URL": pg_url, "RECON_MONGO_URI": mongo_uri(), "RECON_MONGO_DB": BENCH_DB}
        return graph_run.cli_run(env=env, start=start, end=end, pg_url=pg_url, repo=REPO)


def summarize_speedscope(path: Path, top: int = 25) -> dict[str, Any]:
    """Self and inclusive share of samples per function (file:line of the function), main thread."""
    data = json.loads(path.read_text())
    frames = data["shared"]["frames"]
    profiles = [p for p in data["profiles"] if p.get("type") == "sampled"]
    main = max(profiles, key=lambda p: sum(p["weights"]))
    total = float(sum(main["weights"])) or 1.0

    def key(i: int) -> str:
        f = frames[i]
        file = f.get("file") or "?"
        for marker in ("site-packages/", "reconciliation_pipeline/", "lib/python3.11/"):
            if marker in file:
                file = (marker if marker.startswith("reconciliation") else "") + file.split(marker, 1)[1]
                break
        return f"{f['name']} ({file}:{f.get('line', '?')})"

    self_w: Counter = Counter()
    incl_w: Counter = Counter()
    line_w: Counter = Counter()
    for stack, w in zip(main["samples"], main["weights"]):
        if not stack:
            continue
        self_w[key(stack[-1])] += w
        for k in {key(i) for i in stack}:
            incl_w[k] += w
        # the deepest frame inside the project: where the project spends (or waits)
        for i in reversed(stack):
            if "reconciliation_pipeline/" in (frames[i].get("file") or ""):
                line_w[key(i)] += w
                break
    pct = lambda c: [{"function": k, "share": round(v / total, 4)} for k, v in c.most_common(top)]  # noqa: E731
    return {"samples": int(total), "thread": main.get("name"), "self": pct(self_w), "inclusive": pct(incl_w),
            "deepest_project_frame": pct(line_w)}


# --- the table ----------------------------------------------------------------------------------

def _fmt_s(v: float) -> str:
    return f"{v:8.2f}s"


def _cpu_cols(c: dict[str, Any] | None) -> str:
    if not c:
        return f"{'':>34}"
    return f"{c.get('client_cpu') or 0:10.2f} /{c.get('mongo_server_cpu') or 0:10.2f} /{c.get('pg_backend_cpu') or 0:8.2f}"


def print_table(res: dict[str, Any]) -> None:
    ds, fl, p1, p2, rw = res["dataset"], res["floor"], res["pipeline"], res.get("pipeline_no_drift"), res["rowwise"]
    out = []
    w = out.append
    w("")
    w(f"== reconciliation bench: {ds['emails']:,} emails, {ds['clients']:,} clients x {ds['creditors_per_client']} "
      f"creditors ({ds['creditor_elements']:,} elements, {ds['pairs_with_email']:,} pairs with email), drift {ds.get('drift')}")
    if res.get("load"):
        sec = res["load"]["seconds"]
        w(f"   load: {sec['total']:.1f}s (PostgreSQL {sum(v for k, v in sec.items() if k.startswith('pg_')):.1f}s, "
          f"MongoDB {sec['mongo_insert'] + sec['mongo_index']:.1f}s)")
    w(f"   window [{p1['window'][0]}, {p1['window'][1]}), medians of {res['repeats']} repeats where repeated; "
      f"code {res.get('code')}, {res.get('cpus')} CPUs")
    w("")
    w(f"   load average at start {res.get('load_average_at_start', 0):.1f} on {res.get('cpus')} CPUs"
      + ("  <- SHARED MACHINE: wall times inflated, see the CPU columns" if res.get("load_average_at_start", 0) > (res.get("cpus") or 1) * 0.75 else ""))
    w("")
    w(f"{'':34}{'seconds':>10}{'x floor':>9}   {'CPU s: client / MongoDB srv / PG':>34}   notes")
    fpg, fmo = fl["postgres"]["median_seconds"], fl["mongo"]["median_seconds"]
    ftot = fl["total_seconds"]
    w(f"{'floor  PostgreSQL COPY':34}{_fmt_s(fpg):>10}{'':>9}   {_cpu_cols(fl['postgres']['runs'][-1].get('cpu'))}   "
      f"{fl['postgres']['rows']:,} rows, {fl['postgres']['bytes'] / MB:.0f} MB")
    w(f"{'floor  MongoDB projected find':34}{_fmt_s(fmo):>10}{'':>9}   {_cpu_cols(fl['mongo']['runs'][-1].get('cpu'))}   "
      f"{fl['mongo']['documents']:,} documents ({fl['mongo']['documents'] / fmo:,.0f} docs/s)")
    w(f"{'floor  total':34}{_fmt_s(ftot):>10}{1.0:>8.2f}x")
    for label, p in (("pipeline, run 1 (drift)", p1), ("pipeline, run 2 (no drift)", p2)):
        if not p:
            continue
        w(f"{label}" + ("   [under py-spy]" if p.get("profiled") else ""))
        for name, sec in p["steps"].items():
            note = ""
            if name == "extract_postgres":
                note = f"{sec / fpg:.2f}x the PostgreSQL floor, {p['rows']['emails_read']:,} rows"
            elif name == "extract_mongo":
                cmds = p["mongo_commands"].get(name, {})
                note = f"{sec / fmo:.2f}x the MongoDB floor; {cmds.get('find', 0)} find + {cmds.get('getMore', 0)} getMore"
            elif name == "diff":
                note = f"{p['rows']['records_checked']:,} pairs, {sum(p['findings_by_kind'].values()):,} findings"
            elif name == "route_emails":
                cmds = p["mongo_commands"].get("route_emails", {})
                note = f"name lookups for emails without aktenzeichen: {cmds.get('find', 0)} find + {cmds.get('getMore', 0)} getMore"
            elif name == "retry_outbox":
                note = f"{p['outbox']['succeeded']} delivered, {p['outbox']['failed']} failed ({p['outbox']['dead']} dead)"
            elif name == "repair_mongo":
                rwr = p["repair_writes"]
                note = f"{p['actions'].get('repaired', 0)} repaired; {rwr['update_statements']} CAS updates in {rwr['bulk_write_commands']} bulk_write"
            elif name == "finish_report":
                note = "report row, drift ledger, audit seal and verify, materialization"
            share = sec / p["total_seconds"] if p["total_seconds"] else 0
            w(f"  {name:32}{_fmt_s(sec):>10}{sec / ftot:>8.2f}x   {_cpu_cols(p.get('cpu', {}).get(name))}   "
              f"{share:5.1%} of run; {note}")
        between = p.get("dagster_between_steps_seconds", 0.0)
        w(f"  {'(dagster between ops)':32}{_fmt_s(between):>10}{between / ftot:>8.2f}x   {'':34}   "
          f"{between / p['total_seconds'] if p['total_seconds'] else 0:5.1%} of run; run start/end, IO manager loads, events; "
          f"run files left after success: {p.get('run_files_left')}")
        tot = {k: sum((c.get(k) or 0) for c in p.get("cpu", {}).values()) for k in ("client_cpu", "mongo_server_cpu", "pg_backend_cpu")}
        w(f"  {'total':32}{_fmt_s(p['total_seconds']):>10}{p['total_seconds'] / ftot:>8.2f}x   {_cpu_cols(tot)}   peak RSS "
          f"{p['peak_rss'] / MB:,.0f} MB (after imports {p['rss_after_import'] / MB:,.0f} MB)")
    cli = res.get("cli_run")
    if cli:
        inproc = p2["total_seconds"] if p2 else None
        w(f"{'dagster job execute (run 3)':34}{_fmt_s(cli['process_seconds']):>10}{cli['process_seconds'] / ftot:>8.2f}x   "
          f"{'':34}   process start to exit; report row start to end {cli['report_seconds']:.2f}s"
          + (f"; in-process run 2 {inproc:.2f}s" if inproc else ""))
    dc = p1["diff_core"]
    w(f"{'diff core alone (core.diff.diff)':34}{_fmt_s(dc['median_seconds']):>10}{'':>9}   "
      f"{dc['pairs']:,} pairs -> {dc['pairs_per_second']:,.0f} pairs/s ({dc['email_rows_per_second']:,.0f} email rows/s)")
    w(f"{'row-by-row (plan 01-03), sample':34}{_fmt_s(rw['seconds']):>10}{'':>9}   {rw['sample']:,} emails, "
      f"{rw['ms_per_email']:.2f} ms/email")
    w(f"{'row-by-row extrapolated':34}{_fmt_s(rw['extrapolated_seconds']):>10}{rw['extrapolated_seconds'] / ftot:>8.2f}x   "
      f"{rw['window_emails']:,} emails; pipeline is {res['speedup_vs_rowwise']:.1f}x faster")
    w("")
    w("peak RSS per step (sampled every 20 ms, run 1):  " + ", ".join(
        f"{k} {v / MB:,.0f} MB" for k, v in p1["sampled_peak_rss_per_step"].items()))
    w("")
    w(f"{'target':52}{'measured':>24}   verdict")
    for t in res["targets"]:
        w(f"{t['target']:52}{t['measured']:>24}   {t['verdict']}")
    if res.get("planted_vs_found"):
        w("")
        w(f"{'kind':24}{'planted':>9}{'found':>9}")
        for kind, (planted, found) in res["planted_vs_found"].items():
            w(f"{kind:24}{planted:>9}{found:>9}" + ("" if planted == found else "   <- differs"))
    print("\n".join(out), flush=True)


def evaluate(res: dict[str, Any]) -> list[dict[str, str]]:
    p1, p2, ds = res["pipeline"], res.get("pipeline_no_drift"), res["dataset"]
    ratio = p1["total_seconds"] / res["floor"]["total_seconds"]
    rss = p1["peak_rss"] / MB
    scale = ds["emails"] / 1_000_000
    rss_note = "" if ds["emails"] >= 1_000_000 else f" (at {scale:.2f}M emails)"
    pps = p1["diff_core"]["pairs_per_second"]
    rwr = p1["repair_writes"]
    targets = [
        {"target": "pipeline total <= 1.5x floor", "measured": f"{ratio:.2f}x", "verdict": "met" if ratio <= 1.5 else "NOT MET"},
        {"target": "peak RSS <= 1 GB at 1M emails", "measured": f"{rss:,.0f} MB{rss_note}",
         "verdict": ("met" if rss <= 1024 else "NOT MET") + ("" if ds["emails"] >= 1_000_000 else " (size below 1M)")},
        {"target": "diff core >= 1M pairs/s", "measured": f"{pps:,.0f} pairs/s", "verdict": "met" if pps >= 1_000_000 else "NOT MET"},
        {"target": ">= 20x faster than row-by-row", "measured": f"{res['speedup_vs_rowwise']:.1f}x",
         "verdict": "met" if res["speedup_vs_rowwise"] >= 20 else "NOT MET"},
        {"target": "repairs: one CAS per client via bulk_write",
         "measured": f"{rwr['update_statements']} upd / {rwr['distinct_clients']} clients",
         "verdict": "met" if (rwr["update_statements"] == rwr["distinct_clients"] and rwr["all_compare_and_swap"]
                              and rwr["bulk_write_commands"] <= max(1, -(-rwr["distinct_clients"] // res["mongo_batch"])))
         else "NOT MET"},
    ]
    if p2:
        writes = p2["repair_writes"]["update_statements"] + p2["outbox_writes"]["update_statements"]
        repaired = p2["actions"].get("repaired", 0)
        ok = writes == 0 and repaired == 0 and p2["repairable"] == 0
        targets.append({"target": "second run writes nothing to MongoDB", "measured": f"{repaired} repairs, {writes} updates",
                        "verdict": "met" if ok else "NOT MET"})
    if res.get("planted_vs_found"):
        same = all(a == b for a, b in res["planted_vs_found"].values())
        targets.append({"target": "run 1 finds exactly the planted drift", "measured": "per kind",
                        "verdict": "met" if same else "NOT MET"})
    return targets


# --- main ---------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--emails", type=int, default=1_000_000)
    ap.add_argument("--clients", type=int, default=100_000)
    ap.add_argument("--creditors", type=int, default=10, help="creditors per client")
    ap.add_argument("--drift", type=float, default=0.01)
    ap.add_argument("--outbox", type=int, default=None, help="pending outbox messages (default emails/200)")
    ap.add_argument("--keys", type=int, default=None, help="idempotency keys (default emails/200)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name-only", type=float, default=0.0002, help="share of emails that name the client only by name")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-load", action="store_true", help="reuse the data already in recon_bench")
    ap.add_argument("--rowwise-sample", type=int, default=10_000)
    ap.add_argument("--json-out", default="artifacts/bench.json")
    ap.add_argument("--profile", action="store_true", help="run the drift pipeline under py-spy (artifacts/profile.speedscope.json)")
    ap.add_argument("--no-second-run", action="store_true")
    ap.add_argument("--no-cli-run", action="store_true", help="skip the `dagster job execute` run of the partition")
    ap.add_argument("--max-repairs", type=int, default=10_000_000)
    ap.add_argument("--mongo-batch", type=int, default=500, help="the pipeline's mongo_batch_size (its default)")
    ap.add_argument("--outbox-batch", type=int, default=_settings_default("outbox_batch_size", 1000),
                    help="the pipeline's outbox_batch_size (its default)")
    ap.add_argument("--mongo-keys-per-query", type=int, default=None,
                    help="aktenzeichen per $in read and compare batch (default: the settings' mongo_keys_per_query)")
    ap.add_argument("--shards", type=int, default=1, help="compare shards, run one after the other here (the settings' mongo_shards)")
    ap.add_argument("--full-scan-ratio", type=float, default=_settings_default_float("mongo_full_scan_ratio", 0.5),
                    help="the settings' mongo_full_scan_ratio (above 1: always $in batches)")
    ap.add_argument("--verbose", action="store_true", help="the pipeline's own log lines on stderr")
    # internal: the pipeline subprocess
    ap.add_argument("--child-run", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--child-out", help=argparse.SUPPRESS)
    ap.add_argument("--pg-url", help=argparse.SUPPRESS)
    ap.add_argument("--mongo-uri", help=argparse.SUPPRESS)
    ap.add_argument("--mongo-db", help=argparse.SUPPRESS)
    ap.add_argument("--window-start", help=argparse.SUPPRESS)
    ap.add_argument("--window-end", help=argparse.SUPPRESS)
    ap.add_argument("--label", default="run", help=argparse.SUPPRESS)
    ap.add_argument("--diff-repeats", type=int, default=3, help=argparse.SUPPRESS)
    ap.add_argument("--profiled", action="store_true", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def _git_describe() -> str | None:
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child_run:
        return child_run(args)

    import sqlalchemy as sa
    from pymongo import MongoClient

    json_out = Path(args.json_out)
    json_out.parent.mkdir(parents=True, exist_ok=True)
    dataset_file = json_out.parent / "bench_dataset.json"
    pg_url = bench_pg_url()
    engine = sa.create_engine(pg_url)
    mongo = MongoClient(mongo_uri(), tz_aware=True, socketTimeoutMS=600_000)
    mdb = mongo[BENCH_DB]
    res: dict[str, Any] = {"started_at": datetime.now(timezone.utc), "repeats": args.repeats, "mongo_batch": args.mongo_batch,
                           "code": _git_describe(), "argv": sys.argv[1:], "cpus": os.cpu_count()}

    if args.skip_load:
        if not dataset_file.exists():
            raise SystemExit(f"--skip-load: no {dataset_file}; run once without --skip-load")
        info = json.loads(dataset_file.read_text())
        fresh = False
        say(f"reusing the loaded data set ({info['emails']:,} emails); drift planted at load time may already be repaired")
    else:
        from benchmarks import datagen

        # the bench window ends at window_end + 1h: the last closed hour, so its partition exists
        window_end = datetime.now(timezone.utc).replace(minute=0, second=0, microsecond=0) - timedelta(hours=1)
        outbox = args.outbox if args.outbox is not None else max(20, args.emails // 200)
        keys = args.keys if args.keys is not None else max(20, args.emails // 200)
        say(f"loading {args.emails:,} emails / {args.clients:,} clients x {args.creditors} into {BENCH_DB}")
        info = datagen.generate(
            engine, mdb, emails=args.emails, clients=args.clients, creditors_per_client=args.creditors,
            drift=args.drift, outbox=outbox, keys=keys, window_end=window_end, seed=args.seed, progress=say,
            name_only=args.name_only,
        )
        info["drift"] = args.drift
        dataset_file.write_text(json.dumps(_jsonable(info), indent=1))
        res["load"] = {"seconds": info["seconds"]}
        fresh = True
        say(f"loaded in {info['seconds']['total']:.1f}s; planted {info['planted']}")
    res["dataset"] = _jsonable(info)

    # a window covering every row: [window_end - 48h, window_end + 1h)
    end = datetime.fromisoformat(str(info["window_end"])) + timedelta(hours=1)
    start = end - timedelta(hours=49)

    # 1. the floor
    say("floor: PostgreSQL COPY and MongoDB projected find")
    az = concerned_aktenzeichen(engine, start, end)
    meter = CpuMeter(mongo_uri())
    load_start = os.getloadavg()[0]
    if load_start > (os.cpu_count() or 1) * 0.75:
        say(f"WARNING: load average {load_start:.1f} on {os.cpu_count()} CPUs: other work shares this machine and "
            "its services; wall times will be inflated (CPU seconds are reported too)")
    pg_runs, mongo_runs = [], []
    for i in range(max(1, args.repeats)):
        before = meter.snapshot()
        pg_runs.append(floor_postgres(engine, start, end))
        pg_runs[-1]["cpu"] = CpuMeter.delta(before, meter.snapshot())
        repeat_mongo = i == 0 or mongo_runs[0]["seconds"] < 30  # repeat the MongoDB read only while cheap
        if repeat_mongo:
            before = meter.snapshot()
            mongo_runs.append(floor_mongo(mdb["clients"], az))
            mongo_runs[-1]["cpu"] = CpuMeter.delta(before, meter.snapshot())
        say(f"floor {i + 1}: PostgreSQL {pg_runs[-1]['seconds']:.2f}s ({pg_runs[-1]['rows']:,} rows), "
            + (f"MongoDB {mongo_runs[-1]['seconds']:.2f}s ({mongo_runs[-1]['documents']:,} docs, server CPU "
               f"{mongo_runs[-1]['cpu']['mongo_server_cpu'] or 0:.1f}s, load {mongo_runs[-1]['cpu']['load1']:.1f})"
               if repeat_mongo else "MongoDB not repeated (expensive)"))
    res["floor"] = {
        "postgres": {"runs": pg_runs, "median_seconds": _median([r["seconds"] for r in pg_runs]),
                     "rows": pg_runs[0]["rows"], "bytes": pg_runs[0]["bytes"]},
        "mongo": {"runs": mongo_runs, "median_seconds": _median([r["seconds"] for r in mongo_runs]),
                  "documents": mongo_runs[0]["documents"], "aktenzeichen_queried": len(az)},
    }
    res["floor"]["total_seconds"] = res["floor"]["postgres"]["median_seconds"] + res["floor"]["mongo"]["median_seconds"]
    res["load_average_at_start"] = load_start

    # 4. row by row, on a sample (read-only, before the pipeline changes anything)
    say(f"row-by-row: {args.rowwise_sample:,} emails, one find_one each")
    rw_runs = [rowwise(engine, mdb["clients"], start, end, args.rowwise_sample)]
    while len(rw_runs) < args.repeats and rw_runs[0]["seconds"] < 15:
        rw_runs.append(rowwise(engine, mdb["clients"], start, end, args.rowwise_sample))
    rw = dict(rw_runs[0])
    rw["ms_per_email"] = _median([r["ms_per_email"] for r in rw_runs])
    rw["seconds"] = _median([r["seconds"] for r in rw_runs])
    rw["extrapolated_seconds"] = rw["ms_per_email"] / 1000 * rw["window_emails"]
    rw["repeats"] = len(rw_runs)
    res["rowwise"] = rw
    say(f"row-by-row: {rw['ms_per_email']:.2f} ms/email -> {rw['extrapolated_seconds']:.0f}s for {rw['window_emails']:,} emails")

    # 2. + 3. the pipeline (with drift), diff core inside the same subprocess
    profile_out = json_out.parent / "profile.speedscope.json" if args.profile else None
    p1 = run_pipeline(args, pg_url, start, end, "drift", profile_out)
    p1["window"] = [start.isoformat(), end.isoformat()]
    res["pipeline"] = p1
    if profile_out is not None and profile_out.exists():
        res["profile"] = {"file": str(profile_out), **summarize_speedscope(profile_out)}
    # 5. the second run: nothing left to repair
    if not args.no_second_run:
        p2 = run_pipeline(args, pg_url, start, end, "no_drift")
        p2["window"] = p1["window"]
        res["pipeline_no_drift"] = p2
    # 6. the real path: `dagster job execute` of the same partition (a third run, no drift left)
    if not args.no_cli_run:
        say("dagster job execute of the bench partition (a new process, as an operator runs it)")
        res["cli_run"] = cli_pipeline(pg_url, start, end)
        say(f"dagster job execute: {res['cli_run']['process_seconds']:.2f}s process, "
            f"{res['cli_run']['report_seconds']:.2f}s report row start to end")
    res["speedup_vs_rowwise"] = rw["extrapolated_seconds"] / p1["total_seconds"]
    if fresh:
        res["planted_vs_found"] = {k: [int(v), int(p1["findings_by_kind"].get(k, 0))] for k, v in info["planted"].items()}
    res["targets"] = evaluate(res)
    res["finished_at"] = datetime.now(timezone.utc)
    json_out.write_text(json.dumps(_jsonable(res), indent=1))
    print_table(res)
    if res.get("profile"):
        print("\nprofile (py-spy, main thread incl. idle/waiting): top self time", flush=True)
        for row in res["profile"]["self"][:15]:
            print(f"  {row['share']:6.1%}  {row['function']}")
        print("deepest project frame (where the project's time goes, incl. what it waits on)")
        for row in res["profile"]["deepest_project_frame"][:15]:
            print(f"  {row['share']:6.1%}  {row['function']}")
    say(f"figures written to {json_out}")
    second = res.get("pipeline_no_drift")
    if second is not None:
        wrote = second["repair_writes"]["update_statements"] + second["outbox_writes"]["update_statements"]
        assert second["actions"].get("repaired", 0) == 0 and wrote == 0, "the second run wrote to MongoDB"
    engine.dispose()
    mongo.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
