"""Promotion gate: is this run's candidate (the merged model) at least as good as what was promoted last?

Checks (promote.*), on the overall metrics of promote.split, against the last promoted run (or, before anything was
promoted, this run's base variant when promote.first_run_baseline=base):
- perplexity may rise by at most max_perplexity_rise (relative; 0.0: must not rise);
- ROUGE-L may fall by at most max_rouge_l_drop (absolute; ROUGE is measured on the test split);
- preference accuracy (test preference pairs) may fall by at most max_preference_accuracy_drop and must reach
  min_preference_accuracy; both only when the data has test preference pairs.

Rule (promote.rule). `interval` (default): each change is a paired bootstrap over the examples both models scored
(evals/stats.py, promote.confidence); a change is a regression only when its whole interval lies beyond the
tolerance, i.e. it is beyond the tolerance with that confidence; likewise the minimum fails only when the whole
interval of the candidate's accuracy lies below it. So noise on a few examples cannot reject a run, and a real
drop can. `point`: the point estimates alone decide (a change beyond the tolerance rejects), which is also what
happens when a baseline has no per-example scores. Each reason names the metric, its values, the delta with its
interval and n, and the threshold.

The decision is recorded in DuckDB (promotions; a promoted row carries the merged model's path, and the view
current_model names the model that serves now) and published as the Prefect artifact "promotion-decision". A
rejected run is recorded too, with its reasons, and keeps all its outputs. Rejection does not raise: the flow
decides how to end. `promotion_state(decision)` gives the flow's final state, named "Promoted" or
"PromotionRejected" (a Failed state); `raise_if_rejected` is the exception-style alternative.
"""

from __future__ import annotations

import json
import logging

from evals.report import promotion_markdown
from evals.stats import estimate, paired_delta
from tasks.core.artifacts import publish_artifacts
from tasks.core.caching import stage_task
from tasks.core.config import PipelineConfig
from tasks.core.results import EvalResult, PromotionResult
from tasks.core.warehouse import example_scores, last_promoted, open_warehouse, record_stage, utcnow

log = logging.getLogger("sftpipe.promote")

CANDIDATE_FALLBACK = ("merged", "dpo", "kto", "sft")
REL_TOLERANCE = 1e-9  # the same model scored twice must compare equal, not "risen" by rounding


class PromotionRejected(RuntimeError):
    """The promotion gate rejected the run; .decision holds the recorded decision (checks and reasons)."""

    def __init__(self, decision: PromotionResult):
        super().__init__("not promoted: " + "; ".join(decision.reasons))
        self.decision = decision


def candidate_variant(cfg: PipelineConfig, variants) -> str:
    names = list(variants)
    for name in (cfg.promote.candidate, *CANDIDATE_FALLBACK):
        if name in names:
            return name
    raise ValueError(f"no candidate to promote among the evaluated variants {names}")


