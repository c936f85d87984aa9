"""The DuckDB warehouse: connecting, schema, and the reads later stages need.

The schema and views live in sql/ (the single home of both); this module only applies them.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
import uuid
from contextlib import contextmanager, suppress
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

import duckdb

from tasks.core import storage
from tasks.core.results import PromotedRun

SQL_DIR = Path(__file__).resolve().parents[2] / "sql"
# The storage format a new warehouse file is written in. DuckDB otherwise writes its own newest format, which older
# DuckDB releases (and the CLI people have installed) refuse to open. With v1.2.0 every DuckDB from 1.2 on reads
# the file, the DuckDB CLI that setup installs (duckdb-cli 1.4, .venv/bin/duckdb) included, and text can be stored
# with ZSTD (v1.0.0 has no ZSTD for strings). Fixed when the file is created: an existing file keeps its format.
# DuckDB's memory limit for warehouse connections (e.g. "2GiB"); unset: DEFAULT_MEMORY_PER_CORE_MIB per core. Past
# the limit DuckDB evicts cached blocks and spills sorts, joins and aggregates to disk instead of growing. DuckDB's
# own default (80 % of RAM) assumes it is alone in the process; ours also holds the stages' polars frames, MinHash
# arrays and models, and at 1M rows DuckDB's block cache alone took dedup from 2.9 to 5.0 GiB (spilling costs it
# ~3 s of 30; benchmarks/README.md).
MEMORY_LIMIT_ENV = "SFTPIPE_DUCKDB_MEMORY_LIMIT"
DEFAULT_MEMORY_PER_CORE_MIB = 512
STORAGE_COMPATIBILITY = "v1.2.0"
LOCK_NOTE_S = 5.0  # a connection waiting for DuckDB's file lock says who holds it this often
_LOCK_HOLDER = re.compile(r"Conflicting lock is held in (.+? \(PID \d+\))")
log = logging.getLogger("sftpipe.warehouse")


def _sql(name: str) -> str:
    return (SQL_DIR / name).read_text(encoding="utf-8")


class WarehouseBusy(storage.StorageBusy):
    """Another process holds the warehouse's write lock for longer than we are willing to wait."""


def _wait_for_file_lock(open_: Callable[[], Any], path: Path, wait_s: float, note=None):
    """open_() until DuckDB's lock on path is free (one writing process per file), saying who holds it every
    LOCK_NOTE_S seconds; WarehouseBusy after wait_s."""
    started = time.monotonic()
    next_note = started + LOCK_NOTE_S
    while True:
        try:
            return open_()
        except duckdb.IOException as err:
            if "lock" not in str(err).lower():
                raise
            now = time.monotonic()
            holder = _LOCK_HOLDER.search(str(err))
            holder = f"process {holder.group(1)}" if holder else "another process"
            if now - started > wait_s:
                raise WarehouseBusy(f"warehouse {path} is locked by {holder} (another pipeline run?); "
                                    f"waited {wait_s:.0f} s: {err}") from None
            if now >= next_note:
                (note or log.warning)(f"waiting for warehouse {path}: {holder} holds its lock "
                                      f"({now - started:.0f} s so far, giving up after {wait_s:.0f} s)")
                next_note = now + LOCK_NOTE_S
            time.sleep(1.0)


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity where the platform has one, e.g. a container's share)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def memory_limit() -> str:
    """DuckDB's memory limit for warehouse connections: SFTPIPE_DUCKDB_MEMORY_LIMIT, or 512 MiB per core."""
    return os.environ.get(MEMORY_LIMIT_ENV) or f"{DEFAULT_MEMORY_PER_CORE_MIB * usable_cores()}MiB"


def connect(path: str | Path, read_only: bool = False, wait_s: float = 600.0) -> duckdb.DuckDBPyConnection:
    """Open (creating if needed) the warehouse with schema and views applied.

    DuckDB allows one writing process per file; a second pipeline run waits for the lock up to `wait_s`
    seconds and then fails with a message naming the file, instead of corrupting anything.
    """
    path = Path(path)
    if not read_only:
        path.parent.mkdir(parents=True, exist_ok=True)
    config = {"storage_compatibility_version": STORAGE_COMPATIBILITY, "memory_limit": memory_limit()}
    con = _wait_for_file_lock(lambda: duckdb.connect(str(path), read_only=read_only, config=config), path, wait_s)
    if not read_only:
        _rename_clean_rows(con)
        _drop_wide_signatures(con)
        con.execute(_sql("schema.sql"))
        _widen_messages(con)
        con.execute(_sql("views.sql"))
        con.execute(
            "INSERT INTO warehouse_meta VALUES ('warehouse_id', ?) ON CONFLICT DO NOTHING", [uuid.uuid4().hex]
        )
    return con


