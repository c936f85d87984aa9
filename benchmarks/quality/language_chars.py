"""How many characters language ID needs: labels and time at several data.quality.language_chars, on real rows.

    nice .venv/bin/python -m benchmarks.quality.language_chars --chars 500,300,200,80 --name language_chars

Rows: every JSON / JSONL file under ../shared/data (English and Chinese Alpaca, ShareGPT, messages, preference),
parsed by the ingest stage's own normaliser; the text is what the quality stage reads (user and assistant turns and
the answers, system prompt left out), cut to each length as the stage cuts it. The longest length is the reference:
per length, the share of rows given the same language, the rows that differ (with both answers), and the
detector's time per row (model loaded first, best of --repeats).
"""

from __future__ import annotations

import argparse
import json
import time

import polars as pl

from benchmarks.common import ROOT, machine, write_results
from tasks.data.formats import detect_file_format, normalize
from tasks.data.quality import _content_text, detect_language, detect_languages, language_id_input

SHARED_DATA = ROOT.parent / "shared" / "data"


def shared_rows() -> pl.DataFrame:
    """(source, messages, responses) of every row of ../shared/data that the normaliser takes."""
    rows = []
    for path in sorted(SHARED_DATA.rglob("*.json*")):
        text = path.read_text(encoding="utf-8")
        records = [json.loads(line) for line in text.splitlines() if line.strip()] if path.suffix == ".jsonl" \
            else json.loads(text)
        fmt = detect_file_format(records)
        for record in records:
            try:
                parsed = normalize(record, fmt)
            except ValueError:  # rows the ingest stage would quarantine
                continue
            rows.append({"source": path.name,
                         "messages": [{"role": m["role"], "content": m.get("content") or ""} for m in parsed.messages],
                         "responses": parsed.responses or []})
    return pl.DataFrame(rows)


def measure(chars: list[int], repeats: int) -> dict:
    rows = shared_rows()
    text = rows.select(_content_text(pl.col("messages"), pl.col("responses"))).to_series()
    detect_language("warm up the model")
    labels, seconds = {}, {}
    for n in chars:
        sample = language_id_input(text, n)
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            labels[n] = detect_languages(sample)
            best = min(best, time.perf_counter() - start)
        seconds[n] = best
    reference = max(chars)
    out = {"rows": len(rows), "mean_chars": float(text.str.len_chars().mean()), "reference_chars": reference,
           "by_chars": []}
    for n in chars:
        differ = [i for i, (a, b) in enumerate(zip(labels[reference], labels[n])) if a[0] != b[0]]
        out["by_chars"].append({
            "chars": n, "us_per_row": seconds[n] / len(rows) * 1e6, "time_vs_reference": seconds[n] / seconds[reference],
            "same_language": 1 - len(differ) / len(rows), "differing_rows": len(differ),
            "examples": [{"source": rows["source"][i], "text": text[i][:100],
                          "reference": labels[reference][i], "this": labels[n][i]} for i in differ[:10]],
        })
    return out


def markdown(result: dict, meta: dict) -> str:
    lines = [f"# Language ID: characters read vs labels and time ({result['rows']:,} real rows of ../shared/data, "
             f"mean {result['mean_chars']:.0f} characters)", "",
             f"Machine: {meta['cpu']}, {meta['cores']} cores. Reference: {result['reference_chars']} characters.", "",
             "| characters | µs / row | time vs reference | same language as reference | rows that differ |",
             "|---|---|---|---|---|"]
    for r in result["by_chars"]:
        lines.append(f"| {r['chars']} | {r['us_per_row']:.0f} | {r['time_vs_reference']:.2f} | "
                     f"{r['same_language']:.4f} | {r['differing_rows']} |")
    for r in result["by_chars"]:
        if r["examples"]:
            lines += ["", f"Rows that differ at {r['chars']} characters (first {len(r['examples'])}):", ""]
            lines += [f"- {e['source']}: {e['reference'][0]} ({e['reference'][1]:.2f}) → {e['this'][0]} "
                      f"({e['this'][1]:.2f}): {json.dumps(e['text'], ensure_ascii=False)}" for e in r["examples"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--chars", default="500,300,200,80")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--name", default="language_chars")
    args = p.parse_args()
    chars = sorted({int(c) for c in args.chars.split(",")}, reverse=True)
    meta = machine()
    result = measure(chars, args.repeats)
    js, md = write_results(args.name, {"machine": meta, **result}, markdown(result, meta))
    print(md.read_text())


if __name__ == "__main__":
    main()
