"""Markdown for the eval report and the promotion decision, and the rows of the sample-generations table.

Input rows are eval_results rows: {variant, split, source, metric, value, n, examples, ci_low, ci_high}; source
"all" is the token- (perplexity) or example-weighted aggregate over sources. Scores are eval_example_scores rows
({variant, split, example_id, source, metric, value, weight}), from which deltas are computed with a paired
bootstrap (evals/stats.py).
"""

from __future__ import annotations

from evals.stats import RATIO_METRICS, paired_delta

VARIANT_ORDER = ["base", "sft", "dpo", "kto", "merged"]
# (split, metric) columns of the overview tables; lower is better only for perplexity.
COLUMNS = [("validation", "perplexity"), ("test", "perplexity"), ("test", "rouge1"), ("test", "rougeL"),
           ("test", "preference_accuracy"), ("test", "preference_margin")]
LOWER_IS_BETTER = {"perplexity"}


def ordered_variants(names) -> list[str]:
    names = list(dict.fromkeys(names))
    return [v for v in VARIANT_ORDER if v in names] + sorted(v for v in names if v not in VARIANT_ORDER)


def overall(rows: list[dict], variant: str) -> dict[tuple[str, str], float]:
    return {(r["split"], r["metric"]): r["value"] for r in rows if r["variant"] == variant and r["source"] == "all"}


def _overall_rows(rows: list[dict], variant: str) -> dict[tuple[str, str], dict]:
    return {(r["split"], r["metric"]): r for r in rows if r["variant"] == variant and r["source"] == "all"}


def _fmt(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:.2f}" if abs(value) >= 100 else f"{value:.4f}"


def _short(value: float) -> str:
    return f"{value:.1f}" if abs(value) >= 100 else f"{value:.2f}" if abs(value) >= 10 else f"{value:.3f}"


def _fmt_ci(row: dict | None) -> str:
    """value [low, high] of an eval_results row."""
    if row is None or row.get("value") is None:
        return "–"
    if row.get("ci_low") is None or row.get("ci_high") is None:
        return _fmt(row["value"])
    return f"{_fmt(row['value'])} [{_short(row['ci_low'])}, {_short(row['ci_high'])}]"


def _fmt_delta(est, metric: str, with_n: bool = False) -> str:
    if est is None or est.value is None:
        return "–"
    if metric in RATIO_METRICS:  # relative change
        text = f"{100 * est.value:+.1f}%"
        if est.low is not None:
            text += f" [{100 * est.low:+.1f}, {100 * est.high:+.1f}]"
    else:
        text = f"{est.value:+.4f}"
        if est.low is not None:
            text += f" [{est.low:+.3f}, {est.high:+.3f}]"
    return text + (f" n={est.n}" if with_n else "")


def _header(cols, examples: dict | None = None) -> list[str]:
    def name(s, m):
        n = (examples or {}).get((s, m))
        return f"{m} ({s}{f', n={n}' if n is not None else ''})"

    return ["| variant | " + " | ".join(name(s, m) for s, m in cols) + " |", "|---" * (len(cols) + 1) + "|"]


def _variant_scores(scores: list[dict], variant: str) -> list[dict]:
    return [s for s in scores if s["variant"] == variant]


