"""Record formats → one canonical form.

Every input record becomes a `Parsed`:
  kind "sft":        messages = the whole conversation, responses None
  kind "preference": messages = the prompt turns, responses = assistant answers ranked best-first (a pair has two)
  kind "feedback":   messages = the whole conversation, label = whether its last answer is desirable (KTO rows:
                     messages + label)
  tools              the function schemas the row offers the model ([{"type": "function", "function": {...}}]), or
                     None
Messages are {"role": "system"|"user"|"assistant"|"tool", "content": str} plus, where the source has them:
  reasoning      an assistant turn's reasoning (reasoning/thinking content parts, or reasoning_content)
  tool_calls     an assistant turn's calls: [{"id": str|None, "name": str, "arguments": JSON object as text}]
  tool_call_id   a tool result: the id of the call it answers (when the source names calls)
  name           a tool result: the name of the function that produced it

A record that cannot be put in that form raises `RecordError(reason, detail)`; the reason is a stable code stored
with the row. Role order, emptiness and length are checked later by the clean stage, not here.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any, NamedTuple

import orjson

FORMATS = ("alpaca", "sharegpt", "messages", "prompt_completion", "text", "preference")

# Speakers and their common aliases (ShareGPT `from`, OpenAI `role`, LLaMA-Factory's tool tags).
ROLE_ALIASES = {
    "human": "user", "user": "user", "prompter": "user",
    "gpt": "assistant", "assistant": "assistant", "bot": "assistant", "model": "assistant", "chatgpt": "assistant",
    "bard": "assistant", "claude": "assistant",
    "system": "system",
    "tool": "tool", "observation": "tool", "function": "tool", "ipython": "tool",
    "function_call": "function_call",  # ShareGPT: an assistant turn whose value is the call as JSON
}

# Alpaca's fields, and the names other instruction datasets give them (Dolly: instruction / context / response,
# OpenOrca: system_prompt / question / response, MetaMathQA: query / response, plain QA: question / answer).
PROMPT_FIELDS = ("instruction", "question", "query")
ANSWER_FIELDS = ("output", "response", "answer")
CONTEXT_FIELDS = ("input", "context")
SYSTEM_FIELDS = ("system", "system_prompt")

# Content-part types (OpenAI chat and Responses, Anthropic): what each becomes.
TEXT_PARTS = {"text", "input_text", "output_text", "refusal"}
REASONING_PARTS = {"reasoning", "thinking"}
CALL_PARTS = {"tool_use", "tool_call", "function_call"}
RESULT_PARTS = {"tool_result", "function_call_output"}
MEDIA_PARTS = {"image", "image_url", "input_image", "output_image", "audio", "input_audio", "output_audio", "file",
               "input_file", "document", "video", "video_url", "redacted_thinking"}


class RecordError(ValueError):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


class Parsed(NamedTuple):
    kind: str
    messages: list[dict]
    responses: list[str] | None = None
    tools: list[dict] | None = None
    label: bool | None = None  # feedback rows: the last answer is desirable (True) or undesirable (False)


def detect(record: dict) -> str | None:
    """The format a record looks like, from its keys; None when it matches none."""
    keys = set(record)
    if {"chosen", "rejected"} <= keys or {"chosen_messages", "rejected_messages"} <= keys:
        return "preference"
    if isinstance(record.get("output"), list) or isinstance(record.get("responses"), list):
        return "preference"  # ranked answers, best first
    if {"prompt", "completion"} <= keys:
        return "prompt_completion"
    if "conversations" in keys or "conversation" in keys:  # the singular: LMSYS-Chat-1M, WildChat
        return "sharegpt"
    if "messages" in keys:
        return "messages"
    if keys & set(PROMPT_FIELDS) and keys & set(ANSWER_FIELDS):
        return "alpaca"
    if "text" in keys:
        return "text"
    return None


DETECTION_SAMPLE = 200


def detect_file_format(records: list[Any], sample: int = DETECTION_SAMPLE) -> str | None:
    """Majority format over the first `sample` records of a file (files are one format; stray rows are rejected)."""
    votes = Counter(detect(r) for r in records[:sample] if isinstance(r, dict))
    votes.pop(None, None)
    return votes.most_common(1)[0][0] if votes else None


# ------------------------------------------------------------------ column and role mapping
TURN_FIELDS = ("conversations", "conversation", "messages", "prompt", "chosen", "rejected", "chosen_messages",
               "rejected_messages")


def apply_mapping(record: dict, columns: dict[str, str], role_key: str | None = None,
                  content_key: str | None = None, roles: dict[str, str] | None = None) -> dict:
    """The record with its fields renamed onto ours, and inside conversations its turns' speaker / text fields and
    speaker values mapped too (a dataset registry entry, as other tools have). The raw row is never changed."""
    out = {columns.get(k, k): v for k, v in record.items()}
    if not (role_key or content_key or roles):
        return out

    def turn(t: Any) -> Any:
        if not isinstance(t, dict):
            return t
        t = dict(t)
        if role_key and role_key in t:
            t["role"] = t.pop(role_key)
        if content_key and content_key in t:
            t["content"] = t.pop(content_key)
        speaker = t.get("role", t.get("from"))
        if roles and isinstance(speaker, str) and speaker in roles:
            t.pop("from", None)
            t["role"] = roles[speaker]
        return t

    for name in TURN_FIELDS:
        value = out.get(name)
        if isinstance(value, str) and value.lstrip().startswith("["):
            try:
                value = orjson.loads(value)
            except orjson.JSONDecodeError:
                continue  # reported as wrong_type when the field is read
        if isinstance(value, list):
            out[name] = [turn(t) for t in value]
        elif isinstance(value, dict):
            out[name] = turn(value)
    return out


# ------------------------------------------------------------------ field helpers
def _json_value(value: Any, field: str, reason: str = "wrong_type") -> Any:
    """Lists and objects may arrive JSON-encoded (CSV cells, stringly-typed Parquet columns, ShareGPT tools)."""
    if isinstance(value, str) and value.lstrip()[:1] in ("[", "{"):
        try:
            return orjson.loads(value)
        except orjson.JSONDecodeError as err:
            raise RecordError(reason, f"{field} is a string that is not valid JSON: {err}") from None
    return value


def _as_list(value: Any, field: str) -> list:
    value = _json_value(value, field)
    if not isinstance(value, list):
        raise RecordError("wrong_type", f"{field} must be a list, got {type(value).__name__}")
    return value


def _text(value: Any, field: str, optional: bool = False) -> str:
    if value is None:
        if optional:
            return ""
        raise RecordError("missing_field", f"{field} is missing")
    if not isinstance(value, str):
        raise RecordError("wrong_type", f"{field} must be a string, got {type(value).__name__}")
    return value


def _require(record: dict, *fields: str) -> None:
    missing = [f for f in fields if f not in record or record[f] is None]
    if missing:
        raise RecordError("missing_field", f"missing {', '.join(missing)}")


# ------------------------------------------------------------------ tools and tool calls
def _arguments(value: Any, field: str) -> str:
    """Call arguments as the text of a JSON object (OpenAI sends a JSON string, others an object)."""
    if value is None:
        value = {}
    if isinstance(value, str):
        try:
            value = orjson.loads(value) if value.strip() else {}
        except orjson.JSONDecodeError as err:
            raise RecordError("invalid_tool_call", f"{field} is not valid JSON: {err}: {value[:80]!r}") from None
    if not isinstance(value, dict):
        raise RecordError("invalid_tool_call", f"{field} must be a JSON object, got {type(value).__name__}")
    return orjson.dumps(value).decode()


def _tool_call(value: Any, field: str) -> dict:
    """One call: OpenAI {id, type, function: {name, arguments}}, flat {name, arguments}, or Anthropic
    {type: tool_use, id, name, input}."""
    if not isinstance(value, dict):
        raise RecordError("invalid_tool_call", f"{field} must be an object, got {type(value).__name__}")
    fn = value.get("function") if isinstance(value.get("function"), dict) else value
    name = fn.get("name")
    if not isinstance(name, str) or not name.strip():
        raise RecordError("invalid_tool_call", f"{field} has no function name")
    args = fn["input"] if "input" in fn and "arguments" not in fn else fn.get("arguments", fn.get("parameters"))
    call_id = value.get("id", value.get("call_id"))
    return {"id": str(call_id) if call_id is not None else None, "name": name,
            "arguments": _arguments(args, f"{field}.arguments")}


def _tool_calls(value: Any, field: str) -> list[dict]:
    value = _json_value(value, field, "invalid_tool_call")
    if isinstance(value, str):
        raise RecordError("invalid_tool_call", f"{field} is not a JSON call object: {value[:80]!r}")
    calls = value if isinstance(value, list) else [value]
    return [_tool_call(c, f"{field}[{i}]") for i, c in enumerate(calls)]


def tools_of(value: Any, field: str = "tools") -> list[dict] | None:
    """Function schemas in OpenAI's shape: [{"type": "function", "function": {name, description, parameters}}].
    Accepts that shape and bare {name, description, parameters} objects (LLaMA-Factory), either as a JSON string;
    other fields of a schema are not kept."""
    if value is None or value == "" or value == []:
        return None
    value = _json_value(value, field, "invalid_tools")
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise RecordError("invalid_tools", f"{field} must be a list of function schemas, got {type(value).__name__}")
    tools = []
    for i, tool in enumerate(value):
        fn = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"].strip():
            raise RecordError("invalid_tools", f"{field}[{i}] is not a function schema with a name")
        if "parameters" in fn and not isinstance(fn["parameters"], dict):
            raise RecordError("invalid_tools", f"{field}[{i}].parameters must be a JSON schema object")
        # The shape an OpenAI-compatible server (vLLM) hands the chat template, so training renders the prompt a
        # served request renders: name, description, parameters (null when absent), strict when given.
        schema = {"name": fn["name"], "description": fn.get("description"), "parameters": fn.get("parameters")}
        if fn.get("strict") is not None:
            schema["strict"] = fn["strict"]
        tools.append({"type": "function", "function": schema})
    return tools


# ------------------------------------------------------------------ turns
def _part_text(part: dict, field: str, *keys: str) -> str:
    for key in keys:
        value = part.get(key)
        if isinstance(value, str):
            return value
        if isinstance(value, list):  # OpenAI Responses: reasoning summary = [{"type": "summary_text", "text"}]
            return "\n".join(_part_text(p, field, "text") if isinstance(p, dict) else _text(p, field) for p in value)
    raise RecordError("wrong_type", f"{field} has no text ({' / '.join(keys)})")


class _Content(NamedTuple):
    text: str | None
    reasoning: str | None
    calls: list[dict]
    results: list[dict]


def _content(value: Any, field: str) -> _Content:
    """A turn's content: a string, or a list of typed parts (text parts are joined in order)."""
    if value is None or isinstance(value, str):
        return _Content(value, None, [], [])
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise RecordError("wrong_type", f"{field} must be a string or a list of parts, got {type(value).__name__}")
    texts, reasoning, calls, results = [], [], [], []
    for i, part in enumerate(value):
        where = f"{field}[{i}]"
        if isinstance(part, str):
            texts.append(part)
            continue
        if not isinstance(part, dict):
            raise RecordError("wrong_type", f"{where} must be a part object, got {type(part).__name__}")
        kind = part.get("type", "text" if ("text" in part or "value" in part) else None)
        if kind in TEXT_PARTS:
            texts.append(_part_text(part, where, "text", "value", "refusal"))
        elif kind in REASONING_PARTS:
            reasoning.append(_part_text(part, where, "text", "value", "reasoning", "thinking", "summary"))
        elif kind in CALL_PARTS:
            calls.append(_tool_call(part, where))
        elif kind in RESULT_PARTS:
            inner = _content(part.get("content", part.get("output")), f"{where}.content")
            call_id = part.get("tool_use_id", part.get("call_id", part.get("tool_call_id")))
            results.append({"role": "tool", "content": inner.text or "",
                            "tool_call_id": str(call_id) if call_id is not None else None})
        elif kind in MEDIA_PARTS:
            raise RecordError("unsupported_content", f"{where} is a {kind!r} part: only text is trained on")
        else:
            raise RecordError("unknown_part_type", f"{where} has part type {kind!r}")
    return _Content("".join(texts) if texts or not (calls or results) else None,
                    "\n\n".join(reasoning) or None, calls, results)


