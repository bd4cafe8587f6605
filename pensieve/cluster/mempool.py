"""MemPool: MemServe's memory API over one instance's tiered cache (arXiv 2406.17565 §3; DESIGN §8).

One object per instance (a `StatefulGenerator`), three groups of verbs:

    memory    alloc_mem(n, tier) -> blocks           free_mem(blocks, tier)
    index     insert(tokens, blocks, ...) -> n        match(tokens) -> PrefixMatch       delete(tokens) -> n
    transfer  transfer(dst, blocks, dst_blocks)       transfer_with_insert(dst, tokens, ...) -> n

Blocks are ids in a tier of this instance (device or host), as in MemServe: `alloc_mem` hands out blocks that the
caller fills (`write_blocks`, or a transfer from another instance) and then either `insert`s into the prompt tree
under the tokens their KV belongs to, or frees. Once inserted, a chunk is the tree's like any other: cached,
evictable, and taken by the next request whose tokens start that way (pensieve/cache/tree.py). The tree is keyed by
content, so an inserted chunk is found by any conversation or completion, and a duplicate is freed.

KV moves between instances as a `KVPayload`: whole chunks, all layers of every block in one CPU tensor pair,
flattened to a numpy byte array (numpy arrays come back from Ray's object store zero-copy and read-only; bf16 has no
numpy dtype, bytes have). The receiver checks the model fingerprint and the block size before touching its pools,
allocates every block first (a receiver without room fails with `MemPoolFull`, nothing taken), writes, inserts.
In-process (two generators in one Python) the same verbs run directly; pensieve.cluster runs them across Ray
actors, the payload travelling by object reference from sender to receiver (the driver never holds it).

Every verb runs as a command of the generator's engine (between two steps, on the thread that drives it), so
it never races a forward.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from pensieve.cache.disk import model_fingerprint
from pensieve.cache.tree import parent_key
from pensieve.cache.types import Tier

TIERS = {"device": Tier.DEVICE, "host": Tier.HOST}


class MemPoolFull(RuntimeError):
    """The receiving instance has no room for the blocks (nothing was taken)."""


@dataclass(frozen=True)
class PrefixMatch:
    """The longest cached prefix of some tokens on one instance."""

    num_tokens: int  # positions whose KV is cached (full blocks, and a kept tail continuing them)
    tiers: tuple[str, ...]  # where each chunk lives: "device" | "host" | "disk"


@dataclass(frozen=True)
class KVPayload:
    """KV of consecutive chunks of `tokens` (blocks start, start + 1, ... covering positions up to num_tokens), as it
    travels between instances. Through Ray's object store `data` is a numpy byte array; through a collective
    group (pensieve/cluster/instance.py) the payload travels without data (a header) and the bytes follow by
    send/recv into a uint8 tensor on the receiver's device."""

    fingerprint: str  # the model's (pensieve/cache/disk.py): KV of another model is refused
    block_size: int
    tokens: tuple[int, ...]  # tokens[:num_tokens] (every key depends on all the tokens before it)
    start: int  # first block
    num_tokens: int
    dtype: str  # torch dtype name
    shape: tuple[int, ...]  # k and v each [num_layers, num_blocks, block_size, Hkv, D]
    data: np.ndarray | torch.Tensor | None  # uint8: k's bytes, then v's (None: a header, the bytes come apart)
    staged: str | None = None  # a header's id on its sender (the collective transport)

    @property
    def num_blocks(self) -> int:
        return self.shape[1]

    @property
    def nbytes(self) -> int:
        return 2 * math.prod(self.shape) * getattr(torch, self.dtype).itemsize

    @classmethod
    def pack(
        cls, fingerprint, block_size, tokens, start, num_tokens, k: torch.Tensor, v: torch.Tensor, as_numpy=True
    ) -> KVPayload:
        data = torch.cat([k.contiguous().reshape(-1).view(torch.uint8), v.contiguous().reshape(-1).view(torch.uint8)])
        return cls(
            fingerprint,
            block_size,
            tuple(tokens[:num_tokens]),
            start,
            num_tokens,
            str(k.dtype).removeprefix("torch."),
            tuple(k.shape),
            data.numpy() if as_numpy else data,
        )

    def unpack(self) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(self.data, torch.Tensor):
            flat = self.data
        else:
            with warnings.catch_warnings():  # the object store hands out read-only arrays; we only read them
                warnings.simplefilter("ignore", UserWarning)
                flat = torch.from_numpy(self.data)
        if flat.numel() != self.nbytes:
            raise ValueError(f"the payload holds {flat.numel()} bytes, its header says {self.nbytes}")
        k, v = flat.view(getattr(torch, self.dtype)).view(2, *self.shape)
        return k, v


