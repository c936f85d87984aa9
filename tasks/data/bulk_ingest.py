"""Ingest's bulk happy path: a whole JSON Lines or Parquet file read, validated and put in canonical form by native
readers and DuckDB's JSON functions, without a Python object per row.

It takes a file only when it is certain to give exactly what the per-line path (tasks/data/ingest.py +
formats.py) gives: every row that is a JSON object in one layout the SQL below covers, with the field types and
speakers that layout needs. Rows that are not JSON objects at all (truncated lines, bare strings or arrays) do not
stop it: they are few, carry no records, and the caller quarantines them one by one as the per-line path does. Any
other doubt (an object of another layout, tool calls, content parts, transcripts, a configured mapping or format)
makes bulk_file return None, and the caller reads the whole file line by line instead.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, NamedTuple

import duckdb
import orjson
import polars as pl

from tasks.data import formats

INPUT = "_bulk_input"  # every row of the file
ODD = "_bulk_odd"      # the rows that are not JSON objects (their sequence numbers)
LINES = "_bulk_lines"  # the rest: the rows put in canonical form in SQL
# DuckDB's JSON parser accepts what orjson (the per-line parser) rejects: trailing commas, NaN / Infinity and
# numbers out of double range. Rows that may hold one (this pattern, or a number read as DOUBLE) are parsed by orjson
# too, and one it rejects sends the file down the per-line path.
TRAILING_COMMA = r",[ \t\r\n]*[\]}]"
# Python's str.isspace() characters, so "has non-space text" means what `text.strip()` means in formats.py.
_SPACE = "".join(f"\\x{{{c:x}}}" for c in range(0x10000) if chr(c).isspace())  # none lie beyond the BMP
HAS_TEXT = f"[^{_SPACE}]"
# Speakers that become one plain message; tool roles need call linking, so they stay on the per-line path.
PLAIN_ROLES = {alias: role for alias, role in formats.ROLE_ALIASES.items() if role in ("system", "user", "assistant")}


# ------------------------------------------------------------------ rows as text with their numbers
def jsonl_lines(data: bytes) -> pl.DataFrame | None:
    """(row_number, raw) of each non-blank line, numbered as read_json_lines numbers them; None when a native line
    split could differ from splitting on \\n (bare carriage returns, the separator byte, invalid UTF-8)."""
    crlf = data.count(b"\r\n") if b"\r" in data else 0
    if b"\x01" in data or crlf != data.count(b"\r"):
        return None
    try:
        lines = pl.read_csv(data, has_header=False, separator="\x01", quote_char=None, new_columns=["raw"],
                            infer_schema=False, row_index_name="row_number", row_index_offset=1)
    except (pl.exceptions.PolarsError, UnicodeDecodeError):
        return None
    # Every byte accounted for: the lines' text, one \n between lines (and \r before it in CRLF files), a BOM. A
    # line lost or merged by the reader would break the sum.
    newlines = lines.height - (not data.endswith(b"\n"))
    bom = 3 if data.startswith(b"\xef\xbb\xbf") else 0
    if (lines["raw"].str.len_bytes().sum() or 0) + newlines + crlf + bom != len(data):
        return None
    # Blank lines are skipped but keep their numbers. Only a line not opening with "{" can be blank: the regex
    # runs on those few.
    odd = lines.filter(pl.col("raw").is_null() | ~pl.col("raw").str.starts_with("{"))
    blank = odd.filter(pl.col("raw").is_null() | pl.col("raw").str.contains(r"^[ \t\n\r\x0b\x0c]*$"))["row_number"]
    if len(blank):
        lines = lines.filter(~pl.col("row_number").is_in(blank.implode()))
    return lines.with_columns(pl.col("row_number").cast(pl.Int64))


def parquet_lines(path: str) -> pl.DataFrame | None:
    """(row_number, raw) as read_parquet makes them (each row as DuckDB's JSON); None with binary columns, whose
    UTF-8 check is the per-line path's."""
    con = duckdb.connect()
    try:
        con.execute(f"CREATE VIEW source AS SELECT * FROM read_parquet('{path}')")
        if any(type_ == "BLOB" for _, type_, *_ in con.execute("DESCRIBE source").fetchall()):
            return None
        frame = con.sql("SELECT to_json(t)::VARCHAR AS raw FROM source t").pl()
    except duckdb.Error:
        return None
    finally:
        con.close()
    return frame.with_row_index("row_number", offset=1).with_columns(pl.col("row_number").cast(pl.Int64))


# ------------------------------------------------------------------ which layout
TEXT, TURNS, TURN, BOOL = "text", "turns", "turn", "bool"
# Per layout: the fields it reads and what each must be (None: may be absent or null). Every other field that
# steers detection or normalisation must be absent or null.
LAYOUTS = {
    "alpaca": ("alpaca", {"instruction": TEXT, "output": TEXT}, {"input": TEXT, "system": TEXT}),
    "sharegpt": ("sharegpt", {"conversations": TURNS}, {"system": TEXT}),
    "messages": ("messages", {"messages": TURNS}, {"label": BOOL}),
    "preference_turns": ("preference", {"conversations": TURNS, "chosen": TURN, "rejected": TURN}, {"system": TEXT}),
    "preference_text": ("preference", {"prompt": TEXT, "chosen": TEXT, "rejected": TEXT}, {"system": TEXT}),
}
# Not here: `text` and `completion`, which steer detection only where none of these layouts matches (a rendered
# `text` beside the Alpaca fields, as the original Alpaca release has, is ignored on both paths).
STEERING = {"instruction", "input", "output", "system", "history", "tools", "functions", "conversations", "messages",
            "chosen", "rejected", "chosen_messages", "rejected_messages", "responses", "prompt", "label",
            "question", "query", "response", "answer", "context", "system_prompt",  # Alpaca's other names
            "conversation"}


class Layout(NamedTuple):
    name: str
    fmt: str                           # the file's data_format
    turn_keys: tuple[str, str] | None  # (speaker, text) keys of its turns, all turns alike


def _turn_keys(structure) -> tuple[str, str] | None:
    """(speaker, text) keys of a turn object (or of a list of them, whose structure DuckDB merges) that has exactly
    one plain key pair."""
    if isinstance(structure, list) and len(structure) == 1:
        structure = structure[0]
    if not isinstance(structure, dict):
        return None
    for speaker, text in (("role", "content"), ("from", "value")):
        if set(structure) == {speaker, text} and structure[speaker] == structure[text] == "VARCHAR":
            return speaker, text
    return None


def _is(kind: str, structure) -> bool:
    if kind == TEXT:
        return structure == "VARCHAR"
    if kind == BOOL:
        return structure == "BOOLEAN"
    return _turn_keys(structure) is not None and isinstance(structure, list) == (kind == TURNS)


def _detected(row: dict) -> str | None:
    """formats.detect on a stand-in record: detection reads only the keys and which values are lists."""
    return formats.detect({k: [] if isinstance(v, list) else None for k, v in row.items()})


def _layout_of(row: dict) -> Layout | None:
    """The layout a distinct row structure (json_structure) belongs to; None: not one the bulk path covers."""
    for name, (fmt, required, optional) in LAYOUTS.items():
        fields = {**required, **optional}
        if not all(_is(kind, row.get(key)) for key, kind in required.items()):
            continue
        if any(row.get(key, "NULL") != "NULL" and not _is(kind, row[key]) for key, kind in optional.items()):
            continue
        if any(row[key] != "NULL" for key in row if key in STEERING and key not in fields):
            continue
        keys = {_turn_keys(row[k]) for k, kind in required.items() if kind in (TURNS, TURN)}
        if len(keys) <= 1 and _detected(row) == fmt:
            return Layout(name, fmt, keys.pop() if keys else None)
    return None


def survey(con: duckdb.DuckDBPyConnection) -> Layout | None:
    """The one layout every registered row has, or None. Also None when a row repeats a key (DuckDB reads the first
    of two equal keys, orjson the last) or is JSON only to DuckDB; a row that is not JSON at all fails the query."""
    try:
        structures = [s for (s,) in con.execute(f"SELECT DISTINCT json_structure(raw)::VARCHAR FROM {LINES}").fetchall()]
        unique, commas = con.execute(
            f"SELECT bool_and(len(k) = len(list_distinct(k))), bool_or(comma) FROM "
            f"(SELECT json_keys(raw) AS k, regexp_matches(raw, ?) AS comma FROM {LINES})", [TRAILING_COMMA]).fetchall()[0]
    except duckdb.Error:
        return None
    doubles = [s for s in structures if "DOUBLE" in s]
    if not unique or ((commas or doubles) and not suspects_parse(con, commas, doubles)):
        return None
    layouts = set()
    for structure in structures:
        row = orjson.loads(structure)
        layouts.add(_layout_of(row) if isinstance(row, dict) else None)
    return layouts.pop() if len(layouts) == 1 else None


def suspects_parse(con: duckdb.DuckDBPyConnection, commas: bool, doubles: list[str]) -> bool:
    """Whether orjson accepts every row that DuckDB's more lenient parser may have accepted alone: rows with a
    trailing-comma pattern (when some row has one) and rows of a structure with a DOUBLE in it."""
    where = ([f"regexp_matches(raw, {_str(TRAILING_COMMA)})"] if commas else []) + \
        (["list_contains(?, json_structure(raw)::VARCHAR)"] if doubles else [])
    rows = con.execute(f"SELECT raw FROM {LINES} WHERE {' OR '.join(where)}", [doubles] if doubles else []).fetchall()
    try:
        for (raw,) in rows:
            orjson.loads(raw)
    except orjson.JSONDecodeError:
        return False
    return True


# ------------------------------------------------------------------ canonical rows in SQL
SYSTEM, USER, ASSISTANT = "'system'", "'user'", "'assistant'"


def _str(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _role(speaker: str) -> str:
    """SQL: the canonical role of a speaker, NULL for one that is not a plain system/user/assistant alias."""
    cases = " ".join(f"WHEN {_str(alias)} THEN {_str(role)}" for alias, role in PLAIN_ROLES.items())
    return f"CASE WHEN regexp_matches({speaker}, '^[A-Za-z_]+$') THEN CASE lower({speaker}) {cases} END END"


def _message(role: str, content: str) -> str:
    return (f"{{'role': {role}, 'content': {content}, 'reasoning': NULL::VARCHAR, 'tool_calls': NULL, "
            f"'tool_call_id': NULL::VARCHAR, 'name': NULL::VARCHAR}}::chat_message")


def _all(items: str, test: str) -> str:
    return f"coalesce(list_bool_and(list_transform({items}, lambda x: {test})), true)"


def _turns_columns(field: str, keys: tuple[str, str]) -> tuple[list[str], list[str]]:
    """(columns, certainty tests) for a list of turns: speakers, texts, count; every turn exactly one key pair of
    strings, every speaker a plain alias."""
    base = f"'$.{field}[*]"
    speaker, text = keys
    columns = [f"json_extract_string(raw, {base}.{speaker}') AS {field}_speakers",
               f"json_extract_string(raw, {base}.{text}') AS {field}_texts",
               f"json_type(raw, {base}.{speaker}') AS {field}_speaker_types",
               f"json_type(raw, {base}.{text}') AS {field}_text_types",
               f"json_keys(raw, {base}') AS {field}_keys",
               f"json_array_length(raw, '$.{field}')::BIGINT AS {field}_n"]
    n = f"{field}_n"
    tests = [f"len({field}_speaker_types) = {n}", f"len({field}_text_types) = {n}", f"len({field}_keys) = {n}",
             _all(f"{field}_speaker_types", "x = 'VARCHAR'"), _all(f"{field}_text_types", "x = 'VARCHAR'"),
             _all(f"{field}_keys", "len(x) = 2"), _all(f"{field}_speakers", f"{_role('x')} IS NOT NULL")]
    return columns, tests


def _turns_messages(field: str) -> str:
    return (f"list_transform(generate_series(1, {field}_n), lambda i: "
            f"{_message(_role(f'{field}_speakers[i]'), f'{field}_texts[i]')})")


def _answer_columns(field: str, keys: tuple[str, str]) -> tuple[list[str], list[str]]:
    """A preference answer given as one assistant turn object."""
    speaker, text = keys
    columns = [f"json_extract_string(raw, '$.{field}.{speaker}') AS {field}_speaker",
               f"json_extract_string(raw, '$.{field}.{text}') AS {field}_text",
               f"json_keys(raw, '$.{field}') AS {field}_keys"]
    tests = [f"{_role(f'{field}_speaker')} = 'assistant'", f"{field}_text IS NOT NULL", f"len({field}_keys) = 2"]
    return columns, tests


def _with_system(messages: str) -> str:
    """formats._with_system: a non-empty system field opens the conversation unless it already has a system turn."""
    system = _message(SYSTEM, "system")
    return (f"CASE WHEN coalesce(system, '') <> '' AND NOT coalesce(({messages})[1].role = 'system', false) "
            f"THEN list_prepend({system}, {messages}) ELSE {messages} END")


def _fields(*names: str) -> list[str]:
    """Top-level string fields as columns, read in one parse of the row (a list of paths; DuckDB reuses an alias
    within the select list)."""
    paths = ", ".join(f"'$.{n}'" for n in names)
    return [f"json_extract_string(raw, [{paths}]) AS fields_{'_'.join(names)}",
            *(f"fields_{'_'.join(names)}[{i}] AS {n}" for i, n in enumerate(names, start=1))]


def layout_sql(layout: Layout) -> tuple[list[str], list[str], dict[str, str]]:
    """(extracted columns, certainty tests, canonical columns: kind, messages, responses, label) of a layout.
    Alpaca is formats.alpaca: [system] + user (instruction, then input after a blank line when it has text) +
    assistant (output)."""
    keys = layout.turn_keys
    if layout.name == "alpaca":
        user = (f"CASE WHEN regexp_matches(input, '{HAS_TEXT}') THEN instruction || chr(10) || chr(10) || input "
                f"ELSE instruction END")
        messages = _with_system(f"[{_message(USER, user)}]")
        return (_fields("instruction", "input", "output", "system"), [],
                {"kind": "'sft'", "messages": f"list_append({messages}, {_message(ASSISTANT, 'output')})"})
    if layout.name == "preference_text":
        # A prompt shaped like an HH transcript is split into turns by the per-line path.
        return (_fields("prompt", "chosen", "rejected", "system"),
                ["NOT (contains(prompt, 'H:') OR contains(prompt, 'Human:'))"],
                {"kind": "'preference'", "messages": _with_system(f"[{_message(USER, 'prompt')}]"),
                 "responses": "[chosen, rejected]"})
    field = "messages" if layout.fmt == "messages" else "conversations"
    columns, tests = _turns_columns(field, keys)
    if layout.name == "messages":
        return (columns + ["json_extract(raw, '$.label')::BOOLEAN AS label"], tests,
                {"kind": "CASE WHEN label IS NULL THEN 'sft' ELSE 'feedback' END", "messages": _turns_messages(field),
                 "label": "label"})
    columns += _fields("system")
    if layout.name == "sharegpt":
        return columns, tests, {"kind": "'sft'", "messages": _with_system(_turns_messages(field))}
    for answer in ("chosen", "rejected"):
        more_columns, more_tests = _answer_columns(answer, keys)
        columns, tests = columns + more_columns, tests + more_tests
    return (columns, tests + [f"{field}_n > 0"],
            {"kind": "'preference'", "messages": _with_system(_turns_messages(field)),
             "responses": "[chosen_text, rejected_text]"})


# ------------------------------------------------------------------ the file
class BulkFile(NamedTuple):
    fmt: str
    n_rows: int
    source: str                # SQL: the object rows with the layout's extracted columns
    canonical: dict[str, str]  # SQL over `source`: kind, messages, responses, label
    odd: pl.DataFrame          # (row_number, raw) of the rows that are not JSON objects, for the per-line parser


def _odd_rows(con: duckdb.DuckDBPyConnection) -> pl.DataFrame | None:
    """(seq, row_number, raw) of the registered rows that are not JSON objects; None when the per-line path could
    treat them differently: one of them is an object to orjson, or so many come first that the file's format would
    be detected without any object row (formats.detect_file_format votes over the first parsed records)."""
    odd = con.sql(f"SELECT seq, row_number, raw FROM {INPUT} WHERE NOT coalesce(CASE WHEN json_valid(raw) "
                  f"THEN json_type(raw) = 'OBJECT' END, false) ORDER BY seq").pl()
    parsed_before_first_object = 0
    for leading, (seq, raw) in enumerate(zip(odd["seq"], odd["raw"]), start=1):
        try:
            record = orjson.loads(raw)
        except orjson.JSONDecodeError:
            continue
        if isinstance(record, dict):
            return None
        parsed_before_first_object += seq == leading  # odd rows are sorted: the leading ones are seq 1, 2, ...
    return None if parsed_before_first_object >= formats.DETECTION_SAMPLE else odd


def bulk_file(con: duckdb.DuckDBPyConnection, lines: pl.DataFrame) -> BulkFile | None:
    """Registers the rows (row_number, raw) on con and says how to insert them in canonical form; None (and nothing
    registered) when any object row is not certain to come out as the per-line path makes it."""
    if lines.is_empty():
        return None
    con.register(INPUT, lines.with_row_index("seq", offset=1).to_arrow(compat_level=pl.CompatLevel.newest()))
    odd = _odd_rows(con)
    bulk = None
    if odd is not None and odd.height < lines.height:
        con.register(ODD, odd.select("seq").to_arrow())
        con.execute(f"CREATE OR REPLACE TEMP VIEW {LINES} AS SELECT * FROM {INPUT}" +
                    (f" ANTI JOIN {ODD} USING (seq)" if odd.height else ""))
        layout = survey(con)
        if layout is not None:
            columns, tests, canonical = layout_sql(layout)
            source = f"SELECT seq, row_number, raw, {', '.join(columns)} FROM {LINES}"
            try:
                certain = not tests or con.execute(
                    f"SELECT bool_and({' AND '.join(tests)}) FROM ({source})").fetchall()[0][0]
            except duckdb.Error:
                certain = False
            if certain:
                bulk = BulkFile(layout.fmt, lines.height, source, canonical, odd.select("row_number", "raw"))
    if bulk is None:
        release(con)
    return bulk


def insert_rows(con: duckdb.DuckDBPyConnection, bulk: BulkFile, file_id: str, run_id: str, seq0: int) -> None:
    """raw_rows of every row and parsed_rows of the object rows, as ingest's per-line path writes them (the caller
    parses the odd rows)."""
    con.execute(f"INSERT INTO raw_rows (row_id, file_id, row_number, row_seq, raw, raw_bytes, ingest_run_id) "
                f"SELECT $file || ':' || row_number, $file, row_number, $seq0 + seq, raw, NULL, $run FROM {INPUT}",
                {"file": file_id, "seq0": seq0, "run": run_id})
    c = bulk.canonical
    con.execute(f"INSERT INTO parsed_rows (row_id, kind, messages, responses, tools, label, reason, detail) "
                f"SELECT $file || ':' || row_number, {c['kind']}, {c['messages']}, {c.get('responses', 'NULL')}, "
                f"NULL, {c.get('label', 'NULL')}, NULL, NULL FROM ({bulk.source})", {"file": file_id})


@contextmanager
def bounded_buffer_pool(con: duckdb.DuckDBPyConnection, n_rows: int) -> Iterator[None]:
    """DuckDB keeps the blocks it writes cached up to its memory limit (80 % of RAM by default), so a bulk insert
    would hold the whole file twice over (raw and parsed). Capping the pool at what it holds now plus room for this
    file's work (and its key index, ~100 bytes a row) makes it write them out instead. The room is at least 192 MiB:
    with 128 MiB DuckDB spilled its row groups in flight and 200k rows took about a second longer."""
    used = con.execute("SELECT coalesce(sum(memory_usage_bytes), 0) FROM duckdb_memory()").fetchall()[0][0]
    old = con.execute("SELECT current_setting('memory_limit')").fetchall()[0][0]
    con.execute(f"SET memory_limit = '{(used + max(192 << 20, 128 * n_rows)) >> 20}MiB'")
    try:
        yield
    finally:
        con.execute(f"SET memory_limit = '{old}'")


def release(con: duckdb.DuckDBPyConnection) -> None:
    con.execute(f"DROP VIEW IF EXISTS {LINES}")
    for name in (ODD, INPUT):
        con.unregister(name)
