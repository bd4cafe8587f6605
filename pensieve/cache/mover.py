"""Where chunks live and how they move between tiers (DESIGN §4): the one writer of a chunk's placement.

`make_room(tier, n)` moves chunks out of a tier in the policy's order (lowest retention value first): device -> host
-> disk -> dropped, skipping disabled tiers; a move into a full host tier first makes room there. A chunk held by a
conversation whose turn is running (or one the caller protects) never moves. `swap_out_ahead`, after each step, moves
idle chunks down while device free blocks are under the watermark — only into a tier with room, never dropping.
`move_in` is the other direction: host chunks swapped in, disk chunks loaded (both queued for the next forward,
layer by layer), dropped chunks given a device block for their recompute.

The mover changes a chunk's `tier` and `block`, the pools, the disk files and the copies queued on the KV storage.
Conversations and reference counts are the manager's (pensieve/cache/manager.py): the mover reads them, and asks the
manager to trim a conversation whose trailing chunk it dropped.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from pensieve.cache.types import Chunk, Conversation, Tier

if TYPE_CHECKING:
    from pensieve.cache.manager import KVManager

EVICTION_SLICE = 64  # an eviction that must walk the chunks frees (at least) 1/EVICTION_SLICE of the tier


class TierMover:
    def __init__(self, kv: KVManager) -> None:
        self.kv = kv
        self.trace: list[tuple[str, int, Tier, Tier]] | None = None  # tests: (holders, chunk index, from, to) per move
        self.pending_host_frees: list[int] = []  # host blocks a queued swap-in still reads (freed after the forward)
        # Bumped whenever a chunk may have become movable (a holder stopped running or let go of it): an ahead-of-time
        # swap-out that found nothing more to move does not walk the chunks again until then (`swap_out_ahead`).
        self.epoch = 0
        self._ahead_exhausted: tuple[int, int] | None = None

    def changed(self) -> None:
        """A chunk may have become movable (a holder went idle or let go of it)."""
        self.epoch += 1

    # ---- which chunks may move ------------------------------------------------------------------------------------

    def candidates(self, tier: Tier, protect: set[str], also: Conversation | None = None) -> list:
        """(chunk, holders) for the chunks in `tier` that may move: none of their holders is running a turn or
        in `protect` (nor is `also`, a conversation being restored whose new chunks are not counted yet)."""
        out = []
        for chunk, convs in self.kv.holders().values():
            if chunk.tier != tier:
                continue
            if any(c.running or c.conv_id in protect or c is also for c in convs):
                continue
            out.append((chunk, convs))
        return out

    def movable(self, tier: Tier, protect: set[str], also: Conversation | None = None) -> int:
        return len(self.candidates(tier, protect, also))

    # ---- down ---------------------------------------------------------------------------------------------------

    def make_room(self, tier: Tier, n: int, protect: set[str], allow_drop: bool) -> bool:
        """Move chunks out of `tier` in policy order until n of its blocks are free."""
        kv = self.kv
        pool = kv.pools[tier]
        if pool.num_free >= n:
            return True
        # Finding and ordering the candidates walks every chunk in memory: in a full cache, where every new block
        # costs an eviction, doing that per block made a decode step of 64 long conversations spend ~300 ms here.
        # So free a slice of the tier beyond n (1/64 of it): the next allocations find blocks without a walk.
        target = n + pool.num_blocks // EVICTION_SLICE
        candidates = self.candidates(tier, protect)
        last = None
        for chunk, convs in kv.policy.order(candidates, kv.block_size, time.monotonic()):
            if chunk.tier != tier:  # moved meanwhile (a cascade below it)
                continue
            if pool.num_free >= target and not kv.policy.continues(last, chunk, convs):
                break
            if not self.demote(chunk, convs, allow_drop):
                break
            last = (chunk, convs)
        if tier == Tier.DEVICE:  # (the outermost call: a host tier's is nested in a device chunk's demotion)
            self.flush_swap_out()
        return pool.num_free >= n

    def demote(self, chunk: Chunk, holders: list[Conversation], allow_drop: bool) -> bool:
        """Move chunk one enabled tier down. False if allow_drop is off and no lower tier has room."""
        kv = self.kv
        src = chunk.tier
        if src == Tier.DEVICE and kv.host.num_blocks > 0:
            if kv.host.num_free == 0:
                self.make_room(Tier.HOST, 1, set(), allow_drop)
            if kv.host.num_free > 0:
                (h,) = kv.host.allocate(1)
                if kv.storage is not None:
                    kv.storage.defer_swap_out(chunk.block, h)
                kv.device.free([chunk.block])
                self._trace(chunk, holders, Tier.HOST)
                chunk.tier, chunk.block = Tier.HOST, h
                kv.counters["swap_out_chunks"] += 1
                kv.counters["bytes_swapped_out"] += kv.storage.bytes_per_block if kv.storage else 0
                return True
        if src in (Tier.DEVICE, Tier.HOST) and kv.disk is not None:
            clean = chunk.copy is not None  # its file is there already: the move writes nothing
            if self._to_disk(chunk, holders):
                kv.pools[src].free([chunk.block])
                self._trace(chunk, holders, Tier.DISK)
                chunk.tier, chunk.block, chunk.copy = Tier.DISK, -1, None  # the file is its live place now
                kv.counters["disk_write_chunks"] += 1
                kv.counters["disk_clean_evictions"] += clean
                return True
        if not allow_drop:
            return False
        self.drop(chunk, holders)
        return True

    def swap_out_ahead(self) -> int:
        """Ahead-of-time swap-out: move idle chunks down while device free blocks are under the watermark; only
        into a tier with room (host, or disk when there is no host tier), never dropping. -> chunks moved."""
        kv = self.kv
        if kv.device.num_free >= kv.watermark_blocks or (kv.host.num_free == 0 and kv.disk is None):
            return 0  # (a full host tier and no disk: nothing can move without dropping; don't walk the chunks)
        if self._ahead_exhausted == (self.epoch, kv.host.num_free):
            return 0  # every chunk that could move has (the rest belong to running turns): walking again finds none
        before = kv.device.num_free
        if not self.make_room(Tier.DEVICE, kv.watermark_blocks, set(), allow_drop=False):
            self._ahead_exhausted = (self.epoch, kv.host.num_free)
        moved = kv.device.num_free - before
        kv.counters["ahead_swap_out_chunks"] += moved
        return moved

    def flush_swap_out(self) -> None:
        if self.kv.storage is not None:
            self.kv.storage.flush_swap_out()

    def drop(self, chunk: Chunk, holders: list[Conversation] | None = None) -> None:
        """Chunk's KV is gone, for every holder: its block is freed, the tree forgets it."""
        kv = self.kv
        if chunk.tier == Tier.DROPPED:
            return
        if holders is None:
            holders = [c for c in kv.conversations.values() if any(x is chunk for x in c.chunks)]
        self._trace(chunk, holders, Tier.DROPPED)
        self.release(chunk)
        kv.tree.delete(chunk)
        kv.counters["dropped_chunks"] += 1
        for conv in holders:
            if not conv.running:  # (a running turn's conversation is mid-restore: its dropped chunks get recomputed)
                kv.trim(conv)

    def release(self, chunk: Chunk) -> None:
        """Free chunk's block (no copy): it is dropped."""
        if chunk.tier in self.kv.pools:
            self.kv.pools[chunk.tier].free([chunk.block])
        chunk.tier, chunk.block, chunk.copy = Tier.DROPPED, -1, None

    # ---- the disk tier's files ------------------------------------------------------------------------------------

    def _to_disk(self, chunk: Chunk, holders: list[Conversation]) -> bool:
        """Chunk's KV is in its file (written now, or already there). A chunk only the tree holds is full and keyed;
        otherwise any holder names the same content."""
        kv = self.kv
        if kv.storage is None:
            return False
        if holders:
            return self.write_to_disk(holders[0], chunk.index)
        if kv.tree.nodes.get(chunk.key) is not chunk:
            return False  # a tail: not worth a file (its next owner continues it in memory or not at all)
        return self._write_key(chunk, chunk.key, (chunk.index + 1) * kv.block_size)

    def write_to_disk(self, conv: Conversation, i: int) -> bool:
        """conv's chunk i has its file (written now, or already there). False if it cannot be written."""
        kv = self.kv
        if kv.disk is None or kv.storage is None:
            return False
        num_tokens = i * kv.block_size + kv.chunk_tokens(conv, i)
        return self._write_key(conv.chunks[i], kv.file_key(conv, i), num_tokens)

    def _write_key(self, chunk: Chunk, key: bytes, num_tokens: int) -> bool:
        """chunk (on the device or host) has a file under `key`: written now, or there already. Its copy is then
        clean."""
        kv = self.kv
        if not kv.disk.has(key):
            k, v = kv.storage.read_chunk(chunk.tier, chunk.block)
            written = kv.disk.write_chunk(key, k, v, num_tokens)
            kv.counters["bytes_written_disk"] += written
            if not written:
                return False
        chunk.copy = key
        return True

    def read_from_disk(self, conv: Conversation) -> dict[int, tuple]:
        """The KV of conv's disk chunks, read now: id(chunk) -> (k, v, the file's key). A chunk whose file fails to
        read is dropped (recomputed)."""
        kv = self.kv
        loaded = {}
        for i, chunk in enumerate(conv.chunks):
            if chunk.tier == Tier.DISK:
                key = kv.file_key(conv, i)
                data = kv.disk.read_chunk(key, i * kv.block_size + kv.chunk_tokens(conv, i))
                if data is None:
                    kv.counters["disk_chunks_bad"] += 1
                    self.drop(chunk)
                else:
                    loaded[id(chunk)] = (*data, key)
        return loaded

    # ---- up -------------------------------------------------------------------------------------------------------

    def move_in(self, conv_id: str, chunks: list[Chunk], blocks: list[int], loaded: dict[int, tuple]) -> int:
        """Chunks (of conv_id's history) get device blocks `blocks`: host ones swapped in and disk ones loaded from
        `loaded` (queued for the next forward), dropped ones left for their recompute to write. -> bytes moved in."""
        kv = self.kv
        swap_host, swap_dev, load_data, load_dev = [], [], [], []
        for chunk, d in zip(chunks, blocks, strict=True):
            if chunk.tier == Tier.HOST:
                swap_host.append(chunk.block)
                swap_dev.append(d)
                self.pending_host_frees.append(chunk.block)
            elif chunk.tier == Tier.DISK:
                k, v, key = loaded[id(chunk)]
                load_data.append((k, v))
                load_dev.append(d)
                chunk.copy = key  # its file stays: loaded back, the chunk is clean
            self._trace(chunk, conv_id, Tier.DEVICE)
            chunk.tier, chunk.block = Tier.DEVICE, d
        bytes_in = 0
        if kv.storage is not None:
            if swap_host:
                kv.storage.queue_swap_in(swap_host, swap_dev)
            if load_data:
                kv.storage.queue_load(load_data, load_dev)
            bytes_in = (len(swap_host) + len(load_data)) * kv.storage.bytes_per_block
        kv.counters["swap_in_chunks"] += len(swap_host)
        kv.counters["disk_read_chunks"] += len(load_data)
        kv.counters["bytes_swapped_in"] += bytes_in
        return bytes_in

    def after_forward(self) -> None:
        """The forward that read them is issued (and, on GPU, ordered before any later reuse): free swapped-in host
        blocks."""
        if self.pending_host_frees:
            self.kv.host.free(self.pending_host_frees)
            self.pending_host_frees = []

    def _trace(self, chunk: Chunk, holders: list[Conversation] | str, dst: Tier) -> None:
        if self.trace is not None:
            names = holders if isinstance(holders, str) else "+".join(sorted(str(c.conv_id) for c in holders))
            self.trace.append((names, chunk.index, chunk.tier, dst))