def tier_of(name: str) -> Tier:
    if name not in TIERS:
        raise ValueError(f"tier must be one of {tuple(TIERS)}, got {name!r}")
    return TIERS[name]


def _blocks(blocks) -> list[int]:
    if not isinstance(blocks, (list, tuple)) or not all(isinstance(b, int) and not isinstance(b, bool) for b in blocks):
        raise ValueError(f"blocks must be a list of block ids (ints), got {blocks!r:.80}")
    if len(set(blocks)) != len(blocks):
        raise ValueError("blocks lists a block twice")
    return list(blocks)


class MemPool:
    """MemServe's MemPool verbs on one `StatefulGenerator`."""

    def __init__(self, generator) -> None:
        self._gen = generator
        self._engine = generator.engine
        self._kv = self._engine.kv
        self._fingerprint: str | None = None

    @property
    def generator(self):
        """The StatefulGenerator whose cache this pool offers."""
        return self._gen

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = model_fingerprint(self._engine.model)
        return self._fingerprint

    def _run(self, fn):
        """fn on the engine's thread between steps (a command), its result or exception."""
        return self._gen.call(fn)

    # ---- memory ------------------------------------------------------------------------------------------------

    def alloc_mem(self, n: int, tier: str = "device") -> list[int]:
        """n blocks of `tier`, moving idle chunks down (or dropping them) to make room. MemPoolFull if even that
        cannot free n."""
        t = tier_of(tier)
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"n must be an int >= 1, got {n!r}")

        def alloc():
            ids = self._kv.content.alloc(t, n)
            if ids is None:
                pool = self._kv.pools[t]
                raise MemPoolFull(f"no room for {n} {tier} blocks ({pool.num_free} free of {pool.num_blocks})")
            return ids

        return self._run(alloc)

    def free_mem(self, blocks, tier: str = "device") -> None:
        t, ids = tier_of(tier), _blocks(blocks)
        self._run(lambda: self._kv.content.free(t, ids))

    def write_blocks(self, blocks, k: torch.Tensor, v: torch.Tensor, tier: str = "device") -> None:
        """Fill allocated blocks with KV (k, v [num_layers, len(blocks), block_size, Hkv, D])."""
        t, ids = tier_of(tier), _blocks(blocks)
        storage = self._kv.storage
        want = (storage.num_layers, len(ids), *storage.chunk_shape[1:])
        if tuple(k.shape) != want or tuple(v.shape) != want:
            raise ValueError(f"k and v must be {want}, got {tuple(k.shape)} and {tuple(v.shape)}")

        def write():
            self._kv.content.check_held(t, ids)
            storage.write_blocks(t, ids, k, v)

        self._run(write)

    # ---- index ---------------------------------------------------------------------------------------------------

    def insert(self, tokens, blocks, tier: str = "device", start: int = 0, num_tokens: int | None = None) -> int:
        """Index allocated, written blocks in the prompt tree: block j holds the KV of block `start + j` of tokens, up
        to position `num_tokens` (default: as far as the blocks reach; a partial last block becomes a tail). Blocks
        whose content is cached already are freed. -> chunks indexed."""
        t, ids, tokens = tier_of(tier), _blocks(blocks), self._engine.admission.check_token_ids(tokens)
        bs = self._kv.block_size
        if num_tokens is None:
            num_tokens = min(len(tokens), (start + len(ids)) * bs)
        return self._run(lambda: self._kv.content.insert(tokens, start, num_tokens, t, ids))

    def match(self, tokens) -> PrefixMatch:
        """The longest prefix of tokens this instance holds KV for, on any tier."""
        tokens = self._engine.admission.check_token_ids(tokens)

        def match():
            chunks, n = self._kv.content.cached(tokens)
            return PrefixMatch(n, tuple(c.tier.name.lower() for c in chunks))

        return self._run(match)

    def delete(self, tokens, start: int = 0) -> int:
        """Unindex the cached prefix of tokens from block `start` on; chunks no conversation holds are dropped."""
        tokens = self._engine.admission.check_token_ids(tokens)
        return self._run(lambda: self._kv.content.delete(tokens, start))

    # ---- transfer ------------------------------------------------------------------------------------------------

    def read(self, tokens=None, start: int = 0, conv_id: str | None = None, device=None) -> KVPayload | None:
        """The KV this instance holds for tokens from block `start` on (the sending side of a transfer): the tree's
        longest match, or with `conv_id` that conversation's own chunks (its tokens; tokens must be None). None if
        there is nothing to send. With `device`, the data is a uint8 tensor there (a collective send) instead of a
        numpy array."""
        if not isinstance(start, int) or isinstance(start, bool) or start < 0:
            raise ValueError(f"start must be an int >= 0, got {start!r}")
        if conv_id is None:
            tokens = self._engine.admission.check_token_ids(tokens)
        elif tokens is not None:
            raise ValueError("pass tokens or conv_id, not both")

        def read():
            conv = None
            toks = tokens
            if conv_id is not None:
                conv = self._kv.conversations.get(conv_id)
                if conv is None or conv.pinned:
                    raise KeyError(f"no idle conversation {conv_id!r} in memory")
                toks = conv.tokens
            chunks, end = self._kv.content.cached(toks, start, conv)
            if not chunks:
                return None
            kv = self._kv.content.read_kv(chunks, toks, end, device or "cpu")
            if kv is None:
                return None
            return KVPayload.pack(self.fingerprint, self._kv.block_size, toks, start, end, *kv, as_numpy=device is None)

        return self._run(read)

    def receive(self, payload: KVPayload, tier: str = "device") -> int:
        """The receiving side of transfer_with_insert: allocate, write and insert a payload's chunks, all or nothing
        (MemPoolFull when there is no room). Chunks already cached here are not copied. -> chunks indexed."""
        if not isinstance(payload, KVPayload):
            raise ValueError(f"payload must be a KVPayload, got {type(payload).__name__}")
        if payload.data is None:
            raise ValueError("the payload is a header without its data")
        if payload.fingerprint != self.fingerprint:
            raise ValueError("the payload's KV was computed by another model (fingerprints differ)")
        t = tier_of(tier)
        kv, bs = self._kv, self._kv.block_size
        if payload.block_size != bs:
            raise ValueError(f"the payload's block size {payload.block_size} is not this instance's {bs}")
        storage = kv.storage
        want = (storage.num_layers, payload.num_blocks, *storage.chunk_shape[1:])
        if payload.shape != want or payload.dtype != str(storage.dtype).removeprefix("torch."):
            raise ValueError(f"the payload holds {payload.dtype} {payload.shape}, this instance {storage.dtype} {want}")
        tokens = self._engine.admission.check_token_ids(list(payload.tokens))

        def receive():
            start, end = payload.start, payload.num_tokens
            parent = parent_key(tokens, bs, start)
            skip = len(kv.tree.match(tokens, start, parent, limit=end))  # full blocks cached here already
            first = start + skip
            n = kv.blocks_for(end) - first
            if n <= 0:
                return 0
            ids = kv.content.alloc(t, n)
            if ids is None:
                pool = kv.pools[t]
                raise MemPoolFull(f"no room for {n} {tier} blocks ({pool.num_free} free of {pool.num_blocks})")
            k, v = payload.unpack()
            storage.write_blocks(t, ids, k[:, skip:], v[:, skip:])
            kv.counters["received_chunks"] += n
            return kv.content.insert(tokens, first, end, t, ids)

        return self._run(receive)

    def transfer_with_insert(self, dst: MemPool, tokens=None, start: int = 0, conv_id: str | None = None) -> int:
        """Send the KV this instance holds for tokens (or conversation conv_id) from block `start` on to `dst`, which
        inserts it into its prompt tree. -> chunks indexed there (0 if there was nothing to send)."""
        payload = self.read(tokens, start, conv_id)
        return 0 if payload is None else dst.receive(payload)

    def transfer(self, dst: MemPool, blocks, dst_blocks, tier: str = "device", dst_tier: str = "device") -> None:
        """Copy the KV of this instance's `blocks` into `dst_blocks`, blocks `dst` allocated (alloc_mem); indexing
        them is dst's `insert`."""
        t, ids, dst_ids = tier_of(tier), _blocks(blocks), _blocks(dst_blocks)
        if len(ids) != len(dst_ids):
            raise ValueError(f"{len(ids)} blocks to send into {len(dst_ids)}")
        k, v = self._run(lambda: self._kv.storage.read_blocks(t, ids))
        dst.write_blocks(dst_ids, k, v, dst_tier)

    # ---- conversations ---------------------------------------------------------------------------------------

    def adopt(self, conv_id: str, tokens, messages: list[dict] | None = None) -> None:
        """Make conv_id's history `tokens` here (and in text mode its chat `messages`): a conversation moved from
        another instance. KV already here for a common prefix is kept; the next turn takes whatever the prompt tree
        holds for the rest and computes what is missing."""
        self._run(lambda: self._engine.adopt(conv_id, tokens, messages))