def _turn(turn: Any, field: str) -> list[dict]:
    """One source turn in ShareGPT ({from, value}) or OpenAI ({role, content, ...}) shape → canonical messages (a
    user turn of tool-result parts gives tool messages)."""
    if not isinstance(turn, dict):
        raise RecordError("wrong_type", f"{field} must be an object, got {type(turn).__name__}")
    speaker = turn.get("role", turn.get("from"))
    if speaker is None:
        raise RecordError("missing_field", f"{field} has no role/from")
    role = ROLE_ALIASES.get(str(speaker).lower())
    if role is None:
        raise RecordError("unsupported_role", f"{field} role {speaker!r} is not system/user/assistant/tool")
    raw_content = turn.get("content", turn.get("value"))
    if role == "function_call":  # ShareGPT: the value is the call (or a list of calls) as JSON
        return [{"role": "assistant", "content": "", "tool_calls": _tool_calls(raw_content, f"{field}.value")}]
    content = _content(raw_content, f"{field}.content")
    if role == "assistant":
        calls = content.calls
        if turn.get("tool_calls"):
            calls = calls + _tool_calls(turn["tool_calls"], f"{field}.tool_calls")
        if turn.get("function_call"):  # OpenAI's older single-call field
            calls = calls + _tool_calls(turn["function_call"], f"{field}.function_call")
        reasoning = content.reasoning
        for key in ("reasoning_content", "reasoning", "thinking"):
            if reasoning is None and turn.get(key) is not None:
                reasoning = _text(turn[key], f"{field}.{key}")
        msg = {"role": "assistant", "content": _text(content.text, f"{field}.content", optional=bool(calls))}
        if reasoning:
            msg["reasoning"] = reasoning
        if calls:
            msg["tool_calls"] = calls
        return [msg]
    if content.calls:
        raise RecordError("wrong_role_order", f"{field} is a {role} turn with tool calls")
    if role == "tool":
        call_id = turn.get("tool_call_id")
        msg = {"role": "tool", "content": _text(content.text, f"{field}.content"),
               "tool_call_id": str(call_id) if call_id is not None else None}
        if isinstance(turn.get("name"), str):
            msg["name"] = turn["name"]
        return [msg]
    if content.results and role != "user":
        raise RecordError("wrong_role_order", f"{field} is a {role} turn with tool results")
    text = [{"role": role, "content": content.text}] if content.text is not None else []
    if not (content.results or text):
        raise RecordError("missing_field", f"{field}.content is missing")
    return content.results + text


