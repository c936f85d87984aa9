"""Evaluation stage: perplexity and ROUGE of every model variant of a run, on the same examples, to DuckDB + report.

- Perplexity on the validation and test splits, token-weighted over the tokens training has loss on (assistant
  tokens by default), per source dataset and overall (evals/metrics/perplexity, a local `evaluate` module).
- ROUGE-1/2/L/Lsum of greedy answers to the test prompts against the reference answers, per source and overall
  (evals/metrics/rouge: scores Chinese per character).
- Preference accuracy on the test split of preference_pairs: the share of pairs where the variant gives the chosen
  answer a higher mean log-probability per answer token (length-normalised, so a longer answer is not penalised for
  its length) than the rejected one, and the mean margin between the two.
- Every figure carries a bootstrap confidence interval over examples (evals/stats.py, scipy, seeded); the
  per-example scores are kept (eval_example_scores), so deltas against the base and the last promoted run are paired.
- Every variant sees the same examples (round-robin over sources, capped by eval.max_examples) and the same
  generation settings (greedy, seeded, batched, eval.max_new_tokens).
- Rows go to eval_results / eval_example_scores / eval_generations / eval_runs in one short write; the markdown report (variants x
  metrics, deltas against the base and the last promoted run) is written under <storage_root>/reports and published
  as the Prefect artifact "eval-report", the sample answers as the table artifact "eval-samples" and as
  reports/eval-<run>-samples.jsonl.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from evals.metrics import evals_code_hash, load_metric
from evals.report import eval_report_markdown, ordered_variants, sample_table
from evals.stats import summarize
from tasks.core import storage
from tasks.core.artifacts import publish_artifacts
from tasks.core.caching import source_hash, stage_task
from tasks.core.config import PipelineConfig
from tasks.core.results import DataResult, EvalResult, ModelFiles, ModelResult, VariantRecord
from tasks.core.warehouse import (
    last_promoted,
    open_warehouse,
    preference_pairs,
    record_stage,
    sft_examples,
    table_fingerprint,
    utcnow,
)
from tasks.evaluation.generation import (
    encode_for_loss,
    encode_prompt,
    free,
    greedy_generate,
    load_variant,
    new_run_id,
    select_examples,
    split_conversation,
)

log = logging.getLogger("sftpipe.eval")

SPLITS = ("validation", "test")
ROUGE_TYPES = ["rouge1", "rouge2", "rougeL", "rougeLsum"]


def perplexity_scope(cfg: PipelineConfig) -> str:
    if cfg.eval.perplexity_tokens != "auto":
        return cfg.eval.perplexity_tokens
    return "assistant" if getattr(cfg.sft, "assistant_only_loss", True) else "all"


# ---------------------------------------------------------------------------------------------- one variant
def score_perplexity(model, tokenizer, examples: list[dict], cfg: PipelineConfig) -> list[tuple[float, int]]:
    """(summed NLL, scored tokens) of each example."""
    encoded = [encode_for_loss(tokenizer, ex["messages"], cfg.model.max_length, perplexity_scope(cfg), ex.get("tools"))
               for ex in examples]
    out = load_metric("perplexity").compute(input_ids=[e["input_ids"] for e in encoded],
                                            labels=[e["labels"] for e in encoded], model=model,
                                            batch_size=cfg.eval.batch_size)
    return list(zip(out["nll_sums"], out["token_counts"]))


def score_preferences(model, tokenizer, pairs: list[dict], cfg: PipelineConfig) -> list[float]:
    """Per pair: mean log-probability per answer token of the chosen answer minus that of the rejected one.

    Answer tokens are the assistant turn as the chat template marks it (the answer and its end-of-turn marker), after
    the pair's prompt; the mean per token keeps a longer answer from losing only for its length."""
    encoded = [encode_for_loss(tokenizer, [*p["prompt"], {"role": "assistant", "content": p[side]}],
                               cfg.model.max_length, "assistant") for p in pairs for side in ("chosen", "rejected")]
    out = load_metric("perplexity").compute(input_ids=[e["input_ids"] for e in encoded],
                                            labels=[e["labels"] for e in encoded], model=model,
                                            batch_size=cfg.eval.batch_size)
    mean_logp = [-nll / n if n else float("-inf") for nll, n in zip(out["nll_sums"], out["token_counts"])]
    return [mean_logp[2 * i] - mean_logp[2 * i + 1] for i in range(len(pairs))]


