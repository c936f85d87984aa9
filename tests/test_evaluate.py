"""Evaluation stage on real data (the data plane over shared datasets) and real models (stories260K variants)."""

from __future__ import annotations

import math

import pytest
from eval_fixtures import (
    STORIES,
    chat_model,
    data_plane,
    eval_config,
    flow_run_artifacts,
    lora_adapter,
    merge,
    query,
)

from tasks.core.results import ModelResult
from tasks.evaluation.evaluate import run_eval
from tasks.evaluation.generation import (
    encode_for_loss,
    select_examples,
    split_conversation,
)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    cfg = eval_config(root / "runs")
    data = data_plane(cfg)
    base = chat_model(root / "base")
    adapter = lora_adapter(base, root / "adapter")
    merged = merge(base, adapter, root / "merged")
    variants = {"base": ModelResult(stage="base", fingerprint="b", path=str(STORIES)),  # the default template applies
                "sft": ModelResult(stage="sft", fingerprint="s", adapter=str(adapter), base=str(base)),
                "merged": ModelResult(stage="merge", fingerprint="m", path=str(merged), adapter=str(adapter),
                                      base=str(base))}
    return cfg, data, variants


def test_select_examples_round_robin_over_sources():
    ex = [{"example_id": f"{s}{i}", "source": s} for s in "abc" for i in range(5 if s == "a" else 1)]
    assert [e["example_id"] for e in select_examples(ex, 5)] == ["a0", "b0", "c0", "a1", "a2"]
    assert len(select_examples(ex, 100)) == 7


def test_loss_tokens_are_the_assistant_turns(setup):
    from tasks.training.loading import load_tokenizer

    cfg, _, variants = setup
    tok = load_tokenizer(variants["merged"].path, cfg)
    messages = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."},
                {"role": "user", "content": "Another?"}, {"role": "assistant", "content": "Red."}]
    enc = encode_for_loss(tok, messages, 512, "assistant")
    scored = tok.decode([t for t in enc["labels"] if t != -100])
    assert "Blue." in scored and "Red." in scored
    assert "colour" not in scored and "Another" not in scored and "user" not in scored
    # A template without {% generation %} markers: the prefix-rendering fallback selects the same turns.
    tok.chat_template = tok.chat_template.replace("{%- generation %}", "").replace("{%- endgeneration %}", "")
    fallback = encode_for_loss(tok, messages, 512, "assistant")
    assert fallback["input_ids"] == enc["input_ids"]
    assert tok.decode([t for t in fallback["labels"] if t != -100]).replace(" ", "") == scored.replace(" ", "")
    everything = encode_for_loss(tok, messages, 512, "all")
    assert everything["labels"] == everything["input_ids"]


def test_split_conversation_uses_last_assistant_turn():
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
    prompt, reference = split_conversation(msgs)
    assert [m["content"] for m in prompt] == ["a", "b", "c"] and reference == "d"
    assert split_conversation([{"role": "user", "content": "x"}]) is None


