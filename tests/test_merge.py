"""Merge stage (parity, corrupted adapters) and the training stages as cached Prefect tasks."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from training_fixtures import (
    STORIES,
    alpaca_examples,
    make_warehouse,
    preference_pairs,
    sft_on_stories,
    small_config,
)
from transformers import AutoModelForCausalLM, AutoTokenizer

from tasks.core.results import ModelResult
from tasks.core.warehouse import open_warehouse
from tasks.training.merge import (
    AdapterError,
    MergeParityError,
    merge_adapter,
    run_merge,
)

VALID = alpaca_examples(8, offset=240)


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    return sft_on_stories(tmp_path_factory.mktemp("merge"))


def _saved_merged_vs_adapter_logits(model_dir: Path, adapter_dir: Path) -> tuple[float, float]:
    """(max |merged - adapter model| logit, max |adapter model - base| logit) over the validation conversations."""
    from peft import PeftModel

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    merged = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float32).eval()
    with torch.no_grad():
        inputs = [tokenizer.apply_chat_template(ex["messages"], return_tensors="pt", return_dict=True)["input_ids"]
                  for ex in VALID[:4]]
        base_logits = [base(ids).logits for ids in inputs]
        adapted = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
        diff = max((merged(ids).logits - adapted(ids).logits).abs().max().item() for ids in inputs)
        effect = max((adapted(ids).logits - b).abs().max().item() for ids, b in zip(inputs, base_logits))
    return diff, effect


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_merged_model_matches_adapter_model(sft_run, dtype):
    cfg, data, sft = sft_run
    cfg = cfg.model_copy(update={"merge": cfg.merge.model_copy(update={"dtype": dtype})})
    result = run_merge(cfg, sft)
    s = result.stats
    assert s["dtype"] == dtype and s["parity_examples"] == 4
    assert s["max_abs_logit_diff"] <= s["parity_atol"] and s["max_abs_logit_diff_saved"] <= s["parity_atol"]
    assert s["parity_atol"] == {"float32": 1e-3, "float16": 0.25}[dtype]
    assert s["adapter_effect_max_abs_logit"] > 100 * s["max_abs_logit_diff"]  # a real adapter, not a no-op
    model_dir = Path(result.path)
    for name in ("model.safetensors", "config.json", "tokenizer.json", "chat_template.jinja"):
        assert (model_dir / name).is_file(), name
    assert not list(model_dir.glob("adapter*"))  # a plain model: no peft needed to serve it
    assert (model_dir / "chat_template.jinja").read_text() == (Path(sft.adapter) / "chat_template.jinja").read_text()
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert model.dtype == getattr(torch, dtype)
    # Parity checked here, not taken from the stage's own report: the saved model against the adapter on the base.
    diff, adapter_effect = _saved_merged_vs_adapter_logits(model_dir, Path(sft.adapter))
    assert diff <= {"float32": 1e-3, "float16": 0.25}[dtype] and adapter_effect > 100 * diff
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompt = tokenizer.apply_chat_template(VALID[0]["messages"][:1], add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    out = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert out.shape[1] > prompt["input_ids"].shape[1]
    with open_warehouse(data.warehouse, read_only=True) as con:
        assert con.execute("SELECT count(*) FROM training_runs WHERE stage = 'merge'").fetchone()[0] >= 1


def test_parity_mismatch_fails_and_writes_nothing(sft_run, tmp_path):
    cfg, data, sft = sft_run
    strict = small_config(tmp_path, **{"merge.parity_atol": 1e-12, "merge.dtype": "float16"})
    with pytest.raises(MergeParityError, match="differ from the adapter model's"):
        merge_adapter(strict, STORIES, sft.adapter, VALID, tmp_path / "out")
    assert not (tmp_path / "out" / "model").exists()


def _copy_adapter(sft: ModelResult, dest: Path) -> Path:
    shutil.copytree(sft.adapter, dest)
    return dest


def test_corrupted_adapters_are_rejected(sft_run, tmp_path):
    cfg, data, sft = sft_run

    truncated = _copy_adapter(sft, tmp_path / "truncated")
    weights = truncated / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(AdapterError, match="corrupted: cannot read adapter_model.safetensors"):
        merge_adapter(cfg, STORIES, truncated, VALID, tmp_path / "o1")

    flipped = _copy_adapter(sft, tmp_path / "flipped")  # still loads, but is not what training wrote
    raw = bytearray((flipped / "adapter_model.safetensors").read_bytes())
    raw[-100] ^= 0xFF
    (flipped / "adapter_model.safetensors").write_bytes(bytes(raw))
    with pytest.raises(AdapterError, match="changed since training"):
        merge_adapter(cfg, STORIES, flipped, VALID, tmp_path / "o2", expected_sha=sft.adapter_sha)

    partial = _copy_adapter(sft, tmp_path / "partial")
    tensors = load_file(str(partial / "adapter_model.safetensors"))
    save_file(dict(list(tensors.items())[: len(tensors) // 2]), str(partial / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match="weights are missing from the file"):
        merge_adapter(cfg, STORIES, partial, VALID, tmp_path / "o3")

    poisoned = _copy_adapter(sft, tmp_path / "poisoned")
    tensors = load_file(str(poisoned / "adapter_model.safetensors"))
    first = next(iter(tensors))
    tensors[first][0, 0] = float("nan")
    save_file(tensors, str(poisoned / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match="non-finite"):
        merge_adapter(cfg, STORIES, poisoned, VALID, tmp_path / "o4")

    (missing := _copy_adapter(sft, tmp_path / "missing")).joinpath("adapter_config.json").unlink()
    with pytest.raises(AdapterError, match="adapter_config.json is missing"):
        merge_adapter(cfg, STORIES, missing, VALID, tmp_path / "o5")

    # The stage checks the checksum training recorded (a merge config not run before, so nothing is reused).
    fresh = cfg.model_copy(update={"merge": cfg.merge.model_copy(update={"parity_examples": 3})})
    with pytest.raises(AdapterError, match="changed since training"):
        run_merge(fresh, sft.model_copy(update={"adapter": str(flipped)}))
    for out in ("o1", "o2", "o3", "o4", "o5"):
        assert not (tmp_path / out / "model").exists()


def test_adapter_for_another_base_is_rejected(tmp_path):
    from tasks.training.base import build_embedded_base
    from tasks.training.sft import run_sft

    train = alpaca_examples(120)
    cfg = small_config(tmp_path, **{"model.base": "embedded", "model.embedded_warmup_steps": 5,
                                    "model.quantization": "none", "sft.max_steps": 2, "sft.save_steps": 2})
    base = build_embedded_base(cfg, [m["content"] for ex in train for m in ex["messages"]], tmp_path / "base")
    sft = run_sft(cfg, base, make_warehouse(tmp_path / "wh.duckdb", sft={"train": train}))
    with pytest.raises(AdapterError, match="does not fit this base model"):
        merge_adapter(cfg, STORIES, sft.adapter, VALID, tmp_path / "out")


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    """The session's Prefect server (tests/conftest.py) when there is one, else a temporary one for this module."""
    import contextlib
    import os

    from prefect.settings import PREFECT_RESULTS_LOCAL_STORAGE_PATH, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    server = contextlib.nullcontext() if os.environ.get("PREFECT_API_URL") else prefect_test_harness()
    with server, temporary_settings({PREFECT_RESULTS_LOCAL_STORAGE_PATH:
                                     str(tmp_path_factory.mktemp("prefect-results"))}):
        yield


