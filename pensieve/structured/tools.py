"""Tool calls in text mode: which format a model's chat template speaks, the tools rendered into its prompt, and
the calls parsed back out of its reply (DESIGN §9).

One table (`FORMATS`) says which parser each family uses; `detect_format` picks by what the chat template says:

- `hermes`: Hermes 2/3, Qwen2.5, Qwen3, QwQ, and the generic fallback for templates without tools:
  `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`, one block a call.
- `llama3_json`: Llama 3.1 / 3.2 / 3.3: `{"name": ..., "parameters": {...}}`, after `<|python_tag|>` or not, `;`
  between calls.
- `mistral`: Mistral: `[TOOL_CALLS] [{"name": ..., "arguments": {...}}]` (v3 tokenizer) or
  `[TOOL_CALLS]name[ARGS]{...}` a call (v11+).

A template with no tool support (the bundled SmolLM2's) gets the generic fallback, as llama.cpp's server does for
such templates: the tools are described in the system prompt (`GENERIC_TOOLS_PROMPT`, Hermes-style, a JSON list of
the tool schemas) and calls are parsed back in the Hermes format, so the default model can run an agent.

Reasoning: a template that opens `<think>` (Qwen3, QwQ, DeepSeek-R1 distills) gets `split_reasoning`: the text up to
`</think>` is the reply's reasoning, kept out of its content (vLLM's current qwen3 parser: the prompt may already hold
the opening tag, so only `</think>` ends reasoning; a reply with no `</think>` that began with `<think>` is all
reasoning, cut off).

Arguments are JSON text (OpenAI's `function.arguments`), re-serialized from what the model wrote. A reply whose call
does not parse as JSON with a str `name` and an object of arguments has no tool calls: its whole text is content
(vLLM's behaviour), so a client sees what the model wrote.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ToolCall:
    """One function call a reply makes: `arguments` is JSON text (OpenAI's shape)."""

    name: str
    arguments: str
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def message_form(self) -> dict:
        """As it goes in an assistant message's `tool_calls` (and as chat templates read it)."""
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True)
class Parsed:
    """A reply's text taken apart: what to show, the calls it makes, and its reasoning (None: none)."""

    content: str | None
    tool_calls: tuple[ToolCall, ...] = ()
    reasoning: str | None = None


# ---- the formats -----------------------------------------------------------------------------------------------

_DECODER = json.JSONDecoder()


