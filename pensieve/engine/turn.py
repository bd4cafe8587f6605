"""A turn: one request on a conversation (the long-lived object), and the Reply it produces."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from pensieve.cache.types import Conversation, RestoreStats, Tier
from pensieve.engine.detokenizer import TextStream
from pensieve.structured.tools import ToolCall, ToolCallText, ToolUse

if TYPE_CHECKING:  # the sampler imports this module
    from pensieve.engine.sampler import Penalties
    from pensieve.structured.grammar import GrammarState


class TurnAborted(Exception):
    """The turn was aborted (`StatefulGenerator.abort`): none of it was kept, the conversation is as before it."""


@dataclass(frozen=True)
class ResolvedSampling:
    """SamplingParams with the model's defaults filled in; what the sampler and stop checks read."""

    max_new_tokens: int
    temperature: float
    top_k: int
    top_p: float
    seed: int | None
    stop_token_ids: frozenset[int]  # EOS (unless ignore_eos) + the caller's stop ids
    stop: tuple[str, ...]
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    logprobs: int | None = None
    n: int = 1
    grammar: object | None = None  # the compiled StructuredOutput (xgrammar's CompiledGrammar), shared by its turns

    @property
    def penalized(self) -> bool:
        """Whether the logits are changed before the argmax (bias or penalties): such a turn keeps `Penalties`."""
        return (
            bool(self.logit_bias)
            or self.repetition_penalty != 1
            or bool(self.presence_penalty)
            or bool(self.frequency_penalty)
        )


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """A reply token's log-probability under the model's raw logits, and the `top` most likely tokens there
    (id, logprob), most likely first."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True, slots=True)
class Delta:
    """What one sampled token adds to its turn (what `on_token` callbacks receive, on the engine's thread): the
    token and the reply text it makes safe to show ("" when it completes none or a hold-back keeps it; the last
    token's also carries what was held). The texts of a turn's deltas join to its `Reply.text`, their reasonings
    to its `Reply.reasoning`."""

    token_id: int
    text: str = ""
    logprob: TokenLogprob | None = None  # when the turn asked for logprobs
    index: int = 0  # which candidate's token (SamplingParams.n > 1)
    reasoning: str = ""  # the reasoning it makes safe to show (a template that thinks); never also in `text`


def next_piece(deltas: Iterator[Delta], token_ids: bool) -> int | str:
    """What a reply stream yields next from its deltas: candidate 0's next token id, or its next non-empty text."""
    for delta in deltas:
        if delta.index:
            continue
        if token_ids:
            return delta.token_id
        if delta.text:
            return delta.text
    raise StopIteration


@dataclass(frozen=True)
class Reply:
    conv_id: str | None  # None for a `complete()` call
    token_ids: list[int]
    text: str | None
    finish_reason: str  # "stop" | "length" | "cancelled" (`stop()`: cut short, what was sampled kept)
    num_new_tokens: int  # how much the token sequence grew before the reply (message, template)
    num_reused_device: int  # history positions whose KV was found on the device
    num_reused_host: int  # ... swapped in from the host tier
    num_reused_disk: int  # ... loaded from the disk tier
    num_recomputed: int  # history positions computed in an earlier turn and computed again (dropped, rewritten)
    num_prefilled: int  # tokens fed to the model before the first reply token
    ttft_s: float
    latency_s: float
    num_chunks_device: int = 0  # history chunks found per tier when the turn started (dropped: recomputed)
    num_chunks_host: int = 0
    num_chunks_disk: int = 0
    num_chunks_dropped: int = 0
    bytes_swapped_in: int = 0  # KV bytes copied to the device for this turn (host swap-in + disk loads)
    num_reused_shared: int = 0  # of the reused positions, those another conversation computed or holds too
    logprobs: list[TokenLogprob] | None = None  # one per reply token, when SamplingParams.logprobs asked for them
    candidates: tuple[Reply, ...] = ()  # with SamplingParams.n > 1: candidates 1 .. n-1 (conv ids `<conv_id>/<i>`)
    tool_calls: tuple[ToolCall, ...] = ()  # the calls the reply makes (turns with tools); their text is not in `text`
    reasoning: str | None = None  # the reply's <think> block (a template that thinks), when it has one: not in text
    tool_calls_dropped: int = 0  # calls parsed beyond the first and dropped (parallel_tool_calls=False)


_arrivals = itertools.count()


class Candidates:
    """The n candidates of one turn (SamplingParams.n > 1): candidate 0 is the turn on the caller's conversation,
    the others run on its forks. The turn is atomic: a candidate that finishes waits (its conversation still
    pinned, its record not yet written) until all have, then all are closed together and candidate 0's Future
    (the caller's) gets candidate 0's Reply with the others in `Reply.candidates`."""

    def __init__(self, first: Turn) -> None:
        self.turns: list[Turn] = [first]
        self.finished: dict[int, str] = {}  # candidate index -> finish reason

    @property
    def done(self) -> bool:
        return len(self.finished) == self.turns[0].sampling.n


@dataclass(eq=False)
class Turn:
    conv: Conversation
    sampling: ResolvedSampling
    prompt_len: int  # len(conv.tokens) when admitted
    num_new_tokens: int  # how much the token sequence grew: the message and its template
    history_kept: int  # leading tokens of the stored history the turn kept (the rest was rewritten)
    history_kv: int  # history positions an earlier turn computed (all but the last reply token)
    future: Future = field(default_factory=Future)
    on_token: Callable[[Delta], None] | None = None
    arrival: int = field(default_factory=lambda: next(_arrivals))
    submitted_at: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    output: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None
    text: TextStream | None = None  # the reply's text as it grows (None without a tokenizer)
    penalties: Penalties | None = None  # the sampler's per-turn token statistics, when the sampling penalizes
    grammar: GrammarState | None = None  # where the reply stands in its StructuredOutput's grammar
    tools: ToolUse | None = None  # the tools the turn may call
    tool_text: ToolCallText | None = None  # the hold-back that keeps a call's text out of the reply and parses it
    logprobs: list[TokenLogprob] | None = None  # when sampling.logprobs asks for them
    num_computed: int = 0  # tokens fed to the model for this turn
    num_prefilled: int = 0  # of which before the first reply token
    restored: RestoreStats | None = None  # where the history's KV was when the turn started
    before: tuple[list[int], list[dict] | None, int] | None = None  # (tokens, messages, num_computed) before it
    messages_before: int = 0  # text mode: how many of the conversation's messages its record holds before the turn
    index: int = 0  # which candidate this turn is (SamplingParams.n > 1)
    group: Candidates | None = None  # the turn's candidates, when it has several
    stop_requested: bool = False  # `stop()`: finish after the next sampled token, keeping the reply so far

    def new_messages(self, messages: list[dict]) -> list[dict]:
        """The messages this turn added to its conversation (its input: a user message, tool results...)."""
        return messages[self.messages_before :]

    @property
    def num_reused(self) -> int:
        """History positions whose KV was reused (device, host or disk)."""
        tokens = self.restored.tokens
        return tokens[Tier.DEVICE] + tokens[Tier.HOST] + tokens[Tier.DISK]

    @property
    def num_missing_history(self) -> int:
        """History positions computed in an earlier turn whose KV was dropped or rewritten."""
        return max(self.history_kv - self.num_reused, 0)

    @property
    def num_recomputed(self) -> int:
        """History KV computed again: what was gone at admission, plus what preemption made us redo."""
        minimum = (self.prompt_len - self.num_reused) + max(len(self.output) - 1, 0)
        return self.num_missing_history + (self.num_computed - minimum)
