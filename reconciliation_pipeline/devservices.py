"""Local development services: an embedded PostgreSQL and an ``nx-27017`` MongoDB wire server.

Usage::

    python -m reconciliation_pipeline.devservices up        # start (idempotent), print env lines
    python -m reconciliation_pipeline.devservices env       # print env lines of the running services
    python -m reconciliation_pipeline.devservices status    # human readable; exit 0 iff both are up
    python -m reconciliation_pipeline.devservices down [--purge]

``eval "$(python -m reconciliation_pipeline.devservices up)"`` exports::

    RECON_POSTGRES_URL    postgresql+psycopg://...   (application + pipeline tables, db ``reconciliation``)
    RECON_MONGO_URI       mongodb://127.0.0.1:PORT/?directConnection=true
    RECON_MONGO_DB        client_portal
    DAGSTER_HOME          <state dir>/dagster_home   (gets a copy of the repo's dagster.yaml)
    DAGSTER_POSTGRES_URL  postgresql+psycopg2://...  (Dagster instance storage, db ``dagster``)

State lives in ``$RECON_DEVSERVICES_DIR`` or ``./.devservices``.  PostgreSQL: if
``RECON_POSTGRES_URL`` is already set (and is not the URL of the server we manage ourselves) that
server is used and only the databases are created; otherwise an embedded server is started with
the ``pgserver`` wheel (unix socket only, no TCP), falling back to Debian's
``/usr/lib/postgresql/*/bin`` binaries when pgserver is unusable
(``RECON_DEVSERVICES_PG=pgserver|system`` forces one of them).

Only the standard library, ``pgserver``, ``psycopg`` and (for the readiness ping) ``pymongo``
are used; this module must not import dagster.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import fcntl
import glob
import hashlib
import importlib.util
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import quote, unquote, urlsplit, urlunsplit

ENV_KEYS = (
    "RECON_POSTGRES_URL",
    "RECON_MONGO_URI",
    "RECON_MONGO_DB",
    "DAGSTER_HOME",
    "DAGSTER_POSTGRES_URL",
)
APP_DB = "reconciliation"
DAGSTER_DB = "dagster"
DEFAULT_MONGO_DB = "client_portal"
MONGO_READY_TIMEOUT = 20.0
PG_READY_TIMEOUT = 60.0
STATE_FILE = "state.json"
ENV_FILE_NAME = "env.sh"

_REPO_ROOT = Path(__file__).resolve().parent.parent


class DevServicesError(RuntimeError):
    """A service could not be started / found."""


# --------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------


def _log(msg: str) -> None:
    print(f"[devservices] {msg}", file=sys.stderr, flush=True)


def default_state_dir() -> Path:
    raw = os.environ.get("RECON_DEVSERVICES_DIR") or str(Path.cwd() / ".devservices")
    return Path(raw).expanduser().resolve()


@contextlib.contextmanager
def _locked(state_dir: Path) -> Iterator[None]:
    """Serialise ``up``/``down`` of one state dir across processes (e.g. pytest-xdist workers)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(state_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _read_state(state_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((state_dir / STATE_FILE).read_text())
    except (FileNotFoundError, ValueError):
        return {}


def _write_state(state_dir: Path, state: dict[str, Any]) -> None:
    tmp = state_dir / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, state_dir / STATE_FILE)


def _proc_cmdline(pid: int | None) -> list[str] | None:
    """argv of a live (non-zombie) process, or None."""
    if not pid or pid <= 0:
        return None
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        if Path("/proc/self").exists():
            return None
        try:  # no procfs (not Linux): best effort
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            return []
        return []
    if not raw:  # zombie / kernel thread
        return None
    return [a for a in raw.decode(errors="replace").split("\0") if a]


def _pid_alive(pid: int | None) -> bool:
    return _proc_cmdline(pid) is not None


def _free_port(preferred: int | None = None) -> int:
    if preferred:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", preferred))
                return preferred
            except OSError:
                pass
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:]) or f"({path} is empty)"


# --------------------------------------------------------------------------------------------
# URLs
# --------------------------------------------------------------------------------------------


