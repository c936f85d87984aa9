"""Split: train / validation / test by prompt group, stable forever; then a train↔eval overlap check.

A prompt group is a connected component of rows (duplicate-cluster representatives, SFT and preference alike)
linked by near-duplicate prompt keys. A row's keys are its first user turn, always (so a conversation and every
conversation extending it, a question asked again with another answer, and a preference prompt that is an SFT
prompt share a key), and each later user turn of at least split.prompt_min_tokens tokens (a follow-up like
"why?" or "继续" says too little to link two conversations). The system prompt is left out unless
split.prompt_system. Keys are compared with the dedup stage's MinHash machinery (same permutations, shingles and
exact confirmation, signatures stored by content so a nightly run signs only new keys) at split.prompt_threshold.

A new group's split is drawn from xxh64("seed:group id") mapped to [0, 1), the group id being the row id of its
earliest-ingested row. A group larger than split.max_group_share of a held-out split's expected rows goes to
train, and the held-out fractions of the other new groups are scaled up by the rows that displaced, so the
targets hold in expectation. Assignments are stored insert-only per row: a row never moves. A new row joining a
group takes the split of the group's earliest assigned row; when it joins groups already in different splits, that
is recorded in split_bridges (the bridged_rows view), and any overlap it leaves is caught by the check below.

Then the n-gram overlap check: a new group whose held-out rows would overlap the training split at or above
split.decontam_threshold goes to train as well (templated rows, a paraphrase with the same answer), until none
does. What is left, overlap between old held-out rows and newer training rows, is reported (contaminated_examples)
and left out of the views training and evaluation read (eval_exclusions counts it).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator

import numpy as np
import polars as pl
import xxhash
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from tasks.core.caching import current_run_id, stage_task
from tasks.core.config import DedupConfig, PipelineConfig, SplitConfig
from tasks.core.results import DataResult
from tasks.core.warehouse import (
    insert_columns,
    open_warehouse,
    record_stage,
    stream,
    table_fingerprint,
    utcnow,
)
from tasks.data import minhash
from tasks.data.dedup import signatures_of

HELD_OUT = ("test", "validation")


def split_of(group_id: str, seed: int, fractions: dict[str, float]) -> str:
    """The split a draw of xxh64("seed:group id") in [0, 1) falls in: test first, then validation, else train."""
    u = xxhash.xxh64_intdigest(f"{seed}:{group_id}".encode()) / 2.0**64
    edge = 0.0
    for split in HELD_OUT:
        edge += fractions[split]
        if u < edge:
            return split
    return "train"


# ------------------------------------------------------------------------------------------------ prompt groups
def prompt_keys(rows: pl.DataFrame, s: SplitConfig) -> pl.DataFrame:
    """(row, key): the texts each row is grouped on. rows: row_id, messages (in row order; `row` is the position)."""
    turns = (rows.select(pl.int_range(pl.len(), dtype=pl.Int64).alias("row"), "messages")
             .explode("messages").unnest("messages").drop_nulls("role"))
    users = turns.filter(pl.col("role") == "user").with_columns(
        pl.int_range(pl.len()).over("row").alias("turn"),
        pl.col("content").str.to_lowercase().str.count_matches(minhash.TOKEN_PATTERN).alias("tokens"))
    keys = users.filter((pl.col("turn") == 0) | (pl.col("tokens") >= s.prompt_min_tokens))
    if s.prompt_system:
        system = (turns.filter(pl.col("role") == "system").group_by("row")
                  .agg(pl.col("content").str.join("\n").alias("system")))
        keys = keys.join(system, on="row", how="left").with_columns(
            pl.concat_str([pl.col("system").fill_null(""), pl.col("content")], separator="\n").alias("content"))
    return keys.select("row", pl.col("content").alias("key"))


def key_clusters(con, keys: list[str], d: DedupConfig, threshold: float) -> tuple[np.ndarray, int]:
    """(for each distinct key text the index of the first key of its near-duplicate cluster, keys newly signed)."""
    hashes = [hashlib.sha256(b"prompt\0" + k.encode()).hexdigest() for k in keys]
    sigs, signed = signatures_of(con, keys, hashes, d)
    exact = None
    if d.verify == "exact":
        exact = minhash.exact_similarity(lambda pos: [keys[i] for i in pos], d.ngram)
    rep, _ = minhash.near_duplicate_clusters(sigs, threshold, d.seed, exact)
    return rep, signed


def components(n_rows: int, edge_rows: np.ndarray, edge_keys: np.ndarray, n_keys: int) -> np.ndarray:
    """Connected components of rows linked through shared keys: a label per row."""
    graph = coo_matrix((np.ones(len(edge_rows), dtype=np.int8), (edge_rows, n_rows + edge_keys)),
                       shape=(n_rows + n_keys, n_rows + n_keys))
    _, labels = connected_components(graph, directed=False)
    return labels[:n_rows]


def held_out_fractions(sizes: np.ndarray, s: SplitConfig, total_rows: int) -> tuple[dict[str, float], np.ndarray]:
    """(fractions, allowed): the held-out fractions for a batch of new groups of `sizes` rows, and per group and
    held-out split whether it may go there (at most s.max_group_share of that split's expected rows). Each fraction
    is scaled by rows / rows of allowed groups, so the expected held-out rows stay at the target share."""
    allowed = np.stack([sizes <= s.max_group_share * getattr(s, split) * total_rows for split in HELD_OUT], axis=1)
    fractions = {}
    for i, split in enumerate(HELD_OUT):
        eligible = sizes[allowed[:, i]].sum()
        fractions[split] = getattr(s, split) * sizes.sum() / eligible if eligible else 0.0
    total = sum(fractions.values())
    if total > 0.9:  # too few small groups to reach the targets: keep most rows in train anyway
        fractions = {k: v * 0.9 / total for k, v in fractions.items()}
    return fractions, allowed


def assign(rows: pl.DataFrame, edge_rows: np.ndarray, edge_keys: np.ndarray, n_keys: int, s: SplitConfig):
    """Splits for rows without one, keeping every assigned row where it is.

    rows: row_id, split (null: not yet assigned), ordered by ingest (row_seq). Returns (rows with group_id and
    split filled, bridges: new rows whose group joined groups already in different splits).
    """
    old = rows["split"].is_not_null().to_numpy()
    n = len(rows)
    frame = rows.with_columns(
        pl.Series("group", components(n, edge_rows, edge_keys, n_keys)),
        pl.Series("old_group", components(n, edge_rows[old[edge_rows]], edge_keys[old[edge_rows]], n_keys)),
    )
    old_groups = (frame.filter(pl.col("split").is_not_null()).group_by("old_group", maintain_order=True)
                  .agg(pl.col("row_id").first().alias("old_group_id"), pl.col("split").first().alias("old_split")))
    frame = frame.join(old_groups, on="old_group", how="left", maintain_order="left")
    groups = frame.group_by("group", maintain_order=True).agg(
        pl.col("row_id").first().alias("group_id"),
        pl.len().alias("rows"),
        pl.col("split").drop_nulls().first().alias("inherited"),
        pl.col("old_group_id").unique(maintain_order=True).drop_nulls().alias("joined_groups"),
        pl.col("old_split").filter(pl.col("old_group_id").is_first_distinct()).drop_nulls().alias("joined_splits"),
    )
    fresh = groups.filter(pl.col("inherited").is_null())
    sizes = fresh["rows"].to_numpy()
    fractions, allowed = held_out_fractions(sizes, s, n)
    drawn = [split_of(g, s.seed, fractions) for g in fresh["group_id"].to_list()]
    capped = np.array([sp != "train" and not ok[HELD_OUT.index(sp)] for sp, ok in zip(drawn, allowed)], dtype=bool)
    drawn = ["train" if cap else sp for sp, cap in zip(drawn, capped)]
    groups = groups.join(fresh.select("group", pl.Series("drawn", drawn, pl.String)), on="group", how="left")
    groups = groups.with_columns(pl.coalesce("inherited", "drawn").alias("group_split"))
    out = frame.join(groups.select("group", "group_id", "group_split", "inherited", "joined_groups", "joined_splits"),
                     on="group", maintain_order="left")
    bridges = out.filter(pl.col("split").is_null() & (pl.col("joined_splits").list.n_unique() > 1))
    out = out.with_columns(pl.coalesce("split", "group_split").alias("split"))
    stats = {"groups": len(groups), "largest_group": int(groups["rows"].max() or 0),
             "kept_in_train_by_group_cap": int(sizes[capped].sum())}
    return (out.select("row_id", "group_id", "split", pl.col("inherited").is_null().alias("fresh")),
            bridges.select(pl.col("row_id").alias("cluster_id"), "group_id", pl.col("group_split").alias("split"),
                           "joined_groups", "joined_splits"), stats)


# ------------------------------------------------------------------------------------------------ contamination
class TrainingNgrams:
    """The n-grams of the training split (hashed as the dedup stage hashes shingles, whole n-grams only), each with
    the earliest training row (smallest row_seq) that has it. Kept as sorted arrays, so a lookup is one vectorised
    searchsorted; rows may be added in any order and the index comes out the same.

    queried: the texts that will be looked up (held-out rows). Their distinct n-grams are hashed once and kept
    (row, hash), so asking again after training grew costs lookups only; and only training n-grams that occur in
    them are indexed (the rest can never be a hit), a fraction of the training split's n-grams.

    Rows are known by row_seq alone: keeping each added batch's row ids (small allocations among the freed texts)
    held ~0.4 GiB of the stream's memory at 1M rows."""

    def __init__(self, s: SplitConfig, queried: list[str] | pl.Series):
        self.s = s
        self.hashes = np.empty(0, np.uint64)  # sorted, distinct
        self.owner = np.empty(0, np.int64)  # row_seq of the earliest training row that has each hash
        frames = [pl.DataFrame({"row": np.repeat(idx, n).astype(np.int32), "hash": flat}).unique()  # rows: one batch
                  for idx, flat, n in minhash.ngram_hash_batches(queried, s.decontam_ngram)]
        grams = pl.concat(frames) if frames else pl.DataFrame(schema={"row": pl.Int32, "hash": pl.UInt64})
        del frames
        self.queried = grams.sort("hash")  # hash order: the searchsorted lookups stay in cache
        del grams
        self.relevant = minhash.HashSet(self.queried["hash"].to_numpy())

    ROWS_PER_MERGE = 100_000  # rows' n-grams (with their owners) held at once before they are merged in

    def add(self, rows: pl.DataFrame) -> None:
        """Training rows: row_seq (their order of ingest) and text; a polars frame keeps the texts out of Python
        strings but a batch at a time."""
        for lo in range(0, len(rows), self.ROWS_PER_MERGE):
            self._add(rows.slice(lo, self.ROWS_PER_MERGE))

    def _add(self, rows: pl.DataFrame) -> None:
        seqs = rows["row_seq"].cast(pl.Int64).to_numpy()
        hashes, owners = [np.empty(0, np.uint64)], [np.empty(0, np.int64)]
        for idx, flat, n in minhash.ngram_hash_batches(rows["text"], self.s.decontam_ngram, only=self.relevant):
            hashes.append(flat)
            owners.append(np.repeat(seqs[idx], n))
        # The earliest row per hash by a hash table, then a sort of what is left: most kept n-grams are repeats
        # (in 270k rows of the 1M benchmark, 20M become 0.7M distinct).
        pairs = (pl.DataFrame({"hash": np.concatenate(hashes), "owner": np.concatenate(owners)})
                 .group_by("hash").agg(pl.col("owner").min()).sort("hash"))
        h, o = pairs["hash"].to_numpy(), pairs["owner"].to_numpy()
        pos, known = self._find(h)
        # an n-gram already indexed keeps the earlier of its two owners
        self.owner[pos[known]] = np.minimum(self.owner[pos[known]], o[known])
        h, o = h[~known], o[~known]
        # merged into place (a memory move), so each call costs the rows added, not the whole index again
        at = np.searchsorted(self.hashes, h)
        self.hashes, self.owner = np.insert(self.hashes, at, h), np.insert(self.owner, at, o)

    def _find(self, hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(position in the index, whether it is there) of each hash."""
        if not len(self.hashes):
            return np.zeros(len(hashes), np.int64), np.zeros(len(hashes), bool)
        pos = np.minimum(np.searchsorted(self.hashes, hashes), len(self.hashes) - 1)
        return pos, self.hashes[pos] == hashes

    def _owners(self, hashes: np.ndarray) -> np.ndarray:
        """The owner (row_seq) of each hash, -1 where no training row has it."""
        if not len(self.hashes):
            return np.full(len(hashes), -1, np.int64)
        pos, known = self._find(hashes)
        return np.where(known, self.owner[pos], -1)

    def overlapping(self, rows: np.ndarray) -> pl.DataFrame:
        """Queried texts (positions in `queried`) whose n-grams are in the training split at or above the threshold
        share: row (position), overlap, closest (row_seq of the training row holding most of the hits; ties: the
        earliest), in row order."""
        grams = self.queried.filter(pl.col("row").is_in(pl.Series(rows, dtype=pl.Int32)))
        grams = grams.with_columns(pl.Series("owner", self._owners(grams["hash"].to_numpy()))).drop("hash")
        closest = (grams.filter(pl.col("owner") >= 0).group_by("row", "owner").len()
                   .sort("row", "len", "owner", descending=[False, True, False])
                   .unique("row", keep="first").select("row", pl.col("owner").alias("closest")))
        hits = (grams.group_by("row").agg((pl.col("owner") >= 0).mean().alias("overlap"))
                .filter(pl.col("overlap") >= self.s.decontam_threshold)
                .join(closest, on="row").sort("row"))
        return hits.select(pl.col("row").cast(pl.Int64), "overlap", "closest")


def contamination(train: list[tuple[str, str]], held_out: list[tuple[str, str, str]], s: SplitConfig):
    """Held-out rows (row_id, split, text) overlapping the training rows (row_id, text; earliest first), as (row_id,
    split, overlap, closest_train_row) in the order given; see TrainingNgrams."""
    index = TrainingNgrams(s, [t for _, _, t in held_out])
    index.add(pl.DataFrame({"row_seq": np.arange(len(train), dtype=np.int64), "text": [t for _, t in train]},
                           schema={"row_seq": pl.Int64, "text": pl.String}))
    found = index.overlapping(np.arange(len(held_out)))
    return [(held_out[row][0], held_out[row][1], overlap, train[closest][0])
            for row, overlap, closest in found.iter_rows()]


def keep_overlapping_groups_in_train(assigned: pl.DataFrame, s: SplitConfig,
                                     held_out_text: Callable[[pl.Series], pl.DataFrame],
                                     training_text: Callable[[], Iterator[pl.DataFrame]]):
    """Move new groups whose held-out rows overlap training into train, until none does; then check every
    held-out row. assigned: row_id, group_id, split, fresh (the group had no assigned row before this run).
    held_out_text(row_ids) -> (row_id, row_seq, text) of those rows; training_text() -> (row_id, row_seq, text)
    frames of every row, in any order, a batch at a time: the training split's text is never held whole (1.5 GiB of
    the stage's 5.8 GiB peak at 1M rows).

    Moving a group adds its n-grams to training, which can make another new group overlap: hence the loop. Rows
    assigned in earlier runs never move, so what overlaps among them (or joined their groups) stays, and is
    reported. Returns (assigned, contamination: row_id, split, overlap, closest_seq (the closest training row's
    row_seq), rows moved).
    """
    held_out = assigned.filter(pl.col("split") != "train")
    held_out = held_out.join(held_out_text(held_out["row_id"]), on="row_id", maintain_order="left")
    # Only rows not in train now are ever looked up (moves go to train), so only their n-grams need indexing.
    index = TrainingNgrams(s, held_out["text"])
    held_out = held_out.with_row_index("pos")  # pos: the row's position in the index's queried texts
    train = assigned.filter(pl.col("split") == "train").select("row_id")
    for batch in training_text():
        index.add(batch.join(train, on="row_id", how="semi", maintain_order="left"))
    del train
    moved = held_out.clear().select("row_id")
    candidates = held_out.filter(pl.col("fresh"))
    while True:
        found = index.overlapping(candidates["pos"].to_numpy())
        groups = candidates.filter(pl.col("pos").is_in(found["row"]))["group_id"].unique()
        if not len(groups):
            break
        to_train = candidates.filter(pl.col("group_id").is_in(groups))
        index.add(to_train)
        moved = pl.concat([moved, to_train.select("row_id")])
        candidates = candidates.filter(~pl.col("group_id").is_in(groups))
    assigned = assigned.with_columns(
        pl.when(pl.col("row_id").is_in(moved["row_id"])).then(pl.lit("train")).otherwise(pl.col("split")).alias("split"))
    remaining = held_out.filter(~pl.col("row_id").is_in(moved["row_id"]))
    found = (index.overlapping(remaining["pos"].to_numpy())
             .join(remaining.select(pl.col("pos").cast(pl.Int64).alias("row"), "row_id", "split"), on="row")
             .select("row_id", "split", "overlap", pl.col("closest").alias("closest_seq")))
    return assigned, found, len(moved)


# ------------------------------------------------------------------------------------------------ the stage
_REPRESENTATIVES = ("curated_rows c JOIN cluster_members m ON m.row_id = c.row_id "
                    "AND m.method = 'representative'")
_TEXT = "c.dedup_text || chr(10) || coalesce(array_to_string(c.responses, chr(10)), '')"  # what the overlap check reads


def _texts_of(con, row_ids: pl.Series) -> pl.DataFrame:
    """(row_id, row_seq, text) of these representatives: the few held-out ones, read at once."""
    con.register("wanted_rows", pl.DataFrame({"row_id": row_ids}).to_arrow())
    try:
        return con.sql(f"SELECT c.row_id, c.row_seq, {_TEXT} AS text FROM {_REPRESENTATIVES} "
                       "JOIN wanted_rows w ON w.row_id = c.row_id").pl()
    finally:
        con.unregister("wanted_rows")


def _store(con, table: str, frame: pl.DataFrame, **constants) -> None:
    insert_columns(con, table, {**{c: frame[c].to_list() for c in frame.columns},
                                **{k: [v] * len(frame) for k, v in constants.items()}})


def prompt_groups(con, cfg: PipelineConfig):
    """(rows: row_id, row_seq, split so far, in ingest order; then assign()'s output) over the representatives'
    prompt keys, clustered. Needs a writable connection (new keys' signatures are stored). Its own function so the
    turns and the key texts (per row, distinct) are freed before the overlap check."""
    s = cfg.data.split
    # Of the turns, only what prompt keys are made of; the overlap check's text is read later.
    rows = con.sql(
        "SELECT c.row_id, c.row_seq, "
        "list_transform(list_filter(c.messages, lambda m: m.role IN ('user', 'system')), "
        f"lambda m: {{'role': m.role, 'content': m.content}}) AS messages, a.split FROM {_REPRESENTATIVES} "
        "LEFT JOIN split_assignments a ON a.cluster_id = c.row_id ORDER BY c.row_seq").pl()
    keys = prompt_keys(rows, s)
    rows = rows.drop("messages")
    distinct = keys.select("key").unique(maintain_order=True).with_row_index("key_id")
    edges = keys.join(distinct, on="key", maintain_order="left").select("row", "key_id")
    del keys
    rep, signed = key_clusters(con, distinct["key"].to_list(), cfg.data.dedup, s.prompt_threshold)
    assigned, bridges, stats = assign(rows.select("row_id", "split"), edges["row"].to_numpy(),
                                      rep[edges["key_id"].to_numpy()], len(distinct), s)
    return rows, assigned, bridges, {**stats, "prompt_keys": len(distinct), "newly_signed_prompt_keys": signed}


def run_split(cfg: PipelineConfig, dedup: DataResult, run_id: str = "local") -> DataResult:
    s = cfg.data.split
    started = utcnow()
    with open_warehouse(cfg.warehouse_url) as con:
        con.begin()
        rows, assigned, bridges, stats = prompt_groups(con, cfg)
        assigned, found, stats["kept_in_train_by_overlap"] = keep_overlapping_groups_in_train(
            assigned, s, lambda row_ids: _texts_of(con, row_ids),
            # no ORDER BY: the index is order-independent, and a sort would hold every training text at once
            lambda: stream(con, f"SELECT c.row_id, c.row_seq, {_TEXT} AS text FROM {_REPRESENTATIVES}",
                           cfg.data.batch_rows))
        new = assigned.join(rows.filter(pl.col("split").is_null()).select("row_id"), on="row_id")
        now = utcnow()
        _store(con, "split_assignments", new.select(pl.col("row_id").alias("cluster_id"), "split"),
               assigned_run=run_id, assigned_at=now)
        _store(con, "split_bridges", bridges, bridged_run=run_id, bridged_at=now)
        con.execute("DELETE FROM split_groups")
        _store(con, "split_groups", assigned.select(pl.col("row_id").alias("cluster_id"), "group_id"))
        con.execute("DELETE FROM contamination")
        found = found.join(rows.select(pl.col("row_seq").alias("closest_seq"), pl.col("row_id").alias(
            "closest_train_row")), on="closest_seq", how="left", maintain_order="left").drop("closest_seq")
        _store(con, "contamination", found)
        con.commit()
        sizes = assigned["split"].value_counts()
        stats = {"new_rows": len(new), **{k: 0 for k in ("train", "validation", "test")},
                 **dict(sizes.iter_rows()), **stats, "bridged_rows": len(bridges), "contaminated_eval_rows": len(found)}
        fingerprint = table_fingerprint(
            con, "SELECT m.row_id, a.split, k.row_id IS NULL AS usable FROM cluster_members m "
                 "JOIN split_assignments a USING (cluster_id) LEFT JOIN contamination k ON k.row_id = m.row_id "
                 "WHERE m.method = 'representative'")
        record_stage(con, run_id, "split", started, stats)
    return DataResult(stage="split", fingerprint=fingerprint, warehouse=cfg.warehouse_url, stats=stats)


@stage_task("split", lambda c: {"split": c.data.split.model_dump(), "dedup": c.data.dedup.model_dump(),
                                "warehouse": c.warehouse_url})
def split_task(cfg: PipelineConfig, dedup: DataResult) -> DataResult:
    return run_split(cfg, dedup, current_run_id())
