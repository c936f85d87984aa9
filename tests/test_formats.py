"""Public layouts go in unmodified: HH-RLHF transcripts, content-part arrays, whole-conversation preference under
other names, OpenAI and ShareGPT tool calling, TRL's prompt-completion (with label: KTO), conversations rendered into
one text field, Alpaca's fields under other datasets' names, column / role mapping. English and Chinese rows in each layout, with a
malformed variant of each that is rejected with its reason; every file keeps raw = accepted + rejected + duplicate."""

from __future__ import annotations

import json

import pytest
from conftest import query, run_data_plane

from tasks.core.config import ConfigError, load_config
from tasks.core.warehouse import compact_messages
from tasks.data import formats

# ------------------------------------------------------------------ fixtures, one file per layout
HH = [
    {"chosen": "\n\nHuman: What are some good ways to keep basil fresh?\n\nAssistant: Trim the stems and stand the "
               "bunch in a glass of water on the counter, loosely covered with a bag. Basil turns black in the "
               "fridge.",
     "rejected": "\n\nHuman: What are some good ways to keep basil fresh?\n\nAssistant: Put it in the freezer."},
    {"chosen": "\n\nHuman: Can you help me write a birthday card for my grandmother?\n\nAssistant: Of course. How "
               "old is she turning, and is there a memory you share?\n\nHuman: She is turning 90 and taught me to "
               "bake bread.\n\nAssistant: Dear Grandma, happy 90th! Every loaf I bake still starts with your "
               "hands on mine.",
     "rejected": "\n\nHuman: Can you help me write a birthday card for my grandmother?\n\nAssistant: Of course. How "
                 "old is she turning, and is there a memory you share?\n\nHuman: She is turning 90 and taught me "
                 "to bake bread.\n\nAssistant: Happy birthday."},
    {"chosen": "\n\nHuman: 怎样才能睡得更好？\n\nAssistant: 每天固定时间上床和起床，睡前一小时不看手机，卧室保持凉爽和安静。",
     "rejected": "\n\nHuman: 怎样才能睡得更好？\n\nAssistant: 多喝咖啡。"},
    # The line-start speaker is locked to the transcript's style: "A:" inside a Human: transcript is text.
    {"chosen": "\n\nHuman: Format this as a quiz:\nQ: What is the capital of Peru?\nA: Lima\n\nAssistant: "
               "Question 1. What is the capital of Peru? (Answer: Lima)",
     "rejected": "\n\nHuman: Format this as a quiz:\nQ: What is the capital of Peru?\nA: Lima\n\nAssistant: Lima."},
    # The H: / A: shorthand.
    {"chosen": "\n\nH: Is it safe to eat raw cookie dough?\n\nA: Not really: raw flour and raw eggs can carry "
               "bacteria. Heat-treated flour and no eggs make it safe.",
     "rejected": "\n\nH: Is it safe to eat raw cookie dough?\n\nA: Yes, always."},
    # Malformed: not a transcript; two Human turns in a row.
    {"chosen": "User: hi\nBot: hello there", "rejected": "User: hi\nBot: go away"},
    {"chosen": "\n\nHuman: Tell me a joke.\n\nHuman: A short one.\n\nAssistant: Why did the bread rise? It kneaded to.",
     "rejected": "\n\nHuman: Tell me a joke.\n\nHuman: A short one.\n\nAssistant: No."},
]
HH_PROMPT = [  # prompt is a transcript ending in the "Assistant:" cue, chosen / rejected are the answers
    {"prompt": "\n\nHuman: How do I get candle wax out of a tablecloth?\n\nAssistant:",
     "response": "Freeze it and scrape it off.",
     "chosen": "Let the wax harden, scrape off what you can, then iron it between paper towels on low heat.",
     "rejected": "Throw the tablecloth away."},
]
PARTS = [
    {"messages": [
        {"role": "system", "content": [{"type": "text", "text": "You are a concise travel assistant."}]},
        {"role": "user", "content": [{"type": "text", "text": "I have one day in Lisbon. "},
                                     {"type": "text", "text": "What should I not miss?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Ride tram 28 early, then walk Alfama and "
                                                                    "watch sunset from a miradouro."}]}]},
    {"messages": [
        {"role": "user", "content": [{"type": "text", "value": "What is 17 times 23?"}]},
        {"role": "assistant", "content": [
            {"type": "reasoning", "text": "17 * 23 = 17 * 20 + 17 * 3 = 340 + 51 = 391."},
            {"type": "text", "text": "17 times 23 is 391."}]}]},
    {"messages": [
        {"role": "user", "content": [{"type": "text", "text": "请用一句话介绍长城。"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "长城是中国古代修建的防御工程，"},
                                          {"type": "text", "text": "总长度超过两万公里。"}]}]},
    {"messages": [
        {"role": "user", "content": [{"type": "text", "text": "What is in this picture?"},
                                     {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]},
        {"role": "assistant", "content": "A cat on a windowsill."}]},
    {"messages": [
        {"role": "user", "content": [{"type": "hologram", "data": "..."}]},
        {"role": "assistant", "content": "I cannot see that."}]},
]
SHAREGPT_PARTS = [
    {"conversations": [{"from": "human", "value": [{"type": "text", "value": "推荐一本适合初学者的编程书。"}]},
                       {"from": "gpt", "value": [{"type": "text", "value": "《Python编程：从入门到实践》很适合初学者。"}]}]},
    {"conversations": [{"from": "human", "value": [{"type": "input_audio", "input_audio": {"data": "UklGR..."}}]},
                       {"from": "gpt", "value": "Sorry, I cannot listen to audio."}]},
]
WHOLE_CONVERSATIONS = [
    {"chosen_messages": [{"role": "user", "content": "Give me a synonym for 'happy'."},
                         {"role": "assistant", "content": "Joyful."}],
     "rejected_messages": [{"role": "user", "content": "Give me a synonym for 'happy'."},
                           {"role": "assistant", "content": "Sad."}]},
    # UltraFeedback-style: prompt and messages repeat the conversations' shared first turn.
    {"prompt": "把“早上好”翻译成英文。",
     "chosen": [{"role": "user", "content": "把“早上好”翻译成英文。"}, {"role": "assistant", "content": "Good morning."}],
     "rejected": [{"role": "user", "content": "把“早上好”翻译成英文。"}, {"role": "assistant", "content": "Good night."}],
     "messages": [{"role": "user", "content": "把“早上好”翻译成英文。"}, {"role": "assistant", "content": "Good morning."}],
     "score_chosen": 9.0, "score_rejected": 2.0},
]
FORECAST_TOOL = {"type": "function", "function": {
    "name": "get_forecast", "description": "Weather forecast for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city"]}}}
