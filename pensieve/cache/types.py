"""The cache's plain data: where a chunk lives (`Tier`), a chunk of KV (`Chunk`), a conversation (`Conversation`) and
what a turn found when it was restored (`RestoreStats`). A leaf module: no tensors, no other pensieve import. Only
the cache manager (pensieve/cache/manager.py) writes a `Conversation`; the rest of pensieve reads them."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import IntEnum


class Tier(IntEnum):
    DROPPED = 0
    DISK = 1
    HOST = 2
    DEVICE = 3


@dataclass(eq=False, slots=True)
class Chunk:
    """One block of KV, held by every conversation whose history contains it (`refs` of them) and, once full and
    computed, indexed by the prompt tree under its content `key` (pensieve/cache/tree.py)."""

    tier: Tier
    block: int = -1  # block id in the device or host pool; -1 on disk or dropped
    index: int = 0  # which block of a history: positions [index * block_size, (index + 1) * block_size)
    key: bytes | None = None  # content key (full, computed chunks only): chained hash of every token it depends on
    refs: int = 0  # conversations holding it
    last_used: float = 0.0  # when its last holder let go (the activity of a chunk only the tree holds)
    # on the device or host: the content key of a clean disk copy (a chunk file holding exactly this KV, written
    # in the background or by a persist), else None. Its live place stays in memory; evicting it writes nothing.
    copy: bytes | None = None


@dataclass(eq=False)
class Conversation:
    conv_id: str
    tokens: list[int] = field(default_factory=list)
    num_computed: int = 0
    chunks: list[Chunk] = field(default_factory=list)
    last_active: float = field(default_factory=time.monotonic)
    pinned: bool = False  # a turn is running on it
    preempted: bool = False  # its turn was preempted: its chunks may move until the turn is scheduled again
    recompute: list[list[int]] = field(default_factory=list)  # during a turn: [start, end) ranges to recompute
    messages: list[dict] | None = None  # text mode: the chat messages that rendered `tokens`; None in raw mode
    # text mode: the tools `tokens` were rendered with (structured.tools.tools_key: "" none); None unknown (a record
    # from before it was kept): the next turn renders the conversation whole
    tools: str | None = None
    stored: bool = True  # False: a `complete()` call's conversation, gone when its turn ends (never persisted)

    @property
    def block_table(self) -> list[int]:
        return [c.block for c in self.chunks]

    @property
    def on_device(self) -> bool:
        return all(c.tier == Tier.DEVICE for c in self.chunks)

    @property
    def running(self) -> bool:
        """Its chunks must stay where they are (a turn is running on it and is not preempted)."""
        return self.pinned and not self.preempted

    @property
    def pending(self) -> int:
        """Positions to compute before the next sample: the recompute ranges, then the new tokens."""
        return sum(end - start for start, end in self.recompute) + len(self.tokens) - self.num_computed


@dataclass(frozen=True)
class RestoreStats:
    """What a turn found when its conversation was brought to the device (history positions / chunks per tier)."""

    tokens: dict[Tier, int]
    chunks: dict[Tier, int]
    bytes_in: int
    shared: int = 0  # of the positions found (any tier), those in chunks another conversation computed or holds
