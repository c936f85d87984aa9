"""SFT: (Q)LoRA supervised fine-tuning with trl's SFTTrainer on the warehouse's training split.

What is SFT's own; the shared path (resume, train, final eval, save, curves, training_runs row, multi-process launch)
is tasks/training/trainer.py.

- QLoRA: the base is loaded in 4-bit NF4 with double quantisation (model.quantization); LoRA adapters on all linear
  layers train in the compute dtype (trl's bf16 cast of the adapters is undone on CPU, where bf16 is ~3x slower).
- Loss on assistant tokens only (sft.assistant_only_loss), via the chat template's generation markers; every batch is
  checked: a loss mask covering no tokens, or every token, raises LossMaskError instead of training silently wrong.

    python -m tasks.training.sft --job runs/models/sft/<key>/job.json      # what the launcher runs in every process
"""

from __future__ import annotations

import logging
from pathlib import Path

from tasks.core.config import PipelineConfig
from tasks.core.results import DataResult, ModelResult
from tasks.data.chat_template import chat_inputs
from tasks.training.distributed import fsdp_enabled
from tasks.training.loading import (
    attention_keeps_packed_examples_apart,
    configure_threads,
    load_model,
    load_tokenizer,
)
from tasks.training.trainer import (
    AdapterMethod,
    TrainingJob,
    adapter_stage_task,
    finish_trainer,
    launched_main,
    run_adapter_stage,
    trainer_arguments,
)
from tasks.training.trainer import stage_key as adapter_stage_key

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
        assistant_only: bool = True

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            counts = check_loss_mask(inputs, self.assistant_only)
            if self.first_batch_mask is None and model.training:
                self.first_batch_mask = counts
                log.info("loss mask on first batch: %d of %d tokens carry loss", counts["loss_tokens"],
                         counts["tokens"])
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)

    return MaskCheckedSFTTrainer


def conversations(examples: list[dict], tokenizer, assistant_only: bool):
    """The examples tokenised as trl would do it (apply_chat_template with the row's tools; the assistant mask from
    the template's {% generation %} markers), but here: tool-call arguments must reach the template as JSON objects,
    and a datasets column of them would merge every row's argument keys into one struct full of NULLs."""
    from datasets import Dataset

    rows = []
    for ex in examples:
        enc = tokenizer.apply_chat_template(**chat_inputs(ex["messages"], ex.get("tools")), tokenize=True,
                                            return_dict=True, return_assistant_tokens_mask=assistant_only)
        row = {"input_ids": list(enc["input_ids"])}
        if assistant_only:
            row["assistant_masks"] = list(enc["assistant_masks"])
            if 1 not in row["assistant_masks"]:
                raise ValueError(f"sft.assistant_only_loss: the chat template marks no assistant token of example "
                                 f"{ex.get('example_id')!r} (no {{% generation %}} markers around assistant turns)")
        rows.append(row)
    return Dataset.from_list(rows)


def lora_config(cfg: PipelineConfig):
    from peft import LoraConfig

    s = cfg.sft
    return LoraConfig(r=s.lora_r, lora_alpha=s.lora_alpha, lora_dropout=s.lora_dropout,
                      target_modules=s.target_modules, bias="none", task_type="CAUSAL_LM")


def build_trainer(cfg: PipelineConfig, base_path: str | Path, train_examples: list[dict], eval_examples: list[dict],
                  out_dir: str | Path, callbacks: list | tuple = ()):
    """A ready SFT trainer (tokenizer with pad token + chat template, 4-bit base when configured, LoRA)."""
    import trl

    configure_threads()
    if not train_examples:
        raise ValueError("SFT needs training examples: the training split is empty")
    tokenizer = load_tokenizer(base_path, cfg)
    model = load_model(base_path, cfg, quantize=True, sharded=fsdp_enabled(cfg.sft))
    packing = cfg.sft.packing
    if packing and not attention_keeps_packed_examples_apart(model):
        log.warning("sft.packing requested, but attention implementation %r would let packed examples attend to "
                    "each other; training unpacked (set model.attn_implementation=flash_attention_2 to pack)",
                    model.config._attn_implementation)
        packing = False
    elif packing:
        log.info("packing examples: %s keeps packed examples apart", model.config._attn_implementation)
    eval_examples = eval_examples[: cfg.sft.max_eval_examples]
    # The examples arrive tokenised with their assistant mask (see conversations), from which trl builds the labels;
    # trl's own assistant_only_loss switch is for datasets it tokenises itself.
    args = trainer_arguments(trl.SFTConfig, cfg, cfg.sft, out_dir, has_eval=bool(eval_examples),
                             assistant_only_loss=False, packing=packing)
    assistant_only = cfg.sft.assistant_only_loss
    try:
        trainer = _sft_trainer_class()(
            model=model, args=args, train_dataset=conversations(train_examples, tokenizer, assistant_only),
            eval_dataset=conversations(eval_examples, tokenizer, assistant_only) if eval_examples else None,
            processing_class=tokenizer, peft_config=lora_config(cfg), callbacks=list(callbacks),
        )
    except ValueError as err:
        if "chat template" in str(err).lower():
            raise ValueError(f"{err}\nSet model.chat_template to a template with {{% generation %}} markers, or "
                             "sft.assistant_only_loss=false to train on whole conversations.") from err
        raise
    trainer.assistant_only = assistant_only
    trainer.packing_used = packing
    return finish_trainer(cfg, trainer)


def _stats(cfg: PipelineConfig, trainer, job: TrainingJob, curves: list[dict]) -> dict:
    return {"train_examples": len(job.train), "eval_examples": len(trainer.eval_dataset or []),
            "loss_mask_first_batch": trainer.first_batch_mask, "packing": trainer.packing_used,
            "assistant_only_loss": cfg.sft.assistant_only_loss}


def _read_split(warehouse: str, split: str) -> list[dict]:
    from tasks.core.warehouse import open_warehouse, sft_examples

    with open_warehouse(warehouse, read_only=True) as con:
        return sft_examples(con, split)


SFT = AdapterMethod(
    name="sft", title="SFT", module="tasks.training.sft",
    read_rows=_read_split, stats=_stats, continues_adapter=False,
    build=lambda cfg, job, callbacks: build_trainer(cfg, job.base_path, job.train, job.validation, job.out_dir,
                                                    callbacks),
)


def stage_key(cfg: PipelineConfig, base: ModelResult, data: DataResult) -> str:
    return adapter_stage_key(SFT, cfg, base, data)


def run_sft(cfg: PipelineConfig, base: ModelResult, data: DataResult) -> ModelResult:
    """The SFT stage: train on data's training split from base; returns paths, fingerprint and stats."""
    return run_adapter_stage(SFT, cfg, base, data)


sft_task = adapter_stage_task(SFT, run_sft)

if __name__ == "__main__":
    launched_main(SFT)
