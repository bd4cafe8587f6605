"""Admission: everything about a turn worked out and checked before any state changes (DESIGN §1: bad input gets a
clear error and leaves every conversation as it was).

`Admitter.prepare` validates a turn on a conversation, renders its message (the chat template, or raw token ids),
resolves its sampling defaults from the model's generation config, and checks it fits the model and the device
pool -> an `Admission`; `prepare_complete` does the same for a stateless completion. The engine starts an Admission
with `Engine.admit`. The helpers below are shared with the cluster's driver and the server, so all reject alike.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import threading
from dataclasses import dataclass

from pensieve.cache.manager import KVManager
from pensieve.cache.tree import common_prefix
from pensieve.config import SamplingParams
from pensieve.engine.replies import ReplyMemory
from pensieve.engine.turn import ResolvedSampling
from pensieve.models.support import ModelShape
from pensieve.structured.grammar import Grammars, tool_call_grammar
from pensieve.structured.reasoning import Reasoning, opens_reasoning
from pensieve.structured.tools import ChatFormat, ToolUse, tools_key

DEFAULT_MAX_NEW_TOKENS = 256


@dataclass(frozen=True)
class Admission:
    """A validated turn, not yet started."""

    conv_id: str
    tokens: list[int]  # the conversation's whole token sequence once the message is appended
    messages: list[dict] | None  # text mode: the chat messages that rendered `tokens`
    params: ResolvedSampling
    history_len: int
    common_prefix: int  # tokens shared by the stored history and `tokens`
    stored: bool = True  # False: a `complete()` call: no conversation is kept
    tools: ToolUse | None = None  # the tools the turn may call
    reasoning: Reasoning | None = None  # a prompt the chat template rendered, of a template that thinks


@dataclass(frozen=True)
class RenderedPrompt:
    """A completion's prompt as tokens (`Admitter.render_complete`), and how its reply splits off reasoning."""

    tokens: list[int]
    reasoning: Reasoning | None = None
    key: bytes | None = None  # chat messages: their history key (engine.replies), to remember the replies under


@dataclass(frozen=True)
class CompletionId:
    """The id of a `complete()` call's conversation: never a str, so never a caller's conversation id."""

    number: int

    def __str__(self) -> str:
        return f"<completion {self.number}>"


