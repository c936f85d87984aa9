"""What every evaluation and the serving parity check share: loading a variant, prompts, greedy decoding, scoring.

A model variant is a `ModelFiles` (a stage's ModelResult, or a variant put together by hand): a full model folder
(`path`) or a LoRA adapter on a base (`adapter` + `base`). Prompts are rendered with
the chat template the pipeline trains with (tasks.training.loading.load_tokenizer: config override, else the tokenizer's
own, else the ChatML-style default), tokenised without extra special tokens (the template places BOS itself),
exactly as trl does in training and vLLM does for /v1/chat/completions.
"""

from __future__ import annotations

import gc
import re
import uuid
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tasks.core import storage
from tasks.core.caching import current_run_id
from tasks.core.config import PipelineConfig
from tasks.core.results import ModelFiles
from tasks.data.chat_template import chat_inputs


# ------------------------------------------------------------------------------------------------- variants
def torch_dtype(name: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    return getattr(torch, name)


def load_variant(result: ModelFiles, cfg: PipelineConfig, dtype: str = "float32", prefer_adapter: bool = False):
    """(model, tokenizer) of a stage result, in eval mode. prefer_adapter: apply the adapter to the base at run
    time even when a merged folder is known (the serving parity reference must not trust the merge)."""
    from transformers import AutoModelForCausalLM

    from tasks.training.loading import load_tokenizer

    kwargs = {"dtype": torch_dtype(dtype), "trust_remote_code": cfg.model.trust_remote_code}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pair = result.adapter_pair()
    if result.path and not (prefer_adapter and pair):
        path = storage.fetched(result.path)
        model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
        tokenizer = load_tokenizer(path, cfg)
    elif pair:
        from peft import PeftModel

        adapter, base = (storage.fetched(p) for p in pair)
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, **kwargs), adapter)
        # The adapter folder carries the tokenizer and chat template training used; older adapters may not.
        has_tokenizer = any((Path(adapter) / f).exists() for f in ("tokenizer.json", "tokenizer_config.json"))
        tokenizer = load_tokenizer(adapter if has_tokenizer else base, cfg)
    else:
        raise ValueError(f"stage result has neither a model folder nor an adapter + base: {result}")
    model.to(device).eval()
    return model, tokenizer


def free(model) -> None:
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# -------------------------------------------------------------------------------------------------- prompts
def split_conversation(messages: list[dict]) -> tuple[list[dict], str] | None:
    """(prompt turns, reference answer): the conversation up to its last text answer (an assistant turn without
    tool calls), and that answer."""
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant" and not m.get("tool_calls")),
               default=None)
    if last is None or last == 0:
        return None
    return list(messages[:last]), messages[last]["content"]


def render_prompt(tokenizer, prompt_messages: list[dict], tools: str | list | None = None) -> str:
    return tokenizer.apply_chat_template(**chat_inputs(prompt_messages, tools), tokenize=False,
                                         add_generation_prompt=True)


def encode_prompt(tokenizer, prompt_messages: list[dict], max_prompt_tokens: int,
                  tools: str | list | None = None) -> list[int]:
    ids = tokenizer(render_prompt(tokenizer, prompt_messages, tools), add_special_tokens=False)["input_ids"]
    return ids[-max_prompt_tokens:]  # keep the end: the question and the assistant header


def stop_token_ids(model, tokenizer) -> list[int]:
    """Token ids that end a generation: the tokenizer's EOS and the model's generation-config EOS (as vLLM does)."""
    ids = set()
    for value in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif value:
            ids.update(int(v) for v in value)
    return sorted(ids)


@dataclass
class Generation:
    prompt_ids: list[int]
    output_ids: list[int]  # new tokens, without padding; ends with a stop token when the model stopped by itself
    text: str  # decoded without special tokens, cut at the first stop string


def cut_at_stop_strings(text: str, stop_strings: list[str]) -> str:
    cut = min((text.find(s) for s in stop_strings if s and s in text), default=-1)
    return (text[:cut] if cut >= 0 else text).strip()