ORDER_TOOL = {"type": "function", "function": {
    "name": "lookup_order", "description": "查询订单状态",
    "parameters": {"type": "object", "properties": {"order_id": {"type": "string"}}, "required": ["order_id"]}}}


def _forecast_row(arguments='{"city": "Berlin", "days": 1}', call_id="call_8KQ2", result_id="call_8KQ2"):
    return {"messages": [
        {"role": "system", "content": "You are a helpful assistant with access to a weather service."},
        {"role": "user", "content": "Do I need an umbrella in Berlin tomorrow?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call_id, "type": "function", "function": {"name": "get_forecast", "arguments": arguments}}]},
        {"role": "tool", "tool_call_id": result_id, "content": '{"rain_probability": 0.8, "high_c": 14}'},
        {"role": "assistant", "content": "Yes: there is an 80% chance of rain in Berlin tomorrow, high of 14 °C."}],
        "tools": [FORECAST_TOOL]}


OPENAI_TOOLS = [
    _forecast_row(),
    {"messages": [  # two calls in one turn, answered by id
        {"role": "user", "content": "Compare tomorrow in Oslo and Rome."},
        {"role": "assistant", "content": "Let me check both.", "tool_calls": [
            {"id": "call_a", "type": "function", "function": {"name": "get_forecast", "arguments": '{"city": "Oslo"}'}},
            {"id": "call_b", "type": "function", "function": {"name": "get_forecast", "arguments": '{"city": "Rome"}'}}]},
        {"role": "tool", "tool_call_id": "call_b", "content": '{"high_c": 24}'},
        {"role": "tool", "tool_call_id": "call_a", "content": '{"high_c": 9}'},
        {"role": "assistant", "content": "Rome will be 15 degrees warmer than Oslo tomorrow."}],
        "tools": [FORECAST_TOOL]},
    {"messages": [
        {"role": "user", "content": "我的订单 A1029 到哪了？"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_zh1", "type": "function",
             "function": {"name": "lookup_order", "arguments": '{"order_id": "A1029"}'}}]},
        {"role": "tool", "tool_call_id": "call_zh1", "content": '{"status": "已发货", "eta": "明天"}'},
        {"role": "assistant", "content": "您的订单 A1029 已发货，预计明天送达。"}],
        "tools": [ORDER_TOOL]},
    _forecast_row(arguments='{"city": "Berlin", "days": 1'),  # arguments are not JSON
    {"messages": [  # a tool result nothing asked for
        {"role": "user", "content": "Do I need an umbrella in Berlin tomorrow?"},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"rain_probability": 0.8}'},
        {"role": "assistant", "content": "Yes, take one."}], "tools": [FORECAST_TOOL]},
    _forecast_row(result_id="call_other"),  # answers a call id that was never made
]
GLAIVE_TOOLS = json.dumps([{"name": "generate_password", "description": "Generate a random password",
                            "parameters": {"type": "object", "properties": {
                                "length": {"type": "integer", "description": "The length of the password"}},
                                "required": ["length"]}}])
RATE_TOOLS = [{"name": "convert_currency", "description": "货币换算",
               "parameters": {"type": "object", "properties": {"amount": {"type": "number"},
                                                              "from": {"type": "string"}, "to": {"type": "string"}}}}]
