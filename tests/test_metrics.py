"""The local evaluate metrics: perplexity against an independent NLL, ROUGE against rouge_score and on Chinese."""

from __future__ import annotations

import json
import math

import pytest
import torch
from eval_fixtures import SHARED, STORIES
from rouge_score import rouge_scorer

from evals.metrics import load_metric

TYPES = ["rouge1", "rouge2", "rougeL", "rougeLsum"]


@pytest.fixture(scope="module")
def stories():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(str(STORIES)).eval(), AutoTokenizer.from_pretrained(str(STORIES))


def test_perplexity_is_exp_of_mean_token_nll(stories):
    model, tok = stories
    texts = ["Once upon a time there was a little cat.", "The dog ran to the park and played.", "Lily was happy."]
    ids = [tok(t)["input_ids"] for t in texts]
    labels = [list(x) for x in ids]
    labels[0][:5] = [-100] * 5  # a masked prompt: those positions must not count
    labels[2][-2:] = [-100] * 2

    out = load_metric("perplexity").compute(input_ids=ids, labels=labels, model=model, batch_size=2)

    # Independent: one forward pass per scored token on its unpadded prefix, log-softmax by hand.
    nlls = []
    with torch.no_grad():
        for seq, lab in zip(ids, labels):
            for t in range(1, len(seq)):
                if lab[t] == -100:
                    continue
                logits = model(torch.tensor([seq[:t]])).logits[0, -1]
                nlls.append(-(logits - torch.logsumexp(logits, -1))[lab[t]].item())
    assert out["n_tokens"] == len(nlls) == sum(len(x) - 1 for x in ids) - 5 - 2 + 1  # labels[0][0] was unscored anyway
    assert out["perplexity"] == pytest.approx(math.exp(sum(nlls) / len(nlls)), rel=1e-5)
    assert out["nll_sum"] == pytest.approx(sum(nlls), rel=1e-5)
    assert sum(out["token_counts"]) == out["n_tokens"]
    # A real pretrained model on its own domain: perplexity far below the 512-token vocabulary size.
    assert 1 < out["perplexity"] < 50


def _alpaca_pairs(n: int = 12) -> list[tuple[str, str]]:
    rows = json.loads((SHARED / "data" / "instruct_alpaca_en" / "alpaca_en_demo.json").read_text())[:n]
    # Prediction: the reference with its sentences reordered and the first words dropped: partial overlap.
    return [(" ".join(r["output"].split(". ")[::-1]).split(" ", 3)[-1], r["output"]) for r in rows]


@pytest.mark.parametrize("use_stemmer", [False, True])
def test_rouge_matches_rouge_score_on_english(use_stemmer):
    pairs = _alpaca_pairs()
    preds, refs = [p for p, _ in pairs], [r for _, r in pairs]
    ours = load_metric("rouge").compute(predictions=preds, references=refs, use_aggregator=False,
                                        use_stemmer=use_stemmer)
    scorer = rouge_scorer.RougeScorer(TYPES, use_stemmer=use_stemmer)
    expected = [scorer.score(r, p) for p, r in pairs]
    for t in TYPES:
        assert ours[t] == pytest.approx([e[t].fmeasure for e in expected], abs=1e-12)
    mean = load_metric("rouge").compute(predictions=preds, references=refs, use_stemmer=use_stemmer)
    for t in TYPES:
        assert mean[t] == pytest.approx(sum(e[t].fmeasure for e in expected) / len(expected), abs=1e-12)
        assert 0.2 < mean[t] < 1.0  # partial overlap, neither trivial value


def test_rouge_scores_chinese_per_character():
    rouge = load_metric("rouge")
    zh = "人工智能辅助诊断系统可以帮助医生诊断疾病。"
    # rouge_score alone cannot see Chinese at all: identical strings score 0.
    assert rouge_scorer.RougeScorer(["rouge1"]).score(zh, zh)["rouge1"].fmeasure == 0.0
    same = rouge.compute(predictions=[zh], references=[zh])
    assert all(same[t] == pytest.approx(1.0) for t in TYPES)
    # One character of 20 differs (punctuation is not a token): unigram F = 19/20 exactly.
    changed = rouge.compute(predictions=[zh.replace("医生", "医师")], references=[zh], rouge_types=["rouge1"])
    assert changed["rouge1"] == pytest.approx(19 / 20, abs=1e-12)
    unrelated = rouge.compute(predictions=["今天天气很好"], references=[zh], rouge_types=["rouge1"])
    assert unrelated["rouge1"] < 0.1
    # Mixed scripts: Latin words stay words, Han characters are single tokens.
    mixed = rouge.compute(predictions=["用 Python 写代码"], references=["用 Python 写代码"], rouge_types=["rouge2"])
    assert mixed["rouge2"] == pytest.approx(1.0)