def _with_driver(url: str, driver: str | None) -> str:
    """``postgresql[+x]://...`` -> ``postgresql+driver://...`` (or plain ``postgresql://`` if None)."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.split("+", 1)[0] not in ("postgresql", "postgres"):
        raise DevServicesError(f"not a PostgreSQL URL: {url!r}")
    return f"postgresql{'+' + driver if driver else ''}://{rest}"


def _with_database(url: str, database: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + quote(database)))


def _database_of(url: str) -> str:
    return unquote(urlsplit(url).path.lstrip("/"))


def _socket_url(driver: str, socket_dir: Path | str, database: str, port: int | None = None) -> str:
    query = "host=" + quote(str(socket_dir), safe="/")
    if port and port != 5432:
        query += f"&port={port}"
    return f"postgresql+{driver}://postgres:@/{database}?{query}"


def _socket_host_in(url: str, directory: Path) -> bool:
    """True if ``url`` connects through a unix socket below ``directory`` (i.e. a server we manage)."""
    from urllib.parse import parse_qs

    for host in parse_qs(urlsplit(url).query).get("host", []):
        if host.startswith("/") and Path(host).resolve().is_relative_to(directory):
            return True
    return False


def _mongo_uri(port: int) -> str:
    return f"mongodb://127.0.0.1:{port}/?directConnection=true"


def format_env(env: dict[str, str]) -> str:
    return "".join(f"export {k}={shlex.quote(env[k])}\n" for k in ENV_KEYS)


# --------------------------------------------------------------------------------------------
# PostgreSQL
# --------------------------------------------------------------------------------------------


def _pg_connect(sa_url: str, timeout: int = 10):
    import psycopg

    return psycopg.connect(_with_driver(sa_url, None), autocommit=True, connect_timeout=timeout)


def _pg_ping(sa_url: str) -> bool:
    try:
        with _pg_connect(sa_url, timeout=3) as conn:
            conn.execute("SELECT 1")
        return True
    except Exception:  # noqa: BLE001 - any failure means "not reachable"
        return False


def _ensure_databases(server_url: str, databases: list[str]) -> None:
    """Create ``databases`` on the server of ``server_url`` when missing."""
    import psycopg
    from psycopg import sql

    last_err: Exception | None = None
    for admin_db in ("postgres", "template1", _database_of(server_url)):
        if not admin_db:
            continue
        try:
            conn = _pg_connect(_with_database(server_url, admin_db))
        except psycopg.OperationalError as err:
            last_err = err
            continue
        with conn:
            for db in dict.fromkeys(databases):
                if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (db,)).fetchone():
                    continue
                try:
                    conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(db)))
                    _log(f"created database {db!r}")
                except (psycopg.errors.DuplicateDatabase, psycopg.errors.UniqueViolation):
                    pass
        return
    raise DevServicesError(f"cannot connect to PostgreSQL at {server_url!r}: {last_err}")


def _pgserver_bin_dir() -> Path | None:
    spec = importlib.util.find_spec("pgserver")
    if spec is None or not spec.origin:
        return None
    return Path(spec.origin).parent / "pginstall" / "bin"


def _system_pg_bin_dir() -> Path | None:
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"),
        key=lambda p: [int(x) if x.isdigit() else 0 for x in Path(p).parent.name.split(".")],
    )
    for cand in reversed(candidates):
        if (Path(cand) / "pg_ctl").exists() and (Path(cand) / "initdb").exists():
            return Path(cand)
    return None


def _read_postmaster_pid(pgdata: Path) -> dict[str, Any] | None:
    """Parse ``postmaster.pid`` if it belongs to a live postmaster of *this* pgdata."""
    try:
        lines = (pgdata / "postmaster.pid").read_text().splitlines()
    except (FileNotFoundError, PermissionError):
        return None
    try:
        pid = int(lines[0])
    except (IndexError, ValueError):
        return None
    cmd = _proc_cmdline(pid)
    if cmd is None or (cmd and not any("postgres" in a for a in cmd[:1])):
        return None
    if cmd and not any(str(pgdata) in a for a in cmd):
        return None
    return {
        "pid": pid,
        "port": int(lines[3]) if len(lines) > 3 and lines[3].strip().isdigit() else 5432,
        "socket_dir": lines[4].strip() if len(lines) > 4 else "",
        "status": lines[7].strip() if len(lines) > 7 else "",
    }


def _clear_stale_postmaster_pid(pgdata: Path) -> None:
    pidfile = pgdata / "postmaster.pid"
    if pidfile.exists() and _read_postmaster_pid(pgdata) is None:
        _log(f"removing stale {pidfile}")
        with contextlib.suppress(OSError):
            pidfile.unlink()


def _wait_postmaster_ready(pgdata: Path, timeout: float = PG_READY_TIMEOUT) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        info = _read_postmaster_pid(pgdata)
        if info is not None and info["status"] == "ready" and info["socket_dir"]:
            return info
        if time.monotonic() > deadline:
            raise DevServicesError(
                f"PostgreSQL in {pgdata} did not become ready within {timeout:.0f}s; "
                f"log tail:\n{_tail(pgdata / 'log')}"
            )
        time.sleep(0.25)


# A unix socket path must fit in sun_path (108 bytes on Linux, incl. the NUL).
_MAX_SOCKET_PATH = 100


def _short_dir(state_dir: Path, suffix: str) -> Path:
    """A short per-state-dir directory under /tmp for sockets when ``state_dir`` is too deep."""
    digest = hashlib.sha256(str(state_dir).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"recon-devservices-{os.geteuid()}-{digest}-{suffix}"


def _runtime_dir(state_dir: Path) -> Path:
    """XDG_RUNTIME_DIR for pgserver (0700).  pgserver puts its socket in pgdata, or, when that
    path is too long for a unix socket, in ``$XDG_RUNTIME_DIR/python_PostgresServer/<hash>``."""
    run_dir = state_dir / "run"
    probe = run_dir / "python_PostgresServer" / ("0" * 10) / ".s.PGSQL.5432"
    if len(str(probe)) > _MAX_SOCKET_PATH:
        run_dir = _short_dir(state_dir, "run")
    if not run_dir.exists():
        run_dir.mkdir(mode=0o700, parents=True)
    return run_dir


def _start_pgserver(state_dir: Path) -> dict[str, Any]:
    """Start (or find) the embedded server via the pgserver wheel; it outlives this process."""
    pgdata = state_dir / "pgdata"
    run_dir = _runtime_dir(state_dir)
    _clear_stale_postmaster_pid(pgdata)

    # pgserver computes its lock/runtime path (platformdirs.user_runtime_path) at import time.
    old_xdg = os.environ.get("XDG_RUNTIME_DIR")
    os.environ["XDG_RUNTIME_DIR"] = str(run_dir)
    try:
        from pgserver import get_server
        from pgserver.postgres_server import PostgresServer

        # pgserver was possibly imported earlier (another state dir / by someone else): point its
        # class-level runtime dir + inter-process lock at this state dir's runtime dir.
        if PostgresServer.runtime_path != run_dir / "python_PostgresServer":
            import fasteners

            PostgresServer.runtime_path = run_dir / "python_PostgresServer"
            PostgresServer.lock_path = PostgresServer.runtime_path / ".lockfile"
            PostgresServer._lock = fasteners.InterProcessLock(PostgresServer.lock_path)
        # get_server() caches handles per pgdata; a cached handle may describe a dead server.
        PostgresServer._instances.pop(pgdata, None)
        try:
            # cleanup_mode=None: no pg_ctl stop at interpreter exit / when the handle goes away.
            srv = get_server(pgdata, cleanup_mode=None)
        except subprocess.TimeoutExpired:
            # pgserver gives pg_ctl only 10 s; a slow first start may still succeed.
            _log("pg_ctl start timed out inside pgserver; waiting for the postmaster ...")
            _wait_postmaster_ready(pgdata)
            srv = get_server(pgdata, cleanup_mode=None)
        info = srv.get_postmaster_info()
        socket_dir = str(info.socket_dir)
        port = info.port or 5432
        system_user = srv.system_user
        # Drop the handle now: its atexit hook would re-take pgserver's lock file (re-creating
        # the runtime dir after `down --purge`) just to do nothing with cleanup_mode=None.
        atexit.unregister(srv._cleanup)
        with contextlib.suppress(Exception):
            srv.global_process_id_list.get_and_remove(os.getpid())
        PostgresServer._instances.pop(pgdata, None)
    finally:
        if old_xdg is None:
            os.environ.pop("XDG_RUNTIME_DIR", None)
        else:
            os.environ["XDG_RUNTIME_DIR"] = old_xdg
    return {
        "mode": "pgserver",
        "pgdata": str(pgdata),
        "bin_dir": str(_pgserver_bin_dir()),
        "os_user": system_user,
        "socket_dir": socket_dir,
        "port": port,
        "runtime_dir": str(run_dir),
    }


def _start_system_postgres(state_dir: Path) -> dict[str, Any]:
    """Fallback: Debian's PostgreSQL binaries, run as the ``postgres`` OS user when we are root."""
    bin_dir = _system_pg_bin_dir()
    if bin_dir is None:
        raise DevServicesError("no /usr/lib/postgresql/*/bin with initdb + pg_ctl found")
    pgdata = state_dir / f"pgdata-system-{bin_dir.parent.name}"
    socket_dir = state_dir / "pgsock"
    if len(str(socket_dir / ".s.PGSQL.5432")) > _MAX_SOCKET_PATH:
        socket_dir = _short_dir(state_dir, "pgsock")
    os_user = "postgres" if os.geteuid() == 0 else None
    pgdata.mkdir(parents=True, exist_ok=True)
    socket_dir.mkdir(parents=True, exist_ok=True)
    if os_user:
        shutil.chown(pgdata, os_user, os_user)
        shutil.chown(socket_dir, os_user, os_user)
    pgdata.chmod(0o700)
    socket_dir.chmod(0o700)
    _clear_stale_postmaster_pid(pgdata)
    if not (pgdata / "PG_VERSION").exists():
        _log(f"initdb {pgdata} ({bin_dir})")
        subprocess.run(
            [str(bin_dir / "initdb"), "-D", str(pgdata), "-U", "postgres", "--auth=trust",
             "--encoding=UTF8", "--no-instructions"],
            check=True, user=os_user, stdout=sys.stderr, stderr=sys.stderr, cwd="/",
        )
    if _read_postmaster_pid(pgdata) is None:
        _log(f"starting PostgreSQL ({bin_dir}) on socket {socket_dir}")
        res = subprocess.run(
            [str(bin_dir / "pg_ctl"), "-D", str(pgdata), "-w", "-t", str(int(PG_READY_TIMEOUT)),
             "-l", str(pgdata / "log"), "-o", f"-h '' -k {shlex.quote(str(socket_dir))}", "start"],
            user=os_user, stdout=sys.stderr, stderr=sys.stderr, cwd="/",
        )
        if res.returncode != 0:
            raise DevServicesError(
                f"pg_ctl start failed for {pgdata}; log tail:\n{_tail(pgdata / 'log')}"
            )
    info = _wait_postmaster_ready(pgdata)
    return {
        "mode": "system",
        "pgdata": str(pgdata),
        "bin_dir": str(bin_dir),
        "os_user": os_user,
        "socket_dir": info["socket_dir"],
        "port": info["port"],
        "runtime_dir": str(socket_dir) if not socket_dir.is_relative_to(state_dir) else None,
    }