SHAREGPT_TOOLS = [
    {"conversations": [
        {"from": "human", "value": "I need a new password. Can you generate one with 12 characters?"},
        {"from": "function_call", "value": '{"name": "generate_password", "arguments": {"length": 12}}'},
        {"from": "observation", "value": '{"password": "aB3$fG7!kL9@"}'},
        {"from": "gpt", "value": "Here is your new password: aB3$fG7!kL9@. Keep it somewhere safe."}],
     "system": "You are a helpful assistant.", "tools": GLAIVE_TOOLS},
    {"conversations": [
        {"from": "human", "value": "100美元能换多少人民币？"},
        {"from": "function_call", "value": '{"name": "convert_currency", "arguments": '
                                           '{"amount": 100, "from": "USD", "to": "CNY"}}'},
        {"from": "observation", "value": '{"converted_amount": 718.5}'},
        {"from": "gpt", "value": "100美元大约可以换718.5元人民币。"}],
     "tools": RATE_TOOLS},
    {"conversations": [  # the call is not JSON
        {"from": "human", "value": "Generate a 16 character password."},
        {"from": "function_call", "value": "generate_password(length=16)"},
        {"from": "observation", "value": '{"password": "x"}'},
        {"from": "gpt", "value": "Done."}], "tools": GLAIVE_TOOLS},
    {"conversations": [  # an observation without a call
        {"from": "human", "value": "What is my password?"},
        {"from": "observation", "value": '{"password": "hunter2"}'},
        {"from": "gpt", "value": "I cannot tell you that."}], "tools": GLAIVE_TOOLS},
]
_UMBRELLA_PROMPT = [
    {"role": "user", "content": "Do I need an umbrella in Berlin tomorrow?"},
    {"role": "assistant", "content": None, "tool_calls": [{"id": "call_p1", "type": "function", "function": {
        "name": "get_forecast", "arguments": '{"city": "Berlin", "days": 1}'}}]},
    {"role": "tool", "tool_call_id": "call_p1", "content": '{"rain_probability": 0.8, "high_c": 14}'}]
