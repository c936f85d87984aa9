"""Benchmark decontamination: training rows that reproduce a benchmark item's prompt or answer are rejected.

Benchmark files are read like inputs (any supported format, or JSONL of {"text": ...}); each item gives one part
per prompt and answer (a preference item one per response), and each part is a set of n-gram hashes made exactly as
dedup makes its shingles (tasks/data/minhash.py: words, or single characters for Chinese/Japanese/Korean/Thai). A row
is contaminated by a part when at least `threshold` of the part's n-grams occur in the row, so a benchmark question
pasted into a longer conversation is caught, and a row that only shares a phrase is not.

N-grams that occur in more than MAX_ITEMS_PER_NGRAM benchmark parts are template text ("Answer the following
question"), not evidence of one item: they are left out of both sides. Parts shorter than the n-gram size are one
n-gram of all their tokens, so they only match a row that is that same short text.

Speed: every row's n-gram hashes are tested against the benchmark's distinct hashes with `minhash.HashSet` (a
bitmap over hash prefixes, then a sorted-array lookup for what passes it); only the hits are joined to their parts.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import PurePosixPath

import numpy as np
import polars as pl

from tasks.core import storage
from tasks.core.config import DecontaminateConfig
from tasks.data import formats, minhash
from tasks.data.ingest import discover, file_format, read_file

MAX_ITEMS_PER_NGRAM = 50


@dataclass(frozen=True)
class Part:
    benchmark: str  # file path or URL
    item: int  # 1-based record number in the file
    part: str  # text | prompt | answer | response N
    text: str


def item_parts(record: object, fmt: str | None) -> list[tuple[str, str]]:
    """(part name, text) of one benchmark record; empty when it has no text we can read."""
    if isinstance(record, dict) and fmt in (None, "text") and isinstance(record.get("text"), str):
        return [("text", record["text"])]
    try:
        parsed = formats.normalize(record, fmt)
    except formats.RecordError:
        return []
    messages, responses = parsed.messages, parsed.responses
    prompt = "\n".join(m.get("content") or "" for m in messages if m["role"] != "assistant")
    answer = "\n".join(m.get("content") or "" for m in messages if m["role"] == "assistant")
    parts = [("prompt", prompt), ("answer", answer)] + [(f"response {i}", r) for i, r in enumerate(responses or [], 1)]
    return [(name, text) for name, text in parts if text and text.strip()]


def load_parts(against: list[str]) -> tuple[list[Part], int]:
    """Every part of every item in the benchmark files, and the number of records that gave none."""
    parts, unreadable = [], 0
    for url in discover(against):
        local = storage.fetch(url)
        read = read_file(local, local.read_bytes())
        if read.reason:
            raise ValueError(f"benchmark file {url} cannot be read: {read.reason} ({read.detail})")
        fmt = file_format(url, [r.record for r in read.rows if r.reason is None], {})
        for row in read.rows:
            found = item_parts(row.record, fmt) if row.reason is None else []
            unreadable += not found
            parts += [Part(url, row.row_number, name, text) for name, text in found]
    return parts, unreadable


def fingerprint(against: list[str]) -> str | None:
    """Content hash of the benchmark files (part of the quality stage's cache key); None when there are none."""
    if not against:
        return None
    h = hashlib.sha256()
    for url in discover(against):
        h.update(PurePosixPath(url).name.encode())
        h.update(hashlib.sha256(storage.fetch(url).read_bytes()).digest())
    return h.hexdigest()[:16]


@dataclass
class BenchmarkIndex:
    parts: list[Part]
    hashes: np.ndarray  # sorted distinct n-gram hashes over all parts (template n-grams left out)
    owners: pl.DataFrame  # hash (u64), part (i64): which parts hold each hash
    part_sizes: np.ndarray  # distinct n-grams per part, template n-grams left out
    members: minhash.HashSet  # the same hashes, for fast membership

    @classmethod
    def build(cls, parts: list[Part], ngram: int) -> BenchmarkIndex:
        hashes, owners = [], []
        for rows, flat, n_shingles in minhash.shingle_hash_batches([p.text for p in parts], ngram):
            hashes.append(flat)
            owners.append(np.repeat(rows, n_shingles))
        pairs = pl.DataFrame({
            "hash": np.concatenate(hashes) if hashes else np.empty(0, np.uint64),
            "part": np.concatenate(owners).astype(np.int64) if owners else np.empty(0, np.int64),
        }).unique()
        common = pairs.group_by("hash").len().filter(pl.col("len") > MAX_ITEMS_PER_NGRAM)
        pairs = pairs.join(common.select("hash"), on="hash", how="anti")
        sizes = np.bincount(pairs["part"].to_numpy(), minlength=len(parts))
        distinct = np.unique(pairs["hash"].to_numpy())
        return cls(parts, distinct, pairs, sizes, minhash.HashSet(distinct))


def contaminated(texts: list[str], index: BenchmarkIndex, d: DecontaminateConfig) -> pl.DataFrame:
    """Rows of `texts` contaminated by a benchmark part: row (position in texts), part (index into index.parts),
    overlap (share of the part's n-grams in the row); the most-covered part per row."""
    empty = pl.DataFrame(schema={"row": pl.Int64, "part": pl.Int64, "overlap": pl.Float64})
    if not len(index.hashes):
        return empty
    found = []
    for rows, flat, n_shingles in minhash.shingle_hash_batches(texts, d.ngram):
        hit = index.members.contains(flat)
        if not hit.any():
            continue
        row_of = np.repeat(rows, n_shingles)[hit].astype(np.int64)
        hits = pl.DataFrame({"row": row_of, "hash": flat[hit]}).unique()
        counts = hits.join(index.owners, on="hash").group_by("row", "part").len()
        overlap = counts["len"].to_numpy() / index.part_sizes[counts["part"].to_numpy()]
        found.append(counts.with_columns(pl.Series("overlap", overlap)).filter(pl.col("overlap") >= d.threshold))
    if not found:
        return empty
    return (pl.concat(found).sort(["row", "overlap", "part"], descending=[False, True, False])
            .unique("row", keep="first", maintain_order=True).select("row", "part", "overlap"))
