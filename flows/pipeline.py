"""sft-pipeline: the whole DAG, data → training → evaluation → serving, as one Prefect flow.

Every stage is a cached task; `refresh` forces named stages to recompute, `until` stops after a stage, so one
stage can be rerun alone against the outputs of earlier runs: `refresh=["dpo"], until="dpo"`.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.prepare_data import DATA_STAGES, prepare
from tasks.config import load_config

STAGES = DATA_STAGES


def _check_stages(until: str | None, refresh: list[str]) -> None:
    for name in [until, *refresh]:
        if name is not None and name not in STAGES and name != "all":
            raise ValueError(f"unknown stage {name!r}; stages are: {', '.join(STAGES)}")


@flow(name="sft-pipeline", log_prints=True)
def sft_pipeline(config_path: str | None = None, overrides: dict[str, Any] | list[str] | None = None,
                 until: str | None = None, refresh: list[str] | None = None) -> dict[str, Any]:
    """Run the pipeline. `overrides`: dotted `key=value` strings or a nested dict over the YAML config."""
    refresh = refresh or []
    _check_stages(until, refresh)
    cfg = load_config(config_path, overrides)
    results: dict[str, Any] = {}
    results["data"] = prepare(cfg, refresh)
    return {name: {k: v for k, v in r.items() if k in ("stage", "fingerprint", "stats")} for name, r in results.items()}