_ORDER_CALL = {"from": "function_call", "value": '{"name": "lookup_order", "arguments": {"order_id": "B77"}}'}
PREFERENCE_TOOLS = [
    # trl's conversational layout: prompt turns through the tool's result, one assistant turn each, a tools column.
    {"prompt": _UMBRELLA_PROMPT,
     "chosen": [{"role": "assistant", "content": "Yes: an 80% chance of rain in Berlin tomorrow, so take one."}],
     "rejected": [{"role": "assistant", "content": "No, Berlin is always sunny."}], "tools": [FORECAST_TOOL]},
    # Whole conversations (Chinese) sharing the call and its result: the shared prefix is the prompt.
    {"chosen": [{"role": "user", "content": "我的订单 A1029 到哪了？"},
                {"role": "assistant", "content": "", "tool_calls": [{"id": "c9", "type": "function", "function": {
                    "name": "lookup_order", "arguments": '{"order_id": "A1029"}'}}]},
                {"role": "tool", "tool_call_id": "c9", "content": '{"status": "已发货", "eta": "明天"}'},
                {"role": "assistant", "content": "您的订单已发货，预计明天送达。"}],
     "rejected": [{"role": "user", "content": "我的订单 A1029 到哪了？"},
                  {"role": "assistant", "content": "", "tool_calls": [{"id": "c9", "type": "function", "function": {
                      "name": "lookup_order", "arguments": '{"order_id": "A1029"}'}}]},
                  {"role": "tool", "tool_call_id": "c9", "content": '{"status": "已发货", "eta": "明天"}'},
                  {"role": "assistant", "content": "订单还没有发货。"}],
     "tools": [ORDER_TOOL]},
    # LLaMA-Factory's ShareGPT preference layout with function_call / observation turns and tools as JSON text.
    {"conversations": [{"from": "human", "value": "帮我查一下订单 B77。"}, _ORDER_CALL,
                       {"from": "observation", "value": '{"status": "派送中"}'}],
     "chosen": {"from": "gpt", "value": "订单 B77 正在派送中。"}, "rejected": {"from": "gpt", "value": "查不到。"},
     "tools": json.dumps([ORDER_TOOL["function"]], ensure_ascii=False)},
    # Malformed: a result nothing asked for; an answer that is a tool call (answers are text).
    {"conversations": [{"from": "human", "value": "Where is order B78?"},
                       {"from": "observation", "value": '{"status": "lost"}'}],
     "chosen": {"from": "gpt", "value": "It was lost; I have filed a claim."},
     "rejected": {"from": "gpt", "value": "It is fine."}, "tools": [ORDER_TOOL]},
    {"conversations": [{"from": "human", "value": "Where is order B79?"}], "chosen": _ORDER_CALL,
     "rejected": {"from": "gpt", "value": "No idea."}, "tools": [ORDER_TOOL]},
]
PROMPT_COMPLETION = [  # TRL's prompt-completion and unpaired-preference (KTO) layouts, OpenAI's legacy files
    {"prompt": "Name the largest planet in the solar system.", "completion": "Jupiter, more than twice the mass of "
                                                                             "all the other planets together."},
    {"prompt": [{"role": "user", "content": "用一句话介绍长江。"}],
     "completion": [{"role": "assistant", "content": "长江是中国最长的河流，全长约六千三百公里，流入东海。"}]},
    {"prompt": [{"role": "user", "content": "Is it going to rain in Oslo tomorrow?"}],
     "completion": [{"role": "assistant", "content": None, "tool_calls": [
                        {"id": "call_O5", "type": "function",
                         "function": {"name": "get_forecast", "arguments": '{"city": "Oslo", "days": 1}'}}]},
                    {"role": "tool", "tool_call_id": "call_O5", "content": '{"rain": 0.7}'},
                    {"role": "assistant", "content": "Probably: a 70 % chance of rain, so take an umbrella."}],
     "tools": [FORECAST_TOOL]},
    {"prompt": [{"role": "user", "content": "At what temperature does water boil at sea level?"}],
     "completion": [{"role": "assistant", "content": "At 100 °C (212 °F)."}], "label": True},
    {"prompt": [{"role": "user", "content": "北京是哪个国家的首都？"}],
     "completion": [{"role": "assistant", "content": "日本。"}], "label": False},
    # Malformed: the completion is the user speaking; a label that is not a boolean; no completion.
    {"prompt": [{"role": "user", "content": "Say hi."}], "completion": [{"role": "user", "content": "hi"}]},
    {"prompt": "Is the sky green?", "completion": "No.", "label": "no"},
    {"prompt": "把这句话翻译成英文：你好。", "completion": None},
]
RENDERED_TEXT = [  # one `text` column holding the conversation already rendered, as trainer-ready datasets ship it
    {"text": "### Human: What does a monopsony mean in economics?### Assistant: A market with a single buyer, such as "
             "a town with one large employer.### Human: And why does it matter?### Assistant: The buyer can push "
             "prices (or wages) below what a competitive market would pay."},
    {"text": "<s>[INST] <<SYS>>\n你是一位耐心的数学老师。\n<</SYS>>\n\n十二乘以十二等于多少？ [/INST] 十二乘以十二等于一百四十四。 </s>"
             "<s>[INST] 那么十三乘以十三呢？ [/INST] 一百六十九。 </s>"},
    {"text": "<|im_start|>system\nYou are a terse assistant.<|im_end|>\n<|im_start|>user\nName a prime number above "
             "90.<|im_end|>\n<|im_start|>assistant\n97 is prime.<|im_end|>\n"},
    {"text": "Below is an instruction that describes a task, paired with an input that provides further context. "
             "Write a response that appropriately completes the request.\n\n### Instruction:\n把下面的句子翻译成英文。\n\n"
             "### Input:\n今天天气很好。\n\n### Response:\nThe weather is lovely today."},
    {"text": "\n\nHuman: How long should I steep green tea?\n\nAssistant: Two to three minutes at about 80 °C."},
    {"text": "<s>Human: 绿茶应该泡多久？\n</s><s>Assistant: 大约两到三分钟，水温八十度左右。\n</s>"},
    # Malformed: plain prose; a ChatML role no chat has.
    {"text": "The mitochondria is the powerhouse of the cell, and this sentence is not a conversation."},
    {"text": "<|im_start|>narrator\nOnce upon a time<|im_end|>\n<|im_start|>assistant\nThe end.<|im_end|>"},
]
INSTRUCTION_NAMES = [  # Alpaca's fields under the names other instruction datasets use
    {"instruction": "When did Virgin Australia start operating?", "category": "closed_qa",
     "context": "Virgin Australia commenced services on 31 August 2000 as Virgin Blue, with two aircraft on a single "
                "route.", "response": "On 31 August 2000, as Virgin Blue."},
    {"id": "niv.242684", "system_prompt": "You are an AI assistant that helps people find information.",
     "question": "Translate to French: The library opens at nine.", "response": "La bibliothèque ouvre à neuf heures."},
    {"query": "James buys 5 packs of beef that are 4 pounds each at $5.50 a pound. How much did he pay?",
     "response": "He bought 5 * 4 = 20 pounds, so he paid 20 * 5.5 = $110. The answer is: 110", "type": "GSM_SV"},
    {"question": "小明有三个苹果，又买了两个，现在一共有几个？", "answer": "3 + 2 = 5，一共有五个苹果。\n#### 5"},
    {"instruction": "Summarise the passage.", "context": "A passage.", "response": None},  # malformed: no answer
]
LMSYS_CHATS = [  # LMSYS-Chat-1M / WildChat: `conversation` (singular) of role / content turns among other fields
    {"conversation_id": "c1a7", "model": "vicuna-13b", "turn": 1, "language": "English", "redacted": False,
     "conversation": [{"role": "user", "content": "Write a haiku about autumn rain."},
                      {"role": "assistant", "content": "Cold rain on red leaves / the gutter hums all evening / "
                                                       "tea steam on the glass"}]},
    {"conversation_id": "9be2", "model": "chatglm-6b", "turn": 1, "language": "Chinese", "redacted": False,
     "conversation": [{"role": "user", "content": "用三个词形容秋天。", "timestamp": None},
                      {"role": "assistant", "content": "凉爽、金黄、丰收。", "timestamp": None}]},
]
ORCA_PAIRS = [  # Intel/orca_dpo_pairs style: system / question / chosen / rejected
    {"system": "You are a helpful assistant.", "question": "Is a tomato a fruit or a vegetable?",
     "chosen": "Botanically a fruit (a berry); in cooking it is treated as a vegetable.", "rejected": "A vegetable."},
    {"system": "", "question": "水的沸点是多少？", "chosen": "在标准大气压下是一百摄氏度。", "rejected": "五十度。"},
]
FAQ = [{"question": "How do I reset my router?", "answer": "Hold the reset button for ten seconds.", "category": "net"},
       {"question": "路由器指示灯一直闪烁怎么办？", "answer": "请先重启路由器，再检查网线是否插好。", "category": "net"}]
SUPPORT_CHATS = [{"dialog": [{"speaker": "customer", "text": "My package arrived damaged."},
                             {"speaker": "agent", "text": "Sorry about that! I have sent a replacement today."}]},
                 {"dialog": [{"speaker": "customer", "text": "可以开发票吗？"},
                             {"speaker": "agent", "text": "可以，请提供您的抬头和税号。"}]}]
MAPPINGS = {"*faq*": {"columns": {"question": "instruction", "answer": "output"}},
            "support_chats.jsonl": {"columns": {"dialog": "messages"}, "role_key": "speaker", "content_key": "text",
                                    "roles": {"customer": "user", "agent": "assistant"}}}

