"""sft-pipeline: the whole DAG as one Prefect flow, and sft-stage: any one stage on its own.

  data (ingest → clean → quality → dedup → split) → base → sft → dpo → merge → evaluate → serve → promote

Every stage is a cached task: `refresh` forces named stages to recompute, `until` stops after a stage. With
`orchestration.gpu_deployment` set (the prod deployment sets it), GPU stages are dispatched to that deployment, so
they run on the GPU work pool's worker; their inputs and outputs travel through the storage root.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.deployments import run_deployment

from flows.prepare_data import DATA_STAGES, prepare
from flows.stages import (
    BY_NAME,
    TRAINING_STAGES,
    is_cached,
    load_results,
    run_stage,
    save_result,
)
from tasks.core.caching import current_run_id
from tasks.core.config import PipelineConfig, load_config

STAGES = (*DATA_STAGES, *BY_NAME)


class StageFailed(RuntimeError):
    pass


def _check_stages(until: str | None, refresh: list[str]) -> None:
    for name in [until, *refresh]:
        if name is not None and name not in STAGES and name != "all":
            raise ValueError(f"unknown stage {name!r}; stages are: {', '.join(STAGES)}")


def _dispatch(cfg: PipelineConfig, stage: str, run_id: str, config_path: str | None, overrides: Any,
              refresh: bool) -> dict[str, Any]:
    """Run one stage through the GPU deployment and read its result back from the storage root."""
    child = run_deployment(
        cfg.orchestration.gpu_deployment,
        parameters={"stage": stage, "run_id": run_id, "config_path": config_path, "overrides": overrides,
                    "refresh": refresh},
        timeout=cfg.orchestration.stage_timeout_s,
    )
    if not child.state or not child.state.is_completed():
        raise StageFailed(f"stage {stage} on {cfg.orchestration.gpu_deployment} ended "
                          f"{child.state.name if child.state else 'without a state'}: "
                          f"{child.state.message if child.state else ''}")
    return load_results(cfg, str(child.id))[stage]


@flow(name="sft-pipeline")
def sft_pipeline(config_path: str | None = None, overrides: dict[str, Any] | list[str] | None = None,
                 until: str | None = None, refresh: list[str] | None = None):
    """Run the pipeline. `overrides`: dotted `key=value` strings or a nested dict over the YAML config."""
    refresh = refresh or []
    _check_stages(until, refresh)
    cfg = load_config(config_path, overrides)
    run_id = current_run_id()
    results: dict[str, Any] = {"data": prepare(cfg, refresh)}
    save_result(cfg, run_id, "data", results["data"])
    if until in DATA_STAGES:
        return _summary(results)
    for stage in TRAINING_STAGES:
        forced = stage.name in refresh or "all" in refresh
        if stage.gpu and cfg.orchestration.gpu_deployment and (forced or not is_cached(cfg, stage, results)):
            results[stage.name] = _dispatch(cfg, stage.name, run_id, config_path, overrides, forced)
        else:
            results[stage.name] = run_stage(cfg, stage, results, forced)
        save_result(cfg, run_id, stage.name, results[stage.name])
        get_run_logger().info("stage %s: %s", stage.name, results[stage.name].get("stats", ""))
        if stage.name == until:
            return _summary(results)
    from tasks.evaluation.promote import promotion_state

    # Completed "Promoted" or Failed "PromotionRejected"; every output above is kept either way.
    return promotion_state(results["promote"])


@flow(name="sft-stage")
def sft_stage(stage: str, run_id: str, config_path: str | None = None,
              overrides: dict[str, Any] | list[str] | None = None, refresh: bool = False) -> dict[str, Any]:
    """Run one stage against the outputs of pipeline run `run_id` (e.g. rerun DPO with a new beta).

    The result is kept under this flow run's own id; the earlier run's outputs are left as they are.
    """
    if stage not in BY_NAME:
        raise ValueError(f"unknown stage {stage!r}; stages are: {', '.join(BY_NAME)}")
    cfg = load_config(config_path, overrides)
    result = run_stage(cfg, BY_NAME[stage], load_results(cfg, run_id), refresh)
    save_result(cfg, current_run_id(), stage, result)
    return result


def _summary(results: dict[str, Any]) -> dict[str, Any]:
    return {name: {k: v for k, v in r.items() if k in ("stage", "fingerprint", "stats")} for name, r in results.items()}
