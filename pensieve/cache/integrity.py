"""The cache's invariants in one place: `check_integrity(kv)` asserts every one of them (KVManager.check_integrity
calls it; tests call that after every operation).

- the pools: used + free = capacity, no block owned twice, and every allocated block owned by exactly one of a chunk,
  a queued swap-in's source (host) or a MemPool allocation not yet inserted;
- chunks: `refs` equals the conversations holding it; a shared chunk has a content key; a chunk off the device and
  host holds no block;
- the prompt tree: nodes filed under their own key and never dropped; tails unheld, partial, on device or host;
- clean disk copies (write-behind): only of device and host chunks, their files known and present, each holding
  exactly the positions its chunk covers for every holder (a tree chunk's: its own key);
- conversations: chunks in index order and held once, no trailing dropped chunk, the uncomputed tail on the device
  and private, recompute ranges only during a turn and on the device, keys that match the tokens.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pensieve.cache.tree import ROOT, chunk_key, prefix_keys
from pensieve.cache.types import Tier

if TYPE_CHECKING:
    from pensieve.cache.manager import KVManager


def check_integrity(kv: KVManager) -> None:
    kv.device.check_integrity()
    kv.host.check_integrity()
    bs = kv.block_size
    holders = kv.holders()
    owned = {
        Tier.DEVICE: list(kv.content.held[Tier.DEVICE]),
        Tier.HOST: list(kv.mover.pending_host_frees) + list(kv.content.held[Tier.HOST]),
    }
    for chunk, convs in holders.values():
        assert chunk.refs == len(convs), f"chunk {chunk.index}: refs {chunk.refs} != {len(convs)} holders"
        if chunk.copy is not None:
            assert chunk.tier in (Tier.DEVICE, Tier.HOST), f"a {chunk.tier.name} chunk has a clean copy"
            assert kv.disk is not None and kv.disk.has(chunk.copy), f"chunk {chunk.index}: its copy's file is unknown"
            assert kv.disk.chunk_path(chunk.copy).is_file(), f"chunk {chunk.index}: its copy's file is gone"
            assert convs or chunk.copy == chunk.key, f"a tree chunk {chunk.index}: a copy of other content"
        assert len(convs) <= 1 or chunk.key is not None, f"chunk {chunk.index}: shared without a content key"
        if chunk.tier in owned:
            owned[chunk.tier].append(chunk.block)
        else:
            assert chunk.block == -1, f"a {chunk.tier.name} chunk holds a block"
    for key, chunk in kv.tree.nodes.items():
        assert chunk.key == key, "a tree node under another key"
        assert chunk.tier != Tier.DROPPED, "the tree indexes a dropped chunk"
    for key, (chunk, n) in kv.tree.tails.items():
        assert chunk.key == key and chunk.refs == 0 and 0 < n < bs, "a tree tail held or misfiled"
        assert chunk.tier in (Tier.DEVICE, Tier.HOST), "a tree tail off the device and host"
    for c in kv.conversations.values():
        name = c.conv_id
        assert len({id(ch) for ch in c.chunks}) == len(c.chunks), f"{name}: holds a chunk twice"
        assert all(ch.index == i for i, ch in enumerate(c.chunks)), f"{name}: a chunk at another index"
        assert not c.chunks or c.chunks[-1].tier != Tier.DROPPED, f"{name}: trailing dropped chunk"
        assert 0 <= c.num_computed <= len(c.tokens), f"{name}: num_computed out of range"
        computed = kv.blocks_for(c.num_computed)
        assert len(c.chunks) >= computed, f"{name}: computed positions without chunks"
        assert all(ch.tier == Tier.DEVICE for ch in c.chunks[computed:]), f"{name}: tail off the device"
        assert all(ch.refs == 1 and ch.key is None for ch in c.chunks[c.num_computed // bs :]), f"{name}: tail"
        assert c.pinned or not c.recompute, f"{name}: idle with a recompute pending"
        last = 0
        for start, end in c.recompute:
            assert last <= start < end <= c.num_computed, f"{name}: recompute ranges {c.recompute}"
            assert all(ch.tier == Tier.DEVICE for ch in c.chunks[start // bs : kv.blocks_for(end)]), name
            last = end
        keys = prefix_keys(c.tokens, bs, min(c.num_computed // bs, len(c.chunks)))
        for i, key in enumerate(keys):
            assert c.chunks[i].key in (None, key), f"{name}: chunk {i} keyed for other tokens"
        for i, ch in enumerate(c.chunks):  # a clean copy holds exactly the positions the chunk covers for c
            if ch.copy is not None:
                n = max(0, min(bs, c.num_computed - i * bs))
                covered = keys[i] if n == bs else chunk_key(keys[i - 1] if i else ROOT, c.tokens[i * bs : i * bs + n])
                assert n > 0 and ch.copy == covered, f"{name}: chunk {i}'s disk copy is of other positions"
    for tier, blocks in owned.items():
        assert len(blocks) == len(set(blocks)), f"a {tier.name} block is owned twice"
        assert set(blocks) == kv.pools[tier].allocated, f"{tier.name}: allocated and owned blocks differ"
