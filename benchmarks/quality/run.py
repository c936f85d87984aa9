"""Throughput of the quality filters (language ID, PII, benchmark decontamination) next to clean alone.

    nice .venv/bin/python -m benchmarks.quality.run --rows 1000000 --items 100000 --name quality_1m

Corpus (cached under benchmarks/out/quality/): conversations made of 4-8 real sentences from ../shared/data
(80 % English, 20 % Chinese; the first one or two sentences are the user turn). 2 % of rows get a piece of personal
data appended (e-mail, phone, card, IBAN, IP or token), 5 % a look-alike (version, date, ISBN, order number), and
1 % a whole benchmark item pasted into the user turn. Benchmark items are random word (English) or character
(Chinese) sequences of 20-60 tokens drawn from the same texts, so only the planted rows share their n-grams.

Every method runs in a fresh process on the same corpus; the time is that of the measured call only (the corpus
is read before the clock starts): `clean` (clean_frame, the baseline every run already pays), `language`
(detect_language per row, data.quality.language_chars characters), `pii` (redact_rows), `decontaminate` (index build + matching), and `quality` (the
stage's whole judge(): all three, as the stage runs them).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import polars as pl

from benchmarks.common import OUT, fmt_spread, machine, run_measured, summary, write_results
from benchmarks.dedup.corpus import sentence_pool, source_texts

CORPUS = OUT / "quality"
METHODS = ("clean", "language", "pii", "decontaminate", "quality")
PII_SNIPPETS = [
    "Write to me at {name}.{n}@example.com.", "My phone is +44 20 7946 {n4}.", "Card: 4111 1111 1111 1111",
    "Wire to DE89 3704 0044 0532 0130 00 please.", "Server 83.12.{a}.{b} keeps failing.",
    "key AKIAIOSFODNN7EXAMPLE leaked", "我的手机号是138{n4}{n4}。",
]
LOOK_ALIKES = ["Upgrade to version 1.2.{a}.{b}.", "Released on 2023-10-{a:02d}.", "ISBN 978-3-16-148410-0",
               "Your order #2023{n4}{n4} shipped.", "订单号：2023{n4}{n4}5678", "Python 3.11.{a}"]


MESSAGES = pl.List(pl.Struct({
    "role": pl.String, "content": pl.String, "reasoning": pl.String,
    "tool_calls": pl.List(pl.Struct({"id": pl.String, "name": pl.String, "arguments": pl.String})),
    "tool_call_id": pl.String, "name": pl.String}))


def _turn(role: str, content: str) -> dict:
    return {"role": role, "content": content, "reasoning": None, "tool_calls": None, "tool_call_id": None, "name": None}


def _fill(template: str, rng: random.Random) -> str:
    return template.format(name=rng.choice(["anna", "li", "sam"]), n=rng.randrange(1000), n4=f"{rng.randrange(10000):04d}",
                           a=rng.randrange(1, 28), b=rng.randrange(1, 255))


def build(rows: int, items: int, seed: int = 0) -> tuple[Path, Path]:
    """Write (training rows parquet, benchmark items jsonl) once per size; returns their paths."""
    CORPUS.mkdir(parents=True, exist_ok=True)
    rows_path, items_path = CORPUS / f"rows_{rows}.parquet", CORPUS / f"items_{items}.jsonl"
    if rows_path.exists() and items_path.exists():
        return rows_path, items_path
    rng = random.Random(seed)
    pools = {lang: sentence_pool(source_texts(lang), lang) for lang in ("en", "zh")}
    vocab = {"en": [w for s in pools["en"] for w in s.split()], "zh": [c for s in pools["zh"] for c in s if c.strip()]}
    bench = []
    for _ in range(items):
        lang = "zh" if rng.random() < 0.2 else "en"
        words = rng.choices(vocab[lang], k=rng.randint(20, 60))
        bench.append(("" if lang == "zh" else " ").join(words))
    items_path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in bench), encoding="utf-8")
    messages, responses = [], []
    for _ in range(rows):
        lang = "zh" if rng.random() < 0.2 else "en"
        sents = rng.sample(pools[lang], rng.randint(4, 8))
        split = rng.randint(1, 2)
        user, answer = " ".join(sents[:split]), " ".join(sents[split:])
        u = rng.random()
        if u < 0.02:
            answer += " " + _fill(rng.choice(PII_SNIPPETS), rng)
        elif u < 0.07:
            answer += " " + _fill(rng.choice(LOOK_ALIKES), rng)
        elif u < 0.08:
            user += "\n" + rng.choice(bench)
        messages.append([_turn("user", user), _turn("assistant", answer)])
        responses.append([])
    pl.DataFrame({
        "row_id": [f"r{i}" for i in range(rows)], "kind": ["sft"] * rows, "source": ["bench"] * rows,
        "row_seq": list(range(rows)), "messages": messages, "responses": responses, "tools": [None] * rows,
        "label": [None] * rows,
    }, schema_overrides={"responses": pl.List(pl.String), "tools": pl.String, "messages": MESSAGES,
                         "label": pl.Boolean}).write_parquet(rows_path)
    return rows_path, items_path


def child(method: str, rows_path: str, items_path: str) -> dict:
    from tasks.core.config import load_config
    from tasks.data import decontaminate
    from tasks.data.clean import clean_frame
    from tasks.data.quality import _content_text, detect_language, detect_languages, judge, language_id_input, redact_rows

    cfg = load_config(None, [f"data.decontaminate.against=[{items_path}]"])
    rows = pl.read_parquet(rows_path)
    if "label" not in rows.columns:  # a corpus cached before parsed rows carried the KTO label
        rows = rows.with_columns(pl.lit(None, pl.Boolean).alias("label"))
    if method != "clean":
        rows = rows.select("row_id", "kind", "messages", "responses")
        detect_language("warm up the model")
    start = time.perf_counter()
    extra: dict = {}
    if method == "clean":
        out = clean_frame(rows, cfg)
        extra["passed"] = out["reason"].is_null().sum()
    elif method == "language":
        texts = rows.select(_content_text(pl.col("messages"), pl.col("responses")))
        n = cfg.data.quality.language_chars
        langs = [lang for lang, _ in detect_languages(language_id_input(texts.to_series(), n))]
        extra["languages"] = dict(pl.Series(langs).value_counts().iter_rows())
    elif method == "pii":
        findings, redacted = redact_rows(rows, cfg)
        extra["redacted_rows"] = len(redacted)
        extra["findings"] = dict(findings.group_by("kind").agg(pl.col("matches").sum()).iter_rows())
    elif method == "decontaminate":
        parts, _ = decontaminate.load_parts(cfg.data.decontaminate.against)
        index = decontaminate.BenchmarkIndex.build(parts, cfg.data.decontaminate.ngram)
        extra["index_s"] = time.perf_counter() - start
        texts = rows.select(_content_text(pl.col("messages"), pl.col("responses"))).to_series().to_list()
        extra["contaminated"] = len(decontaminate.contaminated(texts, index, cfg.data.decontaminate))
    else:
        parts, _ = decontaminate.load_parts(cfg.data.decontaminate.against)
        verdict = judge(rows, cfg, decontaminate.BenchmarkIndex.build(parts, cfg.data.decontaminate.ngram))
        extra["rejected"] = dict(verdict["rows"]["reason"].drop_nulls().value_counts().iter_rows())
    seconds = time.perf_counter() - start
    return {"method": method, "rows": len(rows), "seconds": seconds, **extra}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--items", type=int, default=10_000)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--name", default="quality")
    p.add_argument("--child", nargs=3, metavar=("METHOD", "ROWS", "ITEMS"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(*args.child), default=str))
        return
    rows_path, items_path = build(args.rows, args.items)
    runs, table = [], []
    for method in args.methods.split(","):
        outs = []
        for _ in range(args.repeats):
            out, wall, rss = run_measured([sys.executable, "-m", "benchmarks.quality.run", "--child", method,
                                           str(rows_path), str(items_path)])
            outs.append({**out, "process_wall_s": wall, "peak_rss_gib": rss / 2**30})
            print(json.dumps(outs[-1], default=str), flush=True)
        runs += outs
        s = summary([o["seconds"] for o in outs])
        table.append(f"| {method} | {fmt_spread(s, 1)} | {args.rows / s['median']:,.0f} | "
                     f"{max(o['peak_rss_gib'] for o in outs):.2f} |")
    md = (f"# Quality filters: {args.rows:,} rows, {args.items:,} benchmark items\n\n"
          "| method | seconds, median (min–max) | rows/s | peak RSS GiB |\n|---|---|---|---|\n" + "\n".join(table) + "\n")
    write_results(args.name, {"machine": machine(), "rows": args.rows, "items": args.items, "runs": runs,
                              "command": " ".join(sys.argv)}, md)
    print(md)


if __name__ == "__main__":
    main()
