"""Merge stage: fold the final LoRA adapter into the base and save a deployable model.

The base is loaded in merge.dtype (float32 / float16 / bfloat16), never in 4-bit: merging into quantised weights
loses accuracy. Before anything is merged the adapter is verified (files present, checksum equal to what training
recorded, every tensor readable and finite, every adapter weight of the model present in the file); a corrupted
adapter raises AdapterError. The merged model's logits must match the adapter model's on a few validation examples
within merge.parity_atol, both in memory and after reloading the saved safetensors; a mismatch raises
MergeParityError. The output folder holds safetensors weights, config, tokenizer and the training chat template.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import torch

from tasks.core import storage
from tasks.core.artifacts import publish_markdown
from tasks.core.caching import stage_task
from tasks.core.config import PipelineConfig
from tasks.core.hashing import files_fingerprint, json_fingerprint
from tasks.core.results import ModelResult
from tasks.core.storage import read_jsonl
from tasks.data.chat_template import chat_inputs
from tasks.training.loading import (
    configure_threads,
    library_versions,
    load_model,
    load_tokenizer,
    training_code_hash,
)
from tasks.training.outputs import StageOutput
from tasks.training.tracking import record_training_run, summary_markdown

log = logging.getLogger("sftpipe.merge")

# Half precision rounds every merged weight (W + scale * B @ A) to 8 or 11 mantissa bits, so its tolerance is looser.
DEFAULT_ATOL = {"float32": 1e-3, "float16": 0.25, "bfloat16": 1.0}


class AdapterError(RuntimeError):
    """The adapter cannot be merged: missing, corrupted, changed since training, or not matching the base."""


class MergeParityError(RuntimeError):
    """The merged model's logits differ from the adapter model's by more than the tolerance."""


def verify_adapter_files(adapter_dir: str | Path, expected_sha: str | None = None) -> dict[str, torch.Tensor]:
    """Read and check the adapter's files; returns its tensors. Raises AdapterError with the reason."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    config = adapter_dir / "adapter_config.json"
    weights = adapter_dir / "adapter_model.safetensors"
    for f in (config, weights):
        if not f.is_file():
            raise AdapterError(f"adapter {adapter_dir} is incomplete: {f.name} is missing")
    try:
        json.loads(config.read_text())
    except ValueError as err:
        raise AdapterError(f"adapter {adapter_dir} is corrupted: adapter_config.json is not JSON ({err})") from None
    if expected_sha is not None and (actual := files_fingerprint(adapter_dir)) != expected_sha:
        raise AdapterError(f"adapter {adapter_dir} changed since training: checksum {actual}, training recorded "
                           f"{expected_sha} (corrupted or overwritten files)")
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError, RuntimeError, ValueError) as err:
        raise AdapterError(f"adapter {adapter_dir} is corrupted: cannot read {weights.name}: {err}") from None
    if not tensors:
        raise AdapterError(f"adapter {adapter_dir} is corrupted: {weights.name} holds no tensors")
    bad = [name for name, t in tensors.items() if not torch.isfinite(t).all()]
    if bad:
        raise AdapterError(f"adapter {adapter_dir} is corrupted: non-finite values in {len(bad)} tensors, "
                           f"e.g. {bad[0]}")
    return tensors


def load_adapter_model(base, adapter_dir: str | Path, tensors: dict[str, torch.Tensor]):
    """The base with the adapter attached; fails when the file does not provide every adapter weight."""
    from peft import PeftModel, get_peft_model_state_dict

    try:
        model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=False)
    except (RuntimeError, ValueError, KeyError) as err:  # e.g. size mismatch: adapter trained on another base
        raise AdapterError(f"adapter {adapter_dir} does not fit this base model: {err}") from None
    expected = set(get_peft_model_state_dict(model))
    missing = sorted(expected - set(tensors))
    if missing:
        raise AdapterError(f"adapter {adapter_dir} is corrupted: {len(missing)} of {len(expected)} adapter weights "
                           f"are missing from the file, e.g. {missing[0]}")
    return model


def parity_batches(tokenizer, examples: list[dict], n: int, max_length: int) -> list[torch.Tensor]:
    """Token ids of up to n examples rendered with the chat template (one sequence each: no padding effects)."""
    batches = []
    for ex in examples[:n]:
        ids = tokenizer.apply_chat_template(**chat_inputs(ex["messages"], ex.get("tools")), tokenize=True,
                                            return_dict=True)["input_ids"]
        batches.append(torch.tensor([ids[:max_length]]))
    if not batches:  # no validation data: still compare on something real
        batches.append(tokenizer("Once upon a time there was a little robot.", return_tensors="pt")["input_ids"])
    return batches


@torch.no_grad()
def logits_of(model, batches: list[torch.Tensor]) -> list[torch.Tensor]:
    model.eval()
    device = next(model.parameters()).device
    return [model(input_ids=b.to(device)).logits.float().cpu() for b in batches]