def _link_tool_results(msgs: list[dict], field: str) -> list[dict]:
    """Every tool result answers a call of the assistant turn just before it; fills in the function's name."""
    calls: list[dict] = []
    answered = 0
    for i, m in enumerate(msgs):
        if m["role"] != "tool":
            calls, answered = (m.get("tool_calls") or []) if m["role"] == "assistant" else [], 0
            continue
        if not calls:
            raise RecordError("orphan_tool_result", f"{field}: tool result at turn {i} follows no tool call")
        if m.get("tool_call_id") is not None and any(c["id"] is not None for c in calls):
            match = [c for c in calls if c["id"] == m["tool_call_id"]]
            if not match:
                raise RecordError("orphan_tool_result",
                                  f"{field}: tool result {m['tool_call_id']!r} at turn {i} answers no call")
            call = match[0]
        elif answered < len(calls):
            call = calls[answered]
        else:
            raise RecordError("orphan_tool_result", f"{field}: more tool results than the {len(calls)} call(s) "
                              f"before turn {i}")
        answered += 1
        m.setdefault("name", call["name"])
    return msgs


def _messages(value: Any, field: str) -> list[dict]:
    turns = _as_list(value, field)
    return _link_tool_results([m for i, t in enumerate(turns) for m in _turn(t, f"{field}[{i}]")], field)


