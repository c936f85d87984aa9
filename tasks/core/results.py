"""What stages return: small typed results, one spelling per field.

A result names where a stage's output lives (a warehouse, a model folder, a report) and its `fingerprint`, the
content hash every downstream cache key is built from (tasks.core.caching). Results are frozen pydantic models:
Prefect pickles them into its result storage (the cache), and the pipeline saves them as JSON under
<storage_root>/pipeline-runs/<run>/<stage>.json, read back with `load_result`.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict


class Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    def to_json(self) -> str:
        return json.dumps(self.model_dump(), indent=1, default=str)


class StageResult(Record):
    stage: str
    fingerprint: str
    stats: dict[str, Any] = {}


class DataResult(StageResult):
    """A data stage's result: what it wrote is in the warehouse's tables."""

    warehouse: str


class IngestResult(DataResult):
    files: list[dict[str, Any]] = []  # one report per input file (path, file_id, skipped, rows, ...)


class SignatureShard(StageResult):
    """One shard of MinHash signatures, a Parquet file the dedup stage loads."""

    path: str
    signed: int


class ReportResult(StageResult):
    markdown: str


class ModelFiles(Record):
    """Where a model variant's files are: a full model folder (`path`), or a LoRA `adapter` on a `base`."""

    path: str | None = None
    adapter: str | None = None
    base: str | None = None

    def adapter_pair(self) -> tuple[str, str] | None:
        """(adapter, base) when the variant is (or was made from) a LoRA adapter."""
        return (str(self.adapter), str(self.base)) if self.adapter and self.base else None

    def describe(self) -> str:
        if self.path:
            return str(self.path)
        pair = self.adapter_pair()
        return f"{pair[0]} on {pair[1]}" if pair else "?"


class ModelResult(StageResult, ModelFiles):
    """A training stage's result (base, an adapter method, merge)."""

    adapter_sha: str | None = None  # files_fingerprint of the adapter when training finished
    base_fingerprint: str | None = None
    upstream_fingerprint: str | None = None
    from_stage: str | None = None  # merge: the stage whose adapter it merged
    out_dir: str | None = None
    warehouse: str | None = None
    data_fingerprint: str | None = None
    validation_sample: str | None = None  # examples merge checks its logit parity on


class VariantRecord(ModelFiles):
    """One evaluated variant, as eval_runs.variants keeps it."""

    fingerprint: str | None = None
    model: str


class EvalResult(StageResult):
    run_id: str
    warehouse: str
    report_path: str
    samples_path: str | None = None  # the sample answers as JSON Lines, beside the report
    variants: dict[str, VariantRecord]
    metrics: dict[str, dict[str, float | None]]  # variant -> "metric/split" -> overall value
    artifacts: list[str] = []


class ServeResult(StageResult):
    run_id: str
    passed: bool
    path: str  # the model folder served
    report_path: str
    artifacts: list[str] = []
    targets: list[dict[str, Any]] = []


class PromotionResult(StageResult):
    run_id: str
    variant: str
    decision: str  # promoted | rejected
    promoted: bool
    model_path: str | None
    baseline_kind: str | None
    baseline_run_id: str | None
    baseline_variant: str | None
    checks: list[dict[str, Any]]
    reasons: list[str]
    warehouse: str
    artifacts: list[str] = []


class PromotedRun(Record):
    """The most recently promoted run: its eval_results rows and the promoted variant's per-example scores."""

    run_id: str
    variant: str
    model_path: str | None
    rows: list[dict[str, Any]]
    scores: list[dict[str, Any]]


_BY_STAGE: dict[str, type[StageResult]] = {
    "ingest": IngestResult, "clean": DataResult, "quality": DataResult, "dedup": DataResult, "split": DataResult,
    "minhash": SignatureShard, "quality-report": ReportResult, "evaluate": EvalResult, "serve": ServeResult,
    "promote": PromotionResult,
}


def load_result(text: str | dict) -> StageResult:
    """A saved result read back as its type (chosen by its stage; every training stage's is a ModelResult)."""
    data = json.loads(text) if isinstance(text, str) else text
    return _BY_STAGE.get(data.get("stage"), ModelResult).model_validate(data)
