"""Promotion gate: thresholds against the last promoted run (or the base), DuckDB records, flow end state."""

from __future__ import annotations

import numpy as np
import pytest
from eval_fixtures import eval_config, flow_run_artifacts, query

from tasks.core.results import EvalResult, VariantRecord
from tasks.core.warehouse import open_warehouse
from tasks.evaluation.promote import (
    PromotionRejected,
    gate,
    promotion_state,
    raise_if_rejected,
    run_promote,
)


def _evaluation(warehouse, run_id: str, metrics: dict[str, tuple[float, float]]) -> dict:
    """Record eval_results for a run ({variant: (test perplexity, test ROUGE-L)}) and return its stage result."""
    with open_warehouse(warehouse) as con:
        for variant, (ppl, rouge_l) in metrics.items():
            for split, metric, value in (("test", "perplexity", ppl), ("validation", "perplexity", ppl * 1.1),
                                         ("test", "rougeL", rouge_l), ("test", "rouge1", rouge_l + 0.05)):
                con.execute("INSERT INTO eval_results (run_id, variant, split, source, metric, value, n) "
                            "VALUES (?, ?, ?, 'all', ?, ?, 10)", [run_id, variant, split, metric, value])
    variants = {v: VariantRecord(fingerprint=v, model=f"/models/{run_id}/{v}", path=f"/models/{run_id}/{v}")
                for v in metrics}
    return EvalResult(stage="evaluate", fingerprint=run_id, run_id=run_id, warehouse=str(warehouse),
                      report_path="", variants=variants, metrics={})


def test_gate_thresholds():
    cfg = eval_config("runs", promote={"max_perplexity_rise": 0.05, "max_rouge_l_drop": 0.02})
    base = {("test", "perplexity"): 10.0, ("test", "rougeL"): 0.30}
    ok, reasons = gate({("test", "perplexity"): 10.5, ("test", "rougeL"): 0.28}, base, cfg)  # both at the limit
    assert reasons == [] and all(c["passed"] for c in ok)
    checks, reasons = gate({("test", "perplexity"): 10.6, ("test", "rougeL"): 0.27}, base, cfg)
    assert [c["passed"] for c in checks] == [False, False] and len(reasons) == 2
    assert "rose from 10.0000 to 10.6000" in reasons[0] and "fell from 0.3000 to 0.2700" in reasons[1]
    _, reasons = gate({("test", "perplexity"): 9.0}, base, cfg)
    assert reasons == ["ROUGE-L (test) missing for the candidate"]
    strict = eval_config("runs")  # defaults: perplexity must not rise at all
    assert gate({("test", "perplexity"): 10.0, ("test", "rougeL"): 0.3}, base, strict)[1] == []  # equal is fine
    assert gate({("test", "perplexity"): 10.001, ("test", "rougeL"): 0.3}, base, strict)[1]


def _scores(variant: str, metric: str, values, split: str = "test") -> list[dict]:
    return [dict(variant=variant, split=split, example_id=f"ex{i}", source="s", metric=metric, value=float(v),
                 weight=1.0) for i, v in enumerate(values)]


def test_interval_rule_rejects_only_drops_beyond_tolerance_with_confidence():
    rng = np.random.default_rng(0)
    base_values = rng.uniform(0.2, 0.8, 40)
    noise = rng.normal(0, 0.15, 40)
    noisy = base_values - 0.04 + noise - noise.mean()  # a drop of 0.04 on average, beyond 0.02 but within the noise
    broken = base_values - 0.3 + rng.normal(0, 0.05, 40)  # a real one
    base = {("test", "perplexity"): 10.0, ("test", "rougeL"): base_values.mean()}
    base_scores = _scores("base", "rougeL", base_values)
    interval = eval_config("runs")
    point = eval_config("runs", promote={"rule": "point"})
    for values, rule_cfg, rejected in ((noisy, interval, False), (noisy, point, True), (broken, interval, True)):
        cand = {("test", "perplexity"): 10.0, ("test", "rougeL"): values.mean()}
        checks, reasons = gate(cand, base, rule_cfg, _scores("merged", "rougeL", values), base_scores)
        assert bool(reasons) == rejected, (rule_cfg.promote.rule, reasons)
    rouge = next(c for c in checks if c["metric"] == "rougeL")
    assert rouge["rule"] == "interval" and rouge["n"] == 40 and rouge["delta_high"] < -0.02
    # The reason names the metric, its interval and the threshold.
    assert "ROUGE-L (test) fell from" in reasons[0] and "95% interval [" in reasons[0] and "n=40" in reasons[0]
    assert "allowed a drop of 0.0200" in reasons[0]
    assert next(c for c in checks if c["metric"] == "perplexity")["rule"].startswith("point")  # no scores: point