# ------------------------------------------------------------------ HH-RLHF transcripts
_TRANSCRIPT_SPEAKERS = {"Human": ("Human", "Assistant"), "H": ("H", "A")}
_TRANSCRIPT_START = re.compile(r"\s*(Human|H):")


def is_transcript(text: Any) -> bool:
    """A string shaped like Anthropic's HH-RLHF: "\\n\\nHuman: …\\n\\nAssistant: …" (or the H: / A: shorthand)."""
    m = isinstance(text, str) and _TRANSCRIPT_START.match(text)
    return bool(m) and re.search(rf"\n\s*{_TRANSCRIPT_SPEAKERS[m.group(1)][1]}:", text) is not None


def transcript(text: Any, field: str, prompt: bool = False) -> list[dict]:
    """The turns of an HH-style transcript. Speakers are matched at line starts only, in the style the transcript
    opens with (so "A:" inside a "Human:" transcript is text). A prompt's trailing empty "Assistant:" is the cue to
    answer and is dropped."""
    text = _text(text, field)
    m = _TRANSCRIPT_START.match(text)
    if not m:
        raise RecordError("unparseable_transcript",
                          f"{field} does not open with a 'Human:' turn: {text.lstrip()[:60]!r}")
    user, assistant = _TRANSCRIPT_SPEAKERS[m.group(1)]
    pieces = re.split(rf"(?:^\s*|\n\s*)({user}|{assistant}):", text)
    msgs = [{"role": "user" if who == user else "assistant", "content": said.strip()}
            for who, said in zip(pieces[1::2], pieces[2::2])]
    if prompt and msgs and msgs[-1]["role"] == "assistant" and not msgs[-1]["content"]:
        msgs.pop()
    for i in range(1, len(msgs)):
        if msgs[i]["role"] == msgs[i - 1]["role"]:
            raise RecordError("unparseable_transcript", f"{field}: two {msgs[i]['role']} turns in a row at turn {i}")
    return msgs