def test_run_eval_records_every_variant_on_the_same_examples(setup):
    cfg, data, variants = setup
    result = run_eval(cfg, data, variants)
    wh, run = data.warehouse, result.run_id
    assert result.stage == "evaluate" and run.startswith("local-")

    rows = query(wh, "SELECT variant, split, source, metric, value, n FROM eval_results WHERE run_id = ?", [run])
    sources = {r[0] for r in query(wh, "SELECT DISTINCT source FROM sft_examples WHERE split = 'test'")}
    assert {r[0] for r in rows} == {"base", "sft", "merged"}
    for variant in ("base", "sft", "merged"):
        mine = [r for r in rows if r[0] == variant]
        assert {(r[1], r[3]) for r in mine} == {("validation", "perplexity"), ("test", "perplexity"),
                                                ("test", "rouge1"), ("test", "rouge2"), ("test", "rougeL"),
                                                ("test", "rougeLsum")}
        assert {r[2] for r in mine if r[1] == "test"} == sources | {"all"}  # every dataset, plus overall
        # Overall perplexity is token-weighted: exp of the token-weighted mean log-perplexity of the sources.
        for split in ("validation", "test"):
            per = [r for r in mine if r[1] == split and r[3] == "perplexity" and r[2] != "all"]
            total = next(r for r in mine if r[1] == split and r[3] == "perplexity" and r[2] == "all")
            assert total[5] == sum(r[5] for r in per) > 0
            pooled = math.exp(sum(r[5] * math.log(r[4]) for r in per) / total[5])
            assert total[4] == pytest.approx(pooled, rel=1e-9)
        for r in mine:
            if r[3].startswith("rouge"):
                assert 0.0 <= r[4] <= 1.0 and r[5] >= 1

    ppl = {r[0]: r[4] for r in rows if r[1:4] == ("test", "all", "perplexity")}
    # The merge is exact (float32): merged scores like the adapter on its base; the adapter changes the model.
    assert ppl["merged"] == pytest.approx(ppl["sft"], rel=1e-4)
    assert abs(ppl["sft"] - ppl["base"]) / ppl["base"] > 1e-3

    gens = query(wh, "SELECT variant, example_id, prediction, new_tokens FROM eval_generations WHERE run_id = ?",
                 [run])
    by_variant = {}
    for v, ex, pred, n in gens:
        by_variant.setdefault(v, []).append(ex)
        assert 1 <= n <= cfg.eval.max_new_tokens
    assert len(by_variant["base"]) == cfg.eval.max_generate_examples
    assert sorted(by_variant["base"]) == sorted(by_variant["sft"]) == sorted(by_variant["merged"])
    assert {g[2] for g in gens if g[0] == "merged"} == {g[2] for g in gens if g[0] == "sft"}  # greedy, identical

    # Every figure over 2+ examples carries its bootstrap interval; the per-example scores behind it are kept.
    inside, with_ci = query(wh, "SELECT count(*) FILTER (WHERE ci_low <= value AND value <= ci_high), count(*) "
                                "FILTER (WHERE examples >= 2) FROM eval_results WHERE run_id = ?", [run])[0]
    assert inside == with_ci > 0
    counts = query(wh, "SELECT variant, count(*) FROM eval_example_scores WHERE run_id = ? AND metric = 'rougeL' "
                       "GROUP BY ALL", [run])
    assert dict(counts) == dict.fromkeys(("base", "sft", "merged"), cfg.eval.max_generate_examples)

    report = open(result.report_path, encoding="utf-8").read()
    assert "| merged |" in report and "Δ against the base" in report and "No run has been promoted yet" in report
    excluded = dict(query(wh, "SELECT split, rows FROM eval_exclusions WHERE kind = 'sft'"))
    assert (f"rows excluded for overlapping training (validation/test): {excluded.get('validation', 0)}/"
            f"{excluded.get('test', 0)}") in report
    assert result.artifacts == []  # outside a flow run: nothing published, nothing fails
    assert query(wh, "SELECT count(*) FROM eval_summary WHERE run_id = ?", [run])[0][0] == 3


def test_eval_task_publishes_report_and_samples_in_a_flow(setup):
    from prefect import flow

    from tasks.evaluation.evaluate import evaluate_task

    cfg, data, variants = setup
    cfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"max_generate_examples": 2})})

    @flow
    def evaluate_only():
        return evaluate_task(cfg, data, base=variants["base"], merged=variants["merged"])

    state = evaluate_only(return_state=True)
    result = state.result()
    assert result.run_id == str(state.state_details.flow_run_id)  # rows are keyed by the flow run
    arts = flow_run_artifacts(state.state_details.flow_run_id)
    assert {"eval-report", "eval-samples"} <= set(arts)
    assert "| merged |" in arts["eval-report"].data and "| base |" in arts["eval-report"].data
    assert "reference" in arts["eval-samples"].data and "merged" in arts["eval-samples"].data
    assert query(data.warehouse, "SELECT count(DISTINCT variant) FROM eval_results WHERE run_id = ?",
                 [result.run_id])[0][0] == 2
