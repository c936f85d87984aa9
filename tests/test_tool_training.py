"""Tool calling trains: rendered with apply_chat_template(..., tools=...), loss on the assistant's text and tool calls
but not on tool results (checked on a real batch), SFT on stories260K and on the embedded base lowers the loss."""

from __future__ import annotations

from training_fixtures import STORIES, STORIES_BASE, alpaca_examples, make_warehouse, small_config, tool_examples

from tasks.training.base import build_embedded_base
from tasks.training.sft import build_trainer, check_loss_mask, run_sft

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
    s = run_sft(cfg, STORIES_BASE, data)["stats"]
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
    s = run_sft(cfg, base, data)["stats"]
    print("embedded tool SFT", {k: s[k] for k in ("first_eval_loss", "last_eval_loss", "wall_s")})
    assert s["steps"] == 20
    assert s["last_eval_loss"] < s["first_eval_loss"] - 0.01, s
