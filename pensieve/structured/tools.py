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

Reasoning (`<think>`) is split off before a reply reaches its parser (pensieve/structured/reasoning.py).

Markers that are special tokens in a tokenizer (Mistral's `[TOOL_CALLS]`, `[ARGS]`; Llama's `<|python_tag|>`) are
kept in a tool turn's text (`ChatFormat.kept_tokens`), which otherwise skips special tokens, and a forced call's
grammar may write them as the one token the model was trained on.

Arguments are JSON text (OpenAI's `function.arguments`), re-serialized from what the model wrote. A reply whose call
does not parse as JSON with a str `name` and an object of arguments has no tool calls: its whole text is content
(vLLM's behaviour), so a client sees what the model wrote.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from pensieve.engine.detokenizer import partial_match
from pensieve.structured.reasoning import thinks


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
    """A reply's text taken apart: what to show, and the calls it makes."""

    content: str | None
    tool_calls: tuple[ToolCall, ...] = ()


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
        closed = match.group(1) is not None
        body = (match.group(1) if closed else match.group(2)).strip()
        try:
            call = _call(json.loads(body), "arguments", "parameters")
        except json.JSONDecodeError:
            call = None
        if call is None and (closed or not calls):
            return Parsed(text)
        if call is not None:  # (an unclosed last call that does not parse was cut off: the calls before it stand)
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


# ---- the generic fallback ----------------------------------------------------------------------------------------

GENERIC_TOOLS_PROMPT = (
    "You are a function calling AI model. You are provided with function signatures within <tools></tools> XML "
    "tags. You may call one or more functions to assist with the user query. Don't make assumptions about what "
    "values to plug into functions. Here are the available tools: <tools>\n{tools}\n</tools>\n"
    "For each function call return a json object with function name and arguments within <tool_call></tool_call> "
    'XML tags as follows:\n<tool_call>\n{{"name": <function-name>, "arguments": <args-dict>}}\n</tool_call>'
)


# ---- a turn's tools ---------------------------------------------------------------------------------------------

TOOL_CHOICES = ("none", "auto", "required")


@dataclass(frozen=True)
class ToolUse:
    """The tools a turn may call (OpenAI's shape: {"type": "function", "function": {"name", "description",
    "parameters"}}), and how: choice "auto" (the model decides; calls are parsed from its reply), "none" (tools are
    still rendered, so the prompt and its KV stay the same, but nothing is parsed), "required" (at least one call)
    or {"type": "function", "function": {"name": ...}} (one call to it): the last two are forced by a grammar, so
    even a tiny model writes a valid call. parallel: several calls in one reply (False: at most one; "required"
    with several tools allows up to 8)."""

    tools: tuple = ()
    choice: str | dict = "auto"
    parallel: bool = True

    def __post_init__(self) -> None:
        tools = self.tools
        if not isinstance(tools, (list, tuple)) or not all(_is_tool(t) for t in tools):
            raise ValueError(
                'tools must be a list of {"type": "function", "function": {"name": str, "parameters": {...}}}, '
                f"got {tools!r:.120}"
            )
        object.__setattr__(self, "tools", tuple(tools))
        names = [t["function"]["name"] for t in tools]
        if len(set(names)) != len(names):
            raise ValueError(f"tool names must be unique, got {names}")
        if not isinstance(self.parallel, bool):
            raise ValueError(f"parallel_tool_calls must be a bool, got {self.parallel!r}")
        choice = self.choice
        if isinstance(choice, dict):
            function = choice.get("function") if choice.get("type") == "function" else None
            name = function.get("name") if isinstance(function, dict) else None
            if not isinstance(name, str) or name not in names:
                raise ValueError(f"tool_choice names no tool of this request: {choice!r:.120} (tools: {names})")
        elif choice not in TOOL_CHOICES:
            raise ValueError(f"tool_choice must be one of {TOOL_CHOICES} or a named function, got {choice!r:.80}")
        if choice == "required" and not tools:
            raise ValueError('tool_choice "required" needs tools')

    @property
    def forced(self) -> list[str] | None:
        """The tool names a forced choice allows (None: the model is free)."""
        if isinstance(self.choice, dict):
            return [self.choice["function"]["name"]]
        return [t["function"]["name"] for t in self.tools] if self.choice == "required" else None

    @property
    def parses(self) -> bool:
        return bool(self.tools) and self.choice != "none"


def tool_use(tools) -> ToolUse | None:
    """The generators' tools keyword -> a ToolUse: a list of tools is tool_choice "auto" (None or []: no tools)."""
    if tools is None or isinstance(tools, ToolUse):
        return tools
    if isinstance(tools, (list, tuple)) and not tools:
        return None
    return ToolUse(tools)


def _is_tool(tool) -> bool:
    function = tool.get("function") if isinstance(tool, dict) else None
    return (
        isinstance(tool, dict)
        and tool.get("type", "function") == "function"
        and isinstance(function, dict)
        and isinstance(function.get("name"), str)
        and bool(function["name"])
        and isinstance(function.get("parameters", {}), dict)
    )


def tools_key(tools: ToolUse | None) -> str:
    """What identifies the tools a prompt was rendered with ("" none; tool_choice does not change a prompt): a turn
    whose key differs from its history's renders the conversation whole, so new or changed tools reach the model."""
    if tools is None or not tools.tools:
        return ""
    text = json.dumps(list(tools.tools), sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


MARKERS = {"hermes": ("<tool_call>",), "llama3_json": ("<|python_tag|>",), "mistral": ("[TOOL_CALLS]",)}
# what a format's calls are written with that may be special tokens, kept in its text (ChatFormat.kept_tokens)
MARKER_TOKENS = {
    "hermes": ("<tool_call>", "</tool_call>"),
    "llama3_json": ("<|python_tag|>",),
    "mistral": ("[TOOL_CALLS]", "[ARGS]", "[CALL_ID]"),
}


class ToolCallText:
    """A hold-back (pensieve/engine/detokenizer.py) that never streams the raw text of a call: from the first call
    marker on, everything is held, and at the end the reply is parsed (`parsed`): with calls, the reply's text is
    what came before the first; with none, the held text is released (it was content: vLLM's rule), except in a
    forced turn, whose grammar allows only calls (a call cut off by max_new_tokens stays held; the reply says
    "length"). A Llama 3 reply that opens with "{" is held from there."""

    def __init__(self, tool_format: str, parse: Callable[[str], Parsed], forced: bool = False) -> None:
        self.markers = MARKERS[tool_format]
        self.json_start = tool_format == "llama3_json"
        self.parse = parse
        self.forced = forced  # the grammar allows only calls: never text
        self.parsed: Parsed | None = None

    def scan(self, text: str, start: int, final: bool) -> tuple[int, int | None]:
        begin = self._begin(text)
        if final:
            self.parsed = self.parse(text)
            keep = begin is not None and (bool(self.parsed.tool_calls) or self.forced)
            return (len(text) - begin if keep else 0), None
        if begin is not None:
            return len(text) - begin, None
        return max(partial_match(text, m) for m in self.markers), None

    def _begin(self, text: str) -> int | None:
        found = [i for m in self.markers if (i := text.find(m)) >= 0]
        if self.json_start and text.lstrip().startswith("{"):
            found.append(len(text) - len(text.lstrip()))
        return min(found) if found else None


# ---- the chat template and tools --------------------------------------------------------------------------------


class ChatFormat:
    """What a tokenizer's chat template does with tools and reasoning, and rendering through it: tools go to the
    template (`tools=`) when it renders them, else into the system prompt (the generic fallback), with past calls
    and tool results written as Hermes text the model can read."""

    SENTINEL = "<<pensieve:end-of-reply>>"

    @classmethod
    def of(cls, tokenizer) -> ChatFormat:
        """The tokenizer's ChatFormat (kept on it: a template is read once)."""
        fmt = getattr(tokenizer, "_pensieve_chat_format", None)
        if fmt is None or fmt.template_id != id(getattr(tokenizer, "chat_template", None)):
            fmt = cls(tokenizer)
            try:
                tokenizer._pensieve_chat_format = fmt
            except AttributeError:
                pass
        return fmt

    def __init__(self, tokenizer) -> None:
        template = getattr(tokenizer, "chat_template", None)
        self.template_id = id(template)
        template = template if isinstance(template, str) else json.dumps(template or "")
        self.format, self.renders_tools = detect_format(template)
        # how a forced call is written (structured.grammar.tool_call_grammar): Mistral v11+ templates name the call
        # before [ARGS]
        self.call_format = "mistral_args" if self.format == "mistral" and "[ARGS]" in template else self.format
        self.thinks = thinks(template)
        # the format's markers that are special tokens here: id -> text (decoding skips special tokens otherwise)
        self.kept_tokens = kept_tokens(tokenizer, MARKER_TOKENS[self.format])

    def parse(self, text: str) -> Parsed:
        """A reply's content (its reasoning split off) -> what it says and the calls it makes."""
        return FORMATS[self.format](text)

    def hold_back(self, forced: bool = False) -> ToolCallText:
        return ToolCallText(self.format, self.parse, forced)

    def template_input(self, messages: list[dict], tools: ToolUse | None) -> tuple[list[dict], dict]:
        """-> (messages, extra apply_chat_template kwargs) for this template."""
        if tools is None or not tools.tools:
            return messages, {}
        if self.renders_tools:
            return messages, {"tools": list(tools.tools)}
        prompt = GENERIC_TOOLS_PROMPT.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools.tools))
        out = [_as_text(m) for m in messages]
        if out and out[0].get("role") == "system":
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{prompt}"}
        else:
            out.insert(0, {"role": "system", "content": prompt})
        return out, {}

    def render(self, tokenizer, messages, tools, add_generation_prompt: bool, tokenize: bool = True):
        """The messages through the chat template; ValueError when the template refuses them (its
        raise_exception, or a message it cannot read)."""
        from jinja2 import TemplateError

        msgs, kwargs = self.template_input(messages, tools)
        try:
            out = tokenizer.apply_chat_template(
                msgs, add_generation_prompt=add_generation_prompt, tokenize=tokenize, return_dict=False, **kwargs
            )
        except TemplateError as error:
            raise ValueError(f"the chat template refused the messages: {error}") from None
        return list(out) if tokenize else out

    def append(self, tokenizer, history: list[int], messages: list[dict], new: list[dict], tools) -> list[int] | None:
        """The tokens that continue `history` (which ends with the reply pensieve sampled for messages[-1]) with
        the `new` messages and the generation prompt, rendered alone: the sampled tokens stay as they are, whatever
        a re-render of that reply would give (spacing, key order of a call). None where the template does not
        render the conversation append-only (then the caller renders it whole)."""
        if not messages or messages[-1].get("role") != "assistant" or not history:
            return None
        before = self.render(tokenizer, messages, tools, add_generation_prompt=False, tokenize=False)
        after = self.render(tokenizer, messages + new, tools, add_generation_prompt=True, tokenize=False)
        if not after.startswith(before):
            return None
        # what the template writes after a reply's text (e.g. "<|im_end|>\n"): the sampled stop token covers its start
        marked = self.render(
            tokenizer, [*messages[:-1], {"role": "assistant", "content": self.SENTINEL}], tools, False, tokenize=False
        )
        at = marked.rfind(self.SENTINEL)
        if at < 0:
            return None
        closing = marked[at + len(self.SENTINEL) :]
        tail = tokenizer.decode(history[-8:], skip_special_tokens=False)
        covered = next((k for k in range(len(closing), 0, -1) if tail.endswith(closing[:k])), 0)
        text = closing[covered:] + after[len(before) :]
        return list(tokenizer.encode(text, add_special_tokens=False)) if text else []


def kept_tokens(tokenizer, texts) -> dict[int, str]:
    """The tokens among `texts` that are single special tokens of tokenizer (which decoding would skip): id -> text."""
    out = {}
    for text in texts:
        ids = tokenizer.encode(text, add_special_tokens=False)
        if len(ids) == 1 and tokenizer.decode(ids, skip_special_tokens=True) == "":
            out[ids[0]] = text
    return out


def _as_text(message: dict) -> dict:
    """A message as a template without tool support can render it: calls and results as Hermes text."""
    role = message.get("role")
    if role == "assistant" and message.get("tool_calls"):
        calls = "".join(
            "<tool_call>\n"
            + json.dumps({"name": c["function"]["name"], "arguments": json.loads(c["function"]["arguments"])})
            + "\n</tool_call>"
            for c in message["tool_calls"]
        )
        content = message.get("content") or ""
        return {"role": "assistant", "content": f"{content}{calls}" if content else calls}
    if role == "tool":
        return {"role": "tool", "content": f"<tool_response>\n{message.get('content', '')}\n</tool_response>"}
    return message
