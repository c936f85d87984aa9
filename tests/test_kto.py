"""KTO on the demo's labelled answers (messages + label), through the real data plane, continuing a real SFT adapter."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import query, run_data_plane
from training_fixtures import STORIES_BASE, small_config

from tasks.data.sample_data import write_feedback_sample
from tasks.training.kto import run_kto
from tasks.training.sft import run_sft


@pytest.fixture(scope="module")
def kto_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("kto")
    (root / "raw").mkdir()
    write_feedback_sample(root / "raw")  # the demo's KTO file: every label-true row is also an SFT example
    cfg = small_config(root / "runs", **{"data.ingest.inputs": [str(root / "raw")], "data.split.validation": 0.2})
    data = run_data_plane(cfg)["split"]
    sft = run_sft(cfg, STORIES_BASE, data)
    return cfg, data, sft, run_kto(cfg, sft, data)


def test_undesirable_answers_reach_the_warehouse_but_not_sft(kto_run):
    cfg, *_ = kto_run
    labels = dict(query(cfg, "SELECT label, count(*) FROM feedback_examples WHERE split = 'train' GROUP BY label"))
    assert labels[True] > 50 and labels[False] > 50
    assert query(cfg, "SELECT count(DISTINCT label) FROM feedback_examples WHERE split = 'validation'")[0][0] == 2
    leaked = query(cfg, "SELECT count(*) FROM sft_examples e JOIN clean_rows c ON c.row_id = e.example_id "
                        "WHERE c.label IS NOT TRUE")[0][0]
    assert leaked == 0
    assert query(cfg, "SELECT count(*) FROM sft_examples")[0][0] == sum(
        n for (n,) in query(cfg, "SELECT count(*) FROM feedback_examples WHERE label"))


def test_kto_loss_falls_and_rewards_separate_held_out_answers(kto_run):
    cfg, data, sft, kto = kto_run
    s = kto.stats
    assert s["steps"] == 30 and s["last_loss"] < s["first_loss"], s
    # At step 0 the policy is the reference (the SFT model): every reward is 0.
    assert s["eval_reward_margin_start"] == pytest.approx(0.0, abs=1e-6)
    # Held-out rows (the validation split, never trained on): desirable answers now score above undesirable ones.
    assert s["eval_reward_chosen"] > 0 > s["eval_reward_rejected"] and s["eval_reward_margin"] > 1.0, s
    assert s["probe_reward_margin"] > s["probe_reward_margin_start"] + 0.5, s
    adapter = Path(kto.adapter)
    assert (adapter / "adapter_model.safetensors").is_file() and not (adapter / "ref").exists()
    assert kto.stage == "kto" and kto.base == sft.base

    held_out_loss = query(cfg, "SELECT value FROM training_curves WHERE stage = 'kto' AND metric = "
                               "'eval_validation_loss' ORDER BY step")
    assert held_out_loss[0][0] == pytest.approx(0.5) and held_out_loss[-1][0] < 0.4, held_out_loss
    curves = dict(query(cfg, "SELECT metric, count(*) FROM training_curves WHERE stage = 'kto' GROUP BY metric"))
    for metric in ("loss", "kl", "rewards/chosen", "rewards/rejected", "eval_validation_rewards/margins",
                   "eval_train_probe_rewards/margins"):
        assert curves.get(metric, 0) >= 1, metric
    summary = query(cfg, "SELECT eval_reward_margin FROM training_summary WHERE stage = 'kto'")
    assert summary == [(s["eval_reward_margin"],)]
    assert run_kto(cfg, sft, data) == kto  # same inputs: the finished run is read back, nothing is trained
