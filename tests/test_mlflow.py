"""MLflow tracking against a real `mlflow server` (PostgreSQL backend store, conftest.mlflow_server): the pipeline run
with its config, nested stage runs with data counts and training curves, eval metrics per variant, the eval report,
and the model registry's versions and alias after a promotion and a rejection. The run page and TensorBoard's
scalars are looked at in headless Chromium."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from browser import chromium, page_shows
from conftest import free_port, stop_group, wait_up
from eval_fixtures import DATA_FILES, chat_model
from training_fixtures import STORIES_BASE, alpaca_examples, make_warehouse, small_config

from tasks.core.config import load_config
from tasks.core.results import ModelResult, load_result
from tasks.training.mlflow_tracking import pipeline_run
from tasks.training.tracking import read_curves

pytestmark = pytest.mark.slow

EVAL = {"eval.max_examples": 8, "eval.max_generate_examples": 4, "eval.max_new_tokens": 8, "eval.batch_size": 8,
        "eval.bootstrap_resamples": 200}


def _client(server):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=server["uri"], registry_uri=server["uri"])


def _children(client, run) -> dict[str, object]:
    """The nested runs of `run` by stage name (all of them: a stage logged twice appears as a list)."""
    found = client.search_runs([run.info.experiment_id], f"tags.`mlflow.parentRunId` = '{run.info.run_id}'",
                               order_by=["attributes.start_time ASC"])
    by_name: dict[str, list] = {}
    for r in found:
        by_name.setdefault(r.info.run_name, []).append(r)
    return {name: runs[0] if len(runs) == 1 else runs for name, runs in by_name.items()}


def _pipeline_run(client, experiment: str, run_id: str):
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id],
                                f"tags.`sftpipe.pipeline_run_id` = '{run_id}'")
    return run


def test_data_stages_of_a_flow_run_are_logged(mlflow_server, tmp_path):
    """The prepare-data flow (the sft-pipeline flow's data stages, through the same loop) with tracking.mlflow_uri."""
    from flows.prepare_data import prepare_data

    overrides = [f"storage_root={tmp_path / 'runs'}", f"tracking.mlflow_uri={mlflow_server['uri']}",
                 "tracking.mlflow_experiment=data-plane", "data.split.validation=0.05", "data.split.test=0.05",
                 f"data.ingest.inputs={json.dumps(list(map(str, DATA_FILES)))}"]
    state = prepare_data(overrides=overrides, return_state=True)
    assert state.is_completed(), state.message
    flow_run_id = str(state.state_details.flow_run_id)
    results = {stage: load_result((tmp_path / "runs" / "pipeline-runs" / flow_run_id / f"{stage}.json").read_text())
               for stage in ("ingest", "clean", "quality", "dedup", "split", "quality-report")}
    client = _client(mlflow_server)
    run = _pipeline_run(client, "data-plane", flow_run_id)
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["data.split.test"] == "0.05" and params["sft.max_steps"] == str(load_config().sft.max_steps)
    assert params["tracking.mlflow_uri"] == mlflow_server["uri"] and len(params) > 100
    children = _children(client, run)
    assert set(children) == set(results)
    for stage, result in results.items():
        assert children[stage].data.params["fingerprint"] == result.fingerprint
        counts = {k: v for k, v in run.data.metrics.items() if k.startswith(f"data/{stage}/")}
        assert counts == {f"data/{stage}/{k}": v for k, v in children[stage].data.metrics.items()}
    assert max(v for k, v in run.data.metrics.items() if k.startswith("data/ingest/")) > 10  # three real datasets

    # a stage that raises ends the MLflow run FAILED
    failed = prepare_data(overrides=[*overrides[:-1], f"data.ingest.inputs=[{tmp_path / 'missing.json'}]"],
                          return_state=True)
    assert failed.is_failed()
    assert _pipeline_run(client, "data-plane", str(failed.state_details.flow_run_id)).info.status == "FAILED"


@pytest.fixture(scope="module")
def tracked(mlflow_server, tmp_path_factory):
    """Two pipeline runs' training-plane stages on stories260K, logged as the pipeline logs them: the first (sft,
    merge, evaluate, promote) is promoted over its base; the second offers the pretrained model, worse than the
    promoted one, and is rejected."""
    from tasks.evaluation.evaluate import run_eval
    from tasks.evaluation.promote import run_promote
    from tasks.training.merge import run_merge
    from tasks.training.sft import run_sft

    root = tmp_path_factory.mktemp("tracked")
    data = make_warehouse(root / "warehouse.duckdb", sft={"train": alpaca_examples(96),
                                                          "validation": alpaca_examples(16, offset=96),
                                                          "test": alpaca_examples(12, offset=112)})
    cfg = small_config(root / "runs", **{"sft.max_steps": 10, "sft.eval_steps": 5, "sft.save_steps": 10,
                                         "sft.logging_steps": 2, "tracking.mlflow_uri": mlflow_server["uri"],
                                         **EVAL})
    base = STORIES_BASE.model_copy(update={"path": str(chat_model(root / "stories-chat"))})
    with pipeline_run(cfg, "first-run") as first:
        sft = run_sft(cfg, STORIES_BASE, data)
        first.stage_finished("sft", sft)
        merged = run_merge(cfg, sft)
        first.stage_finished("merge", merged)
        evaluation = run_eval(cfg, data, {"base": base, "sft": sft, "merged": merged})
        first.stage_finished("evaluate", evaluation)
        promoted = run_promote(cfg, evaluation)
        first.stage_finished("promote", promoted)
        first.stage_finished("promote", promoted)  # a cached rerun registers nothing new
    with pipeline_run(cfg, "second-run") as second:
        worse = run_eval(cfg, data, {"base": base, "merged": ModelResult(stage="merge", fingerprint="pretrained",
                                                                         path=base.path)})
        second.stage_finished("evaluate", worse)
        rejected = run_promote(cfg, worse)
        second.stage_finished("promote", rejected)
    assert promoted.promoted and not rejected.promoted, (promoted.reasons, rejected.reasons)
    return {"cfg": cfg, "root": root, "first": first, "second": second, "sft": sft, "evaluation": evaluation}


def test_curves_and_eval_metrics_per_variant(mlflow_server, tracked):
    client = _client(mlflow_server)
    run = client.get_run(tracked["first"].run_id)
    assert run.info.status == "FINISHED" and run.data.params["sft.max_steps"] == "10"
    children = _children(client, run)
    assert set(children) == {"sft", "merge", "evaluate", "promote"} and len(children["promote"]) == 2
    sft = children["sft"]
    loss = client.get_metric_history(sft.info.run_id, "loss")
    assert [m.step for m in loss] == [2, 4, 6, 8, 10]
    assert [m.step for m in client.get_metric_history(sft.info.run_id, "eval_loss")] == [0, 5, 10]
    curves = {r["step"]: r["value"] for r in read_curves(Path(tracked["sft"].out_dir) / "metrics.jsonl")
              if r["metric"] == "loss"}
    assert [m.value for m in loss] == pytest.approx([curves[m.step] for m in loss])
    assert sft.data.metrics["wall_s"] == tracked["sft"].stats["wall_s"]

    metrics = run.data.metrics
    for variant in ("base", "sft", "merged"):
        for name in ("perplexity/test", "perplexity/validation", "rougeL/test"):
            assert metrics[f"eval/{variant}/{name}"] == pytest.approx(tracked["evaluation"].metrics[variant][name])
    assert metrics["eval/merged/perplexity/test"] < metrics["eval/base/perplexity/test"]
    assert children["evaluate"].data.metrics["merged/perplexity/test"] == metrics["eval/merged/perplexity/test"]
    assert metrics["promoted"] == 1.0 and run.data.tags["sftpipe.promotion"] == "promoted"

    eval_files = sorted(f.path for f in client.list_artifacts(run.info.run_id, "eval"))
    report = Path(tracked["evaluation"].report_path).name
    assert eval_files == sorted([f"eval/{report}", f"eval/{Path(tracked['evaluation'].samples_path).name}"])
    local = client.download_artifacts(run.info.run_id, f"eval/{report}", str(tracked["root"] / "downloaded"))
    assert Path(local).read_text() == Path(tracked["evaluation"].report_path).read_text()


def test_registry_alias_on_the_promoted_version_only(mlflow_server, tracked):
    from mlflow.exceptions import MlflowException

    client = _client(mlflow_server)
    name, alias = tracked["cfg"].tracking.registry_model, tracked["cfg"].tracking.registry_alias
    versions = {v.tags["decision"]: v for v in client.search_model_versions(f"name = '{name}'")}
    assert set(versions) == {"promoted", "rejected"}  # one version per candidate, the cached rerun added none
    prod = client.get_model_version_by_alias(name, alias)
    assert prod.version == versions["promoted"].version and prod.run_id == tracked["first"].run_id
    rejected = client.get_model_version(name, versions["rejected"].version)
    assert rejected.aliases == [] and rejected.run_id == tracked["second"].run_id
    assert "perplexity (test) rose" in rejected.tags["reasons"]
    assert client.get_run(tracked["second"].run_id).data.tags["sftpipe.promotion"] == "rejected"
    # the version's files are the merged model, loadable from the registry's source
    model_dir = client.download_artifacts(prod.run_id, "merged-model", str(tracked["root"] / "registry"))
    assert {"model.safetensors", "config.json", "tokenizer.json", "chat_template.jinja"} <= \
        {p.name for p in Path(model_dir).iterdir()}
    with pytest.raises(MlflowException):
        client.get_model_version_by_alias(name, "no-such-alias")


def test_mlflow_run_page_shows_the_curves_in_chromium(mlflow_server, tracked):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    client = _client(mlflow_server)
    run = client.get_run(tracked["first"].run_id)
    sft = _children(client, run)["sft"]
    url = f"{mlflow_server['uri']}/#/experiments/{run.info.experiment_id}/runs/{sft.info.run_id}/model-metrics"
    with chromium(tracked["root"] / "mlflow-run-page.png") as driver:
        driver.get(url)  # the run's "Model metrics" tab: one chart per metric, titled by its name
        WebDriverWait(driver, 90).until(page_shows("sft", "Model metrics", "eval_loss"))
        # charts are drawn as they scroll into view: search them, as a user would, for the losses
        driver.find_element(By.CSS_SELECTOR, "input[placeholder^='Search metric charts']").send_keys("loss")
        WebDriverWait(driver, 60).until(page_shows("sft (loss)", "sft (eval_loss)"))  # the charts' legends


def test_tensorboard_scalars_in_chromium(tracked):
    """TensorBoard on the same sft run's event files, its Time Series page in a real browser."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    logdir = tracked["root"] / "runs" / "tensorboard"
    port = free_port()
    proc = subprocess.Popen([str(Path(sys.executable).parent / "tensorboard"), "--logdir", str(logdir), "--host",
                             "127.0.0.1", "--port", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_up(f"http://127.0.0.1:{port}/data/runs", proc, "tensorboard", timeout=60)
        with chromium(tracked["root"] / "tensorboard-scalars.png") as driver:
            driver.get(f"http://127.0.0.1:{port}/#timeseries")
            run = f"sft/{Path(tracked['sft'].out_dir).name}"
            WebDriverWait(driver, 90).until(page_shows(run, "eval/loss"))
            # cards are drawn as they scroll into view: scroll to the train group, as a user would
            header = driver.find_element(By.XPATH, "//*[normalize-space(text())='train']")
            driver.execute_script("arguments[0].scrollIntoView()", header)
            WebDriverWait(driver, 60).until(page_shows("train/loss", "train/learning_rate", run))
    finally:
        stop_group(proc)
