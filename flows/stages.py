"""The DAG: which stage needs which, where it runs, and how a stage's result is kept for the stages after it.

Stage results are small dicts (paths + fingerprint + stats). Each is written to
<storage_root>/pipeline-runs/<flow run id>/<stage>.json, the place both work pools' workers can reach, so a stage
dispatched to the GPU pool (another process, another machine) finds its inputs there, and any stage can be rerun
later against an earlier run's outputs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any, Callable

from tasks.core import storage
from tasks.core.caching import for_config
from tasks.core.config import PipelineConfig


@dataclass(frozen=True)
class Stage:
    name: str
    gpu: bool  # runs on the GPU work pool when the pipeline dispatches GPU stages
    task: Callable[[], Any]  # returns the cached Prefect task (imported lazily: torch is slow to import)
    needs: tuple[str, ...]  # earlier stages whose results are the task's arguments after cfg, in order
    keywords: tuple[tuple[str, str], ...] = ()  # (argument name, stage) passed by keyword


def _task(module: str, name: str) -> Callable[[], Any]:
    def load():
        import importlib

        return getattr(importlib.import_module(module), name)

    return load


TRAINING_STAGES = [
    Stage("base", True, _task("tasks.training.base", "base_task"), ("data",)),
    Stage("sft", True, _task("tasks.training.sft", "sft_task"), ("base", "data")),
    Stage("dpo", True, _task("tasks.training.dpo", "dpo_task"), ("sft", "data")),
    Stage("merge", True, _task("tasks.training.merge", "merge_task"), ("dpo",)),
    Stage("evaluate", True, _task("tasks.evaluation.evaluate", "evaluate_task"), ("data", "base", "sft", "dpo", "merge")),
    Stage("serve", True, _task("tasks.evaluation.serve", "serve_task"), ("merge",), (("data", "data"),)),
    Stage("promote", False, _task("tasks.evaluation.promote", "promote_task"), ("evaluate",)),
]
BY_NAME = {s.name: s for s in TRAINING_STAGES}


def run_dir(cfg: PipelineConfig, run_id: str) -> str:
    return cfg.url("pipeline-runs", run_id)


def save_result(cfg: PipelineConfig, run_id: str, stage: str, result: dict[str, Any]) -> None:
    # written whole (atomic rename locally, one PUT remotely): a reader never sees half a result
    storage.write_text(storage.join(run_dir(cfg, run_id), f"{stage}.json"), json.dumps(result, indent=1, default=str))


def load_results(cfg: PipelineConfig, run_id: str) -> dict[str, Any]:
    files = storage.list_files(run_dir(cfg, run_id), ".json")
    if not files:
        raise FileNotFoundError(f"no stage results for run {run_id} under {cfg.url('pipeline-runs')}")
    return {PurePosixPath(f).stem: json.loads(storage.read_text(f)) for f in files}


def _arguments(stage: Stage, results: dict[str, Any]) -> tuple[list[Any], dict[str, Any]]:
    return [results[n] for n in stage.needs], {arg: results[s] for arg, s in stage.keywords}


def is_cached(cfg: PipelineConfig, stage: Stage, results: dict[str, Any]) -> bool:
    """True when this stage's result for these inputs is already in Prefect's result storage.

    A cached GPU stage needs no GPU: the pipeline then takes it from the cache in its own process instead of
    dispatching a flow run to the GPU pool, which keeps a nightly run with nothing new fast."""
    import inspect

    from prefect.results import get_result_store

    task = for_config(stage.task(), cfg)
    args, kwargs = _arguments(stage, results)
    bound = inspect.signature(task.fn).bind(cfg, *args, **kwargs)
    bound.apply_defaults()  # Prefect keys a task run on every parameter, defaults included
    key = task.cache_policy.compute_key(task_ctx=None, inputs=dict(bound.arguments), flow_parameters={})
    return key is not None and get_result_store().update_for_task(task, _sync=True).exists(key)


def run_stage(cfg: PipelineConfig, stage: Stage, results: dict[str, Any], refresh: bool) -> dict[str, Any]:
    """Run one stage's cached task in this process with its inputs taken from `results`."""
    missing = [name for name in (*stage.needs, *(s for _, s in stage.keywords)) if name not in results]
    if missing:
        raise KeyError(f"stage {stage.name} needs the results of {missing}; run them first or pass a run_id that has them")
    task = for_config(stage.task(), cfg)
    if refresh:
        task = task.with_options(refresh_cache=True)
    args, kwargs = _arguments(stage, results)
    return task(cfg, *args, **kwargs)