def generate_answers(model, tokenizer, examples: list[dict], cfg: PipelineConfig) -> list[dict]:
    """Greedy answers to the prompts of `examples` (conversation up to its last assistant turn)."""
    items = []
    for ex in examples:
        split = split_conversation(ex["messages"])
        if split:
            items.append((ex, *split))
    max_prompt = max(cfg.model.max_length - cfg.eval.max_new_tokens, 8)
    prompts = [encode_prompt(tokenizer, prompt, max_prompt, ex.get("tools")) for ex, prompt, _ in items]
    gens = greedy_generate(model, tokenizer, prompts, cfg.eval.max_new_tokens, cfg.eval.batch_size,
                           cfg.eval.stop_strings, cfg.eval.seed)
    return [{"example_id": ex["example_id"], "source": ex["source"],
             "prompt": tokenizer.decode(g.prompt_ids, skip_special_tokens=False), "reference": reference,
             "prediction": g.text, "prompt_tokens": len(g.prompt_ids), "new_tokens": len(g.output_ids)}
            for (ex, _, reference), g in zip(items, gens)]


def score_rouge(generations: list[dict]) -> dict[str, list[float]]:
    """{rouge type: F-measure of each generation}."""
    if not generations:
        return {}
    return load_metric("rouge").compute(predictions=[g["prediction"] for g in generations],
                                        references=[g["reference"] for g in generations],
                                        rouge_types=ROUGE_TYPES, use_aggregator=False)


def _score(variant: str, split: str, item: dict, metric: str, value: float, weight: float = 1.0) -> dict:
    return dict(variant=variant, split=split, example_id=item["example_id"], source=item["source"], metric=metric,
                value=float(value), weight=float(weight))


def score_variant(name: str, model, tokenizer, chosen: dict[str, list[dict]], pairs: list[dict],
                  cfg: PipelineConfig) -> tuple[list[dict], list[dict]]:
    """(per-example scores, generations) of one loaded variant."""
    scores: list[dict] = []
    for split in SPLITS:
        if chosen[split]:
            scores += [_score(name, split, ex, "perplexity", nll, n)
                       for ex, (nll, n) in zip(chosen[split], score_perplexity(model, tokenizer, chosen[split], cfg))
                       if n]
    to_generate = chosen["test"][: cfg.eval.max_generate_examples]
    gens = [dict(g, variant=name, split="test") for g in generate_answers(model, tokenizer, to_generate, cfg)]
    for metric, values in score_rouge(gens).items():
        scores += [_score(name, "test", g, metric, v) for g, v in zip(gens, values)]
    if pairs:
        margins = score_preferences(model, tokenizer, pairs, cfg)
        scores += [_score(name, "test", p, "preference_accuracy", m > 0) for p, m in zip(pairs, margins)]
        scores += [_score(name, "test", p, "preference_margin", m) for p, m in zip(pairs, margins)]
    return scores, gens


