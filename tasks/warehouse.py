"""The DuckDB warehouse: connecting, schema, and the reads later stages need.

The schema and views live in sql/ (the single home of both); this module only applies them.
"""

from __future__ import annotations

import json
import time
import uuid
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import duckdb

SQL_DIR = Path(__file__).resolve().parent.parent / "sql"


def _sql(name: str) -> str:
    return (SQL_DIR / name).read_text(encoding="utf-8")


class WarehouseBusy(RuntimeError):
    """Another process holds the warehouse's write lock for longer than we are willing to wait."""


def connect(path: str | Path, read_only: bool = False, wait_s: float = 600.0) -> duckdb.DuckDBPyConnection:
    """Open (creating if needed) the warehouse with schema and views applied.

    DuckDB allows one writing process per file; a second pipeline run waits for the lock up to `wait_s`
    seconds and then fails with a message naming the file, instead of corrupting anything.
    """
    path = Path(path)
    if not read_only:
        path.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            con = duckdb.connect(str(path), read_only=read_only)
            break
        except duckdb.IOException as err:
            if "lock" not in str(err).lower():
                raise
            if time.monotonic() > deadline:
                raise WarehouseBusy(f"warehouse {path} is locked by another process (another pipeline run?); "
                                    f"waited {wait_s:.0f} s: {err}") from None
            time.sleep(1.0)
    if not read_only:
        con.execute(_sql("schema.sql"))
        con.execute(_sql("views.sql"))
        con.execute(
            "INSERT INTO warehouse_meta VALUES ('warehouse_id', ?) ON CONFLICT DO NOTHING", [uuid.uuid4().hex]
        )
    return con


@contextmanager
def open_warehouse(path: str | Path, read_only: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
    con = connect(path, read_only=read_only)
    try:
        yield con
    finally:
        con.close()


def warehouse_id(path: str | Path) -> str:
    """The warehouse's identity (created with it): cache keys include it, so a new warehouse file misses them."""
    with open_warehouse(path) as con:
        return con.execute("SELECT value FROM warehouse_meta WHERE key = 'warehouse_id'").fetchone()[0]


def table_fingerprint(con: duckdb.DuckDBPyConnection, query: str) -> str:
    """Order-independent content hash of a query's rows: what a stage wrote, for downstream cache keys."""
    row = con.execute(f"SELECT count(*), coalesce(bit_xor(hash(q)), 0) FROM ({query}) q").fetchone()
    return f"{row[0]}-{row[1]:016x}"


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
def sft_examples(con: duckdb.DuckDBPyConnection, split: str, limit: int | None = None) -> list[dict[str, Any]]:
    """[{example_id, source, messages: [{role, content}, ...]}] of one split, in a stable order."""
    sql = "SELECT example_id, source, messages FROM sft_examples WHERE split = ? ORDER BY example_id"
    if limit:
        sql += f" LIMIT {int(limit)}"
    cols = ["example_id", "source", "messages"]
    return [dict(zip(cols, r)) for r in con.execute(sql, [split]).fetchall()]


def preference_pairs(con: duckdb.DuckDBPyConnection, split: str, limit: int | None = None) -> list[dict[str, Any]]:
    """[{example_id, source, prompt: [{role, content}, ...], chosen: str, rejected: str}] of one split."""
    sql = "SELECT example_id, source, prompt, chosen, rejected FROM preference_pairs WHERE split = ? ORDER BY example_id"
    if limit:
        sql += f" LIMIT {int(limit)}"
    cols = ["example_id", "source", "prompt", "chosen", "rejected"]
    return [dict(zip(cols, r)) for r in con.execute(sql, [split]).fetchall()]