def eval_report_markdown(run_id: str, rows: list[dict], settings: dict, previous: dict | None,
                         scores: list[dict] | None = None) -> str:
    """The report: variants x metrics with confidence intervals, paired deltas against the base and against the
    last promoted run, per source.

    previous: {"run_id", "variant", "rows", "scores"} of the last promoted run, or None. scores: this run's
    per-example scores (without them, deltas are not shown).
    """
    scores = scores or []
    confidence = settings.get("confidence", 0.95)
    resamples = settings.get("bootstrap resamples", 2000)
    seed = settings.get("seed", 0)
    variants = ordered_variants(r["variant"] for r in rows)
    cols = [c for c in COLUMNS if any((r["split"], r["metric"]) == c for r in rows)]
    examples = {(r["split"], r["metric"]): r.get("examples") for r in rows if r["source"] == "all"}
    level = f"{100 * confidence:g} %"
    lines = [f"# Evaluation report: run `{run_id}`", ""]
    lines += [", ".join(f"{k}: {v}" for k, v in settings.items()), ""]
    lines += ["Perplexity is token-weighted over the scored tokens; ROUGE is the mean F-measure of greedy answers "
              "to the test prompts; preference accuracy is the share of test preference pairs where the variant "
              "gives the chosen answer a higher mean log-probability per answer token than the rejected one, "
              "preference margin the mean of that difference. Lower perplexity and higher ROUGE and preference "
              f"accuracy are better. [low, high]: {level} bootstrap interval over examples; n: examples (pairs for "
              "preference). Deltas use a paired bootstrap on the same examples; perplexity deltas are relative.", ""]
    lines += ["## Variants", ""] + _header(cols, examples)
    for v in variants:
        o = _overall_rows(rows, v)
        lines.append(f"| {v} | " + " | ".join(_fmt_ci(o.get(c)) for c in cols) + " |")
    if previous:
        prev = _overall_rows(previous["rows"], previous["variant"])
        lines.append(f"| last promoted: {previous['variant']} of `{previous['run_id']}` | "
                     + " | ".join(_fmt_ci(prev.get(c)) for c in cols) + " |")

    def deltas(mine: list[dict], reference: list[dict], with_n: bool) -> str:
        return " | ".join(_fmt_delta(paired_delta(mine, reference, split, metric, confidence, resamples, seed)
                                     if mine and reference else None, metric, with_n) for split, metric in cols)

    if "base" in variants and scores:
        base = _variant_scores(scores, "base")
        lines += ["", "## Δ against the base (paired)", ""] + _header(cols, examples)
        for v in variants:
            if v != "base":
                lines.append(f"| {v} | {deltas(_variant_scores(scores, v), base, False)} |")
    lines += ["", "## Δ against the last promoted run (paired, on the examples both runs scored)", ""]
    if previous:
        lines += [f"Baseline: variant `{previous['variant']}` of run `{previous['run_id']}`.", ""] + _header(cols)
        for v in variants:
            lines.append(f"| {v} | {deltas(_variant_scores(scores, v), previous.get('scores') or [], True)} |")
    else:
        lines.append("No run has been promoted yet.")
    lines += ["", "## Per source", "", "| split | source | metric | n | " + " | ".join(variants) + " |",
              "|---" * (4 + len(variants)) + "|"]
    keys = sorted({(r["split"], r["source"], r["metric"]) for r in rows if r["source"] != "all"})
    for split, source, metric in keys:
        vals = {r["variant"]: r for r in rows if (r["split"], r["source"], r["metric"]) == (split, source, metric)}
        first = next(iter(vals.values()))
        n = f"{first.get('examples')} ({first['n']} tokens)" if metric in RATIO_METRICS else first["n"]
        lines.append(f"| {split} | {source} | {metric} | {n} | "
                     + " | ".join(_fmt_ci(vals.get(v)) for v in variants) + " |")
    return "\n".join(lines) + "\n"