def max_abs_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


def merge_adapter(cfg: PipelineConfig, base_path: str | Path, adapter_dir: str | Path, examples: list[dict],
                  out_dir: str | Path, expected_sha: str | None = None) -> ModelResult:
    """Verify, merge, check parity, save; returns the merged model (path: out_dir/model, written only on
    success)."""
    from transformers import AutoModelForCausalLM

    configure_threads()
    started = time.time()
    out_dir = Path(out_dir)
    dtype = getattr(torch, cfg.merge.dtype)
    atol = cfg.merge.parity_atol or DEFAULT_ATOL[cfg.merge.dtype]
    tensors = verify_adapter_files(adapter_dir, expected_sha)
    tokenizer = load_tokenizer(adapter_dir, cfg)  # carries the chat template training used
    base = load_model(base_path, cfg, quantize=False, dtype=dtype)
    model = load_adapter_model(base, adapter_dir, tensors)
    batches = parity_batches(tokenizer, examples, cfg.merge.parity_examples, cfg.model.max_length)
    adapter_logits = logits_of(model, batches)
    with model.disable_adapter():
        base_logits = logits_of(model, batches)
    adapter_effect = max_abs_diff(adapter_logits, base_logits)

    merged = model.merge_and_unload()
    diff = max_abs_diff(adapter_logits, logits_of(merged, batches))
    if diff > atol:
        raise MergeParityError(f"merged logits differ from the adapter model's by {diff:.3g} > {atol:g} "
                               f"({cfg.merge.dtype}, {len(batches)} examples): not saving the merged model")
    work = out_dir / "model.tmp"
    shutil.rmtree(work, ignore_errors=True)
    merged.save_pretrained(str(work), safe_serialization=True)
    tokenizer.save_pretrained(str(work))
    reloaded = AutoModelForCausalLM.from_pretrained(str(work), dtype=dtype)
    diff_saved = max_abs_diff(adapter_logits, logits_of(reloaded, batches))
    if diff_saved > atol:
        raise MergeParityError(f"saved merged model's logits differ from the adapter model's by {diff_saved:.3g} > "
                               f"{atol:g}: the written safetensors do not reproduce the merge")
    final = out_dir / "model"
    shutil.rmtree(final, ignore_errors=True)
    work.rename(final)
    stats = {"dtype": cfg.merge.dtype, "parity_examples": len(batches), "parity_atol": atol,
             "max_abs_logit_diff": diff, "max_abs_logit_diff_saved": diff_saved,
             "adapter_effect_max_abs_logit": adapter_effect, "wall_s": round(time.time() - started, 2),
             "parameters": sum(p.numel() for p in reloaded.parameters()), "versions": library_versions()}
    log.info("merged %s into %s: parity %.3g (saved %.3g) <= %g", adapter_dir, final, diff, diff_saved, atol)
    return ModelResult(stage="merge", fingerprint=files_fingerprint(final), path=str(final.resolve()), stats=stats)


def run_merge(cfg: PipelineConfig, dpo_or_sft: ModelResult) -> ModelResult:
    """The merge stage: merge the upstream (DPO or SFT) adapter into its base; returns the merged model's path."""
    from tasks.core.caching import source_hash

    upstream = dpo_or_sft
    key = json_fingerprint({"adapter": upstream.fingerprint, "model": cfg.model.model_dump(),
                            "merge": cfg.merge.model_dump(), "code": [training_code_hash(), source_hash(run_merge)]})
    out = StageOutput(cfg, "merged", key)
    if (done := out.finished()) is not None:
        return done
    merged = merge_adapter(cfg, storage.fetched(upstream.base), storage.fetched(upstream.adapter),
                           read_jsonl(upstream.validation_sample), out.dir, expected_sha=upstream.adapter_sha)
    result = merged.model_copy(update={"path": out.url_of(merged.path), "from_stage": upstream.stage,
                                       "adapter": upstream.adapter, "base": upstream.base,
                                       "warehouse": upstream.warehouse})
    record_training_run(upstream.warehouse, run_id=f"merge-{key}", stage="merge",
                        fingerprint=result.fingerprint, base=upstream.base,
                        data_fingerprint=upstream.data_fingerprint or "", output_dir=out.url,
                        stats=merged.stats, config={"merge": cfg.merge.model_dump()},
                        curves_path=out.dir / "no-curves.jsonl")
    publish_markdown("merge-summary", summary_markdown("Merge", result), "LoRA merge summary")
    return out.finish(result)


def _merge_config(cfg: PipelineConfig) -> dict:
    return {"model": cfg.model.model_dump(), "merge": cfg.merge.model_dump(), "storage_root": cfg.storage_root,
            "code": training_code_hash()}


merge_task = stage_task("merge", _merge_config, retries=0)(run_merge)
