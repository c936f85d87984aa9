"""End to end as a service: real Prefect server, both work pools, `prefect deploy --all`, a worker per pool, and
`sft-pipeline/prod` run through the API on the embedded default. Every process started here is stopped, also when
an assertion fails.

The two workers stand for two machines: each has its own work dir (SFTPIPE_WORK_DIR) and the prod run's storage root
is an s3:// bucket (a local S3 endpoint, see conftest), so everything one stage hands the next goes through it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from browser import chromium, skip_outside_ci
from conftest import ROOT, query
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterId,
    FlowRunFilterParentFlowRunId,
)

from tasks.core import storage
from tasks.core.config import load_config

pytestmark = pytest.mark.slow
PREFECT = str(Path(sys.executable).parent / "prefect")
# Small enough for 2 CPU cores; the same code runs full-size on a GPU pool. The default gate: its interval rule
# judges a candidate on 8 eval examples without mistaking their noise for a regression.
FAST = ["sft.max_steps=30", "eval.max_examples=8", "eval.max_new_tokens=12"]


def _prefect(*args: str, cwd: Path = ROOT, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    out = subprocess.run([PREFECT, "--no-prompt", *args], cwd=cwd, capture_output=True, text=True, env=env or os.environ)
    if check and out.returncode != 0:
        raise AssertionError(f"prefect {' '.join(args)} failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    return out


@pytest.fixture(scope="module")
def service(tmp_path_factory, s3_server):
    """Pools, deployments and one worker per pool against the session's Prefect server."""
    root = tmp_path_factory.mktemp("service") / "runs"
    for pool in ("cpu-pool", "gpu-pool"):
        if _prefect("work-pool", "inspect", pool, check=False).returncode != 0:
            _prefect("work-pool", "create", pool, "--type", "process")
    _prefect("deploy", "--all")
    logs = root.parent / "logs"
    logs.mkdir(parents=True)
    workers = []
    # Started from Python with their own process group: a worker started with `&` from a script ignores SIGTERM.
    for pool, limit in (("cpu-pool", 4), ("gpu-pool", 1)):  # one GPU stage at a time per card
        log = open(logs / f"worker-{pool}.log", "wb")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "SFTPIPE_WORK_DIR": str(root.parent / f"work-{pool}")}
        workers.append(subprocess.Popen([PREFECT, "worker", "start", "--pool", pool, "--limit", str(limit)],
                                        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True))
    import conftest

    print(f"\nservice test against the Prefect server on {conftest._backend}")
    try:
        yield {"root": root, "logs": logs, "s3_root": f"s3://{s3_server['bucket']}/service"}
    finally:
        for w in workers:
            if w.poll() is None:
                os.killpg(w.pid, signal.SIGTERM)
        for w in workers:
            try:
                w.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(w.pid, signal.SIGKILL)
                w.wait()


def _run_deployment(name: str, params: dict, timeout: float = 1500, cli: bool = False):
    """Start a deployment run (with the `prefect deployment run` CLI as the README does, or the Python API) and
    wait for it to end."""
    if cli:
        out = _prefect("deployment", "run", name, "--params", json.dumps(params))
        run_id = next(line.split()[-1] for line in out.stdout.splitlines() if "UUID" in line)
    else:
        from prefect.deployments import run_deployment

        run_id = run_deployment(name, parameters=params, timeout=0, as_subflow=False).id
    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            run = client.read_flow_run(run_id)
            if run.state and run.state.is_final():
                return run
            time.sleep(2)
    raise AssertionError(f"{name} did not finish within {timeout} s")


def _children(run_id):
    with get_client(sync_client=True) as client:
        return client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[run_id])))


def _task_states(run_id) -> dict[str, str]:
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
    return {r.name: r.state.name for r in runs}