class Admitter:
    def __init__(self, model, tokenizer, shape: ModelShape, kv: KVManager, replies: ReplyMemory | None = None) -> None:
        self.model = model
        self.replies = replies if replies is not None else ReplyMemory()
        self.tokenizer = tokenizer
        self.shape = shape
        self.kv = kv
        self.completions = itertools.count()
        self.reserved: set[str] = set()  # ids of the forks running turns' candidates will make (SamplingParams.n)
        self._grammars: Grammars | None = None
        self._grammars_lock = threading.Lock()

    @property
    def grammars(self) -> Grammars:
        """The engine's grammar compiler (made at the first structured turn; any thread may compile)."""
        with self._grammars_lock:
            if self._grammars is None:
                if self.tokenizer is None:
                    raise ValueError("structured outputs need a tokenizer: pass tokenizer=")
                kept = ChatFormat.of(self.tokenizer).kept_tokens  # a forced call may write its markers' tokens
                self._grammars = Grammars(self.tokenizer, self.shape.vocab_size, sorted(self._eos_ids()), list(kept))
            return self._grammars

    def prepare(self, conv_id, msg, sampling: SamplingParams | None, tools: ToolUse | None = None) -> Admission:
        """Validate a turn and work out everything about it (ValueError / KeyError if bad). No conversation changes;
        a stored conversation may be loaded from disk into memory on the way (the same state, cached), and one
        found unusable (stored by another model) is unloaded again."""
        if not isinstance(conv_id, str) or not conv_id:
            raise ValueError(f"conv_id must be a non-empty str, got {conv_id!r}")
        params = self.with_tools(self.resolve(sampling), tools)
        loading = conv_id not in self.kv.conversations
        conv = self.kv.lookup(conv_id)
        if conv is not None and conv.pinned:
            raise ValueError(f"conversation {conv_id!r} already has a turn running")
        self.check_free(conv_id)
        for other in candidate_ids(conv_id, params.n):
            self.check_free(other)
            if other in self.kv.conversations or self.kv.is_stored(other):
                raise ValueError(f"n={params.n} forks {conv_id!r} into {other!r}, which exists: end it, or use n=1")
        if loading and conv is not None and conv.tokens and max(conv.tokens) >= self.shape.vocab_size:
            self.kv.remove(conv_id)  # back to stored-only, as before the call
            raise ValueError(
                f"stored conversation {conv_id!r} has token ids outside this model's vocabulary "
                f"({max(conv.tokens)} >= {self.shape.vocab_size}): it was stored by another model"
            )
        history, messages, rendered_with = ([], None, "") if conv is None else (conv.tokens, conv.messages, conv.tools)
        tokens, messages = render_turn(
            self.tokenizer, conv_id, history, messages, msg, self.check_token_ids, tools, rendered_with
        )
        self.check_fits(f"conversation {conv_id!r}", len(tokens), params.max_new_tokens, params.n)
        prefix = common_prefix(history, tokens)
        reasoning = self.reasoning(tokens, params.grammar is not None) if messages is not None else None
        return Admission(conv_id, tokens, messages, params, len(history), prefix, tools=tools, reasoning=reasoning)

    def prepare_complete(self, prompt, sampling: SamplingParams | None, tools: ToolUse | None = None) -> Admission:
        """Validate a stateless completion: `prompt` is token ids, chat messages rendered with the chat template, or
        what `render_complete` made of either (rendered on the caller's thread)."""
        params = self.with_tools(self.resolve(sampling), tools)
        rendered = prompt if isinstance(prompt, RenderedPrompt) else self.render_complete(prompt, tools)
        conv_id = CompletionId(next(self.completions))
        self.check_fits("a completion", len(rendered.tokens), params.max_new_tokens, params.n)
        reasoning = rendered.reasoning
        if reasoning is not None and params.grammar is not None:
            reasoning = dataclasses.replace(reasoning, constrained=True)
        return Admission(conv_id, rendered.tokens, None, params, 0, 0, stored=False, tools=tools, reasoning=reasoning)

    def render_complete(self, prompt, tools: ToolUse | None = None) -> RenderedPrompt:
        """A completion's prompt -> its tokens (chat messages through the chat template, with the tools). Reads only
        the tokenizer: any thread may call it. ValueError names what is wrong."""
        templated = isinstance(prompt, (list, tuple)) and bool(prompt) and all(isinstance(m, dict) for m in prompt)
        if not templated or self.tokenizer is None:
            return RenderedPrompt(render_prompt(self.tokenizer, prompt, self.check_token_ids, tools))
        tokens, key = self.replies.render(self.tokenizer, check_messages(prompt), tools)
        return RenderedPrompt(tokens, self.reasoning(tokens), key)

    def remember(self, rendered: RenderedPrompt, adm: Admission, future) -> None:
        """Remember the replies of the completion `rendered` started (`future`: its Reply) for a resent history."""
        if rendered.key is not None and self.replies.max_tokens:
            # copied now, right after admit: the completion's token list is its conversation's and grows by the reply
            self.replies.remember(rendered.key, list(rendered.tokens), adm.params, future)

    def reasoning(self, prompt: list[int], constrained: bool = False) -> Reasoning | None:
        """How a reply to a prompt the chat template rendered splits off its reasoning (None: the template does not
        think); constrained: a grammar constrains the reply."""
        if not ChatFormat.of(self.tokenizer).thinks:
            return None
        return Reasoning(opened=opens_reasoning(self.tokenizer, prompt), constrained=constrained)

    def with_tools(self, params: ResolvedSampling, tools: ToolUse | None) -> ResolvedSampling:
        """A turn with tools needs the chat template; a forced tool choice becomes the turn's grammar."""
        if tools is None:
            return params
        grammar = self.tool_grammar(tools)
        if grammar is None:
            return params
        if params.grammar is not None:
            raise ValueError("a forced tool_choice and a structured_output both constrain the reply: give one")
        return dataclasses.replace(params, grammar=grammar)

    def tool_grammar(self, tools: ToolUse):
        """The compiled grammar of a forced tool choice (None: the model is free), in this template's call format."""
        if self.tokenizer is None:
            raise ValueError("tools need a tokenizer (text mode): pass tokenizer=")
        names = tools.forced
        if names is None:
            return None
        call_format = ChatFormat.of(self.tokenizer).call_format
        return self.grammars.compile(
            tool_call_grammar(tools.tools, names, tools.parallel and len(names) > 1, call_format)
        )

    def check_token_ids(self, ids) -> list[int]:
        return check_token_ids(ids, self.shape.vocab_size)

    def check_free(self, conv_id) -> None:
        if conv_id in self.reserved:
            raise ValueError(f"conversation {conv_id!r} is a candidate a running turn is about to fork (n > 1)")

    def check_fits(self, what: str, num_tokens: int, max_new_tokens: int, n: int = 1) -> None:
        total = num_tokens + max_new_tokens
        if total > self.shape.max_positions:
            raise ValueError(
                f"{what} would reach {total} tokens ({num_tokens} + max_new_tokens "
                f"{max_new_tokens}), over the model's {self.shape.max_positions} positions"
            )
        # each further candidate shares the prompt's chunks but the one holding its last position
        own = (num_tokens - 1) % self.kv.block_size + 1 + max_new_tokens
        blocks = self.kv.blocks_for(total) + (n - 1) * self.kv.blocks_for(own)
        if blocks > self.kv.device.num_blocks:
            raise ValueError(
                f"{what} would need {blocks} KV blocks for {total} tokens"
                f"{f' and {n - 1} more candidates' if n > 1 else ''}; "
                f"the device pool has {self.kv.device.num_blocks} (CacheConfig.num_device_blocks)"
            )

    def resolve(self, sp: SamplingParams | None) -> ResolvedSampling:
        """`sp` with every default filled in: the model's generation config where it has one, else ours."""
        if sp is not None and not isinstance(sp, SamplingParams):
            raise ValueError(f"sampling must be a SamplingParams, got {type(sp).__name__}")
        sp = sp or SamplingParams()
        gc = getattr(self.model, "generation_config", None)
        do_sample = bool(getattr(gc, "do_sample", False))

        def default(value, name, fallback):
            if value is not None:
                return value
            from_model = getattr(gc, name, None)
            return fallback if from_model is None else from_model

        temperature = (
            sp.temperature if sp.temperature is not None else (default(None, "temperature", 1.0) if do_sample else 0.0)
        )
        stop_ids = set(sp.stop_token_ids)
        if not sp.ignore_eos:
            stop_ids |= self._eos_ids()
        if sp.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer")
        if sp.logit_bias and max(sp.logit_bias) >= self.shape.vocab_size:
            raise ValueError(
                f"logit_bias token ids must be < {self.shape.vocab_size} (the vocabulary), got {max(sp.logit_bias)}"
            )
        bias = tuple(sorted((int(t), float(b)) for t, b in sp.logit_bias.items() if b)) if sp.logit_bias else ()
        grammar = None if sp.structured_output is None else self.grammars.compile(sp.structured_output)
        return ResolvedSampling(
            max_new_tokens=default(sp.max_new_tokens, "max_new_tokens", DEFAULT_MAX_NEW_TOKENS),
            temperature=float(temperature),
            top_k=int(default(sp.top_k, "top_k", 0)),
            top_p=float(default(sp.top_p, "top_p", 1.0)),
            seed=sp.seed,
            stop_token_ids=frozenset(stop_ids),
            stop=tuple(sp.stop),
            min_p=float(default(sp.min_p, "min_p", 0.0)),
            presence_penalty=float(sp.presence_penalty),
            frequency_penalty=float(sp.frequency_penalty),
            repetition_penalty=float(default(sp.repetition_penalty, "repetition_penalty", 1.0)),
            logit_bias=bias,
            logprobs=sp.logprobs,
            n=sp.n,
            grammar=grammar,
        )

    def _eos_ids(self) -> set[int]:
        gc = getattr(self.model, "generation_config", None)
        eos = getattr(gc, "eos_token_id", None)
        if eos is None and self.tokenizer is not None:
            eos = self.tokenizer.eos_token_id
        if eos is None:
            return set()
        return {eos} if isinstance(eos, int) else set(eos)


