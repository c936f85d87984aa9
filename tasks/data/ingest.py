"""Ingest: raw files → DuckDB, every row verbatim with provenance, in one transaction per file.

A JSON Lines or Parquet file whose rows all fit a plain layout is read in bulk (bulk_ingest.py: native readers and
DuckDB's JSON functions, no Python object per row). Lines of such a file that are not JSON objects (a truncated
line, a bare string or number) stay on the bulk path too: only they are parsed here one by one and quarantined with
their reason, in the same transaction. Every other file takes the per-line path here: CSV and Parquet
read by DuckDB itself, JSON / JSON Lines parsed with orjson line by line, because DuckDB's JSON reader either fails
the whole file on one bad line or drops it silently (ignore_errors), and here a bad line must be kept and
quarantined with its line number. Both paths write the same rows.
"""

from __future__ import annotations

import errno
import fnmatch
import gzip
import hashlib
import json
import os
import tempfile
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterator, NamedTuple

import duckdb
import orjson
import polars as pl
import pyarrow as pa

from tasks.core import storage
from tasks.core.caching import current_run_id, sha256_text, stage_task
from tasks.core.config import FieldMapping, PipelineConfig
from tasks.core.results import IngestResult
from tasks.core.warehouse import (
    insert_columns,
    open_warehouse,
    record_stage,
    table_fingerprint,
    utcnow,
    zstd_text,
)
from tasks.data import bulk_ingest, formats

SUFFIXES = {".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".parquet": "parquet"}
# Arrow's spelling of sql/schema.sql's chat_message (fields absent from a message are NULL).
TOOL_CALL_TYPE = pa.struct([("id", pa.string()), ("name", pa.string()), ("arguments", pa.string())])
MESSAGE_TYPE = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string()), ("reasoning", pa.string()),
                                   ("tool_calls", pa.list_(TOOL_CALL_TYPE)), ("tool_call_id", pa.string()),
                                   ("name", pa.string())]))


class NothingToIngest(RuntimeError):
    pass


class IngestError(RuntimeError):
    """An unexpected failure while ingesting one file (the message names it)."""


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


def unreadable(url: str, err: OSError) -> tuple[str, str]:
    """(reason, detail) for an input that cannot be opened: symlink_loop or unreadable_file."""
    if storage.is_local(url):
        try:
            os.stat(url)
        except OSError as stat_err:
            err = stat_err if stat_err.errno == errno.ELOOP else err
    if err.errno == errno.ELOOP:
        return "symlink_loop", f"{url}: its symbolic links form a loop"
    return "unreadable_file", f"{url}: {err.strerror or err}"


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
    """A JSON array (one row per element) or object; falls back to JSON Lines, which many .json files are. A
    broken array stays one malformed_json row with the parser's position: its lines are not records."""
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError as err:
        lines = read_json_lines(data)
        if not data.lstrip().startswith(b"[") and len(lines) > 1 and any(r.reason is None for r in lines):
            return FileRead("jsonl", lines)
        if b"\xff" in data or _decode(data)[1]:
            # Not UTF-8 throughout: parse with the offending bytes escaped so the other records survive.
            try:
                doc = json.loads(data.decode("utf-8", "surrogateescape"))
            except json.JSONDecodeError:
                return FileRead("json", [RawRow(1, raw_bytes=data, reason="invalid_utf8", detail=_decode(data)[1])])
            except RecursionError:
                return FileRead("json", reason="too_deep", detail="nested deeper than the JSON parser allows")
        else:
            text = data.decode("utf-8")
            return FileRead("json", [RawRow(1, raw=text, reason="malformed_json", detail=f"whole file: {err}")])
    elements = doc if isinstance(doc, list) else [doc]
    rows = []
    for i, element in enumerate(elements, start=1):
        try:
            raw = json.dumps(element, ensure_ascii=False)
        except RecursionError:
            return FileRead("json", reason="too_deep",
                            detail=f"element {i} is nested deeper than Python's JSON encoder allows (~1000 levels)")
        try:
            raw.encode("utf-8")
            rows.append(RawRow(i, raw=raw, record=element))
        except UnicodeEncodeError:
            rows.append(RawRow(i, raw_bytes=raw.encode("utf-8", "surrogateescape"), reason="invalid_utf8",
                               detail="element holds bytes that are not UTF-8"))
    return FileRead("json", rows)


