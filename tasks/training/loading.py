"""Loading a base model for training: device and dtype, tokenizer and chat template, 4-bit quantisation.

Chat template: the config's override, else the tokenizer's own, else DEFAULT_CHAT_TEMPLATE (ChatML-style). The same
template is saved next to every adapter and merged model, so training and serving format prompts identically.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
from pathlib import Path
from typing import Any

import torch

from tasks.core.config import PipelineConfig
from tasks.data import chat_template
from tasks.data.chat_template import DEFAULT_CHAT_TEMPLATE  # ChatML-style, with tools; the clean stage checks it too

log = logging.getLogger("sftpipe.train")


def library_versions() -> dict[str, str]:
    import accelerate  # noqa: E401
    import bitsandbytes
    import datasets
    import peft
    import tokenizers
    import transformers
    import trl

    mods = dict(torch=torch, transformers=transformers, peft=peft, trl=trl, accelerate=accelerate,
                bitsandbytes=bitsandbytes, datasets=datasets, tokenizers=tokenizers)
    out = {name: getattr(m, "__version__", "?") for name, m in mods.items()}
    out["python"] = platform.python_version()
    return out



# Modules every training stage runs through: their code is part of every training stage's cache key.
SHARED_TRAINING_MODULES = ("loading.py", "launch.py", "tracking.py", "outputs.py", "trainer.py",
                           "distributed.py")


def training_code_hash() -> str:
    """Hash of the shared training modules and of how conversations are rendered (the default chat template and the
    canonical-to-template conversion); each stage's own module hash is added by caching."""
    h = hashlib.sha256()
    for name in SHARED_TRAINING_MODULES:
        h.update(name.encode() + b"\0" + (Path(__file__).parent / name).read_bytes())
    h.update(Path(chat_template.__file__).read_bytes())
    return h.hexdigest()[:16]


# ------------------------------------------------------------------------------------------------------ devices
def use_cuda(cfg: PipelineConfig) -> bool:
    if cfg.model.device == "cpu":
        return False
    if cfg.model.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("model.device=cuda but no CUDA device is visible")
    return torch.cuda.is_available()


def compute_dtype(cfg: PipelineConfig) -> torch.dtype:
    if cfg.model.compute_dtype != "auto":
        return getattr(torch, cfg.model.compute_dtype)
    # bf16 is 4-6x slower than fp32 on CPU: only use it where the hardware has it.
    return torch.bfloat16 if use_cuda(cfg) and torch.cuda.is_bf16_supported() else torch.float32


def trainer_precision(cfg: PipelineConfig) -> dict[str, Any]:
    """TrainingArguments for the device: trl defaults to bf16, which on CPU is slow (and refused without use_cpu)."""
    dtype = compute_dtype(cfg)
    cuda = use_cuda(cfg)
    return {"use_cpu": not cuda, "bf16": cuda and dtype == torch.bfloat16, "fp16": cuda and dtype == torch.float16}


def configure_threads() -> None:
    # One torch thread is ~3.6x faster than two for these small models on a shared 2-core box; honour the env.
    n = os.environ.get("OMP_NUM_THREADS")
    if n and n.isdigit():
        torch.set_num_threads(int(n))


# --------------------------------------------------------------------------------------- tokenizer & chat template
def ensure_pad_token(tokenizer) -> None:
    if tokenizer.pad_token is None:
        # unk is never a training target, so padding with it cannot be confused with a learned end of text.
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
        log.info("tokenizer has no pad token; using %r", tokenizer.pad_token)


def ensure_chat_template(tokenizer, override: str | None = None) -> str:
    """Install the chat template; returns where it came from: config, tokenizer or default."""
    if override:
        tokenizer.chat_template = override
        return "config"
    if tokenizer.chat_template:
        return "tokenizer"
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    log.info("tokenizer has no chat template; installed the ChatML-style default")
    return "default"


def load_tokenizer(path: str | Path, cfg: PipelineConfig):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=cfg.model.trust_remote_code)
    ensure_pad_token(tokenizer)
    ensure_chat_template(tokenizer, cfg.model.chat_template)
    return tokenizer


def quantization_config(cfg: PipelineConfig, shardable: bool = False):
    """bitsandbytes 4-bit settings; `shardable` stores the packed 4-bit values in the compute dtype instead of uint8,
    so FSDP can shard them (the values and the quantisation are the same either way)."""
    if cfg.model.quantization != "4bit":
        return None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=cfg.model.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=cfg.model.bnb_4bit_use_double_quant,
        bnb_4bit_compute_dtype=compute_dtype(cfg),
        bnb_4bit_quant_storage=compute_dtype(cfg) if shardable else torch.uint8,
    )


def load_model(path: str | Path, cfg: PipelineConfig, quantize: bool = True, dtype: torch.dtype | None = None,
               sharded: bool = False):
    """The base causal LM: 4-bit when quantize and model.quantization=4bit (QLoRA), else in `dtype`.

    `sharded` (FSDP training): 4-bit weights in a shardable storage dtype, and loaded into host memory rather than
    onto this process's GPU; FSDP moves only this process's shard of each layer there."""
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"trust_remote_code": cfg.model.trust_remote_code,
                              "dtype": dtype or compute_dtype(cfg)}
    if cfg.model.attn_implementation:
        kwargs["attn_implementation"] = cfg.model.attn_implementation
    qcfg = quantization_config(cfg, shardable=sharded) if quantize else None
    if qcfg is not None:
        kwargs["quantization_config"] = qcfg
        if use_cuda(cfg) and not sharded:
            kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", 0))}
    model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    if qcfg is not None and not use_cuda(cfg):
        # bitsandbytes' CPU inference fast path repacks 4-bit weights in place in eval mode and asserts
        # out_features % 32 == 0 (stories260K's MLP has 172); keep eval on the same kernel as training.
        for module in model.modules():
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False
    return model


def attention_keeps_packed_examples_apart(model) -> bool:
    impl = str(getattr(model.config, "_attn_implementation", "") or "")
    return "flash" in impl


def upcast_trainable_params(model, dtype: torch.dtype, exact: dict[str, torch.Tensor] | None = None) -> int:
    """trl casts QLoRA adapter weights to bf16; on CPU that is ~3x slower, so put them back in the compute dtype.

    `exact` (name -> tensor snapshot taken before the trainer was built) restores the values bit for bit: a trained
    adapter rounded through bf16 would no longer equal its own reference copy at DPO step 0.
    """
    n = 0
    for name, p in model.named_parameters():
        if p.requires_grad and p.dtype != dtype:
            p.data = exact[name].to(p.device, dtype) if exact and name in exact else p.data.to(dtype)
            n += 1
    return n


def snapshot_trainable_params(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}

