"""What `complete()` sampled, kept so a stateless client's resent history keeps its KV.

A stateless client (OpenAI's chat completions) sends the whole conversation back each call, with pensieve's earlier
replies as it parsed them: a tool call comes back as JSON, its arguments maybe re-serialized, a `<think>` block maybe
dropped. Re-rendered by the chat template, such a reply rarely gives the tokens that were sampled (spacing, key
order, the call's markers), so the prompt tree would lose the match at the first call and prefill the rest again.

`ReplyMemory` keeps, for each reply a completion made from chat messages, the token sequence it ended (prompt +
reply), under a key of the messages as a client resends them (role, text, calls by name and arguments as parsed
JSON, tool results) and the tools they were rendered with. Rendering a completion looks for the latest assistant
message whose history is known: the prompt is then that message's sampled sequence with only the later messages
rendered after it (`ChatFormat.append`) — what a stateful conversation's next turn would be. Bounded by tokens,
least recently used first.
"""

from __future__ import annotations

import hashlib
import json
import threading
from array import array
from collections import OrderedDict
from concurrent.futures import Future

from pensieve.engine.turn import Reply, ResolvedSampling
from pensieve.structured.tools import ChatFormat, ToolUse, tools_key

DEFAULT_MAX_TOKENS = 1 << 22  # 16 MiB of int32 token ids


def message_key(message: dict) -> str:
    """A chat message as it identifies the history: what a client keeps when it resends it (no call ids on an
    assistant's calls, no reasoning; arguments compared as JSON values, so re-serializing them does not matter)."""
    calls = []
    for call in message.get("tool_calls") or ():
        function = call.get("function") or {}
        try:
            arguments = json.loads(function.get("arguments") or "{}")
        except (TypeError, ValueError):
            arguments = function.get("arguments")
        calls.append([function.get("name"), arguments])
    content = message.get("content")
    fields = [message.get("role"), content if isinstance(content, str) else "", calls]
    if message.get("role") != "assistant":
        fields += [message.get("name"), message.get("tool_call_id")]
    return json.dumps(fields, sort_keys=True, ensure_ascii=False)


def history_keys(messages: list[dict], tools: ToolUse | None) -> list[bytes]:
    """keys[i]: the key of messages[:i] rendered with `tools` (one hash chain, so every prefix costs one step)."""
    keys = [hashlib.sha256(tools_key(tools).encode()).digest()]
    for message in messages:
        keys.append(extend_key(keys[-1], message))
    return keys


def extend_key(key: bytes, message: dict) -> bytes:
    """The history key of the messages `key` stands for, then `message`."""
    return hashlib.sha256(key + message_key(message).encode()).digest()


def render_continuing(tokenizer, messages: list[dict], tools: ToolUse | None, find, limit: int | None = None):
    """Chat messages through the chat template, continuing tokens already computed: find(key) -> the token sequence
    that the history messages[:j] (its `history_keys` key) ended with, or None. The latest j (<= limit) found keeps
    its tokens and only messages[j:] and the generation prompt are rendered after them (`ChatFormat.append`); none
    found, or a template that does not render append-only there: the whole conversation is rendered.
    -> (tokens, the messages' history key, whether known tokens were continued)."""
    keys = history_keys(messages, tools)
    chat = ChatFormat.of(tokenizer)
    for j in range(len(messages) if limit is None else limit, 0, -1):
        known = find(keys[j])
        if known is None:
            continue
        appended = chat.append(tokenizer, known, messages[:j], messages[j:], tools)
        if appended is not None:
            return [*known, *appended], keys[-1], True
        break
    return chat.render(tokenizer, messages, tools, add_generation_prompt=True), keys[-1], False


def reply_message(reply: Reply) -> dict:
    """The assistant message a client gets for `reply` (and sends back)."""
    message: dict = {"role": "assistant", "content": reply.text or ""}
    if reply.tool_calls:
        message["tool_calls"] = [c.message_form() for c in reply.tool_calls]
    return message


class ReplyMemory:
    """history key -> the token sequence a completion's reply ended (its prompt + the sampled reply). Thread-safe:
    completions render on their callers' threads and are remembered on the engine's."""

    def __init__(self, max_tokens: int = DEFAULT_MAX_TOKENS) -> None:
        if max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {max_tokens}")
        self.max_tokens = max_tokens
        self.num_tokens = 0
        self.hits = 0
        self._entries: OrderedDict[bytes, array] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: bytes) -> list[int] | None:
        with self._lock:
            tokens = self._entries.get(key)
            if tokens is None:
                return None
            self._entries.move_to_end(key)
            return tokens.tolist()

    def put(self, key: bytes, tokens: list[int]) -> None:
        if len(tokens) > self.max_tokens:
            return
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self.num_tokens -= len(old)
            self._entries[key] = array("i", tokens)
            self.num_tokens += len(tokens)
            while self.num_tokens > self.max_tokens:
                _, dropped = self._entries.popitem(last=False)
                self.num_tokens -= len(dropped)

    def render(self, tokenizer, messages: list[dict], tools: ToolUse | None) -> tuple[list[int], bytes]:
        """Chat messages -> (the prompt's tokens, the messages' history key). The latest assistant message with a
        remembered history keeps its sampled tokens and only the messages after it are rendered; otherwise (or
        where the template does not render append-only) the whole conversation is."""
        tokens, key, continued = render_continuing(tokenizer, messages, tools, self.get)
        self.hits += continued
        return tokens, key

    def remember(self, key: bytes, prompt: list[int], params: ResolvedSampling, future: Future) -> None:
        """Once the completion behind `future` ends, remember each of its replies under key + its message. A reply a
        stop string ended is not, nor one whose extra calls were dropped: its tokens hold what the client never saw."""

        def done(f: Future) -> None:
            if f.cancelled() or f.exception() is not None:
                return
            first = f.result()
            for reply in (first, *first.candidates):
                by_string = reply.finish_reason == "stop" and params.stop and params.grammar is None
                if by_string and not (reply.token_ids and reply.token_ids[-1] in params.stop_token_ids):
                    continue
                if reply.tool_calls_dropped:  # (parallel_tool_calls false) the tokens hold calls the client never got
                    continue
                self.put(extend_key(key, reply_message(reply)), [*prompt, *reply.token_ids])

        future.add_done_callback(done)