def candidate_ids(conv_id: str, n: int) -> list[str]:
    """The conversations a turn with n candidates forks `conv_id` into: `<conv_id>/1` ... `<conv_id>/<n-1>`."""
    return [f"{conv_id}/{i}" for i in range(1, n)]


def require_idle(conv_id: str, conv, running: bool):
    """conv, unless there is none (KeyError) or a turn runs on it (ValueError): the errors every API gives."""
    if conv is None:
        raise KeyError(f"no conversation {conv_id!r}")
    if running:
        raise ValueError(f"conversation {conv_id!r} has a turn running")
    return conv


def check_token_ids(ids, vocab: int) -> list[int]:
    if not isinstance(ids, (list, tuple)):
        raise ValueError(f"token ids must be a list of ints, got {type(ids).__name__}")
    bad = [t for t in ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab]
    if bad:
        raise ValueError(f"token ids must be ints in [0, {vocab}): got {bad[:5]}")
    return list(ids)


def render_prompt(tokenizer, prompt, check_ids, tools: ToolUse | None = None) -> list[int]:
    """A stateless completion's prompt -> its tokens: token ids as they are, or chat messages through the chat
    template (with the assistant's generation prompt, and the tools). ValueError names what is wrong."""
    if not isinstance(prompt, (list, tuple)) or not prompt:
        raise ValueError(f"prompt must be a non-empty list of token ids or of chat messages, got {prompt!r:.80}")
    if not all(isinstance(m, dict) for m in prompt):
        if tools is not None and tokenizer is None:
            raise ValueError("tools need a tokenizer: pass tokenizer=")
        return check_ids(prompt)  # with tools: the caller rendered them; calls are forced and parsed as usual
    if tokenizer is None:
        raise ValueError("chat messages need a tokenizer: pass tokenizer= or send token ids")
    check_messages(prompt)
    return ChatFormat.of(tokenizer).render(tokenizer, list(prompt), tools, add_generation_prompt=True)