FILES = {"hh_rlhf.jsonl": HH, "hh_prompt.jsonl": HH_PROMPT, "content_parts.jsonl": PARTS,
         "sharegpt_parts.json": SHAREGPT_PARTS, "whole_conversations.jsonl": WHOLE_CONVERSATIONS,
         "openai_tools.jsonl": OPENAI_TOOLS, "sharegpt_tools.json": SHAREGPT_TOOLS,
         "preference_tools.jsonl": PREFERENCE_TOOLS, "prompt_completion.jsonl": PROMPT_COMPLETION,
         "rendered_text.jsonl": RENDERED_TEXT, "instruction_names.jsonl": INSTRUCTION_NAMES,
         "orca_pairs.jsonl": ORCA_PAIRS, "lmsys_chats.jsonl": LMSYS_CHATS, "faq_support.jsonl": FAQ,
         "support_chats.jsonl": SUPPORT_CHATS}
EXPECTED_REASONS = {  # (file, 1-based row) -> reason; every other row is accepted
    ("hh_rlhf", 6): "unparseable_transcript", ("hh_rlhf", 7): "unparseable_transcript",
    ("content_parts", 4): "unsupported_content", ("content_parts", 5): "unknown_part_type",
    ("sharegpt_parts", 2): "unsupported_content",
    ("openai_tools", 4): "invalid_tool_call", ("openai_tools", 5): "orphan_tool_result",
    ("openai_tools", 6): "orphan_tool_result",
    ("sharegpt_tools", 3): "invalid_tool_call", ("sharegpt_tools", 4): "orphan_tool_result",
    ("preference_tools", 4): "orphan_tool_result", ("preference_tools", 5): "unsupported_content",
    ("prompt_completion", 6): "wrong_role_order", ("prompt_completion", 7): "wrong_type",
    ("prompt_completion", 8): "missing_field",
    ("rendered_text", 7): "unparseable_transcript", ("rendered_text", 8): "unsupported_role",
    ("instruction_names", 5): "missing_field",
}


def _write(folder, name, rows):
    path = folder / name
    if name.endswith(".json"):
        path.write_text(json.dumps(rows, ensure_ascii=False, indent=1), encoding="utf-8")
    else:
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


@pytest.fixture(scope="module")
def plane(tmp_path_factory):
    """Every layout ingested, cleaned, deduplicated and split once (plain functions, one warehouse)."""
    root = tmp_path_factory.mktemp("formats")
    raw = root / "raw"
    raw.mkdir()
    for name, rows in FILES.items():
        _write(raw, name, rows)
    cfg = load_config(None, {"storage_root": str(root / "runs"), "data.ingest.inputs": [str(raw)],
                             "data.ingest.mappings": MAPPINGS})
    run_data_plane(cfg)
    return cfg


def _parsed(cfg, source: str) -> list[tuple]:
    rows = query(cfg, "SELECT r.row_number, p.kind, p.messages, p.responses, p.tools, d.status, d.reason, d.detail "
                      "FROM raw_rows r JOIN source_files f USING (file_id) JOIN parsed_rows p USING (row_id) "
                      "JOIN row_dispositions d USING (row_id) WHERE f.source = ? ORDER BY r.row_number", [source])
    return [(n, k, compact_messages(m) if m else m, r, json.loads(t) if t else None, s, why, d)
            for n, k, m, r, t, s, why, d in rows]


def test_every_row_ends_accepted_rejected_or_duplicate_with_its_reason(plane):
    assert all(balanced for (balanced,) in query(plane, "SELECT balanced FROM row_conservation"))
    dispositions = query(plane, "SELECT f.source, d.row_number, d.status, d.reason, d.detail FROM row_dispositions d "
                                "JOIN source_files f USING (file_id)")
    assert len(dispositions) == sum(len(rows) for rows in FILES.values())
    for source, n, status, reason, detail in dispositions:
        expected = EXPECTED_REASONS.get((source, n))
        assert (status == "rejected", reason) == (expected is not None, expected), (source, n, status, reason, detail)
    # Raw rows are stored verbatim: each parses back to the record as written.
    raw = dict(query(plane, "SELECT f.source || ':' || r.row_number, r.raw FROM raw_rows r JOIN source_files f "
                            "USING (file_id)"))
    for name, rows in FILES.items():
        source = name.split(".")[0]
        assert [json.loads(raw[f"{source}:{i}"]) for i in range(1, len(rows) + 1)] == rows


def test_hh_transcripts_become_prompt_and_final_answers(plane):
    rows = _parsed(plane, "hh_rlhf")
    _, kind, prompt, answers, *_ = rows[1]
    assert kind == "preference"
    assert [m["role"] for m in prompt] == ["user", "assistant", "user"]
    assert prompt[2]["content"] == "She is turning 90 and taught me to bake bread."
    assert answers == ["Dear Grandma, happy 90th! Every loaf I bake still starts with your hands on mine.",
                       "Happy birthday."]
    assert rows[2][2] == [{"role": "user", "content": "怎样才能睡得更好？"}] and rows[2][3][1] == "多喝咖啡。"
    assert rows[3][2][0]["content"].endswith("A: Lima")  # a line-start "A:" inside a Human: transcript is text
    assert rows[4][2] == [{"role": "user", "content": "Is it safe to eat raw cookie dough?"}]
    assert "does not open with a 'Human:' turn" in rows[5][7]
    assert "two user turns in a row" in rows[6][7]
    [(_, kind, prompt, answers, *_)] = _parsed(plane, "hh_prompt")
    assert prompt == [{"role": "user", "content": "How do I get candle wax out of a tablecloth?"}]
    assert answers[1] == "Throw the tablecloth away."