def test_preference_accuracy_minimum_and_drop():
    cfg = eval_config("runs")
    base = {("test", "perplexity"): 10.0, ("test", "rougeL"): 0.3, ("test", "preference_accuracy"): 0.9}
    good = dict(base)
    checks, reasons = gate(good, base, cfg, _scores("m", "preference_accuracy", [1] * 27 + [0] * 3),
                           _scores("b", "preference_accuracy", [1] * 27 + [0] * 3))
    assert reasons == [] and {c["check"] for c in checks} >= {"preference accuracy (test)",
                                                             "preference accuracy (test) minimum"}
    worse = {**base, ("test", "preference_accuracy"): 0.2}
    _, reasons = gate(worse, base, cfg, _scores("m", "preference_accuracy", [1] * 6 + [0] * 24),
                      _scores("b", "preference_accuracy", [1] * 27 + [0] * 3))
    assert any(r.startswith("preference accuracy (test) fell from 0.9000 to 0.2000") for r in reasons)
    assert any("below the minimum 0.5000" in r for r in reasons)
    # No preference pairs in the data: no preference checks.
    assert all("preference" not in c["check"] for c in gate({("test", "perplexity"): 9.0, ("test", "rougeL"): 0.3},
                                                           {("test", "perplexity"): 9.0, ("test", "rougeL"): 0.3},
                                                           cfg)[0])


def test_promotions_against_base_then_last_promoted(tmp_path):
    cfg = eval_config(tmp_path / "runs")
    wh = tmp_path / "warehouse.duckdb"

    # First run: nothing promoted yet, so the merged model must beat this run's base.
    first = run_promote(cfg, _evaluation(wh, "run-1", {"base": (20.0, 0.10), "sft": (12.0, 0.2),
                                                        "merged": (12.0, 0.20)}))
    assert first.promoted and first.variant == "merged" and first.baseline_kind == "base"
    assert first.model_path == "/models/run-1/merged"
    assert query(wh, "SELECT run_id, model_path FROM current_model") == [("run-1", "/models/run-1/merged")]

    # Second run: worse perplexity than run-1's promoted model (though better than its own base): rejected.
    second = run_promote(cfg, _evaluation(wh, "run-2", {"base": (20.0, 0.10), "merged": (13.0, 0.25)}))
    assert not second.promoted and second.baseline_kind == "last_promoted"
    assert second.baseline_run_id == "run-1"
    assert second.reasons == ["perplexity (test) rose from 12.0000 to 13.0000 (limit 12.0000)"]
    assert query(wh, "SELECT run_id FROM current_model") == [("run-1",)]  # the pointer did not move
    with pytest.raises(PromotionRejected, match="rose from 12.0000"):
        raise_if_rejected(second)

    # A better run is promoted against run-1 (rejected runs are never a baseline).
    again = run_promote(cfg, _evaluation(wh, "run-2b", {"merged": (11.0, 0.25)}))
    assert again.promoted and again.baseline_run_id == "run-1"
    # Deciding a run again is idempotent: the recorded decision comes back, no second row.
    other_path = {"merged": VariantRecord(model="/x", path="/x")}
    assert run_promote(cfg, _evaluation(wh, "run-2b", {}).model_copy(update={"variants": other_path})).model_path \
        == "/models/run-2b/merged"
    rows = query(wh, "SELECT run_id, decision FROM promotion_history ORDER BY decided_at")
    assert rows == [("run-1", "promoted"), ("run-2", "rejected"), ("run-2b", "promoted")]
    assert query(wh, "SELECT run_id FROM current_model") == [("run-2b",)]

    # No base and first_run_baseline=none: the first candidate is promoted without checks.
    cfg_none = eval_config(tmp_path / "runs", promote={"first_run_baseline": "none", "candidate": "dpo"})
    wh2 = tmp_path / "other.duckdb"
    lone = run_promote(cfg_none, _evaluation(wh2, "solo", {"sft": (9.0, 0.1)}))
    assert lone.promoted and lone.variant == "sft" and lone.checks == [] and lone.baseline_kind is None


def test_rejected_flow_ends_in_named_state_with_outputs_kept(tmp_path):
    from prefect import flow

    from tasks.evaluation.promote import promote_task

    cfg = eval_config(tmp_path / "runs")
    wh = tmp_path / "warehouse.duckdb"
    evaluation = _evaluation(wh, "bad-run", {"base": (10.0, 0.3), "merged": (15.0, 0.1)})

    @flow
    def gate_flow():
        return promotion_state(promote_task(cfg, evaluation))

    state = gate_flow(return_state=True)
    assert state.is_failed() and state.name == "PromotionRejected"
    assert "rose from 10.0000 to 15.0000" in state.message and "fell from 0.3000 to 0.1000" in state.message
    arts = flow_run_artifacts(state.state_details.flow_run_id)
    assert "NOT PROMOTED" in arts["promotion-decision"].data
    assert query(wh, "SELECT decision, reasons FROM promotions WHERE run_id = 'bad-run'")[0][0] == "rejected"
    assert query(wh, "SELECT count(*) FROM eval_results WHERE run_id = 'bad-run'")[0][0] == 8  # outputs kept

    good = _evaluation(wh, "good-run", {"base": (10.0, 0.3), "merged": (9.0, 0.35)})

    @flow
    def gate_flow_ok():
        return promotion_state(promote_task(cfg, good))

    ok = gate_flow_ok(return_state=True)
    assert ok.is_completed() and ok.name == "Promoted"
