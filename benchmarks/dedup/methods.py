"""One dedup method on one corpus, in this process: prints its timings as JSON and saves cluster labels.

    .venv/bin/python -m benchmarks.dedup.methods --method ours --corpus benchmarks/out/corpora/en_standard_10000.parquet \
        --labels /tmp/labels.npy

All methods share the settings of the comparison: 128 permutations, threshold 0.8, word 5-grams (characters for
Chinese) from `tasks.data.minhash.shingles`, the same LSH banding (`tasks.data.minhash.lsh_params`: datasketch's optimum with
misses weighted 9:1, 14 bands x 9 rows), candidates confirmed by estimated Jaccard >= threshold, transitive clusters.
The corpus is loaded before the clock starts; "signatures" covers tokenising, shingling, hashing and permuting.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import polars as pl
import xxhash
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from tasks.data import minhash

NUM_PERM, THRESHOLD, NGRAM, SEED = 128, 0.8, 5, 1


def components(n: int, pairs: list[tuple[int, int]]) -> np.ndarray:
    """Cluster label (lowest member index) per document, from confirmed duplicate pairs."""
    p = np.array(pairs, dtype=np.int64).reshape(-1, 2)
    graph = coo_matrix((np.ones(len(p), dtype=np.int8), (p[:, 0], p[:, 1])), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    lowest = np.full(labels.max() + 1 if n else 0, n, dtype=np.int64)
    np.minimum.at(lowest, labels, np.arange(n))
    return lowest[labels]


def ours(texts: list[str]) -> tuple[np.ndarray, dict]:
    t0 = time.perf_counter()
    sigs = minhash.signatures(texts, NUM_PERM, SEED, NGRAM)
    t1 = time.perf_counter()
    # As the dedup stage does by default (data.dedup.verify=exact): candidates confirmed on their shingles.
    exact = minhash.exact_similarity(lambda rows: [texts[i] for i in rows], NGRAM)
    rep, _ = minhash.near_duplicate_clusters(sigs, THRESHOLD, SEED, exact)
    t2 = time.perf_counter()
    return rep, {"signature_s": t1 - t0, "cluster_s": t2 - t1}


def _datasketch_clusters(hashes, lsh_index_insert) -> list[tuple[int, int]]:
    from datasketch import MinHashLSH

    lsh = MinHashLSH(num_perm=NUM_PERM, params=minhash.lsh_params(THRESHOLD, NUM_PERM))
    lsh_index_insert(lsh, hashes)
    pairs = []
    for i, m in enumerate(hashes):
        pairs += [(j, i) for j in lsh.query(m) if j < i and m.jaccard(hashes[j]) >= THRESHOLD]
    return pairs


def _insert_one_by_one(lsh, hashes):
    for i, m in enumerate(hashes):
        lsh.insert(i, m, check_duplication=False)


def _insert_session(lsh, hashes):
    with lsh.insertion_session() as session:
        for i, m in enumerate(hashes):
            session.insert(i, m, check_duplication=False)


def datasketch_naive(texts: list[str]) -> tuple[np.ndarray, dict]:
    """What the datasketch README shows: default MinHash (SHA-1), one update() per shingle, MinHashLSH."""
    from datasketch import MinHash

    t0 = time.perf_counter()
    hashes = []
    for t in texts:
        m = MinHash(num_perm=NUM_PERM, seed=SEED)
        for s in minhash.shingles(t, NGRAM):
            m.update(s)
        hashes.append(m)
    t1 = time.perf_counter()
    labels = components(len(texts), _datasketch_clusters(hashes, _insert_one_by_one))
    return labels, {"signature_s": t1 - t0, "cluster_s": time.perf_counter() - t1}


def datasketch_bulk(texts: list[str]) -> tuple[np.ndarray, dict]:
    """datasketch at its best without leaving its API: MinHash.bulk, xxh64, affine64, an LSH insertion session."""
    from datasketch import MinHash

    t0 = time.perf_counter()
    hashes = MinHash.bulk(
        (minhash.shingles(t, NGRAM) for t in texts),
        num_perm=NUM_PERM, seed=SEED, hashfunc=xxhash.xxh64_intdigest, scheme="affine64",
    )
    t1 = time.perf_counter()
    labels = components(len(texts), _datasketch_clusters(hashes, _insert_session))
    return labels, {"signature_s": t1 - t0, "cluster_s": time.perf_counter() - t1}


METHODS = {"ours": ours, "datasketch_naive": datasketch_naive, "datasketch_bulk": datasketch_bulk}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--method", choices=list(METHODS), required=True)
    p.add_argument("--corpus", required=True)
    p.add_argument("--labels", required=True)
    a = p.parse_args()
    texts = pl.read_parquet(a.corpus, columns=["text"])["text"].to_list()
    t0 = time.perf_counter()
    labels, times = METHODS[a.method](texts)
    times["total_s"] = time.perf_counter() - t0
    np.save(a.labels, np.asarray(labels, dtype=np.int64))
    print(json.dumps(times))


if __name__ == "__main__":
    main()
