"""The DAG in one table: every stage, the stages whose results it takes, where it runs; and the one loop that runs
it (refresh, until, the cache check before dispatching a GPU stage, saving each result).

Stage results are small typed objects (tasks.core.results: paths + fingerprint + stats). Each is written to
<storage_root>/pipeline-runs/<flow run id>/<stage>.json, the place both work pools' workers can reach, so a stage
dispatched to the GPU pool (another process, another machine) finds its inputs there, and any stage can be rerun
later against an earlier run's outputs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from tasks.core import storage
from tasks.core.caching import for_config
from tasks.core.config import PipelineConfig
from tasks.core.results import DataResult, StageResult, load_result

# An input naming this stage gets the result of the preference method the config selects (dpo or kto).
PREFERENCE = "preference"


@dataclass(frozen=True)
class Stage:
    name: str
    task: str  # "module:attribute" of the cached Prefect task, imported when used (torch is slow to import)
    inputs: dict[str, str] = field(default_factory=dict)  # task argument -> the stage whose result it receives
    gpu: bool = False  # runs on the GPU work pool when the pipeline dispatches GPU stages
    method: str | None = None  # a preference method: runs only when preference.method selects it
    # How the task is called when it is not task(cfg, **inputs); gets `bound` (a task -> it with this run's result
    # storage and refresh), cfg and the inputs.
    call: Callable[..., Any] | None = None

    def load_task(self):
        import importlib

        module, name = self.task.split(":")
        return getattr(importlib.import_module(module), name)

    def runs_for(self, cfg: PipelineConfig) -> bool:
        return self.method is None or self.method == cfg.preference.method


def _ingest(bound, cfg: PipelineConfig):
    from tasks.core.warehouse import warehouse_id
    from tasks.data.ingest import ingest_task, input_fingerprint

    # Keyed on the input files' content and the warehouse's identity: unchanged files are not even opened.
    return bound(ingest_task)(cfg, input_fingerprint(cfg), warehouse_id(cfg.warehouse_url))


def _dedup(bound, cfg: PipelineConfig, clean: DataResult):
    from prefect import unmapped

    from tasks.data.dedup import dedup_task, signature_shard_task

    # Signature shards are separate tasks, so a Dask task runner spreads them over workers.
    shards = bound(signature_shard_task).map(unmapped(cfg), unmapped(clean), range(cfg.data.dedup.shards))
    return bound(dedup_task)(cfg, clean, shards.result())


DATA = "split"  # the training plane reads the split warehouse
STAGES = (
    Stage("ingest", "tasks.data.ingest:ingest_task", call=_ingest),
    Stage("clean", "tasks.data.clean:clean_task", {"ingest": "ingest"}),
    Stage("quality", "tasks.data.quality:quality_task", {"clean": "clean"}),
    Stage("dedup", "tasks.data.dedup:dedup_task", {"clean": "quality"}, call=_dedup),  # reads curated_rows
    Stage("split", "tasks.data.split:split_task", {"dedup": "dedup"}),
    Stage("quality-report", "tasks.data.quality_report:quality_report_task", {"split": "split"}),
    Stage("base", "tasks.training.base:base_task", {"data": DATA}, gpu=True),
    Stage("sft", "tasks.training.sft:sft_task", {"base": "base", "data": DATA}, gpu=True),
    Stage("dpo", "tasks.training.dpo:dpo_task", {"sft": "sft", "data": DATA}, gpu=True, method="dpo"),
    Stage("kto", "tasks.training.kto:kto_task", {"sft": "sft", "data": DATA}, gpu=True, method="kto"),
    Stage("merge", "tasks.training.merge:merge_task", {"dpo_or_sft": PREFERENCE}, gpu=True),
    Stage("evaluate", "tasks.evaluation.evaluate:evaluate_task",
          {"data": DATA, "base": "base", "sft": "sft", "preference": PREFERENCE, "merged": "merge"}, gpu=True),
    Stage("serve", "tasks.evaluation.serve:serve_task", {"merged": "merge", "data": DATA}, gpu=True),
    Stage("promote", "tasks.evaluation.promote:promote_task", {"evaluation": "evaluate"}),
)
BY_NAME = {s.name: s for s in STAGES}


def check_stage_names(*names: str | None) -> None:
    for name in names:
        if name is not None and name not in BY_NAME and name != "all":
            raise ValueError(f"unknown stage {name!r}; stages are: {', '.join(BY_NAME)}")


def run_dir(cfg: PipelineConfig, run_id: str) -> str:
    return cfg.url("pipeline-runs", run_id)


def save_result(cfg: PipelineConfig, run_id: str, stage: str, result: StageResult) -> None:
    # written whole (atomic rename locally, one PUT remotely): a reader never sees half a result
    storage.write_text(storage.join(run_dir(cfg, run_id), f"{stage}.json"), result.to_json())


def load_results(cfg: PipelineConfig, run_id: str) -> dict[str, StageResult]:
    files = storage.list_files(run_dir(cfg, run_id), ".json")
    if not files:
        raise FileNotFoundError(f"no stage results for run {run_id} under {cfg.url('pipeline-runs')}")
    return {PurePosixPath(f).stem: load_result(storage.read_text(f)) for f in files}


def _inputs(cfg: PipelineConfig, stage: Stage, results: dict[str, StageResult]) -> dict[str, StageResult]:
    sources = {arg: cfg.preference.method if src == PREFERENCE else src for arg, src in stage.inputs.items()}
    missing = [src for src in sources.values() if src not in results]
    if missing:
        raise KeyError(f"stage {stage.name} needs the results of {missing}; run them first or pass a run_id that "
                       "has them")
    return {arg: results[src] for arg, src in sources.items()}


def is_cached(cfg: PipelineConfig, stage: Stage, results: dict[str, StageResult]) -> bool:
    """True when this stage's result for these inputs is already in Prefect's result storage.

    A cached GPU stage needs no GPU: the pipeline then takes it from the cache in its own process instead of
    dispatching a flow run to the GPU pool, which keeps a nightly run with nothing new fast."""
    import inspect

    from prefect.results import get_result_store

    task = for_config(stage.load_task(), cfg)
    bound = inspect.signature(task.fn).bind(cfg, **_inputs(cfg, stage, results))
    bound.apply_defaults()  # Prefect keys a task run on every parameter, defaults included
    key = task.cache_policy.compute_key(task_ctx=None, inputs=dict(bound.arguments), flow_parameters={})
    return key is not None and get_result_store().update_for_task(task, _sync=True).exists(key)


def run_stage(cfg: PipelineConfig, stage: Stage, results: dict[str, StageResult], refresh: bool) -> StageResult:
    """Run one stage's cached task in this process with its inputs taken from `results`."""
    def bound(prefect_task):
        prefect_task = for_config(prefect_task, cfg)
        return prefect_task.with_options(refresh_cache=True) if refresh else prefect_task

    inputs = _inputs(cfg, stage, results)
    if stage.call is not None:
        return stage.call(bound, cfg, **inputs)
    return bound(stage.load_task())(cfg, **inputs)


