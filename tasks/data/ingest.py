"""Ingest: raw files → DuckDB, every row verbatim with provenance, in one transaction per file.

CSV and Parquet are read by DuckDB itself. JSON / JSON Lines are parsed with orjson line by line because DuckDB's
JSON reader either fails the whole file on one bad line or drops it silently (ignore_errors), and here a bad line
must be kept and quarantined with its line number.
"""

from __future__ import annotations

import fnmatch
import gzip
import hashlib
import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, NamedTuple

import duckdb
import orjson
import pyarrow as pa

from tasks.core import storage
from tasks.core.caching import current_run_id, sha256_text, stage_task
from tasks.core.config import FieldMapping, PipelineConfig
from tasks.core.warehouse import (
    insert_columns,
    open_warehouse,
    record_stage,
    table_fingerprint,
    utcnow,
)
from tasks.data import formats

SUFFIXES = {".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".parquet": "parquet"}
# Arrow's spelling of sql/schema.sql's chat_message (fields absent from a message are NULL).
TOOL_CALL_TYPE = pa.struct([("id", pa.string()), ("name", pa.string()), ("arguments", pa.string())])
MESSAGE_TYPE = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string()), ("reasoning", pa.string()),
                                   ("tool_calls", pa.list_(TOOL_CALL_TYPE)), ("tool_call_id", pa.string()),
                                   ("name", pa.string())]))


class NothingToIngest(RuntimeError):
    pass


@dataclass
class RawRow:
    row_number: int
    raw: str | None = None
    raw_bytes: bytes | None = None
    record: Any = None
    reason: str | None = None  # set when the row could not be read as JSON
    detail: str | None = None


@dataclass
class FileRead:
    file_type: str
    rows: list[RawRow] = field(default_factory=list)
    reason: str | None = None  # set when the file as a whole could not be read
    detail: str | None = None


def file_type_of(path: Path) -> tuple[str | None, bool]:
    """(json|jsonl|csv|parquet|None, gzipped)."""
    suffixes = [s.lower() for s in path.suffixes]
    gz = bool(suffixes) and suffixes[-1] == ".gz"
    if gz:
        suffixes = suffixes[:-1]
    return (SUFFIXES.get(suffixes[-1]) if suffixes else None), gz


def source_name(path: Path) -> str:
    name = path.name
    for _ in range(2):
        stem, dot, ext = name.rpartition(".")
        if dot and ("." + ext.lower() in SUFFIXES or ext.lower() == "gz"):
            name = stem
    return name


def discover(inputs: list[str], cfg: PipelineConfig | None = None) -> list[str]:
    """Input files as URLs (absolute paths when local): listed files as given, folders searched recursively for
    supported types, sorted. Any fsspec URL works (s3://bucket/raw/); tasks/storage.py fetches each file.

    When a folder holds the storage root, the files under the root (other than the sample data) are skipped: the
    pipeline's own Parquet and JSON outputs must never come back as input. A folder inside the root (runs/raw) is
    read like any other."""
    def own_output(url: str, folder: str) -> bool:
        inside_root = storage.is_under(folder, cfg.root) and folder != cfg.root
        return not inside_root and storage.is_under(url, cfg.root) and not storage.is_under(url, cfg.sample_data_url)

    found: list[str] = []
    for item in inputs:
        url = storage.normalize(item)
        if storage.is_dir(url):
            found += [f for f in storage.find_files(url)
                      if file_type_of(Path(f))[0] and not (cfg and own_output(f, url))]
        elif storage.exists(url):
            found.append(url)
        else:
            raise FileNotFoundError(f"input {item} does not exist")
    return list(dict.fromkeys(found))


# ------------------------------------------------------------------ readers
def _decode(data: bytes) -> tuple[str | None, str | None]:
    try:
        return data.decode("utf-8"), None
    except UnicodeDecodeError as err:
        return None, f"invalid UTF-8 at byte {err.start}: {data[max(0, err.start - 10):err.start + 10]!r}"


def _json_row(n: int, text: str) -> RawRow:
    try:
        return RawRow(n, raw=text, record=orjson.loads(text))
    except orjson.JSONDecodeError as err:
        return RawRow(n, raw=text, reason="malformed_json", detail=str(err))


def read_json_lines(data: bytes) -> list[RawRow]:
    rows = []
    for n, line in enumerate(data.split(b"\n"), start=1):
        line = line.rstrip(b"\r")
        if n == 1 and line.startswith(b"\xef\xbb\xbf"):
            line = line[3:]  # a BOM is not part of the first record
        if not line.strip():
            continue
        text, err = _decode(line)
        rows.append(RawRow(n, raw_bytes=line, reason="invalid_utf8", detail=err) if err else _json_row(n, text))
    return rows


