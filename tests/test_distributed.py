"""Sharded (FSDP2) adapter training over two gloo processes on CPU: sharding measured, parity with one process,
QLoRA shards, resume after a kill, and the adapter merges like any other."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file
from training_fixtures import ROOT, STORIES_BASE, alpaca_examples, make_warehouse, preference_pairs, small_config

from tasks.core.config import ConfigError, apply_overrides
from tasks.core.results import DataResult
from tasks.training.dpo import run_dpo
from tasks.training.launch import launch_command
from tasks.training.merge import run_merge
from tasks.training.sft import run_sft

TRAIN, VALID = alpaca_examples(96), alpaca_examples(16, offset=240)
SMALL = {"sft.max_steps": 6, "sft.logging_steps": 1, "sft.eval_steps": 6, "sft.save_steps": 100,
         "sft.max_eval_examples": 16, "model.max_length": 96}
FSDP = {"sft.num_processes": 2, "sft.distributed": "fsdp", "sft.launcher": "torchrun"}


PAIRS = preference_pairs(57)


@pytest.fixture()
def data(tmp_path):
    return make_warehouse(tmp_path / "warehouse.duckdb", sft={"train": TRAIN, "validation": VALID},
                          pairs={"train": PAIRS[:41], "validation": PAIRS[41:]})


def step_losses(result: dict) -> dict[int, float]:
    rows = [json.loads(line) for line in (Path(result.out_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["value"] for r in rows if r["metric"] == "loss"}


def update_error(a: dict, b: dict, lora_a_name: str) -> float:
    """Relative difference of one layer's LoRA update B @ A between two adapters."""
    lora_b_name = lora_a_name.replace("lora_A", "lora_B")
    update_a, update_b = a[lora_b_name] @ a[lora_a_name], b[lora_b_name] @ b[lora_a_name]
    return float((update_a - update_b).norm() / update_b.norm())


def assert_halves(shares: list[dict], kind: str) -> None:
    """Each of the two processes holds about half of `kind` (FSDP splits every tensor on dim 0; a dim of odd size
    gives one process one row more), and together they hold all of it once."""
    assert [s["rank"] for s in shares] == [0, 1]
    total = shares[0][f"{kind}_total"]
    assert total > 0 and all(s[f"{kind}_total"] == total for s in shares)
    assert sum(s[f"{kind}_local"] for s in shares) == total
    for s in shares:
        assert abs(s[f"{kind}_local"] - total / 2) <= 0.01 * total, (kind, shares)


@pytest.mark.slow
def test_fsdp_lora_shards_the_model_and_matches_one_process(tmp_path, data):
    sharded = run_sft(small_config(tmp_path / "fsdp", **{**SMALL, **FSDP, "model.quantization": "none",
                                                         "sft.per_device_batch_size": 4}), STORIES_BASE, data)
    s = sharded.stats
    assert s["world_size"] == 2 and s["distributed"] == "fsdp" and s["distributed_backend"] == "gloo"
    assert s["steps"] == 6 and s["last_eval_loss"] < s["first_eval_loss"], s
    shares = s["parameters_per_process"]
    assert_halves(shares, "base")
    assert_halves(shares, "adapter")
    assert shares[0]["base_total"] > 250_000  # stories260K's own weights, not only the adapter
    assert shares[0]["fsdp_units"].count("LlamaDecoderLayer") == 5  # one unit per layer: gathered one at a time

    # One process with the two processes' combined batch sees the same examples at every step: the distributed
    # sampler gives rank r batches r, r+2, ... of the same seeded permutation, and the loss is normalised by the
    # token count over both ranks. So the runs differ only by fp32 summation order (per-rank matmuls, the gradient
    # reduce-scatter), measured at ~1e-7 on the losses. (6 steps of 8 stay inside the first epoch: trl drops the
    # examples whose answer max_length cuts off, ~60 of 96 remain, and a short last batch would be padded
    # differently by the distributed sampler.)
    single = run_sft(small_config(tmp_path / "single", **{**SMALL, "model.quantization": "none",
                                                          "sft.per_device_batch_size": 8}), STORIES_BASE, data)
    assert single.stats["distributed"] == "single"
    losses, single_losses = step_losses(sharded), step_losses(single)
    assert sorted(losses) == sorted(single_losses) == list(range(1, 7))
    for step, loss in losses.items():
        assert loss == pytest.approx(single_losses[step], rel=1e-4), (step, losses, single_losses)
    # The adapters agree on what they add to the base, each layer's update B @ A (what merge folds in): relative
    # error measured at <1e-3. It exceeds the losses' 1e-7 because Adam turns fp32 noise in a near-zero gradient
    # component into a learning-rate-sized step. Tolerance 1e-2: 10x the measured error, and 10x below what a real
    # mismatch costs: the same run stopped one step earlier differs by 0.13, one fed other batches by 0.68.
    a = load_file(Path(sharded.adapter) / "adapter_model.safetensors")
    b = load_file(Path(single.adapter) / "adapter_model.safetensors")
    assert sorted(a) == sorted(b) and len(a) == 2 * 5 * 7  # lora_A and lora_B of every linear layer
    assert max(update_error(a, b, name) for name in a if "lora_A" in name) < 1e-2
    for name in ("adapter_config.json", "tokenizer.json", "chat_template.jinja"):
        assert (Path(sharded.adapter) / name).is_file(), name


