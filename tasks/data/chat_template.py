"""Chat templates as the canonical messages meet them.

- DEFAULT_CHAT_TEMPLATE, installed by training where a tokenizer has no template (ChatML-style, with tools).
- `template_messages` / `template_tools`: canonical messages and tools (tasks/data/formats.py) in the shape
  transformers' `apply_chat_template(messages, tools=...)` and vLLM's chat endpoint read.
- `tools_problem`: whether a template can render tool calling at all, so the clean stage rejects tool rows
  (`template_lacks_tools`) instead of training on conversations whose calls or results the template drops.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson

# ChatML-style default. Assistant content, its tool calls, its end marker and EOS sit inside {% generation %} so
# `return_assistant_tokens_mask` (trl's assistant_only_loss) selects exactly what the model must produce, including
# how to stop; tool results are prompt, not target. Tools are listed in the system turn and calls are written as
# <tool_call>{"name": ..., "arguments": ...}</tool_call> (the Hermes convention, which vLLM's `hermes` tool parser
# reads back). Reasoning, where a turn has it, goes in <think></think> before the answer. The markers are plain
# text: no tokens are added, so no embedding resize is needed. Without tools, reasoning or tool calls it renders
# exactly as the template before tools did, so earlier adapters see the same prompts.
DEFAULT_CHAT_TEMPLATE = """\
{%- if bos_token %}{{- bos_token }}{%- endif %}
{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages and messages[0]['role'] == 'system' %}{{- messages[0]['content'] + '\n\n' }}{%- endif %}
    {{- '# Tools\nCall functions as <tool_call>{"name": ..., "arguments": {...}}</tool_call>.\n<tools>' }}
    {%- for tool in tools %}{{- '\n' + (tool | tojson) }}{%- endfor %}
    {{- '\n</tools><|im_end|>\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if message['role'] == 'system' and tools and loop.first %}
    {%- elif message['role'] == 'assistant' %}
        {{- '<|im_start|>assistant\n' }}
        {%- generation %}
            {%- if message.reasoning_content %}{{- '<think>\n' + message.reasoning_content + '\n</think>\n\n' }}{%- endif %}
            {{- message['content'] or '' }}
            {%- for call in message.tool_calls or [] %}
                {%- set fn = call.function if call.function is defined else call %}
                {%- if message['content'] or not loop.first %}{{- '\n' }}{%- endif %}
                {{- '<tool_call>\n{"name": ' + (fn.name | tojson) + ', "arguments": ' }}
                {{- (fn.arguments if fn.arguments is string else fn.arguments | tojson) + '}\n</tool_call>' }}
            {%- endfor %}
            {{- '<|im_end|>' + (eos_token or '') }}
        {%- endgeneration %}
        {{- '\n' }}
    {%- else %}
        {{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}
"""


def with_call_ids(messages: list[dict]) -> list[dict]:
    """Calls without an id (ShareGPT has none) get call<turn>x<k>, and results without one the id of the first call
    of theirs still unanswered: OpenAI's API needs the ids, and training must render what serving renders."""
    out, unanswered = [], []
    for i, m in enumerate(messages):
        m = dict(m)
        if m.get("tool_calls"):
            m["tool_calls"] = [dict(c, id=c.get("id") or f"call{i}x{k}") for k, c in enumerate(m["tool_calls"])]
            unanswered = [c["id"] for c in m["tool_calls"]]
        elif m["role"] == "tool":
            if not m.get("tool_call_id") and unanswered:
                m["tool_call_id"] = unanswered[0]
            if m.get("tool_call_id") in unanswered:
                unanswered.remove(m["tool_call_id"])
        out.append(m)
    return out


def _chat_messages(messages: list[dict], api: bool) -> list[dict]:
    out = []
    for m in with_call_ids(messages):
        msg: dict[str, Any] = {"role": m["role"], "content": m.get("content") or ""}
        if m.get("reasoning"):
            msg["reasoning" if api else "reasoning_content"] = m["reasoning"]
        if m.get("tool_calls"):
            msg["tool_calls"] = [{"id": c["id"], "type": "function", "function": {
                "name": c["name"], "arguments": c["arguments"] if api else orjson.loads(c["arguments"])}}
                for c in m["tool_calls"]]
        if m["role"] == "tool":
            msg.update({k: m[k] for k in (("tool_call_id",) if api else ("tool_call_id", "name")) if m.get(k)})
        out.append(msg)
    return out


def template_messages(messages: list[dict]) -> list[dict]:
    """Canonical messages as chat templates read them: tool calls as {"type": "function", "id", "function": {"name",
    "arguments": dict}}, reasoning as reasoning_content, and no NULL fields (templates test `is defined`)."""
    return _chat_messages(messages, api=False)


def openai_messages(messages: list[dict]) -> list[dict]:
    """Canonical messages as OpenAI's chat API (and vLLM's) takes them: arguments as JSON text, reasoning as
    reasoning, the same call ids template_messages renders. A server passes a tool result's call id on, not its name."""
    return _chat_messages(messages, api=True)


def chat_inputs(messages: list[dict], tools: str | list | None = None) -> dict[str, Any]:
    """The arguments `tokenizer.apply_chat_template(**chat_inputs(...), ...)` renders a canonical conversation with:
    the one rendering that training, evaluation and the serving reference share."""
    return {"conversation": template_messages(messages), "tools": template_tools(tools)}


def template_tools(tools: str | list | None) -> list[dict] | None:
    """The row's tools (stored as JSON text) as the list `apply_chat_template(tools=...)` takes."""
    if isinstance(tools, str):
        tools = orjson.loads(tools)
    return tools or None


def uses_tools(messages: list[dict], tools: Any) -> bool:
    return bool(tools) or any(m["role"] == "tool" or m.get("tool_calls") for m in messages)


# A conversation with one tool, one call and its result; each carries a marker the rendered text must contain.
_PROBE_TOOLS = [{"type": "function", "function": {
    "name": "lookup", "description": "probe-schema-5b81e",
    "parameters": {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]}}}]
_PROBE = [
    {"role": "user", "content": "What does the probe find?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"id": "probe1234", "name": "lookup", "arguments": '{"q": "probe-argument-51c2"}'}]},
    {"role": "tool", "content": "probe-result-9d4e", "tool_call_id": "probe1234", "name": "lookup"},
    {"role": "assistant", "content": "It finds the result."},
]
_PROBE_MARKERS = {"the tool schemas": "probe-schema-5b81e", "the tool calls": "probe-argument-51c2",
                  "the tool results": "probe-result-9d4e"}


def tools_problem(render: Callable[[list[dict], list[dict]], str]) -> str | None:
    """Why the template behind `render(messages, tools) -> text` cannot train tool calling, or None when it renders
    the schemas, the calls and the results."""
    try:
        text = render(template_messages(_PROBE), _PROBE_TOOLS)
    except Exception as err:  # a template's raise_exception, or any error rendering tool turns  # noqa: BLE001
        return f"the chat template fails on a tool-calling conversation: {type(err).__name__}: {err}"
    dropped = [what for what, marker in _PROBE_MARKERS.items() if marker not in text]
    return f"the chat template drops {', '.join(dropped)}" if dropped else None
