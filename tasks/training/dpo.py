"""DPO stage: trl's DPOTrainer on the warehouse's preference pairs, continuing the SFT adapter.

- Policy: base (4-bit when model.quantization=4bit) + the SFT adapter, trainable. Reference: the SFT model itself.
  trl keeps it as a frozen copy of the adapter next to the trained one (peft multi-adapter), so the base weights
  exist once; with dpo.precompute_ref_log_probs it is only used to compute the reference log-probs, once.
- Reference log-probs are cached on this machine's disk (cfg.cache_dir: <storage_root>/cache/ref_logps for a local
  root, the work dir for a remote one), keyed by the SFT result, the quantisation settings and the tokenized pairs
  (not beta, loss type or learning rate): a rerun with a new beta reads them instead of recomputing.
- Trains on the training split only; reward accuracy and margins are evaluated on the validation split (and on a
  fixed sample of training pairs) at start, every eval_steps and at the end.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from tasks.core import storage
from tasks.core.artifacts import publish_markdown
from tasks.core.caching import retry_unless_deterministic, stage_task
from tasks.core.config import PipelineConfig
from tasks.core.hashing import files_fingerprint, json_fingerprint
from tasks.core.storage import read_jsonl
from tasks.training.launch import last_checkpoint, launched_job, train_in_processes
from tasks.training.loading import (
    compute_dtype,
    configure_threads,
    library_versions,
    load_model,
    load_tokenizer,
    snapshot_trainable_params,
    trainer_precision,
    training_code_hash,
    upcast_trainable_params,
    use_cuda,
)
from tasks.training.outputs import StageOutput
from tasks.training.tracking import (
    TrainingReporter,
    distributed_backend,
    metric_series,
    read_curves,
    record_training_run,
    summary_markdown,
)

log = logging.getLogger("sftpipe.dpo")


def preference_dataset(pairs: list[dict]):
    """Conversational preference rows as trl expects them: prompt turns, chosen / rejected assistant turns."""
    from datasets import Dataset

    return Dataset.from_list([{
        "prompt": [{"role": m["role"], "content": m["content"]} for m in p["prompt"]],
        "chosen": [{"role": "assistant", "content": p["chosen"]}],
        "rejected": [{"role": "assistant", "content": p["rejected"]}],
    } for p in pairs])


def _dpo_trainer_class():
    import torch
    import trl
    from safetensors.torch import load_file, save_file
    from torch.utils.data import DataLoader

    class CachedRefDPOTrainer(trl.DPOTrainer):
        """DPOTrainer whose precomputed reference log-probs persist on disk across runs."""

        def __init__(self, *args, ref_cache_dir: Path | None = None, ref_cache_salt: str = "", **kwargs):
            self.ref_cache_dir, self.ref_cache_salt = ref_cache_dir, ref_cache_salt
            self.ref_logps_computed = 0
            self.ref_logps_cache_hits = 0
            super().__init__(*args, **kwargs)

        def _precompute_ref_logps(self, dataset, name, batch_size):
            ids = dataset.select_columns(["prompt_ids", "chosen_ids", "rejected_ids"]).to_dict()
            key = hashlib.sha256(json.dumps([self.ref_cache_salt, ids]).encode()).hexdigest()[:24]
            path = Path(self.ref_cache_dir) / f"{key}.safetensors" if self.ref_cache_dir else None
            if path is not None and path.exists():
                logps = load_file(str(path))
                self.ref_logps_cache_hits += 1
                log.info("reference log-probs for %s (%d pairs) read from %s", name, len(dataset), path)
            else:
                logps = self._reference_logps(dataset, batch_size)
                self.ref_logps_computed += 1
                if path is not None and self.accelerator.is_main_process:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    save_file(logps, str(path.with_suffix(".tmp")))
                    path.with_suffix(".tmp").rename(path)
                self.accelerator.wait_for_everyone()
            return (dataset.add_column("ref_chosen_logps", logps["chosen"].tolist())
                    .add_column("ref_rejected_logps", logps["rejected"].tolist()))

        def _reference_logps(self, dataset, batch_size) -> dict[str, torch.Tensor]:
            # trl's own precompute round-trips through a datasets cache file whose name is random per process for
            # in-memory datasets, so rank 1 cannot find rank 0's file; this keeps the tensors in memory instead.
            loader = self.accelerator.prepare(DataLoader(dataset, batch_size=batch_size, shuffle=False,
                                                         collate_fn=self.data_collator))
            chosen, rejected = [], []
            for batch in loader:
                c, r = self.accelerator.gather_for_metrics(self.compute_ref_log_probs(self.ref_model or self.model,
                                                                                     batch))
                chosen.append(c.float().cpu())
                rejected.append(r.float().cpu())
            return {"chosen": torch.cat(chosen), "rejected": torch.cat(rejected)}

    return CachedRefDPOTrainer


def dpo_arguments(cfg: PipelineConfig, out_dir: Path, has_eval: bool):
    import trl

    d = cfg.dpo
    return trl.DPOConfig(
        output_dir=str(out_dir / "checkpoints"), beta=d.beta, loss_type=[d.loss_type],
        max_steps=d.max_steps, num_train_epochs=d.num_train_epochs,
        per_device_train_batch_size=d.per_device_batch_size, per_device_eval_batch_size=d.per_device_batch_size,
        gradient_accumulation_steps=d.gradient_accumulation_steps, gradient_checkpointing=d.gradient_checkpointing,
        learning_rate=d.learning_rate, lr_scheduler_type=d.lr_scheduler_type, warmup_steps=d.warmup_steps,
        max_grad_norm=d.max_grad_norm, logging_steps=d.logging_steps,
        eval_strategy="steps" if has_eval else "no", eval_steps=d.eval_steps, eval_on_start=has_eval,
        save_strategy="steps", save_steps=d.save_steps, save_total_limit=d.save_total_limit,
        max_length=cfg.model.max_length, precompute_ref_log_probs=d.precompute_ref_log_probs,
        seed=d.seed, data_seed=d.seed, report_to=[], disable_tqdm=True, dataloader_num_workers=0,
        ddp_find_unused_parameters=False, log_level="warning", **trainer_precision(cfg),
    )


def build_trainer(cfg: PipelineConfig, base_path: str | Path, adapter_path: str | Path, train_pairs: list[dict],
                  eval_pairs: list[dict], out_dir: str | Path, ref_cache_salt: str = "", callbacks=()):
    from peft import PeftModel
    from transformers import PrinterCallback

    configure_threads()
    out_dir = Path(out_dir)
    if not train_pairs:
        raise ValueError("DPO needs preference pairs: the training split of preference_pairs is empty")
    tokenizer = load_tokenizer(adapter_path, cfg)  # the SFT adapter's tokenizer: same pad token and chat template
    model = PeftModel.from_pretrained(load_model(base_path, cfg, quantize=True), str(adapter_path), is_trainable=True)
    exact = snapshot_trainable_params(model)
    evals = {}
    if eval_pairs:
        evals["validation"] = preference_dataset(eval_pairs[: cfg.dpo.max_eval_pairs])
    if cfg.dpo.train_probe_pairs:
        evals["train_probe"] = preference_dataset(train_pairs[: cfg.dpo.train_probe_pairs])
    trainer = _dpo_trainer_class()(
        model=model, args=dpo_arguments(cfg, out_dir, has_eval=bool(evals)),
        train_dataset=preference_dataset(train_pairs), eval_dataset=evals or None, processing_class=tokenizer,
        callbacks=list(callbacks),
        ref_cache_dir=cfg.cache_dir("ref_logps") if cfg.dpo.precompute_ref_log_probs else None,
        ref_cache_salt=ref_cache_salt,
    )
    trainer.remove_callback(PrinterCallback)
    if not use_cuda(cfg):
        upcast_trainable_params(trainer.model, compute_dtype(cfg), exact)
    return trainer


def _last(rows: list[dict], metric: str, first: bool = False) -> float | None:
    series = metric_series(rows, metric)
    return (series[0] if first else series[-1])[1] if series else None


def train_dpo(cfg: PipelineConfig, base_path: str | Path, adapter_path: str | Path, train_pairs: list[dict],
              eval_pairs: list[dict], out_dir: str | Path, ref_cache_salt: str = "", callbacks=()) -> dict[str, Any]:
    """Train (or resume) one DPO run in this process; writes adapter/, metrics.jsonl and train.json."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    reporter = TrainingReporter("dpo", out_dir / "metrics.jsonl")
    trainer = build_trainer(cfg, base_path, adapter_path, train_pairs, eval_pairs, out_dir, ref_cache_salt,
                            [reporter, *callbacks])
    checkpoint, resumed_from = last_checkpoint(out_dir / "checkpoints")
    if checkpoint:
        log.info("resuming DPO from %s (step %d)", checkpoint, resumed_from)
        if trainer.is_world_process_zero():
            reporter.truncate_after(resumed_from)
    elif trainer.is_world_process_zero():
        (out_dir / "metrics.jsonl").unlink(missing_ok=True)
    output = trainer.train(resume_from_checkpoint=checkpoint)
    if trainer.eval_dataset is not None and trainer.state.global_step % cfg.dpo.eval_steps != 0:
        trainer.evaluate()
    adapter_dir = out_dir / "adapter"
    # Only the trained adapter: trl's frozen reference copy ("ref") is not part of the result.
    trainer.model.save_pretrained(str(adapter_dir), selected_adapters=["default"],
                                  is_main_process=trainer.is_world_process_zero())
    if not trainer.is_world_process_zero():
        return {}
    trainer.processing_class.save_pretrained(str(adapter_dir))

    rows = read_curves(out_dir / "metrics.jsonl")
    tokens = max([v for _, v in metric_series(rows, "num_tokens")] or [0])
    runtime = output.metrics.get("train_runtime") or (time.time() - started)
    stats = {
        "train_pairs": len(train_pairs), "eval_pairs": len(evals_of(trainer, "validation")),
        "steps": trainer.state.global_step, "resumed_from_step": resumed_from, "beta": cfg.dpo.beta,
        "loss_type": cfg.dpo.loss_type, "first_loss": _last(rows, "loss", first=True), "last_loss": _last(rows, "loss"),
        "train_reward_accuracy": _last(rows, "rewards/accuracies"),
        "train_reward_margin": _last(rows, "rewards/margins"),
        "probe_reward_accuracy_start": _last(rows, "eval_train_probe_rewards/accuracies", first=True),
        "probe_reward_accuracy": _last(rows, "eval_train_probe_rewards/accuracies"),
        "probe_reward_margin_start": _last(rows, "eval_train_probe_rewards/margins", first=True),
        "probe_reward_margin": _last(rows, "eval_train_probe_rewards/margins"),
        "eval_reward_accuracy": _last(rows, "eval_validation_rewards/accuracies"),
        "eval_reward_margin": _last(rows, "eval_validation_rewards/margins"),
        "ref_logps_computed": trainer.ref_logps_computed, "ref_logps_cache_hits": trainer.ref_logps_cache_hits,
        "train_runtime_s": round(runtime, 2), "wall_s": round(time.time() - started, 2), "train_tokens": int(tokens),
        "tokens_per_s": round(tokens / runtime, 1) if runtime and tokens else None,
        "quantization": cfg.model.quantization, "world_size": trainer.args.world_size,
        "distributed_backend": distributed_backend(), "seed": cfg.dpo.seed,
        "device": str(trainer.args.device), "versions": library_versions(),
    }
    run = {"adapter": str(adapter_dir.resolve()), "adapter_sha": files_fingerprint(adapter_dir), "stats": stats}
    (out_dir / "train.json").write_text(json.dumps(run, indent=2, default=str))
    shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)
    return run