@torch.inference_mode()
def greedy_generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int = 8,
                    stop_strings: list[str] = (), seed: int = 0) -> list[Generation]:
    """Greedy continuations of token-id prompts, batched with left padding."""
    from transformers import GenerationConfig

    torch.manual_seed(seed)
    stops = stop_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    gen_cfg = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=stops, pad_token_id=pad)
    device = next(model.parameters()).device
    out: list[Generation] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, p in enumerate(chunk):
            ids[row, width - len(p) :] = torch.tensor(p)
            mask[row, width - len(p) :] = 1
        seqs = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=gen_cfg)
        for row, p in enumerate(chunk):
            new = seqs[row, width:].tolist()
            for i, t in enumerate(new):  # drop what follows the first stop token (padding of finished rows)
                if t in stops:
                    new = new[: i + 1]
                    break
            text = tokenizer.decode(new, skip_special_tokens=True)
            out.append(Generation(list(p), new, cut_at_stop_strings(text, list(stop_strings))))
    return out


# ------------------------------------------------------------------------------------------------ perplexity
GENERATION_TAG = re.compile(r"{%-?\s*generation\s*-?%}")


def encode_for_loss(tokenizer, messages: list[dict], max_length: int, scope: str = "assistant",
                    tools: str | list | None = None) -> dict[str, Any]:
    """input_ids and labels of a whole conversation, as trained: labels -100 except on the scored tokens.

    scope "assistant": the tokens inside the template's {% generation %} markers (what trl's assistant_only_loss
    trains on); a template without markers falls back to the text between each assistant header and the end of
    that turn, found by rendering the conversation's prefixes. scope "all": every token.
    """
    chat = chat_inputs(messages, tools)
    if scope == "all":
        ids = tokenizer.apply_chat_template(**chat, tokenize=True, return_dict=True)["input_ids"][:max_length]
        return {"input_ids": ids, "labels": list(ids)}
    if GENERATION_TAG.search(tokenizer.chat_template or ""):
        enc = tokenizer.apply_chat_template(**chat, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        ids, mask = enc["input_ids"], enc["assistant_masks"]
    else:
        ids, mask = _assistant_mask_by_prefixes(tokenizer, chat["conversation"], chat["tools"])
    ids, mask = ids[:max_length], mask[:max_length]
    return {"input_ids": ids, "labels": [t if m else -100 for t, m in zip(ids, mask)]}


def _assistant_mask_by_prefixes(tokenizer, messages: list[dict], tools: list | None) -> tuple[list[int], list[int]]:
    full = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(tokenizer.apply_chat_template(messages[:i], tools=tools, tokenize=False,
                                                  add_generation_prompt=True))
        upto = tokenizer.apply_chat_template(messages[: i + 1], tools=tools, tokenize=False)
        if not full.startswith(upto):
            raise ValueError("chat template is not prefix-stable; add {% generation %} markers to score assistant turns")
        spans.append((start, len(upto.rstrip())))  # the separator after a turn is not part of the answer
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    mask = [int(any(s <= a < e for s, e in spans)) for a, _ in enc["offset_mapping"]]
    return enc["input_ids"], mask


def new_run_id() -> str:
    """The Prefect flow run id inside a flow run; outside one a fresh id, so local runs never overwrite each other."""
    run_id = current_run_id()
    return run_id if run_id != "local" else f"local-{uuid.uuid4().hex[:12]}"


def select_examples(examples: list[dict], limit: int) -> list[dict]:
    """Up to `limit` examples taken round-robin over sources (each in its stable order): every dataset shows up."""
    by_source: dict[str, list[dict]] = defaultdict(list)
    for ex in examples:
        by_source[ex["source"]].append(ex)
    queues = [by_source[s] for s in sorted(by_source)]
    picked: list[dict] = []
    depth = 0
    while len(picked) < limit and any(depth < len(q) for q in queues):
        picked += [q[depth] for q in queues if depth < len(q)][: limit - len(picked)]
        depth += 1
    return picked
