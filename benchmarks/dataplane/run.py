"""The whole data plane on one corpus: raw JSONL → ingest → clean → quality → dedup → split.

    nice .venv/bin/python -m benchmarks.dataplane.run --rows 200000 --name dataplane

Corpus (cached under benchmarks/out/dataplane/): the dedup benchmark's generator (benchmarks/dedup/corpus.py), 80 %
English and 20 % Chinese documents, 25 % near-duplicates, 8 % exact and 4 % normalised copies, 8 % hard negatives,
each document one Alpaca row (the first third of its words, or characters for Chinese, is the instruction, the rest
the output), plus 0.5 % malformed lines (truncated JSON, not an object). Every stage runs in one fresh process, in
order, the way `sftpipe run` calls them without Prefect; per stage it records wall time, peak RSS of the process
tree (sampled every 20 ms), the warehouse file's size after the stage (with a bucket storage root that whole file
is uploaded after every writer, so it is the stage's upload bytes) plus any other file the stage published under
the root (MinHash signature shards). Dedup precision/recall are scored on the generator's ground truth with the
dedup benchmark's metrics (benchmarks/dedup/metrics.py); rows rejected before dedup count as their own cluster.

Side by side, in the same run after ours: datatrove's nearest equivalent on the same file (datatrove_peer.py: its
JsonlReader, a LambdaFilter with our clean rules that apply, its PII formatter, its four MinHash stages at our
banding, JsonlWriter), from its own virtualenv (--datatrove NAME=PYTHON[,LANGUAGE][,no-memory-zone], repeatable;
a missing one is skipped and said so), its whole process tree's peak RSS, and its dedup precision/recall scored the
same way on the rows it wrote (kept and removed, with its cluster ids).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import threading
import time
from pathlib import Path

import polars as pl
import psutil

from benchmarks.common import OUT, machine, run_measured, write_results
from benchmarks.dedup import corpus as dedup_corpus
from benchmarks.dedup.metrics import quality as cluster_quality
from tasks.data.minhash import lsh_params

CORPUS = OUT / "dataplane"
STAGES = ("ingest", "clean", "quality", "signatures", "dedup", "split")
ZH_SHARE = 0.2
MALFORMED_SHARE = 0.005
PEER = Path(__file__).resolve().parent / "datatrove_peer.py"
DATATROVE = "datatrove=/work/bench-venvs/datatrove/bin/python,by-script"


def _alpaca(text: str, lang: str) -> dict:
    units = dedup_corpus._units(text, lang)
    cut = max(1, len(units) // 3)
    return {"instruction": dedup_corpus._join(units[:cut], lang), "input": "",
            "output": dedup_corpus._join(units[cut:], lang)}


def build(rows: int, seed: int = 0) -> tuple[Path, Path]:
    """(JSONL input, ground truth parquet: line, doc_id, cluster, kind, jaccard, origin), built once per size."""
    CORPUS.mkdir(parents=True, exist_ok=True)
    data, truth_path = CORPUS / f"dataplane_{rows}.jsonl", CORPUS / f"truth_{rows}.parquet"
    if data.exists() and truth_path.exists():
        return data, truth_path
    n_zh = int(rows * ZH_SHARE)
    parts, offset = [], 0
    for lang, n in (("en", rows - n_zh), ("zh", n_zh)):
        df = dedup_corpus.build(n, lang, seed=seed)
        parts.append(df.with_columns(pl.col("doc_id", "cluster", "origin") + offset, pl.lit(lang).alias("lang")))
        offset += n
    docs = pl.concat(parts)
    rng = random.Random(seed)
    order = list(range(len(docs)))
    rng.shuffle(order)  # interleave languages; ids stay the corpus' own
    texts, langs = docs["text"].to_list(), docs["lang"].to_list()
    lines, line_of = [], [0] * len(docs)
    for i in order:
        if rng.random() < MALFORMED_SHARE:
            bad = json.dumps(_alpaca(texts[rng.randrange(len(texts))], "en"), ensure_ascii=False)
            lines.append(rng.choice([bad[: len(bad) // 2], "[1, 2, 3]", '"just a string"']))
        lines.append(json.dumps(_alpaca(texts[i], langs[i]), ensure_ascii=False))
        line_of[i] = len(lines)
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    docs.with_columns(pl.Series("line", line_of)).select(
        "line", "doc_id", "cluster", "kind", "jaccard", "origin").write_parquet(truth_path)
    return data, truth_path


class PeakRss:
    """Peak RSS of this process and its children (the quality stage's language-ID process) between reset() calls,
    sampled every 20 ms in a thread."""

    def __init__(self):
        self.proc, self.peak, self.stop = psutil.Process(), 0, False
        threading.Thread(target=self._sample, daemon=True).start()

    def _tree_rss(self) -> int:
        rss = self.proc.memory_info().rss
        for child in self.proc.children(recursive=True):
            try:
                rss += child.memory_info().rss
            except psutil.NoSuchProcess:  # ended between listing and reading
                pass
        return rss

    def _sample(self):
        while not self.stop:
            self.peak = max(self.peak, self._tree_rss())
            time.sleep(0.02)

    def reset(self) -> int:
        peak, self.peak = max(self.peak, self._tree_rss()), 0
        return peak


def _root_bytes(root: Path) -> dict[str, int]:
    return {str(p): p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.name.endswith((".wal", ".lock"))}


def _stage_calls(cfg):
    from tasks.data.clean import run_clean
    from tasks.data.dedup import compute_signature_shard, run_dedup
    from tasks.data.ingest import run_ingest
    from tasks.data.quality import run_quality
    from tasks.data.split import run_split

    state: dict = {}
    return {
        "ingest": lambda: state.update(ingest=run_ingest(cfg)),
        "clean": lambda: state.update(clean=run_clean(cfg, state["ingest"])),
        "quality": lambda: state.update(quality=run_quality(cfg, state["clean"])),
        "signatures": lambda: state.update(shards=[compute_signature_shard(cfg, state["quality"], i)
                                                   for i in range(cfg.data.dedup.shards)]),
        "dedup": lambda: state.update(dedup=run_dedup(cfg, state["quality"], state["shards"])),
        "split": lambda: state.update(split=run_split(cfg, state["dedup"])),
    }, state


def child(data: str, truth: str, root: str, profile: str | None) -> dict:
    """Every stage in order in this process; per-stage wall, peak RSS, bytes under the root, upload bytes."""
    import duckdb

    from tasks.core.config import load_config

    cfg = load_config(None, [f"storage_root={root}", f"data.ingest.inputs=[{data}]"])
    from tasks.data.quality import detect_language
    detect_language("warm up the model")  # loading fastText is not the stage's per-run cost
    calls, state = _stage_calls(cfg)
    rss, stages, before = PeakRss(), [], {}
    warehouse = Path(cfg.warehouse_url)
    for name in STAGES:
        rss.reset()
        start, cpu = time.perf_counter(), time.process_time()
        if profile == name:
            import cProfile
            cProfile.runctx("calls[name]()", globals(), locals(), str(CORPUS / f"profile_{name}.prof"))
        else:
            calls[name]()
        wall = time.perf_counter() - start
        after = _root_bytes(Path(root))
        published = sum(v for k, v in after.items() if before.get(k) != v and Path(k) != warehouse)
        size = warehouse.stat().st_size
        uploads = (size if name != "signatures" else 0) + published  # a read-only stage uploads no warehouse
        stages.append({"stage": name, "seconds": wall, "cpu_s": time.process_time() - cpu, "peak_rss_gib": rss.reset() / 2**30,
                       "warehouse_bytes": size, "upload_bytes": uploads, "stats": getattr(state.get(name), "stats", None)})
        before = after
        print(json.dumps(stages[-1], default=str), file=sys.stderr, flush=True)
    con = duckdb.connect(str(warehouse), read_only=True)
    tables = con.sql("SELECT table_name, estimated_size FROM duckdb_tables()").fetchall()
    members = con.sql("SELECT r.row_number, m.cluster_id FROM raw_rows r LEFT JOIN cluster_members m "
                      "USING (row_id)").pl()
    blocks = con.sql("SELECT total_blocks, block_size, used_blocks, free_blocks FROM pragma_database_size()").fetchall()
    con.close()
    return {"stages": stages, "dedup_quality": _score(members, pl.read_parquet(truth)),
            "input_bytes": Path(data).stat().st_size, "warehouse_bytes": warehouse.stat().st_size,
            "table_rows": dict(tables), "database_size": blocks,
            "other_root_bytes": sum(v for k, v in _root_bytes(Path(root)).items() if Path(k) != warehouse)}


def _score(members: pl.DataFrame, truth: pl.DataFrame) -> dict:
    """Dedup precision/recall on the ground truth; a row with no cluster (rejected earlier) is its own cluster."""
    joined = truth.join(members.rename({"row_number": "line"}), on="line", how="left").sort("doc_id")
    label = joined.select(pl.coalesce("cluster_id", pl.format("doc{}", "doc_id"))).to_series()
    predicted = label.cast(pl.Categorical).to_physical().to_numpy()
    return cluster_quality(joined, predicted, 0.8)


def datatrove(spec: str, data: Path, truth: Path, rows: int) -> dict | None:
    """datatrove's pipeline on the same file in a fresh process tree: its stage times, peak RSS, dedup quality.

    spec: NAME=PYTHON[,LANGUAGE][,no-memory-zone] (datatrove_peer.py's --language and --no-memory-zone)."""
    name, rest = spec.split("=", 1)
    python, *options = rest.split(",")
    language = next((o for o in options if o != "no-memory-zone"), "by-script")
    if not Path(python).exists():
        print(f"{name}: {python} not installed, skipped", flush=True)
        return None
    bands, band_rows = lsh_params(0.8, 128)
    members_path = CORPUS / f"{name}_members_{rows}.json"
    load_before = [round(x, 2) for x in os.getloadavg()]
    out, wall, rss = run_measured([python, str(PEER), "--input", str(data), "--work", str(CORPUS / f"{name}_{rows}"),
                                   "--buckets", str(bands), "--rows", str(band_rows), "--language", language,
                                   "--members", str(members_path), *(["--no-memory-zone"] if "no-memory-zone" in options
                                                                     else [])])
    pairs = json.loads(members_path.read_text())
    members = pl.DataFrame(pairs, schema={"row_number": pl.Int64, "cluster": pl.String}, orient="row").select(
        "row_number", (pl.lit("dt") + pl.col("cluster")).alias("cluster_id"))
    return {"name": name, "python": python, **out, "process_wall_s": wall, "process_peak_rss_gib": rss / 2**30,
            "dedup_quality": _score(members, pl.read_parquet(truth)), "load_avg_before": load_before,
            "load_avg_after": [round(x, 2) for x in os.getloadavg()]}


def plain_text_quality(data: Path, truth: Path) -> dict:
    """Diagnostic, quality only: our MinHash (tasks.data.minhash, the dedup stage's settings and exact confirmation)
    on the text datatrove deduplicates, "instruction\ninput\noutput" without our role labels, every true document."""
    from benchmarks.dedup.methods import ours as ours_minhash

    t = pl.read_parquet(truth).sort("doc_id")
    lines = data.read_text(encoding="utf-8").split("\n")
    rows = [json.loads(lines[n - 1]) for n in t["line"]]
    texts = [r["instruction"] + ("\n" + r["input"] if r["input"] else "") + "\n" + r["output"] for r in rows]
    labels, _ = ours_minhash(texts)
    return cluster_quality(t, labels, 0.8)


def side_by_side(result: dict, peers: list[dict]) -> list[str]:
    """One table: ours and each datatrove run, end to end, peak RSS, dedup quality."""
    ours_s = sum(s["seconds"] for s in result["stages"])
    # Language ID, which datatrove does not do here, is most of the quality stage; timed alone in another process
    # it is too noisy on the shared machine to subtract (it came out above the whole stage once), so the whole
    # stage comes off, PII redaction included, which datatrove's time keeps.
    no_lid = ours_s - next(s["seconds"] for s in result["stages"] if s["stage"] == "quality")
    lines = ["", "## Side by side with datatrove (same input file, same run)", "",
             "| pipeline | stages (s) | end to end s | process wall s | peak RSS GiB | × ours | × ours without "
             "quality stage | removed as duplicates | precision | recall J≥0.8 | recall all injected | merged J<0.8 | "
             "hard neg. merged |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def row(label, stages, total, wall, rss, q):
        ratio = f"{total / ours_s:.2f}×" if label != "ours" else "1.00×"
        ratio_lid = f"{total / no_lid:.2f}×" if label != "ours" else "–"
        return (f"| {label} | {stages} | **{total:.1f}** | {wall:.1f} | {rss:.2f} | {ratio} | {ratio_lid} | "
                f"{q['removed_docs']:,} | {q['precision']:.4f} | {q['recall_eligible']:.4f} | {q['recall_all']:.4f} | "
                f"{q['merged_below']:.4f} | {q['hard_negatives_merged']:.4f} |")

    lines.append(row("ours", " · ".join(f"{s['stage']} {s['seconds']:.1f}" for s in result["stages"]), ours_s,
                     result["process_wall_s"], result["process_peak_rss_gib"], result["dedup_quality"]))
    for p in peers:
        v = p["versions"]
        label = (f"{p['name']} {v['datatrove']} (spaCy {v['spacy']}, tokenizer {p['language']}"
                 + (", *memory_zone off*" if not p.get("spacy_memory_zone", True) else "") + ")")
        lines.append(row(label, " · ".join(f"{k} {t:.1f}" for k, t in p["stages"].items()), p["total_s"],
                         p["process_wall_s"], p["process_peak_rss_gib"], p["dedup_quality"]))
    if result.get("plain_text_quality"):
        q = result["plain_text_quality"]
        lines.append(f"| *diagnostic: our MinHash alone on datatrove's text (no role labels), quality only* | – | – | "
                     f"– | – | – | – | {q['removed_docs']:,} | {q['precision']:.4f} | {q['recall_eligible']:.4f} | "
                     f"{q['recall_all']:.4f} | {q['merged_below']:.4f} | {q['hard_negatives_merged']:.4f} |")
    lines += ["", f"× ours: the pipeline's end-to-end seconds ÷ ours (above 1: slower than ours). Ours without the "
              f"quality stage: {no_lid:.1f} s (its language ID has no datatrove counterpart here; its PII redaction "
              "does, and is left in datatrove's time). Load average before/after each datatrove run: "
              + "; ".join(f"{p['name']} {p['load_avg_before']} → {p['load_avg_after']}" for p in peers) + "."]
    return lines


def markdown(result: dict, meta: dict) -> str:
    rows, input_bytes = meta["rows"], result["input_bytes"]
    lines = [f"# Data plane: {rows:,} raw JSONL rows ({input_bytes / 2**20:.1f} MiB), raw → split\n",
             f"Machine: {meta['machine']['cpu']}, {meta['machine']['cores']} cores (shared; load average at start "
             f"{meta['machine']['load_avg_at_start']}, at end {result.get('load_avg_at_end')}). One run, one "
             "process, stages in order.\n",
             "| stage | seconds | CPU s (all threads) | rows/s | peak RSS GiB | warehouse after (MiB) | warehouse ÷ input "
             "| upload MiB |", "|---|---|---|---|---|---|---|---|"]
    for s in result["stages"]:
        lines.append(f"| {s['stage']} | {s['seconds']:.1f} | {s['cpu_s']:.1f} | {rows / s['seconds']:,.0f} | "
                     f"{s['peak_rss_gib']:.2f} | "
                     f"{s['warehouse_bytes'] / 2**20:.1f} | {s['warehouse_bytes'] / input_bytes:.2f} | "
                     f"{s['upload_bytes'] / 2**20:.1f} |")
    total = sum(s["seconds"] for s in result["stages"])
    uploads = sum(s["upload_bytes"] for s in result["stages"])
    lines.append(f"| **all** | **{total:.1f}** | {sum(s['cpu_s'] for s in result['stages']):.1f} | {rows / total:,.0f} | "
                 f"{max(s['peak_rss_gib'] for s in result['stages']):.2f} | {result['warehouse_bytes'] / 2**20:.1f} | "
                 f"**{result['warehouse_bytes'] / input_bytes:.2f}** | {uploads / 2**20:.1f} |")
    q = result["dedup_quality"]
    lines += ["", "| dedup precision | recall J≥0.8 | recall all injected | merged J<0.8 | hard neg. merged |",
              "|---|---|---|---|---|",
              f"| {q['precision']:.4f} | {q['recall_eligible']:.4f} | {q['recall_all']:.4f} | "
              f"{q['merged_below']:.4f} | {q['hard_negatives_merged']:.4f} |"]
    quality = next(s for s in result["stages"] if s["stage"] == "quality")
    lines += ["", f"Quality stage (language ID, PII, no benchmark files): {quality['seconds']:.1f} s; language ID "
                  f"alone: {result.get('language_id_s', float('nan')):.1f} s."]
    if result.get("datatrove"):
        lines += side_by_side(result, result["datatrove"])
    return "\n".join(lines) + "\n"


def language_id_seconds(warehouse: str) -> float:
    """Language ID alone over the texts the quality stage read (clean rows that passed), detector loaded first."""
    import duckdb

    from tasks.core.config import load_config
    from tasks.data.quality import _content_text, detect_language, detect_languages, language_id_input

    n = load_config(None, []).data.quality.language_chars
    with duckdb.connect(warehouse, read_only=True) as con:
        rows = con.sql("SELECT messages, responses FROM clean_rows WHERE reason IS NULL").pl()
    texts = language_id_input(rows.select(_content_text(pl.col("messages"), pl.col("responses"))).to_series(), n)
    detect_language("warm up the model")
    start = time.perf_counter()
    detect_languages(texts)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--name", default="dataplane")
    p.add_argument("--profile", choices=STAGES, help="write a cProfile of this stage under benchmarks/out/dataplane")
    p.add_argument("--datatrove", action="append", metavar="NAME=PYTHON[,LANGUAGE][,no-memory-zone]",
                   help="a datatrove virtualenv's python to run side by side, its word tokenizer (by-script, cmn, "
                   f"en) and whether spaCy's memory_zone is off (a diagnostic); repeatable (default {DATATROVE})")
    p.add_argument("--no-datatrove", action="store_true", help="only our pipeline")
    p.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    p.add_argument("--language-child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(*args.child[:3], args.child[3] or None), default=str))
        return
    if args.language_child:
        print(json.dumps({"seconds": language_id_seconds(args.language_child)}))
        return
    data, truth = build(args.rows)
    root = CORPUS / f"root_{args.rows}"
    if root.exists():
        import shutil
        shutil.rmtree(root)
    meta = {"machine": machine(), "rows": args.rows, "command": " ".join(sys.argv)}
    result, wall, rss = run_measured([sys.executable, "-m", "benchmarks.dataplane.run", "--child", str(data),
                                      str(truth), str(root), args.profile or ""])
    lang, _, _ = run_measured([sys.executable, "-m", "benchmarks.dataplane.run", "--language-child",
                                 str(root / "warehouse.duckdb")])
    result.update(process_wall_s=wall, process_peak_rss_gib=rss / 2**30, language_id_s=lang["seconds"],
                  load_avg_at_end=[round(x, 2) for x in os.getloadavg()])
    if not args.no_datatrove:
        peers = [datatrove(spec, data, truth, args.rows) for spec in (args.datatrove or [DATATROVE])]
        result["datatrove"] = [p for p in peers if p]
        result["plain_text_quality"] = plain_text_quality(data, truth)
    md = markdown(result, meta)
    write_results(args.name, {**meta, "result": result}, md)
    print(md)


if __name__ == "__main__":
    main()
