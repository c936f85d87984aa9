"""SFT stage: (Q)LoRA supervised fine-tuning with trl's SFTTrainer on the warehouse's training split.

- QLoRA: the base is loaded in 4-bit NF4 with double quantisation (model.quantization); LoRA adapters on all linear
  layers train in the compute dtype (trl's bf16 cast of the adapters is undone on CPU, where bf16 is ~3x slower).
- Loss on assistant tokens only (sft.assistant_only_loss), via the chat template's generation markers; every batch is
  checked: a loss mask covering no tokens, or every token, raises LossMaskError instead of training silently wrong.
- Validation loss at start, every eval_steps and at the end; checkpoints every save_steps. A killed stage rerun with
  the same inputs (e.g. a Prefect retry) resumes from its last checkpoint under models/sft/<key>/checkpoints.
- Metrics go to metrics.jsonl while training and into DuckDB (training_runs, training_curves) in one short
  transaction at the end; seed, library versions and data fingerprint are in result.json, and with the config in
  the run's training_runs row.
- sft.num_processes > 1 relaunches this module with `accelerate launch --multi_gpu` or `torchrun`.

    python -m tasks.training.sft --job runs/models/sft/<key>/job.json      # what the launcher runs in every process
"""

from __future__ import annotations

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
    attention_keeps_packed_examples_apart,
    compute_dtype,
    configure_threads,
    library_versions,
    load_model,
    load_tokenizer,
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

log = logging.getLogger("sftpipe.sft")


class LossMaskError(ValueError):
    """The loss mask of a batch selects no tokens, or (with assistant-only loss) every token (never retried)."""


def check_loss_mask(batch: dict, assistant_only: bool) -> dict[str, int]:
    """Count real and loss-bearing tokens of a collated batch; raise LossMaskError when the mask is degenerate."""
    labels = batch["labels"]
    if "attention_mask" in batch:
        real = int(batch["attention_mask"].sum())
    else:  # padding-free (packed) batches carry no attention mask: every position is a real token
        real = int(labels.numel())
    trained = int((labels != -100).sum())
    if trained == 0:
        raise LossMaskError(
            f"loss mask covers none of the {real} tokens of this batch: nothing would be learned. With "
            "assistant_only_loss the chat template must wrap assistant turns in {% generation %} markers, and "
            "model.max_length must leave room for the answers after the prompts.")
    if assistant_only and trained >= real:
        raise LossMaskError(
            f"loss mask covers all {real} tokens of this batch although sft.assistant_only_loss is on: prompts "
            "are being trained on. The chat template's {% generation %} markers must enclose only assistant turns.")
    return {"tokens": real, "loss_tokens": trained}


def _sft_trainer_class():
    import trl

    class MaskCheckedSFTTrainer(trl.SFTTrainer):
        """SFTTrainer that checks the loss mask of every batch before computing the loss."""

        first_batch_mask: dict | None = None

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            counts = check_loss_mask(inputs, self.args.assistant_only_loss)
            if self.first_batch_mask is None and model.training:
                self.first_batch_mask = counts
                log.info("loss mask on first batch: %d of %d tokens carry loss", counts["loss_tokens"],
                         counts["tokens"])
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)

    return MaskCheckedSFTTrainer


def conversations(examples: list[dict]):
    from datasets import Dataset

    return Dataset.from_list([{"messages": [{"role": m["role"], "content": m["content"]} for m in ex["messages"]]}
                              for ex in examples])


def sft_arguments(cfg: PipelineConfig, out_dir: Path, has_eval: bool, packing: bool):
    import trl

    s = cfg.sft
    return trl.SFTConfig(
        output_dir=str(out_dir / "checkpoints"),
        max_steps=s.max_steps, num_train_epochs=s.num_train_epochs,
        per_device_train_batch_size=s.per_device_batch_size, per_device_eval_batch_size=s.per_device_batch_size,
        gradient_accumulation_steps=s.gradient_accumulation_steps, gradient_checkpointing=s.gradient_checkpointing,
        learning_rate=s.learning_rate, lr_scheduler_type=s.lr_scheduler_type, warmup_steps=s.warmup_steps,
        weight_decay=s.weight_decay, max_grad_norm=s.max_grad_norm,
        logging_steps=s.logging_steps, eval_strategy="steps" if has_eval else "no", eval_steps=s.eval_steps,
        eval_on_start=has_eval, save_strategy="steps", save_steps=s.save_steps, save_total_limit=s.save_total_limit,
        max_length=cfg.model.max_length, assistant_only_loss=s.assistant_only_loss, packing=packing,
        seed=s.seed, data_seed=s.seed, report_to=[], disable_tqdm=True, dataloader_num_workers=0,
        ddp_find_unused_parameters=False, log_level="warning", **trainer_precision(cfg),
    )


