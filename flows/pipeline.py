"""sft-pipeline: the whole DAG as one Prefect flow, and sft-stage: any one stage on its own.

  ingest → clean → quality → dedup → split → quality-report → base → sft → dpo | kto → merge → evaluate → serve
  → promote

The stages and what each takes are the table in flows/stages.py. Every stage is a cached task: `refresh` forces named
stages to recompute, `until` stops after a stage. With `orchestration.gpu_deployment` set (the prod deployment sets
it), GPU stages are dispatched to that deployment, so they run on the GPU work pool's worker; their inputs and
outputs travel through the storage root.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.deployments import run_deployment

from flows.stages import BY_NAME, Stage, check_stage_names, load_results, run_stage, run_stages, save_result
from tasks.core.caching import current_run_id
from tasks.core.config import PipelineConfig, load_config
from tasks.core.results import StageResult


class StageFailed(RuntimeError):
    pass


def _dispatcher(cfg: PipelineConfig, run_id: str, config_path: str | None, overrides: Any):
    """Run one stage through the GPU deployment and read its result back from the storage root."""

    def dispatch(stage: Stage, refresh: bool) -> StageResult:
        child = run_deployment(
            cfg.orchestration.gpu_deployment,
            parameters={"stage": stage.name, "run_id": run_id, "config_path": config_path, "overrides": overrides,
                        "refresh": refresh},
            timeout=cfg.orchestration.stage_timeout_s,
        )
        if not child.state or not child.state.is_completed():
            raise StageFailed(f"stage {stage.name} on {cfg.orchestration.gpu_deployment} ended "
                              f"{child.state.name if child.state else 'without a state'}: "
                              f"{child.state.message if child.state else ''}")
        return load_results(cfg, str(child.id))[stage.name]

    return dispatch


@flow(name="sft-pipeline")
def sft_pipeline(config_path: str | None = None, overrides: dict[str, Any] | list[str] | None = None,
                 until: str | None = None, refresh: list[str] | None = None):
    """Run the pipeline. `overrides`: dotted `key=value` strings or a nested dict over the YAML config."""
    check_stage_names(until, *(refresh or []))
    cfg = load_config(config_path, overrides)
    run_id = current_run_id()
    dispatch = _dispatcher(cfg, run_id, config_path, overrides) if cfg.orchestration.gpu_deployment else None
    results = run_stages(cfg, run_id, until=until, refresh=refresh or [], dispatch=dispatch,
                         report=lambda name, result: get_run_logger().info("stage %s: %s", name,
                                                                           result.stats))
    if "promote" not in results:
        return _summary(results)
    from tasks.evaluation.promote import promotion_state

    # Completed "Promoted" or Failed "PromotionRejected"; every output above is kept either way.
    return promotion_state(results["promote"])


@flow(name="sft-stage")
def sft_stage(stage: str, run_id: str, config_path: str | None = None,
              overrides: dict[str, Any] | list[str] | None = None, refresh: bool = False) -> StageResult:
    """Run one stage against the outputs of pipeline run `run_id` (e.g. rerun DPO with a new beta).

    The result is kept under this flow run's own id; the earlier run's outputs are left as they are.
    """
    check_stage_names(stage)
    cfg = load_config(config_path, overrides)
    result = run_stage(cfg, BY_NAME[stage], load_results(cfg, run_id), refresh)
    save_result(cfg, current_run_id(), stage, result)
    return result


def _summary(results: dict[str, StageResult]) -> dict[str, Any]:
    return {name: r.model_dump(include={"stage", "fingerprint", "stats"}) for name, r in results.items()}