def test_training_tasks_are_cached_and_rerun_only_downstream_of_a_change(prefect_server, tmp_path):
    """Embedded default, data -> base -> SFT -> DPO -> merge as Prefect tasks; then unchanged; then a new beta."""
    from prefect import flow

    from tasks.training.base import base_task
    from tasks.training.dpo import dpo_task
    from tasks.training.merge import merge_task
    from tasks.training.sft import sft_task

    pairs = preference_pairs(57)
    data = make_warehouse(tmp_path / "warehouse.duckdb",
                          sft={"train": alpaca_examples(300), "validation": alpaca_examples(16, offset=300)},
                          pairs={"train": pairs[:41], "validation": pairs[41:]})

    @flow
    def training(cfg):
        base = base_task(cfg, data, return_state=True)
        sft = sft_task(cfg, base.result(), data, return_state=True)
        dpo = dpo_task(cfg, sft.result(), data, return_state=True)
        merged = merge_task(cfg, dpo.result(), return_state=True)
        return {name: (state.name, state.result()) for name, state in
                (("base", base), ("sft", sft), ("dpo", dpo), ("merge", merged))}

    cfg = small_config(tmp_path, **{"model.base": "embedded", "model.max_length": 192,
                                    "model.embedded_warmup_steps": 20, "sft.max_steps": 10, "dpo.max_steps": 6,
                                    "dpo.eval_steps": 6, "dpo.train_probe_pairs": 0})
    first = training(cfg)
    assert {k: name for k, (name, _) in first.items()} == dict.fromkeys(first, "Completed")
    assert Path(first["merge"][1].path, "model.safetensors").is_file()

    # Unchanged inputs: every stage is served from the cache and nothing trains or writes.
    def files():
        return {p: p.stat().st_mtime_ns for p in (tmp_path / "models").rglob("*")}

    before = files()
    again = training(cfg)
    assert {k: name for k, (name, _) in again.items()} == dict.fromkeys(again, "Cached")
    assert {k: r for k, (_, r) in again.items()} == {k: r for k, (_, r) in first.items()}
    assert files() == before

    # A new DPO beta reruns DPO and merge only.
    new_beta = cfg.model_copy(update={"dpo": cfg.dpo.model_copy(update={"beta": 0.5})})
    third = training(new_beta)
    assert {k: name for k, (name, _) in third.items()} == {"base": "Cached", "sft": "Cached", "dpo": "Completed",
                                                            "merge": "Completed"}
    assert third["dpo"][1].stats["beta"] == 0.5 and third["merge"][1].path != first["merge"][1].path