def evaluate_variants(cfg: PipelineConfig, examples: dict[str, list[dict]], variants: dict[str, ModelFiles],
                      pairs: list[dict] | None = None) -> tuple[list[dict], list[dict], list[dict]]:
    """Score every variant on the same examples. examples: {"validation": [...], "test": [...]} as returned by
    tasks.core.warehouse.sft_examples; pairs: test preference pairs (tasks.core.warehouse.preference_pairs).
    Returns (eval_results rows without run_id, per-example scores, generations)."""
    chosen = {split: select_examples(examples.get(split, []), cfg.eval.max_examples) for split in SPLITS}
    pairs = select_examples(pairs or [], cfg.eval.max_preference_pairs)
    scores: list[dict] = []
    generations: list[dict] = []
    for name in ordered_variants(variants):
        started = time.time()
        model, tokenizer = load_variant(variants[name], cfg, cfg.eval.dtype)
        mine, gens = score_variant(name, model, tokenizer, chosen, pairs, cfg)
        scores += mine
        generations += gens
        free(model)
        log.info("evaluated %s in %.1f s", name, time.time() - started)
    rows = summarize(scores, cfg.eval.confidence, cfg.eval.bootstrap_resamples, cfg.eval.seed)
    return rows, scores, generations


# ------------------------------------------------------------------------------------------------- warehouse
def _variant_record(result: ModelResult) -> VariantRecord:
    """The paths and fingerprint of a variant (what the promotion pointer and the report need)."""
    pair = result.adapter_pair()
    return VariantRecord(fingerprint=result.fingerprint, model=result.describe(), path=result.path,
                         adapter=pair[0] if pair else None, base=pair[1] if pair else None)


def _write_rows(con, run_id: str, rows: list[dict], scores: list[dict], generations: list[dict]) -> None:
    """Replace the run's eval_results, eval_example_scores and eval_generations rows and clear its eval_runs row
    (inside the caller's transaction)."""
    for table in ("eval_results", "eval_example_scores", "eval_generations", "eval_runs"):
        con.execute(f"DELETE FROM {table} WHERE run_id = ?", [run_id])
    con.executemany("INSERT INTO eval_results (run_id, variant, split, source, metric, value, n, examples, "
                    "ci_low, ci_high) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [[run_id, r["variant"], r["split"], r["source"], r["metric"], r["value"], r["n"],
                      r["examples"], r["ci_low"], r["ci_high"]] for r in rows])
    con.executemany("INSERT INTO eval_example_scores VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    [[run_id, s["variant"], s["split"], s["example_id"], s["source"], s["metric"], s["value"],
                      s["weight"]] for s in scores])
    con.executemany("INSERT INTO eval_generations VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [[run_id, g["variant"], g["split"], g["example_id"], g["source"], g["prompt"],
                      g["reference"], g["prediction"], g["prompt_tokens"], g["new_tokens"]] for g in generations])


def _settings(cfg: PipelineConfig, excluded: dict[str, int]) -> dict:
    """What every variant was evaluated with, as the report and eval_runs show it."""
    return {"examples per split": cfg.eval.max_examples, "generated": cfg.eval.max_generate_examples,
            "preference pairs": cfg.eval.max_preference_pairs, "max_new_tokens": cfg.eval.max_new_tokens,
            "decoding": "greedy", "seed": cfg.eval.seed, "perplexity tokens": perplexity_scope(cfg),
            "dtype": cfg.eval.dtype, "confidence": cfg.eval.confidence,
            "bootstrap resamples": cfg.eval.bootstrap_resamples,
            # sft_examples leaves out held-out rows the split stage found overlapping training.
            "rows excluded for overlapping training (validation/test)":
                f"{excluded.get('validation', 0)}/{excluded.get('test', 0)}"}