def test_content_parts_are_joined_and_reasoning_kept(plane):
    rows = _parsed(plane, "content_parts")
    assert rows[0][2][1]["content"] == "I have one day in Lisbon. What should I not miss?"
    assert rows[1][2][1] == {"role": "assistant", "content": "17 times 23 is 391.",
                             "reasoning": "17 * 23 = 17 * 20 + 17 * 3 = 340 + 51 = 391."}
    assert rows[2][2][1]["content"] == "长城是中国古代修建的防御工程，总长度超过两万公里。"
    assert "'image_url'" in rows[3][7] and "'hologram'" in rows[4][7]
    zh, audio = _parsed(plane, "sharegpt_parts")
    assert zh[2][0] == {"role": "user", "content": "推荐一本适合初学者的编程书。"}
    assert "'input_audio'" in audio[7]
    # Reasoning counts as assistant text for dedup.
    [(text,)] = query(plane, "SELECT dedup_text FROM clean_rows WHERE row_id LIKE '%:2' AND source = 'content_parts'")
    assert "340 + 51 = 391" in text


def test_clean_stores_no_dedup_text_the_turns_spell_out(plane):
    # clean_results keeps its own dedup_text only where the view's conversation_text of the turns would differ from
    # clean's (sql/views.sql); over every layout here, reasoning, tool calls and results included, it never does.
    stored, rows = query(plane, "SELECT count(dedup_text), count(*) FROM clean_results")[0]
    assert (rows, stored) == (43, 0)
    tools = query(plane, "SELECT c.dedup_text FROM clean_rows c WHERE c.source = 'openai_tools' ORDER BY row_seq")
    assert 'get_forecast({"city":"Berlin","days":1})' in tools[0][0]


def test_whole_conversations_under_other_names(plane):
    rows = _parsed(plane, "whole_conversations")
    assert rows[0][2:4] == ([{"role": "user", "content": "Give me a synonym for 'happy'."}], ["Joyful.", "Sad."])
    assert rows[1][2:4] == ([{"role": "user", "content": "把“早上好”翻译成英文。"}], ["Good morning.", "Good night."])


def test_openai_tool_calls_and_results_are_kept(plane):
    rows = _parsed(plane, "openai_tools")
    _, kind, msgs, _, tools, status, *_ = rows[0]
    assert (kind, status, tools) == ("sft", "accepted", [FORECAST_TOOL])
    assert msgs[2] == {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_8KQ2", "name": "get_forecast", "arguments": '{"city":"Berlin","days":1}'}]}
    assert msgs[3] == {"role": "tool", "content": '{"rain_probability": 0.8, "high_c": 14}',
                       "tool_call_id": "call_8KQ2", "name": "get_forecast"}
    parallel = rows[1][2]
    assert [c["name"] for c in parallel[1]["tool_calls"]] == ["get_forecast", "get_forecast"]
    assert [m.get("tool_call_id") for m in parallel[2:4]] == ["call_b", "call_a"]
    assert rows[2][2][3]["content"] == "您的订单 A1029 已发货，预计明天送达。"
    assert "not valid JSON" in rows[3][7]
    assert "follows no tool call" in rows[4][7] and "'call_other'" in rows[5][7]
    # The SQL view counts calls per function, and knows they are declared in the row's tools.
    got = {(s, f): (calls, n, declared) for s, f, calls, n, declared, _ in query(plane, "SELECT * FROM tool_calls")}
    assert got[("openai_tools", "get_forecast")] == (3, 2, True)
    assert got[("sharegpt_tools", "convert_currency")] == (1, 1, True)


def test_sharegpt_function_call_and_observation_turns(plane):
    rows = _parsed(plane, "sharegpt_tools")
    _, kind, msgs, _, tools, status, *_ = rows[0]
    assert status == "accepted"
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "tool", "assistant"]
    assert msgs[2]["tool_calls"] == [{"id": None, "name": "generate_password", "arguments": '{"length":12}'}]
    assert msgs[3]["name"] == "generate_password"
    assert tools == [{"type": "function", "function": json.loads(GLAIVE_TOOLS)[0]}]  # a JSON string in the file
    assert rows[1][4][0]["function"]["description"] == "货币换算"  # a list in the file
    assert "generate_password(length=16)" in rows[2][7]


