"""Shared test setup: offline, one torch thread, and ONE real Prefect server for the whole session.

Every flow a test runs talks to that server (a plain flow call without one would start its own temporary
server each time, 10-20 s apiece). The server gets its own PREFECT_HOME under a temp dir, a free port on 127.0.0.1
and, as in production, a PostgreSQL database of its own (created for the session, dropped after it; see
tests/backends.py). Where PostgreSQL is not reachable it falls back to SQLite and the session header says so; on CI
that fails instead. The server is stopped, with its whole process group, when the session ends.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import backends
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
SHARED_DATA = SHARED / "data"
STORIES = SHARED / "models" / "stories260K"

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["OMP_NUM_THREADS"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"

_server: subprocess.Popen | None = None
_server_dir: tempfile.TemporaryDirectory | None = None
_database: str | None = None  # the session's PostgreSQL database for Prefect's server
_backend = "an outer harness's Prefect server (PREFECT_API_URL)"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_up(url: str, proc: subprocess.Popen, what: str, timeout: float = 120) -> None:
    """Until `url` answers 200, while the server process `proc` lives; raises naming `what` otherwise."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{what} at {url} not up after {timeout} s")


def stop_group(proc: subprocess.Popen, timeout: float = 20) -> None:
    """Stop a server started with start_new_session=True and every process it started (workers, children)."""
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def pytest_configure(config):
    """Start the session's Prefect server before test modules import Prefect, so its settings see the URL."""
    global _server, _server_dir, _database, _backend
    if os.environ.get("PREFECT_API_URL"):
        return  # an outer harness (the end-to-end service test, CI) provides one
    _server_dir = tempfile.TemporaryDirectory(prefix="sftpipe-prefect-")
    home = Path(_server_dir.name)
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_API_HOST": "127.0.0.1",
           "PREFECT_SERVER_API_PORT": str(port)}
    try:
        _database = backends.create_database("sftpipe_prefect")
        env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = backends.database_url(_database, "asyncpg")
        _backend = f"PostgreSQL (database {_database} at {backends.POSTGRES})"
    except Exception as err:  # noqa: BLE001 - unreachable, refused, no such role: all mean "not here"
        try:
            _backend = "SQLite: " + backends.unavailable(f"PostgreSQL at {backends.POSTGRES}", err)
        except backends.BackendMissing as missing:
            pytest.exit(str(missing), returncode=3)
    log = open(home / "server.log", "wb")
    _server = subprocess.Popen(
        [str(Path(sys.executable).parent / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}/api"
    wait_up(f"{url}/health", _server, "prefect server")
    os.environ["PREFECT_API_URL"] = url
    os.environ["PREFECT_HOME"] = str(home)
    os.environ["PREFECT_RESULTS_LOCAL_STORAGE_PATH"] = str(home / "results")
    os.environ.setdefault("SFTPIPE_WORK_DIR", str(home / "work"))  # local copies of s3:// roots, not ~/.cache


def pytest_unconfigure(config):
    if _server is not None and _server.poll() is None:
        try:  # ship buffered run logs before the server goes away
            from prefect.logging.handlers import APILogWorker

            APILogWorker.drain_all(timeout=5)
        except Exception:
            pass
        stop_group(_server)
    if _server_dir is not None:
        _server_dir.cleanup()
    if _database is not None:
        backends.drop_database(_database)


def pytest_report_header(config):
    return f"prefect server: {_backend}"


_mlflow_backend: str | None = None  # set when a test used the session's MLflow server


def pytest_terminal_summary(terminalreporter):
    terminalreporter.write_line(f"prefect server: {_backend}")
    if _mlflow_backend:
        terminalreporter.write_line(f"mlflow server: {_mlflow_backend}")


MLFLOW = ROOT / ".venv-mlflow" / "bin" / "mlflow"


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server from .venv-mlflow (.ci/setup-mlflow) on 127.0.0.1 and a free port, for the
    session: its backend store a fresh PostgreSQL database (dropped afterwards; SQLite where PostgreSQL is not
    reachable, except on CI), its artifacts served by itself from a temp folder. Stopped with its process group."""
    global _mlflow_backend
    if not MLFLOW.exists():
        if backends.on_ci():
            pytest.fail(f"{MLFLOW} is missing: .ci/setup runs .ci/setup-mlflow (CI fails instead of skipping)")
        pytest.skip(f"{MLFLOW} is missing: run bash .ci/setup-mlflow")
    folder = tmp_path_factory.mktemp("mlflow")
    database = None
    try:
        database = backends.create_database("sftpipe_mlflow")
        store, _mlflow_backend = backends.database_url(database, "psycopg2"), f"PostgreSQL (database {database})"
    except Exception as err:  # noqa: BLE001 - unreachable, refused, no such role: all mean "not here"
        try:
            _mlflow_backend = "SQLite: " + backends.unavailable(f"PostgreSQL at {backends.POSTGRES}", err)
        except backends.BackendMissing as missing:
            pytest.fail(str(missing))
        store = f"sqlite:///{folder / 'mlflow.db'}"
    port = free_port()
    log = open(folder / "server.log", "wb")
    proc = subprocess.Popen([str(MLFLOW), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                             "--backend-store-uri", store, "--artifacts-destination", str(folder / "artifacts")],
                            cwd=folder, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        # the first start creates the schema: ~30 s here
        wait_up(f"{url}/health", proc, f"mlflow server (log: {folder / 'server.log'})", timeout=180)
        yield {"uri": url, "backend": _mlflow_backend, "folder": folder}
    finally:
        stop_group(proc, timeout=5)  # uvicorn stops at once; a lingering helper process need not be waited for
        if database is not None:
            backends.drop_database(database)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A local S3 endpoint for s3:// storage roots: moto's standalone server, spoken to over real HTTP by s3fs and
    botocore exactly as AWS would be (there is no network here). Its settings go into os.environ, so workers and
    subprocesses started afterwards reach it too."""
    port = free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2)
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"moto server did not start (exit {proc.poll()})")
            time.sleep(0.3)
    settings = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in settings}
    os.environ.update(settings)
    import fsspec

    fsspec.filesystem("s3").mkdir("sftpipe-test")
    try:
        yield {"endpoint": endpoint, "bucket": "sftpipe-test"}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def s3_root(s3_server):
    """A fresh s3:// storage root for one test."""
    import uuid

    return f"s3://{s3_server['bucket']}/{uuid.uuid4().hex[:12]}"


@pytest.fixture
def make_cfg(tmp_path):
    """A config rooted in the test's tmp dir, with overrides."""
    from tasks.core.config import load_config

    def make(*overrides: str, root: Path | None = None):
        return load_config(None, [f"storage_root={root or tmp_path / 'runs'}", *overrides])

    return make


def run_data_plane(cfg):
    """Ingest → clean → quality → dedup → split as plain functions (no Prefect), returning each stage's result."""
    from tasks.data.clean import run_clean
    from tasks.data.dedup import deduplicate
    from tasks.data.ingest import run_ingest
    from tasks.data.quality import run_quality
    from tasks.data.split import run_split

    ingest = run_ingest(cfg)
    clean = run_clean(cfg, ingest)
    quality = run_quality(cfg, clean)
    dedup = deduplicate(cfg, quality)
    split = run_split(cfg, dedup)
    return {"ingest": ingest, "clean": clean, "quality": quality, "dedup": dedup, "split": split}


def query(cfg, sql: str, params=None):
    from tasks.core.warehouse import open_warehouse

    with open_warehouse(cfg.warehouse_url, read_only=True) as con:
        return con.execute(sql, params or []).fetchall()
