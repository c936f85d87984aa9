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
from training_fixtures import FORECAST_TOOL, tool_examples

from tasks.core.results import ModelResult
from tasks.core.warehouse import compact_messages
from tasks.data import formats
from tasks.data.chat_template import openai_messages, template_tools
from tasks.evaluation.generation import split_conversation
from tasks.evaluation.serve import (
    ParityError,
    ServeSmokeError,
    VLLMServer,
    chat_request,
    free_port,
    has_cuda,
    live_group_members,
    run_serve_smoke,
    server_command,
    server_env,
    serve_venv,
)
from tasks.training.loading import load_tokenizer
from tasks.training.sft import conversations

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
    merged = ModelResult(stage="merge", fingerprint="m", path=str(world["merged"]), adapter=str(world["adapter"]),
                         base=str(world["base"]))
    with pytest.raises(ServeSmokeError, match="exited with 1 before becoming healthy"):
        run_serve_smoke(cfg, merged, data=world["data"])
    rows = query(world["data"].warehouse, "SELECT target, passed, startup_s, reason FROM serve_smoke_runs "
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
    merged = ModelResult(stage="merge", fingerprint="h8", path=str(model))
    # serve.command `false` would fail the start ("exited with 1"): this message says nothing was started.
    with pytest.raises(ServeSmokeError, match=r"head_dim=8.*32, 64.*serve.preflight=false"):
        run_serve_smoke(cfg, merged, data=world["data"])


@needs_vllm
@pytest.mark.slow
def test_serving_failure_names_the_root_cause_and_the_server_log(world, tmp_path):
    cfg = eval_config(world["root"] / "runs", serve={"preflight": False, "parity_prompts": 1})
    model = chat_model(tmp_path / "head_dim_8")
    with pytest.raises(ServeSmokeError) as failure:
        run_serve_smoke(cfg, ModelResult(stage="merge", fingerprint="h8", path=str(model)), data=world["data"])
    message = str(failure.value)
    assert "head_dim=8" in message.split("root cause in the server log: ")[1].splitlines()[0]
    log_path = message.split("server log: ")[-1].strip()
    assert Path(log_path).name == "vllm-merged.log" and "head_dim=8" in Path(log_path).read_text(errors="replace")
    assert _no_vllm_left(model)


@needs_vllm
@pytest.mark.slow
def test_merged_model_serves_with_parity_and_lora(world):
    cfg = eval_config(world["root"] / "runs", serve={"check_lora": True})
    merged = ModelResult(stage="merge", fingerprint="m", path=str(world["merged"]), adapter=str(world["adapter"]),
                         base=str(world["base"]))
    result = run_serve_smoke(cfg, merged, data=world["data"])
    assert result.passed and result.stats["parity"] == {"merged": "3/3", "lora": "3/3"}
    assert _no_vllm_left(world["merged"]) and _no_vllm_left(world["base"])

    runs = query(world["data"].warehouse, "SELECT smoke_id, target, passed, startup_s, parity_passed FROM "
                 "serve_smoke_runs WHERE run_id = ? ORDER BY target", [result.run_id])
    assert [(r[1], r[2], r[4]) for r in runs] == [("lora", True, 3), ("merged", True, 3)]
    assert all(0 < r[3] < cfg.serve.startup_timeout_s for r in runs)
    reqs = query(world["data"].warehouse, "SELECT endpoint, latency_s, completion_tokens, tokens_per_s, parity "
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
    merged = ModelResult(stage="merge", fingerprint=broken, path=str(model), adapter=str(world["adapter"]),
                         base=str(world["base"]))
    with pytest.raises(ParityError, match=expected):
        run_serve_smoke(world["cfg"], merged, data=world["data"])
    assert _no_vllm_left(model)
    row = query(world["data"].warehouse, "SELECT passed, parity_passed, parity_total, reason FROM "
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
    base = ModelResult(stage="base", fingerprint="base", path=str(world["base"]))
    sft = ModelResult(stage="sft", fingerprint="sft", adapter=str(world["adapter"]), base=str(world["base"]))
    merged = ModelResult(stage="merge", fingerprint="merged", path=str(world["merged"]), adapter=sft.adapter,
                         base=sft.base)

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
    decision = query(data.warehouse, "SELECT decision, baseline_kind, model_path FROM promotions WHERE run_id = ?",
                     [run_id])
    assert decision and decision[0][1] == "base"
    assert (decision[0][0] == "promoted") == (state.name == "Promoted")
    if decision[0][0] == "promoted":
        assert decision[0][2] == str(world["merged"])

    assert query(data.warehouse, "SELECT count(DISTINCT variant) FROM eval_results WHERE run_id = ?",
                 [run_id])[0][0] == 3
    smoke = query(data.warehouse, "SELECT passed, parity_passed, parity_total FROM serve_smoke_runs "
                  "WHERE run_id = ?", [run_id])
    assert smoke == [(True, 3, 3)]
    arts = flow_run_artifacts(state.state_details.flow_run_id)
    assert {"eval-report", "eval-samples", "promotion-decision", "serving-smoke-test"} <= set(arts)
    assert "PASSED" in arts["serving-smoke-test"].data and "| sft |" in arts["eval-report"].data
    assert _no_vllm_left(world["merged"])
    print(f"eval + gate + serving flow: {time.time() - started:.1f} s")


# A Chinese tool-calling conversation in OpenAI's layout: system prompt, text beside the call, non-ASCII and float
# arguments (JSON serialisers differ on both), the tool's result, the answer.
ORDER_TOOL = {"type": "function", "function": {"name": "查订单", "description": "查物流",
              "parameters": {"type": "object", "properties": {"单号": {"type": "string"}, "权重": {"type": "number"}}}}}
ZH_TOOL_ROW = {"messages": [
    {"role": "system", "content": "客服"},
    {"role": "user", "content": "A12到哪了？"},
    {"role": "assistant", "content": "稍等。", "tool_calls": [{"id": "c1", "type": "function", "function": {
        "name": "查订单", "arguments": '{"单号": "A12", "权重": 0.1234567890123}'}}]},
    {"role": "tool", "tool_call_id": "c1", "content": '{"状态": "已发货"}'},
    {"role": "assistant", "content": "已发货。"}], "tools": [ORDER_TOOL]}


def _answer_start(mask: list[int]) -> int:
    """Where the last trained span (the final answer) starts: everything before it is that answer's prompt."""
    return max(i for i, m in enumerate(mask) if m and (i == 0 or not mask[i - 1]))


@needs_vllm
@pytest.mark.slow
def test_tool_calling_conversation_is_served_with_the_prompt_tokens_training_used(tmp_path):
    cfg = eval_config(tmp_path / "runs", serve={"max_model_len": 512})
    model = servable_model(tmp_path / "model")  # the pipeline's default chat template, which renders tools
    tokenizer = load_tokenizer(model, cfg)  # as SFT loads it
    parsed = formats.normalize(ZH_TOOL_ROW, "messages")
    rows = [tool_examples(1)[0], {"messages": compact_messages(parsed.messages), "tools": json.dumps(parsed.tools)}]
    assert rows[0]["tools"] and json.loads(rows[0]["tools"]) == [FORECAST_TOOL]
    trained = [conversations([row], tokenizer, assistant_only=True)[0] for row in rows]  # SFT's own tokenization
    port = free_port()
    served_prompts, tokenized = [], []
    with VLLMServer(server_command(cfg, str(model), port, "merged"), port, server_env(cfg),
                    tmp_path / "vllm.log") as server:
        server.start(cfg.serve.startup_timeout_s)
        import httpx

        with httpx.Client(timeout=cfg.serve.request_timeout_s, trust_env=False) as client:
            for row in rows:
                prompt, _ = split_conversation(row["messages"])
                # The serve stage's own request: what vLLM renders from the OpenAI-shaped turns and tools.
                body = chat_request("merged", prompt, row["tools"], {"max_tokens": 1, "temperature": 0,
                                                                      "return_token_ids": True})
                chat = client.post(f"{server.url}/v1/chat/completions", json=body)
                assert chat.status_code == 200, chat.text
                served_prompts.append(chat.json()["prompt_token_ids"])
                # The whole conversation, answer included, through vLLM's tokenizer endpoint.
                whole = client.post(f"{server.url}/tokenize", json={
                    "model": "merged", "messages": openai_messages(row["messages"]),
                    "tools": template_tools(row["tools"]), "add_generation_prompt": False})
                assert whole.status_code == 200, whole.text
                tokenized.append(whole.json()["tokens"])
    for row, train, served, whole in zip(rows, trained, served_prompts, tokenized):
        ids, start = train["input_ids"], _answer_start(train["assistant_masks"])
        print(f"tool conversation: {len(ids)} training tokens, {start} before the answer, vLLM prompt {len(served)}, "
              f"vLLM /tokenize {len(whole)}")
        assert served == ids[:start]  # served: the training sequence up to where its final answer starts
        assert whole == ids  # and the whole conversation tokenizes as trained
        text = tokenizer.decode(served).replace(" ", "")
        call, result = (next(m for m in row["messages"] if m["role"] == role) for role in ("assistant", "tool"))
        assert call["tool_calls"][0]["name"] in text and "<tool_call>" in text
        assert result["content"].replace(" ", "") in text
    assert '"权重": 0.1234567890123' in tokenizer.decode(served_prompts[1])  # not rounded, not \u-escaped
