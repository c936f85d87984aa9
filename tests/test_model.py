"""Base models, tokenizers and chat templates: the embedded builder, stories260K, template handling."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from training_fixtures import STORIES, alpaca_examples, make_warehouse, small_config
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl.chat_template_utils import is_chat_template_stop_token_trained

from tasks.core.results import load_result
from tasks.data.sample_data import CORPUS_FILE, pretraining_corpus
from tasks.training.base import build_embedded_base, resolve_base
from tasks.training.loading import (
    DEFAULT_CHAT_TEMPLATE,
    ensure_chat_template,
    load_tokenizer,
)

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "Another one?"},
    {"role": "assistant", "content": "Green."},
]


def assistant_text(tokenizer, messages) -> list[str]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    spans, current = [], []
    for token, m in zip(ids, mask):
        if m:
            current.append(token)
        elif current:
            spans.append(tokenizer.decode(current))
            current = []
    if current:
        spans.append(tokenizer.decode(current))
    return spans


def test_stories260k_gets_pad_token_and_default_template(tmp_path):
    cfg = small_config(tmp_path)
    tokenizer = load_tokenizer(STORIES, cfg)
    assert tokenizer.pad_token == "<unk>" and tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.chat_template == DEFAULT_CHAT_TEMPLATE
    # Exactly the assistant answers (with their end marker and EOS) are selected for the loss.
    assert [s.strip() for s in assistant_text(tokenizer, CONVERSATION)] == ["Blue.<|im_end|></s>",
                                                                           "Green.<|im_end|></s>"]
    assert is_chat_template_stop_token_trained(tokenizer)  # the model learns to stop
    prompt = tokenizer.apply_chat_template(CONVERSATION[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.startswith("<s><|im_start|>system\nBe brief.<|im_end|>\n") and prompt.endswith(
        "<|im_start|>assistant\n")


def test_template_precedence_config_then_tokenizer_then_default(tmp_path):
    cfg = small_config(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(STORIES)
    assert ensure_chat_template(tokenizer) == "default"
    own = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    tokenizer.chat_template = own
    assert ensure_chat_template(tokenizer) == "tokenizer" and tokenizer.chat_template == own
    tokenizer.save_pretrained(tmp_path / "tok")
    assert load_tokenizer(tmp_path / "tok", cfg).chat_template == own  # a saved template survives reloading
    override = small_config(tmp_path, **{"model.chat_template": "X{{ messages[0]['content'] }}"})
    assert load_tokenizer(tmp_path / "tok", override).apply_chat_template(CONVERSATION, tokenize=False) == "XBe brief."


def plain_text(examples: list[dict]) -> list[str]:
    """The examples' turns as plain-text documents (no chat template)."""
    return [m["content"] for ex in examples for m in ex["messages"]]


def test_pretraining_corpus_is_plain_text_without_questions_or_chat():
    corpus = pretraining_corpus()
    assert len(corpus) == 4000 and corpus == pretraining_corpus()  # deterministic
    assert not any("?" in doc or "？" in doc or "<|im_" in doc or "assistant" in doc for doc in corpus)
    # The facts behind the sample tasks are stated in both phrasings.
    assert "The capital of France is Paris." in corpus and "Paris is the capital of France." in corpus


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    root = tmp_path_factory.mktemp("embedded")
    cfg = small_config(root, **{"model.base": "embedded", "model.embedded_warmup_steps": 40})
    train = alpaca_examples(300)
    return cfg, train, build_embedded_base(cfg, plain_text(train), root / "base")


def _file_versions(folder) -> dict[str, int]:
    """Every file under folder with its modification time (ns): what a rerun rewrote shows up here."""
    return {str(p): p.stat().st_mtime_ns for p in Path(folder).rglob("*") if p.is_file()}


def test_embedded_base_builds_and_learns(embedded):
    cfg, train, result = embedded
    stats = result.stats
    assert stats["warmup_loss"]["last"] < stats["warmup_loss"]["first"] - 1.0  # warm-up really trained
    path = result.path
    for name in ("model.safetensors", "config.json", "tokenizer.json", "chat_template.jinja", "base.json"):
        assert Path(path, name).is_file(), name

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.model_type == "llama" and model.config.vocab_size == len(tokenizer)
    for special in ("<|im_start|>", "<|im_end|>", "<s>", "</s>", "<pad>"):
        assert len(tokenizer(special, add_special_tokens=False)["input_ids"]) == 1, special
    assert tokenizer.pad_token == "<pad>" and tokenizer.chat_template == DEFAULT_CHAT_TEMPLATE
    # The trained BPE is a real subword vocabulary, not bytes: common words are single tokens.
    assert len(tokenizer(" the", add_special_tokens=False)["input_ids"]) == 1
    # The warmed-up base prefers real text over shuffled text.
    text = train[0]["messages"][1]["content"]
    ids = tokenizer(text, return_tensors="pt")["input_ids"][:, :64]
    shuffled = ids[:, torch.randperm(ids.shape[1], generator=torch.Generator().manual_seed(0))]
    with torch.no_grad():
        assert model(input_ids=ids, labels=ids).loss < model(input_ids=shuffled, labels=shuffled).loss


def test_embedded_base_reuses_a_finished_build(embedded):
    cfg, train, result = embedded
    before = _file_versions(result.path)
    again = build_embedded_base(cfg, plain_text(train), result.path)
    assert again == result and _file_versions(result.path) == before and before  # nothing rebuilt or rewritten


def test_resolve_base(tmp_path):
    cfg = small_config(tmp_path)
    pretrained = resolve_base(cfg)
    assert pretrained.path == str(STORIES) and pretrained == resolve_base(cfg)  # stable fingerprint

    data = make_warehouse(tmp_path / "wh.duckdb", sft={"train": alpaca_examples(120)})
    ecfg = small_config(tmp_path, **{"model.base": "embedded", "model.embedded_warmup_steps": 10})
    base = resolve_base(ecfg, data)
    # Pretrained on the sample data's plain-text corpus, not on the fine-tuning conversations.
    corpus = (tmp_path / "sample_data" / CORPUS_FILE).read_text().splitlines()
    assert base.stats["kind"] == "embedded" and base.stats["corpus_documents"] == len(corpus)
    assert str(tmp_path / "models" / "base") in base.path
    from tasks.core.warehouse import open_warehouse

    with open_warehouse(data.warehouse, read_only=True) as con:
        runs = con.execute("SELECT stage, fingerprint FROM training_runs").fetchall()
        losses = con.execute("SELECT count(*) FROM training_curves WHERE stage = 'base' AND metric = 'loss'").fetchone()
    assert runs == [("base", base.fingerprint)] and losses[0] >= 1
    assert load_result(Path(base.path, "base.json").read_text()) == base