def check_messages(messages) -> list[dict]:
    """Chat messages as pensieve takes them: a str role (the template decides which it knows); str content (an
    assistant's may be missing when it makes tool calls, in OpenAI's shape); a tool result's tool_call_id a str if
    given. ValueError names the first bad one."""
    for m in messages:
        ok = isinstance(m, dict) and isinstance(m.get("role"), str) and bool(m["role"])
        ok = ok and (isinstance(m.get("content"), str) or (m.get("role") == "assistant" and m.get("tool_calls")))
        ok = ok and (m.get("role") != "tool" or isinstance(m.get("tool_call_id", ""), str))
        calls = m.get("tool_calls") if isinstance(m, dict) else None
        ok = ok and (calls is None or (isinstance(calls, list) and all(_is_call(c) for c in calls)))
        if not ok:
            raise ValueError(f"each chat message needs a str 'role' and a str 'content', got {m!r:.80}")
    return [dict(m) for m in messages]


def _is_call(call) -> bool:
    """An assistant message's tool call in OpenAI's shape (arguments: JSON text of an object)."""
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        return False
    try:
        return isinstance(json.loads(function.get("arguments")), dict)
    except (TypeError, ValueError):
        return False


def render_turn(
    tokenizer,
    conv_id,
    history: list[int],
    messages,
    msg,
    check_ids,
    tools: ToolUse | None = None,
    history_tools: str | None = "",
) -> tuple[list[int], list | None]:
    """A conversation's token sequence (`history`; text mode: rendered from chat `messages`) with msg appended: a
    str is a user turn, a dict one message (a tool result: {"role": "tool", "tool_call_id": ..., "content": ...})
    and a list of dicts several, through the chat template; a list of ids is appended raw. -> (tokens, messages or
    None). In text mode the tokens pensieve sampled for its own replies are kept: only the new messages and the
    generation prompt are rendered and appended (`ChatFormat.append`), unless the template rewrites earlier turns
    or the turn's tools are not those the history was rendered with (`history_tools`, a `tools_key`; None: unknown),
    when the whole conversation is rendered again (KV is kept for the common prefix). ValueError names what is
    wrong; the cluster's driver renders with it too, so both reject alike."""
    text_mode = messages is not None
    if isinstance(msg, (str, dict)) or (isinstance(msg, (list, tuple)) and msg and isinstance(msg[0], dict)):
        if tokenizer is None:
            raise ValueError("a text message needs a tokenizer: pass tokenizer= or send token ids")
        if isinstance(msg, str) and not msg:
            raise ValueError("message is empty")
        if history and not text_mode:
            raise ValueError(f"conversation {conv_id!r} is in raw token mode; send token ids")
        new = (
            [{"role": "user", "content": msg}]
            if isinstance(msg, str)
            else check_messages([msg] if isinstance(msg, dict) else msg)
        )
        chat = ChatFormat.of(tokenizer)
        old = messages if text_mode else []
        same_tools = history_tools is not None and history_tools == tools_key(tools)
        appended = chat.append(tokenizer, history, old, new, tools) if text_mode and same_tools else None
        if appended is not None:
            return [*history, *appended], [*old, *new]
        return chat.render(tokenizer, [*old, *new], tools, add_generation_prompt=True), [*old, *new]
    if not isinstance(msg, (list, tuple)) or not msg:
        raise ValueError(f"message must be a non-empty str, chat message(s) or list of token ids, got {msg!r:.80}")
    if text_mode:
        raise ValueError(f"conversation {conv_id!r} is in text mode; send a str or chat messages")
    if tools is not None and tokenizer is None:
        raise ValueError("tools need a tokenizer: pass tokenizer=")
    # token ids with tools: the caller rendered the tools into the prompt; the calls are forced and parsed as usual
    return [*history, *check_ids(msg)], None