@contextmanager
def _exact_path(path: Path) -> Iterator[str]:
    """A name for path that DuckDB reads as exactly that file: its readers expand *, ? and [ in a path as a glob,
    so a file named a*.csv would read a.csv and ab.csv. A link with a plain name in a private folder points at it."""
    with tempfile.TemporaryDirectory(prefix="sftpipe-ingest-") as folder:
        link = Path(folder) / ("input" + "".join(s.lower() for s in path.suffixes[-2:]))
        link.symlink_to(path.resolve())
        yield str(link)


def _csv_rejects(con: duckdb.DuckDBPyConnection, data: bytes, n_accepted: int) -> list[tuple[int, RawRow]]:
    """(record ordinal, row) for each line DuckDB rejected, kept verbatim with its line number and the error."""
    rejects = con.execute("SELECT line, any_value(error_type), string_agg(error_message, '; ') FROM csv_rejects "
                          "GROUP BY line ORDER BY line").fetchall()
    lines = data.split(b"\n")
    out = []
    for line, error_type, message in rejects:
        raw = lines[line - 1].rstrip(b"\r") if 0 < line <= len(lines) else b""
        text, bad = _decode(raw)
        reason = "invalid_utf8" if error_type == "INVALID ENCODING" or bad else "malformed_csv"
        row = RawRow(0, raw=text, raw_bytes=None if text is not None else raw, reason=reason,
                     detail=f"line {line}: {error_type.lower()}: {message}")
        out.append((line - 1, row))  # the header is line 1, so (without multi-line cells) record = line - 1
    total = n_accepted + len(out)
    ordinals = [o for o, _ in out]
    if len(set(ordinals)) != len(ordinals) or any(not 0 < o <= total for o in ordinals):
        # Multi-line cells shift lines against records: number the rejects after the accepted rows instead.
        ordinals = list(range(n_accepted + 1, total + 1))
    return [(o, row) for o, (_, row) in zip(ordinals, out)]


def read_csv(path: Path, data: bytes, delimiter: str) -> FileRead:
    """Good rows as JSON objects; a ragged or undecodable line is kept, numbered, with DuckDB's error for it."""
    con = duckdb.connect()
    try:
        with _exact_path(path) as exact:
            rows = con.execute(
                "SELECT to_json(t)::VARCHAR FROM read_csv(?, all_varchar = true, header = true, delim = ?, "
                "store_rejects = true, rejects_table = 'csv_rejects', rejects_scan = 'csv_scans') t",
                [exact, delimiter]).fetchall()
        rejected = _csv_rejects(con, data, len(rows))
    except duckdb.Error as err:
        return FileRead("csv", reason="malformed_csv", detail=str(err).splitlines()[0])
    finally:
        con.close()
    taken = {o for o, _ in rejected}
    numbers = (n for n in range(1, len(rows) + len(rejected) + 1) if n not in taken)
    numbered = [(next(numbers), _json_row(0, r[0])) for r in rows] + rejected
    for n, row in numbered:
        row.row_number = n
    return FileRead("csv", [row for _, row in sorted(numbered, key=lambda x: x[0])])