def lora_config(cfg: PipelineConfig):
    from peft import LoraConfig

    s = cfg.sft
    return LoraConfig(r=s.lora_r, lora_alpha=s.lora_alpha, lora_dropout=s.lora_dropout,
                      target_modules=s.target_modules, bias="none", task_type="CAUSAL_LM")


def build_trainer(cfg: PipelineConfig, base_path: str | Path, train_examples: list[dict], eval_examples: list[dict],
                  out_dir: str | Path, callbacks: list | tuple = ()):
    """A ready SFT trainer (tokenizer with pad token + chat template, 4-bit base when configured, LoRA)."""
    from transformers import PrinterCallback

    configure_threads()
    out_dir = Path(out_dir)
    if not train_examples:
        raise ValueError("SFT needs training examples: the training split is empty")
    tokenizer = load_tokenizer(base_path, cfg)
    model = load_model(base_path, cfg, quantize=True)
    packing = cfg.sft.packing
    if packing and not attention_keeps_packed_examples_apart(model):
        log.warning("sft.packing requested, but attention implementation %r would let packed examples attend to "
                    "each other; training unpacked (set model.attn_implementation=flash_attention_2 to pack)",
                    model.config._attn_implementation)
        packing = False
    elif packing:
        log.info("packing examples: %s keeps packed examples apart", model.config._attn_implementation)
    eval_examples = eval_examples[: cfg.sft.max_eval_examples]
    args = sft_arguments(cfg, out_dir, has_eval=bool(eval_examples), packing=packing)
    try:
        trainer = _sft_trainer_class()(
            model=model, args=args, train_dataset=conversations(train_examples),
            eval_dataset=conversations(eval_examples) if eval_examples else None,
            processing_class=tokenizer, peft_config=lora_config(cfg), callbacks=list(callbacks),
        )
    except ValueError as err:
        if "chat template" in str(err).lower():
            raise ValueError(f"{err}\nSet model.chat_template to a template with {{% generation %}} markers, or "
                             "sft.assistant_only_loss=false to train on whole conversations.") from err
        raise
    trainer.remove_callback(PrinterCallback)  # our reporter logs every row already
    if not use_cuda(cfg):
        upcast_trainable_params(trainer.model, compute_dtype(cfg))
    trainer.packing_used = packing
    return trainer