def test_preference_rows_keep_tool_calls_and_results_in_their_prompts(plane):
    rows = _parsed(plane, "preference_tools")
    assert [r[5] for r in rows] == ["accepted"] * 3 + ["rejected"] * 2
    _, kind, prompt, answers, tools, *_ = rows[0]
    assert (kind, tools, answers[1]) == ("preference", [FORECAST_TOOL], "No, Berlin is always sunny.")
    assert prompt[1:] == [
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_p1", "name": "get_forecast", "arguments": '{"city":"Berlin","days":1}'}]},
        {"role": "tool", "content": '{"rain_probability": 0.8, "high_c": 14}', "tool_call_id": "call_p1",
         "name": "get_forecast"}]
    assert [m["role"] for m in rows[1][2]] == ["user", "assistant", "tool"]
    assert rows[1][3] == ["您的订单已发货，预计明天送达。", "订单还没有发货。"] and rows[1][4] == [ORDER_TOOL]
    assert rows[2][2][1]["tool_calls"] == [{"id": None, "name": "lookup_order", "arguments": '{"order_id":"B77"}'}]
    assert rows[2][2][2]["content"] == '{"status": "派送中"}' and rows[2][4] == [ORDER_TOOL]
    assert "follows no tool call" in rows[3][7] and "a preference answer with tool calls" in rows[4][7]
    # What DPO reads: the prompt through the call and its result, the answers, the tools.
    pairs = query(plane, "SELECT prompt, chosen, tools FROM preference_pairs WHERE source = 'preference_tools' "
                         "ORDER BY chosen")
    assert len(pairs) == 3
    for prompt, chosen, tools in pairs:
        roles = [m["role"] for m in compact_messages(prompt)]
        assert roles == ["user", "assistant", "tool"] and json.loads(tools) and chosen


def test_prompt_completion_rows_are_sft_or_kto_feedback(plane):
    rows = _parsed(plane, "prompt_completion")
    assert [(k, s) for _, k, *__, s, ___, ____ in rows[:5]] == [("sft", "accepted")] * 3 + [("feedback", "accepted")] * 2
    assert rows[0][2] == [{"role": "user", "content": "Name the largest planet in the solar system."},
                          {"role": "assistant", "content": PROMPT_COMPLETION[0]["completion"]}]
    assert rows[1][2][1]["content"].startswith("长江是中国最长的河流")
    _, _, msgs, _, tools, *_ = rows[2]  # the completion's call, its result and the answer, tools with them
    assert [m["role"] for m in msgs] == ["user", "assistant", "tool", "assistant"] and tools == [FORECAST_TOOL]
    assert msgs[1]["tool_calls"][0]["name"] == "get_forecast" and msgs[2]["name"] == "get_forecast"
    labels = query(plane, "SELECT p.label FROM parsed_rows p JOIN raw_rows r USING (row_id) JOIN source_files f "
                          "USING (file_id) WHERE f.source = 'prompt_completion' AND p.kind = 'feedback' "
                          "ORDER BY r.row_number")
    assert labels == [(True,), (False,)]
    assert "completion must start and end with an assistant turn" in rows[5][7]
    assert "label must be true or false" in rows[6][7] and "missing completion" in rows[7][7]


def test_conversations_rendered_into_one_text_field_are_read_back_into_turns(plane):
    rows = _parsed(plane, "rendered_text")
    assert all(kind == "sft" for _, kind, *__ in rows[:6])
    guanaco, llama2, chatml, alpaca_template, hh, hh_in_bos_eos = (r[2] for r in rows[:6])
    assert [m["role"] for m in guanaco] == ["user", "assistant", "user", "assistant"]
    assert guanaco[3]["content"].startswith("The buyer can push prices")
    assert llama2 == [{"role": "system", "content": "你是一位耐心的数学老师。"},
                      {"role": "user", "content": "十二乘以十二等于多少？"},
                      {"role": "assistant", "content": "十二乘以十二等于一百四十四。"},
                      {"role": "user", "content": "那么十三乘以十三呢？"}, {"role": "assistant", "content": "一百六十九。"}]
    assert chatml == [{"role": "system", "content": "You are a terse assistant."},
                      {"role": "user", "content": "Name a prime number above 90."},
                      {"role": "assistant", "content": "97 is prime."}]
    # The template's preamble is not data: the instruction and its input are the user turn.
    assert alpaca_template == [{"role": "user", "content": "把下面的句子翻译成英文。\n\n今天天气很好。"},
                               {"role": "assistant", "content": "The weather is lovely today."}]
    assert hh[1] == {"role": "assistant", "content": "Two to three minutes at about 80 °C."}
    assert hh_in_bos_eos == [{"role": "user", "content": "绿茶应该泡多久？"},
                             {"role": "assistant", "content": "大约两到三分钟，水温八十度左右。"}]
    assert "holds no conversation" in rows[6][7] and "'narrator'" in rows[7][7]


def test_instruction_datasets_and_chats_under_other_field_names(plane):
    dolly, orca, metamath, zh_qa, broken = (r[2] for r in _parsed(plane, "instruction_names"))
    assert dolly[0]["content"] == ("When did Virgin Australia start operating?\n\n" +
                                   INSTRUCTION_NAMES[0]["context"])  # the context is the Alpaca input
    assert dolly[1] == {"role": "assistant", "content": "On 31 August 2000, as Virgin Blue."}
    assert [m["role"] for m in orca] == ["system", "user", "assistant"]
    assert orca[0]["content"].startswith("You are an AI assistant")
    assert metamath[1]["content"].endswith("The answer is: 110")
    assert zh_qa[0] == {"role": "user", "content": "小明有三个苹果，又买了两个，现在一共有几个？"}
    tomato, water = _parsed(plane, "orca_pairs")
    assert tomato[1:4] == ("preference", [{"role": "system", "content": "You are a helpful assistant."},
                                          {"role": "user", "content": "Is a tomato a fruit or a vegetable?"}],
                           [ORCA_PAIRS[0]["chosen"], "A vegetable."])
    assert water[2] == [{"role": "user", "content": "水的沸点是多少？"}]  # an empty system prompt is no turn
    haiku, autumn = (r[2] for r in _parsed(plane, "lmsys_chats"))
    assert [m["role"] for m in haiku] == ["user", "assistant"] and haiku[1]["content"].startswith("Cold rain")
    assert autumn == [{"role": "user", "content": "用三个词形容秋天。"}, {"role": "assistant", "content": "凉爽、金黄、丰收。"}]