def read_parquet(path: Path) -> FileRead:
    """Rows as JSON objects. Binary columns are decoded as UTF-8 strictly, as JSON Lines are: a value that is not
    UTF-8 makes its row invalid_utf8 instead of training text with escaped bytes in it."""
    con = duckdb.connect()
    try:
        with _exact_path(path) as exact:
            con.execute(f"CREATE VIEW source AS SELECT * FROM read_parquet('{exact}')")  # a view takes no parameters
            blobs = [name for name, type_, *_ in con.execute("DESCRIBE source").fetchall() if type_ == "BLOB"]
            blobs = ['"' + b.replace('"', '""') + '"' for b in blobs]
            decoded = ", ".join(f"try(decode({b})) AS {b}" for b in blobs)
            undecodable = " OR ".join(f"({b} IS NOT NULL AND try(decode({b})) IS NULL)" for b in blobs)
            raw = [r[0] for r in con.execute("SELECT to_json(t)::VARCHAR FROM source t").fetchall()]
            if blobs:  # scans keep the file's row order (preserve_insertion_order), so the three lists line up
                text = [r[0] for r in con.execute(
                    f"SELECT to_json(t)::VARCHAR FROM (SELECT * REPLACE ({decoded}) FROM source) t").fetchall()]
                bad = [r[0] for r in con.execute(f"SELECT {undecodable} FROM source").fetchall()]
            else:
                text, bad = raw, [False] * len(raw)
    except duckdb.Error as err:
        return FileRead("parquet", reason="malformed_parquet", detail=str(err).splitlines()[0])
    finally:
        con.close()
    return FileRead("parquet", [
        RawRow(i, raw=raw[i - 1], reason="invalid_utf8", detail="a binary column holds bytes that are not UTF-8")
        if bad[i - 1] else _json_row(i, text[i - 1]) for i in range(1, len(raw) + 1)])


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
    if file_type == "csv":
        return read_csv(path, data, csv_delimiter)
    if file_type == "parquet":
        return read_parquet(path)
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
    label: bool | None = None  # feedback rows: the last answer is desirable or not
    reason: str | None = None
    detail: str | None = None


def parse_row(row: RawRow, record: Any, fmt: str | None) -> ParsedRow:
    if row.reason:
        return ParsedRow(reason=row.reason, detail=row.detail)
    try:
        parsed = formats.normalize(record, fmt)
    except formats.RecordError as err:
        return ParsedRow(reason=err.reason, detail=err.detail)
    return ParsedRow(parsed.kind, parsed.messages, parsed.responses,
                     json.dumps(parsed.tools, ensure_ascii=False) if parsed.tools else None, parsed.label)


# ------------------------------------------------------------------ the stage
def _open_input(url: str) -> tuple[Path | None, bytes, str, str, FileRead | None]:
    """(local copy, bytes, content sha256, file id, FileRead when the file cannot be opened)."""
    path = PurePosixPath(url)  # names and patterns come from where the file lives, not from its local copy
    try:
        local = storage.fetch(url)
        data = local.read_bytes()
    except OSError as err:
        # Kept as a quarantined file under its path (it has no content to name it by); once readable it is a new
        # version like any changed file.
        reason, detail = unreadable(url, err)
        read = FileRead(file_type_of(Path(path.name))[0] or "unknown", reason=reason, detail=detail)
        return None, b"", "", sha256_text(url, reason)[:16], read
    content_sha = hashlib.sha256(data).hexdigest()
    # Named by file name and content, not by folder: the same data gives the same row ids (and so the same splits)
    # wherever a checkout or mount puts it. A copy of an ingested file under another folder adds nothing.
    return local, data, content_sha, sha256_text(path.name, content_sha)[:16], None


def _bulk_lines(local: Path, data: bytes) -> pl.DataFrame | None:
    """(row_number, raw) of a plain JSON Lines or Parquet file read natively; None for any other file."""
    file_type, gz = file_type_of(local)
    if file_type == "jsonl":
        try:
            return bulk_ingest.jsonl_lines(gzip.decompress(data) if gz else data)
        except (OSError, EOFError, zlib.error):
            return None
    if file_type == "parquet" and not gz:
        with _exact_path(local) as exact:
            return bulk_ingest.parquet_lines(exact)
    return None


