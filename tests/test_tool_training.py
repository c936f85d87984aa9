"""Tool calling trains: rendered with apply_chat_template(..., tools=...), loss on the assistant's text and tool calls
but not on tool results (checked on a real batch), SFT on stories260K and on the embedded base lowers the loss, and
DPO / KTO prompts keep the tools, calls and results, rendered token for token as SFT renders them."""

from __future__ import annotations

import math

from training_fixtures import (
    STORIES,
    STORIES_BASE,
    alpaca_examples,
    make_warehouse,
    small_config,
    tool_examples,
    tool_pairs,
)

from tasks.core.warehouse import open_warehouse, preference_pairs
from tasks.training import dpo, kto
from tasks.training.base import build_embedded_base
from tasks.training.sft import build_trainer, check_loss_mask, conversations, run_sft
from tasks.training.trainer import TrainingJob

# Long enough for the tool schema, the call and the result in stories260K's 512-piece vocabulary (its context).
TOOL_CFG = {"model.max_length": 512, "sft.max_steps": 20, "sft.per_device_batch_size": 4, "sft.max_eval_examples": 8}


def test_loss_covers_the_tool_call_and_not_the_tool_result_on_a_real_batch(tmp_path):
    cfg = small_config(tmp_path, **{"model.quantization": "none", **TOOL_CFG})
    examples = tool_examples(8)
    trainer = build_trainer(cfg, STORIES, examples, [], tmp_path / "run")
    batch = next(iter(trainer.get_train_dataloader()))
    counts = check_loss_mask(batch, assistant_only=True)
    assert 0 < counts["loss_tokens"] < counts["tokens"]
    tokenizer = trainer.processing_class
    results = {ex["messages"][2]["content"]: ex for ex in examples}
    for ids, labels in zip(batch["input_ids"], batch["labels"]):
        real = ids[ids != tokenizer.pad_token_id]
        trained = tokenizer.decode(ids[labels != -100]).replace(" ", "")
        prompt = tokenizer.decode(ids[labels == -100]).replace(" ", "")
        result = next(r for r in results if r.replace(" ", "") in prompt)  # the tool result is prompt, not target
        ex = results[result]
        assert result.replace(" ", "") not in trained
        call = ex["messages"][1]["tool_calls"][0]
        assert '<tool_call>{"name":"forecast","arguments":' in trained.replace("\n", "")  # the call is target
        assert call["arguments"].replace(" ", "") in trained.replace("\n", "")
        assert ex["messages"][3]["content"].replace(" ", "") in trained  # so is the final answer
        assert '"description":"Rainchancebycity"' in prompt  # the tool schema is in the prompt
        assert len(real) <= cfg.model.max_length


def test_tool_calling_sft_on_stories260k_lowers_validation_loss(tmp_path):
    train = tool_examples(64) + alpaca_examples(64)
    valid = tool_examples(16, offset=64)
    data = make_warehouse(tmp_path / "warehouse.duckdb", sft={"train": train, "validation": valid})
    cfg = small_config(tmp_path, **TOOL_CFG)
    s = run_sft(cfg, STORIES_BASE, data).stats
    print("stories260K tool SFT", {k: s[k] for k in ("first_eval_loss", "last_eval_loss", "wall_s")})
    assert s["steps"] == 20 and s["train_examples"] == 128
    assert s["last_eval_loss"] < s["first_eval_loss"] - 0.5, s


def test_tool_calling_sft_on_the_embedded_base_lowers_validation_loss(tmp_path):
    train = tool_examples(96) + alpaca_examples(160)
    valid = tool_examples(16, offset=96)
    cfg = small_config(tmp_path, **{"model.base": "embedded", "model.embedded_warmup_steps": 30,
                                    "sft.learning_rate": 1e-2, **TOOL_CFG})
    base = build_embedded_base(cfg, [m["content"] for ex in train for m in ex["messages"] if m["content"]],
                               tmp_path / "base")
    data = make_warehouse(tmp_path / "wh.duckdb", sft={"train": train, "validation": valid})
    s = run_sft(cfg, base, data).stats
    print("embedded tool SFT", {k: s[k] for k in ("first_eval_loss", "last_eval_loss", "wall_s")})
    assert s["steps"] == 20
    assert s["last_eval_loss"] < s["first_eval_loss"] - 0.01, s


def test_dpo_on_tool_calling_prompts_renders_calls_and_results_as_sft_does_and_trains(tmp_path):
    cfg = small_config(tmp_path, **{**TOOL_CFG, "sft.max_steps": 2, "sft.max_eval_examples": 4, "dpo.max_steps": 4,
                                    "dpo.per_device_batch_size": 4, "dpo.eval_steps": 2, "dpo.save_steps": 4,
                                    "dpo.logging_steps": 1, "dpo.max_eval_pairs": 4, "dpo.train_probe_pairs": 4})
    pairs = tool_pairs(16)
    data = make_warehouse(tmp_path / "wh.duckdb", sft={"train": tool_examples(8), "validation": tool_examples(4, 8)},
                          pairs={"train": pairs[:12], "validation": pairs[12:]})
    sft = run_sft(cfg, STORIES_BASE, data)
    with open_warehouse(data.warehouse, read_only=True) as con:
        train = preference_pairs(con, "train")  # as the DPO stage reads them
    assert [m["role"] for m in train[0]["prompt"]] == ["user", "assistant", "tool"] and train[0]["tools"]

    job = TrainingJob(out_dir=str(tmp_path / "probe"), base_path=str(STORIES), train=train, validation=[],
                      adapter_path=sft.adapter)
    trainer = dpo.build_trainer(cfg, job)
    tokenizer = trainer.processing_class
    for pair, row in zip(train, trainer.train_dataset):
        prompt = tokenizer.decode(row["prompt_ids"]).replace(" ", "")
        call = pair["prompt"][1]["tool_calls"][0]
        assert f'<tool_call>{{"name":"forecast","arguments":{call["arguments"]}}}</tool_call>'.replace(" ", "") \
            in prompt.replace("\n", "")
        assert pair["prompt"][2]["content"].replace(" ", "") in prompt  # the tool result
        assert '"description":"Rainchancebycity"' in prompt  # the tool schema
        # The chosen sequence is, token for token, what SFT trains on for the same conversation.
        whole = [{"messages": [*pair["prompt"], {"role": "assistant", "content": pair["chosen"]}],
                  "tools": pair["tools"]}]
        assert row["prompt_ids"] + row["chosen_ids"] == conversations(whole, tokenizer, True)[0]["input_ids"]
    print("DPO tool prompt tokens", [len(r["prompt_ids"]) for r in trainer.train_dataset][:4])

    # KTO tokenises the same rows' prompts identically.
    feedback = [{"prompt": p["prompt"], "tools": p["tools"], "completion": p[k], "label": k == "chosen"}
                for p in train[:4] for k in ("chosen", "rejected")]
    kto_trainer = kto.build_trainer(cfg, TrainingJob(out_dir=str(tmp_path / "kto"), base_path=str(STORIES),
                                                     train=feedback, validation=[], adapter_path=sft.adapter))
    assert [r["prompt_ids"] for r in kto_trainer.train_dataset] == \
        [r["prompt_ids"] for r in trainer.train_dataset.select(range(4)) for _ in range(2)]

    s = dpo.run_dpo(cfg, sft, data).stats
    print("DPO on tool prompts", {k: s[k] for k in ("steps", "first_loss", "last_loss", "train_pairs")})
    assert s["steps"] == 4 and s["train_pairs"] == 12
    assert math.isfinite(s["first_loss"]) and math.isfinite(s["last_loss"])
