"""Bootstrap intervals of eval metrics (evals/stats.py): coverage, pairing, reproducibility, the report's use."""

from __future__ import annotations

import math

import numpy as np
import pytest

from evals.report import eval_report_markdown
from evals.stats import delta, estimate, paired_delta, summarize


def test_interval_covers_the_mean_and_is_reproducible():
    rng = np.random.default_rng(3)
    values = rng.normal(0.5, 0.2, 200)
    est = estimate("rougeL", values, seed=0)
    assert est.low < values.mean() < est.high and est.n == 200
    # Roughly the normal-theory 95 % interval of a mean: +-1.96 standard errors.
    se = values.std(ddof=1) / math.sqrt(values.size)
    assert est.high - est.low == pytest.approx(2 * 1.96 * se, rel=0.15)
    assert estimate("rougeL", values, seed=0) == est  # seeded: the same interval every time
    assert estimate("rougeL", values, confidence=0.5).high - estimate("rougeL", values, confidence=0.5).low < \
        est.high - est.low
    assert estimate("rougeL", [0.4]).low is None  # one example: no interval, but the value


def test_perplexity_interval_is_token_weighted_over_examples():
    nll, tokens = np.array([2.0, 30.0, 4.0, 9.0]), np.array([1, 10, 2, 3])
    est = estimate("perplexity", nll, tokens)
    assert est.value == pytest.approx(math.exp(45 / 16)) and est.low <= est.value <= est.high


def test_paired_delta_sees_a_consistent_small_gain_that_unpaired_intervals_miss():
    rng = np.random.default_rng(0)
    base = rng.uniform(0, 1, 60)  # examples differ a lot in difficulty
    better = np.clip(base + 0.03 + rng.normal(0, 0.01, 60), 0, 1)
    a, b = estimate("rougeL", better), estimate("rougeL", base)
    assert a.low < b.high  # the two variants' own intervals overlap...
    d = delta("rougeL", better, base)
    assert d.low > 0 and d.value == pytest.approx(better.mean() - base.mean())  # ...the paired delta does not
    rel = delta("perplexity", base * 0.5, base, np.ones(60), np.ones(60))
    assert rel.value == pytest.approx(math.exp(base.sum() * 0.5 / 60) / math.exp(base.sum() / 60) - 1)
    with pytest.raises(ValueError, match="same examples"):
        delta("rougeL", [1, 2], [1])


def _scores(variant, values, metric="rougeL", source="s"):
    return [dict(variant=variant, split="test", example_id=f"e{i}", source=source, metric=metric, value=v, weight=1)
            for i, v in enumerate(values)]


def test_summarize_and_paired_delta_on_score_rows():
    scores = _scores("base", [0.1, 0.2, 0.3, 0.2]) + _scores("sft", [0.6, 0.7, 0.8, 0.6])
    rows = summarize(scores)
    overall = {r["variant"]: r for r in rows if r["source"] == "all"}
    assert overall["sft"]["value"] == pytest.approx(0.675) and overall["sft"]["examples"] == 4
    assert overall["sft"]["ci_low"] <= 0.675 <= overall["sft"]["ci_high"]
    # Pairs by example id, on the examples both scored.
    d = paired_delta(_scores("sft", [0.6, 0.7, 0.8]), _scores("base", [0.1, 0.2, 0.3, 0.2]), "test", "rougeL")
    assert d.n == 3 and d.value == pytest.approx(0.5)

    report = eval_report_markdown("r", rows, {"confidence": 0.95}, None, scores)
    assert "0.6750 [" in report and "n=4" in report and "Δ against the base (paired)" in report
