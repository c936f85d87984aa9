"""MLflow tracking (cfg.tracking.mlflow_uri): each pipeline run is an MLflow run with one nested run per stage, and
the merged model goes into MLflow's model registry.

Logged from the pipeline's loop as each stage finishes (flows/stages.py), from the stage's result and the files it
names: a stage served from Prefect's cache or run on the GPU pool is logged like one that ran here, and every MLflow
run shows the whole pipeline. What goes where:
- the pipeline run: params = the effective config, flattened (`sft.learning_rate`, ...); metrics = the data stages'
  counts (`data/<stage>/<count>`), every variant's eval figures (`eval/<variant>/<metric>/<split>`), `promoted`;
  artifacts = `eval/` (the eval report and the sample answers) and `merged-model/` (the registered model's files).
- a nested run per stage: its numeric stats, and for a training stage (base warm-up, sft, dpo, kto) its curves,
  every point at its training step and time (`loss`, `eval_loss`, `learning_rate`, `rewards/margins`, ...).
- the registry: every candidate the promote stage decided on becomes a version of `tracking.registry_model`, tagged
  with the decision and its reasons; a promoted one also gets the alias `tracking.registry_alias` (default prod), so
  `models:/<name>@prod` is always the model that serves now, and a rejected candidate stays findable without it.

It sits beside tracking.py in the training plane and reads the other stages' results as plain dicts and files,
importing nothing from the planes above. MlflowClient throughout (a nested run is a run tagged with its parent, as
mlflow.start_run(nested=True) makes it): its calls carry the tracking URI themselves, with no process-global active
run, which several pipelines in one process (the tests, a Prefect worker) would share.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tasks.core import storage
from tasks.core.results import StageResult

log = logging.getLogger("sftpipe.mlflow")

RUN_TAG = "sftpipe.pipeline_run_id"
EVAL_RUN_TAG = "sftpipe.eval_run_id"
DATA_STAGES = ("ingest", "clean", "quality", "dedup", "split", "quality-report")
TRAINING_STAGES = ("base", "sft", "dpo", "kto")


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists and scalars are leaves."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def metric_key(name: str) -> str:
    """MLflow allows letters, digits, _ - . space : / in metric names."""
    return re.sub(r"[^\w\-. :/]", "_", name)


def numeric(tree: dict, prefix: str = "") -> dict[str, float]:
    """The finite numbers in a (nested) stats dict, by flattened, MLflow-safe name; booleans are left out."""
    return {metric_key(k): float(v) for k, v in flatten(tree, prefix).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}


def _metrics(values: dict[str, float], step: int = 0, timestamp_ms: int | None = None) -> list:
    from mlflow.entities import Metric

    now = timestamp_ms or int(time.time() * 1000)
    return [Metric(k, v, now, step) for k, v in values.items()]


class MlflowPipelineRun:
    """One pipeline run (a Prefect flow run id) as an MLflow run; `stage_finished` logs each stage under it."""

    def __init__(self, cfg, pipeline_run_id: str):
        from mlflow import MlflowClient

        # MLflow prints a "View run" line per ended run; the pipeline logs the run's URL once itself.
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        self.cfg, self.pipeline_run_id = cfg, pipeline_run_id
        uri = cfg.tracking.mlflow_uri
        self.client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        experiment = self.client.get_experiment_by_name(cfg.tracking.mlflow_experiment)
        # "custom_model_development": the UI opens it as a training experiment (curves, params), not a GenAI one
        self.experiment_id = (experiment.experiment_id if experiment else self.client.create_experiment(
            cfg.tracking.mlflow_experiment, tags={"mlflow.experimentKind": "custom_model_development"}))
        # A retried flow run continues its MLflow run rather than starting a second one.
        found = self.client.search_runs([self.experiment_id], f"tags.`{RUN_TAG}` = '{pipeline_run_id}'",
                                        max_results=1)
        if found:
            self.run = found[0]
            self.client.update_run(self.run.info.run_id, status="RUNNING")
        else:
            self.run = self.client.create_run(self.experiment_id, run_name=f"sft-pipeline {pipeline_run_id[:8]}",
                                              tags={RUN_TAG: pipeline_run_id})
            self._log(self.run_id, params={k: json.dumps(v) if isinstance(v, (list, dict)) else str(v)
                                           for k, v in flatten(cfg.model_dump(mode="json")).items()})
        self.stage_runs: dict[str, str] = {}

    @property
    def run_id(self) -> str:
        return self.run.info.run_id

    @property
    def url(self) -> str:
        return f"{self.cfg.tracking.mlflow_uri.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{self.run_id}"

    def _log(self, run_id: str, metrics: list | None = None, params: dict | None = None,
             tags: dict | None = None) -> None:
        from mlflow.entities import Param, RunTag

        self.client.log_batch(run_id, metrics=metrics or [], params=[Param(k, v) for k, v in (params or {}).items()],
                              tags=[RunTag(k, str(v)) for k, v in (tags or {}).items()])

    def stage_finished(self, name: str, result: StageResult) -> None:
        """Log a finished stage; a tracker that fails is a warning, not a failed pipeline (its outputs and the
        warehouse hold everything)."""
        try:
            self._stage(name, result.model_dump())
        except Exception as err:  # noqa: BLE001 - an MLflow outage must not fail a finished stage
            log.warning("MLflow: could not log stage %s to %s: %s", name, self.cfg.tracking.mlflow_uri, err)

    def _stage(self, name: str, result: dict) -> None:
        stats = numeric(result.get("stats") or {})
        # the nested run spans the stage's own wall time (when it reports one), not the moment it was logged
        ended = int(time.time() * 1000)
        child = self.client.create_run(
            self.experiment_id, run_name=name, start_time=ended - int(1000 * stats.get("wall_s", 0)),
            tags={"mlflow.parentRunId": self.run_id, "sftpipe.stage": name})  # RUN_TAG names the pipeline run only
        child_id = self.stage_runs[name] = child.info.run_id
        self._log(child_id, metrics=_metrics(stats),
                  params={"fingerprint": str(result.get("fingerprint"))} if result.get("fingerprint") else None)
        if name in DATA_STAGES:
            self._log(self.run_id, metrics=_metrics({f"data/{name}/{k}": v for k, v in stats.items()}))
        if name in TRAINING_STAGES:
            self._log(child_id, metrics=_curves(result))
        if name == "evaluate":
            self._evaluation(child_id, result)
        if name == "promote":
            self._promotion(result)
        self.client.set_terminated(child_id, end_time=ended)

    def _evaluation(self, child_id: str, result: dict) -> None:
        per_variant = {f"{variant}/{k}": v for variant, values in (result.get("metrics") or {}).items()
                       for k, v in numeric(values).items()}
        self._log(child_id, metrics=_metrics(per_variant), tags={EVAL_RUN_TAG: result.get("run_id")})
        self._log(self.run_id, metrics=_metrics({f"eval/{k}": v for k, v in per_variant.items()}),
                  tags={EVAL_RUN_TAG: result.get("run_id")})
        for key in ("report_path", "samples_path"):
            if result.get(key) and storage.exists(result[key]):
                self._artifact(result[key], "eval")

    def _artifact(self, url: str, folder: str) -> None:
        if storage.is_local(url):
            self.client.log_artifact(self.run_id, str(url), folder)
            return
        with tempfile.TemporaryDirectory() as tmp:  # a file under a bucket root: its text, under its own name
            local = Path(tmp) / Path(str(url)).name
            local.write_text(storage.read_text(url))
            self.client.log_artifact(self.run_id, str(local), folder)

    def _promotion(self, result: dict) -> None:
        """Register the candidate as a version of the registered model (once per eval run, so a cached rerun adds
        none); the alias moves to it only when it was promoted."""
        from mlflow.exceptions import MlflowException

        name, alias = self.cfg.tracking.registry_model, self.cfg.tracking.registry_alias
        try:
            self.client.get_registered_model(name)
        except MlflowException:
            self.client.create_registered_model(name, description="Merged models of sft-pipeline runs; the alias "
                                                f"{alias!r} marks the promoted one that serves.")
        eval_run = str(result["run_id"])
        versions = self.client.search_model_versions(f"name = '{name}' and tags.`{EVAL_RUN_TAG}` = '{eval_run}'")
        if versions:
            version = versions[0]
        else:
            model_dir = storage.fetched(result["model_path"])
            self.client.log_artifacts(self.run_id, model_dir, "merged-model")
            reasons = "; ".join(result.get("reasons") or [])
            version = self.client.create_model_version(
                name, f"{self.run.info.artifact_uri}/merged-model", run_id=self.run_id,
                tags={EVAL_RUN_TAG: eval_run, "decision": result["decision"], "variant": result.get("variant"),
                      "model_path": result["model_path"], "reasons": reasons[:5000]},
                description=f"{result['decision']}" + (f": {reasons}" if reasons else ""))
        if result.get("promoted"):
            self.client.set_registered_model_alias(name, alias, version.version)
        self._log(self.run_id, metrics=_metrics({"promoted": 1.0 if result.get("promoted") else 0.0}),
                  tags={"sftpipe.promotion": result["decision"], "sftpipe.model_version": version.version})

    def finish(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status=status)


def _curves(result: dict) -> list:
    """A training stage's metrics.jsonl as MLflow metrics at their steps and times (the last point per step and
    metric, as in the warehouse's training_curves)."""
    from mlflow.entities import Metric

    folder = result.get("out_dir") or result.get("path")
    if not folder:
        return []
    rows = storage.read_jsonl(storage.join(folder, "metrics.jsonl"))
    last = {(r["step"], r["metric"]): r for r in rows}
    return [Metric(metric_key(r["metric"]), float(r["value"]), int(r["time"] * 1000), int(r["step"]))
            for r in last.values()]


class _Off:
    url = None

    def stage_finished(self, name: str, result: StageResult) -> None:
        pass


@contextmanager
def pipeline_run(cfg, pipeline_run_id: str):
    """The MLflow run of one pipeline run while its stages run (a no-op without tracking.mlflow_uri); ends FINISHED,
    or FAILED when a stage raised. An unreachable server fails here, before any stage has run."""
    if not cfg.tracking.mlflow_uri:
        yield _Off()
        return
    run = MlflowPipelineRun(cfg, pipeline_run_id)
    log.info("MLflow run: %s", run.url)
    try:
        yield run
    except BaseException:
        run.finish("FAILED")
        raise
    run.finish("FINISHED")