def stores_zstd(con: duckdb.DuckDBPyConnection) -> bool:
    """Whether the open file's storage format has ZSTD string compression (v1.2.0 on). Forcing ZSTD on an older
    file makes DuckDB write the strings uncompressed instead."""
    tags = con.execute("SELECT tags FROM duckdb_databases() WHERE database_name = current_database()").fetchone()[0]
    version = re.findall(r"\d+", dict(tags or {}).get("storage_version", ""))
    return len(version) >= 2 and (int(version[0]), int(version[1])) >= (1, 2)


@contextmanager
def zstd_text(con: duckdb.DuckDBPyConnection) -> Iterator[None]:
    """Within the block, data DuckDB writes to disk (a commit's rows, a checkpoint) is compressed with ZSTD where the
    file's format has it: half FSST's bytes for text, and no dictionary / FSST analysis of every string column."""
    zstd = stores_zstd(con)
    if zstd:
        con.execute("SET force_compression = 'zstd'")
    try:
        yield
    finally:
        if zstd:
            con.execute("RESET force_compression")


def _rename_clean_rows(con: duckdb.DuckDBPyConnection) -> None:
    """A warehouse from before clean stored each text once has a clean_rows table (every row's turns stored): it
    becomes clean_results, its rows kept, and clean_rows the view over it (views.sql)."""
    if con.execute("SELECT count(*) FROM information_schema.tables WHERE table_schema = 'main' "
                   "AND table_name = 'clean_rows' AND table_type = 'BASE TABLE'").fetchone()[0]:
        con.execute("ALTER TABLE clean_rows RENAME TO clean_results")


def _drop_wide_signatures(con: duckdb.DuckDBPyConnection) -> None:
    """A warehouse from before b-bit signatures keeps 32 or 64 bits a value under a primary key: the table is
    dropped (schema.sql makes the narrow one) and its texts are signed again once, as a change of params would."""
    if con.execute("SELECT count(*) FROM information_schema.columns WHERE table_schema = 'main' AND table_name = "
                   "'minhash_signatures' AND column_name = 'signature' AND data_type <> 'UTINYINT[]'").fetchone()[0]:
        con.execute("DROP TABLE minhash_signatures")


def _widen_messages(con: duckdb.DuckDBPyConnection) -> None:
    """Tables made when a turn was only (role, content) take the wider chat_message type; their rows keep their
    values, the new fields NULL. Only when needed: the ALTER rewrites the column."""
    for table in ("parsed_rows", "clean_results"):
        [(data_type,)] = con.execute("SELECT data_type FROM information_schema.columns WHERE table_schema = 'main' "
                                     "AND table_name = ? AND column_name = 'messages'", [table]).fetchall()
        if "tool_calls" not in data_type:
            con.execute(f"ALTER TABLE {table} ALTER messages TYPE chat_message[]")


@contextmanager
def open_warehouse(url: str | Path, read_only: bool = False,
                   wait_s: float = 600.0) -> Iterator[duckdb.DuckDBPyConnection]:
    """A connection to the warehouse at url, a local path or any fsspec URL (tasks/storage.py).

    Readers get the latest copy. Writers take the warehouse's lease, so one writer at a time across every machine,
    and work on their own copy, which goes back to url when the block ends (for a local warehouse the copy is the
    file itself). Nested writers in one thread share the outer one's copy and lease (remembered in `_writing` for
    as long as the outer block runs); another thread waits for the lease like any other writer. A writer that waits longer than
    wait_s fails with WarehouseBusy naming the holder.
    """
    if read_only:
        con = connect(storage.fetch(url), read_only=True)
        try:
            yield con
        finally:
            con.close()
        return
    with _writable(url, wait_s) as (local, outermost):
        con = connect(local, wait_s=wait_s)
        try:
            yield con
        finally:
            if outermost:
                try:
                    con.execute("CHECKPOINT")  # fold the write-ahead log into the file that goes back to url
                except duckdb.Error:
                    pass  # e.g. a failed transaction still open: closing rolls it back and checkpoints
            con.close()