def read_json_document(data: bytes) -> FileRead:
    """A JSON array (one row per element) or object; falls back to JSON Lines, which many .json files are."""
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError as err:
        lines = read_json_lines(data)
        if len(lines) > 1 and any(r.reason is None for r in lines):
            return FileRead("jsonl", lines)
        if b"\xff" in data or _decode(data)[1]:
            # Not UTF-8 throughout: parse with the offending bytes escaped so the other records survive.
            try:
                doc = json.loads(data.decode("utf-8", "surrogateescape"))
            except json.JSONDecodeError:
                return FileRead("json", [RawRow(1, raw_bytes=data, reason="invalid_utf8", detail=_decode(data)[1])])
        else:
            text = data.decode("utf-8")
            return FileRead("json", [RawRow(1, raw=text, reason="malformed_json", detail=f"whole file: {err}")])
    elements = doc if isinstance(doc, list) else [doc]
    rows = []
    for i, element in enumerate(elements, start=1):
        raw = json.dumps(element, ensure_ascii=False)
        try:
            raw.encode("utf-8")
            rows.append(RawRow(i, raw=raw, record=element))
        except UnicodeEncodeError:
            rows.append(RawRow(i, raw_bytes=raw.encode("utf-8", "surrogateescape"), reason="invalid_utf8",
                               detail="element holds bytes that are not UTF-8"))
    return FileRead("json", rows)


def read_with_duckdb(path: Path, file_type: str, csv_delimiter: str) -> FileRead:
    """CSV / Parquet through DuckDB's readers; each row re-emitted as a JSON object."""
    if file_type == "csv":
        source = "read_csv(?, all_varchar = true, header = true, delim = ?)"
        params = [str(path), csv_delimiter]
    else:
        source = "read_parquet(?)"
        params = [str(path)]
    con = duckdb.connect()
    try:
        rows = con.execute(f"SELECT to_json(t)::VARCHAR FROM {source} t", params).fetchall()
    except duckdb.Error as err:
        return FileRead(file_type, reason=f"malformed_{file_type}", detail=str(err).splitlines()[0])
    finally:
        con.close()
    return FileRead(file_type, [_json_row(i, r[0]) for i, r in enumerate(rows, start=1)])


def read_file(path: Path, data: bytes, csv_delimiter: str = ",") -> FileRead:
    file_type, gz = file_type_of(path)
    if file_type is None:
        return FileRead("unknown", reason="unsupported_file_type", detail=f"{path.name}: not one of {sorted(SUFFIXES)}")
    if not data.strip():
        return FileRead(file_type, reason="empty_file", detail="the file has no content")
    if gz:
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as err:
            return FileRead(file_type, reason="corrupt_gzip", detail=str(err))
    if file_type in ("csv", "parquet"):
        return read_with_duckdb(path, file_type, csv_delimiter)
    if file_type == "jsonl":
        return FileRead("jsonl", read_json_lines(data))
    return read_json_document(data)


# ------------------------------------------------------------------ parsing into canonical form
def _matches(url: str, pattern: str) -> bool:
    return fnmatch.fnmatch(url, pattern) or fnmatch.fnmatch(PurePosixPath(url).name, pattern)


def file_mapping(url: str, cfg: PipelineConfig) -> FieldMapping | None:
    """The configured field mapping of a file: the first glob in data.ingest.mappings that matches it."""
    return next((m for pattern, m in cfg.data.ingest.mappings.items() if _matches(url, pattern)), None)


def mapped_record(row: RawRow, mapping: FieldMapping | None) -> Any:
    if mapping is None or row.reason or not isinstance(row.record, dict):
        return row.record
    return formats.apply_mapping(row.record, mapping.columns, mapping.role_key, mapping.content_key, mapping.roles)


def file_format(url: str, records: list[Any], overrides: dict[str, str]) -> str | None:
    for pattern, fmt in overrides.items():
        if fmt != "auto" and _matches(url, pattern):
            return fmt
    return formats.detect_file_format(records)


class ParsedRow(NamedTuple):
    kind: str | None = None
    messages: list | None = None
    responses: list | None = None
    tools: str | None = None  # the function schemas as JSON text
    reason: str | None = None
    detail: str | None = None


def parse_row(row: RawRow, record: Any, fmt: str | None) -> ParsedRow:
    if row.reason:
        return ParsedRow(reason=row.reason, detail=row.detail)
    try:
        kind, msgs, responses, tools = formats.normalize(record, fmt)
    except formats.RecordError as err:
        return ParsedRow(reason=err.reason, detail=err.detail)
    return ParsedRow(kind, msgs, responses, json.dumps(tools, ensure_ascii=False) if tools else None)


