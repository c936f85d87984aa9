"""Base models, tokenizers and chat templates, plus what the training stages (sft, dpo, merge) share.

`model.base` is any Hugging Face id or local path, loaded with the Auto classes (safetensors preferred,
`trust_remote_code` only when the config turns it on). `embedded` builds a tiny Llama here, offline: a byte-level
BPE tokenizer trained on the training split with `tokenizers`, a small LlamaConfig and a short causal-LM warm-up, so
a fresh clone runs the whole pipeline without a hub.

Chat template: the config's override, else the tokenizer's own, else DEFAULT_CHAT_TEMPLATE (ChatML-style). The same
template is saved next to every adapter and merged model, so training and serving format prompts identically.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from tasks import storage
from tasks.caching import source_hash, stage_task
from tasks.config import PipelineConfig

log = logging.getLogger("sftpipe.train")

# ChatML-style default for tokenizers without a template. Assistant content, its end marker and EOS sit inside
# {% generation %} so `return_assistant_tokens_mask` (trl's assistant_only_loss) selects exactly what the model must
# produce, including how to stop. The markers are plain text: no tokens are added, so no embedding resize is needed.
DEFAULT_CHAT_TEMPLATE = """\
{%- if bos_token %}{{- bos_token }}{%- endif %}
{%- for message in messages %}
    {%- if message['role'] == 'assistant' %}
        {{- '<|im_start|>assistant\n' }}
        {%- generation %}{{- message['content'] + '<|im_end|>' + (eos_token or '') }}{%- endgeneration %}
        {{- '\n' }}
    {%- else %}
        {{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}
"""

EMBEDDED_SPECIAL_TOKENS = ["<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]


# --------------------------------------------------------------------------------------------- hashing & metadata
def sha256_bytes(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode() if isinstance(p, str) else p)
        h.update(b"\0")
    return h.hexdigest()


def json_fingerprint(value: Any) -> str:
    return sha256_bytes(json.dumps(value, sort_keys=True, default=str, ensure_ascii=False))[:16]


def files_fingerprint(folder: str | Path, patterns: tuple[str, ...] = ("*.safetensors", "*.json", "*.jinja")) -> str:
    """Content hash of the files a stage wrote (weights, configs, tokenizer, template)."""
    folder = Path(folder)
    h = hashlib.sha256()
    for path in sorted({p for pat in patterns for p in folder.glob(pat)}):
        h.update(path.name.encode() + b"\0")
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


def library_versions() -> dict[str, str]:
    import accelerate, bitsandbytes, datasets, peft, tokenizers, transformers, trl  # noqa: E401

    mods = dict(torch=torch, transformers=transformers, peft=peft, trl=trl, accelerate=accelerate,
                bitsandbytes=bitsandbytes, datasets=datasets, tokenizers=tokenizers)
    out = {name: getattr(m, "__version__", "?") for name, m in mods.items()}
    out["python"] = platform.python_version()
    return out


def training_code_hash() -> str:
    """This module's hash: the training stages' cache keys include it (their own module hash is added by caching)."""
    return source_hash(sha256_bytes)


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


def quantization_config(cfg: PipelineConfig):
    if cfg.model.quantization != "4bit":
        return None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=cfg.model.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=cfg.model.bnb_4bit_use_double_quant,
        bnb_4bit_compute_dtype=compute_dtype(cfg),
    )


def load_model(path: str | Path, cfg: PipelineConfig, quantize: bool = True, dtype: torch.dtype | None = None):
    """The base causal LM: 4-bit when quantize and model.quantization=4bit (QLoRA), else in `dtype`."""
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"trust_remote_code": cfg.model.trust_remote_code,
                              "dtype": dtype or compute_dtype(cfg)}
    if cfg.model.attn_implementation:
        kwargs["attn_implementation"] = cfg.model.attn_implementation
    qcfg = quantization_config(cfg) if quantize else None
    if qcfg is not None:
        kwargs["quantization_config"] = qcfg
        if use_cuda(cfg):
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


# --------------------------------------------------------------------------------------------- embedded base
def _render_texts(examples: list[dict]) -> list[str]:
    return [m["content"] for ex in examples for m in ex["messages"] if m.get("content")]


def build_embedded_base(cfg: PipelineConfig, train_examples: list[dict], out_dir: str | Path) -> dict:
    """Train a byte-level BPE tokenizer on the training texts, build a tiny Llama and warm it up as a causal LM.

    Writes a Hugging Face model folder (safetensors, tokenizer, chat template) to out_dir and returns
    {"stage": "base", "fingerprint", "path", "stats"}. Reuses out_dir when a previous build completed there.
    """
    from datasets import Dataset
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (DataCollatorForLanguageModeling, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast,
                              PrinterCallback, Trainer, TrainingArguments, set_seed)

    out_dir = Path(out_dir)
    done = out_dir / "base.json"
    if done.exists():
        return json.loads(done.read_text())
    if not train_examples:
        raise ValueError("the embedded base needs training examples: the training split is empty")
    configure_threads()
    started = time.time()
    m = cfg.model
    set_seed(m.embedded_seed)

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe_trainer = trainers.BpeTrainer(vocab_size=m.embedded_vocab_size, special_tokens=EMBEDDED_SPECIAL_TOKENS,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(_render_texts(train_examples), trainer=bpe_trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"], model_max_length=m.max_length,
    )
    ensure_chat_template(tokenizer, m.chat_template)

    hidden = m.embedded_hidden_size
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=64 * math.ceil(hidden * 8 / 3 / 64),
        num_hidden_layers=m.embedded_layers, num_attention_heads=m.embedded_heads,
        num_key_value_heads=m.embedded_heads, max_position_embeddings=m.max_length, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)

    # Warm-up on the conversations as the chat template renders them: the base learns the text and the format.
    texts = [tokenizer.apply_chat_template(ex["messages"], tokenize=False) for ex in train_examples]
    enc = tokenizer(texts, add_special_tokens=False, truncation=True, max_length=m.embedded_warmup_max_length)
    dataset = Dataset.from_dict({"input_ids": enc["input_ids"]})
    work = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(work, ignore_errors=True)
    curves = work / "metrics.jsonl"
    reporter = TrainingReporter("base", curves, total_steps=m.embedded_warmup_steps)
    args = TrainingArguments(
        output_dir=str(work / "trainer"), max_steps=max(m.embedded_warmup_steps, 1), per_device_train_batch_size=16,
        learning_rate=m.embedded_warmup_lr, lr_scheduler_type="cosine", warmup_steps=0.1, weight_decay=0.01,
        logging_steps=max(1, m.embedded_warmup_steps // 10), save_strategy="no", eval_strategy="no",
        report_to=[], disable_tqdm=True, seed=m.embedded_seed, dataloader_num_workers=0, use_cpu=not use_cuda(cfg),
        include_num_input_tokens_seen="non_padding",
    )
    warmup_loss: dict[str, float] = {}
    if m.embedded_warmup_steps > 0:
        trainer = Trainer(model=model, args=args, train_dataset=dataset,
                          data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
                          callbacks=[reporter])
        trainer.remove_callback(PrinterCallback)
        trainer.train()
        losses = [r["value"] for r in reporter.rows if r["metric"] == "loss"]
        warmup_loss = {"first": losses[0], "last": losses[-1]} if losses else {}

    model.save_pretrained(work, safe_serialization=True)
    tokenizer.save_pretrained(work)
    shutil.rmtree(work / "trainer", ignore_errors=True)
    stats = {
        "kind": "embedded", "parameters": sum(p.numel() for p in model.parameters()), "vocab_size": len(tokenizer),
        "train_examples": len(train_examples), "warmup_steps": m.embedded_warmup_steps, "warmup_loss": warmup_loss,
        "wall_s": round(time.time() - started, 2), "tokens_per_s": reporter.tokens_per_s,
    }
    result = {"stage": "base", "fingerprint": files_fingerprint(work), "path": str(out_dir.resolve()),
              "stats": stats}
    (work / "base.json").write_text(json.dumps(result, indent=2))
    shutil.rmtree(out_dir, ignore_errors=True)
    work.rename(out_dir)  # atomic: a half-written base is never mistaken for a finished one
    log.info("embedded base: %s parameters, warm-up loss %s, %.1f s", stats["parameters"], warmup_loss,
             stats["wall_s"])
    return result


def pretrained_fingerprint(base: str) -> str:
    """Identity of a base given by path (config + weight files' names, sizes, mtimes) or by hub id."""
    if not storage.is_local(base):  # a model folder in a bucket
        return json_fingerprint({"url": base, "listing": storage.folder_fingerprint(base)})
    path = Path(base)
    if not path.exists():
        return json_fingerprint({"hub_id": base})
    parts = []
    for p in sorted(path.iterdir()):
        if p.is_file():
            st = p.stat()
            parts.append([p.name, st.st_size, st.st_mtime_ns])
    return json_fingerprint({"files": parts, "config": (path / "config.json").read_text()
                             if (path / "config.json").exists() else ""})


def resolve_base(cfg: PipelineConfig, data: dict | None = None) -> dict:
    """The base model to train: cfg.model.base, or the embedded tiny Llama built from data's training split."""
    if cfg.model.base != "embedded":
        return {"stage": "base", "fingerprint": pretrained_fingerprint(cfg.model.base), "path": cfg.model.base,
                "stats": {"kind": "pretrained"}}
    if data is None:
        raise ValueError("model.base=embedded needs the data stage's result to train its tokenizer and warm-up")
    from tasks.warehouse import open_warehouse, sft_examples

    with open_warehouse(data["warehouse"], read_only=True) as con:
        train = sft_examples(con, "train")
    key = json_fingerprint({"data": data["fingerprint"], "model": cfg.model.model_dump(), "code": training_code_hash()})
    out = StageOutput(cfg, "base", key)
    if (done := out.finished()) is not None:
        return done
    result = build_embedded_base(cfg, train, out.dir)
    curves = Path(result["path"]) / "metrics.jsonl"
    result["path"] = out.url
    record_training_run(data["warehouse"], run_id=f"base-{key}", stage="base", fingerprint=result["fingerprint"],
                        base=out.url, data_fingerprint=data["fingerprint"], output_dir=out.url,
                        stats=result["stats"], config=cfg.model.model_dump(), curves_path=curves)
    return out.finish(result)


class StageOutput:
    """A training stage's output folder: named by its URL under the storage root, written in this machine's local
    copy of it, published (uploaded when the root is remote) once complete. Published folders are never rewritten,
    so a finished stage's result is read back instead of training again."""

    def __init__(self, cfg: PipelineConfig, kind: str, key: str):
        self.url = cfg.url("models", kind, key)
        self.dir = storage.local_path(self.url)

    def finished(self) -> dict | None:
        if not storage.is_published(self.url):
            return None
        return json.loads(storage.read_text(storage.join(self.url, "result.json")))

    def url_of(self, local: str | Path) -> str:
        """The URL a file or folder written under self.dir will have."""
        return storage.join(self.url, Path(local).resolve().relative_to(self.dir.resolve()).as_posix())

    def finish(self, result: dict) -> dict:
        (self.dir / "result.json").write_text(json.dumps(result, indent=2, default=str))
        storage.publish(self.url)
        return result


# ------------------------------------------------------------------------------------- progress, curves, artifacts
def in_prefect_run() -> bool:
    try:
        from prefect.context import get_run_context

        get_run_context()
        return True
    except Exception:  # MissingContextError outside a flow/task run
        return False


def publish_markdown(key: str, markdown: str, description: str) -> None:
    """A Prefect markdown artifact when running inside Prefect; always logged."""
    log.info("%s\n%s", description, markdown)
    if not in_prefect_run():
        return
    try:
        from prefect.artifacts import create_markdown_artifact

        create_markdown_artifact(markdown=markdown, key=key, description=description)
    except Exception as err:  # the UI is a view: never fail a training stage because it is unreachable
        log.warning("could not publish artifact %s: %s", key, err)


def distributed_backend() -> str | None:
    import torch.distributed as dist

    return dist.get_backend() if dist.is_available() and dist.is_initialized() else None


def retry_unless_deterministic(task, task_run, state) -> bool:
    """Prefect retry condition: retry crashes and kills (the retry resumes from the last checkpoint), but not errors
    that would only repeat (bad config, bad data, a degenerate loss mask)."""
    try:
        state.result()
    except (ValueError, TypeError, KeyError) as err:
        log.error("not retrying %s: %s", task.name, err)
        return False
    except Exception:
        return True
    return True


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


class TrainingReporter(TrainerCallback):
    """Every log/eval row of a run -> metrics.jsonl (loaded into DuckDB at the end), the log, and Prefect progress.

    Rows are (step, metric, value); tokens_per_s is derived between consecutive logs from trl's num_tokens (or the
    trainer's own token count). Appends, so a resumed run continues the file it was killed in.
    """

    def __init__(self, stage: str, path: Path, total_steps: int | None = None):
        self.stage, self.path, self.total_steps = stage, Path(path), total_steps
        self.rows: list[dict] = []
        self.tokens_per_s: float | None = None
        self._artifact = None
        self._last = None  # (time, tokens) at the previous training log
        self._train_started = None
        self._train_tokens = 0

    def truncate_after(self, step: int) -> None:
        """Drop rows logged after `step` (by a killed attempt, past the checkpoint it resumes from)."""
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line)["step"] <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def on_train_begin(self, args, state, control, **kwargs):
        self.total_steps = state.max_steps or self.total_steps
        self._train_started = time.time()
        self._last = (time.time(), None)
        if _is_main_process() and in_prefect_run():
            try:
                from prefect.artifacts import create_progress_artifact

                self._artifact = create_progress_artifact(
                    progress=100.0 * state.global_step / max(self.total_steps or 1, 1),
                    key=f"{self.stage}-progress", description=f"{self.stage} training progress")
            except Exception as err:
                log.warning("no progress artifact: %s", err)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or not _is_main_process():
            return
        now = time.time()
        step = int(state.global_step)
        values = {k: float(v) for k, v in logs.items() if isinstance(v, (int, float)) and math.isfinite(float(v))
                  and k not in ("epoch", "total_flos")}
        values = _name_eval_dataset(values)
        tokens = values.get("num_tokens") or values.get("num_input_tokens_seen")
        if "loss" in values and tokens:
            last_t, last_tokens = self._last
            if last_tokens is not None and tokens > last_tokens and now > last_t:
                values["tokens_per_s"] = (tokens - last_tokens) / (now - last_t)
            self._last = (now, tokens)
            self._train_tokens = int(tokens)
        rows = [{"step": step, "epoch": float(state.epoch or 0), "metric": k, "value": v, "time": now}
                for k, v in values.items()]
        self.rows += rows
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        shown = ", ".join(f"{k}={v:.4g}" for k, v in values.items() if k in SHOWN_METRICS)
        log.info("%s step %d/%s %s", self.stage, step, self.total_steps, shown)
        if self._artifact is not None:
            try:
                from prefect.artifacts import update_progress_artifact

                update_progress_artifact(self._artifact, progress=100.0 * step / max(self.total_steps or 1, 1))
            except Exception as err:
                log.warning("progress artifact update failed: %s", err)

    def on_train_end(self, args, state, control, **kwargs):
        if self._train_started and self._train_tokens:
            self.tokens_per_s = round(self._train_tokens / max(time.time() - self._train_started, 1e-9), 1)


def _name_eval_dataset(values: dict[str, float]) -> dict[str, float]:
    """With several eval datasets, trl logs its own metrics as eval_<metric> for each; name the dataset in them."""
    named = [k[len("eval_"):-len("_loss")] for k in values if k.startswith("eval_") and k.endswith("_loss")
             and k != "eval_loss"]
    if len(named) != 1:
        return values
    prefix = f"eval_{named[0]}_"
    return {(prefix + k[len("eval_"):] if k.startswith("eval_") and not k.startswith(prefix) else k): v
            for k, v in values.items()}


SHOWN_METRICS = {"loss", "eval_loss", "learning_rate", "grad_norm", "tokens_per_s", "rewards/accuracies",
                 "rewards/margins", "eval_validation_rewards/accuracies", "eval_validation_rewards/margins",
                 "eval_train_probe_rewards/accuracies", "eval_train_probe_rewards/margins"}


def read_curves(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def record_training_run(warehouse: str | Path | None, *, run_id: str, stage: str, fingerprint: str, base: str,
                        data_fingerprint: str, output_dir: str, stats: dict, config: dict,
                        curves_path: str | Path) -> None:
    """One short write transaction at the end of a stage: the run row and all its curve rows (idempotent)."""
    if not warehouse:
        return
    from tasks.warehouse import open_warehouse, utcnow

    rows = read_curves(curves_path)
    with open_warehouse(warehouse) as con:
        con.execute("BEGIN TRANSACTION")
        con.execute("DELETE FROM training_curves WHERE run_id = ?", [run_id])
        con.execute("DELETE FROM training_runs WHERE run_id = ?", [run_id])
        con.execute(
            "INSERT INTO training_runs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [run_id, stage, fingerprint, base, data_fingerprint, output_dir, utcnow(), stats.get("wall_s"),
             stats.get("tokens_per_s"), stats.get("resumed_from_step"), json.dumps(stats, default=str),
             json.dumps(config, default=str), json.dumps(stats.get("versions") or library_versions())],
        )
        if rows:
            con.executemany(
                "INSERT INTO training_curves VALUES (?, ?, ?, ?, ?, ?, to_timestamp(?))",
                [[run_id, stage, r["step"], r.get("epoch"), r["metric"], r["value"], r["time"]] for r in rows],
            )
        con.execute("COMMIT")


# ------------------------------------------------------------------------------------- multi-process launching
def launch_command(launcher: str, num_processes: int, module: str, job: Path) -> list[str]:
    """`accelerate launch --multi_gpu` or `torchrun` over N processes (gloo on CPU, nccl on GPUs)."""
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                str(num_processes), "-m", module, "--job", str(job)]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
            str(num_processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "-m", module, "--job", str(job)]