# ------------------------------------------------------------------ a conversation rendered into one text field
# Datasets published for trainers that take one `text` column carry the conversation already rendered: guanaco's
# "### Human: … ### Assistant: …", the Alpaca prompt template ("### Instruction: … ### Response: …"), Llama 2's
# "<s>[INST] <<SYS>>…<</SYS>> … [/INST] … </s>", ChatML's "<|im_start|>role\n…<|im_end|>", or an HH transcript (also
# one turn per "<s>…</s>"). The turns are read back out, so they are cleaned, deduplicated and rendered with the
# training model's own template like every other row.
_GUANACO = re.compile(r"###\s*(Human|Assistant)\s*:")
_CHATML = re.compile(r"<\|im_start\|>\s*(\w+)[^\S\n]*\n?(.*?)\s*(?:<\|im_end\|>|(?=<\|im_start\|>)|\Z)", re.S)
_LLAMA2 = re.compile(r"\[INST\](.*?)\[/INST\](.*?)(?=(?:<s>)?\s*\[INST\]|\Z)", re.S)
_LLAMA2_SYSTEM = re.compile(r"^\s*<<SYS>>(.*?)<</SYS>>", re.S)
_ALPACA_TEXT = re.compile(r"### Instruction:\s*(.*?)\s*(?:### Input:\s*(.*?)\s*)?### Response:\s*(.*)", re.S)


