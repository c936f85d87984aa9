"""The pipeline's one typed config.

Loaded from YAML (`load_config`), overridable with dotted `key=value` strings (`sftpipe run data.dedup.threshold=0.7`)
or a nested dict of Prefect flow parameters (`apply_overrides`). Every field has a default and a description;
`sftpipe config` prints them. An invalid value fails at load with the field's dotted name in the message.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

Format = Literal["auto", "alpaca", "sharegpt", "messages", "preference"]


class Section(BaseModel):
    # Unknown keys are typos, not extensions: fail loudly instead of silently ignoring them.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    def fingerprint(self) -> str:
        """Stable hash of this section's values; part of every cache key that depends on it."""
        return hashlib.sha256(json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:16]


class IngestConfig(Section):
    inputs: list[str] = Field(
        default_factory=list,
        description="Files or folders of .json/.jsonl/.jsonl.gz/.csv/.parquet. Empty: the embedded sample data "
        "that the pipeline writes to <storage_root>/sample_data.",
    )
    formats: dict[str, Format] = Field(
        default_factory=dict,
        description="Per-file format override: glob pattern (matched against the file path) -> format. "
        "Files not matched are auto-detected from their fields.",
    )
    csv_delimiter: str = Field(",", description="Delimiter of .csv inputs.")


class CleanConfig(Section):
    min_turn_chars: int = Field(1, ge=0, description="A user/assistant turn shorter than this (after normalisation) "
                                "rejects the row (reason too_short).")
    max_chars: int = Field(32_000, ge=1, description="A row whose text is longer than this rejects it (too_long).")
    max_tokens: int | None = Field(None, ge=1, description="With a tokenizer known (model.base), rows longer than this "
                                   "many tokens are rejected (too_long_tokens). None: no token limit.")
    normalize_form: Literal["NFC", "NFKC"] = Field("NFC", description="Unicode normal form applied to all text.")


class DedupConfig(Section):
    num_perm: int = Field(128, ge=16, le=1024, description="MinHash permutations.")
    threshold: float = Field(0.8, gt=0, lt=1, description="Estimated Jaccard similarity at or above which two "
                             "rows are near-duplicates.")
    ngram: int = Field(5, ge=1, description="Shingle size in tokens; a token is a word, or a single character for "
                       "scripts written without spaces (Chinese, Japanese, Korean, Thai).")
    seed: int = Field(1, description="MinHash permutation seed (datasketch semantics).")
    shards: int = Field(2, ge=1, description="Signature shards; each is its own Prefect task, so a Dask task runner "
                        "spreads them over workers.")
    lsh_backend: Literal["memory", "redis"] = Field("memory", description="Where datasketch keeps the LSH index.")
    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Redis URL when lsh_backend=redis.")


class SplitConfig(Section):
    validation: float = Field(0.05, ge=0, lt=1, description="Share of clusters in the validation split.")
    test: float = Field(0.05, ge=0, lt=1, description="Share of clusters in the test split.")
    seed: int = Field(13, description="Split seed. A row's split is a pure function of its cluster id and this seed.")
    decontam_ngram: int = Field(8, ge=2, description="n-gram size (tokens) of the train/eval overlap check.")
    decontam_threshold: float = Field(0.5, gt=0, le=1, description="Share of an eval example's n-grams found in the "
                                      "training split above which it is reported as contaminated.")

    @model_validator(mode="after")
    def _ratios(self) -> SplitConfig:
        if self.validation + self.test >= 1:
            raise ValueError("validation + test must be < 1")
        return self


class DataConfig(Section):
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    clean: CleanConfig = Field(default_factory=CleanConfig)
    dedup: DedupConfig = Field(default_factory=DedupConfig)
    split: SplitConfig = Field(default_factory=SplitConfig)


class ModelConfig(Section):
    base: str = Field("embedded", description="Hugging Face model id or local path of the base model; 'embedded' "
                      "builds a tiny Llama from the training split (no download).")
    trust_remote_code: bool = Field(False, description="Passed to the Auto classes.")
    chat_template: str | None = Field(None, description="Jinja chat template to use instead of the tokenizer's own "
                                      "(or the ChatML-style default where it has none).")
    max_length: int = Field(512, ge=16, description="Maximum tokens per training example.")


# --- training plane (issue 3): tasks/model.py, tasks/sft.py, tasks/dpo.py, tasks/merge.py -----------------------
class SFTConfig(Section):
    pass


class DPOConfig(Section):
    pass


class MergeConfig(Section):
    pass


# --- evaluation plane (issue 4): evals/, tasks/evaluate.py, tasks/promote.py, tasks/serve.py -----------------------
class EvalConfig(Section):
    pass


class PromoteConfig(Section):
    pass


class ServeConfig(Section):
    pass


class PipelineConfig(Section):
    storage_root: str = Field("runs", description="Where the warehouse, sample data, models, reports and Prefect "
                              "results live.")
    warehouse: str | None = Field(None, description="DuckDB file; default <storage_root>/warehouse.duckdb.")
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    sft: SFTConfig = Field(default_factory=SFTConfig)
    dpo: DPOConfig = Field(default_factory=DPOConfig)
    merge: MergeConfig = Field(default_factory=MergeConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    promote: PromoteConfig = Field(default_factory=PromoteConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)

    @property
    def root(self) -> Path:
        return Path(self.storage_root)

    @property
    def warehouse_path(self) -> Path:
        return Path(self.warehouse) if self.warehouse else self.root / "warehouse.duckdb"

    @property
    def sample_data_dir(self) -> Path:
        return self.root / "sample_data"


class ConfigError(ValueError):
    """Raised for an unreadable or invalid config; the message names the offending field."""


def _describe(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "<root>"
        lines.append(f"  {field}: {e['msg']} (got {e.get('input')!r})")
    return "invalid config:\n" + "\n".join(lines)


def _parse_value(text: str) -> Any:
    # YAML scalars give the user's intent: 0.7 -> float, true -> bool, [a, b] -> list, x -> str.
    return yaml.safe_load(text) if text != "" else ""


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    node = tree
    parts = dotted.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"invalid override {dotted!r}: {p} is not a section")
    node[parts[-1]] = value


def _deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def apply_overrides(cfg: PipelineConfig | dict, overrides: list[str] | dict | None = None) -> PipelineConfig:
    """Return a new config with `key.sub=value` strings or a nested dict applied on top of `cfg`."""
    tree = cfg.model_dump() if isinstance(cfg, PipelineConfig) else dict(cfg)
    if isinstance(overrides, dict):
        tree = _deep_merge(tree, overrides)
    else:
        for item in overrides or []:
            if "=" not in item:
                raise ConfigError(f"invalid override {item!r}: expected key=value, e.g. data.dedup.threshold=0.7")
            key, value = item.split("=", 1)
            _set_dotted(tree, key.strip(), _parse_value(value.strip()))
    try:
        return PipelineConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_describe(err)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | dict | None = None) -> PipelineConfig:
    """Load YAML (or defaults when `path` is None) and apply overrides."""
    tree: dict = {}
    if path is not None:
        try:
            tree = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as err:
            raise ConfigError(f"cannot read config {path}: {err}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"config {path} must be a mapping at the top level")
    return apply_overrides(tree, overrides)


def describe_fields(model: type[BaseModel] = PipelineConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted name, default, description) of every leaf field, for `sftpipe config --describe` and the README."""
    rows = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, Section):
            rows += describe_fields(ann, f"{prefix}{name}.")
        else:
            default = field.get_default(call_default_factory=True)
            rows.append((f"{prefix}{name}", json.dumps(default), field.description or ""))
    return rows
