"""The base stage: the model every run fine-tunes.

`model.base` is any Hugging Face id or local path, loaded with the Auto classes (safetensors preferred,
`trust_remote_code` only when the config turns it on). `embedded` builds a tiny Llama here, offline: a byte-level
BPE tokenizer trained with `tokenizers` and a short causal-LM pretraining run, both on plain text only
(`model.embedded_corpus`, by default the sample data's `pretraining_corpus.txt`). Like any pretrained base it has
learned the language, not the chat format: it never sees the chat template nor the fine-tuning conversations, so
what SFT and DPO add is measurable.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from pathlib import Path

from tasks.core import storage
from tasks.core.caching import stage_task
from tasks.core.config import ModelConfig, PipelineConfig
from tasks.core.hashing import files_fingerprint, json_fingerprint, sha256_bytes
from tasks.core.results import DataResult, ModelResult, load_result
from tasks.training import hub
from tasks.training.loading import (
    configure_threads,
    ensure_chat_template,
    training_code_hash,
    use_cuda,
)
from tasks.training.outputs import StageOutput
from tasks.training.tracking import (
    TrainingReporter,
    publish_tensorboard,
    record_training_run,
    report_to,
    tensorboard_dir,
)

log = logging.getLogger("sftpipe.train")

EMBEDDED_SPECIAL_TOKENS = ["<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]


def pack_documents(docs: list[list[int]], bos: int, eos: int, block: int) -> list[list[int]]:
    """Documents as <s> doc </s>, concatenated and cut into blocks of `block` tokens (no padding wasted)."""
    stream = [t for doc in docs for t in (bos, *doc, eos)]
    return [stream[i : i + block] for i in range(0, len(stream) - block + 1, block)] or [stream]


def train_tokenizer(corpus: list[str], m: ModelConfig):
    """A byte-level BPE tokenizer trained on the plain-text corpus, with the chat markers as special tokens and the
    configured (or default) chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe_trainer = trainers.BpeTrainer(vocab_size=m.embedded_vocab_size, special_tokens=EMBEDDED_SPECIAL_TOKENS,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(corpus, trainer=bpe_trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"], model_max_length=m.max_length,
    )
    ensure_chat_template(tokenizer, m.chat_template)
    return tokenizer


def tiny_llama(tokenizer, m: ModelConfig):
    """A freshly initialised Llama of the model.embedded_* shape, its vocabulary the tokenizer's."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden = m.embedded_hidden_size
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=64 * math.ceil(hidden * 8 / 3 / 64),
        num_hidden_layers=m.embedded_layers, num_attention_heads=m.embedded_heads,
        num_key_value_heads=m.embedded_heads, max_position_embeddings=m.max_length, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))


def pretrain(cfg: PipelineConfig, model, tokenizer, blocks: list[list[int]], work: Path,
             reporter: TrainingReporter) -> dict[str, float]:
    """Causal-LM pretraining on the packed blocks for model.embedded_warmup_steps; returns the first and last
    logged loss ({} when no step runs)."""
    from datasets import Dataset
    from transformers import DataCollatorForLanguageModeling, PrinterCallback, Trainer, TrainingArguments

    m = cfg.model
    if m.embedded_warmup_steps <= 0:
        return {}
    args = TrainingArguments(
        output_dir=str(work / "trainer"), max_steps=m.embedded_warmup_steps, per_device_train_batch_size=16,
        learning_rate=m.embedded_warmup_lr, lr_scheduler_type="cosine", warmup_steps=0.1, weight_decay=0.01,
        logging_steps=max(1, m.embedded_warmup_steps // 10), save_strategy="no", eval_strategy="no",
        report_to=report_to(cfg), disable_tqdm=True, seed=m.embedded_seed, dataloader_num_workers=0, use_cpu=not use_cuda(cfg),
        include_num_input_tokens_seen="non_padding",
    )
    trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_dict({"input_ids": blocks}),
                      data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False), callbacks=[reporter])
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    shutil.rmtree(work / "trainer", ignore_errors=True)
    losses = [r["value"] for r in reporter.rows if r["metric"] == "loss"]
    return {"first": losses[0], "last": losses[-1]} if losses else {}


def build_embedded_base(cfg: PipelineConfig, corpus: list[str], out_dir: str | Path) -> ModelResult:
    """Train a byte-level BPE tokenizer on the plain-text corpus, build a tiny Llama and pretrain it on the corpus.

    corpus: plain-text documents (no chat template is applied). Writes a Hugging Face model folder (safetensors,
    tokenizer, chat template) to out_dir and returns its result (its path is out_dir). Reuses
    out_dir when a previous build completed there.
    """
    from transformers import set_seed

    out_dir = Path(out_dir)
    done = out_dir / "base.json"
    if done.exists():
        return load_result(done.read_text())
    corpus = [d for d in corpus if d.strip()]
    if not corpus:
        raise ValueError("the embedded base needs a plain-text corpus to pretrain on: model.embedded_corpus is empty")
    configure_threads()
    started = time.time()
    m = cfg.model
    set_seed(m.embedded_seed)
    tokenizer = train_tokenizer(corpus, m)
    model = tiny_llama(tokenizer, m)

    docs = tokenizer(corpus, add_special_tokens=False)["input_ids"]
    blocks = pack_documents(docs, tokenizer.bos_token_id, tokenizer.eos_token_id, m.embedded_warmup_max_length)
    work = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(work, ignore_errors=True)
    reporter = TrainingReporter("base", work / "metrics.jsonl", total_steps=m.embedded_warmup_steps,
                                tensorboard_dir=tensorboard_dir(cfg, "base", out_dir.name))
    warmup_loss = pretrain(cfg, model, tokenizer, blocks, work, reporter)
    model.save_pretrained(work, safe_serialization=True)
    tokenizer.save_pretrained(work)
    stats = {
        "kind": "embedded", "parameters": sum(p.numel() for p in model.parameters()), "vocab_size": len(tokenizer),
        "corpus_documents": len(corpus), "corpus_tokens": sum(len(d) for d in docs), "pretrain_blocks": len(blocks),
        "warmup_steps": m.embedded_warmup_steps, "warmup_loss": warmup_loss,
        "wall_s": round(time.time() - started, 2), "tokens_per_s": reporter.tokens_per_s,
    }
    result = ModelResult(stage="base", fingerprint=files_fingerprint(work), path=str(out_dir.resolve()), stats=stats)
    (work / "base.json").write_text(result.to_json())
    shutil.rmtree(out_dir, ignore_errors=True)
    work.rename(out_dir)  # atomic: a half-written base is never mistaken for a finished one
    log.info("embedded base: %s parameters, pretraining loss %s, %.1f s", stats["parameters"], warmup_loss,
             stats["wall_s"])
    return result


def corpus_files(cfg: PipelineConfig) -> list[str]:
    """The embedded base's plain-text files: model.embedded_corpus, else the sample data's pretraining corpus."""
    if cfg.model.embedded_corpus:
        return [storage.normalize(f) for f in cfg.model.embedded_corpus]
    from tasks.data.sample_data import CORPUS_FILE, ensure_sample_data

    return [storage.join(ensure_sample_data(cfg.sample_data_url), CORPUS_FILE)]


def read_corpus(files: list[str]) -> list[str]:
    """One document per non-empty line of each file."""
    return [line for f in files for line in storage.read_text(f).splitlines() if line.strip()]


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


def hub_base(cfg: PipelineConfig) -> ModelResult:
    """A hub model at the commit model.revision resolves to: downloaded into the Hugging Face cache and checked.

    For a remote storage root the snapshot is published under <root>/models/base, so GPU workers on other machines
    fetch it from there like any other stage output."""
    started = time.time()
    repo_id = cfg.model.base
    commit = hub.resolve_revision(repo_id, cfg.model.revision)
    snapshot = hub.download(repo_id, commit, cfg.model.trust_remote_code)
    stats = {"kind": "hub", "hub_id": repo_id, "revision": commit, "requested_revision": cfg.model.revision or "main",
             **hub.check_loads(snapshot, cfg)}
    fingerprint = json_fingerprint({"hub_id": repo_id, "commit": commit})
    if not storage.is_local(cfg.root):
        out = StageOutput(cfg, "base", fingerprint)
        if (done := out.finished()) is not None:
            return done
        shutil.copytree(snapshot, out.dir, dirs_exist_ok=True)
        stats["wall_s"] = round(time.time() - started, 2)
        return out.finish(ModelResult(stage="base", fingerprint=fingerprint, path=out.url, stats=stats))
    stats["wall_s"] = round(time.time() - started, 2)
    return ModelResult(stage="base", fingerprint=fingerprint, path=str(snapshot), stats=stats)


def resolve_base(cfg: PipelineConfig, data: DataResult | None = None) -> ModelResult:
    """The base model to train: cfg.model.base, or the embedded tiny Llama pretrained on its plain-text corpus (its
    training run is recorded in data's warehouse)."""
    if hub.is_hub_id(cfg.model.base):
        return hub_base(cfg)
    if cfg.model.base != "embedded":
        return ModelResult(stage="base", fingerprint=pretrained_fingerprint(cfg.model.base), path=cfg.model.base,
                           stats={"kind": "pretrained"})
    if data is None:
        raise ValueError("model.base=embedded needs the data stage's result to record its training run")
    corpus = read_corpus(corpus_files(cfg))
    corpus_hash = sha256_bytes("\n".join(corpus))[:16]
    key = json_fingerprint({"corpus": corpus_hash, "model": cfg.model.model_dump(), "code": training_code_hash()})
    out = StageOutput(cfg, "base", key)
    if (done := out.finished()) is not None:
        return done
    result = build_embedded_base(cfg, corpus, out.dir)
    curves = Path(result.path) / "metrics.jsonl"
    result = result.model_copy(update={"path": out.url})
    record_training_run(data.warehouse, run_id=f"base-{key}", stage="base", fingerprint=result.fingerprint,
                        base=out.url, data_fingerprint=corpus_hash, output_dir=out.url,
                        stats=result.stats, config=cfg.model.model_dump(), curves_path=curves)
    publish_tensorboard(cfg, "base", key)
    return out.finish(result)


def _base_config(cfg: PipelineConfig) -> dict:
    return {"model": cfg.model.model_dump(), "storage_root": cfg.storage_root, "code": training_code_hash(),
            "hub_commit": hub.cache_key(cfg)}


base_task = stage_task("base", _base_config, retries=1)(resolve_base)