def text_turns(text: Any, field: str = "text") -> list[dict]:
    """The turns of a conversation rendered as text in one of the styles above; RecordError when it is none."""
    text = _text(text, field)
    unmarked = re.sub(r"</?s>", "\n", text)  # "<s>Human: …</s><s>Assistant: …</s>" (Llama2-Chinese and the like)
    if is_transcript(unmarked):
        return transcript(unmarked, field)
    if _GUANACO.search(text):
        pieces = _GUANACO.split(text)
        if pieces[0].strip():
            raise RecordError("unparseable_transcript", f"{field}: text before the first '### Human:' turn")
        return [{"role": "user" if who == "Human" else "assistant", "content": said.strip()}
                for who, said in zip(pieces[1::2], pieces[2::2])]
    if "<|im_start|>" in text:
        turns = [{"role": ROLE_ALIASES.get(role.lower(), role), "content": said.strip()}
                 for role, said in _CHATML.findall(text)]
        unknown = [t["role"] for t in turns if t["role"] not in ("system", "user", "assistant", "tool")]
        if unknown:
            raise RecordError("unsupported_role", f"{field}: ChatML role {unknown[0]!r}")
        return turns
    if alpaca_text := _ALPACA_TEXT.search(text):  # the Alpaca prompt template; its preamble is template, not data
        instruction, extra, answer = (g.strip() if g else "" for g in alpaca_text.groups())
        return [{"role": "user", "content": _instruction_with_input(instruction, extra)},
                {"role": "assistant", "content": answer}]
    if "[INST]" in text:
        msgs = []
        for user, answer in _LLAMA2.findall(text.replace("</s>", "")):
            system = _LLAMA2_SYSTEM.match(user)
            if system and not msgs:
                msgs.append({"role": "system", "content": system.group(1).strip()})
                user = user[system.end():]
            msgs.append({"role": "user", "content": user.strip()})
            if answer.strip():
                msgs.append({"role": "assistant", "content": answer.strip()})
        return msgs
    raise RecordError("unparseable_transcript", f"{field} holds no conversation (no 'Human:', '### Human:', '### "
                      f"Instruction:', '[INST]' or '<|im_start|>' turns; plain text is not a training example here): "
                      f"{text[:60]!r}")


# ------------------------------------------------------------------ formats
def _field(record: dict, names: tuple[str, ...]) -> str:
    """The first of `names` the record has a value for (else the first name, so errors name Alpaca's field)."""
    return next((n for n in names if record.get(n) is not None), names[0])


def _with_system(record: dict, msgs: list[dict]) -> list[dict]:
    field = _field(record, SYSTEM_FIELDS)
    system = record.get(field)
    if system and not (msgs and msgs[0]["role"] == "system"):
        msgs.insert(0, {"role": "system", "content": _text(system, field)})
    return msgs


def _instruction_with_input(instruction: str, extra: str) -> str:
    """Alpaca's user turn: the instruction, then its input (if any) after a blank line."""
    return f"{instruction}\n\n{extra}" if extra.strip() else instruction


def _alpaca_prompt(record: dict) -> list[dict]:
    field = _field(record, PROMPT_FIELDS)
    _require(record, field)
    msgs = _with_system(record, [])
    for i, pair in enumerate(_as_list(record.get("history") or [], "history")):
        if not isinstance(pair, list) or len(pair) != 2:
            raise RecordError("wrong_type", f"history[{i}] must be a [user, assistant] pair")
        msgs.append({"role": "user", "content": _text(pair[0], f"history[{i}][0]")})
        msgs.append({"role": "assistant", "content": _text(pair[1], f"history[{i}][1]")})
    instruction = _text(record[field], field)
    context = _field(record, CONTEXT_FIELDS)
    extra = _text(record.get(context), context, optional=True)
    msgs.append({"role": "user", "content": _instruction_with_input(instruction, extra)})
    return msgs


def _tools(record: dict) -> list[dict] | None:
    if record.get("tools") not in (None, "", []):
        return tools_of(record["tools"], "tools")
    return tools_of(record.get("functions"), "functions")  # OpenAI's older name