def run_launched(cmd: list[str], log_path: Path) -> None:
    import subprocess

    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                           os.environ.get("PYTHONPATH", "")]))
    log.info("launching: %s", " ".join(cmd))
    with log_path.open("a") as out:
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-40:])
        raise RuntimeError(f"launched training exited with {proc.returncode}; last lines of {log_path}:\n{tail}")


def train_in_processes(cfg: PipelineConfig, stage_cfg, module: str, out_dir: Path, train: list[dict],
                       valid: list[dict], **job: Any) -> dict:
    """Run `module`'s main() in stage_cfg.num_processes processes (stage_cfg.launcher). The examples and a job.json
    (config, paths, `job`) go to out_dir; returns the train.json the main process writes there."""
    write_jsonl(out_dir / "train.jsonl", train)
    write_jsonl(out_dir / "validation.jsonl", valid)
    job = {"config": cfg.model_dump(mode="json"), "out_dir": str(out_dir), "train": str(out_dir / "train.jsonl"),
           "validation": str(out_dir / "validation.jsonl"), **job}
    (out_dir / "job.json").write_text(json.dumps(job, indent=2))
    run_launched(launch_command(stage_cfg.launcher, stage_cfg.num_processes, module, out_dir / "job.json"),
                 out_dir / "launch.log")
    return json.loads((out_dir / "train.json").read_text())


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rows))


def read_jsonl(url: str | Path | None) -> list[dict]:
    """Rows of a JSON Lines file (path or URL); [] when there is none."""
    if not url or not storage.exists(url):
        return []
    return [json.loads(line) for line in storage.read_text(url).splitlines() if line.strip()]


def launched_job(argv: list[str] | None, description: str) -> tuple[dict, PipelineConfig]:
    """In a process started by accelerate launch / torchrun: the job file the stage wrote, and its config."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--job", required=True, help="job.json written by the stage")
    job = json.loads(Path(parser.parse_args(argv).job).read_text())
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    return job, PipelineConfig.model_validate(job["config"])


# ------------------------------------------------------------------------------------------------ Prefect task
def _base_config(cfg: PipelineConfig) -> dict:
    return {"model": cfg.model.model_dump(), "storage_root": cfg.storage_root, "code": training_code_hash()}


base_task = stage_task("base", _base_config, retries=1)(resolve_base)
