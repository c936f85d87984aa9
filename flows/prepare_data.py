"""prepare-data: raw files → DuckDB → clean → quality filters → MinHash dedup → split → data-quality report."""

from __future__ import annotations

from typing import Any

from prefect import flow, unmapped

from tasks.core.caching import for_config
from tasks.core.config import PipelineConfig, load_config
from tasks.core.warehouse import warehouse_id
from tasks.data.clean import clean_task
from tasks.data.dedup import dedup_task, signature_shard_task
from tasks.data.ingest import ingest_task, input_fingerprint
from tasks.data.quality import quality_task
from tasks.data.quality_report import quality_report_task
from tasks.data.split import split_task

DATA_STAGES = ("ingest", "clean", "quality", "dedup", "split")


def _bound(prefect_task, cfg: PipelineConfig, stage: str, refresh: list[str]):
    """The stage task with cfg's result storage, recomputing when `refresh` names it."""
    prefect_task = for_config(prefect_task, cfg)
    return prefect_task.with_options(refresh_cache=True) if stage in refresh or "all" in refresh else prefect_task


def prepare(cfg: PipelineConfig, refresh: list[str] = ()) -> dict[str, Any]:
    """The data stages in order; each is served from cache when its inputs, config and code are unchanged."""
    refresh = list(refresh)
    ingest = _bound(ingest_task, cfg, "ingest", refresh)(cfg, input_fingerprint(cfg), warehouse_id(cfg.warehouse_url))
    clean = _bound(clean_task, cfg, "clean", refresh)(cfg, ingest)
    quality = _bound(quality_task, cfg, "quality", refresh)(cfg, clean)
    # dedup reads curated_rows, the quality stage's output
    shards = _bound(signature_shard_task, cfg, "dedup", refresh).map(
        unmapped(cfg), unmapped(quality), range(cfg.data.dedup.shards))
    dedup = _bound(dedup_task, cfg, "dedup", refresh)(cfg, quality, shards.result())
    split = _bound(split_task, cfg, "split", refresh)(cfg, dedup)
    quality_report_task(cfg, split)
    return split


@flow(name="prepare-data")
def prepare_data(config_path: str | None = None, overrides: dict[str, Any] | list[str] | None = None,
                 refresh: list[str] | None = None) -> dict[str, Any]:
    """Build the warehouse's training data. `overrides` are dotted `key=value` strings or a nested dict;
    `refresh` names stages to recompute even when cached (or "all")."""
    cfg = load_config(config_path, overrides)
    return prepare(cfg, refresh or [])
