"""DPO stage on dpo_en_demo preference pairs, continuing a real SFT adapter on stories260K."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from training_fixtures import sft_on_stories

from tasks.core.results import load_result
from tasks.core.warehouse import open_warehouse
from tasks.training.dpo import run_dpo


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    return sft_on_stories(tmp_path_factory.mktemp("dpo"), **{"model.max_length": 192})


@pytest.fixture(scope="module")
def dpo_run(sft_run):
    cfg, data, sft = sft_run
    return run_dpo(cfg, sft, data)


def test_dpo_reward_accuracy_rises_and_margins_grow(sft_run, dpo_run):
    s = dpo_run.stats
    assert s["steps"] == 20 and s["train_pairs"] == 41 and s["eval_pairs"] > 0
    # At step 0 the policy is exactly the reference (the SFT model): every reward and margin is 0.
    assert s["probe_reward_accuracy_start"] == 0.0 and s["probe_reward_margin_start"] == 0.0
    # The same fixed training pairs, re-scored after training: the chosen answers now win, by a growing margin.
    assert s["probe_reward_accuracy"] > 0.5 and s["probe_reward_margin"] > s["probe_reward_margin_start"] + 0.5, s
    assert s["train_reward_accuracy"] > 0.5 and s["last_loss"] < s["first_loss"]
    assert s["eval_reward_accuracy"] is not None and s["eval_reward_margin"] is not None  # validation is reported
    adapter = Path(dpo_run.adapter)
    assert (adapter / "adapter_model.safetensors").is_file() and not (adapter / "ref").exists()
    sft_template = Path(sft_run[2].adapter, "chat_template.jinja").read_text()
    assert (adapter / "chat_template.jinja").read_text() == sft_template

    cfg, data, sft = sft_run
    with open_warehouse(data.warehouse, read_only=True) as con:
        curves = dict(con.execute(
            "SELECT metric, count(*) FROM training_curves WHERE stage = 'dpo' GROUP BY metric").fetchall())
        summary = con.execute("SELECT eval_reward_accuracy FROM training_summary WHERE stage = 'dpo'").fetchone()
    for metric in ("loss", "rewards/accuracies", "rewards/margins", "grad_norm", "learning_rate", "tokens_per_s",
                   "eval_validation_rewards/accuracies", "eval_validation_rewards/margins",
                   "eval_train_probe_rewards/margins"):
        assert curves.get(metric, 0) >= 1, metric
    assert summary[0] == s["eval_reward_accuracy"]


def test_new_beta_reuses_cached_reference_log_probs(sft_run, dpo_run):
    cfg, data, sft = sft_run
    assert dpo_run.stats["ref_logps_computed"] == 3  # train, validation, train probe: computed once
    cache = sorted(cfg.cache_dir("ref_logps").glob("*.safetensors"))
    assert len(cache) == 3
    before = {p: p.stat().st_mtime_ns for p in cache}

    again = run_dpo(cfg.model_copy(update={"dpo": cfg.dpo.model_copy(update={"beta": 0.3})}), sft, data)
    s = again.stats
    assert s["beta"] == 0.3 and again.out_dir != dpo_run.out_dir  # a new run, not a clobbered one
    assert s["ref_logps_computed"] == 0 and s["ref_logps_cache_hits"] == 3
    assert {p: p.stat().st_mtime_ns for p in cache} == before
    assert s["probe_reward_accuracy"] > 0.5


def test_dpo_uses_only_the_training_split(sft_run, dpo_run):
    cfg, data, sft = sft_run
    with open_warehouse(data.warehouse, read_only=True) as con:
        n_train = con.execute("SELECT count(*) FROM preference_pairs WHERE split = 'train'").fetchone()[0]
        n_valid = con.execute("SELECT count(*) FROM preference_pairs WHERE split = 'validation'").fetchone()[0]
    assert dpo_run.stats["train_pairs"] == n_train and n_valid > 0
    assert load_result(Path(dpo_run.out_dir, "result.json").read_text()) == dpo_run


def test_two_process_dpo_computes_the_same_reference_log_probs(sft_run, dpo_run):
    from safetensors.torch import load_file

    cfg, data, sft = sft_run
    cache = cfg.cache_dir("ref_logps")
    single = {p.name: load_file(str(p)) for p in cache.glob("*.safetensors")}
    shutil.rmtree(cache)  # force the 2-process run to compute them itself
    d = cfg.dpo.model_copy(update={"num_processes": 2, "max_steps": 4, "eval_steps": 4, "save_steps": 4,
                                   "per_device_batch_size": 4, "beta": 0.2})
    s = run_dpo(cfg.model_copy(update={"dpo": d}), sft, data).stats
    assert s["world_size"] == 2 and s["distributed_backend"] == "gloo" and s["steps"] == 4
    assert s["ref_logps_computed"] == 3 and s["ref_logps_cache_hits"] == 0
    double = {p.name: load_file(str(p)) for p in cache.glob("*.safetensors")}
    assert double.keys() == single.keys()  # same pairs, same SFT model: same cache entries
    for name, tensors in single.items():  # gathered across ranks in the original pair order
        for key in ("chosen", "rejected"):
            torch.testing.assert_close(double[name][key], tensors[key], atol=1e-3, rtol=1e-4)
