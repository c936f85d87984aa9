"""Promotion gate: is this run's candidate (the merged model) at least as good as what was promoted last?

Checks (promote.*), on the overall metrics of promote.split, against the last promoted run (or, before anything was
promoted, this run's base variant when promote.first_run_baseline=base):
- perplexity may rise by at most max_perplexity_rise (relative; 0.0: must not rise);
- ROUGE-L may fall by at most max_rouge_l_drop (absolute; ROUGE is measured on the test split).

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
from tasks.core.artifacts import publish_artifacts
from tasks.core.caching import stage_task
from tasks.core.config import PipelineConfig
from tasks.core.warehouse import last_promoted, open_warehouse, record_stage, utcnow

log = logging.getLogger("sftpipe.promote")

CANDIDATE_FALLBACK = ("merged", "dpo", "sft")
REL_TOLERANCE = 1e-9  # the same model scored twice must compare equal, not "risen" by rounding


class PromotionRejected(RuntimeError):
    """The promotion gate rejected the run; .decision holds the recorded decision (checks and reasons)."""

    def __init__(self, decision: dict):
        super().__init__("not promoted: " + "; ".join(decision["reasons"]))
        self.decision = decision


def candidate_variant(cfg: PipelineConfig, variants) -> str:
    names = list(variants)
    for name in (cfg.promote.candidate, *CANDIDATE_FALLBACK):
        if name in names:
            return name
    raise ValueError(f"no candidate to promote among the evaluated variants {names}")


def gate(candidate: dict[tuple[str, str], float], baseline: dict[tuple[str, str], float],
         cfg: PipelineConfig) -> tuple[list[dict], list[str]]:
    """(checks, reasons): every check with its numbers; reasons lists the failed ones in words."""
    p = cfg.promote
    checks, reasons = [], []
    ppl_key = (p.split, "perplexity")
    rouge_key = ("test", "rougeL")
    for key, label in ((ppl_key, f"perplexity ({p.split})"), (rouge_key, "ROUGE-L (test)")):
        cand, base = candidate.get(key), baseline.get(key)
        if cand is None or base is None:
            checks.append({"check": label, "candidate": cand, "baseline": base, "limit": None, "passed": False})
            reasons.append(f"{label} missing for the {'candidate' if cand is None else 'baseline'}")
            continue
        if key == ppl_key:
            limit = base * (1 + p.max_perplexity_rise)
            passed = cand <= limit * (1 + REL_TOLERANCE)
            why = f"{label} rose from {base:.4f} to {cand:.4f} (limit {limit:.4f})"
        else:
            limit = base - p.max_rouge_l_drop
            passed = cand >= limit - REL_TOLERANCE
            why = f"{label} fell from {base:.4f} to {cand:.4f} (limit {limit:.4f})"
        checks.append({"check": label, "candidate": cand, "baseline": base, "limit": limit, "passed": passed})
        if not passed:
            reasons.append(why)
    return checks, reasons


def _overall(con, run_id: str, variant: str) -> dict[tuple[str, str], float]:
    rows = con.execute("SELECT split, metric, value FROM eval_results WHERE run_id = ? AND variant = ? AND "
                       "source = 'all'", [run_id, variant]).fetchall()
    return {(s, m): v for s, m, v in rows}


def run_promote(cfg: PipelineConfig, evaluation: dict) -> dict:
    """Decide, record and report whether evaluation's run is promoted. Idempotent per run."""
    run_id, warehouse = evaluation["run_id"], evaluation["warehouse"]
    variant = candidate_variant(cfg, evaluation["variants"])
    info = evaluation["variants"][variant]
    model_path = info.get("model_dir") or info.get("model")
    started_at = utcnow()
    with open_warehouse(warehouse) as con:
        existing = con.execute("SELECT decision FROM promotions WHERE run_id = ?", [run_id]).fetchone()
        if existing is None:
            candidate = _overall(con, run_id, variant)
            previous = last_promoted(con, exclude_run=run_id)
            if previous:
                kind, base_run, base_variant = "last_promoted", previous["run_id"], previous["variant"]
            elif cfg.promote.first_run_baseline == "base" and "base" in evaluation["variants"]:
                kind, base_run, base_variant = "base", run_id, "base"
            else:
                kind = base_run = base_variant = None
            checks, reasons = gate(candidate, _overall(con, base_run, base_variant), cfg) if kind else ([], [])
            decision = "rejected" if reasons else "promoted"
            con.execute("BEGIN TRANSACTION")
            con.execute("INSERT INTO promotions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        [run_id, variant, decision, model_path, kind, base_run, base_variant, json.dumps(checks),
                         reasons, utcnow()])
            record_stage(con, run_id, "promote", started_at, {"decision": decision, "reasons": reasons})
            con.execute("COMMIT")
        row = con.execute("SELECT variant, decision, model_path, baseline_kind, baseline_run_id, baseline_variant, "
                          "checks, reasons FROM promotions WHERE run_id = ?", [run_id]).fetchone()
    result = {"stage": "promote", "fingerprint": f"{run_id}:{row[1]}", "run_id": run_id, "variant": row[0],
              "decision": row[1], "promoted": row[1] == "promoted", "model_path": row[2], "baseline_kind": row[3],
              "baseline_run_id": row[4], "baseline_variant": row[5], "checks": json.loads(row[6]),
              "reasons": list(row[7]), "warehouse": warehouse}
    markdown = promotion_markdown(result)
    result["artifacts"] = publish_artifacts(markdown={"promotion-decision": (markdown, f"Promotion of run {run_id}")})
    log.info("run %s: %s%s", run_id, result["decision"], f" ({'; '.join(result['reasons'])})" if result["reasons"]
             else "")
    return result


def raise_if_rejected(decision: dict) -> dict:
    if not decision["promoted"]:
        raise PromotionRejected(decision)
    return decision


def promotion_state(decision: dict):
    """The flow's final Prefect state: Completed named "Promoted", or Failed named "PromotionRejected" whose
    message gives the reasons. Return it from the flow after every other stage ran, so nothing is lost."""
    from prefect.states import Completed, Failed

    if decision["promoted"]:
        return Completed(name="Promoted", message=f"run {decision['run_id']} promoted: {decision['model_path']}",
                         data=decision)
    return Failed(name="PromotionRejected", message="not promoted: " + "; ".join(decision["reasons"]), data=decision)


def _promote_config(cfg: PipelineConfig) -> dict:
    return {"promote": cfg.promote.model_dump()}


promote_task = stage_task("promote", _promote_config)(run_promote)
