"""README "Scaling dedup": our signatures in datasketch's Redis-backed MinHashLSH, against the real Redis on 127.0.0.1.

The index lives in Redis, so a second process (here: a second MinHashLSH on the same basename) queries what the
first inserted, and its candidates are exactly the pairs the pipeline's in-process banding finds."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import backends
import pytest

from tasks.data import minhash

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
NUM_PERM, SEED, NGRAM, THRESHOLD = 128, 1, 5, 0.8


@pytest.fixture
def redis_config():
    import redis

    client = redis.Redis(host=backends.REDIS_HOST, port=int(backends.REDIS_PORT), socket_connect_timeout=3)
    try:
        client.ping()
    except redis.exceptions.ConnectionError as err:
        pytest.skip(backends.unavailable(f"Redis at {backends.REDIS_HOST}:{backends.REDIS_PORT}", err))
    basename = f"sftpipe-test-{uuid.uuid4().hex[:8]}".encode()
    yield {"type": "redis", "basename": basename,
           "redis": {"host": backends.REDIS_HOST, "port": int(backends.REDIS_PORT)}}
    keys = list(client.scan_iter(match=basename + b"*"))
    if keys:
        client.delete(*keys)


def test_signatures_in_redis_lsh_give_the_pipelines_candidate_pairs(redis_config):
    from datasketch import MinHashLSH

    rows = json.loads((SHARED / "instruct_alpaca_en" / "alpaca_en_demo.json").read_text())[:200]
    texts = [" ".join([r["instruction"], r.get("input", ""), r["output"]]) for r in rows]
    texts += [t.replace(".", "!", 1) for t in texts[:40]]  # 40 near copies: one character changed
    sigs = minhash.signatures(texts, NUM_PERM, SEED, NGRAM)
    params = minhash.lsh_params(THRESHOLD, NUM_PERM)

    writer = MinHashLSH(threshold=THRESHOLD, num_perm=NUM_PERM, params=params, storage_config=redis_config)
    with writer.insertion_session() as session:
        for i, row in enumerate(sigs):
            session.insert(i, minhash.to_lean(row, SEED))

    reader = MinHashLSH(threshold=THRESHOLD, num_perm=NUM_PERM, params=params, storage_config=redis_config)
    from_redis = {(min(i, j), max(i, j)) for i, row in enumerate(sigs)
                  for j in reader.query(minhash.to_lean(row, SEED)) if j != i}
    in_process = {tuple(p) for p in minhash.candidate_pairs(sigs, THRESHOLD, SEED).tolist()}
    assert from_redis == in_process
    assert {(i, 200 + i) for i in range(40)} <= from_redis  # every near copy found
