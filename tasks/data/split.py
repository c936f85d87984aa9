"""Split: train / validation / test by duplicate cluster, stable forever; then a train↔eval overlap check.

A cluster's split is a pure function of (cluster id, seed, ratios): xxh64 of "seed:cluster_id" mapped to [0, 1).
Assignments are also stored insert-only, so a cluster keeps its split even if the ratios change later. Only a
cluster's representative is trained or evaluated on, so no near-duplicate can sit on both sides of a split.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import xxhash

from tasks.core.caching import current_run_id, stage_task
from tasks.core.config import PipelineConfig, SplitConfig
from tasks.core.warehouse import (
    insert_columns,
    open_warehouse,
    record_stage,
    table_fingerprint,
    utcnow,
)
from tasks.data.minhash import tokenize


def split_of(cluster_id: str, s: SplitConfig) -> str:
    u = xxhash.xxh64_intdigest(f"{s.seed}:{cluster_id}".encode()) / 2.0**64
    if u < s.test:
        return "test"
    if u < s.test + s.validation:
        return "validation"
    return "train"


def _ngrams(text: str, n: int) -> set[int]:
    toks = tokenize(text)
    return {xxhash.xxh64_intdigest(" ".join(toks[i:i + n]).encode()) for i in range(max(len(toks) - n + 1, 0))}


def contamination(train: list[tuple[str, str]], held_out: list[tuple[str, str, str]], s: SplitConfig):
    """Held-out rows whose n-grams appear in the training split at or above the threshold share.

    train: (row_id, text); held_out: (row_id, split, text). Returns (row_id, split, overlap, closest_train_row).
    """
    owner: dict[int, str] = {}
    for row_id, text in train:
        for g in _ngrams(text, s.decontam_ngram):
            owner.setdefault(g, row_id)
    found = []
    for row_id, split, text in held_out:
        grams = _ngrams(text, s.decontam_ngram)
        if not grams:
            continue
        hits = [owner[g] for g in grams if g in owner]
        overlap = len(hits) / len(grams)
        if overlap >= s.decontam_threshold:
            found.append((row_id, split, overlap, Counter(hits).most_common(1)[0][0]))
    return found


def run_split(cfg: PipelineConfig, dedup: dict[str, Any], run_id: str = "local") -> dict[str, Any]:
    s = cfg.data.split
    started = utcnow()
    with open_warehouse(cfg.warehouse_url) as con:
        new = con.execute(
            "SELECT cluster_id FROM cluster_members WHERE method = 'representative' "
            "AND cluster_id NOT IN (SELECT cluster_id FROM split_assignments) ORDER BY cluster_id"
        ).fetchall()
        now = utcnow()
        con.begin()
        insert_columns(con, "split_assignments", {
            "cluster_id": [c for (c,) in new], "split": [split_of(c, s) for (c,) in new],
            "assigned_run": [run_id] * len(new), "assigned_at": [now] * len(new)})
        rows = con.execute(
            "SELECT c.row_id, a.split, c.dedup_text || chr(10) || array_to_string(c.responses, chr(10)) "
            "FROM clean_rows c JOIN cluster_members m ON m.row_id = c.row_id AND m.method = 'representative' "
            "JOIN split_assignments a ON a.cluster_id = m.cluster_id ORDER BY c.row_seq"
        ).fetchall()
        found = contamination([(r, t) for r, sp, t in rows if sp == "train"],
                              [(r, sp, t) for r, sp, t in rows if sp != "train"], s)
        con.execute("DELETE FROM contamination")
        insert_columns(con, "contamination", dict(zip(
            ("row_id", "split", "overlap", "closest_train_row"), map(list, zip(*found)) if found else ([],) * 4)))
        con.commit()
        sizes = dict(con.execute(
            "SELECT split, count(*) FROM split_assignments a JOIN cluster_members m "
            "ON m.cluster_id = a.cluster_id AND m.method = 'representative' GROUP BY ALL").fetchall())
        stats = {"new_clusters": len(new), **{k: sizes.get(k, 0) for k in ("train", "validation", "test")},
                 "contaminated_eval_rows": len(found)}
        fingerprint = table_fingerprint(
            con, "SELECT m.row_id, a.split FROM cluster_members m JOIN split_assignments a USING (cluster_id) "
                 "WHERE m.method = 'representative'")
        record_stage(con, run_id, "split", started, stats)
    return {"stage": "split", "fingerprint": fingerprint, "warehouse": cfg.warehouse_url, "stats": stats}


@stage_task("split", lambda c: {"split": c.data.split.model_dump(), "warehouse": c.warehouse_url})
def split_task(cfg: PipelineConfig, dedup: dict[str, Any]) -> dict[str, Any]:
    return run_split(cfg, dedup, current_run_id())