def evals_of(trainer, name: str):
    ev = trainer.eval_dataset
    return (ev or {}).get(name, []) if isinstance(ev, dict) else (ev or [])


# ------------------------------------------------------------------------------------------------------ the stage
def _read_pairs(warehouse: str, split: str) -> list[dict]:
    from tasks.core.warehouse import open_warehouse, preference_pairs

    with open_warehouse(warehouse, read_only=True) as con:
        return preference_pairs(con, split)


def _own_hash() -> str:
    from tasks.core.caching import source_hash

    return source_hash(preference_dataset)


def ref_cache_salt(cfg: PipelineConfig, sft: dict) -> str:
    """What the reference log-probs depend on besides the tokenized pairs: the SFT model and how it is loaded."""
    m = cfg.model
    return json_fingerprint({"sft": sft["fingerprint"], "quantization": [m.quantization, m.bnb_4bit_quant_type,
                             m.bnb_4bit_use_double_quant, str(compute_dtype(cfg))], "attn": m.attn_implementation})


def run_dpo(cfg: PipelineConfig, sft: dict, data: dict) -> dict:
    """The DPO stage: continue the SFT adapter on data's training preference pairs."""
    key = json_fingerprint({"sft": sft["fingerprint"], "data": data["fingerprint"], "model": cfg.model.model_dump(),
                            "dpo": cfg.dpo.model_dump(), "code": [training_code_hash(), _own_hash()]})
    out = StageOutput(cfg, "dpo", key)
    if (done := out.finished()) is not None:
        return done
    out_dir, base_path, adapter_path = out.dir, storage.fetched(sft["base"]), storage.fetched(sft["adapter"])
    train = _read_pairs(data["warehouse"], "train")[: cfg.dpo.max_train_pairs]
    valid = _read_pairs(data["warehouse"], "validation")
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    salt = ref_cache_salt(cfg, sft)
    if cfg.dpo.num_processes > 1:
        run = train_in_processes(cfg, cfg.dpo, "tasks.training.dpo", out_dir, train, valid, base_path=base_path,
                                 adapter_path=adapter_path, ref_cache_salt=salt)
    else:
        run = train_dpo(cfg, base_path, adapter_path, train, valid, out_dir, salt)
    stats = {**run["stats"], "wall_s": round(time.time() - started, 2)}
    result = {
        "stage": "dpo", "fingerprint": json_fingerprint({"adapter": run["adapter_sha"], "sft": sft["fingerprint"]}),
        "adapter": out.url_of(run["adapter"]), "adapter_sha": run["adapter_sha"], "base": sft["base"],
        "base_fingerprint": sft["base_fingerprint"], "sft_fingerprint": sft["fingerprint"], "out_dir": out.url,
        "warehouse": data["warehouse"], "data_fingerprint": data["fingerprint"],
        "validation_sample": sft.get("validation_sample"), "stats": stats,
    }
    record_training_run(data["warehouse"], run_id=f"dpo-{key}", stage="dpo", fingerprint=result["fingerprint"],
                        base=sft["base"], data_fingerprint=data["fingerprint"], output_dir=out.url, stats=stats,
                        config={"model": cfg.model.model_dump(), "dpo": cfg.dpo.model_dump()},
                        curves_path=out_dir / "metrics.jsonl")
    publish_markdown("dpo-summary", summary_markdown("DPO", result), "DPO run summary")
    return out.finish(result)


def _dpo_config(cfg: PipelineConfig) -> dict:
    return {"model": cfg.model.model_dump(), "dpo": cfg.dpo.model_dump(), "storage_root": cfg.storage_root,
            "code": training_code_hash()}


dpo_task = stage_task("dpo", _dpo_config, retries=1, retry_condition_fn=retry_unless_deterministic)(run_dpo)


def main(argv: list[str] | None = None) -> None:
    """Entry point of every launched process (accelerate launch / torchrun)."""
    job, cfg = launched_job(argv, __doc__.splitlines()[0])
    train_dpo(cfg, job["base_path"], job["adapter_path"], read_jsonl(job["train"]), read_jsonl(job["validation"]),
              job["out_dir"], job["ref_cache_salt"])


if __name__ == "__main__":
    main()
