"""Record formats → one canonical form.

Every input record becomes either
  ("sft", messages, None)                     a conversation, or
  ("preference", prompt_messages, responses)  prompt turns + assistant answers ranked best-first (a pair has two),
where messages are [{"role": "system"|"user"|"assistant", "content": str}].

A record that cannot be put in that form raises `RecordError(reason, detail)`; the reason is a stable code stored
with the row. Role order, emptiness and length are checked later by the clean stage, not here.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import orjson

FORMATS = ("alpaca", "sharegpt", "messages", "preference")

# ShareGPT speakers and their common aliases.
ROLE_ALIASES = {
    "human": "user", "user": "user", "prompter": "user",
    "gpt": "assistant", "assistant": "assistant", "bot": "assistant", "model": "assistant", "chatgpt": "assistant",
    "bard": "assistant", "claude": "assistant",
    "system": "system",
}


class RecordError(ValueError):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def detect(record: dict) -> str | None:
    """The format a record looks like, from its keys; None when it matches none."""
    keys = set(record)
    if "chosen" in keys and "rejected" in keys:
        return "preference"
    if isinstance(record.get("output"), list) or isinstance(record.get("responses"), list):
        return "preference"  # ranked answers, best first
    if "conversations" in keys:
        return "sharegpt"
    if "messages" in keys:
        return "messages"
    if "instruction" in keys and "output" in keys:
        return "alpaca"
    return None


def detect_file_format(records: list[Any], sample: int = 200) -> str | None:
    """Majority format over the first `sample` records of a file (files are one format; stray rows are rejected)."""
    votes = Counter(detect(r) for r in records[:sample] if isinstance(r, dict))
    votes.pop(None, None)
    return votes.most_common(1)[0][0] if votes else None


# ------------------------------------------------------------------ field helpers
def _as_list(value: Any, field: str) -> list:
    """Lists may arrive JSON-encoded (CSV cells, stringly-typed Parquet columns)."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            value = orjson.loads(value)
        except orjson.JSONDecodeError as err:
            raise RecordError("wrong_type", f"{field} is a string that is not a JSON list: {err}") from None
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


def _message(turn: Any, field: str) -> dict[str, str]:
    """One turn in ShareGPT ({from, value}) or OpenAI ({role, content}) shape."""
    if not isinstance(turn, dict):
        raise RecordError("wrong_type", f"{field} must be an object, got {type(turn).__name__}")
    speaker = turn.get("role", turn.get("from"))
    if speaker is None:
        raise RecordError("missing_field", f"{field} has no role/from")
    role = ROLE_ALIASES.get(str(speaker).lower())
    if role is None:
        raise RecordError("unsupported_role", f"{field} role {speaker!r} is not system/user/assistant")
    content = turn.get("content", turn.get("value"))
    return {"role": role, "content": _text(content, f"{field}.content")}


def _messages(value: Any, field: str) -> list[dict[str, str]]:
    return [_message(t, f"{field}[{i}]") for i, t in enumerate(_as_list(value, field))]


# ------------------------------------------------------------------ formats
def _alpaca_prompt(record: dict) -> list[dict[str, str]]:
    _require(record, "instruction")
    msgs = []
    system = _text(record.get("system"), "system", optional=True)
    if system:
        msgs.append({"role": "system", "content": system})
    for i, pair in enumerate(_as_list(record.get("history") or [], "history")):
        if not isinstance(pair, list) or len(pair) != 2:
            raise RecordError("wrong_type", f"history[{i}] must be a [user, assistant] pair")
        msgs.append({"role": "user", "content": _text(pair[0], f"history[{i}][0]")})
        msgs.append({"role": "assistant", "content": _text(pair[1], f"history[{i}][1]")})
    instruction = _text(record["instruction"], "instruction")
    extra = _text(record.get("input"), "input", optional=True)
    msgs.append({"role": "user", "content": f"{instruction}\n\n{extra}" if extra.strip() else instruction})
    return msgs


def alpaca(record: dict):
    _require(record, "instruction", "output")
    return "sft", _alpaca_prompt(record) + [{"role": "assistant", "content": _text(record["output"], "output")}], None


def sharegpt(record: dict):
    _require(record, "conversations")
    msgs = _messages(record["conversations"], "conversations")
    system = record.get("system")
    if system:
        msgs.insert(0, {"role": "system", "content": _text(system, "system")})
    return "sft", msgs, None


def messages(record: dict):
    _require(record, "messages")
    if record.get("label") is False:
        # KTO-style rows: label false marks an undesirable answer, which SFT must not learn from.
        raise RecordError("negative_label", "label is false: the answer is marked undesirable")
    return "sft", _messages(record["messages"], "messages"), None


def _response(value: Any, field: str) -> str | list[dict[str, str]]:
    """A preference answer: a string, one message object, or a whole conversation (implicit prompt)."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        msg = _message(value, field)
        if msg["role"] != "assistant":
            raise RecordError("wrong_role_order", f"{field} must be an assistant turn, got {msg['role']}")
        return msg["content"]
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
    return chosen[:n], tails[0][0]["content"], tails[1][0]["content"]


def preference(record: dict):
    # The prompt: explicit `prompt`, ShareGPT `conversations`, OpenAI `messages`, or Alpaca fields.
    if "prompt" in record and record["prompt"] is not None:
        p = record["prompt"]
        prompt = [{"role": "user", "content": p}] if isinstance(p, str) else _messages(p, "prompt")
    elif "conversations" in record:
        prompt = _messages(record["conversations"], "conversations")
    elif "messages" in record:
        prompt = _messages(record["messages"], "messages")
    elif "instruction" in record:
        prompt = _alpaca_prompt(record)
    else:
        prompt = []
    if record.get("system") and not (prompt and prompt[0]["role"] == "system"):
        prompt.insert(0, {"role": "system", "content": _text(record["system"], "system")})

    ranked = record.get("responses", record.get("output"))
    if isinstance(ranked, list) and "chosen" not in record:
        answers = [_response(a, f"responses[{i}]") for i, a in enumerate(ranked)]
        if any(not isinstance(a, str) for a in answers):
            raise RecordError("wrong_type", "ranked responses must be strings or single assistant turns")
        if len(answers) < 2:
            raise RecordError("missing_field", "a ranked list needs at least two responses")
        return "preference", prompt, answers

    _require(record, "chosen", "rejected")
    chosen, rejected = _response(record["chosen"], "chosen"), _response(record["rejected"], "rejected")
    if isinstance(chosen, list) and isinstance(rejected, list):
        shared, chosen, rejected = _split_implicit(chosen, rejected)
        prompt = prompt + shared
    elif isinstance(chosen, list) or isinstance(rejected, list):
        raise RecordError("wrong_type", "chosen and rejected must both be conversations or both be answers")
    if not prompt:
        raise RecordError("missing_field", "no prompt: expected prompt, conversations, messages or instruction")
    return "preference", prompt, [chosen, rejected]


NORMALIZERS = {"alpaca": alpaca, "sharegpt": sharegpt, "messages": messages, "preference": preference}


def normalize(record: Any, fmt: str):
    """(kind, messages, responses) for one record in format `fmt`, or RecordError."""
    if not isinstance(record, dict):
        raise RecordError("wrong_type", f"a record must be a JSON object, got {type(record).__name__}")
    if fmt is None:
        raise RecordError("unknown_format", f"fields {sorted(record)[:8]} match no supported format")
    return NORMALIZERS[fmt](record)