def _try_bulk(con: duckdb.DuckDBPyConnection, url: str, local: Path, data: bytes,
              cfg: PipelineConfig) -> bulk_ingest.BulkFile | None:
    ingest_cfg = cfg.data.ingest
    overridden = any(fmt != "auto" and _matches(url, pattern) for pattern, fmt in ingest_cfg.formats.items())
    if not ingest_cfg.bulk or overridden or file_mapping(url, cfg) is not None or not data or data.isspace():
        return None
    lines = _bulk_lines(local, data)
    return None if lines is None else bulk_ingest.bulk_file(con, lines)


def _insert_read_rows(con: duckdb.DuckDBPyConnection, read: FileRead, records: list[Any], fmt: str | None,
                      file_id: str, run_id: str, seq0: int) -> None:
    """raw_rows and parsed_rows of a file read line by line."""
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
    _insert_parsed(con, row_ids, [parse_row(r, rec, fmt) for r, rec in zip(read.rows, records)])


def _insert_parsed(con: duckdb.DuckDBPyConnection, row_ids: list[str], parsed: list[ParsedRow]) -> None:
    insert_columns(con, "parsed_rows", {
        "row_id": row_ids,
        "kind": pa.array([p.kind for p in parsed], pa.string()),
        "messages": pa.array([p.messages for p in parsed], MESSAGE_TYPE),
        "responses": pa.array([p.responses for p in parsed], pa.list_(pa.string())),
        "tools": pa.array([p.tools for p in parsed], pa.string()),
        "label": pa.array([p.label for p in parsed], pa.bool_()),
        "reason": pa.array([p.reason for p in parsed], pa.string()),
        "detail": pa.array([p.detail for p in parsed], pa.string()),
    })