def _start_embedded_postgres(state_dir: Path, previous: dict[str, Any]) -> dict[str, Any]:
    forced = os.environ.get("RECON_DEVSERVICES_PG", "").strip().lower()
    prev_mode = previous.get("mode")
    if forced == "system" or (not forced and prev_mode == "system"):
        return _start_system_postgres(state_dir)
    try:
        if importlib.util.find_spec("pgserver") is None:
            raise DevServicesError("the pgserver wheel is not installed")
        return _start_pgserver(state_dir)
    except Exception as err:  # noqa: BLE001
        if forced == "pgserver" or _system_pg_bin_dir() is None:
            raise
        _log(f"pgserver failed ({type(err).__name__}: {err}); falling back to system PostgreSQL binaries")
        return _start_system_postgres(state_dir)


def _stop_embedded_postgres(pg: dict[str, Any]) -> None:
    pgdata = Path(pg["pgdata"])
    info = _read_postmaster_pid(pgdata)
    if info is None:
        return
    _log(f"stopping PostgreSQL (pid {info['pid']}, {pgdata})")
    pg_ctl = Path(pg.get("bin_dir") or "") / "pg_ctl"
    user = pg.get("os_user") if os.geteuid() == 0 else None
    if pg_ctl.exists():
        res = subprocess.run(
            [str(pg_ctl), "-D", str(pgdata), "-m", "fast", "-w", "-t", "60", "stop"],
            user=user, stdout=sys.stderr, stderr=sys.stderr, cwd="/",
        )
        if res.returncode == 0:
            return
    # pg_ctl missing (venv deleted?) or failed: SIGINT = fast shutdown.
    with contextlib.suppress(ProcessLookupError):
        os.kill(info["pid"], signal.SIGINT)
    deadline = time.monotonic() + 30
    while _pid_alive(info["pid"]) and time.monotonic() < deadline:
        time.sleep(0.2)
    if _pid_alive(info["pid"]):
        with contextlib.suppress(ProcessLookupError):
            os.kill(info["pid"], signal.SIGQUIT)


