"""vLLM serving smoke test: real vLLM (from .venv-serve) on real models; process cleanup; parity catches breakage.

The vLLM tests need the serving environment made by `.ci/setup-serve`; without it they are skipped with that
reason (never passed silently), except in CI (CI set), where a missing serving environment fails them. The
process-cleanup and failure-recording tests need no vLLM.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from eval_fixtures import (
    WRONG_TEMPLATE,
    chat_model,
    data_plane,
    eval_config,
    flow_run_artifacts,
    lora_adapter,
    merge,
    query,
    servable_model,
)

from tasks.evaluation.serve import (
    ParityError,
    ServeSmokeError,
    VLLMServer,
    free_port,
    has_cuda,
    live_group_members,
    run_serve_smoke,
    server_command,
    serve_venv,
)

ROOT = Path(__file__).resolve().parents[1]
needs_vllm = pytest.mark.skipif(
    not (serve_venv(eval_config("runs")) / "bin" / "python").exists() and not os.environ.get("CI"),
    reason="no serving environment (.venv-serve): run .ci/setup-serve")
SECRET = "s3cr3t-of-the-run"

# A pipeline process in miniature: starts the server from a worker thread (as a Prefect task does), reports the
# server's process group, then keeps serving until it is killed.
PIPELINE = """
import json, sys, threading, time
from pathlib import Path
from tasks.core.config import load_config
from tasks.evaluation.serve import VLLMServer, server_env
cmd, port, log, report = json.loads(sys.argv[1])
server = VLLMServer(cmd, port, server_env(load_config(None, [])), Path(log))
def serve():
    server.start(timeout_s=600)
    Path(report + ".healthy").write_text("")
threading.Thread(target=serve, daemon=True).start()
while server.proc is None:
    time.sleep(0.05)
