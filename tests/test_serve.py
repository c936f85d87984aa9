"""vLLM serving smoke test: real vLLM (from .venv-serve) on real models; process cleanup; parity catches breakage.

The vLLM tests need the serving environment made by `.ci/setup-serve`; without it they are skipped with that
reason (never passed silently). The process-cleanup and failure-recording tests need no vLLM.
"""

from __future__ import annotations

import shutil
import time

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
    live_group_members,
    run_serve_smoke,
    serve_venv,
)

needs_vllm = pytest.mark.skipif(not (serve_venv(eval_config("runs")) / "bin" / "python").exists(),
                                reason="no serving environment (.venv-serve): run .ci/setup-serve")


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
