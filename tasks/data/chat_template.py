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
    {{- '# Tools\n\nYou may call one or more functions. Put each call in <tool_call></tool_call> tags as '
        '{"name": <function name>, "arguments": <JSON object>}. The functions:\n<tools>' }}
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


def template_messages(messages: list[dict]) -> list[dict]:
    """Canonical messages as chat templates read them: tool calls as {"type": "function", "id", "function": {"name",
    "arguments": dict}}, reasoning as reasoning_content, and no NULL fields (templates test `is defined`)."""
    out = []
    for m in messages:
        msg: dict[str, Any] = {"role": m["role"], "content": m.get("content") or ""}
        if m.get("reasoning"):
            msg["reasoning_content"] = m["reasoning"]
        if m.get("tool_calls"):
            msg["tool_calls"] = [
                {"type": "function", **({"id": c["id"]} if c.get("id") else {}),
                 "function": {"name": c["name"], "arguments": orjson.loads(c["arguments"])}}
                for c in m["tool_calls"]]
        if m["role"] == "tool":
            msg.update({k: m[k] for k in ("tool_call_id", "name") if m.get(k)})
        out.append(msg)
    return out


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
