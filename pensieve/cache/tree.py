"""The prompt tree: every full, computed KV chunk that still has KV somewhere (device, host or disk), by content.

A radix tree at block granularity (MemServe's prompt tree; SGLang's radix cache with pages of `block_size`), stored
the way vLLM stores its prefix cache: a node's key is the chained hash of its parent's key and its own tokens,

    key(chunk 0) = H(ROOT, tokens[0:bs])        key(chunk i) = H(key(chunk i-1), tokens[i*bs:(i+1)*bs])

so a key names the node's whole path from the root, and the tree is the map key -> chunk. `match` walks it from a
given node down, one block of tokens at a time, and stops at the first block no chunk holds: the longest cached
prefix. A node's KV depends on every token before it, which the key covers, so equal keys mean equal KV.

H is BLAKE2b with a 128-bit digest over (parent key, the tokens as little-endian int64): a collision would make two
different prefixes share KV, and at 2^-64 for 2^32 cached blocks that is not a risk to engineer around. The same
keys name the disk tier's chunk files (pensieve/cache/disk.py); a partial block's key (fewer than `bs` tokens) names
its file only, never a tree node.

Who holds what is the manager's business (pensieve/cache/manager.py): the tree only indexes, and never writes a
chunk (its owner keys it). A chunk is in the tree
exactly while it is full, computed and not dropped; the manager deletes it when its KV is dropped.

Tails: the partial last chunk of a conversation that ended (a finished `complete()` call, `end()`) — positions
[start, start + n) of a block, n < block_size — is kept as a leaf under its parent node, keyed by its n tokens.
Nobody else can share a partial block (its owner writes the rest of it), but the next request that continues those
exact tokens — a stateless client resending the history — takes it over whole: `take_tail` hands the chunk to
exactly one new owner, so it never has two writers.

Holes: `match` stops at the first block the tree lacks (a prefix cache's lookup); `match_sparse` looks past it. A
chunk's key is computed from the tokens alone, so a history whose leading chunks were evicted (they are the cheapest
to recompute) still finds the chunks after them; the restore recomputes the holes (DESIGN §3's recompute ranges).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

from pensieve.cache.types import Chunk, Tier

ROOT = b""  # the parent key of every history's first chunk


def chunk_key(parent: bytes, tokens: Sequence[int]) -> bytes:
    """The content key of a block of `tokens` whose preceding blocks have key `parent` (ROOT for the first)."""
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(np.asarray(tokens, dtype="<i8").tobytes())
    return h.digest()


def prefix_keys(tokens: Sequence[int], block_size: int, num_blocks: int | None = None) -> list[bytes]:
    """Keys of the first `num_blocks` full blocks of `tokens` (all of them by default)."""
    n = len(tokens) // block_size if num_blocks is None else num_blocks
    keys, parent = [], ROOT
    for i in range(n):
        parent = chunk_key(parent, tokens[i * block_size : (i + 1) * block_size])
        keys.append(parent)
    return keys


def parent_key(tokens: Sequence[int], block_size: int, index: int) -> bytes:
    """The key of block `index - 1` of tokens (ROOT for block 0): what block `index`'s key chains from."""
    return prefix_keys(tokens, block_size, index)[-1] if index else ROOT