def _postgres_running(pg: dict[str, Any]) -> bool:
    if pg.get("mode") == "external":
        return _pg_ping(pg["url"])
    return _read_postmaster_pid(Path(pg["pgdata"])) is not None


# --------------------------------------------------------------------------------------------
# MongoDB wire server (nx-27017)
# --------------------------------------------------------------------------------------------


def _nx_command() -> list[str]:
    exe = Path(sys.executable).parent / "nx-27017"
    if exe.exists():
        return [str(exe)]
    found = shutil.which("nx-27017")
    if found:
        return [found]
    if importlib.util.find_spec("nx_27017") is None:
        raise DevServicesError("nx-27017 is not installed (pip install nx-27017)")
    return [sys.executable, "-c", "import sys; from nx_27017.nx_27017 import main; sys.exit(main())"]


def _is_nx_process(pid: int | None, data_dir: Path | None = None) -> bool:
    cmd = _proc_cmdline(pid)
    if cmd is None:
        return False
    if not cmd:  # cannot inspect, assume it is ours
        return True
    joined = " ".join(cmd)
    if "nx-27017" not in joined and "nx_27017" not in joined:
        return False
    return data_dir is None or str(data_dir) in cmd


def _mongo_ping(port: int, timeout_ms: int = 1000) -> bool:
    from pymongo import MongoClient

    client = MongoClient(
        _mongo_uri(port), serverSelectionTimeoutMS=timeout_ms, connectTimeoutMS=timeout_ms,
        socketTimeoutMS=max(timeout_ms, 5000),
    )
    try:
        client.admin.command("ping")
        return True
    except Exception:  # noqa: BLE001
        return False
    finally:
        client.close()


