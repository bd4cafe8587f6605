"""Iteration-level FCFS scheduling with a token budget per step (Pensieve's unified batching).

Every active turn needs KV for `conv.tokens[conv.num_computed:]`: one token for a decode, more for a prefill
(new message, history recomputed after eviction or preemption). Each step takes decodes first (oldest first),
then prefill chunks of the remaining budget; a prompt longer than the budget is chunked across steps.
When a decode cannot get a block, idle conversations are evicted; if that is not enough, the youngest other
active turn is preempted (its KV dropped and recomputed later). Admission guarantees that each turn fits the
pool on its own, so the oldest turn can always progress.
"""

from __future__ import annotations

from dataclasses import dataclass

from pensieve.cache.manager import KVManager
from pensieve.engine.turn import Turn


@dataclass(frozen=True)
class ScheduledChunk:
    turn: Turn
    start: int  # first position computed this step (== conv.num_computed)
    num_tokens: int
    samples: bool  # the chunk reaches the end of the conversation's tokens: its last row is sampled


class Scheduler:
    def __init__(self, kv: KVManager, max_num_batched_tokens: int, max_num_seqs: int) -> None:
        self.kv = kv
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.active: list[Turn] = []  # arrival order
        self.num_preemptions = 0

    def add(self, turn: Turn) -> None:
        self.active.append(turn)

    def remove(self, turn: Turn) -> None:
        self.active.remove(turn)

    def schedule(self) -> list[ScheduledChunk]:
        budget = self.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        scheduled: set[str] = set()
        for decode_pass in (True, False):
            for turn in list(self.active):
                if turn.conv.conv_id in scheduled or (turn.pending == 1) != decode_pass:
                    continue
                if budget == 0 or len(chunks) == self.max_num_seqs:
                    return chunks
                n = min(turn.pending, budget)
                if not self._reserve_or_preempt(turn, turn.conv.num_computed + n, scheduled):
                    if decode_pass:
                        continue
                    break  # FCFS: younger prefills wait behind this one
                chunks.append(ScheduledChunk(turn, turn.conv.num_computed, n, n == turn.pending))
                scheduled.add(turn.conv.conv_id)
                budget -= n
        return chunks

    def _reserve_or_preempt(self, turn: Turn, num_tokens: int, scheduled: set[str]) -> bool:
        """Blocks for num_tokens positions of turn's conversation: evict idle conversations, then preempt
        strictly younger unscheduled turns, youngest first. False if even that cannot make room."""
        while not self.kv.reserve(turn.conv, num_tokens, protect=scheduled):
            victims = [
                t for t in self.active if t.arrival > turn.arrival and t.conv.blocks and t.conv.conv_id not in scheduled
            ]
            if not victims:
                return False
            self._preempt(max(victims, key=lambda t: t.arrival))
        return True

    def _preempt(self, victim: Turn) -> None:
        """Drop the victim's KV; it stays active and recomputes its whole history when scheduled again."""
        self.num_preemptions += 1
        self.kv.drop_kv(victim.conv)