def _write_file(con: duckdb.DuckDBPyConnection, source_file: list, insert_rows: Callable[[int], None]) -> None:
    """One transaction: the source_files row, then the file's rows (insert_rows gets the last row_seq so far)."""
    # Text written in ZSTD where the file's format has it: DuckDB's default (dictionary / FSST analysis of every
    # string column) made a bulk ingest of 200k rows 2.2x slower, and ZSTD stores the text in half FSST's bytes.
    with zstd_text(con):
        con.begin()
        try:
            seq0 = con.execute("SELECT coalesce(max(row_seq), 0) FROM raw_rows").fetchone()[0]
            con.execute("INSERT INTO source_files VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        source_file + [utcnow()])
            insert_rows(seq0)
            con.commit()
        except BaseException:
            con.rollback()
            raise


def _write_bulk(con: duckdb.DuckDBPyConnection, n_rows: int, write: Callable[[], None]) -> None:
    """Under a bounded buffer pool, for peak memory. A file that needs more room than the bound (long rows, string
    compression) is written again without it; the first try was rolled back whole."""
    try:
        with bulk_ingest.bounded_buffer_pool(con, n_rows):
            write()
    except duckdb.OutOfMemoryException:
        write()


def ingest_file(con: duckdb.DuckDBPyConnection, url: str, run_id: str, cfg: PipelineConfig) -> dict[str, Any]:
    """Ingest one file version in one transaction. Returns what happened (skipped when already ingested). A plain
    JSON Lines or Parquet file is read in bulk (bulk_ingest.py), any other line by line; both write the same rows."""
    path = PurePosixPath(url)
    local, data, content_sha, file_id, read = _open_input(url)
    if con.execute("SELECT 1 FROM source_files WHERE file_id = ?", [file_id]).fetchone():
        return {"path": url, "file_id": file_id, "skipped": True, "rows": 0}

    bulk = None if read else _try_bulk(con, url, local, data, cfg)
    size = len(data)
    if bulk:
        del data  # the rows are held as Arrow now
        read, records, fmt = FileRead(file_type_of(local)[0]), [], bulk.fmt
        # Rows that are not JSON objects are parsed here, one by one, as the per-line path parses them.
        odd_rows = [_json_row(n, raw) for n, raw in bulk.odd.iter_rows()]
    else:
        read = read or read_file(local, data, cfg.data.ingest.csv_delimiter)
        mapping = file_mapping(url, cfg)
        records = [mapped_record(r, mapping) for r in read.rows]
        fmt = file_format(url, [rec for r, rec in zip(read.rows, records) if r.reason is None],
                          cfg.data.ingest.formats) if read.rows else None
    n_rows = bulk.n_rows if bulk else len(read.rows)

    def insert_rows(seq0: int) -> None:
        if bulk:
            bulk_ingest.insert_rows(con, bulk, file_id, run_id, seq0)
            _insert_parsed(con, [f"{file_id}:{r.row_number}" for r in odd_rows],
                           [parse_row(r, r.record, fmt) for r in odd_rows])
        elif read.rows:
            _insert_read_rows(con, read, records, fmt, file_id, run_id, seq0)

    def write() -> None:
        _write_file(con, [file_id, url, source_name(path), content_sha, size, read.file_type, fmt, n_rows,
                          "quarantined" if read.reason else "ingested", read.reason, read.detail, run_id],
                    insert_rows)

    try:
        _write_bulk(con, n_rows, write) if bulk else write()
    finally:
        if bulk:
            bulk_ingest.release(con)
    return {"path": url, "file_id": file_id, "skipped": False, "rows": n_rows, "format": fmt,
            "unreadable_rows": sum(1 for r in (odd_rows if bulk else read.rows) if r.reason),
            "file_reason": read.reason, "bulk": bool(bulk)}


def input_paths(cfg: PipelineConfig) -> list[str]:
    """The configured input files, or the embedded sample data (written on first use) when none are configured."""
    from tasks.data.sample_data import ensure_sample_data

    inputs = cfg.data.ingest.inputs or [ensure_sample_data(cfg.sample_data_url)]
    paths = discover(inputs, cfg)
    if not paths:
        raise NothingToIngest(f"no input files found in {inputs}")
    return paths


def run_ingest(cfg: PipelineConfig, run_id: str = "local") -> IngestResult:
    """Ingest every input file not yet in the warehouse. Fails only when no input yields a usable row."""
    paths = input_paths(cfg)
    started = utcnow()
    with open_warehouse(cfg.warehouse_url) as con:
        files = []
        for p in paths:
            try:
                files.append(ingest_file(con, p, run_id, cfg))
            except Exception as err:
                raise IngestError(f"ingest of {p} failed: {type(err).__name__}: {err}") from err
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
        fingerprint = table_fingerprint(con, "SELECT row_id, kind, messages, responses, tools, label, reason FROM parsed_rows")
        record_stage(con, run_id, "ingest", started, stats)
    return IngestResult(stage="ingest", fingerprint=fingerprint, warehouse=cfg.warehouse_url, stats=stats,
                        files=files)


def input_fingerprint(cfg: PipelineConfig) -> str:
    """Content hash of every input file: the ingest stage's cache key (remote files are fetched when changed)."""
    h = hashlib.sha256()
    for url in input_paths(cfg):
        h.update(url.encode())
        try:
            with open(storage.fetch(url), "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
        except OSError as err:  # ingest quarantines it; the key changes when it becomes readable
            h.update(unreadable(url, err)[0].encode())
    return h.hexdigest()[:16]


@stage_task("ingest", lambda c: {"ingest": c.data.ingest.model_dump(), "warehouse": c.warehouse_url})
def ingest_task(cfg: PipelineConfig, inputs_fingerprint: str, warehouse_id: str) -> IngestResult:
    """Cached on the inputs' content and the warehouse's identity: unchanged files are not even opened."""
    return run_ingest(cfg, current_run_id())
