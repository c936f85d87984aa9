"""Markdown for the eval report and the promotion decision, and the rows of the sample-generations table.

Input rows are eval_results rows: {variant, split, source, metric, value, n}; source "all" is the token- (perplexity)
or example-weighted (ROUGE) aggregate over sources.
"""

from __future__ import annotations

VARIANT_ORDER = ["base", "sft", "dpo", "merged"]
# (split, metric) columns of the overview tables; lower is better only for perplexity.
COLUMNS = [("validation", "perplexity"), ("test", "perplexity"), ("test", "rouge1"), ("test", "rouge2"),
           ("test", "rougeL"), ("test", "rougeLsum")]
LOWER_IS_BETTER = {"perplexity"}


def ordered_variants(names) -> list[str]:
    names = list(dict.fromkeys(names))
    return [v for v in VARIANT_ORDER if v in names] + sorted(v for v in names if v not in VARIANT_ORDER)


def overall(rows: list[dict], variant: str) -> dict[tuple[str, str], float]:
    return {(r["split"], r["metric"]): r["value"] for r in rows if r["variant"] == variant and r["source"] == "all"}


def _fmt(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:.2f}" if abs(value) >= 100 else f"{value:.4f}"


def _delta(value: float | None, ref: float | None, metric: str) -> str:
    if value is None or ref is None:
        return "–"
    diff = value - ref
    text = f"{diff:+.4f}"
    if metric in LOWER_IS_BETTER and ref:
        text += f" ({100 * diff / ref:+.1f}%)"
    return text


def _header(cols) -> list[str]:
    return ["| variant | " + " | ".join(f"{m} ({s})" for s, m in cols) + " |", "|---" * (len(cols) + 1) + "|"]


def eval_report_markdown(run_id: str, rows: list[dict], settings: dict, previous: dict | None) -> str:
    """The report: variants x metrics, deltas against the base and against the last promoted run, per source.

    previous: {"run_id", "variant", "rows"} of the last promoted run, or None.
    """
    variants = ordered_variants(r["variant"] for r in rows)
    cols = [c for c in COLUMNS if any((r["split"], r["metric"]) == c for r in rows)]
    lines = [f"# Evaluation report: run `{run_id}`", ""]
    lines += [", ".join(f"{k}: {v}" for k, v in settings.items()), ""]
    lines += ["Perplexity is token-weighted over the scored tokens; ROUGE is the mean F-measure of greedy answers "
              "to the test prompts. Lower perplexity and higher ROUGE are better.", ""]
    lines += ["## Variants", ""] + _header(cols)
    for v in variants:
        o = overall(rows, v)
        lines.append(f"| {v} | " + " | ".join(_fmt(o.get(c)) for c in cols) + " |")
    prev = overall(previous["rows"], previous["variant"]) if previous else {}
    if previous:
        lines.append(f"| last promoted: {previous['variant']} of `{previous['run_id']}` | "
                     + " | ".join(_fmt(prev.get(c)) for c in cols) + " |")
    if "base" in variants:
        base = overall(rows, "base")
        lines += ["", "## Δ against the base", ""] + _header(cols)
        for v in variants:
            if v != "base":
                o = overall(rows, v)
                lines.append(f"| {v} | " + " | ".join(_delta(o.get(c), base.get(c), c[1]) for c in cols) + " |")
    lines += ["", "## Δ against the last promoted run", ""]
    if previous:
        lines += [f"Baseline: variant `{previous['variant']}` of run `{previous['run_id']}`.", ""] + _header(cols)
        for v in variants:
            o = overall(rows, v)
            lines.append(f"| {v} | " + " | ".join(_delta(o.get(c), prev.get(c), c[1]) for c in cols) + " |")
    else:
        lines.append("No run has been promoted yet.")
    lines += ["", "## Per source", "", "| split | source | metric | n | " + " | ".join(variants) + " |",
              "|---" * (4 + len(variants)) + "|"]
    keys = sorted({(r["split"], r["source"], r["metric"]) for r in rows if r["source"] != "all"})
    for split, source, metric in keys:
        vals = {r["variant"]: r for r in rows if (r["split"], r["source"], r["metric"]) == (split, source, metric)}
        n = next(iter(vals.values()))["n"]
        lines.append(f"| {split} | {source} | {metric} | {n} | "
                     + " | ".join(_fmt(vals[v]["value"]) if v in vals else "–" for v in variants) + " |")
    return "\n".join(lines) + "\n"


def _clip(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def sample_table(generations: list[dict], limit: int) -> list[dict]:
    """Rows for the sample-generations table: prompt, reference and each variant's answer to the same example.

    generations: [{variant, example_id, source, prompt, reference, prediction}].
    """
    by_example: dict[str, dict] = {}
    for g in generations:
        row = by_example.setdefault(g["example_id"], {"example_id": g["example_id"], "source": g["source"],
                                                      "prompt": _clip(g["prompt"]),
                                                      "reference": _clip(g["reference"])})
        row[g["variant"]] = _clip(g["prediction"])
    return list(by_example.values())[:limit]


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
        lines += ["", "| check | candidate | baseline | limit | passed |", "|---|---|---|---|---|"]
        for c in decision["checks"]:
            lines.append(f"| {c['check']} | {_fmt(c['candidate'])} | {_fmt(c['baseline'])} | {_fmt(c['limit'])} | "
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
