"""SFT stage on the real stories260K and on the embedded base: loss, mask, QLoRA, resume, multi-process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from training_fixtures import (
    ROOT,
    STORIES,
    STORIES_BASE,
    alpaca_examples,
    make_warehouse,
    small_config,
)

from tasks.core.warehouse import open_warehouse
from tasks.training.base import build_embedded_base
from tasks.training.loading import DEFAULT_CHAT_TEMPLATE
from tasks.training.sft import (
    LossMaskError,
    build_trainer,
    check_loss_mask,
    run_sft,
    stage_key,
)

TRAIN, VALID = alpaca_examples(240), alpaca_examples(32, offset=240)


@pytest.fixture()
def data(tmp_path):
    return make_warehouse(tmp_path / "warehouse.duckdb", sft={"train": TRAIN, "validation": VALID})


def test_qlora_sft_on_stories260k_lowers_validation_loss(tmp_path, data):
    cfg = small_config(tmp_path)
    result = run_sft(cfg, STORIES_BASE, data)
    s = result.stats
    assert s["steps"] == 30 and s["quantization"] == "4bit" and s["resumed_from_step"] is None
    assert s["last_eval_loss"] < s["first_eval_loss"] - 0.5, s  # learns the chat format and the answers
    assert s["last_loss"] < s["first_loss"]
    assert s["tokens_per_s"] > 0 and s["versions"]["trl"] and s["seed"] == 42
    assert 0 < s["loss_mask_first_batch"]["loss_tokens"] < s["loss_mask_first_batch"]["tokens"]
    adapter = Path(result.adapter)
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json"):
        assert (adapter / name).is_file(), name
    assert (adapter / "chat_template.jinja").read_text() == DEFAULT_CHAT_TEMPLATE  # serving formats like training
    assert Path(result.out_dir).name == stage_key(cfg, STORIES_BASE, data)
    assert not (Path(result.out_dir) / "checkpoints").exists()

    with open_warehouse(data.warehouse, read_only=True) as con:
        run = con.execute("SELECT stage, fingerprint, tokens_per_s, json_extract(versions, '$.peft') FROM "
                          "training_runs").fetchall()
        curve = con.execute("SELECT step, value FROM training_curves WHERE stage = 'sft' AND metric = 'eval_loss' "
                            "ORDER BY step").fetchall()
        summary = con.execute("SELECT first_eval_loss, last_eval_loss FROM training_summary").fetchone()
    assert run[0][:2] == ("sft", result.fingerprint) and run[0][2] > 0 and run[0][3]
    assert [step for step, _ in curve] == [0, 10, 20, 30] and curve[-1][1] < curve[0][1]
    assert summary == (curve[0][1], curve[-1][1])

    # Same inputs again: the finished run is reused, nothing is trained or rewritten.
    before = {str(p): p.stat().st_mtime_ns for p in Path(result.out_dir).rglob("*") if p.is_file()}
    assert run_sft(cfg, STORIES_BASE, data) == result
    assert before == {str(p): p.stat().st_mtime_ns for p in Path(result.out_dir).rglob("*") if p.is_file()}
    with open_warehouse(data.warehouse, read_only=True) as con:
        assert con.execute("SELECT count(*) FROM training_runs WHERE stage = 'sft'").fetchone()[0] == 1


def test_loss_mask_on_a_real_batch(tmp_path):
    cfg = small_config(tmp_path, **{"model.quantization": "none"})
    trainer = build_trainer(cfg, STORIES, TRAIN[:16], VALID[:4], tmp_path / "run")
    batch = next(iter(trainer.get_train_dataloader()))
    counts = check_loss_mask(batch, assistant_only=True)
    assert 0 < counts["loss_tokens"] < counts["tokens"]
    tokenizer = trainer.processing_class
    by_text = {ex["messages"][0]["content"]: ex["messages"][1]["content"] for ex in TRAIN[:16]}
    for ids, labels in zip(batch["input_ids"], batch["labels"]):
        trained = tokenizer.decode(labels[labels != -100])
        prompt = tokenizer.decode(ids[labels == -100])
        user = next(u for u in by_text if u[:20] in prompt)
        assert "<|im_start|>user" in prompt and "<|im_start|>assistant" in prompt and "<|im_end|>" not in trained[:1]
        answer = by_text[user] + "<|im_end|></s>"
        assert answer.replace(" ", "").startswith(trained.replace(" ", "")[:40])  # the label tokens are the answer

    # A template whose generation markers enclose the whole conversation trains on prompts: refused loudly.
    everything = "{% generation %}" + DEFAULT_CHAT_TEMPLATE.replace("{%- generation %}", "").replace(
        "{%- endgeneration %}", "") + "{% endgeneration %}"
    bad = build_trainer(small_config(tmp_path, **{"model.quantization": "none", "model.chat_template": everything}),
                        STORIES, TRAIN[:16], [], tmp_path / "bad")
    bad_batch = next(iter(bad.get_train_dataloader()))
    with pytest.raises(LossMaskError, match="covers all"):
        check_loss_mask(bad_batch, assistant_only=True)
    with pytest.raises(LossMaskError, match="covers all"):
        bad.train()  # the check sits in the training path, not only in a helper
    nothing = dict(batch, labels=torch.full_like(batch["labels"], -100))
    with pytest.raises(LossMaskError, match="covers none"):
        check_loss_mask(nothing, assistant_only=True)


def test_qlora_path_uses_4bit_base_and_fp32_adapters(tmp_path):
    import bitsandbytes as bnb

    trainer = build_trainer(small_config(tmp_path), STORIES, TRAIN[:16], [], tmp_path / "run")
    quantized = [m for m in trainer.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 5 * 7  # every linear layer of the 5 blocks is 4-bit
    w = quantized[0].weight
    assert w.quant_type == "nf4" and w.quant_state.nested  # NF4 with double quantisation
    trainable = [p for p in trainer.model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)  # trl's bf16 cast undone on CPU


def test_sft_on_embedded_base_lowers_validation_loss(tmp_path):
    train, valid = alpaca_examples(400), alpaca_examples(32, offset=400)
    cfg = small_config(tmp_path, **{"model.base": "embedded", "model.embedded_warmup_steps": 30,
                                    "sft.learning_rate": 1e-2})
    base = build_embedded_base(cfg, [m["content"] for ex in train for m in ex["messages"]], tmp_path / "base")
    data = make_warehouse(tmp_path / "wh.duckdb", sft={"train": train, "validation": valid})
    s = run_sft(cfg, base, data).stats
    assert s["quantization"] == "4bit" and s["steps"] == 30
    assert s["last_eval_loss"] < s["first_eval_loss"] - 0.01, s


def test_killed_sft_resumes_from_its_last_checkpoint(tmp_path, data):
    cfg = small_config(tmp_path, **{"sft.max_steps": 40, "sft.save_steps": 5, "sft.eval_steps": 20})
    out_dir = Path(cfg.url("models", "sft", stage_key(cfg, STORIES_BASE, data)))
    out_dir.mkdir(parents=True)
    for name, rows in (("train", TRAIN), ("validation", VALID)):
        (out_dir / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    job = {"config": cfg.model_dump(mode="json"), "base_path": str(STORIES), "out_dir": str(out_dir),
           "train": str(out_dir / "train.jsonl"), "validation": str(out_dir / "validation.jsonl")}
    (out_dir / "job.json").write_text(json.dumps(job))
    # First attempt: the stage's own process entry point, SIGKILLed once a checkpoint is on disk.
    proc = subprocess.Popen([sys.executable, "-m", "tasks.training.sft", "--job", str(out_dir / "job.json")], cwd=ROOT,
                            env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (out_dir / "checkpoints" / "checkpoint-10" / "trainer_state.json").exists():
        assert proc.poll() is None and time.time() < deadline, "first attempt ended before its checkpoint"
        time.sleep(0.2)
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = time.time()
    checkpoints = sorted(int(p.name.split("-")[1]) for p in (out_dir / "checkpoints").glob("checkpoint-*")
                         if (p / "trainer_state.json").exists())
    assert checkpoints and checkpoints[-1] < 40

    # The retry (same inputs, so same folder) continues from the last complete checkpoint.
    result = run_sft(cfg, STORIES_BASE, data)
    s = result.stats
    assert s["resumed_from_step"] == checkpoints[-1] and s["steps"] == 40
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    loss_steps = [r["step"] for r in rows if r["metric"] == "loss"]
    assert loss_steps == sorted(set(loss_steps)) == list(range(5, 45, 5))  # one row per step: nothing redone
    for r in rows:
        if r["metric"] == "loss":  # steps up to the checkpoint come from the killed attempt, later ones from the retry
            assert (r["time"] < killed_at) == (r["step"] <= checkpoints[-1]), r
    with open_warehouse(data.warehouse, read_only=True) as con:
        points = con.execute("SELECT count(*), count(DISTINCT (step, metric)) FROM training_curves").fetchone()
    assert points[0] == points[1] > 0  # one point per (step, metric)


def test_curves_keep_one_point_per_step_and_metric_the_last_logged(tmp_path, data):
    from tasks.training.tracking import record_training_run

    curves = tmp_path / "metrics.jsonl"
    logged = [(10, "eval_loss", 2.0), (10, "eval_num_tokens", 512.0), (15, "loss", 1.5),
              (10, "eval_loss", 1.9), (10, "eval_num_tokens", 0.0), (15, "loss", 1.4)]  # a resume redid 10 and 15
    curves.write_text("".join(json.dumps({"step": s, "epoch": 0.0, "metric": m, "value": v, "time": 1.0 + i}) + "\n"
                              for i, (s, m, v) in enumerate(logged)))
    record_training_run(data.warehouse, run_id="sft-x", stage="sft", fingerprint="f", base="b", data_fingerprint="d",
                        output_dir=str(tmp_path), stats={}, config={}, curves_path=curves)
    with open_warehouse(data.warehouse, read_only=True) as con:
        got = con.execute("SELECT step, metric, value FROM training_curves ORDER BY ALL").fetchall()
    assert got == [(10, "eval_loss", 1.9), (10, "eval_num_tokens", 0.0), (15, "loss", 1.4)]


def test_two_process_sft(tmp_path, data):
    cfg = small_config(tmp_path, **{"sft.num_processes": 2, "sft.max_steps": 10, "sft.per_device_batch_size": 4,
                                    "sft.eval_steps": 5, "sft.save_steps": 5})
    result = run_sft(cfg, STORIES_BASE, data)
    s = result.stats
    assert s["world_size"] == 2 and s["distributed_backend"] == ("nccl" if torch.cuda.is_available() else "gloo")
    assert s["steps"] == 10
    assert s["last_eval_loss"] < s["first_eval_loss"]
    assert (Path(result.adapter) / "adapter_model.safetensors").is_file()


def test_two_process_sft_with_torchrun(tmp_path, data):
    cfg = small_config(tmp_path, **{"sft.num_processes": 2, "sft.launcher": "torchrun", "sft.max_steps": 6,
                                    "sft.per_device_batch_size": 4, "sft.eval_steps": 3, "sft.save_steps": 3})
    s = run_sft(cfg, STORIES_BASE, data).stats
    assert s["world_size"] == 2 and s["steps"] == 6 and s["distributed_backend"] is not None