def _nx_args(data_dir: Path, port: int, pid_file: Path) -> list[str]:
    # nx-27017 logs both to stderr and to --log-file; we capture stdout/stderr into our log file
    # and send its own copy to /dev/null so every line is written once.
    return _nx_command() + [
        "--data-dir", str(data_dir), "--host", "127.0.0.1", "-p", str(port),
        "--log-file", os.devnull, "--pid-file", str(pid_file),
    ]


def _prepare_nx_files(data_dir: Path, pid_file: Path) -> None:
    data_dir.mkdir(parents=True, exist_ok=True)
    # nx-27017 refuses to start while its pid file names a live process.
    try:
        old_pid = int(pid_file.read_text().strip())
    except (FileNotFoundError, ValueError):
        old_pid = None
    if pid_file.exists() and not _is_nx_process(old_pid):
        pid_file.unlink()


def _wait_mongo(port: int, alive, logs: list[Path], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if not alive():
            raise DevServicesError(
                f"nx-27017 on port {port} exited during startup; log tail:\n"
                + "\n".join(f"--- {p}\n{_tail(p)}" for p in logs)
            )
        if _mongo_ping(port, timeout_ms=500):
            return
        if time.monotonic() > deadline:
            raise DevServicesError(
                f"nx-27017 on port {port} did not answer ping within {timeout:.0f}s; log tail:\n"
                + "\n".join(f"--- {p}\n{_tail(p)}" for p in logs)
            )
        time.sleep(0.2)


def start_mongo_wire_server(
    data_dir: Path,
    port: int | None = None,
    *,
    timeout: float = MONGO_READY_TIMEOUT,
) -> tuple[subprocess.Popen, int]:
    """Start a throw-away nx-27017 wire server as a direct child process.

    Returns ``(proc, port)``; ``proc.kill()`` kills the server itself.  Log/pid files go next to
    ``data_dir`` (``<data_dir>.nx.log``, ``<data_dir>.nx.pid``).
    With ``port=None`` a free loopback port is picked (and re-picked if it got taken meanwhile).
    """
    data_dir = Path(data_dir).resolve()
    log_file = data_dir.with_name(data_dir.name + ".nx.log")
    pid_file = data_dir.with_name(data_dir.name + ".nx.pid")
    attempts = 1 if port else 3
    last_err: Exception | None = None
    for _ in range(attempts):
        p = port or _free_port()
        _prepare_nx_files(data_dir, pid_file)
        with open(log_file, "ab") as out:
            proc = subprocess.Popen(
                _nx_args(data_dir, p, pid_file),
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, close_fds=True,
            )
        try:
            _wait_mongo(p, lambda: proc.poll() is None, [log_file], timeout)
            return proc, p
        except DevServicesError as err:
            last_err = err
            proc.kill()
            proc.wait()
    assert last_err is not None
    raise last_err


def _spawn_detached(argv: list[str], out_file: Path) -> tuple[int, int]:
    """Start ``argv`` in its own session, not as our child (survives us); return (pid, pgid)."""
    launcher = subprocess.run(
        ["/bin/sh", "-c", 'exec_out="$1"; shift; "$@" </dev/null >>"$exec_out" 2>&1 & echo $!',
         "sh", str(out_file), *argv],
        start_new_session=True, stdout=subprocess.PIPE, stderr=sys.stderr, text=True, check=True,
    )
    pid = int(launcher.stdout.strip())
    try:
        pgid = os.getpgid(pid)
    except ProcessLookupError:
        pgid = pid
    return pid, pgid


def _start_service_mongo(state_dir: Path, previous: dict[str, Any]) -> dict[str, Any]:
    data_dir = state_dir / "mongo"
    log_file = state_dir / "mongo.log"
    pid_file = state_dir / "mongo.pid"
    pid = previous.get("pid")
    port = previous.get("port")
    if port and _is_nx_process(pid, data_dir):
        if _mongo_ping(port, timeout_ms=2000):
            return previous
        try:
            _wait_mongo(port, lambda: _is_nx_process(pid, data_dir), [log_file], 5)
            return previous
        except DevServicesError:
            _log(f"nx-27017 pid {pid} is not answering; restarting it")
            _kill_group(previous)
    last_err: Exception | None = None
    for attempt in range(3):
        # Keep the previous port when it is free, so the env stays stable across down/up.
        p = _free_port(port if attempt == 0 else None)
        _prepare_nx_files(data_dir, pid_file)
        _log(f"starting nx-27017 on 127.0.0.1:{p} (data {data_dir})")
        new_pid, pgid = _spawn_detached(_nx_args(data_dir, p, pid_file), log_file)
        info = {"pid": new_pid, "pgid": pgid, "port": p, "data_dir": str(data_dir)}
        try:
            _wait_mongo(p, lambda: _is_nx_process(new_pid, data_dir), [log_file], MONGO_READY_TIMEOUT)
            return info
        except DevServicesError as err:
            last_err = err
            _kill_group(info)
    assert last_err is not None
    raise last_err


def _kill_group(mongo: dict[str, Any], timeout: float = 10.0) -> None:
    pid = mongo.get("pid")
    data_dir = Path(mongo["data_dir"]) if mongo.get("data_dir") else None
    if not _is_nx_process(pid, data_dir):
        return
    pgid = mongo.get("pgid") or pid
    _log(f"stopping nx-27017 (pid {pid})")

    def _signal(sig: int) -> None:
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    _signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _pid_alive(pid):
        _signal(signal.SIGKILL)
        while _pid_alive(pid) and time.monotonic() < deadline + 5:
            time.sleep(0.1)


# The indexes a real deployment must have on the portal (the doctor FAILs without them); the
# pipeline itself never creates them in production.
PORTAL_INDEXES = ("aktenzeichen", "lastName")


def ensure_portal_indexes(uri: str, database: str) -> None:
    """Create the `clients` collection and its aktenzeichen / lastName indexes when missing."""
    from pymongo import MongoClient

    client: Any = MongoClient(uri, serverSelectionTimeoutMS=5000)
    try:
        db = client[database]
        if "clients" not in db.list_collection_names():
            db.create_collection("clients")
        for field in PORTAL_INDEXES:
            db["clients"].create_index([(field, 1)])
    finally:
        client.close()


# --------------------------------------------------------------------------------------------
# Dagster home
# --------------------------------------------------------------------------------------------


def _sync_dagster_home(state_dir: Path) -> Path:
    home = state_dir / "dagster_home"
    home.mkdir(parents=True, exist_ok=True)
    for cand in (Path.cwd() / "dagster.yaml", _REPO_ROOT / "dagster.yaml"):
        if cand.is_file():
            dst = home / "dagster.yaml"
            data = cand.read_bytes()
            if not dst.exists() or dst.read_bytes() != data:
                tmp = home / "dagster.yaml.tmp"
                tmp.write_bytes(data)
                os.replace(tmp, dst)
            break
    else:
        _log("WARNING: no dagster.yaml found in the cwd or the repo root; DAGSTER_HOME has none")
    return home


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------


def ensure_services(state_dir: Path | None = None) -> dict[str, str]:
    """Start whatever is missing and return the five environment variables (does not touch
    ``os.environ``)."""
    state_dir = Path(state_dir).expanduser().resolve() if state_dir else default_state_dir()
    with _locked(state_dir):
        state = _read_state(state_dir)
        prev_pg: dict[str, Any] = state.get("postgres", {})

        # ---- PostgreSQL
        user_url = os.environ.get("RECON_POSTGRES_URL", "").strip()
        user_dagster_url = os.environ.get("DAGSTER_POSTGRES_URL", "").strip()
        managed_urls = {prev_pg.get("url")} if prev_pg.get("mode") != "external" else set()
        if user_url and user_url not in managed_urls and not _socket_host_in(user_url, state_dir):
            app_url = user_url if _database_of(user_url) else _with_database(user_url, APP_DB)
            if (user_dagster_url and user_dagster_url != prev_pg.get("dagster_url")
                    and not _socket_host_in(user_dagster_url, state_dir)):
                dagster_url = user_dagster_url
            else:
                dagster_url = _with_driver(_with_database(app_url, DAGSTER_DB), "psycopg2")
            _log("using the existing PostgreSQL server from RECON_POSTGRES_URL")
            _ensure_databases(app_url, [_database_of(app_url)])
            _ensure_databases(dagster_url, [_database_of(dagster_url)])
            pg = {"mode": "external", "url": app_url, "dagster_url": dagster_url}
        else:
            pg = _start_embedded_postgres(state_dir, prev_pg)
            pg["url"] = _socket_url("psycopg", pg["socket_dir"], APP_DB, pg["port"])
            pg["dagster_url"] = _socket_url("psycopg2", pg["socket_dir"], DAGSTER_DB, pg["port"])
            _ensure_databases(pg["url"], [APP_DB, DAGSTER_DB])
        state["postgres"] = pg
        _write_state(state_dir, state)

        # ---- MongoDB
        state["mongo"] = _start_service_mongo(state_dir, state.get("mongo", {}))
        _write_state(state_dir, state)

        mongo_db = os.environ.get("RECON_MONGO_DB") or DEFAULT_MONGO_DB
        ensure_portal_indexes(_mongo_uri(state["mongo"]["port"]), mongo_db)

        # ---- Dagster home + env
        home = _sync_dagster_home(state_dir)
        env = {
            "RECON_POSTGRES_URL": pg["url"],
            "RECON_MONGO_URI": _mongo_uri(state["mongo"]["port"]),
            "RECON_MONGO_DB": mongo_db,
            "DAGSTER_HOME": str(home),
            "DAGSTER_POSTGRES_URL": pg["dagster_url"],
        }
        state["env"] = env
        _write_state(state_dir, state)
        return env


def services_status(state_dir: Path | None = None) -> dict[str, Any]:
    state_dir = Path(state_dir).resolve() if state_dir else default_state_dir()
    state = _read_state(state_dir)
    pg = state.get("postgres") or {}
    mongo = state.get("mongo") or {}
    pg_up = bool(pg) and _postgres_running(pg)
    mongo_up = bool(mongo) and _is_nx_process(
        mongo.get("pid"), Path(mongo["data_dir"]) if mongo.get("data_dir") else None
    )
    return {"state_dir": str(state_dir), "state": state, "postgres": pg_up, "mongo": mongo_up}


def stop_services(state_dir: Path | None = None, purge: bool = False) -> None:
    state_dir = Path(state_dir).resolve() if state_dir else default_state_dir()
    if not state_dir.exists():
        return
    with _locked(state_dir):
        state = _read_state(state_dir)
        if state.get("mongo"):
            _kill_group(state["mongo"])
        pg = state.get("postgres") or {}
        if pg and pg.get("mode") != "external":
            _stop_embedded_postgres(pg)
        else:
            # No state but a data dir (e.g. state.json lost): still stop what runs there.
            for pgdata in [state_dir / "pgdata", *state_dir.glob("pgdata-system-*")]:
                if not pg and _read_postmaster_pid(pgdata) is not None:
                    bin_dir = _pgserver_bin_dir() if pgdata.name == "pgdata" else (
                        Path("/usr/lib/postgresql") / pgdata.name.rsplit("-", 1)[-1] / "bin")
                    owner = pgdata.owner() if os.geteuid() == 0 else None
                    _stop_embedded_postgres({"pgdata": str(pgdata), "bin_dir": str(bin_dir),
                                             "os_user": owner})
    if purge:
        _log(f"removing {state_dir}")
        shutil.rmtree(state_dir, ignore_errors=True)
        for suffix in ("run", "pgsock"):
            shutil.rmtree(_short_dir(state_dir, suffix), ignore_errors=True)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def _cmd_up(_args: argparse.Namespace) -> int:
    env = ensure_services()
    sys.stdout.write(format_env(env))
    sys.stdout.flush()
    return 0


def _cmd_env(_args: argparse.Namespace) -> int:
    st = services_status()
    env = st["state"].get("env")
    if not env or not (st["postgres"] and st["mongo"]):
        down = [n for n in ("postgres", "mongo") if not st[n]]
        _log(f"services are not up ({', '.join(down) or 'no state'} down in {st['state_dir']}); "
             "run: python -m reconciliation_pipeline.devservices up")
        return 1
    sys.stdout.write(format_env(env))
    return 0


def _cmd_status(_args: argparse.Namespace) -> int:
    st = services_status()
    state = st["state"]
    pg = state.get("postgres") or {}
    mongo = state.get("mongo") or {}
    print(f"state dir : {st['state_dir']}")
    if pg:
        where = pg.get("url") if pg.get("mode") == "external" else f"{pg.get('pgdata')} socket {pg.get('socket_dir')}"
        print(f"postgres  : {'UP' if st['postgres'] else 'DOWN'} ({pg.get('mode')}: {where})")
    else:
        print("postgres  : DOWN (never started)")
    if mongo:
        print(f"mongo     : {'UP' if st['mongo'] else 'DOWN'} (nx-27017 pid {mongo.get('pid')}, "
              f"port {mongo.get('port')}, data {mongo.get('data_dir')})")
    else:
        print("mongo     : DOWN (never started)")
    if st["postgres"] and st["mongo"] and state.get("env"):
        print("env       :")
        sys.stdout.write("".join("  " + line + "\n" for line in format_env(state["env"]).splitlines()))
    return 0 if st["postgres"] and st["mongo"] else 1


def _cmd_down(args: argparse.Namespace) -> int:
    stop_services(purge=args.purge)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m reconciliation_pipeline.devservices",
        description="Local PostgreSQL + MongoDB (nx-27017) for development and tests. "
                    "State dir: $RECON_DEVSERVICES_DIR or ./.devservices",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("up", help="start services (idempotent) and print export lines").set_defaults(func=_cmd_up)
    sub.add_parser("env", help="print export lines of the running services").set_defaults(func=_cmd_env)
    sub.add_parser("status", help="show status; exit 0 iff both services are up").set_defaults(func=_cmd_status)
    p_down = sub.add_parser("down", help="stop services (data is kept)")
    p_down.add_argument("--purge", action="store_true", help="also delete the state directory")
    p_down.set_defaults(func=_cmd_down)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (DevServicesError, subprocess.CalledProcessError, OSError) as err:
        _log(f"ERROR: {err}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
