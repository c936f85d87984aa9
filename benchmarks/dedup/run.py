"""Dedup benchmark: our MinHash path vs datasketch (naive and bulk), datatrove and text-dedup, same run, same machine.

    .venv/bin/python -m benchmarks.dedup.run --sizes 10000,100000 --langs en --variants standard,light

Every measurement is a fresh process (peak RSS of its whole process tree is sampled), repeated --repeats times;
tables report the median and the (min–max) spread. Peers that need other package versions run from their own
virtualenvs (--datatrove-python, --textdedup-python); a missing one is skipped and said so. Results go to
benchmarks/results/<name>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import polars as pl

from benchmarks.common import (
    OUT,
    ROOT,
    fmt_spread,
    machine,
    run_measured,
    summary,
    write_results,
)
from benchmarks.dedup import corpus as corpora
from benchmarks.dedup.metrics import quality
from tasks.data.minhash import lsh_params

THRESHOLD, NUM_PERM = 0.8, 128
BANDS, ROWS = lsh_params(THRESHOLD, NUM_PERM)  # 9 x 13, datasketch's optimum; peers get the same banding
PEERS_DIR = Path(__file__).resolve().parent / "peers"
ALL_METHODS = ["ours", "datasketch_naive", "datasketch_bulk", "datatrove", "datatrove_default", "textdedup"]
LABELS = {
    "ours": "ours (tasks.data.minhash)",
    "datasketch_naive": "datasketch naive (update per shingle, SHA-1)",
    "datasketch_bulk": "datasketch MinHash.bulk + xxh64",
    "datatrove": f"datatrove 0.10 ({BANDS}x{ROWS} buckets)",
    "datatrove_default": "datatrove 0.10 (default 14x8 buckets)",
    "textdedup": f"text-dedup 0.4 (b={BANDS}, r={ROWS})",
}


def jsonl_shards(path: Path, shards: int) -> Path:
    """The corpus as JSONL shards ({"id", "text"}) for the peers, in corpus order."""
    folder = OUT / "jsonl" / f"{path.stem}-{shards}"
    if not folder.exists() or len(list(folder.glob("*.jsonl"))) != shards:
        folder.mkdir(parents=True, exist_ok=True)
        df = pl.read_parquet(path, columns=["doc_id", "text"]).rename({"doc_id": "id"})
        bounds = np.linspace(0, len(df), shards + 1).astype(int)
        for k in range(shards):
            df.slice(bounds[k], bounds[k + 1] - bounds[k]).write_ndjson(folder / f"part-{k:05d}.jsonl")
    return folder


def command(method: str, path: Path, lang: str, n_docs: int, labels: Path, a) -> list[str] | None:
    if method in ("ours", "datasketch_naive", "datasketch_bulk"):
        return [sys.executable, "-m", "benchmarks.dedup.methods", "--method", method, "--corpus", str(path),
                "--labels", str(labels)]
    if method.startswith("datatrove"):
        if not Path(a.datatrove_python).exists():
            return None
        buckets, rows = (BANDS, ROWS) if method == "datatrove" else (14, 8)
        return [a.datatrove_python, str(PEERS_DIR / "datatrove_runner.py"), "--input", str(jsonl_shards(path, 2)),
                "--work", str(OUT / "work" / method), "--n-docs", str(n_docs), "--lang", lang,
                "--buckets", str(buckets), "--rows", str(rows), "--labels", str(labels)]
    if method == "textdedup":
        if not Path(a.textdedup_python).exists():
            return None
        shard = jsonl_shards(path, 1) / "part-00000.jsonl"
        return [a.textdedup_python, str(PEERS_DIR / "textdedup_runner.py"), "--input", str(shard),
                "--work", str(OUT / "work" / method), "--n-docs", str(n_docs), "--labels", str(labels)]
    raise ValueError(method)


def measure(method: str, lang: str, variant: str, size: int, a) -> dict | None:
    path = corpora.corpus_path(size, lang, variant)
    corpus = corpora.load(size, lang, variant)
    labels = OUT / "labels" / f"{method}-{path.stem}.npy"
    labels.parent.mkdir(parents=True, exist_ok=True)
    cmd = command(method, path, lang, size, labels, a)
    if cmd is None:
        print(f"  {method}: not installed, skipped", flush=True)
        return None
    runs = []
    repeats = a.repeats if method == "ours" or a.baseline_repeats is None else a.baseline_repeats
    for r in range(repeats):
        times, wall, rss = run_measured(cmd, timeout=a.timeout)
        runs.append({**times, "process_wall_s": wall, "peak_rss_bytes": rss})
        print(f"  {method} #{r + 1}: signatures {times['signature_s']:.2f}s total {times['total_s']:.2f}s "
              f"rss {rss / 2**30:.2f}GiB", flush=True)
    q = quality(corpus, np.load(labels), THRESHOLD)
    return {
        "method": method, "lang": lang, "variant": variant, "docs": size, "runs": runs, "quality": q,
        "signature_s": summary([r["signature_s"] for r in runs]),
        "total_s": summary([r["total_s"] for r in runs]),
        "docs_per_s": summary([size / r["signature_s"] for r in runs]),
        "peak_rss_gib": summary([r["peak_rss_bytes"] / 2**30 for r in runs]),
    }


def markdown(results: list[dict], meta: dict) -> str:
    lines = [
        f"Machine: {meta['machine']['cpu']}, {meta['machine']['cores']} cores, {meta['machine']['memory_gib']} GiB "
        f"(shared with other jobs; load average at start {meta['machine']['load_avg_at_start']}). "
        f"{NUM_PERM} permutations, threshold {THRESHOLD}, 5-gram shingles, LSH {BANDS} bands x {ROWS} rows. "
        f"Median of {meta['repeats']} runs (peers: {meta['baseline_repeats']}), (min–max); signatures: in-memory texts "
        f"to signatures (datatrove: its signature stage, reading JSONL); total: to clusters.",
        "",
        "| corpus | docs | method | signatures docs/s | signatures s | total s to clusters | × vs naive | "
        "× vs datatrove | peak RSS GiB | precision | recall J≥0.8 | recall all injected | merged J<0.8 | hard neg. merged |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        same = [x for x in results if (x["lang"], x["variant"], x["docs"]) == (r["lang"], r["variant"], r["docs"])]
        ref = {x["method"]: x["total_s"]["median"] for x in same}
        speed = r["total_s"]["median"]
        vs = lambda m: f"{ref[m] / speed:.1f}×" if m in ref else "–"  # noqa: E731
        q = r["quality"]
        lines.append(
            f"| {r['lang']} {r['variant']} | {r['docs']:,} | {LABELS[r['method']]} | "
            f"{fmt_spread(r['docs_per_s'], 0)} | {fmt_spread(r['signature_s'])} | {fmt_spread(r['total_s'])} | "
            f"{vs('datasketch_naive')} | {vs('datatrove')} | {r['peak_rss_gib']['median']:.2f} | "
            f"{q['precision']:.4f} | {q['recall_eligible']:.4f} | {q['recall_all']:.4f} | "
            f"{q.get('merged_below', float('nan')):.4f} | {q['hard_negatives_merged']:.4f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="10000")
    p.add_argument("--langs", default="en")
    p.add_argument("--variants", default="standard")
    p.add_argument("--methods", default=",".join(ALL_METHODS))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--baseline-repeats", type=int, help="repeats for the peers, if fewer (for the 1M run)")
    p.add_argument("--max-size", default="datasketch_naive=10000,datatrove_default=10000,textdedup=100000",
                   help="largest corpus per method, e.g. datasketch_naive=10000 (slow baselines at scale)")
    p.add_argument("--datatrove-python", default="/work/bench-venvs/datatrove/bin/python")
    p.add_argument("--textdedup-python", default="/work/bench-venvs/textdedup/bin/python")
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--name", default="dedup")
    p.add_argument("--rescore", action="store_true", help="recompute quality of results/<name>.json from the "
                   "labels its last run saved, and rewrite its tables")
    a = p.parse_args()
    if a.rescore:
        payload = json.loads((ROOT / "benchmarks" / "results" / f"{a.name}.json").read_text())
        for r in payload["results"]:
            path = corpora.corpus_path(r["docs"], r["lang"], r["variant"])
            labels = np.load(OUT / "labels" / f"{r['method']}-{path.stem}.npy")
            r["quality"] = quality(corpora.load(r["docs"], r["lang"], r["variant"]), labels, THRESHOLD)
        write_results(a.name, payload, markdown(payload["results"], payload["meta"]))
        return
    caps = {k: int(v) for k, v in (kv.split("=") for kv in a.max_size.split(",") if kv)}
    meta = {"machine": machine(), "repeats": a.repeats, "baseline_repeats": a.baseline_repeats or a.repeats, "threshold": THRESHOLD, "num_perm": NUM_PERM,
            "bands": BANDS, "rows": ROWS, "command": " ".join(sys.argv)}
    results = []
    for size in [int(s) for s in a.sizes.split(",")]:
        for lang in a.langs.split(","):
            for variant in a.variants.split(","):
                print(f"{lang} {variant} {size:,} docs", flush=True)
                for method in a.methods.split(","):
                    if size <= caps.get(method, size):
                        r = measure(method, lang, variant, size, a)
                        if r:
                            results.append(r)
                            write_results(a.name, {"meta": meta, "results": results}, markdown(results, meta))
    js, md = write_results(a.name, {"meta": meta, "results": results}, markdown(results, meta))
    print(md.read_text())
    print(f"wrote {js.relative_to(ROOT)} and {md.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
