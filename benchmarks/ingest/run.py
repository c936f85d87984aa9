"""Ingest benchmark: our ingest stage (rows verbatim + provenance + parsing/validation into canonical messages)
vs DuckDB's own read_json / read_parquet of the same file into a table, same run, same machine.

    .venv/bin/python -m benchmarks.ingest.run --rows 200000

The input is real Alpaca rows (English and Chinese) repeated with a row counter to the requested size, written once
as JSON Lines and as Parquet. Each measurement is a fresh process writing a fresh DuckDB file; the clock covers
reading the file to committed tables (imports and connection setup excluded). Results: benchmarks/results/ingest.*
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import (
    OUT,
    ROOT,
    fmt_spread,
    machine,
    run_measured,
    summary,
    write_results,
)

SHARED = ROOT.parent / "shared" / "data"
METHODS = ["duckdb_read_json", "ours_jsonl", "duckdb_read_parquet", "ours_parquet"]
LABELS = {
    "duckdb_read_json": "DuckDB `CREATE TABLE AS SELECT * FROM read_json(...)`",
    "ours_jsonl": "ours: `tasks.data.ingest.run_ingest` (JSONL)",
    "duckdb_read_parquet": "DuckDB `CREATE TABLE AS SELECT * FROM read_parquet(...)`",
    "ours_parquet": "ours: `tasks.data.ingest.run_ingest` (Parquet)",
}


def input_files(n_rows: int) -> tuple[Path, Path]:
    import polars as pl

    folder = OUT / "ingest"
    jsonl, parquet = folder / f"alpaca_{n_rows}.jsonl", folder / f"alpaca_{n_rows}.parquet"
    if not (jsonl.exists() and parquet.exists()):
        folder.mkdir(parents=True, exist_ok=True)
        base = []
        for name in ("instruct_alpaca_en/alpaca_en_demo.json", "instruct_alpaca_zh/alpaca_zh_demo.json"):
            base += [{k: r.get(k, "") for k in ("instruction", "input", "output")}
                     for r in json.loads((SHARED / name).read_text())]
        rows = [{**base[i % len(base)], "instruction": f"{base[i % len(base)]['instruction']} (#{i})"}
                for i in range(n_rows)]
        df = pl.DataFrame(rows)
        df.write_ndjson(jsonl)
        df.write_parquet(parquet)
    return jsonl, parquet


def child(method: str, path: str) -> dict:
    """One measurement, in this (fresh) process."""
    work = Path(tempfile.mkdtemp(prefix="ingest-bench-"))
    try:
        if method.startswith("duckdb"):
            import duckdb

            con = duckdb.connect(str(work / "raw.duckdb"))
            reader = "read_json(?, format = 'newline_delimited')" if method.endswith("json") else "read_parquet(?)"
            t0 = time.perf_counter()
            con.execute(f"CREATE TABLE raw AS SELECT * FROM {reader}", [path])
            con.commit()
            elapsed = time.perf_counter() - t0
            rows = con.execute("SELECT count(*) FROM raw").fetchone()[0]
            con.close()
        else:
            from tasks.core.config import PipelineConfig
            from tasks.data.ingest import run_ingest

            cfg = PipelineConfig(storage_root=str(work), data={"ingest": {"inputs": [path]}})
            t0 = time.perf_counter()
            result = run_ingest(cfg, run_id="bench")
            elapsed = time.perf_counter() - t0
            rows = result.stats["new_rows"]
        return {"seconds": elapsed, "rows": rows}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def markdown(results: list[dict], meta: dict) -> str:
    m = meta["machine"]
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB (shared; load average at start "
        f"{m['load_avg_at_start']}). {meta['rows']:,} Alpaca rows; JSONL {meta['jsonl_mib']:.1f} MiB, Parquet "
        f"{meta['parquet_mib']:.1f} MiB. Median of {meta['repeats']} runs, (min–max).",
        "",
        "| input | method | seconds | rows/s | MiB/s of input | peak RSS GiB | ours ÷ DuckDB rate |",
        "|---|---|---|---|---|---|---|",
    ]
    by = {r["method"]: r for r in results}
    for r in results:
        fmt = "jsonl" if "json" in r["method"] else "parquet"
        base = by.get("duckdb_read_json" if fmt == "jsonl" else "duckdb_read_parquet")
        ratio = (f"{base['seconds']['median'] / r['seconds']['median']:.2f}"
                 if base and r["method"].startswith("ours") else "–")
        size = meta["jsonl_mib"] if fmt == "jsonl" else meta["parquet_mib"]
        lines.append(
            f"| {fmt} | {LABELS[r['method']]} | {fmt_spread(r['seconds'])} | "
            f"{meta['rows'] / r['seconds']['median']:,.0f} | {size / r['seconds']['median']:.1f} | "
            f"{r['peak_rss_gib']['median']:.2f} | {ratio} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--child", nargs=2, metavar=("METHOD", "PATH"), help=argparse.SUPPRESS)
    p.add_argument("--name", default="ingest")
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(*a.child)))
        return
    jsonl, parquet = input_files(a.rows)
    meta = {"machine": machine(), "rows": a.rows, "repeats": a.repeats, "jsonl_mib": jsonl.stat().st_size / 2**20,
            "parquet_mib": parquet.stat().st_size / 2**20, "command": " ".join(sys.argv)}
    results = []
    for method in a.methods.split(","):
        path = jsonl if "json" in method else parquet
        runs = []
        for i in range(a.repeats):
            out, _, rss = run_measured([sys.executable, "-m", "benchmarks.ingest.run", "--child", method, str(path)])
            assert out["rows"] == a.rows, f"{method} loaded {out['rows']} rows, expected {a.rows}"
            runs.append({**out, "peak_rss_bytes": rss})
            print(f"  {method} #{i + 1}: {out['seconds']:.2f}s", flush=True)
        results.append({"method": method, "runs": runs, "seconds": summary([r["seconds"] for r in runs]),
                        "peak_rss_gib": summary([r["peak_rss_bytes"] / 2**30 for r in runs])})
    js, md = write_results(a.name, {"meta": meta, "results": results}, markdown(results, meta))
    print(md.read_text())
    print(f"wrote {js.relative_to(ROOT)} and {md.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
