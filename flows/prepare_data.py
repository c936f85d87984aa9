"""prepare-data: raw files → DuckDB → clean → quality filters → MinHash dedup → split → data-quality report (the
data rows of the stage table in flows/stages.py)."""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.stages import run_stages
from tasks.core.caching import current_run_id
from tasks.core.config import load_config
from tasks.core.results import DataResult


@flow(name="prepare-data")
def prepare_data(config_path: str | None = None, overrides: dict[str, Any] | list[str] | None = None,
                 refresh: list[str] | None = None) -> DataResult:
    """Build the warehouse's training data; returns the split stage's result. `overrides` are dotted `key=value`
    strings or a nested dict; `refresh` names stages to recompute even when cached (or "all")."""
    cfg = load_config(config_path, overrides)
    return run_stages(cfg, current_run_id(), until="quality-report", refresh=refresh or [])["split"]