def _clip(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def sample_table(generations: list[dict], limit: int, variants=None) -> list[dict]:
    """Rows for the sample-generations table: for the same prompt, the reference and each variant's answer side by
    side (columns in variant order; `variants` limits them).

    generations: [{variant, example_id, source, prompt, reference, prediction}].
    """
    shown = [v for v in ordered_variants(g["variant"] for g in generations) if variants is None or v in variants]
    by_example: dict[str, dict] = {}
    for g in generations:
        row = by_example.setdefault(g["example_id"], {"example_id": g["example_id"], "source": g["source"],
                                                      "prompt": _clip(g["prompt"]),
                                                      "reference": _clip(g["reference"]),
                                                      **{v: "" for v in shown}})
        if g["variant"] in shown:
            row[g["variant"]] = _clip(g["prediction"])
    return list(by_example.values())[:limit]


def _check_change(c: dict) -> str:
    """A gate check's change against the baseline (or, for a minimum, the candidate's interval)."""
    low, high = c.get("delta_low"), c.get("delta_high")
    if c.get("metric") in RATIO_METRICS and c.get("delta") is not None:
        text = f"{100 * c['delta']:+.1f}%"
        return text + (f" [{100 * low:+.1f}, {100 * high:+.1f}]" if low is not None else "")
    if c.get("delta") is not None:
        return f"{c['delta']:+.4f}" + (f" [{low:+.3f}, {high:+.3f}]" if low is not None else "")
    return f"[{low:.3f}, {high:.3f}]" if low is not None else "–"


def promotion_markdown(decision: dict) -> str:
    verdict = "PROMOTED" if decision["decision"] == "promoted" else "NOT PROMOTED"
    lines = [f"# Promotion: {verdict}", "",
             f"Run `{decision['run_id']}`, candidate variant `{decision['variant']}`"
             + (f", model `{decision['model_path']}`" if decision.get("model_path") else ""), ""]
    if decision.get("baseline_run_id"):
        lines.append(f"Baseline: {decision['baseline_kind']} (`{decision['baseline_variant']}` of run "
                     f"`{decision['baseline_run_id']}`).")
    else:
        lines.append("Baseline: none (first promotion).")
    if decision["checks"]:
        lines += ["", "| check | candidate | baseline | change [interval] | n | limit | rule | passed |",
                  "|---|---|---|---|---|---|---|---|"]
        for c in decision["checks"]:
            lines.append(f"| {c['check']} | {_fmt(c['candidate'])} | {_fmt(c['baseline'])} | {_check_change(c)} | "
                         f"{c.get('n') or '–'} | {_fmt(c['limit'])} | {c.get('rule', 'point')} | "
                         f"{'yes' if c['passed'] else 'NO'} |")
    if decision["reasons"]:
        lines += ["", "Why not promoted:", ""] + [f"- {r}" for r in decision["reasons"]]
    return "\n".join(lines) + "\n"


def serve_markdown(summary: dict) -> str:
    lines = [f"# vLLM serving smoke test: {'PASSED' if summary['passed'] else 'FAILED'}", ""]
    for target in summary["targets"]:
        lines += [f"## {target['target']}: `{target['model']}`", "",
                  f"- command: `{target['command']}`",
                  f"- startup: {target['startup_s']:.1f} s" if target.get("startup_s") is not None else "- startup: –",
                  f"- parity: {target['parity_passed']}/{target['parity_total']} prompts identical"
                  + ("" if target.get("passed") else f" — {target.get('reason')}"), ""]
        if target["requests"]:
            lines += ["| endpoint | example | latency s | prompt tokens | completion tokens | tokens/s | parity |",
                      "|---|---|---|---|---|---|---|"]
            for r in target["requests"]:
                parity = "–" if r["parity"] is None else ("ok" if r["parity"] else "MISMATCH")
                tps = f"{r['tokens_per_s']:.1f}" if r["completion_tokens"] else "–"
                lines.append(f"| {r['endpoint']} | {r['example_id'] or ''} | {r['latency_s']:.3f} | "
                             f"{r['prompt_tokens'] or '–'} | {r['completion_tokens'] or '–'} | {tps} | {parity} |")
            lines.append("")
        for m in target.get("mismatches", [])[:3]:
            lines += [f"Mismatch on `{m['example_id']}`: {m['why']}", "",
                      f"- transformers: `{_clip(m['expected'], 200)}`", f"- vLLM: `{_clip(m['served'], 200)}`", ""]
    return "\n".join(lines) + "\n"
