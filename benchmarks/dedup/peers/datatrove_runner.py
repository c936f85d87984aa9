"""datatrove's MinHash pipeline on JSONL shards; runs inside datatrove's own venv (it needs xxhash<4).

    /work/bench-venvs/datatrove/bin/python benchmarks/dedup/peers/datatrove_runner.py \
        --input DIR --work DIR --n-docs N --lang en --buckets 9 --rows 13 --labels OUT.npy

Prints {"signature_s", "cluster_s", "total_s"} as JSON. Documents are numbered by shard order then line order;
labels are datatrove's cluster ids (documents in no cluster get their own).
"""

import argparse
import json
import shutil
import struct
import time
from pathlib import Path

import numpy as np
from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.dedup.minhash import (
    MinhashConfig,
    MinhashDedupBuckets,
    MinhashDedupCluster,
    MinhashDedupSignature,
)
from datatrove.pipeline.readers import JsonlReader
from datatrove.utils.hashing import HashConfig


def minhash_config(buckets: int, rows: int) -> MinhashConfig:
    """The comparison's settings in datatrove's terms: 64-bit xxhash, word 5-grams, buckets x rows permutations."""
    return MinhashConfig(hash_config=HashConfig(precision=64, hash_fc="xxhash"), n_grams=5,
                         num_buckets=buckets, hashes_per_bucket=rows)


def minhash_stages(reader, tasks: int, work: Path, config: MinhashConfig, language: str, workers: int) -> dict:
    """datatrove's first three MinHash stages (signatures, buckets, clusters with ids) under work/; their times."""
    common = dict(logging_dir=str(work / "logs"), skip_completed=False)
    t0 = time.perf_counter()
    LocalPipelineExecutor(
        pipeline=[reader, MinhashDedupSignature(output_folder=str(work / "sigs"), config=config, language=language)],
        tasks=tasks, workers=workers, **common,
    ).run()
    t1 = time.perf_counter()
    LocalPipelineExecutor(
        pipeline=[MinhashDedupBuckets(input_folder=str(work / "sigs"), output_folder=str(work / "buckets"), config=config)],
        tasks=config.num_buckets, workers=workers, **common,
    ).run()
    t2 = time.perf_counter()
    LocalPipelineExecutor(
        pipeline=[MinhashDedupCluster(input_folder=str(work / "buckets"), output_folder=str(work / "clusters"),
                                      config=config, save_cluster_id=True)],
        tasks=1, workers=1, **common,
    ).run()
    t3 = time.perf_counter()
    return {"signature_s": t1 - t0, "buckets_s": t2 - t1, "clusters_s": t3 - t2}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--input", required=True)
    p.add_argument("--work", required=True)
    p.add_argument("--n-docs", type=int, required=True)
    p.add_argument("--lang", default="en")
    p.add_argument("--buckets", type=int, default=14)
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--labels", required=True)
    a = p.parse_args()

    work = Path(a.work)
    shutil.rmtree(work, ignore_errors=True)
    shards = sorted(Path(a.input).glob("*.jsonl"))
    config = minhash_config(a.buckets, a.rows)
    language = "cmn" if a.lang == "zh" else "en"  # "zh" does not segment Chinese in datatrove 0.10

    t0 = time.perf_counter()
    times = minhash_stages(JsonlReader(a.input, text_key="text", id_key="id"), len(shards), work, config, language,
                           a.workers)
    t1, t2 = t0 + times["signature_s"], time.perf_counter()

    # Map datatrove's (shard rank, document index) cluster ids back to corpus order.
    offsets = np.cumsum([0] + [sum(1 for _ in open(s, "rb")) for s in shards])
    labels = np.arange(a.n_docs, dtype=np.int64)
    cluster_first = {}
    for rank in range(len(shards)):
        f = work / "clusters" / f"{rank:06d}.clusters"
        if not f.exists():
            continue
        data = f.read_bytes()
        for doc, cid in struct.iter_unpack("<II", data):
            gid = int(offsets[rank] + doc)
            cluster_first.setdefault(cid, []).append(gid)
    for members in cluster_first.values():
        labels[members] = min(members)
    np.save(a.labels, labels)
    print(json.dumps({"signature_s": t1 - t0, "cluster_s": t2 - t1, "total_s": t2 - t0}))


if __name__ == "__main__":  # datatrove's forkserver workers re-import this file
    main()