def test_prod_deployment_end_to_end(service):
    root = service["s3_root"]
    overrides = [f"storage_root={root}", "orchestration.gpu_deployment=sft-stage/gpu", *FAST]
    started = time.monotonic()
    run = _run_deployment("sft-pipeline/prod", {"overrides": overrides}, cli=True)
    wall = time.monotonic() - started
    assert run.state.name == "Promoted", (run.state.name, run.state.message, (service["logs"]).as_posix())
    service["prod_run"] = run.id

    # The GPU stages ran as child flow runs on the GPU pool's worker; the pipeline itself on the CPU pool.
    children = _children(run.id)
    gpu_stages = {c.parameters["stage"] for c in children if c.work_pool_name == "gpu-pool"}
    assert gpu_stages == {"base", "sft", "dpo", "merge", "evaluate", "serve"}
    with get_client(sync_client=True) as client:
        parent = client.read_flow_run(run.id)
        keys = {a.key for a in client.read_artifacts()}
    assert parent.work_pool_name == "cpu-pool"
    assert {"data-quality-report", "eval-report", "promotion-decision", "serving-smoke-test"} <= keys

    cfg = load_config(None, overrides)
    assert query(cfg, "SELECT count(*) FROM sft_examples")[0][0] > 100
    assert query(cfg, "SELECT count(DISTINCT variant) FROM eval_results")[0][0] == 4
    assert query(cfg, "SELECT count(*) FROM training_curves")[0][0] > 0

    # Nothing changed: every stage is served from cache, in the pipeline's own process (no GPU flow runs needed).
    started = time.monotonic()
    again = _run_deployment("sft-pipeline/prod", {"overrides": overrides})
    noop = time.monotonic() - started
    assert again.state.is_final() and again.state.name == "Promoted"
    assert [c.parameters["stage"] for c in _children(again.id)] == []
    states = _task_states(again.id)
    stage_tasks = {"ingest", "clean", "minhash-shard", "dedup", "split", "base", "sft", "dpo", "merge", "evaluate",
                   "serve", "promote"}  # task runs are named "<stage>-<3 hex>"; the rest track child flow runs
    cached = {name: state for name, state in states.items() if name.rsplit("-", 1)[0] in stage_tasks}
    assert {n.rsplit("-", 1)[0] for n in cached} == stage_tasks and set(cached.values()) == {"Cached"}, states
    print(f"\nend-to-end wall {wall:.0f} s; cached rerun {noop:.0f} s")
    (service["logs"] / "timings.json").write_text(json.dumps({"end_to_end_s": wall, "cached_rerun_s": noop}))

    # Every output is in the bucket; each worker kept only local copies of what it used.
    merged = json.loads(storage.read_text(f"{root}/pipeline-runs/{run.id}/merge.json"))
    model_folder = merged["path"].rsplit("/", 1)[0]  # <root>/models/merged/<key>/model
    assert model_folder.startswith(f"{root}/models/merged/") and storage.is_published(model_folder)
    gpu_work = service["root"].parent / "work-gpu-pool"
    assert (gpu_work / "s3").is_dir() and not (service["root"].parent / "work-cpu-pool" / "s3" / "models").exists()

    # One stage alone against the first run's outputs: DPO with a new beta. The first run's outputs stay as they were.
    first_dir = f"{root}/pipeline-runs/{run.id}"
    before = {f: storage.read_text(f) for f in storage.list_files(first_dir, ".json")}
    rerun = _run_deployment("sft-stage/gpu", {"stage": "dpo", "run_id": str(run.id),
                                              "overrides": overrides + ["dpo.beta=0.3"]})
    assert rerun.state.is_completed(), rerun.state.message
    assert rerun.work_pool_name == "gpu-pool"
    assert {f: storage.read_text(f) for f in storage.list_files(first_dir, ".json")} == before
    new_dpo = json.loads(storage.read_text(f"{root}/pipeline-runs/{rerun.id}/dpo.json"))
    assert new_dpo["fingerprint"] != json.loads(before[f"{first_dir}/dpo.json"])["fingerprint"]


