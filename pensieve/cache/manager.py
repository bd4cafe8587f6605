"""Conversations and where their KV lives: the tiered cache's bookkeeping (DESIGN §4).

A conversation's KV covers `tokens[:num_computed]`, cut into chunks of `block_size` positions (chunk i holds
positions [i*block_size, (i+1)*block_size)). Each chunk lives in one tier, and for every conversation

    chunks   [DROPPED ...][DISK ...][HOST ...][DEVICE ...]      (tiers never decrease along the history)

so eviction always takes a conversation's *leading* chunks, the cheapest to recompute. The raw tokens are always
kept, so any chunk can be dropped and recomputed exactly.

Life of a turn:
- `restore`: every chunk of the conversation gets a device block. Host chunks are swapped in and disk chunks loaded
  (queued for the next forward, layer by layer); dropped chunks become the recompute range
  [recompute_pos, recompute_end), computed before the new tokens as a sub-sequence of the same forward.
- `reserve`: device blocks for the positions about to be computed.
- the turn finishes: `finish_turn` frees blocks allocated past the computed positions; the conversation is idle.

Making room: `_make_room(tier, n)` moves chunks of idle conversations one tier down in the policy's order
(pensieve/cache/policy.py): device -> host -> disk -> dropped, skipping disabled tiers; a move into a full host tier
first makes room there. A disk write that fails drops the chunk (and, to keep the order, every chunk before it).
After each step `swap_out_ahead` moves idle chunks down while device free blocks are under the watermark — only into
a tier with room, never dropping anything ahead of time.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass, field

from pensieve.cache.blocks import BlockPool
from pensieve.cache.disk import DiskStore
from pensieve.cache.policy import LRUPolicy, PensievePolicy, RecomputeCost
from pensieve.cache.tiers import Chunk, KVStorage, Tier, leading_chunk


@dataclass
class Conversation:
    conv_id: str
    tokens: list[int] = field(default_factory=list)
    num_computed: int = 0
    chunks: list[Chunk] = field(default_factory=list)
    last_active: float = field(default_factory=time.monotonic)
    pinned: bool = False  # a turn is running on it
    recompute_pos: int = 0  # during a turn: positions [recompute_pos, recompute_end) are recomputed (were dropped)
    recompute_end: int = 0
    messages: list[dict] | None = None  # text mode: the chat messages that rendered `tokens`; None in raw mode

    @property
    def block_table(self) -> list[int]:
        return [c.block for c in self.chunks]

    @property
    def on_device(self) -> bool:
        return all(c.tier == Tier.DEVICE for c in self.chunks)

    @property
    def pending(self) -> int:
        """Positions to compute before the next sample: the recompute range, then the new tokens."""
        return (self.recompute_end - self.recompute_pos) + len(self.tokens) - self.num_computed


@dataclass(frozen=True)
class RestoreStats:
    """What a turn found when its conversation was brought to the device (history positions / chunks per tier)."""

    tokens: dict[Tier, int]
    chunks: dict[Tier, int]
    bytes_in: int


class KVManager:
    def __init__(
        self,
        num_device_blocks: int,
        block_size: int,
        *,
        num_host_blocks: int = 0,
        policy: PensievePolicy | LRUPolicy | None = None,
        storage: KVStorage | None = None,
        disk: DiskStore | None = None,
        swap_out_watermark: float = 0.25,
        decode_reserve: float = 0.10,
    ) -> None:
        self.device = BlockPool(num_device_blocks)
        self.host = BlockPool(num_host_blocks)
        self.pools = {Tier.DEVICE: self.device, Tier.HOST: self.host}
        self.block_size = block_size
        self.policy = policy or PensievePolicy(RecomputeCost(1.0, 1.0), block_size)
        self.storage = storage  # None: bookkeeping only (unit tests)
        self.disk = disk
        self.watermark_blocks = math.ceil(swap_out_watermark * num_device_blocks)
        self.reserve_blocks = math.ceil(decode_reserve * num_device_blocks)
        self.conversations: dict[str, Conversation] = {}
        self.counters: Counter[str] = Counter()
        self.trace: list[tuple[str, int, Tier, Tier]] | None = None  # tests: (conv_id, chunk, from, to) per move
        self._host_free_after_forward: list[int] = []  # host blocks a queued swap-in still reads

    # ---- lookup -----------------------------------------------------------------------------------------------

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def conversation(self, conv_id: str) -> Conversation:
        conv = self.lookup(conv_id)
        if conv is None:
            conv = self.conversations[conv_id] = Conversation(conv_id)
        return conv

    def lookup(self, conv_id: str) -> Conversation | None:
        """The conversation in memory, else loaded from disk (tokens, and its chunk files as the disk tier)."""
        conv = self.conversations.get(conv_id)
        if conv is not None or self.disk is None:
            return conv
        stored = self.disk.load(conv_id)
        if stored is None:
            return None
        conv = Conversation(conv_id, tokens=stored.tokens, last_active=0.0, messages=stored.messages)
        bs = self.block_size
        files = stored.chunk_tokens
        for last in sorted(files, reverse=True):
            if last * bs < files[last] <= min((last + 1) * bs, len(stored.tokens)):
                conv.num_computed = covered = files[last]
                conv.chunks = [Chunk(Tier.DISK) for _ in range(last + 1)]
                # A chunk without a file, or whose file covers other positions, is dropped with all before it.
                bad = [i for i in range(last + 1) if files.get(i) != min((i + 1) * bs, covered)]
                for i in bad:
                    if i in files:
                        self.disk.reject(conv_id, i, "written for other tokens")
                for i in range(bad[-1] + 1 if bad else 0):
                    conv.chunks[i].tier = Tier.DROPPED
                _normalize(conv)
                break
        self.conversations[conv_id] = conv
        return conv

    def chunk_tokens(self, conv: Conversation, index: int) -> int:
        """Valid positions in chunk `index` (all but a conversation's last chunk are full)."""
        return max(0, min(self.block_size, conv.num_computed - index * self.block_size))

    def slot(self, conv: Conversation, position: int) -> int:
        return conv.chunks[position // self.block_size].block * self.block_size + position % self.block_size

    # ---- a turn's device blocks -----------------------------------------------------------------------------------

    def restore(self, conv: Conversation, protect: set[str], keep_free: int = 0) -> RestoreStats | None:
        """Give every chunk of conv a device block: swap in host chunks, load disk chunks (for the next forward),
        and set the dropped ones as the recompute range. None (nothing changed) if the device cannot hold them
        with `keep_free` blocks to spare, even after moving every idle conversation not in `protect` down."""
        bs = self.block_size
        protect = protect | {conv.conv_id}
        need = sum(c.tier != Tier.DEVICE for c in conv.chunks)
        if need + keep_free > self.device.num_free + self._movable(Tier.DEVICE, protect):
            return None
        loaded = {}
        for i, chunk in enumerate(conv.chunks):  # disk first: a chunk that fails to load is dropped with all before it
            if chunk.tier == Tier.DISK:
                n = self.chunk_tokens(conv, i)
                data = self.disk.read_chunk(conv.conv_id, i, conv.tokens[: i * bs + n]) if self.disk else None
                if data is None:
                    self.counters["disk_chunks_bad"] += 1
                    loaded.clear()
                    self._drop_through(conv, i)
                    if not conv.chunks:
                        break
                else:
                    loaded[i] = data
        tokens = Counter({t: 0 for t in Tier})
        chunks = Counter({t: 0 for t in Tier})
        for i, chunk in enumerate(conv.chunks):
            tokens[chunk.tier] += self.chunk_tokens(conv, i)
            chunks[chunk.tier] += 1
        missing = [i for i, c in enumerate(conv.chunks) if c.tier != Tier.DEVICE]
        self._make_room(Tier.DEVICE, len(missing), protect, allow_drop=True)
        ids = self.device.allocate(len(missing))
        assert ids is not None, "room was checked before"
        swap_host, swap_dev, load_data, load_dev = [], [], [], []
        for i, d in zip(missing, ids, strict=True):
            chunk = conv.chunks[i]
            if chunk.tier == Tier.HOST:
                swap_host.append(chunk.block)
                swap_dev.append(d)
                self._host_free_after_forward.append(chunk.block)
            elif chunk.tier == Tier.DISK:
                load_data.append(loaded[i])
                load_dev.append(d)
            self._trace(conv, i, chunk.tier, Tier.DEVICE)
            chunk.tier, chunk.block = Tier.DEVICE, d
        conv.recompute_pos, conv.recompute_end = 0, chunks[Tier.DROPPED] * bs
        bytes_in = 0
        if self.storage is not None:
            if swap_host:
                self.storage.queue_swap_in(swap_host, swap_dev)
            if load_data:
                self.storage.queue_load(load_data, load_dev)
            bytes_in = (len(swap_host) + len(load_data)) * self.storage.bytes_per_block
        self.counters["swap_in_chunks"] += len(swap_host)
        self.counters["disk_read_chunks"] += len(load_data)
        self.counters["bytes_swapped_in"] += bytes_in
        self.counters["recompute_chunks"] += chunks[Tier.DROPPED]
        return RestoreStats(dict(tokens), dict(chunks), bytes_in)

    def reserve(self, conv: Conversation, num_tokens: int, protect: set[str], keep_free: int = 0) -> bool:
        """Device blocks covering num_tokens positions of conv (already restored). False, nothing changed, if that
        would leave fewer than keep_free blocks even after moving every idle conversation not in `protect` down."""
        need = self.blocks_for(num_tokens) - len(conv.chunks)
        if need <= 0:
            return True
        protect = protect | {conv.conv_id}
        if need + keep_free > self.device.num_free + self._movable(Tier.DEVICE, protect):
            return False
        self._make_room(Tier.DEVICE, need, protect, allow_drop=True)
        conv.chunks += [Chunk(Tier.DEVICE, b) for b in self.device.allocate(need)]
        return True

    def preempt(self, conv: Conversation) -> None:
        """Take a running turn's conversation off the device (its turn restores it when scheduled again): a recompute
        in progress is abandoned (those chunks stay dropped), the rest moves down like an idle conversation's."""
        if conv.recompute_pos < conv.recompute_end:
            for i in range(self.blocks_for(conv.recompute_end)):
                self._release(conv, i)
        conv.recompute_pos = conv.recompute_end = 0
        self._free_tail(conv)
        while (i := leading_chunk(conv.chunks, Tier.DEVICE)) is not None:
            self._demote(conv, i, allow_drop=True)
        _normalize(conv)
        self.counters["preempted_conversations"] += 1

    def finish_turn(self, conv: Conversation) -> None:
        self._free_tail(conv)
        conv.recompute_pos = conv.recompute_end = 0

    def after_forward(self) -> None:
        """The forward that read them is issued (and, on GPU, ordered before any later reuse): free swapped-in host
        blocks."""
        if self._host_free_after_forward:
            self.host.free(self._host_free_after_forward)
            self._host_free_after_forward = []

    def swap_out_ahead(self) -> int:
        """Ahead-of-time swap-out: move idle chunks down while device free blocks are under the watermark; only
        into a tier with room (host, or disk when there is no host tier), never dropping. -> chunks moved."""
        if self.device.num_free >= self.watermark_blocks or (self.host.num_blocks == 0 and self.disk is None):
            return 0
        before = self.device.num_free
        self._make_room(Tier.DEVICE, self.watermark_blocks, set(), allow_drop=False)
        moved = self.device.num_free - before
        self.counters["ahead_swap_out_chunks"] += moved
        return moved

    # ---- idle conversations -------------------------------------------------------------------------------------

    def truncate(self, conv: Conversation, num_tokens: int) -> None:
        """Keep KV for the first num_tokens positions only (the rest of the history was rewritten)."""
        cut = num_tokens < conv.num_computed
        if cut:
            conv.num_computed = num_tokens
        self._free_tail(conv)
        keep = len(conv.chunks)
        if cut and keep and conv.num_computed % self.block_size and conv.chunks[keep - 1].tier == Tier.DISK:
            self._drop_through(conv, keep - 1)  # its file covers tokens that changed
        _normalize(conv)

    def drop_all(self, conv: Conversation) -> None:
        for i in range(len(conv.chunks)):
            self._release(conv, i)
        conv.chunks, conv.num_computed = [], 0
        conv.recompute_pos = conv.recompute_end = 0

    def persist(self, conv: Conversation) -> None:
        """Write conv's device and host chunks to disk too (close / end): they survive a restart. Only for a stored
        conversation (one with a token log): KV without its tokens could never be used."""
        if self.disk is None or conv.conv_id not in self.disk.index:
            return
        for i, chunk in enumerate(conv.chunks):
            if chunk.tier in (Tier.DEVICE, Tier.HOST) and self.chunk_tokens(conv, i) > 0:
                if self._write_to_disk(conv, i):
                    self.counters["persisted_chunks"] += 1

    def remove(self, conv_id: str, forget: bool = False) -> None:
        conv = self.conversations.pop(conv_id, None)
        if conv is not None:
            self.drop_all(conv)
        if forget and self.disk is not None:
            self.disk.forget(conv_id)

    # ---- moving chunks down ---------------------------------------------------------------------------------------

    def _idle(self, tier: Tier, protect: set[str]) -> list[Conversation]:
        return [
            c
            for c in self.conversations.values()
            if not c.pinned and c.conv_id not in protect and any(ch.tier == tier for ch in c.chunks)
        ]

    def _movable(self, tier: Tier, protect: set[str]) -> int:
        return sum(ch.tier == tier for c in self._idle(tier, protect) for ch in c.chunks)

    def _make_room(self, tier: Tier, n: int, protect: set[str], allow_drop: bool) -> bool:
        """Move idle chunks out of `tier` in policy order until n of its blocks are free."""
        pool = self.pools[tier]
        current = None
        for conv, i in self.policy.order(self._idle(tier, protect), tier, time.monotonic()):
            if pool.num_free >= n and not (self.policy.whole_conversation and conv is current):
                break
            if not self._demote(conv, i, allow_drop):
                break
            current = conv
        return pool.num_free >= n

    def _demote(self, conv: Conversation, i: int, allow_drop: bool) -> bool:
        """Move chunk i (the leading chunk of its tier) one enabled tier down. False if allow_drop is off and no
        lower tier has room."""
        chunk = conv.chunks[i]
        src = chunk.tier
        if src == Tier.DEVICE and self.host.num_blocks > 0:
            if self.host.num_free == 0:
                self._make_room(Tier.HOST, 1, set(), allow_drop)
            if self.host.num_free == 0 and (j := leading_chunk(conv.chunks, Tier.HOST)) is not None:
                # the host holds only running conversations' chunks, this one's among them (it is being preempted):
                # its own leading host chunk moves down first
                self._demote(conv, j, allow_drop)
            if self.host.num_free > 0:
                (h,) = self.host.allocate(1)
                if self.storage is not None:
                    self.storage.swap_out([chunk.block], [h])
                self.device.free([chunk.block])
                self._trace(conv, i, src, Tier.HOST)
                chunk.tier, chunk.block = Tier.HOST, h
                self.counters["swap_out_chunks"] += 1
                self.counters["bytes_swapped_out"] += self.storage.bytes_per_block if self.storage else 0
                return True
        # To disk only if no earlier chunk of this conversation is on the host (the tier order).
        below_host = src == Tier.HOST or leading_chunk(conv.chunks, Tier.HOST) is None
        if src in (Tier.DEVICE, Tier.HOST) and self.disk is not None and below_host and self._write_to_disk(conv, i):
            self.pools[src].free([chunk.block])
            self._trace(conv, i, src, Tier.DISK)
            chunk.tier, chunk.block = Tier.DISK, -1
            self.counters["disk_write_chunks"] += 1
            return True
        if not allow_drop:
            return False
        self._drop_through(conv, i)
        return True

    def _write_to_disk(self, conv: Conversation, i: int) -> bool:
        if self.disk is None or self.storage is None:
            return False
        chunk = conv.chunks[i]
        k, v = self.storage.read_chunk(chunk.tier, chunk.block)
        covered = conv.tokens[: i * self.block_size + self.chunk_tokens(conv, i)]
        written = self.disk.write_chunk(conv.conv_id, i, k, v, covered)
        self.counters["bytes_written_disk"] += written
        return written > 0

    def _release(self, conv: Conversation, i: int) -> None:
        """Free chunk i's block (no copy): it becomes dropped."""
        chunk = conv.chunks[i]
        if chunk.tier in self.pools:
            self.pools[chunk.tier].free([chunk.block])
        chunk.tier, chunk.block = Tier.DROPPED, -1

    def _drop_through(self, conv: Conversation, i: int) -> None:
        """Drop chunk i and, to keep the tier order, every chunk before it."""
        for j in range(i + 1):
            if conv.chunks[j].tier != Tier.DROPPED:
                self._trace(conv, j, conv.chunks[j].tier, Tier.DROPPED)
                self._release(conv, j)
                self.counters["dropped_chunks"] += 1
        _normalize(conv)

    def _free_tail(self, conv: Conversation) -> None:
        """Free chunks past the computed positions (allocated ahead for tokens that were never computed)."""
        keep = self.blocks_for(conv.num_computed)
        for i in range(keep, len(conv.chunks)):
            self._release(conv, i)
        del conv.chunks[keep:]

    def _trace(self, conv: Conversation, i: int, src: Tier, dst: Tier) -> None:
        if self.trace is not None:
            self.trace.append((conv.conv_id, i, src, dst))

    # ---- checks ---------------------------------------------------------------------------------------------------

    def check_integrity(self) -> None:
        self.device.check_integrity()
        self.host.check_integrity()
        owned = {Tier.DEVICE: [], Tier.HOST: list(self._host_free_after_forward)}
        for c in self.conversations.values():
            tiers = [ch.tier for ch in c.chunks]
            assert tiers == sorted(tiers), f"{c.conv_id}: chunks out of tier order {tiers}"
            assert not tiers or tiers[-1] != Tier.DROPPED, f"{c.conv_id}: trailing dropped chunk"
            assert 0 <= c.num_computed <= len(c.tokens), f"{c.conv_id}: num_computed out of range"
            assert len(c.chunks) >= self.blocks_for(c.num_computed), f"{c.conv_id}: computed positions without chunks"
            assert all(t == Tier.DEVICE for t in tiers[self.blocks_for(c.num_computed) :]), f"{c.conv_id}: tail"
            assert 0 <= c.recompute_pos <= c.recompute_end <= c.num_computed, f"{c.conv_id}: recompute range"
            assert c.pinned or c.recompute_pos == c.recompute_end, f"{c.conv_id}: idle with a recompute pending"
            for ch in c.chunks:
                if ch.tier in owned:
                    owned[ch.tier].append(ch.block)
                else:
                    assert ch.block == -1, f"{c.conv_id}: a {ch.tier.name} chunk holds a block"
        for tier, blocks in owned.items():
            assert len(blocks) == len(set(blocks)), f"a {tier.name} block is owned twice"
            assert set(blocks) == self.pools[tier].allocated, f"{tier.name}: allocated and owned blocks differ"


def _normalize(conv: Conversation) -> None:
    """A conversation whose last chunk is dropped has nothing left (the tier order): start it from scratch."""
    if conv.chunks and conv.chunks[-1].tier == Tier.DROPPED:
        conv.chunks, conv.num_computed = [], 0
        conv.recompute_pos = conv.recompute_end = 0
