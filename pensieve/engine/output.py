"""After the forward: the step's outputs become conversation state and replies (DESIGN §2, "postprocess").

`OutputProcessor.process(chunks, logits)` advances each scheduled conversation past the positions just computed,
samples a token for every row that samples (one batched call), appends it and its text (the turn's `TextStream`),
hands both to the turn's `on_token`, checks the stop conditions, and for a finished turn ends it in the cache
manager, logs it (durable before it is returned) and resolves the turn's Future with its `Reply`.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import torch

from pensieve.cache.manager import KVManager
from pensieve.cache.types import Tier
from pensieve.engine.sampler import sample
from pensieve.engine.scheduler import ScheduledChunk, Scheduler
from pensieve.engine.turn import Delta, Reply, TokenLogprob, Turn


class OutputProcessor:
    def __init__(
        self, kv: KVManager, scheduler: Scheduler, max_positions: int, spawn_candidates: Callable[[Turn], None]
    ) -> None:
        self.kv = kv
        self.scheduler = scheduler
        self.max_positions = max_positions
        self.spawn_candidates = spawn_candidates  # a turn with n > 1 forks its candidates when its prompt is done
        self.num_tokens_computed = 0
        self.num_turns = 0
        self.num_recomputed = 0

    def process(self, chunks: list[ScheduledChunk], logits: torch.Tensor) -> None:
        """logits: [rows that sample, vocab], in the order of `chunks` that sample."""
        for chunk in chunks:
            turn = chunk.turn
            self.kv.advance(turn.conv, chunk.num_tokens, recompute=chunk.recompute)
            turn.num_computed += chunk.num_tokens
            if turn.first_token_at is None:
                turn.num_prefilled += chunk.num_tokens
            self.num_tokens_computed += chunk.num_tokens
        sampling_chunks = [c for c in chunks if c.samples]
        tokens, logprobs = sample(logits, [c.turn for c in sampling_chunks])
        for chunk, token, logprob in zip(sampling_chunks, tokens, logprobs, strict=True):
            self._append(chunk.turn, token, logprob)

    def _append(self, turn: Turn, token: int, logprob: TokenLogprob | None) -> None:
        if turn.first_token_at is None:
            turn.first_token_at = time.perf_counter()
            if turn.group is not None and turn.index == 0:
                self.spawn_candidates(turn)  # before the token is appended: the forks share the prompt alone
        turn.output.append(token)
        if logprob is not None:
            turn.logprobs.append(logprob)
        self.kv.append_token(turn.conv, token)
        text = turn.text.add(token) if turn.text is not None else ""
        reason = self._finish_reason(turn, token)
        if reason is not None and turn.text is not None:
            text += turn.text.finish()
        if turn.on_token is not None:
            reasoning = turn.text.take_reasoning() if turn.text is not None else ""
            turn.on_token(Delta(token, text, logprob, turn.index, reasoning))
        if reason is not None:
            self.finish(turn, reason)

    def _finish_reason(self, turn: Turn, token: int) -> str | None:
        reason = self._natural_end(turn, token)
        if reason is None and turn.stop_requested:  # stopped: it ends here, complete or not
            return "cancelled"
        return reason

    def _natural_end(self, turn: Turn, token: int) -> str | None:
        if turn.grammar is not None:  # a constrained reply ends only complete (or cut off: "length")
            if turn.grammar.terminated:
                return "stop"
        elif token in turn.sampling.stop_token_ids or (turn.text is not None and turn.text.stopped):
            return "stop"
        if len(turn.output) >= turn.sampling.max_new_tokens or len(turn.conv.tokens) >= self.max_positions:
            return "length"
        return None

    def finish(self, turn: Turn, reason: str) -> None:
        """The turn is done: its reply is built, its conversation idle and its record durable; its Future resolves.
        A candidate (n > 1) waits for the others, then all are closed and candidate 0's Future gets all replies."""
        self.scheduler.remove(turn)
        group = turn.group
        if group is None:
            turn.future.set_result(self._close(turn, reason))
            return
        group.finished[turn.index] = reason
        if group.done:
            first, *others = [self._close(t, group.finished[t.index]) for t in group.turns]
            group.turns[0].future.set_result(dataclasses.replace(first, candidates=tuple(others)))

    def _close(self, turn: Turn, reason: str) -> Reply:
        conv = turn.conv
        self.num_turns += 1
        self.num_recomputed += turn.num_recomputed
        text = None if turn.text is None else turn.text.reply_text
        reasoning = None if turn.text is None else turn.text.reasoning_text
        parsed = None if turn.tool_text is None else turn.tool_text.parsed
        calls = () if parsed is None else parsed.tool_calls
        dropped = 0
        if calls and not turn.tools.parallel:
            calls, dropped = calls[:1], len(calls) - 1
        new_messages = None
        if conv.messages is not None:
            message = {"role": "assistant", "content": text}
            if reasoning is not None:  # as templates that think read it (Qwen3: reasoning_content)
                message["reasoning_content"] = reasoning
            if calls:
                message["tool_calls"] = [c.message_form() for c in calls]
            new_messages = [*turn.new_messages(conv.messages), message]
        self.kv.end_turn(conv, None if new_messages is None else new_messages[-1])
        self.kv.log_turn(conv, turn.history_kept, new_messages)
        reply = dataclasses.replace(_reply(turn, reason, text, calls, reasoning), tool_calls_dropped=dropped)
        if not conv.stored:  # a completion: its full chunks stay in the prompt tree, the conversation goes
            self.kv.remove(conv.conv_id)
        return reply


def _reply(turn: Turn, reason: str, text: str | None, calls=(), reasoning: str | None = None) -> Reply:
    restored = turn.restored
    now = time.perf_counter()
    return Reply(
        conv_id=turn.conv.conv_id if turn.conv.stored else None,
        token_ids=list(turn.output),
        text=text,
        finish_reason=reason,
        num_new_tokens=turn.num_new_tokens,
        num_reused_device=restored.tokens[Tier.DEVICE],
        num_reused_host=restored.tokens[Tier.HOST],
        num_reused_disk=restored.tokens[Tier.DISK],
        num_recomputed=turn.num_recomputed,
        num_prefilled=turn.num_prefilled,
        ttft_s=(turn.first_token_at or now) - turn.submitted_at,
        latency_s=now - turn.submitted_at,
        num_chunks_device=restored.chunks[Tier.DEVICE],
        num_chunks_host=restored.chunks[Tier.HOST],
        num_chunks_disk=restored.chunks[Tier.DISK],
        num_chunks_dropped=restored.chunks[Tier.DROPPED],
        bytes_swapped_in=restored.bytes_in,
        num_reused_shared=restored.shared,
        logprobs=None if turn.logprobs is None else list(turn.logprobs),
        tool_calls=tuple(calls),
        reasoning=reasoning,
    )