@contextmanager
def query_connection(url: str | Path, wait_s: float = 600.0, note=None) -> Iterator[duckdb.DuckDBPyConnection]:
    """For ad-hoc SQL (`sftpipe sql`): the latest copy of the warehouse attached read-only, with DuckDB's external
    access switched off once it is attached, so a query reads the warehouse and nothing else (no COPY ... TO a
    file, no read_csv of a local file, no httpfs). DuckDB lets no process read a file while another writes it, so
    this waits for a writer to finish, saying every few seconds who holds the lock (through note, default the log)."""
    local = storage.fetch(url)
    con = duckdb.connect()
    try:
        _wait_for_file_lock(lambda: con.execute(f"ATTACH '{_quoted(local)}' AS warehouse (READ_ONLY)"), local, wait_s,
                            note)
        con.execute("USE warehouse")
        con.execute("SET enable_external_access = false")
        yield con
    finally:
        con.close()


def _quoted(path: Path) -> str:
    return str(path).replace("'", "''")


# (warehouse url, thread) -> the writable copy while its lease is held. Per thread: another thread of this process
# waits for the lease like any other writer.
_writing: dict[tuple[str, int], Path] = {}
_writing_lock = threading.Lock()


@contextmanager
def _writable(url: str | Path, wait_s: float) -> Iterator[tuple[Path, bool]]:
    url = storage.normalize(url)
    key = (url, threading.get_ident())
    with _writing_lock:
        nested = _writing.get(key)
    if nested is not None:
        yield nested, False
        return
    with storage.lease(url, wait_s, what=f"warehouse {url}", error=WarehouseBusy):
        local = storage.private_copy(url)
        with _writing_lock:
            _writing[key] = local
        try:
            yield local, True
        finally:
            with _writing_lock:
                del _writing[key]
            if local.exists():  # committed transactions go back even when the block failed, as they do locally
                if local.with_name(local.name + ".wal").exists() and not storage.is_local(url):
                    raise RuntimeError(f"warehouse copy {local} still has a write-ahead log; not uploading it")
                storage.publish(url, source=local)


def warehouse_id(path: str | Path) -> str:
    """The warehouse's identity (created with it): cache keys include it, so a new warehouse file misses them."""
    sql = "SELECT value FROM warehouse_meta WHERE key = 'warehouse_id'"
    if storage.exists(path):  # the common case: read, without taking the writers' lease
        with open_warehouse(path, read_only=True) as con:
            try:
                row = con.execute(sql).fetchone()
            except duckdb.CatalogException:  # a file from before warehouse_meta existed
                row = None
        if row:
            return row[0]
    with open_warehouse(path) as con:  # creates it
        return con.execute(sql).fetchone()[0]


def stream(con: duckdb.DuckDBPyConnection, query: str, batch_rows: int) -> Iterator[Any]:
    """The query's rows as polars frames of at most batch_rows rows, so a stage holds one frame at a time, not the
    table. Read on a cursor of their own (what was committed when the query started), so the caller can write on
    `con`, in its open transaction, between frames."""
    import polars as pl

    reader = con.cursor()
    try:
        for batch in reader.sql(query).to_arrow_reader(batch_rows):
            yield pl.from_arrow(batch)
    finally:
        reader.close()


@contextmanager
def rebuilding(con: duckdb.DuckDBPyConnection, *tables: str) -> Iterator[dict[str, str]]:
    """Rebuild whole tables from batches: yields {table: its staging table}; the caller appends each batch to the
    staging tables, each append committed on its own, and on leaving the block one transaction replaces every
    table's rows with its staging table's and drops the staging tables. Readers see the old rows or all the new ones,
    never a part; an error leaves the tables as they were.

    Why not the batches in one transaction: DuckDB holds a transaction's uncommitted appends in memory, outside its
    memory limit, so clean's 1M rows grew the process by ~0.3 GiB a batch (2.4 → 5.2 GiB) where committed
    appends are on disk; the closing INSERT … SELECT writes whole row groups straight to the file."""
    staged = {table: f"staging_{table}" for table in tables}
    for table, staging in staged.items():  # a crashed run's staging table is replaced
        con.execute(f"CREATE OR REPLACE TABLE {staging} AS FROM {table} LIMIT 0")
    try:
        yield staged
        con.begin()
        try:
            for table, staging in staged.items():
                con.execute(f"DELETE FROM {table}")
                con.execute(f"INSERT INTO {table} BY NAME FROM {staging}")
                con.execute(f"DROP TABLE {staging}")
            con.commit()
        except BaseException:
            con.rollback()
            raise
    finally:
        for staging in staged.values():
            with suppress(duckdb.Error):  # after an error: never hide it behind a failed clean-up
                con.execute(f"DROP TABLE IF EXISTS {staging}")