def _call(obj, *arg_keys: str) -> ToolCall | None:
    """A parsed JSON object -> a call, if it has a str name and an object of arguments under one of arg_keys."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    for key in arg_keys:
        if key in obj:
            args = obj[key]
            if isinstance(args, str):  # some models write the arguments as a JSON string
                try:
                    args = json.loads(args)
                except json.JSONDecodeError:
                    return None
            return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False)) if isinstance(args, dict) else None
    return None


_HERMES = re.compile(r"<tool_call>(.*?)</tool_call>|<tool_call>(.*)$", re.DOTALL)


def parse_hermes(text: str) -> Parsed:
    """`<tool_call>{json}</tool_call>`, any number; an unclosed last one (the model stopped at EOS) counts. The
    content is the text outside the calls."""
    if "<tool_call>" not in text:
        return Parsed(text)
    calls = []
    for match in _HERMES.finditer(text):
        body = (match.group(1) if match.group(1) is not None else match.group(2)).strip()
        try:
            call = _call(json.loads(body), "arguments", "parameters")
        except json.JSONDecodeError:
            call = None
        if call is None:
            return Parsed(text)
        calls.append(call)
    return Parsed(_content(_HERMES.sub("", text)), tuple(calls))


def parse_llama3_json(text: str) -> Parsed:
    """JSON objects with a name and parameters (or arguments), optionally after `<|python_tag|>`, separated by `;`
    or whitespace. The text around them is content (SGLang's choice; vLLM drops it)."""
    text = text.replace("<|python_tag|>", "")
    calls, rest, i = [], [], 0
    while (start := text.find("{", i)) >= 0:
        try:
            obj, end = _DECODER.raw_decode(text, start)
        except json.JSONDecodeError:
            rest.append(text[i : start + 1])
            i = start + 1
            continue
        call = _call(obj, "parameters", "arguments")
        rest.append(text[i:start] if call is not None else text[i:end])
        if call is not None:
            calls.append(call)
        i = end
    if not calls:
        return Parsed(text)
    rest.append(text[i:])
    content = re.sub(r"^[\s;]+|[\s;]+$", "", "".join(rest))
    return Parsed(content or None, tuple(calls))


def parse_mistral(text: str) -> Parsed:
    """`[TOOL_CALLS]` then a JSON list of calls (v3 tokenizer), or `name[ARGS]{json}` / `name{json}` per call
    (v11+). The content is the text before the first `[TOOL_CALLS]`."""
    marker = "[TOOL_CALLS]"
    if marker not in text:
        return Parsed(text)
    head, *parts = text.split(marker)
    calls: list[ToolCall] = []
    for part in parts:
        part = part.strip()
        if part.startswith("["):
            try:
                items, _ = _DECODER.raw_decode(part)
            except json.JSONDecodeError:
                return Parsed(text)
            found = [_call(item, "arguments") for item in items] if isinstance(items, list) else [None]
        else:
            name, sep, args = part.partition("[ARGS]") if "[ARGS]" in part else _split_name(part)
            try:
                found = [_call({"name": name.strip(), "arguments": _DECODER.raw_decode(args.strip())[0]}, "arguments")]
            except json.JSONDecodeError:
                found = [None]
        if None in found:
            return Parsed(text)
        calls += found
    return Parsed(_content(head), tuple(calls))


def _split_name(part: str) -> tuple[str, str, str]:
    i = part.find("{")
    return (part, "", "") if i < 0 else (part[:i], "", part[i:])


def _content(text: str) -> str | None:
    text = text.strip()
    return text or None


FORMATS: dict[str, Callable[[str], Parsed]] = {
    "hermes": parse_hermes,
    "llama3_json": parse_llama3_json,
    "mistral": parse_mistral,
}


def detect_format(chat_template: str | None) -> tuple[str, bool]:
    """-> (the format of FORMATS a chat template's tool calls take, whether the template renders tools itself).
    A template that never mentions tools gets the generic fallback: Hermes calls, tools in the system prompt."""
    template = chat_template or ""
    renders_tools = "tools" in template
    if "[TOOL_CALLS]" in template:
        return "mistral", renders_tools
    if "<|python_tag|>" in template or ("<|start_header_id|>" in template and "parameters" in template):
        return "llama3_json", renders_tools
    return "hermes", renders_tools and "<tool_call>" in template


def split_reasoning(text: str) -> tuple[str | None, str]:
    """-> (reasoning, the rest): the text up to `</think>` (a leading `<think>` stripped) is reasoning. With no
    `</think>`, a reply that opened `<think>` is reasoning cut off, one that did not has none."""
    end = text.find("</think>")
    if end < 0:
        if text.lstrip().startswith("<think>"):
            return text.lstrip()[len("<think>") :], ""
        return None, text
    reasoning = text[:end]
    stripped = reasoning.lstrip()
    if stripped.startswith("<think>"):
        reasoning = stripped[len("<think>") :]
    return reasoning, text[end + len("</think>") :].lstrip("\n")


def thinks(chat_template: str | None) -> bool:
    """Whether replies under this template may open with reasoning in `<think>` tags."""
    return "<think>" in (chat_template or "") or "</think>" in (chat_template or "")


# ---- the generic fallback ----------------------------------------------------------------------------------------

GENERIC_TOOLS_PROMPT = (
    "You are a function calling AI model. You are provided with function signatures within <tools></tools> XML "
    "tags. You may call one or more functions to assist with the user query. Don't make assumptions about what "
    "values to plug into functions. Here are the available tools: <tools>\n{tools}\n</tools>\n"
    "For each function call return a json object with function name and arguments within <tool_call></tool_call> "
    'XML tags as follows:\n<tool_call>\n{{"name": <function-name>, "arguments": <args-dict>}}\n</tool_call>'
)