# ------------------------------------------------------------------ the stage
def ingest_file(con: duckdb.DuckDBPyConnection, url: str, run_id: str, cfg: PipelineConfig) -> dict[str, Any]:
    """Ingest one file version in one transaction. Returns what happened (skipped when already ingested)."""
    local = storage.fetch(url)
    path = PurePosixPath(url)  # names and patterns come from where the file lives, not from its local copy
    data = local.read_bytes()
    content_sha = hashlib.sha256(data).hexdigest()
    # Named by file name and content, not by folder: the same data gives the same row ids (and so the same splits)
    # wherever a checkout or mount puts it. A copy of an ingested file under another folder adds nothing.
    file_id = sha256_text(path.name, content_sha)[:16]
    if con.execute("SELECT 1 FROM source_files WHERE file_id = ?", [file_id]).fetchone():
        return {"path": url, "file_id": file_id, "skipped": True, "rows": 0}

    read = read_file(local, data, cfg.data.ingest.csv_delimiter)
    mapping = file_mapping(url, cfg)
    records = [mapped_record(r, mapping) for r in read.rows]
    fmt = file_format(url, [rec for r, rec in zip(read.rows, records) if r.reason is None],
                      cfg.data.ingest.formats) if read.rows else None
    now = utcnow()
    con.begin()
    try:
        seq0 = con.execute("SELECT coalesce(max(row_seq), 0) FROM raw_rows").fetchone()[0]
        con.execute(
            "INSERT INTO source_files VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [file_id, url, source_name(path), content_sha, len(data), read.file_type, fmt, len(read.rows),
             "quarantined" if read.reason else "ingested", read.reason, read.detail, run_id, now],
        )
        if read.rows:
            row_ids = [f"{file_id}:{r.row_number}" for r in read.rows]
            insert_columns(con, "raw_rows", {
                "row_id": row_ids,
                "file_id": [file_id] * len(row_ids),
                "row_number": pa.array([r.row_number for r in read.rows], pa.int64()),
                "row_seq": pa.array(range(seq0 + 1, seq0 + 1 + len(row_ids)), pa.int64()),
                "raw": pa.array([r.raw for r in read.rows], pa.string()),
                "raw_bytes": pa.array([r.raw_bytes for r in read.rows], pa.binary()),
                "ingest_run_id": [run_id] * len(row_ids),
            })
            parsed = [parse_row(r, rec, fmt) for r, rec in zip(read.rows, records)]
            insert_columns(con, "parsed_rows", {
                "row_id": row_ids,
                "kind": pa.array([p.kind for p in parsed], pa.string()),
                "messages": pa.array([p.messages for p in parsed], MESSAGE_TYPE),
                "responses": pa.array([p.responses for p in parsed], pa.list_(pa.string())),
                "tools": pa.array([p.tools for p in parsed], pa.string()),
                "reason": pa.array([p.reason for p in parsed], pa.string()),
                "detail": pa.array([p.detail for p in parsed], pa.string()),
            })
        con.commit()
    except BaseException:
        con.rollback()
        raise
    n_bad = sum(1 for r in read.rows if r.reason)
    return {"path": url, "file_id": file_id, "skipped": False, "rows": len(read.rows), "format": fmt,
            "unreadable_rows": n_bad, "file_reason": read.reason}


def input_paths(cfg: PipelineConfig) -> list[str]:
    """The configured input files, or the embedded sample data (written on first use) when none are configured."""
    from tasks.data.sample_data import ensure_sample_data

    inputs = cfg.data.ingest.inputs or [ensure_sample_data(cfg.sample_data_url)]
    paths = discover(inputs, cfg)
    if not paths:
        raise NothingToIngest(f"no input files found in {inputs}")
    return paths


def run_ingest(cfg: PipelineConfig, run_id: str = "local") -> dict[str, Any]:
    """Ingest every input file not yet in the warehouse. Fails only when no input yields a usable row."""
    paths = input_paths(cfg)
    started = utcnow()
    with open_warehouse(cfg.warehouse_url) as con:
        files = [ingest_file(con, p, run_id, cfg) for p in paths]
        usable = con.execute(
            "SELECT count(*) FROM parsed_rows p JOIN raw_rows r USING (row_id) JOIN source_files f USING (file_id) "
            "WHERE p.reason IS NULL AND f.path IN (SELECT unnest(?))", [paths]
        ).fetchone()[0]
        if usable == 0:
            bad = ", ".join(f"{f['path']} ({f.get('file_reason') or 'no valid rows'})" for f in files)
            raise NothingToIngest(f"nothing usable in the inputs: {bad}")
        stats = {
            "files": len(files),
            "new_files": sum(not f["skipped"] for f in files),
            "new_rows": sum(f["rows"] for f in files),
            "warehouse_rows": con.execute("SELECT count(*) FROM raw_rows").fetchone()[0],
        }
        fingerprint = table_fingerprint(con, "SELECT row_id, kind, messages, responses, tools, reason FROM parsed_rows")
        record_stage(con, run_id, "ingest", started, stats)
    return {"stage": "ingest", "fingerprint": fingerprint, "warehouse": cfg.warehouse_url, "stats": stats,
            "files": files}


def input_fingerprint(cfg: PipelineConfig) -> str:
    """Content hash of every input file: the ingest stage's cache key (remote files are fetched when changed)."""
    h = hashlib.sha256()
    for url in input_paths(cfg):
        h.update(url.encode())
        with open(storage.fetch(url), "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


@stage_task("ingest", lambda c: {"ingest": c.data.ingest.model_dump(), "warehouse": c.warehouse_url})
def ingest_task(cfg: PipelineConfig, inputs_fingerprint: str, warehouse_id: str) -> dict[str, Any]:
    """Cached on the inputs' content and the warehouse's identity: unchanged files are not even opened."""
    return run_ingest(cfg, current_run_id())
