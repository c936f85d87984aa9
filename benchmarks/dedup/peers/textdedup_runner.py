"""text-dedup 0.4's MinHash (HF datasets + its own union-find); runs inside text-dedup's own venv.

    /work/bench-venvs/textdedup/bin/python benchmarks/dedup/peers/textdedup_runner.py \
        --input FILE.jsonl --work DIR --n-docs N --labels OUT.npy

Its tokeniser splits on non-word characters (Chinese text is not segmented). Prints timings as JSON.
"""

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import text_dedup.minhash as tdm
from text_dedup.utils import Timer

stage_times = {}


class RecordingTimer(Timer):
    """Keeps text-dedup's own stage timings where we can read them after its CLI returns."""

    def __init__(self):
        super().__init__()
        self.elapsed_times = stage_times


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--input", required=True)
    p.add_argument("--work", required=True)
    p.add_argument("--n-docs", type=int, required=True)
    p.add_argument("--b", type=int, default=9)
    p.add_argument("--r", type=int, default=13)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--labels", required=True)
    a = p.parse_args()

    tdm.Timer = RecordingTimer
    work = Path(a.work)
    shutil.rmtree(work, ignore_errors=True)
    t0 = time.perf_counter()
    tdm.main(
        ["--path", "json", "--data_files", a.input, "--split", "train", "--cache_dir", str(work / "cache"),
         "--output", str(work / "out"), "--column", "text", "--num_perm", "128", "--threshold", "0.8",
         "--b", str(a.b), "--r", str(a.r), "--ngram", "5", "--min_length", "0", "--hash_func", "xxh3",
         "--num_proc", str(a.workers)],
        standalone_mode=False,
    )
    total = time.perf_counter() - t0
    labels = np.array([tdm.uf.find(i) for i in range(a.n_docs)], dtype=np.int64)
    np.save(a.labels, labels)
    print(json.dumps({"signature_s": stage_times.get("MinHashing", float("nan")),
                      "cluster_s": stage_times.get("Clustering", float("nan")),
                      "total_s": total}))


if __name__ == "__main__":  # datatrove's forkserver workers re-import this file
    main()