def test_column_and_role_mapping_from_config(plane):
    faq = _parsed(plane, "faq_support")
    assert faq[0][2] == [{"role": "user", "content": "How do I reset my router?"},
                         {"role": "assistant", "content": "Hold the reset button for ten seconds."}]
    chats = _parsed(plane, "support_chats")
    assert chats[1][2] == [{"role": "user", "content": "可以开发票吗？"},
                           {"role": "assistant", "content": "可以，请提供您的抬头和税号。"}]
    assert dict(query(plane, "SELECT source, data_format FROM source_files"))["support_chats"] == "messages"


def test_unknown_mapping_targets_fail_at_config_load():
    with pytest.raises(ConfigError, match=r"mappings\.\*faq\*\.columns\.question"):
        load_config(None, {"data.ingest.mappings": {"*faq*": {"columns": {"question": "instructions"}}}})
    with pytest.raises(ConfigError, match=r"mappings\.x\.roles\.agent"):
        load_config(None, {"data.ingest.mappings": {"x": {"roles": {"agent": "bot"}}}})


def test_tool_calls_count_as_assistant_text_for_dedup(tmp_path, make_cfg):
    other_call = _forecast_row()
    other_call["messages"][2]["tool_calls"][0]["function"]["arguments"] = '{"city": "Hamburg", "days": 5}'
    _write(tmp_path, "tools.jsonl", [_forecast_row(), _forecast_row(), other_call])
    cfg = make_cfg(f"data.ingest.inputs=[{tmp_path / 'tools.jsonl'}]")
    run_data_plane(cfg)
    status = [s for (s,) in query(cfg, "SELECT status FROM row_dispositions ORDER BY row_number")]
    assert status == ["accepted", "duplicate", "accepted"]
    texts = [t for (t,) in query(cfg, "SELECT dedup_text FROM clean_rows ORDER BY row_seq")]
    assert 'get_forecast({"city":"Berlin","days":1})' in texts[0]
    assert 'get_forecast({"city":"Hamburg","days":5})' in texts[2]


PLAIN_CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + (m['content'] or '') + "
                "'<|im_end|>\\n' }}{% endfor %}")


def test_a_template_that_cannot_render_tools_rejects_tool_rows_at_clean_time(tmp_path, make_cfg):
    _write(tmp_path, "a_tools.jsonl", [_forecast_row()])
    _write(tmp_path, "b_plain.jsonl", [{"instruction": "Say hi", "input": "", "output": "Hi!"}])
    cfg = make_cfg(f"data.ingest.inputs=[{tmp_path}]", f"model.chat_template={PLAIN_CHATML!r}")
    run_data_plane(cfg)
    rows = query(cfg, "SELECT status, reason, detail FROM row_dispositions ORDER BY source")
    assert rows[0][:2] == ("rejected", "template_lacks_tools")
    assert "drops the tool schemas, the tool calls" in rows[0][2]
    assert rows[1][:2] == ("accepted", None)


def test_the_default_template_renders_tools_calls_results_and_reasoning():
    from transformers.utils.chat_template_utils import render_jinja_template

    from tasks.data.chat_template import DEFAULT_CHAT_TEMPLATE, template_messages, tools_problem

    def render(messages, tools):
        return render_jinja_template([messages], tools=tools, chat_template=DEFAULT_CHAT_TEMPLATE)[0][0]

    assert tools_problem(render) is None
    parsed = formats.normalize(_forecast_row(), "messages")
    text = render(template_messages(parsed.messages), parsed.tools)
    assert '<tool_call>\n{"name": "get_forecast", "arguments": {"city": "Berlin", "days": 1}}\n</tool_call>' in text
    assert '"description": "Weather forecast for a city"' in text
    reasoning = formats.normalize(PARTS[1], "messages").messages
    assert "<think>\n17 * 23 = 17 * 20" in render(template_messages(reasoning), None)
    # Without tools or reasoning it renders as plain ChatML, as before tools existed.
    assert render([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}], None) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n")


def test_a_warehouse_from_before_tool_calls_is_widened_in_place(tmp_path):
    import duckdb

    from tasks.core.warehouse import connect

    path = tmp_path / "old.duckdb"
    con = duckdb.connect(str(path))
    con.execute("CREATE TABLE parsed_rows (row_id VARCHAR PRIMARY KEY, kind VARCHAR, "
                "messages STRUCT(role VARCHAR, content VARCHAR)[], responses VARCHAR[], reason VARCHAR, detail VARCHAR)")
    con.execute("INSERT INTO parsed_rows VALUES ('f:1', 'sft', [{'role': 'user', 'content': 'hi'}], NULL, NULL, NULL)")
    con.close()
    con = connect(path)
    [(messages, tools)] = con.execute("SELECT messages, tools FROM parsed_rows").fetchall()
    assert (compact_messages(messages), tools) == ([{"role": "user", "content": "hi"}], None)
    assert "tool_calls" in con.execute("SELECT data_type FROM information_schema.columns WHERE "
                                       "table_name = 'parsed_rows' AND column_name = 'messages'").fetchone()[0]
    con.close()