# ------------------------------------------------------------------------------------------------- the stage
def run_eval(cfg: PipelineConfig, data: DataResult, variants: dict[str, ModelResult | None]) -> EvalResult:
    """Evaluate every variant ("base", "sft", "dpo" or "kto", "merged": stage results holding a model folder or an adapter
    on a base) on data's validation/test splits; record and report. Returns the stage result."""
    started_at, started = utcnow(), time.time()
    run_id = new_run_id()
    variants = {k: v for k, v in variants.items() if v}
    if not variants:
        raise ValueError("run_eval needs at least one model variant")
    with open_warehouse(data.warehouse, read_only=True) as con:
        examples = {split: sft_examples(con, split) for split in SPLITS}
        excluded = dict(con.execute("SELECT split, rows FROM eval_exclusions WHERE kind = 'sft'").fetchall())
        pairs = preference_pairs(con, "test")
    if not examples["test"]:
        raise ValueError(f"the test split of {data.warehouse} is empty: nothing to evaluate")

    rows, scores, generations = evaluate_variants(cfg, examples, variants, pairs)
    settings = _settings(cfg, excluded)
    report_path = cfg.url("reports", f"eval-{run_id}.md")
    variant_records = {k: _variant_record(v) for k, v in variants.items()}

    # One short write: DuckDB allows a single writing process.
    with open_warehouse(data.warehouse) as con:
        previous = last_promoted(con, exclude_run=run_id)
        report = eval_report_markdown(run_id, rows, settings, previous.model_dump() if previous else None, scores)
        con.execute("BEGIN TRANSACTION")
        _write_rows(con, run_id, rows, scores, generations)
        con.execute("INSERT INTO eval_runs VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [run_id, data.fingerprint,
                     json.dumps({k: v.model_dump(exclude_none=True) for k, v in variant_records.items()}),
                     json.dumps(settings), str(report_path), started_at, utcnow()])
        fingerprint = table_fingerprint(con, f"SELECT * FROM eval_results WHERE run_id = '{run_id}'")
        stats = {"variants": list(ordered_variants(variants)), "rows": len(rows), "generations": len(generations),
                 "preference_pairs": len({s["example_id"] for s in scores if s["metric"] == "preference_accuracy"}),
                 "wall_s": round(time.time() - started, 2)}
        record_stage(con, run_id, "evaluate", started_at, stats)
        con.execute("COMMIT")

    storage.write_text(report_path, report)
    # The merged model answers exactly as dpo (the merge stage checks it): one column for both.
    samples = sample_table(generations, cfg.eval.sample_rows,
                           [v for v in variants if not (v == "merged" and "dpo" in variants)])
    samples_path = cfg.url("reports", f"eval-{run_id}-samples.jsonl") if samples else None
    if samples_path:  # the same table as a file beside the report, for trackers and for reading it later
        storage.write_text(samples_path, "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n"
                                                 for r in samples))
    artifacts = publish_artifacts(
        markdown={"eval-report": (report, f"Evaluation of run {run_id}: variants x metrics")},
        tables={"eval-samples": (samples, f"Greedy answers of each variant, run {run_id}")} if samples else {},
    )
    metrics = {v: {f"{r['metric']}/{r['split']}": r["value"] for r in rows if r["variant"] == v and
                   r["source"] == "all"} for v in ordered_variants(variants)}
    log.info("eval run %s: %s", run_id, json.dumps(metrics))
    return EvalResult(stage="evaluate", fingerprint=fingerprint, run_id=run_id, warehouse=data.warehouse,
                      report_path=str(report_path), samples_path=samples_path, variants=variant_records,
                      metrics=metrics, artifacts=artifacts, stats=stats)


def _eval_config(cfg: PipelineConfig) -> dict[str, Any]:
    return {"eval": cfg.eval.model_dump(), "model": cfg.model.model_dump(), "scope": perplexity_scope(cfg),
            "storage_root": cfg.storage_root, "code": [evals_code_hash(), source_hash(encode_for_loss)]}


@stage_task("evaluate", _eval_config)
def evaluate_task(cfg: PipelineConfig, data: DataResult, base: ModelResult | None = None,
                  sft: ModelResult | None = None, preference: ModelResult | None = None,
                  merged: ModelResult | None = None) -> EvalResult:
    """Prefect task: variants as separate arguments so each one's fingerprint enters the cache key. `preference`
    (the DPO or KTO result) is evaluated under its stage's name."""
    tuned = {preference.stage: preference} if preference else {}
    return run_eval(cfg, data, {"base": base, "sft": sft, **tuned, "merged": merged})
