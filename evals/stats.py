"""Confidence intervals of eval metrics: bootstrap over examples with scipy.stats.bootstrap, seeded.

Every metric is a statistic of per-example scores (`values`, `weights`):
- perplexity: values are an example's summed token NLL, weights its scored tokens; the statistic is
  exp(sum(values) / sum(weights)), token-weighted like the point estimate, resampled by example;
- every other metric (ROUGE F-measures, preference accuracy and margin): the mean of values (weights unused).

Deltas compare two variants (or a variant with the last promoted run) on the same examples with a paired bootstrap
(`paired=True`: one resample of example indices serves both sides). The delta of perplexity is relative
(candidate / reference - 1, as the promotion gate reads it); every other delta is the difference. Intervals are
percentile intervals: BCa is undefined where every example scores the same (an accuracy of 1.0), which small evals
hit often.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

RATIO_METRICS = {"perplexity"}  # token-weighted: a ratio of sums over examples; relative deltas


@dataclass(frozen=True)
class Estimate:
    value: float | None
    low: float | None
    high: float | None
    n: int  # examples (the resampled units)


def _stat(metric: str, values, weights, axis=-1):
    if metric in RATIO_METRICS:
        return np.exp(np.sum(values, axis=axis) / np.sum(weights, axis=axis))
    return np.mean(values, axis=axis)


def point(metric: str, values, weights=None) -> float | None:
    values = np.asarray(values, dtype=float)
    if values.size == 0:
        return None
    weights = np.ones_like(values) if weights is None else np.asarray(weights, dtype=float)
    if metric in RATIO_METRICS and weights.sum() == 0:
        return None
    return float(_stat(metric, values, weights))


def _bootstrap(samples: tuple, statistic, confidence: float, n_resamples: int, seed: int):
    from scipy.stats import bootstrap

    res = bootstrap(samples, statistic, paired=True, vectorized=True, confidence_level=confidence,
                    n_resamples=n_resamples, method="percentile", rng=np.random.default_rng(seed))
    low, high = res.confidence_interval
    return (None if np.isnan(low) else float(low)), (None if np.isnan(high) else float(high))


def estimate(metric: str, values, weights=None, confidence: float = 0.95, n_resamples: int = 2000,
             seed: int = 0) -> Estimate:
    """The metric over these examples with its bootstrap interval (no interval below 2 examples)."""
    values = np.asarray(values, dtype=float)
    weights = np.ones_like(values) if weights is None else np.asarray(weights, dtype=float)
    value = point(metric, values, weights)
    if values.size < 2 or value is None:
        return Estimate(value, None, None, int(values.size))
    low, high = _bootstrap((values, weights), lambda v, w, axis=-1: _stat(metric, v, w, axis), confidence,
                           n_resamples, seed)
    return Estimate(value, low, high, int(values.size))


def delta(metric: str, values, reference, weights=None, reference_weights=None, confidence: float = 0.95,
          n_resamples: int = 2000, seed: int = 0) -> Estimate:
    """Paired delta of the metric between two score lists on the same examples (same order): the relative change
    for perplexity, the difference otherwise, with its paired bootstrap interval."""
    a, b = np.asarray(values, dtype=float), np.asarray(reference, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired scores need the same examples: {a.shape} vs {b.shape}")
    wa = np.ones_like(a) if weights is None else np.asarray(weights, dtype=float)
    wb = np.ones_like(b) if reference_weights is None else np.asarray(reference_weights, dtype=float)

    def stat(a_, wa_, b_, wb_, axis=-1):
        sa, sb = _stat(metric, a_, wa_, axis), _stat(metric, b_, wb_, axis)
        return sa / sb - 1 if metric in RATIO_METRICS else sa - sb

    if a.size == 0:
        return Estimate(None, None, None, 0)
    value = float(stat(a, wa, b, wb))
    if a.size < 2:
        return Estimate(value, None, None, int(a.size))
    low, high = _bootstrap((a, wa, b, wb), stat, confidence, n_resamples, seed)
    return Estimate(value, low, high, int(a.size))


def summarize(scores: list[dict], confidence: float = 0.95, n_resamples: int = 2000, seed: int = 0) -> list[dict]:
    """eval_results rows from per-example scores ({variant, split, example_id, source, metric, value, weight}): per
    source and overall (source "all"), each with its bootstrap interval. n is the scored tokens for perplexity and
    the examples otherwise."""
    groups: dict[tuple, list[dict]] = {}
    for s in scores:
        for source in (s["source"], "all"):
            groups.setdefault((s["variant"], s["split"], source, s["metric"]), []).append(s)
    rows = []
    for (variant, split, source, metric), items in groups.items():
        values, weights = [s["value"] for s in items], [s["weight"] for s in items]
        est = estimate(metric, values, weights, confidence, n_resamples, seed)
        n = int(sum(weights)) if metric in RATIO_METRICS else len(items)
        rows.append(dict(variant=variant, split=split, source=source, metric=metric, value=est.value, n=n,
                         examples=est.n, ci_low=est.low, ci_high=est.high))
    return rows


def paired_delta(scores: list[dict], reference: list[dict], split: str, metric: str, confidence: float = 0.95,
                 n_resamples: int = 2000, seed: int = 0) -> Estimate:
    """Paired delta of one overall metric between two variants' (or runs') scores, on the examples both scored."""
    ref = {s["example_id"]: s for s in reference if (s["split"], s["metric"]) == (split, metric)}
    both = [(s, ref[s["example_id"]]) for s in scores
            if (s["split"], s["metric"]) == (split, metric) and s["example_id"] in ref]
    both.sort(key=lambda p: p[0]["example_id"])
    return delta(metric, [a["value"] for a, _ in both], [b["value"] for _, b in both],
                 [a["weight"] for a, _ in both], [b["weight"] for _, b in both], confidence, n_resamples, seed)