def train_sft(cfg: PipelineConfig, base_path: str | Path, train_examples: list[dict], eval_examples: list[dict],
              out_dir: str | Path, callbacks: list | tuple = ()) -> dict[str, Any]:
    """Train (or resume) one SFT run in this process; writes adapter/, metrics.jsonl and train.json under out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    reporter = TrainingReporter("sft", out_dir / "metrics.jsonl")
    trainer = build_trainer(cfg, base_path, train_examples, eval_examples, out_dir, [reporter, *callbacks])
    checkpoint, resumed_from = last_checkpoint(out_dir / "checkpoints")
    if checkpoint:
        log.info("resuming SFT from %s (step %d)", checkpoint, resumed_from)
        if trainer.is_world_process_zero():
            reporter.truncate_after(resumed_from)
    elif trainer.is_world_process_zero():
        (out_dir / "metrics.jsonl").unlink(missing_ok=True)
    output = trainer.train(resume_from_checkpoint=checkpoint)
    if trainer.eval_dataset is not None and trainer.state.global_step % cfg.sft.eval_steps != 0:
        trainer.evaluate()  # the validation loss at the final step
    adapter_dir = out_dir / "adapter"
    trainer.save_model(str(adapter_dir))  # adapter + tokenizer + chat template, main process only
    if not trainer.is_world_process_zero():
        return {}

    rows = read_curves(out_dir / "metrics.jsonl")
    losses, eval_losses = metric_series(rows, "loss"), metric_series(rows, "eval_loss")
    tokens = max([v for _, v in metric_series(rows, "num_tokens")] or [0])
    runtime = output.metrics.get("train_runtime") or (time.time() - started)
    stats = {
        "train_examples": len(train_examples), "eval_examples": len(trainer.eval_dataset or []),
        "steps": trainer.state.global_step, "resumed_from_step": resumed_from,
        "first_loss": losses[0][1] if losses else None, "last_loss": losses[-1][1] if losses else None,
        "first_eval_loss": eval_losses[0][1] if eval_losses else None,
        "last_eval_loss": eval_losses[-1][1] if eval_losses else None,
        "train_runtime_s": round(runtime, 2), "wall_s": round(time.time() - started, 2),
        "train_tokens": int(tokens), "tokens_per_s": round(tokens / runtime, 1) if runtime and tokens else None,
        "loss_mask_first_batch": trainer.first_batch_mask, "packing": trainer.packing_used,
        "quantization": cfg.model.quantization, "assistant_only_loss": cfg.sft.assistant_only_loss,
        "trainable_parameters": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        "world_size": trainer.args.world_size, "distributed_backend": distributed_backend(), "seed": cfg.sft.seed,
        "device": str(trainer.args.device),
        "versions": library_versions(),
    }
    (out_dir / "validation_sample.jsonl").write_text(
        "".join(json.dumps(ex, ensure_ascii=False) + "\n" for ex in eval_examples[:16]))
    adapter_sha = files_fingerprint(adapter_dir)
    run = {"adapter": str(adapter_dir.resolve()), "adapter_sha": adapter_sha, "stats": stats}
    (out_dir / "train.json").write_text(json.dumps(run, indent=2, default=str))
    shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)  # finished: the adapter is the artifact now
    return run


# ------------------------------------------------------------------------------------------------------ the stage
def _read_split(warehouse: str, split: str) -> list[dict]:
    from tasks.core.warehouse import open_warehouse, sft_examples

    with open_warehouse(warehouse, read_only=True) as con:
        return sft_examples(con, split)


def stage_key(cfg: PipelineConfig, base: dict, data: dict) -> str:
    """Where this run lives: a function of everything that determines its output (so reruns never clobber)."""
    return json_fingerprint({"base": base["fingerprint"], "data": data["fingerprint"], "model": cfg.model.model_dump(),
                             "sft": cfg.sft.model_dump(), "code": [training_code_hash(), _own_hash()]})


def _own_hash() -> str:
    from tasks.core.caching import source_hash

    return source_hash(stage_key)


def run_sft(cfg: PipelineConfig, base: dict, data: dict) -> dict:
    """The SFT stage: train on data's training split from base; returns paths, fingerprint and stats."""
    key = stage_key(cfg, base, data)
    out = StageOutput(cfg, "sft", key)
    if (done := out.finished()) is not None:  # finished earlier with these exact inputs: nothing to train
        return done
    out_dir, base_path = out.dir, storage.fetched(base["path"])
    train = _read_split(data["warehouse"], "train")[: cfg.sft.max_train_examples]
    valid = _read_split(data["warehouse"], "validation")
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    if cfg.sft.num_processes > 1:
        run = train_in_processes(cfg, cfg.sft, "tasks.training.sft", out_dir, train, valid, base_path=base_path)
    else:
        run = train_sft(cfg, base_path, train, valid, out_dir)
    stats = {**run["stats"], "wall_s": round(time.time() - started, 2)}
    result = {
        "stage": "sft", "fingerprint": json_fingerprint({"adapter": run["adapter_sha"], "base": base["fingerprint"]}),
        "adapter": out.url_of(run["adapter"]), "adapter_sha": run["adapter_sha"], "base": base["path"],
        "base_fingerprint": base["fingerprint"], "out_dir": out.url, "warehouse": data["warehouse"],
        "data_fingerprint": data["fingerprint"], "validation_sample": out.url_of(out_dir / "validation_sample.jsonl"),
        "stats": stats,
    }
    record_training_run(data["warehouse"], run_id=f"sft-{key}", stage="sft", fingerprint=result["fingerprint"],
                        base=base["path"], data_fingerprint=data["fingerprint"], output_dir=out.url, stats=stats,
                        config={"model": cfg.model.model_dump(), "sft": cfg.sft.model_dump()},
                        curves_path=out_dir / "metrics.jsonl")
    publish_markdown("sft-summary", summary_markdown("SFT", result), "SFT run summary")
    return out.finish(result)


def _sft_config(cfg: PipelineConfig) -> dict:
    return {"model": cfg.model.model_dump(), "sft": cfg.sft.model_dump(), "storage_root": cfg.storage_root,
            "code": training_code_hash()}


sft_task = stage_task("sft", _sft_config, retries=1, retry_condition_fn=retry_unless_deterministic)(run_sft)


def main(argv: list[str] | None = None) -> None:
    """Entry point of every launched process (accelerate launch / torchrun)."""
    job, cfg = launched_job(argv, __doc__.splitlines()[0])
    train_sft(cfg, job["base_path"], read_jsonl(job["train"]), read_jsonl(job["validation"]), job["out_dir"])


if __name__ == "__main__":
    main()