def alpaca(record: dict) -> Parsed:
    answer = _field(record, ANSWER_FIELDS)
    _require(record, _field(record, PROMPT_FIELDS), answer)
    msgs = _alpaca_prompt(record) + [{"role": "assistant", "content": _text(record[answer], answer)}]
    return Parsed("sft", msgs, None, _tools(record))


def sharegpt(record: dict) -> Parsed:
    field = _field(record, ("conversations", "conversation"))
    _require(record, field)
    return Parsed("sft", _with_system(record, _messages(record[field], field)), None,
                  _tools(record))


def messages(record: dict) -> Parsed:
    _require(record, "messages")
    return _labelled(record, _messages(record["messages"], "messages"), _tools(record))


def prompt_completion(record: dict) -> Parsed:
    """TRL's prompt-completion layout, also OpenAI's legacy fine-tuning files: `prompt` (a string, an HH transcript
    or turns) and `completion` (a string or the assistant's turns: calls, their results, the answer). With `label`
    it is TRL's unpaired preference layout for KTO: a feedback row, as `messages` + `label` is."""
    _require(record, "prompt", "completion")
    prompt = _explicit_prompt(record)
    if not prompt:
        raise RecordError("missing_field", "prompt is empty")
    completion = record["completion"]
    answer = ([{"role": "assistant", "content": _text(completion, "completion")}] if isinstance(completion, str)
              else _messages(completion, "completion"))
    if not answer or answer[0]["role"] != "assistant" or answer[-1]["role"] != "assistant":
        raise RecordError("wrong_role_order", "completion must start and end with an assistant turn")
    if prompt[-1]["role"] == "assistant":
        raise RecordError("wrong_role_order", "prompt must end with a user or tool turn: the completion answers it")
    return _labelled(record, _with_system(record, prompt + answer), _tools(record))


def _labelled(record: dict, msgs: list[dict], tools: list[dict] | None) -> Parsed:
    """An SFT row, or with `label` a KTO row: the label says whether the last answer is desirable. An undesirable
    one must never reach SFT, so these rows are kept apart (kind feedback); SFT reads only the desirable ones (view
    sft_examples)."""
    if record.get("label") is None:
        return Parsed("sft", msgs, None, tools)
    if not isinstance(record["label"], bool):
        raise RecordError("wrong_type", f"label must be true or false, got {record['label']!r}")
    return Parsed("feedback", msgs, None, tools, label=record["label"])


def text(record: dict) -> Parsed:
    _require(record, "text")
    return Parsed("sft", _with_system(record, text_turns(record["text"])), None, None)


def _answer(msg: dict, field: str) -> str:
    if msg["role"] != "assistant":
        raise RecordError("wrong_role_order", f"{field} must be an assistant turn, got {msg['role']}")
    if msg.get("tool_calls") or msg.get("reasoning"):
        what = "tool calls" if msg.get("tool_calls") else "separate reasoning"
        raise RecordError("unsupported_content", f"{field}: a preference answer with {what} (answers are text)")
    return msg["content"]


def _response(value: Any, field: str) -> str | list[dict]:
    """A preference answer: a string, one message object, or a whole conversation (implicit prompt)."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        return _answer(_turn(value, field)[-1], field)
    return _messages(value, field)


def _split_implicit(chosen: list[dict], rejected: list[dict]) -> tuple[list[dict], str, str]:
    """Whole conversations sharing a prefix: the prompt is the common prefix, the answers what follows."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    # The shared prefix must end before the final assistant turns; back off if it swallowed an assistant turn.
    while n > 0 and chosen[n - 1]["role"] == "assistant":
        n -= 1
    tails = chosen[n:], rejected[n:]
    for name, tail in zip(("chosen", "rejected"), tails):
        if len(tail) != 1 or tail[0]["role"] != "assistant":
            raise RecordError("wrong_role_order", f"{name} must differ from the shared prompt by one assistant turn")
    return chosen[:n], _answer(tails[0][0], "chosen"), _answer(tails[1][0], "rejected")


