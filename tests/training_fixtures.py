"""Real data and small configs for the training-plane tests (imported by tests/test_{model,sft,dpo,merge}.py).

Examples come from the shared public files, mapped to the canonical {role, content} form the warehouse readers
return; `make_warehouse` writes them into a real DuckDB warehouse through the data plane's tables, so the stage
functions read them exactly as in the pipeline.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from pathlib import Path

from tasks.core.config import PipelineConfig, apply_overrides
from tasks.core.results import DataResult, ModelResult

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
STORIES = SHARED / "models" / "stories260K"
ALPACA_EN = SHARED / "data" / "instruct_alpaca_en" / "alpaca_en_demo.json"
DPO_EN = SHARED / "data" / "preference_sharegpt" / "dpo_en_demo.json"

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def alpaca_examples(n: int, offset: int = 0, max_chars: int = 600) -> list[dict]:
    """Alpaca rows as single-turn conversations, short ones first-come (tests use max_length ~128 tokens)."""
    rows = json.loads(ALPACA_EN.read_text())
    out = []
    for i, r in enumerate(rows):
        prompt = r["instruction"] + (f"\n\n{r['input']}" if r.get("input") else "")
        if len(prompt) + len(r["output"]) > max_chars:
            continue
        out.append({"example_id": f"alpaca-{i}", "source": "alpaca_en_demo",
                    "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": r["output"]}]})
    return out[offset: offset + n]


def preference_pairs(n: int, offset: int = 0, max_prompt_chars: int = 200) -> list[dict]:
    """dpo_en_demo rows (ShareGPT prompt turns + chosen/rejected) with short single-turn prompts."""
    rows = json.loads(DPO_EN.read_text())
    out = []
    for i, r in enumerate(rows):
        prompt = [{"role": ROLES[t["from"]], "content": t["value"]} for t in r["conversations"]]
        if len(prompt) != 1 or len(prompt[0]["content"]) > max_prompt_chars:
            continue
        out.append({"example_id": f"dpo-{i}", "source": "dpo_en_demo", "prompt": prompt,
                    "chosen": r["chosen"]["value"], "rejected": r["rejected"]["value"]})
    return out[offset: offset + n]


CITIES = ["Berlin", "Oslo", "Rome", "Lima", "Cairo", "Tokyo", "Madrid", "Athens", "Warsaw", "Havana", "Paris",
          "Nairobi", "Ottawa", "Santiago", "Lisbon", "Dublin"]
FORECAST_TOOL = {"type": "function", "function": {  # small: stories260K's vocabulary spends a token on 1-2 letters
    "name": "forecast", "description": "Rain chance by city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}


def tool_examples(n: int, offset: int = 0) -> list[dict]:
    """Tool-calling conversations in OpenAI's layout (tools, an assistant tool call, the tool's result, the answer),
    put in canonical form by the data plane's parser, as the warehouse readers return them."""
    import json

    from tasks.core.warehouse import compact_messages
    from tasks.data import formats

    out = []
    for i in range(offset, offset + n):
        city, rain = CITIES[i % len(CITIES)], (i * 37) % 100
        answer = f"{rain}% in {city}: " + ("take an umbrella." if rain >= 50 else "no umbrella needed.")
        row = {"messages": [
            {"role": "user", "content": f"Will it rain in {city}?"},
            {"role": "assistant", "content": None, "tool_calls": [{"id": f"call_{i}", "type": "function", "function": {
                "name": "forecast", "arguments": json.dumps({"city": city})}}]},
            {"role": "tool", "tool_call_id": f"call_{i}", "content": json.dumps({"rain_probability": rain})},
            {"role": "assistant", "content": answer}], "tools": [FORECAST_TOOL]}
        parsed = formats.normalize(row, "messages")
        out.append({"example_id": f"tool-{i}", "source": "tool_calls", "messages": compact_messages(parsed.messages),
                    "tools": json.dumps(parsed.tools)})
    return out