def test_schedule_in_prefect_yaml_is_what_the_deployment_shows(service):
    import yaml

    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    prod = next(d for d in spec["deployments"] if d["name"] == "prod")
    with get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name("sft-pipeline/prod")
    assert [(s.schedule.cron, s.schedule.timezone, s.active) for s in dep.schedules] == \
        [(s["cron"], s["timezone"], s["active"]) for s in prod["schedules"]]


def test_new_raw_file_is_ingested_alone_and_old_splits_stay(service, tmp_path):
    root = tmp_path / "runs"
    first = tmp_path / "first.jsonl"
    first.write_text("".join(json.dumps({"instruction": f"Question number {i} about rivers?", "input": "",
                                         "output": f"Answer number {i} about rivers."}) + "\n" for i in range(80)))
    overrides = [f"storage_root={root}", f"data.ingest.inputs=[{tmp_path}]"]
    assert _run_deployment("prepare-data/cpu", {"overrides": overrides}).state.is_completed()
    cfg = load_config(None, overrides)
    splits = dict(query(cfg, "SELECT cluster_id, split FROM split_assignments"))
    (tmp_path / "second.jsonl").write_text("".join(
        json.dumps({"instruction": f"Question number {i} about lakes?", "input": "",
                    "output": f"Answer number {i} about lakes."}) + "\n" for i in range(40)))
    run = _run_deployment("prepare-data/cpu", {"overrides": overrides})
    assert run.state.is_completed()
    ingested = query(cfg, "SELECT path, ingest_run_id FROM source_files ORDER BY ingested_at")
    assert [Path(p).name for p, _ in ingested] == ["first.jsonl", "second.jsonl"]
    assert ingested[1][1] == str(run.id) != ingested[0][1]
    after = dict(query(cfg, "SELECT cluster_id, split FROM split_assignments"))
    assert {k: after[k] for k in splits} == splits and len(after) > len(splits)


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_two_concurrent_runs_against_one_warehouse(service, tmp_path, kind):
    root = tmp_path / "runs" if kind == "local" else f"{service['s3_root']}-concurrent"
    overrides = [f"storage_root={root}"]
    results = []

    def go():
        results.append(_run_deployment("prepare-data/cpu", {"overrides": overrides}))

    threads = [threading.Thread(target=go) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # Both finish: the second waits for the warehouse's lease and takes its turn; nothing is corrupted.
    assert len(results) == 2 and all(r.state.is_completed() for r in results), [r.state.message for r in results]
    cfg = load_config(None, overrides)
    assert all(b for (b,) in query(cfg, "SELECT balanced FROM row_conservation"))
    assert query(cfg, "SELECT count(*) FROM raw_rows")[0][0] == \
        query(cfg, "SELECT count(DISTINCT row_id) FROM raw_rows")[0][0] > 0


def test_eval_report_renders_in_the_prefect_ui(service):
    """What users look at, looked at the way they do: headless Chromium on the run's eval-report artifact page."""
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        ArtifactFilterKey,
    )
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    if "prod_run" not in service:
        skip_outside_ci("needs the eval report of test_prod_deployment_end_to_end, which did not run or failed")
    evaluate = [c.id for c in _children(service["prod_run"]) if c.parameters.get("stage") == "evaluate"]
    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=["eval-report"]), flow_run_id=ArtifactFilterFlowRunId(any_=evaluate)))
    assert len(arts) == 1, arts
    ui = os.environ["PREFECT_API_URL"].removesuffix("/api")
    with chromium(service["logs"] / "eval-report-ui.png") as driver:
        driver.get(f"{ui}/artifacts/artifact/{arts[0].id}")

        def rendered_table(d):
            for table in d.find_elements(By.TAG_NAME, "table"):
                text = table.text.lower()
                if "merged" in text and "perplexity" in text.replace("ppl", "perplexity"):
                    return table
            return False

        table = WebDriverWait(driver, 90).until(rendered_table)
        rows = table.find_elements(By.TAG_NAME, "tr")
        assert len(rows) >= 5  # header + base, sft, dpo, merged