class PromptTree:
    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.nodes: dict[bytes, Chunk] = {}
        self.tails: dict[bytes, tuple[Chunk, int]] = {}  # key of a partial block's tokens -> (chunk, tokens it holds)
        self.removed: list[bytes] | None = None  # when a list: keys of the nodes deleted since (eviction reports)

    def track_removals(self) -> None:
        """From now on, keep the keys of the nodes deleted (a cluster instance's eviction reports)."""
        if self.removed is None:
            self.removed = []

    def take_removals(self) -> list[bytes]:
        """The keys of the nodes deleted since the last call (tracking must be on)."""
        keys, self.removed = self.removed, []
        return keys

    def __len__(self) -> int:
        return len(self.nodes)

    def __contains__(self, chunk: Chunk) -> bool:
        if chunk.key is None:
            return False
        return self.nodes.get(chunk.key) is chunk or self.tails.get(chunk.key, (None, 0))[0] is chunk

    def get(self, key: bytes | None) -> Chunk | None:
        return None if key is None else self.nodes.get(key)

    def match(self, tokens: Sequence[int], start: int = 0, parent: bytes = ROOT, limit: int | None = None) -> list:
        """The longest run of cached chunks for the full blocks of tokens[: limit], from block `start` (whose parent
        key is `parent`) on: [(key, chunk), ...] with each chunk's tier telling where it lives."""
        bs = self.block_size
        end = (len(tokens) if limit is None else min(limit, len(tokens))) // bs
        found = []
        for i in range(start, end):
            key = chunk_key(parent, tokens[i * bs : (i + 1) * bs])
            chunk = self.nodes.get(key)
            if chunk is None:
                break
            found.append(chunk)
            parent = key
        return found

    def match_sparse(
        self, tokens: Sequence[int], start: int = 0, parent: bytes = ROOT, limit: int | None = None
    ) -> list[tuple[bytes, Chunk | None]]:
        """Like `match`, but past blocks no chunk holds: [(key, chunk or None), ...] for the full blocks of
        tokens[: limit] from block `start` to the last one the tree holds. A key names its whole path, so a node
        is found by its tokens whether or not the nodes before it still are: a history whose leading chunks were
        dropped (Pensieve's leading-end eviction) keeps the rest reachable, and its holes are recomputed."""
        bs = self.block_size
        end = (len(tokens) if limit is None else min(limit, len(tokens))) // bs
        if not self.nodes:
            return []
        found, last = [], 0
        for i in range(start, end):
            parent = chunk_key(parent, tokens[i * bs : (i + 1) * bs])
            chunk = self.nodes.get(parent)
            found.append((parent, chunk))
            if chunk is not None:
                last = len(found)
        return found[:last]

    def insert(self, chunk: Chunk) -> bool:
        """Index a full, computed chunk under its key. False (nothing changed) if another chunk holds the key: the
        tree keeps the first, the newcomer stays a private duplicate."""
        assert chunk.key is not None and chunk.tier != Tier.DROPPED, "only chunks with KV and a key are indexed"
        if chunk.key in self.nodes:
            return self.nodes[chunk.key] is chunk
        self.nodes[chunk.key] = chunk
        return True

    def delete(self, chunk: Chunk) -> None:
        """Unindex chunk (its KV is gone); a no-op if the tree does not hold it."""
        if chunk in self:
            if self.nodes.get(chunk.key) is chunk:
                del self.nodes[chunk.key]
                if self.removed is not None:
                    self.removed.append(chunk.key)
            else:
                del self.tails[chunk.key]

    def add_tail(self, chunk: Chunk, num_tokens: int) -> bool:
        """Keep a partial chunk nobody holds any more, holding KV for its first `num_tokens` positions (fewer than a
        block) and keyed (by its owner) `chunk_key(parent's key, those tokens)`. False (nothing changed) if an equal
        tail is kept already."""
        assert 0 < num_tokens < self.block_size and chunk.refs == 0 and chunk.tier != Tier.DROPPED
        assert chunk.key is not None, "a tail is filed under its key"
        if chunk.key in self.tails:
            return False
        self.tails[chunk.key] = (chunk, num_tokens)
        return True

    def find_tail(self, parent: bytes, tokens: Sequence[int], start: int, limit: int) -> tuple[Chunk, int] | None:
        """The kept tail with the most of tokens[start : limit] after node `parent`, left in place. None if none."""
        for n in range(min(self.block_size - 1, limit - start), 0, -1):
            found = self.tails.get(chunk_key(parent, tokens[start : start + n]))
            if found is not None:
                return found
        return None

    def take_tail(self, parent: bytes, tokens: Sequence[int], start: int, limit: int) -> tuple[Chunk, int] | None:
        """The kept tail with the most of tokens[start : limit] (start: a block boundary after node `parent`),
        handed over: it leaves the tree for the caller to own, unkey and write into. None if there is none."""
        found = self.find_tail(parent, tokens, start, limit)
        if found is not None:
            del self.tails[found[0].key]
        return found


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens a and b share."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