def _check(label: str, metric: str, split: str, kind: str, tolerance: float, cand: float | None,
           base: float | None, cfg: PipelineConfig, cand_scores: list[dict], base_scores: list[dict]) -> dict:
    """One comparison with the baseline. kind "rise": relative rise (perplexity); "drop": absolute fall."""
    p = cfg.promote
    check = {"check": label, "metric": metric, "split": split, "candidate": cand, "baseline": base, "limit": None,
             "tolerance": tolerance, "delta": None, "delta_low": None, "delta_high": None, "n": None,
             "rule": p.rule, "passed": False}
    if cand is None or base is None:
        check["reason"] = f"{label} missing for the {'candidate' if cand is None else 'baseline'}"
        return check
    est = paired_delta(cand_scores, base_scores, split, metric, p.confidence) if p.rule == "interval" else None
    has_interval = est is not None and est.low is not None
    if p.rule == "interval" and not has_interval:
        check["rule"] = "point (no per-example scores to pair)"
    if kind == "rise":
        limit, delta = base * (1 + tolerance), (cand / base - 1 if base else float("inf"))
        beyond = (est.low > tolerance + REL_TOLERANCE) if has_interval else cand > limit * (1 + REL_TOLERANCE)
        why = f"{label} rose from {base:.4f} to {cand:.4f} (limit {limit:.4f})"
        shown = (lambda x: f"{100 * x:+.1f}%")
        allowed = f"a rise of {100 * tolerance:.1f}%"
    else:
        limit, delta = base - tolerance, cand - base
        beyond = (est.high < -tolerance - REL_TOLERANCE) if has_interval else cand < limit - REL_TOLERANCE
        why = f"{label} fell from {base:.4f} to {cand:.4f} (limit {limit:.4f})"
        shown = (lambda x: f"{x:+.4f}")
        allowed = f"a drop of {tolerance:.4f}"
    check.update(limit=limit, delta=delta, passed=not beyond)
    if has_interval:
        check.update(delta=est.value, delta_low=est.low, delta_high=est.high, n=est.n)
        why += (f": change {shown(est.value)}, {100 * p.confidence:g}% interval [{shown(est.low)}, "
                f"{shown(est.high)}] over n={est.n} paired examples, entirely beyond the allowed {allowed}")
    if beyond:
        check["reason"] = why
    return check


def _minimum_check(label: str, metric: str, split: str, minimum: float, cand: float | None, cfg: PipelineConfig,
                   cand_scores: list[dict]) -> dict:
    p = cfg.promote
    mine = [s for s in cand_scores if (s["split"], s["metric"]) == (split, metric)]
    est = estimate(metric, [s["value"] for s in mine], None, p.confidence) if p.rule == "interval" and mine else None
    has_interval = est is not None and est.high is not None
    check = {"check": f"{label} minimum", "metric": metric, "split": split, "candidate": cand, "baseline": None,
             "limit": minimum, "tolerance": None, "delta": None, "delta_low": est.low if has_interval else None,
             "delta_high": est.high if has_interval else None, "n": est.n if est else None,
             "rule": p.rule if has_interval or p.rule == "point" else "point (no per-example scores)",
             "passed": False}
    if cand is None:
        check["reason"] = f"{label} missing for the candidate"
        return check
    below = est.high < minimum - REL_TOLERANCE if has_interval else cand < minimum - REL_TOLERANCE
    check["passed"] = not below
    if below:
        check["reason"] = f"{label} is {cand:.4f}, below the minimum {minimum:.4f}" + (
            f" (whole {100 * p.confidence:g}% interval [{est.low:.4f}, {est.high:.4f}] over n={est.n} pairs below it)"
            if has_interval else "")
    return check


def gate(candidate: dict[tuple[str, str], float], baseline: dict[tuple[str, str], float], cfg: PipelineConfig,
         candidate_scores: list[dict] | None = None,
         baseline_scores: list[dict] | None = None) -> tuple[list[dict], list[str]]:
    """(checks, reasons): every check with its numbers; reasons lists the failed ones in words.

    candidate / baseline: overall metric values by (split, metric); *_scores: their per-example scores, which the
    interval rule pairs (without them a check falls back to the point rule)."""
    p = cfg.promote
    cs, bs = candidate_scores or [], baseline_scores or []
    specs = [("perplexity", p.split, f"perplexity ({p.split})", "rise", p.max_perplexity_rise),
             ("rougeL", "test", "ROUGE-L (test)", "drop", p.max_rouge_l_drop)]
    pref_key = ("test", "preference_accuracy")
    has_pairs = pref_key in candidate or pref_key in baseline
    if has_pairs:
        specs.append(("preference_accuracy", "test", "preference accuracy (test)", "drop",
                      p.max_preference_accuracy_drop))
    checks = [_check(label, metric, split, kind, tol, candidate.get((split, metric)), baseline.get((split, metric)),
                     cfg, cs, bs) for metric, split, label, kind, tol in specs]
    if has_pairs and p.min_preference_accuracy is not None:
        checks.append(_minimum_check("preference accuracy (test)", "preference_accuracy", "test",
                                     p.min_preference_accuracy, candidate.get(pref_key), cfg, cs))
    reasons = [c.pop("reason") for c in checks if "reason" in c]
    return checks, reasons