def _explicit_prompt(record: dict) -> list[dict]:
    """The prompt: explicit `prompt` (a string, an HH transcript or turns), ShareGPT `conversations`, OpenAI
    `messages`, or Alpaca fields."""
    if record.get("prompt") is not None:
        p = record["prompt"]
        if is_transcript(p):
            return transcript(p, "prompt", prompt=True)
        return [{"role": "user", "content": p}] if isinstance(p, str) else _messages(p, "prompt")
    if "conversations" in record:
        return _messages(record["conversations"], "conversations")
    if "messages" in record:
        return _messages(record["messages"], "messages")
    if any(record.get(k) is not None for k in PROMPT_FIELDS):
        return _alpaca_prompt(record)
    return []


def preference(record: dict) -> Parsed:
    tools = _tools(record)
    ranked = record.get("responses", record.get("output"))
    if isinstance(ranked, list) and "chosen" not in record:
        prompt = _with_system(record, _explicit_prompt(record))
        answers = [a if isinstance(a, str) else _response(a, f"responses[{i}]") for i, a in enumerate(ranked)]
        if any(not isinstance(a, str) for a in answers):
            raise RecordError("wrong_type", "ranked responses must be strings or single assistant turns")
        if len(answers) < 2:
            raise RecordError("missing_field", "a ranked list needs at least two responses")
        return Parsed("preference", prompt, answers, tools)

    names = ("chosen", "rejected") if "chosen" in record else ("chosen_messages", "rejected_messages")
    _require(record, *names)
    raw_chosen, raw_rejected = record[names[0]], record[names[1]]
    explicit = record.get("prompt") is not None or any(k in record for k in ("conversations", *PROMPT_FIELDS))
    if isinstance(raw_chosen, str) and isinstance(raw_rejected, str) and not explicit and "messages" not in record:
        # No prompt anywhere: the strings are whole HH-style transcripts.
        chosen, rejected = transcript(raw_chosen, names[0]), transcript(raw_rejected, names[1])
    else:
        chosen, rejected = _response(raw_chosen, names[0]), _response(raw_rejected, names[1])
    if isinstance(chosen, list) and isinstance(rejected, list):
        # Whole conversations: their shared prefix is the prompt (a `prompt` / `messages` field next to them is
        # usually a copy of it, as in UltraFeedback-style rows, and is used only when they share nothing).
        shared, chosen, rejected = _split_implicit(chosen, rejected)
        prompt = shared or _explicit_prompt(record)
    elif isinstance(chosen, list) or isinstance(rejected, list):
        raise RecordError("wrong_type", "chosen and rejected must both be conversations or both be answers")
    else:
        prompt = _explicit_prompt(record)
    if not prompt:
        raise RecordError("missing_field", "no prompt: expected prompt, conversations, messages, instruction or "
                          "question")
    return Parsed("preference", _with_system(record, prompt), [chosen, rejected], tools)


NORMALIZERS = {"alpaca": alpaca, "sharegpt": sharegpt, "messages": messages, "prompt_completion": prompt_completion,
               "text": text, "preference": preference}


def normalize(record: Any, fmt: str | None) -> Parsed:
    """The canonical form of one record in format `fmt`, or RecordError."""
    if not isinstance(record, dict):
        raise RecordError("wrong_type", f"a record must be a JSON object, got {type(record).__name__}")
    if fmt is None:
        raise RecordError("unknown_format", f"fields {sorted(record)[:8]} match no supported format")
    return NORMALIZERS[fmt](record)


# ------------------------------------------------------------------ what a conversation says, as text
def call_text(call: dict) -> str:
    return f"{call['name']}({call['arguments']})"


def turn_text(msg: dict) -> str:
    """Everything a turn says, for dedup and length checks: reasoning, text and tool calls."""
    parts = [msg.get("reasoning") or "", msg.get("content") or ""]
    parts += [call_text(c) for c in msg.get("tool_calls") or []]
    return "\n".join(p for p in parts if p)