def table_fingerprint(con: duckdb.DuckDBPyConnection, query: str) -> str:
    """Order-independent content hash of a query's rows: what a stage wrote, for downstream cache keys."""
    count, digest = con.execute(f"SELECT count(*), coalesce(bit_xor(hash(q)), 0) FROM ({query}) q").fetchone()
    return f"{count}-{digest:016x}"


def record_stage(con: duckdb.DuckDBPyConnection, run_id: str, stage: str, started: datetime, stats: dict[str, Any]):
    con.execute(
        "INSERT INTO stage_runs VALUES (?, ?, ?, ?, ?)",
        [run_id, stage, started, utcnow(), json.dumps(stats, default=str)],
    )


def insert_columns(con: duckdb.DuckDBPyConnection, table: str, columns: dict[str, list]) -> None:
    """Bulk insert through Arrow (executemany is row-at-a-time and slow for large batches)."""
    import pyarrow as pa

    batch = pa.table(columns)
    if batch.num_rows:
        con.register("_insert_batch", batch)
        con.execute(f"INSERT INTO {table} ({', '.join(columns)}) SELECT * FROM _insert_batch")
        con.unregister("_insert_batch")


def utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


# ---------------------------------------------------------------- reads for the training / eval planes
def compact_messages(messages: list[dict]) -> list[dict]:
    """Messages without the fields a turn does not have (NULL in the warehouse), as formats.py makes them."""
    return [{k: v for k, v in m.items() if v is not None} for m in messages]


def _split_rows(con: duckdb.DuckDBPyConnection, view: str, columns: list[str], split: str,
                limit: int | None) -> list[dict[str, Any]]:
    """Rows of one split of a training view, in a stable order, their message lists compacted."""
    sql = f"SELECT {', '.join(columns)} FROM {view} WHERE split = ? ORDER BY example_id"
    if limit:
        sql += f" LIMIT {int(limit)}"
    rows = [dict(zip(columns, r)) for r in con.execute(sql, [split]).fetchall()]
    for row in rows:
        for name in ("messages", "prompt"):
            if name in row:
                row[name] = compact_messages(row[name])
    return rows


def sft_examples(con: duckdb.DuckDBPyConnection, split: str, limit: int | None = None) -> list[dict[str, Any]]:
    """[{example_id, source, messages: [{role, content, ...}, ...], tools: JSON text or None}] of one split, in a
    stable order."""
    return _split_rows(con, "sft_examples", ["example_id", "source", "messages", "tools"], split, limit)


def preference_pairs(con: duckdb.DuckDBPyConnection, split: str, limit: int | None = None) -> list[dict[str, Any]]:
    """[{example_id, source, prompt: [{role, content, ...}, ...], chosen: str, rejected: str, tools}] of one split."""
    return _split_rows(con, "preference_pairs", ["example_id", "source", "prompt", "chosen", "rejected", "tools"],
                       split, limit)


def feedback_examples(con: duckdb.DuckDBPyConnection, split: str, limit: int | None = None) -> list[dict[str, Any]]:
    """[{example_id, source, prompt: [{role, content, ...}, ...], completion: str, label: bool, tools}] of one split."""
    return _split_rows(con, "feedback_examples", ["example_id", "source", "prompt", "completion", "label", "tools"],
                       split, limit)


def last_promoted(con, exclude_run: str | None = None) -> PromotedRun | None:
    """The most recently promoted run (other than exclude_run), with its eval_results rows and the promoted
    variant's per-example scores."""
    row = con.execute(
        "SELECT run_id, variant, model_path FROM promotions WHERE decision = 'promoted' AND run_id IS DISTINCT FROM ? "
        "ORDER BY decided_at DESC LIMIT 1", [exclude_run]).fetchone()
    if row is None:
        return None
    run_id, variant, model_path = row
    cols = ["variant", "split", "source", "metric", "value", "n", "examples", "ci_low", "ci_high"]
    rows = [dict(zip(cols, r)) for r in con.execute(
        f"SELECT {', '.join(cols)} FROM eval_results WHERE run_id = ?", [run_id]).fetchall()]
    return PromotedRun(run_id=run_id, variant=variant, model_path=model_path, rows=rows,
                       scores=example_scores(con, run_id, variant))


def example_scores(con, run_id: str, variant: str) -> list[dict]:
    """The per-example scores of one variant of an eval run (eval_example_scores rows)."""
    cols = ["variant", "split", "example_id", "source", "metric", "value", "weight"]
    return [dict(zip(cols, r)) for r in con.execute(
        f"SELECT {', '.join(cols)} FROM eval_example_scores WHERE run_id = ? AND variant = ?",
        [run_id, variant]).fetchall()]