Dispatch = Callable[[Stage, bool], StageResult]  # (stage, refresh) -> its result, computed elsewhere


def run_stages(cfg: PipelineConfig, run_id: str, *, results: dict[str, StageResult] | None = None,
               until: str | None = None, refresh: list[str] = (), dispatch: Dispatch | None = None,
               report: Callable[[str, StageResult], None] = lambda name, result: None) -> dict[str, StageResult]:
    """Run the table in order up to `until` (or all of it), each stage from cache when its inputs, config and code
    are unchanged; `refresh` names stages to recompute (or "all"). A GPU stage that is not cached goes to
    `dispatch` when given. Every result is saved under the run; returns them by stage name."""
    from tasks.training.mlflow_tracking import pipeline_run

    results = dict(results or {})
    check_stage_names(until, *refresh)
    if until in BY_NAME and not BY_NAME[until].runs_for(cfg):
        raise ValueError(f"stage {until} does not run with preference.method={cfg.preference.method}")
    with pipeline_run(cfg, run_id) as tracker:  # the MLflow run, when tracking.mlflow_uri is set
        for stage in STAGES:
            if not stage.runs_for(cfg):
                continue
            forced = stage.name in refresh or "all" in refresh
            if stage.gpu and dispatch is not None and (forced or not is_cached(cfg, stage, results)):
                results[stage.name] = dispatch(stage, forced)
            else:
                results[stage.name] = run_stage(cfg, stage, results, forced)
            save_result(cfg, run_id, stage.name, results[stage.name])
            tracker.stage_finished(stage.name, results[stage.name])
            report(stage.name, results[stage.name])
            if stage.name == until:
                break
    return results