Path(report).write_text(str(server.proc.pid))
time.sleep(900)
"""


def _kill_pipeline_while_serving(tmp_path, cmd: list[str], port: int, healthy: bool) -> None:
    """SIGKILL a pipeline's whole process group while its server runs: the server's group must be gone within
    seconds, and it must never have seen the run's secrets."""
    report = tmp_path / "server.pgid"
    pipeline = subprocess.Popen([sys.executable, "-c", PIPELINE, json.dumps([cmd, port, str(tmp_path / "server.log"),
                                                                              str(report)])],
                                cwd=ROOT, env={**os.environ, "AWS_SECRET_ACCESS_KEY": SECRET, "PYTHONPATH": str(ROOT)},
                                start_new_session=True)
    try:
        ready = report.with_name(report.name + ".healthy") if healthy else report
        deadline = time.monotonic() + 600
        while not ready.exists() or not report.exists():
            assert pipeline.poll() is None, f"pipeline exited with {pipeline.returncode}"
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.5)
        pgid = int(report.read_text())
        time.sleep(1.0)  # let the server start its own workers
        members = live_group_members(pgid)
        assert len(members) >= 2  # the server's leader and the server itself (and its workers)
        for pid in members:
            assert SECRET.encode() not in Path(f"/proc/{pid}/environ").read_bytes()
        os.killpg(pipeline.pid, signal.SIGKILL)
        pipeline.wait()
        deadline = time.monotonic() + 30
        while live_group_members(pgid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert live_group_members(pgid) == [], "the server outlived the pipeline that started it"
    finally:
        if pipeline.poll() is None:
            os.killpg(pipeline.pid, signal.SIGKILL)


def test_server_dies_with_a_killed_pipeline_and_never_sees_its_secrets(tmp_path):
    # A "server" that never becomes healthy and has workers of its own, like vLLM's engine core.
    _kill_pipeline_while_serving(tmp_path, ["bash", "-c", "sleep 300 & sleep 300 & wait"], 1, healthy=False)


def _no_vllm_left(model_dir) -> bool:
    """No process of this machine is serving model_dir (checked through /proc, whoever started it)."""
    from pathlib import Path

    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if "vllm" in cmdline and str(model_dir) in cmdline:
                return False
    return True


def test_stop_kills_the_whole_process_group(tmp_path):
    # A "server" that never becomes healthy and has children of its own, like vLLM's engine workers.
    server = VLLMServer(["bash", "-c", "sleep 300 & sleep 300 & wait"], 1, {"PATH": "/usr/bin:/bin"},
                        tmp_path / "fake.log")
    with pytest.raises(ServeSmokeError, match="not healthy after 2 s"):
        with server:
            server.start(timeout_s=2)
    pgid = server.proc.pid
    assert server.proc.poll() is not None and live_group_members(pgid) == []


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    cfg = eval_config(root / "runs")
    data = data_plane(cfg)
    base = servable_model(root / "base")
    adapter = lora_adapter(base, root / "adapter")
    return {"root": root, "cfg": cfg, "data": data, "base": base, "adapter": adapter,
            "merged": merge(base, adapter, root / "merged")}


def test_server_that_cannot_start_fails_the_stage_and_is_recorded(world):
    cfg = eval_config(world["root"] / "runs", serve={"command": "false {model}"})
    merged = {"fingerprint": "m", "path": str(world["merged"]), "adapter": str(world["adapter"]),
              "base": str(world["base"])}
    with pytest.raises(ServeSmokeError, match="exited with 1 before becoming healthy"):
        run_serve_smoke(cfg, merged, data=world["data"])
    rows = query(world["data"]["warehouse"], "SELECT target, passed, startup_s, reason FROM serve_smoke_runs "
                 "WHERE command LIKE 'false %'")
    assert rows and rows[-1][:3] == ("merged", False, None) and "exited with 1" in rows[-1][3]


@needs_vllm
@pytest.mark.slow
def test_real_vllm_dies_with_a_killed_pipeline(world, tmp_path):
    port = free_port()
    _kill_pipeline_while_serving(tmp_path, server_command(world["cfg"], str(world["merged"]), port, "merged"), port,
                                 healthy=True)
    assert _no_vllm_left(world["merged"])


@pytest.mark.skipif(has_cuda(), reason="the known-unsupported shapes are those of vLLM's CPU backend")
def test_unsupported_model_shape_is_refused_before_the_server_starts(world, tmp_path):
    cfg = eval_config(world["root"] / "runs", serve={"command": "false {model}"})
    model = chat_model(tmp_path / "head_dim_8")  # the pretrained stories260K: 8-dim attention heads
    merged = {"fingerprint": "h8", "path": str(model)}
    # serve.command `false` would fail the start ("exited with 1"): this message says nothing was started.
    with pytest.raises(ServeSmokeError, match=r"head_dim=8.*32, 64.*serve.preflight=false"):
        run_serve_smoke(cfg, merged, data=world["data"])


@needs_vllm
@pytest.mark.slow
def test_serving_failure_names_the_root_cause_and_the_server_log(world, tmp_path):
    cfg = eval_config(world["root"] / "runs", serve={"preflight": False, "parity_prompts": 1})
    model = chat_model(tmp_path / "head_dim_8")
    with pytest.raises(ServeSmokeError) as failure:
        run_serve_smoke(cfg, {"fingerprint": "h8", "path": str(model)}, data=world["data"])
    message = str(failure.value)
    assert "head_dim=8" in message.split("root cause in the server log: ")[1].splitlines()[0]
    log_path = message.split("server log: ")[-1].strip()
    assert Path(log_path).name == "vllm-merged.log" and "head_dim=8" in Path(log_path).read_text(errors="replace")
    assert _no_vllm_left(model)


@needs_vllm
@pytest.mark.slow
def test_merged_model_serves_with_parity_and_lora(world):
    cfg = eval_config(world["root"] / "runs", serve={"check_lora": True})
    merged = {"fingerprint": "m", "path": str(world["merged"]), "adapter": str(world["adapter"]),
              "base": str(world["base"])}
    result = run_serve_smoke(cfg, merged, data=world["data"])
    assert result["passed"] and result["stats"]["parity"] == {"merged": "3/3", "lora": "3/3"}
    assert _no_vllm_left(world["merged"]) and _no_vllm_left(world["base"])

    runs = query(world["data"]["warehouse"], "SELECT smoke_id, target, passed, startup_s, parity_passed FROM "
                 "serve_smoke_runs WHERE run_id = ? ORDER BY target", [result["run_id"]])
    assert [(r[1], r[2], r[4]) for r in runs] == [("lora", True, 3), ("merged", True, 3)]
    assert all(0 < r[3] < cfg.serve.startup_timeout_s for r in runs)
    reqs = query(world["data"]["warehouse"], "SELECT endpoint, latency_s, completion_tokens, tokens_per_s, parity "
                 "FROM serve_smoke_requests WHERE smoke_id = ? ORDER BY seq", [runs[1][0]])
    assert [r[0] for r in reqs] == ["/v1/models", "/v1/completions", "/v1/chat/completions",
                                    "/v1/chat/completions"]
    assert all(r[1] > 0 for r in reqs) and all(r[4] for r in reqs[1:])
    assert all(r[2] == cfg.serve.max_tokens and r[3] > 0 for r in reqs[1:])  # stories never stop early


@needs_vllm
@pytest.mark.slow
@pytest.mark.parametrize("broken", ["wrong_chat_template", "adapter_not_applied"])
def test_broken_merged_model_fails_parity(world, broken):
    root = world["root"] / broken
    if broken == "wrong_chat_template":
        model = merge(world["base"], world["adapter"], root, template=WRONG_TEMPLATE)
        expected = "prompt tokens differ"
    else:  # the base's weights saved as if merged: the adapter was silently dropped
        model = chat_model(root)
        shutil.copytree(world["base"], root, dirs_exist_ok=True)
        expected = "greedy tokens differ with identical prompt tokens"
    merged = {"fingerprint": broken, "path": str(model), "adapter": str(world["adapter"]), "base": str(world["base"])}
    with pytest.raises(ParityError, match=expected):
        run_serve_smoke(world["cfg"], merged, data=world["data"])
    assert _no_vllm_left(model)
    row = query(world["data"]["warehouse"], "SELECT passed, parity_passed, parity_total, reason FROM "
                "serve_smoke_runs WHERE model_path = ?", [str(model)])
    assert row and row[0][0] is False and row[0][1] < row[0][2] and expected in row[0][3]


@needs_vllm
@pytest.mark.slow
def test_end_to_end_eval_gate_and_serving_in_a_flow(world):
    from prefect import flow

    from tasks.evaluation.evaluate import evaluate_task
    from tasks.evaluation.promote import promote_task, promotion_state
    from tasks.evaluation.serve import serve_task

    cfg, data = world["cfg"], world["data"]
    base = {"fingerprint": "base", "path": str(world["base"])}
    sft = {"fingerprint": "sft", "adapter": str(world["adapter"]), "base": str(world["base"])}
    merged = {"fingerprint": "merged", "path": str(world["merged"]), **{k: sft[k] for k in ("adapter", "base")}}

    @flow
    def eval_gate_serve():
        evaluation = evaluate_task(cfg, data, base=base, sft=sft, merged=merged)
        decision = promote_task(cfg, evaluation)
        serve_task(cfg, merged, data=data)
        return promotion_state(decision)

    started = time.time()
    state = eval_gate_serve(return_state=True)
    run_id = str(state.state_details.flow_run_id)
    assert state.name in ("Promoted", "PromotionRejected"), state
    decision = query(data["warehouse"], "SELECT decision, baseline_kind, model_path FROM promotions WHERE run_id = ?",
                     [run_id])
    assert decision and decision[0][1] == "base"
    assert (decision[0][0] == "promoted") == (state.name == "Promoted")
    if decision[0][0] == "promoted":
        assert decision[0][2] == str(world["merged"])

    assert query(data["warehouse"], "SELECT count(DISTINCT variant) FROM eval_results WHERE run_id = ?",
                 [run_id])[0][0] == 3
    smoke = query(data["warehouse"], "SELECT passed, parity_passed, parity_total FROM serve_smoke_runs "
                  "WHERE run_id = ?", [run_id])
    assert smoke == [(True, 3, 3)]
    arts = flow_run_artifacts(state.state_details.flow_run_id)
    assert {"eval-report", "eval-samples", "promotion-decision", "serving-smoke-test"} <= set(arts)
    assert "PASSED" in arts["serving-smoke-test"].data and "| sft |" in arts["eval-report"].data
    assert _no_vllm_left(world["merged"])
    print(f"eval + gate + serving flow: {time.time() - started:.1f} s")
