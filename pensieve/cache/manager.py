"""Conversations and their device KV: token history + a block table over the device BlockPool.

A conversation's KV covers a prefix of its tokens, `tokens[:num_computed]`, in `blocks` (block i holds positions
[i*block_size, (i+1)*block_size)). The raw tokens are always kept, so KV can be dropped at any time and
recomputed exactly. While a turn runs, the conversation is pinned (never evicted); idle conversations are evicted
least-recently-active first when a step needs blocks.

    tokens      [t0 t1 t2 ... t(n-1)]          all tokens, history + new message + reply so far
    computed    [<--- num_computed --->]       KV present in `blocks`
    blocks      [b7      ][b2      ][b5  ..]   ceil(num_computed / block_size) or more (allocated ahead)
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from pensieve.cache.blocks import BlockPool


@dataclass
class Conversation:
    conv_id: str
    tokens: list[int] = field(default_factory=list)
    num_computed: int = 0
    blocks: list[int] = field(default_factory=list)
    last_active: float = field(default_factory=time.monotonic)
    pinned: bool = False  # a turn is running on it


class KVManager:
    """The device tier: which conversation owns which blocks. Pure bookkeeping, no tensors."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.pool = BlockPool(num_blocks)
        self.block_size = block_size
        self.conversations: dict[str, Conversation] = {}
        self.num_evictions = 0
        self.num_evicted_tokens = 0

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def conversation(self, conv_id: str) -> Conversation:
        conv = self.conversations.get(conv_id)
        if conv is None:
            conv = self.conversations[conv_id] = Conversation(conv_id)
        return conv

    def reserve(self, conv: Conversation, num_tokens: int, protect: set[str]) -> bool:
        """Make conv's blocks cover num_tokens positions, evicting idle conversations if needed.

        False (and nothing evicted) when even evicting every idle conversation not in `protect` would not do.
        """
        need = self.blocks_for(num_tokens) - len(conv.blocks)
        if need <= 0:
            return True
        if need > self.pool.num_free + self._evictable_blocks(protect | {conv.conv_id}):
            return False
        while not self.pool.can_allocate(need):
            self._evict_one(protect | {conv.conv_id})
        conv.blocks.extend(self.pool.allocate(need))
        return True

    def _evictable(self, protect: set[str]) -> list[Conversation]:
        return [c for c in self.conversations.values() if c.blocks and not c.pinned and c.conv_id not in protect]

    def _evictable_blocks(self, protect: set[str]) -> int:
        return sum(len(c.blocks) for c in self._evictable(protect))

    def _evict_one(self, protect: set[str]) -> None:
        victim = min(self._evictable(protect), key=lambda c: c.last_active)
        self.num_evictions += 1
        self.num_evicted_tokens += victim.num_computed
        self.drop_kv(victim)

    def drop_kv(self, conv: Conversation) -> None:
        """Forget conv's KV (its tokens stay; the next turn recomputes them)."""
        self.pool.free(conv.blocks)
        conv.blocks = []
        conv.num_computed = 0

    def truncate_kv(self, conv: Conversation, num_tokens: int) -> None:
        """Keep KV for the first num_tokens tokens only; free the blocks past them."""
        conv.num_computed = min(conv.num_computed, num_tokens)
        keep = self.blocks_for(conv.num_computed)
        self.pool.free(conv.blocks[keep:])
        del conv.blocks[keep:]

    def remove(self, conv_id: str) -> None:
        conv = self.conversations.pop(conv_id, None)
        if conv is not None:
            self.pool.free(conv.blocks)

    def slot(self, conv: Conversation, position: int) -> int:
        return conv.blocks[position // self.block_size] * self.block_size + position % self.block_size

    def check_integrity(self) -> None:
        self.pool.check_integrity()
        owned: list[int] = [b for c in self.conversations.values() for b in c.blocks]
        assert len(owned) == len(set(owned)), "a block is owned by two conversations"
        assert set(owned) == self.pool.allocated, "allocated blocks and owned blocks differ"
        for c in self.conversations.values():
            assert 0 <= c.num_computed <= len(c.tokens), f"{c.conv_id}: num_computed out of range"
            assert len(c.blocks) >= self.blocks_for(c.num_computed), f"{c.conv_id}: KV without blocks"
