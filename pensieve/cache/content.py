"""Blocks by content: the verbs MemServe's MemPool offers (pensieve/cluster/mempool.py), over the prompt tree.

Another instance's KV arrives as tokens plus blocks: `alloc` hands out free blocks (making room), the caller writes
KV into them, and `insert` indexes them in the tree by content — the tree then owns them (cached, evictable) and any
conversation whose tokens start the same way takes them. `free` gives back blocks that were not inserted; `delete`
unindexes; `cached` finds the chunks holding a token sequence's KV, and `read_kv` reads them from whichever tier.

No conversation is written here: only chunks that no conversation holds (new ones, or ones only the tree holds).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from pensieve.cache.tree import chunk_key, parent_key
from pensieve.cache.types import Chunk, Conversation, Tier

if TYPE_CHECKING:
    from pensieve.cache.manager import KVManager


class ContentIndex:
    def __init__(self, kv: KVManager) -> None:
        self.kv = kv
        # Blocks handed out by `alloc` and not yet inserted into the tree or freed.
        self.held: dict[Tier, set[int]] = {Tier.DEVICE: set(), Tier.HOST: set()}

    def alloc(self, tier: Tier, n: int) -> list[int] | None:
        """n free blocks of `tier` (DEVICE or HOST) for KV written from outside (a transfer), moving idle chunks down
        to make room; None, nothing changed, when even that cannot free n. Held until `insert` or `free`."""
        kv = self.kv
        pool = kv.pools[tier]
        if n > pool.num_blocks or (n > pool.num_free and n - pool.num_free > kv.mover.movable(tier, set())):
            return None
        kv.mover.make_room(tier, n, set(), allow_drop=True)
        ids = pool.allocate(n)
        if ids is not None:
            self.held[tier].update(ids)
        return ids

    def check_held(self, tier: Tier, ids: list[int]) -> None:
        """ValueError unless every block of ids was handed out by `alloc` and is still held."""
        stray = [i for i in ids if i not in self.held[tier]]
        if stray:
            raise ValueError(f"blocks {stray[:8]} of the {tier.name.lower()} tier were not allocated by alloc")

    def free(self, tier: Tier, ids: list[int]) -> None:
        """Give back blocks from `alloc` that were not inserted."""
        self.check_held(tier, ids)
        self.held[tier].difference_update(ids)
        self.kv.pools[tier].free(list(ids))

    def insert(self, tokens: list[int], start: int, num_tokens: int, tier: Tier, ids: list[int]) -> int:
        """Index KV written into held blocks `ids` of `tier`: block j holds positions of block `start + j` of
        `tokens`, up to position `num_tokens` (the last block may be partial: it becomes a tree tail). Blocks whose
        content the tree holds already are freed. The tree owns the rest (cached, evictable). -> chunks indexed."""
        kv = self.kv
        bs = kv.block_size
        if len(ids) != kv.blocks_for(num_tokens) - start or not start * bs < num_tokens <= len(tokens):
            raise ValueError(f"{len(ids)} blocks from block {start} do not cover positions up to {num_tokens}")
        self.check_held(tier, ids)
        parent = parent_key(tokens, bs, start)
        now, indexed, unused = time.monotonic(), 0, []
        for j, block in enumerate(ids):
            index = start + j
            end = min((index + 1) * bs, num_tokens)
            self.held[tier].discard(block)
            chunk = Chunk(tier, block, index=index, last_used=now, key=chunk_key(parent, tokens[index * bs : end]))
            if end - index * bs == bs:
                parent = chunk.key
                ok = kv.tree.insert(chunk)
            else:
                ok = kv.tree.add_tail(chunk, end - index * bs)
            if ok:
                indexed += 1
            else:
                unused.append(block)
        kv.pools[tier].free(unused)
        kv.mover.changed()
        kv.counters["inserted_chunks"] += indexed
        return indexed

    def delete(self, tokens: list[int], start: int = 0) -> int:
        """Unindex the cached chunks of tokens' full blocks from block `start` on (and a tail continuing them);
        those no conversation holds are dropped. -> chunks unindexed."""
        kv = self.kv
        bs = kv.block_size
        parent = parent_key(tokens, bs, start)
        found = kv.tree.match(tokens, start, parent)
        tail = kv.tree.find_tail(found[-1].key if found else parent, tokens, (start + len(found)) * bs, len(tokens))
        for chunk in found + ([tail[0]] if tail else []):
            kv.tree.delete(chunk)
            if chunk.refs == 0:
                kv.mover.release(chunk)
        kv.mover.changed()
        return len(found) + (tail is not None)

    def cached(self, tokens: list[int], start: int = 0, conv: Conversation | None = None) -> tuple[list[Chunk], int]:
        """The chunks holding KV for tokens from block `start` on, and the positions they cover: `conv`'s own
        (its computed positions, when its tokens are `tokens`), else the tree's longest match and a tail continuing
        it. Stops at the first chunk without KV (dropped)."""
        kv = self.kv
        bs = kv.block_size
        if conv is not None:
            chunks = conv.chunks[start : kv.blocks_for(conv.num_computed)]
            end = conv.num_computed
        else:
            parent = parent_key(tokens, bs, start)
            chunks = kv.tree.match(tokens, start, parent)
            end = (start + len(chunks)) * bs
            tail = kv.tree.find_tail(chunks[-1].key if chunks else parent, tokens, end, len(tokens))
            if tail is not None:
                chunks = [*chunks, tail[0]]
                end += tail[1]
        for j, chunk in enumerate(chunks):
            if chunk.tier == Tier.DROPPED:
                return chunks[:j], min(end, (start + j) * bs)
        return chunks, end

    def read_kv(self, chunks: list[Chunk], tokens: list[int], num_tokens: int, device: str = "cpu") -> tuple | None:
        """k, v [num_layers, len(chunks), block_size, Hkv, D] on `device` for consecutive chunks of `tokens` (the last
        one covering up to position num_tokens), from whichever tier each lives in. None if a disk file fails to
        read."""
        kv = self.kv
        bs, storage = kv.block_size, kv.storage
        shape = (storage.num_layers, len(chunks), *storage.chunk_shape[1:])
        k = torch.empty(shape, dtype=storage.dtype, device=device)  # k, v: [L, n, bs, Hkv, D]
        v = torch.empty_like(k)
        by_tier: dict[Tier, tuple[list[int], list[int]]] = {Tier.DEVICE: ([], []), Tier.HOST: ([], [])}
        for j, chunk in enumerate(chunks):
            if chunk.tier in by_tier:
                by_tier[chunk.tier][0].append(j)
                by_tier[chunk.tier][1].append(chunk.block)
                continue
            end = min((chunk.index + 1) * bs, num_tokens)
            key = chunk.key if end - chunk.index * bs == bs else None
            if key is None:  # a partial chunk's file is named by the positions it covers
                key = chunk_key(parent_key(tokens, bs, chunk.index), tokens[chunk.index * bs : end])
            data = kv.disk.read_chunk(key, end)
            if data is None:
                return None
            k[:, j], v[:, j] = data[0].to(device), data[1].to(device)
        for tier, (slots, blocks) in by_tier.items():
            if blocks:
                bk, bv = storage.read_blocks(tier, blocks, device)
                index = torch.tensor(slots, device=device)
                k.index_copy_(1, index, bk)
                v.index_copy_(1, index, bv)
        return k, v
