"""Iteration-level FCFS scheduling with a token budget per step (Pensieve's unified batching).

Every active turn needs KV for the positions its conversation has not computed: the recompute ranges of dropped
chunks (each `[start, end)`, anywhere in the history), then its new tokens `tokens[num_computed:]` — one token for a
decode, more for a prefill. Each step takes decodes first (oldest first), then the other turns' positions in
order, up to the budget; a long prompt or recompute range is chunked across steps. A turn contributes at most two
sub-sequences to a step, sharing one block table: part of its first recompute range, and — once that range is the
last — its new tokens, which attend to the recomputed KV written in the same layer (DESIGN §3). Every sub-sequence
attends only to positions that are already present or computed earlier in the same step.

Before a turn's first chunk its conversation is *restored* (it takes the longest cached prefix the prompt tree holds,
then every chunk gets a device block: swap-in, disk load or recompute). New turns may not take the device's last
`decode_reserve` blocks while other turns are decoding. When blocks run out, chunks move down the tiers; if that is
not enough, the youngest other active turn is preempted (its chunks move down like idle ones and its conversation is
restored when scheduled again). Admission guarantees each turn fits the device on its own, so the oldest turn can
always progress.
"""

from __future__ import annotations

from dataclasses import dataclass

from pensieve.cache.manager import KVManager
from pensieve.cache.types import Tier
from pensieve.engine.turn import Turn


@dataclass(frozen=True)
class ScheduledChunk:
    turn: Turn
    start: int  # first position computed
    num_tokens: int
    samples: bool  # the chunk reaches the end of the conversation's tokens: its last row is sampled
    recompute: bool = False  # positions of the dropped range (else the conversation's next uncomputed positions)


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

    def check_integrity(self) -> None:
        for turn in self.active:
            if _in_place(turn):
                assert turn.conv.on_device, f"{turn.conv.conv_id}: restored, not preempted, but chunks moved off"

    def schedule(self) -> list[ScheduledChunk]:
        budget = self.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        scheduled: set[str] = set()
        decoding = any(_is_decode(t) for t in self.active)
        for decode_pass in (True, False):
            for turn in list(self.active):
                if turn.conv.conv_id in scheduled or _is_decode(turn) != decode_pass:
                    continue
                if budget == 0 or len(scheduled) == self.max_num_seqs:
                    return chunks
                keep_free = self.kv.reserve_blocks if decoding and not decode_pass else 0
                pieces = self._place(turn, budget, scheduled, keep_free)
                if not pieces:
                    if decode_pass:
                        continue
                    break  # FCFS: younger prefills wait behind this one
                chunks += pieces
                scheduled.add(turn.conv.conv_id)
                budget -= sum(p.num_tokens for p in pieces)
        return chunks

    def _place(self, turn: Turn, budget: int, scheduled: set[str], keep_free: int) -> list[ScheduledChunk]:
        """This step's chunks of one turn (restoring its conversation first if needed); [] if it must wait."""
        conv = turn.conv
        if not _in_place(turn):
            stats = self._make_room_for(turn, scheduled, lambda: self.kv.restore(conv, scheduled, keep_free))
            if stats is None:
                return []
            if turn.restored is None:
                turn.restored = stats
        pieces = []
        if conv.recompute:
            start, end = conv.recompute[0]
            n = min(end - start, budget)
            pieces.append(ScheduledChunk(turn, start, n, samples=False, recompute=True))
            budget -= n
            if start + n < end or len(conv.recompute) > 1:  # one recompute range a step, new tokens after the last
                return pieces
        n = min(len(conv.tokens) - conv.num_computed, budget)
        if n > 0:
            grow = lambda: self.kv.reserve(conv, conv.num_computed + n, scheduled, keep_free)  # noqa: E731
            if self._make_room_for(turn, scheduled, grow):
                pieces.append(ScheduledChunk(turn, conv.num_computed, n, n == len(conv.tokens) - conv.num_computed))
        return pieces

    def _make_room_for(self, turn: Turn, scheduled: set[str], attempt):
        """attempt() (a restore or reserve, which already moves idle conversations down); while it fails, preempt
        strictly younger unscheduled turns, youngest first. None/False if even that cannot make room."""
        while not (result := attempt()):
            victims = [
                t
                for t in self.active
                if t.arrival > turn.arrival
                and t.conv.conv_id not in scheduled
                and not t.conv.preempted
                and _holds_device_blocks(t)
            ]
            if not victims:
                return result
            self.num_preemptions += 1
            self.kv.preempt(max(victims, key=lambda t: t.arrival).conv)
        return result


def _in_place(turn: Turn) -> bool:
    """The turn's conversation was restored and not preempted since, so all its chunks are on the device: chunks
    of a running conversation never move (`check_integrity`). O(1), where `Conversation.on_device` walks the
    chunks — which, for every turn of every step, cost a 64-sequence decode step ~10 ms at 2k-token histories."""
    return turn.restored is not None and not turn.conv.preempted


def _is_decode(turn: Turn) -> bool:
    conv = turn.conv
    return _in_place(turn) and not conv.recompute and conv.pending == 1


def _holds_device_blocks(turn: Turn) -> bool:
    return any(c.tier == Tier.DEVICE for c in turn.conv.chunks)
