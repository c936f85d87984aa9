"""How several training processes share a model: replicated (DDP) or sharded (FSDP2), for every adapter method.

- ddp: every process holds the whole base and the adapter; gradients are all-reduced. Fastest when the model fits.
- fsdp: accelerate's FSDP plugin (fsdp_version 2, `torch.distributed.fsdp.fully_shard`) shards every decoder layer,
  the embeddings and the head over the processes, so each holds about 1/N of the base, the adapter, its gradients and
  optimizer state. QLoRA shards too: the 4-bit weights are stored in the compute dtype (`bnb_4bit_quant_storage`),
  which FSDP can split (uint8 storage cannot become a DTensor, and accelerate would leave those weights whole).
  Activation checkpointing is FSDP's own (the settings' gradient_checkpointing); CPU offload on GPUs only.
- Checkpoints are DCP shards of the adapter and optimizer (`SHARDED_STATE_DICT`), so a killed run resumes on the same
  number of processes; the final adapter is gathered to the main process and saved as a normal peft adapter.

accelerate only turns its FSDP plugin on for GPU-like devices; on CPU (gloo) `allow_fsdp_on_cpu` switches the
trainer's accelerator to it, which is how the two-process tests exercise the same code path without a GPU.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from tasks.core.config import PipelineConfig
from tasks.training.loading import use_cuda

log = logging.getLogger("sftpipe.train")


def fsdp_enabled(settings) -> bool:
    return settings.distributed == "fsdp"


def needs_launcher(settings) -> bool:
    """Several processes, or FSDP on one (it needs a process group; with fsdp_cpu_offload a single GPU then trains a
    model larger than its memory)."""
    return settings.num_processes > 1 or fsdp_enabled(settings)


def distributed_arguments(cfg: PipelineConfig, settings) -> dict[str, Any]:
    """trl / TrainingArguments fields for the settings' `distributed` mode (none for ddp: that is the default)."""
    if not fsdp_enabled(settings):
        return {}
    offload = settings.fsdp_cpu_offload and use_cuda(cfg)
    if settings.fsdp_cpu_offload and not offload:
        log.info("fsdp_cpu_offload ignored: training on CPU, the shards are in host memory already")
    return {
        "fsdp": True,
        "gradient_checkpointing": False,  # FSDP's activation checkpointing instead (no redundant all-gather)
        "fsdp_config": {
            "version": 2,
            # Wraps the model's `_no_split_modules` (LlamaDecoderLayer, Qwen2DecoderLayer, ...): one unit per layer.
            "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "state_dict_type": "SHARDED_STATE_DICT",
            "reshard_after_forward": True,
            "activation_checkpointing": settings.gradient_checkpointing,
            "cpu_offload": offload,
        },
    }


def distributed_mode(trainer) -> str:
    if trainer.is_fsdp_enabled:
        return "fsdp"
    return "ddp" if trainer.args.world_size > 1 else "single"


def allow_fsdp_on_cpu(trainer) -> None:
    """accelerate builds its FSDP plugin but keeps gloo processes in MULTI_CPU mode; switch them to FSDP."""
    plugin_args = getattr(trainer.args, "fsdp_plugin_args", None)
    if plugin_args is None or trainer.is_fsdp_enabled:
        return
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = trainer.accelerator.state
    if state.distributed_type != DistributedType.MULTI_CPU:
        raise RuntimeError(f"FSDP was requested but accelerate runs in {state.distributed_type} mode")
    state.distributed_type = DistributedType.FSDP
    state.fsdp_plugin = FullyShardedDataParallelPlugin(**plugin_args)
    trainer.is_fsdp_enabled = True


def save_adapter_weights(trainer, adapter_dir: Path, adapters: list[str] | None = None) -> None:
    """The trained adapter as a normal peft folder. Under FSDP its shards are gathered to the main process first
    (trainable parameters only: the frozen base is never gathered)."""
    model, main = trainer.model, trainer.is_world_process_zero()
    state_dict = None
    if trainer.is_fsdp_enabled:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state_dict = get_model_state_dict(model, options=StateDictOptions(
            full_state_dict=True, cpu_offload=True, ignore_frozen_params=True))
    if main:
        model.save_pretrained(str(adapter_dir), state_dict=state_dict, selected_adapters=adapters)


class ParameterShareReport(TrainerCallback):
    """Each process writes how much of the model it holds (local shard vs whole) to <folder>/rank-<r>.json when
    training starts, after the trainer has wrapped or sharded the model. 4-bit weights count their storage elements."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            return
        counts = {"base_local": 0, "base_total": 0, "adapter_local": 0, "adapter_total": 0, "local_bytes": 0}
        for param in model.parameters():
            kind = "adapter" if param.requires_grad else "base"
            local = param.to_local() if hasattr(param, "to_local") else param
            counts[f"{kind}_local"] += local.numel()
            counts[f"{kind}_total"] += param.numel()
            counts["local_bytes"] += local.numel() * local.element_size()
        from torch.distributed.fsdp import FSDPModule

        # Units FSDP gathers one at a time (a decoder layer each, the embeddings and head, the root): the most one
        # process ever holds unsharded is the largest of them.
        counts["fsdp_units"] = [type(m).__name__.removeprefix("FSDP") for m in model.modules()
                                if isinstance(m, FSDPModule)]
        rank = int(os.environ.get("RANK", 0))
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / f"rank-{rank}.json").write_text(json.dumps({"rank": rank, **counts}))

    def read(self) -> list[dict]:
        """Every process's counts (call after training: all processes have written theirs by then)."""
        return [json.loads(p.read_text()) for p in sorted(self.folder.glob("rank-*.json"))]
