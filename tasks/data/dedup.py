"""Deduplicate: exact copies by content hash, then near-duplicates by MinHash LSH, clustered transitively.

LSH candidate pairs are confirmed on the exact Jaccard of their shingles (data.dedup.verify=exact, the default):
only the candidates' texts are read back, and the signatures' estimate errs both ways this close to the threshold.

Which row is kept: the earliest-ingested member of a cluster (lowest row_seq). So a row already in the warehouse is
never displaced by data that arrives later, and its split never changes.
What is compared: the whole conversation for SFT rows, the prompt for preference rows (curated_rows.dedup_text, after
the quality stage's redaction); exact copies on all of it, near copies on its words without the role labels
(sql/views.sql: minhash_text). SFT and preference rows are never clustered together.

Signatures are computed in shards, each a Prefect task, so a Dask task runner spreads them over workers; they are
stored in the warehouse by content hash, 8 bits a value, so a nightly run only signs rows it has not seen.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from tasks.core import storage
from tasks.core.caching import current_run_id, source_hash, stage_task
from tasks.core.config import DedupConfig, PipelineConfig
from tasks.core.results import DataResult, SignatureShard
from tasks.core.warehouse import open_warehouse, record_stage, table_fingerprint, utcnow
from tasks.data import minhash

ACCEPTED_SQL = "SELECT row_id, kind, row_seq, content_hash, dedup_text FROM curated_rows WHERE reason IS NULL"
SIGNATURE_BITS = 8  # b-bit MinHash (Li & Koenig, 2010): bits kept of each value, see stored_form


def signature_params(d: DedupConfig) -> str:
    """Identifies how a stored signature was made; a change re-signs everything."""
    return f"p{d.num_perm}-s{d.seed}-n{d.ngram}-b{SIGNATURE_BITS}mix-words-{source_hash(minhash.signatures)[:8]}"


def stored_form(sigs: np.ndarray) -> np.ndarray:
    """What the warehouse and the shards keep of each MinHash value: SIGNATURE_BITS bits of it, well mixed
    (minhash.low_bits), an eighth of the 64-bit values.

    Two different minima agree on them with probability 1/256, so a pair of texts with Jaccard J agrees on a value
    with probability J + (1 - J) / 256. For banding that is harmless: an unrelated pair matches a band of 9 values
    with probability 256^-9, a pair at J = 0.5 about 4 % more often than with full values, and every candidate is
    confirmed on its texts' exact Jaccard (verify=exact). The similarity estimate is corrected for it
    (minhash._similarity)."""
    return minhash.low_bits(sigs, SIGNATURE_BITS)


SIGN_SLICE = 100_000


def stored_signatures(texts: list[str], d: DedupConfig) -> np.ndarray:
    """stored_form of the texts' signatures, signed SIGN_SLICE texts at a time: the 64-bit values (1 KiB a text)
    exist for one slice only."""
    starts = range(0, len(texts), SIGN_SLICE) or range(1)  # no texts: one empty slice, for the shape and dtype
    return np.concatenate([stored_form(minhash.signatures(texts[lo : lo + SIGN_SLICE], d.num_perm, d.seed, d.ngram))
                           for lo in starts])


def _shard_texts(con, cfg: PipelineConfig, shard: int) -> pl.DataFrame:
    d = cfg.data.dedup
    return con.sql(
        f"""SELECT DISTINCT content_hash, minhash_text(dedup_text) AS text FROM ({ACCEPTED_SQL})
            WHERE hash(content_hash) % {d.shards} = {shard}
              AND content_hash NOT IN (SELECT content_hash FROM minhash_signatures WHERE params = ?)
            ORDER BY content_hash""",
        params=[signature_params(d)],
    ).pl()


def compute_signature_shard(cfg: PipelineConfig, clean: DataResult, shard: int) -> SignatureShard:
    """Sign the not-yet-signed texts of one shard; writes a Parquet file the dedup stage loads."""
    d = cfg.data.dedup
    with open_warehouse(cfg.warehouse_url, read_only=True) as con:
        todo = _shard_texts(con, cfg, shard)
    sigs = stored_signatures(todo["text"].to_list(), d)
    url = cfg.url("dedup", signature_params(d), f"{clean.fingerprint}-shard{shard}.parquet")
    out = storage.local_path(url)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Written under a private name and moved into place: a concurrent run signing the same shard (same URL) may be
    # reading the copy already there.
    private = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.part")
    table = pa.table({
        "content_hash": todo["content_hash"].to_arrow(),
        "signature": pa.FixedSizeListArray.from_arrays(pa.array(sigs.reshape(-1), pa.uint8()), d.num_perm),
    })
    pq.write_table(table, private)
    return SignatureShard(stage="minhash", fingerprint=f"{clean.fingerprint}-{signature_params(d)}-{shard}",
                          path=storage.publish(url, source=private), signed=len(todo))


def clusters(rows: pl.DataFrame, sigs: np.ndarray, d: DedupConfig,
             texts_of: Callable[[list[str]], list[str]] | None = None) -> pl.DataFrame:
    """cluster_members rows for accepted rows ordered by row_seq; `sigs` aligned with their exact representatives.

    rows: row_id, kind, row_seq, content_hash (sorted by row_seq). texts_of(content hashes) -> their texts, for
    d.verify == "exact".
    """
    rows = rows.with_columns(
        pl.col("row_id").first().over("kind", "content_hash").alias("exact_rep"),
    )
    reps = rows.filter(pl.col("row_id") == pl.col("exact_rep"))
    near_rep = np.empty(len(reps), dtype=object)
    near_sim = np.ones(len(reps))
    kinds = reps["kind"].to_numpy()
    rep_ids, rep_hashes = reps["row_id"].to_numpy(), reps["content_hash"].to_numpy()
    for kind in np.unique(kinds):
        idx = np.flatnonzero(kinds == kind)
        exact = None
        if d.verify == "exact" and texts_of is not None:
            exact = minhash.exact_similarity(lambda pos, idx=idx: texts_of(rep_hashes[idx[pos]].tolist()), d.ngram)
        rep, sim = minhash.near_duplicate_clusters(sigs[idx], d.threshold, d.seed, exact)
        near_rep[idx] = rep_ids[idx[rep]]
        near_sim[idx] = sim
    reps = reps.select("row_id", pl.Series("cluster_id", near_rep, pl.String), pl.Series("sim", near_sim))
    out = rows.join(reps.rename({"row_id": "exact_rep"}), on="exact_rep", how="left")
    # A row is its cluster's representative, an exact copy of it, or a near copy (exact copies of a near copy
    # included: they are as far from the representative as the copy they repeat).
    return out.select(
        "row_id",
        "cluster_id",
        pl.when(pl.col("row_id") == pl.col("cluster_id")).then(pl.lit("representative"))
        .when(pl.col("exact_rep") == pl.col("cluster_id")).then(pl.lit("exact"))
        .otherwise(pl.lit("near")).alias("method"),
        pl.when(pl.col("exact_rep") == pl.col("cluster_id")).then(pl.lit(1.0))
        .otherwise(pl.col("sim")).alias("similarity"),
    )


# The table has no key (it would cost a fifth of its bytes): an insert skips what an earlier shard or run stored.
_NOT_STORED = "content_hash NOT IN (SELECT content_hash FROM minhash_signatures WHERE params = ?)"


def run_dedup(cfg: PipelineConfig, clean: DataResult, shards: list[SignatureShard],
              run_id: str = "local") -> DataResult:
    d = cfg.data.dedup
    params = signature_params(d)
    started = utcnow()
    with open_warehouse(cfg.warehouse_url) as con:
        con.begin()
        for s in shards:
            con.execute(f"INSERT INTO minhash_signatures SELECT content_hash, ?, signature FROM read_parquet(?) "
                        f"WHERE {_NOT_STORED}", [params, str(storage.fetch(s.path)), params])
        rows = con.sql(f"SELECT row_id, kind, row_seq, content_hash FROM ({ACCEPTED_SQL}) ORDER BY row_seq").pl()
        rep_hashes = rows.unique(["kind", "content_hash"], keep="first", maintain_order=True)["content_hash"]
        sigs, missing = load_signatures(con, rep_hashes.to_list(), d)
        if missing.any():
            raise RuntimeError(f"{missing.sum()} rows have no MinHash signature; were all signature shards run?")
        members = clusters(rows, sigs, d, lambda hashes: _texts(con, hashes))
        con.execute("DELETE FROM cluster_members")
        con.register("members", members.to_arrow())
        con.execute("INSERT INTO cluster_members SELECT * FROM members")
        con.unregister("members")
        con.commit()
        counts = dict(con.execute("SELECT method, count(*) FROM cluster_members GROUP BY ALL").fetchall())
        stats = {"accepted_rows": len(rows), "kept": counts.get("representative", 0),
                 "exact_duplicates": counts.get("exact", 0), "near_duplicates": counts.get("near", 0),
                 "clusters_with_duplicates": con.execute("SELECT count(*) FROM duplicate_clusters").fetchone()[0],
                 "newly_signed": sum(s.signed for s in shards)}
        fingerprint = table_fingerprint(con, "SELECT row_id, cluster_id, method FROM cluster_members")
        record_stage(con, run_id, "dedup", started, stats)
    return DataResult(stage="dedup", fingerprint=fingerprint, warehouse=cfg.warehouse_url, stats=stats)


def load_signatures(con, content_hashes: list[str], d: DedupConfig) -> tuple[np.ndarray, np.ndarray]:
    """(signatures, missing): the stored signature of each content hash in the order given (`stored_form` values,
    uint8), and a mask of those with none stored under the current params (their rows are zeros)."""
    con.register("wanted_sigs", pa.table({"content_hash": pa.array(content_hashes, pa.string()),
                                          "pos": pa.array(range(len(content_hashes)), pa.int64())}))
    column = con.sql(
        "SELECT s.signature FROM wanted_sigs w LEFT JOIN minhash_signatures s "
        "ON s.content_hash = w.content_hash AND s.params = ? ORDER BY w.pos", params=[signature_params(d)]
    ).fetch_arrow_table()["signature"].combine_chunks()
    con.unregister("wanted_sigs")
    if len(column) != len(content_hashes):
        raise RuntimeError("minhash_signatures holds a content hash twice under one params")
    missing = column.is_null().to_numpy(zero_copy_only=False)
    sigs = np.zeros((len(content_hashes), d.num_perm), dtype=np.uint8)
    if (~missing).any():
        sigs[~missing] = column.drop_null().flatten().to_numpy().reshape(-1, d.num_perm)
    return sigs, missing


def signatures_of(con, texts: list[str], content_hashes: list[str], d: DedupConfig) -> tuple[np.ndarray, int]:
    """(signatures, newly signed) of `texts` (keyed by `content_hashes`): stored ones are read back, the rest signed
    and stored, so a nightly run signs only texts it has not seen. Needs a writable connection."""
    sigs, missing = load_signatures(con, content_hashes, d)
    todo = np.flatnonzero(missing)
    if len(todo):
        new = stored_signatures([texts[i] for i in todo], d)
        sigs[todo] = new
        con.register("new_sigs", pa.table({
            "content_hash": pa.array([content_hashes[i] for i in todo], pa.string()),
            "signature": pa.FixedSizeListArray.from_arrays(pa.array(new.reshape(-1), pa.uint8()), d.num_perm),
        }))
        con.execute(f"INSERT INTO minhash_signatures SELECT content_hash, ?, signature::UTINYINT[] FROM new_sigs "
                    f"WHERE {_NOT_STORED}", [signature_params(d), signature_params(d)])
        con.unregister("new_sigs")
    return sigs, len(todo)


def _texts(con, content_hashes: list[str]) -> list[str]:
    """The text MinHash compares (minhash_text of dedup_text) of each content hash, in the order given."""
    con.register("wanted_texts", pa.table({"content_hash": content_hashes,
                                           "pos": pa.array(range(len(content_hashes)), pa.int64())}))
    rows = con.sql("SELECT any_value(minhash_text(c.dedup_text)) FROM wanted_texts w "
                   "JOIN curated_rows c USING (content_hash) GROUP BY w.pos ORDER BY w.pos").fetchall()
    con.unregister("wanted_texts")
    if len(rows) != len(content_hashes):
        raise RuntimeError("dedup: some candidate rows have no text in curated_rows")
    return [r[0] for r in rows]


def deduplicate(cfg: PipelineConfig, clean: DataResult, run_id: str = "local") -> DataResult:
    """The whole stage in one process (no Prefect): sign every shard, then cluster."""
    shards = [compute_signature_shard(cfg, clean, i) for i in range(cfg.data.dedup.shards)]
    return run_dedup(cfg, clean, shards, run_id)


def _dedup_config(c: PipelineConfig) -> dict:
    return {"dedup": c.data.dedup.model_dump(), "warehouse": c.warehouse_url,
            "minhash": source_hash(minhash.signatures)}


@stage_task("minhash-shard", _dedup_config)
def signature_shard_task(cfg: PipelineConfig, clean: DataResult, shard: int) -> SignatureShard:
    return compute_signature_shard(cfg, clean, shard)


@stage_task("dedup", _dedup_config)
def dedup_task(cfg: PipelineConfig, clean: DataResult, shards: list[SignatureShard]) -> DataResult:
    return run_dedup(cfg, clean, shards, current_run_id())