def _overall(con, run_id: str, variant: str) -> dict[tuple[str, str], float]:
    rows = con.execute("SELECT split, metric, value FROM eval_results WHERE run_id = ? AND variant = ? AND "
                       "source = 'all'", [run_id, variant]).fetchall()
    return {(s, m): v for s, m, v in rows}


def run_promote(cfg: PipelineConfig, evaluation: EvalResult) -> PromotionResult:
    """Decide, record and report whether evaluation's run is promoted. Idempotent per run."""
    run_id, warehouse = evaluation.run_id, evaluation.warehouse
    variant = candidate_variant(cfg, evaluation.variants)
    info = evaluation.variants[variant]
    model_path = info.path or info.model
    started_at = utcnow()
    with open_warehouse(warehouse) as con:
        existing = con.execute("SELECT decision FROM promotions WHERE run_id = ?", [run_id]).fetchone()
        if existing is None:
            candidate = _overall(con, run_id, variant)
            previous = last_promoted(con, exclude_run=run_id)
            if previous:
                kind, base_run, base_variant = "last_promoted", previous.run_id, previous.variant
            elif cfg.promote.first_run_baseline == "base" and "base" in evaluation.variants:
                kind, base_run, base_variant = "base", run_id, "base"
            else:
                kind = base_run = base_variant = None
            checks, reasons = gate(candidate, _overall(con, base_run, base_variant), cfg,
                                   example_scores(con, run_id, variant),
                                   example_scores(con, base_run, base_variant)) if kind else ([], [])
            decision = "rejected" if reasons else "promoted"
            con.execute("BEGIN TRANSACTION")
            con.execute("INSERT INTO promotions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        [run_id, variant, decision, model_path, kind, base_run, base_variant, json.dumps(checks),
                         reasons, utcnow()])
            record_stage(con, run_id, "promote", started_at, {"decision": decision, "reasons": reasons})
            con.execute("COMMIT")
        columns = ["variant", "decision", "model_path", "baseline_kind", "baseline_run_id", "baseline_variant",
                   "checks", "reasons"]
        row = dict(zip(columns, con.execute(f"SELECT {', '.join(columns)} FROM promotions WHERE run_id = ?",
                                            [run_id]).fetchone()))
    result = PromotionResult(stage="promote", fingerprint=f"{run_id}:{row['decision']}", run_id=run_id,
                             promoted=row["decision"] == "promoted", warehouse=warehouse,
                             **{**row, "checks": json.loads(row["checks"]), "reasons": list(row["reasons"])})
    markdown = promotion_markdown(result.model_dump())
    result = result.model_copy(update={"artifacts": publish_artifacts(
        markdown={"promotion-decision": (markdown, f"Promotion of run {run_id}")})})
    log.info("run %s: %s%s", run_id, result.decision, f" ({'; '.join(result.reasons)})" if result.reasons else "")
    return result


def raise_if_rejected(decision: PromotionResult) -> PromotionResult:
    if not decision.promoted:
        raise PromotionRejected(decision)
    return decision


def promotion_state(decision: PromotionResult):
    """The flow's final Prefect state: Completed named "Promoted", or Failed named "PromotionRejected" whose
    message gives the reasons. Return it from the flow after every other stage ran, so nothing is lost."""
    from prefect.states import Completed, Failed

    if decision.promoted:
        return Completed(name="Promoted", message=f"run {decision.run_id} promoted: {decision.model_path}",
                         data=decision)
    return Failed(name="PromotionRejected", message="not promoted: " + "; ".join(decision.reasons), data=decision)


def _promote_config(cfg: PipelineConfig) -> dict:
    return {"promote": cfg.promote.model_dump()}


promote_task = stage_task("promote", _promote_config)(run_promote)
