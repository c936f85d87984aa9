"""The data-quality report: the warehouse's quality views as Prefect artifacts (markdown summary + table)."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.core.config import PipelineConfig
from tasks.core.results import DataResult, ReportResult
from tasks.core.warehouse import open_warehouse


def _markdown_table(columns: list[str], rows: list[tuple]) -> str:
    head = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
    return head + "".join("| " + " | ".join(str(v).replace("|", "\\|").replace("\n", " ") for v in r) + " |\n"
                          for r in rows)


def _query(con, sql: str) -> tuple[list[str], list[tuple]]:
    cur = con.execute(sql)
    return [d[0] for d in cur.description], cur.fetchall()


def build_quality_report(warehouse: str) -> tuple[str, list[dict[str, Any]]]:
    """(markdown, table rows) from the quality views."""
    with open_warehouse(warehouse, read_only=True) as con:
        summary = _query(con, "SELECT * FROM quality_summary")
        reasons = _query(con, "SELECT reason, source, rows, example_detail FROM rejections_by_reason")
        files = _query(con, "SELECT path, reason, detail FROM quarantined_files")
        clusters = _query(con, "SELECT representative, members, exact_copies, near_copies, round(min_similarity, 3), "
                               "representative_text FROM duplicate_clusters LIMIT 10")
        languages = _query(con, "SELECT source, language, rows, share, kept, mean_confidence FROM language_mix")
        pii_found = _query(con, "SELECT source, kind, action, rows, matches FROM pii_findings")
        benchmark = _query(con, "SELECT benchmark, item, part, overlap, row_id, text FROM benchmark_contamination "
                                "LIMIT 10")
        n_benchmark = con.execute("SELECT count(*) FROM benchmark_matches").fetchone()[0]
        contaminated = con.execute("SELECT count(*) FROM contamination").fetchone()[0]
        balanced = con.execute("SELECT count(*) FILTER (WHERE NOT balanced), count(*) FROM row_conservation").fetchone()
    total = [sum(r[i] for r in summary[1]) for i in range(2, 6)]
    md = [
        "# Data quality",
        f"**{total[0]} raw rows** → {total[1]} accepted, {total[2]} rejected, {total[3]} duplicates. "
        f"Files balanced (raw = accepted + rejected + duplicate): {balanced[1] - balanced[0]}/{balanced[1]}. "
        f"Validation/test rows overlapping the training split (left out of evaluation): {contaminated}. "
        f"Rows rejected for reproducing a benchmark item: {n_benchmark}.",
        "## Per source", _markdown_table(*summary),
        "## Rejections by reason", _markdown_table(*reasons) if reasons[1] else "None.",
    ]
    if files[1]:
        md += ["## Quarantined files", _markdown_table(*files)]
    md += ["## Languages", _markdown_table(*languages) if languages[1] else "Not measured (no quality stage run).",
           "## Personal data found", _markdown_table(*pii_found) if pii_found[1] else "None."]
    if benchmark[1]:
        md += ["## Benchmark contamination (top 10 by overlap)", _markdown_table(*benchmark)]
    md += ["## Largest duplicate clusters", _markdown_table(*clusters) if clusters[1] else "None."]
    table = [dict(zip(summary[0], r)) for r in summary[1]]
    return "\n\n".join(md), table


def publish_quality_report(cfg: PipelineConfig, split: DataResult) -> ReportResult:
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    markdown, table = build_quality_report(cfg.warehouse_url)
    create_markdown_artifact(markdown=markdown, key="data-quality-report", description="Data quality summary")
    create_table_artifact(table=table, key="data-quality-by-source", description="Rows per source and outcome")
    return ReportResult(stage="quality-report", fingerprint=split.fingerprint, markdown=markdown)


# Never cached: the artifacts belong to the flow run that shows them.
quality_report_task = task(name="quality-report", cache_policy=NO_CACHE)(publish_quality_report)