def tool_pairs(n: int, offset: int = 0) -> list[dict]:
    """tool_examples as preference pairs: the prompt runs through the tool call and its result, the chosen answer
    reads the result, the rejected one ignores it."""
    out = []
    for ex, city in zip(tool_examples(n, offset), (CITIES[i % len(CITIES)] for i in range(offset, offset + n))):
        *prompt, answer = ex["messages"]
        out.append({"example_id": ex["example_id"].replace("tool", "tool-pair"), "source": "tool_pairs",
                    "prompt": prompt, "chosen": answer["content"], "rejected": f"I cannot know the rain in {city}.",
                    "tools": ex["tools"]})
    return out


def small_config(root: Path, **overrides) -> PipelineConfig:
    """A config sized for a 2-core CPU: short sequences, few steps, stories260K base unless overridden."""
    tree = {
        "storage_root": str(root),
        "model": {"base": str(STORIES), "max_length": 128, "device": "cpu"},
        "sft": {"max_steps": 30, "per_device_batch_size": 8, "learning_rate": 3e-3, "lora_r": 8, "lora_alpha": 16,
                "lora_dropout": 0.0, "eval_steps": 10, "save_steps": 10, "logging_steps": 5, "max_eval_examples": 32,
                "warmup_steps": 0},
        "dpo": {"max_steps": 20, "per_device_batch_size": 8, "learning_rate": 2e-3, "eval_steps": 10,
                "save_steps": 10, "logging_steps": 5, "max_eval_pairs": 16, "train_probe_pairs": 32,
                "warmup_steps": 0},
        "kto": {"max_steps": 30, "per_device_batch_size": 8, "learning_rate": 3e-4, "eval_steps": 10,
                "save_steps": 10, "logging_steps": 5, "max_eval_examples": 32, "train_probe_examples": 32,
                "warmup_steps": 0},
    }
    for dotted, value in overrides.items():  # "sft.max_steps": 10 style keys, values kept as given
        node = tree
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return apply_overrides(tree)


def make_warehouse(path: Path, sft: dict[str, list[dict]] | None = None,
                   pairs: dict[str, list[dict]] | None = None) -> DataResult:
    """Write examples into the data plane's tables of a real warehouse; returns a split-stage result for it."""
    from tasks.core.warehouse import open_warehouse

    now = datetime.now(timezone.utc).replace(tzinfo=None)
    seq = 0
    digest = hashlib.sha256()
    with open_warehouse(path) as con:
        for kind, by_split in (("sft", sft or {}), ("preference", pairs or {})):
            for split, rows in by_split.items():
                for r in rows:
                    seq += 1
                    row_id = f"{split}:{r['example_id']}"
                    messages = r["messages"] if kind == "sft" else r["prompt"]
                    responses = None if kind == "sft" else [r["chosen"], r["rejected"]]
                    text = json.dumps([messages, responses])
                    digest.update(text.encode())
                    con.execute(
                        "INSERT INTO clean_results (row_id, kind, source, row_seq, messages, responses, tools, "
                        "dedup_text, content_hash, n_chars, language) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'en')",
                        [row_id, kind, r["source"], seq, messages, responses, r.get("tools"), text,
                         hashlib.sha256(text.encode()).hexdigest(), len(text)])
                    con.execute("INSERT INTO cluster_members VALUES (?, ?, 'representative', 1.0)", [row_id, row_id])
                    con.execute("INSERT INTO split_assignments VALUES (?, ?, 'test', ?)", [row_id, split, now])
    return DataResult(stage="split", fingerprint=digest.hexdigest()[:16], warehouse=str(path))


STORIES_BASE = ModelResult(stage="base", fingerprint="stories260K", path=str(STORIES))


def sft_on_stories(root: Path, **overrides) -> tuple[PipelineConfig, DataResult, ModelResult]:
    """A warehouse with Alpaca conversations and dpo_en_demo pairs, and a finished SFT run on stories260K."""
    from tasks.training.sft import run_sft

    pairs = preference_pairs(57)  # every dpo_en_demo pair with a short single-turn prompt
    data = make_warehouse(root / "warehouse.duckdb",
                          sft={"train": alpaca_examples(240), "validation": alpaca_examples(32, offset=240)},
                          pairs={"train": pairs[:41], "validation": pairs[41:]})
    cfg = small_config(root, **overrides)
    return cfg, data, run_sft(cfg, STORIES_BASE, data)