def _stage_in_subprocess(cfg_tree: dict, data: DataResult, log_path: Path) -> subprocess.Popen:
    """The SFT stage as a worker would run it, in its own process group (so the kill takes the launched ranks too)."""
    script = ("import json, sys; from tasks.core.config import apply_overrides; from tasks.training.sft import run_sft;"
              "from tasks.core.results import load_result; from training_fixtures import STORIES_BASE;"
              "cfg, data = json.loads(sys.argv[1]); run_sft(apply_overrides(cfg), STORIES_BASE, load_result(data))")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    return subprocess.Popen([sys.executable, "-c", script, json.dumps([cfg_tree, data.model_dump()])], cwd=ROOT, env=env,
                            stdout=log_path.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


@pytest.mark.slow
def test_fsdp_qlora_resumes_after_a_kill_then_dpo_and_merge(tmp_path, data):
    """QLoRA (the pipeline default) with fsdp: the 4-bit weights are sharded too; a stage killed with its two
    processes after a checkpoint resumes from it on the retry; DPO continues the adapter sharded the same way, and
    the result merges like a one-process adapter."""
    cfg = small_config(tmp_path, **{**SMALL, **FSDP, "sft.max_steps": 10, "sft.save_steps": 4, "sft.eval_steps": 10,
                                    "sft.per_device_batch_size": 4})
    assert cfg.model.quantization == "4bit"
    out_dir = Path(cfg.url("models", "sft"))
    proc = _stage_in_subprocess(cfg.model_dump(mode="json"), data, tmp_path / "killed.log")
    deadline = time.time() + 300
    while not list(out_dir.glob("*/checkpoints/checkpoint-4/trainer_state.json")):
        assert proc.poll() is None and time.time() < deadline, (tmp_path / "killed.log").read_text()[-3000:]
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = time.time()
    (checkpoints,) = [list(d.glob("checkpoint-*")) for d in out_dir.glob("*/checkpoints")]
    done = sorted(int(p.name.split("-")[1]) for p in checkpoints if (p / "trainer_state.json").exists())
    assert done and done[-1] < 10
    assert (checkpoints[0] / "pytorch_model_fsdp_0").is_dir()  # the adapter's shards, not a gathered copy

    result = run_sft(cfg, STORIES_BASE, data)  # the retry: same inputs, same folder, same number of processes
    s = result.stats
    assert s["distributed"] == "fsdp" and s["resumed_from_step"] == done[-1] and s["steps"] == 10
    rows = [json.loads(line) for line in (Path(result.out_dir) / "metrics.jsonl").read_text().splitlines()]
    loss_rows = [r for r in rows if r["metric"] == "loss"]
    assert [r["step"] for r in loss_rows] == list(range(1, 11))  # nothing lost, nothing logged twice
    assert all((r["time"] < killed_at) == (r["step"] <= done[-1]) for r in loss_rows)
    shares = s["parameters_per_process"]
    assert_halves(shares, "base")  # the 4-bit weights, in their float32 storage, shard like the rest
    assert s["quantization"] == "4bit" and s["last_eval_loss"] < s["first_eval_loss"]

    cfg = small_config(tmp_path, **{**SMALL, **FSDP, "sft.max_steps": 10, "sft.save_steps": 4, "sft.eval_steps": 10,
                                    "sft.per_device_batch_size": 4, "dpo.num_processes": 2, "dpo.distributed": "fsdp",
                                    "dpo.launcher": "torchrun", "dpo.max_steps": 6, "dpo.eval_steps": 6,
                                    "dpo.per_device_batch_size": 4, "dpo.max_eval_pairs": 8})
    dpo = run_dpo(cfg, result, data)
    d = dpo.stats
    assert d["distributed"] == "fsdp" and d["world_size"] == 2 and d["steps"] == 6
    assert_halves(d["parameters_per_process"], "adapter")
    assert_halves(d["parameters_per_process"], "base")
    assert d["probe_reward_margin"] > d["probe_reward_margin_start"], d  # the chosen answers gain on the rejected

    merged = run_merge(cfg, dpo)  # a plain peft adapter: merge checks the merged model's logits against it
    assert merged.stats["max_abs_logit_diff"] <= merged.stats["parity_atol"]
    assert merged.stats["adapter_effect_max_abs_logit"] > 0.01
    saved = load_file(Path(dpo.adapter) / "adapter_model.safetensors")
    assert len(saved) == 2 * 5 * 7  # only the trained adapter, not trl's reference copy


def test_accelerate_config_file_is_passed_through(tmp_path):
    cmd = launch_command("accelerate", 4, "tasks.training.sft", tmp_path / "job.json", "zero3.yaml")
    assert cmd[cmd.index("--config_file") + 1] == "zero3.yaml" and "--multi_gpu" not in cmd
    assert cmd[cmd.index("--num_processes") + 1] == "4"
    with pytest.raises((ConfigError, ValueError), match="distributed=ddp"):
        apply_overrides({"sft": {"accelerate_config": "zero3.yaml", "distributed": "fsdp"}})
