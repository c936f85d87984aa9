"""Orchestration overhead: a cold run of the whole pipeline, a fully cached rerun, and a rerun with a new DPO beta.

    .venv/bin/python -m benchmarks.orchestration.run [--repeats 3]

All runs happen in one process against one Prefect server, so imports are paid once (the cached-rerun target is
"< 10 s after imports"). Which stages really ran is read back from the Prefect API, not assumed. Writes
benchmarks/results/orchestration.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

RESULTS = Path(__file__).resolve().parents[1] / "results"
STAGE_TASKS = ("ingest", "clean", "minhash-shard", "dedup", "split", "base", "sft", "dpo", "merge", "evaluate",
               "serve", "promote")


def stages_run(flow_run_id) -> dict[str, str]:
    """Stage → "ran" or "cached" for one flow run, from its task runs."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    out: dict[str, str] = {}
    for r in runs:
        stage = r.name.rsplit("-", 1)[0]
        if stage in STAGE_TASKS:
            ran = r.state.name != "Cached"
            out[stage] = "ran" if ran or out.get(stage) == "ran" else "cached"
    return out


def timed_run(overrides: list[str]) -> tuple[float, dict[str, str], str]:
    from flows.pipeline import sft_pipeline

    started = time.perf_counter()
    state = sft_pipeline(overrides=overrides, return_state=True)
    wall = time.perf_counter() - started
    return wall, stages_run(state.state_details.flow_run_id), state.name


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--root", default="benchmarks/out/orchestration")
    args = parser.parse_args()
    root = Path(args.root)
    shutil.rmtree(root, ignore_errors=True)
    os.environ.setdefault("PREFECT_RESULTS_LOCAL_STORAGE_PATH", str((root / "prefect-results").resolve()))
    base = [f"storage_root={root}"]

    t0 = time.perf_counter()
    import tasks.training.dpo  # noqa: E401, F401

    import flows.pipeline  # noqa: F401  (imports torch, transformers, trl, prefect)
    imports = time.perf_counter() - t0

    cold, cold_stages, cold_state = timed_run(base)
    cached = [timed_run(base) for _ in range(args.repeats)]
    betas = [timed_run(base + [f"dpo.beta={0.2 + 0.1 * i}"]) for i in range(args.repeats)]

    def summary(runs):
        walls = [w for w, _, _ in runs]
        return {"median_s": round(statistics.median(walls), 2), "min_s": round(min(walls), 2),
                "max_s": round(max(walls), 2), "runs": len(walls), "stages": runs[-1][1], "final_state": runs[-1][2]}

    result = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "imports_s": round(imports, 2),
        "cold": {"wall_s": round(cold, 2), "stages": cold_stages, "final_state": cold_state},
        "cached_rerun": summary(cached),
        "new_dpo_beta": summary(betas),
        "target_cached_rerun_s": 10,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "orchestration.json").write_text(json.dumps(result, indent=2))
    ran = lambda s: ", ".join(k for k, v in s.items() if v == "ran") or "none"  # noqa: E731
    md = [
        "| run | wall (median of {}) | min–max | stages that ran |".format(args.repeats),
        "|---|---|---|---|",
        f"| cold (baseline) | {cold:.1f} s | – | {ran(cold_stages)} |",
        f"| fully cached rerun | {result['cached_rerun']['median_s']} s | {result['cached_rerun']['min_s']}–"
        f"{result['cached_rerun']['max_s']} s | {ran(result['cached_rerun']['stages'])} |",
        f"| new DPO beta | {result['new_dpo_beta']['median_s']} s | {result['new_dpo_beta']['min_s']}–"
        f"{result['new_dpo_beta']['max_s']} s | {ran(result['new_dpo_beta']['stages'])} |",
        "",
        f"Imports (torch, transformers, trl, prefect) took {imports:.1f} s once, before the runs.",
    ]
    (RESULTS / "orchestration.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
