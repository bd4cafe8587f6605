"""Conversations, the KV chunks they hold, and where those chunks live: the tiered cache's bookkeeping (DESIGN §4).

A conversation's KV covers `tokens[:num_computed]`, cut into chunks of `block_size` positions (chunk i holds
positions [i*block_size, (i+1)*block_size)). Chunks are shared: a full, computed chunk has a content key (the
chained hash of every token its KV depends on, pensieve/cache/tree.py) and is indexed by the prompt tree, and any
conversation whose tokens start the same way holds the same chunk object — a system prompt in front of a thousand
conversations is one set of blocks. `Chunk.refs` counts the conversations holding a chunk; the tree holds it too, so
a chunk no conversation holds any more stays cached (evictable) until it is evicted. A conversation's last, partial
chunk is always its own: nobody else can have computed those positions for it, and it is the one chunk a
conversation writes into.

Each chunk lives in one tier, DEVICE, HOST, DISK or DROPPED (gone: recomputed from the tokens, which are always kept).
Any arrangement along a history is valid: a hot shared prefix stays on the device while a conversation's private
chunks behind it go down. Pensieve's leading-end order still holds among one conversation's private chunks, because
the retention value grows with a chunk's position (pensieve/cache/policy.py).

Life of a turn:
- `begin_turn`: the conversation's tokens grow by the message (a rewritten history lets go of the KV past the
  common prefix).
- `restore`: the conversation first takes every further full block of its tokens that the tree holds (the longest
  cached prefix of any conversation, on any tier), and a tail the tree keeps that continues them. Then every chunk
  gets a device block: host chunks are swapped in and disk chunks loaded (queued for the next forward, layer by
  layer); dropped chunks are recomputed, each run of them a range `[start, end)` computed as a sub-sequence of a
  forward that attends to the KV before it. A dropped chunk other conversations hold too is replaced by a private
  copy first (the recompute writes it), which joins the tree once computed.
- `reserve`: device blocks for the positions about to be computed.
- `advance`: positions were computed; chunks that became full and computed get their key and join the tree.
- `end_turn`: frees blocks allocated past the computed positions; the conversation is idle. (`begin_turn`,
  `append_token`, `end_turn`, `abort_turn` are the engine's verbs: only the manager writes a conversation.)

Making room: `_make_room(tier, n)` moves chunks out of a tier in the policy's order (lowest retention value first):
device -> host -> disk -> dropped, skipping disabled tiers; a move into a full host tier first makes room there. A
chunk held by a conversation whose turn is running never moves. After each step `swap_out_ahead` moves idle chunks
down while device free blocks are under the watermark — only into a tier with room, never dropping anything early.
"""

from __future__ import annotations

import math
import time
from collections import Counter

import torch

from pensieve.cache.blocks import BlockPool
from pensieve.cache.disk import DiskStore
from pensieve.cache.integrity import check_integrity
from pensieve.cache.policy import LRUPolicy, PensievePolicy, RecomputeCost
from pensieve.cache.tiers import KVStorage
from pensieve.cache.tree import ROOT, PromptTree, chunk_key, common_prefix, parent_key, prefix_keys
from pensieve.cache.types import Chunk, Conversation, RestoreStats, Tier

EVICTION_SLICE = 64  # an eviction that must walk the chunks frees (at least) 1/EVICTION_SLICE of the tier


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
        share_prefixes: bool = True,
    ) -> None:
        self.device = BlockPool(num_device_blocks)
        self.host = BlockPool(num_host_blocks)
        self.pools = {Tier.DEVICE: self.device, Tier.HOST: self.host}
        self.block_size = block_size
        self.policy = policy or PensievePolicy(RecomputeCost(1.0, 1.0), block_size)
        self.storage = storage  # None: bookkeeping only (unit tests)
        self.disk = disk
        self.tree = PromptTree(block_size)
        self.share_prefixes = share_prefixes  # False: no conversation takes another's chunks (benchmarks' baseline)
        self.watermark_blocks = math.ceil(swap_out_watermark * num_device_blocks)
        self.reserve_blocks = math.ceil(decode_reserve * num_device_blocks)
        self.conversations: dict[str, Conversation] = {}
        self.counters: Counter[str] = Counter()
        self.trace: list[tuple[str, int, Tier, Tier]] | None = None  # tests: (holders, chunk index, from, to) per move
        self._host_free_after_forward: list[int] = []  # host blocks a queued swap-in still reads
        # Bumped whenever a chunk may have become movable (a holder stopped running or let go of it): an ahead-of-time
        # swap-out that found nothing more to move does not walk the chunks again until then (`swap_out_ahead`).
        self._epoch = 0
        self._ahead_exhausted: tuple[int, int] | None = None
        # Blocks handed out by `alloc` (the MemPool's alloc_mem) and not yet inserted into the tree or freed.
        self.held: dict[Tier, set[int]] = {Tier.DEVICE: set(), Tier.HOST: set()}

    # ---- lookup -----------------------------------------------------------------------------------------------

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def conversation(self, conv_id: str) -> Conversation:
        conv = self.lookup(conv_id)
        if conv is None:
            conv = self.conversations[conv_id] = Conversation(conv_id)
        return conv

    def lookup(self, conv_id: str) -> Conversation | None:
        """The conversation in memory, else loaded from disk: its tokens, and for each block the chunk the tree
        holds, else its file on disk, else a dropped chunk (recomputed when needed)."""
        conv = self.conversations.get(conv_id)
        if conv is not None or self.disk is None:
            return conv
        stored = self.disk.load(conv_id)
        if stored is None:
            return None
        conv = Conversation(conv_id, tokens=stored.tokens, last_active=0.0, messages=stored.messages)
        bs = self.block_size
        keys = prefix_keys(stored.tokens, bs)
        for i, key in enumerate(keys):
            chunk = self.tree.get(key)
            if chunk is None:
                tier = Tier.DISK if self.disk.has(key) else Tier.DROPPED
                chunk = Chunk(tier, index=i, key=key)
                if tier == Tier.DISK:
                    self.tree.insert(chunk)
            chunk.refs += 1
            conv.chunks.append(chunk)
        _trim(self, conv)
        block = len(conv.chunks)
        conv.num_computed = start = block * bs
        if block >= len(keys) - 1:  # the block after the last kept one may have a partial file: the longest one
            parent = keys[block - 1] if block else ROOT
            for end in range(min(start + bs - 1, len(stored.tokens)), start, -1):
                if self.disk.has(chunk_key(parent, stored.tokens[start:end])):
                    conv.chunks.append(Chunk(Tier.DISK, index=len(conv.chunks), refs=1))
                    conv.num_computed = end
                    break
        self.conversations[conv_id] = conv
        return conv

    def chunk_tokens(self, conv: Conversation, index: int) -> int:
        """Valid positions in chunk `index` (all but a conversation's last chunk are full)."""
        return max(0, min(self.block_size, conv.num_computed - index * self.block_size))

    # ---- a turn's life --------------------------------------------------------------------------------------------

    def begin_turn(
        self, conv_id, tokens: list[int], keep: int, messages: list[dict] | None, stored: bool = True
    ) -> Conversation:
        """A turn starts: the conversation's tokens become `tokens`, of which the first `keep` are its history's
        (KV past them is let go of: those tokens differ); it is pinned until `end_turn` / `abort_turn`."""
        conv = self.conversation(conv_id)
        conv.stored = stored
        self.truncate(conv, keep)
        conv.tokens = tokens
        conv.pinned = True
        if messages is not None:
            conv.messages = messages
        return conv

    def append_token(self, conv: Conversation, token: int) -> None:
        """A token was sampled for conv's running turn (its KV is computed by the next step that feeds it)."""
        conv.tokens.append(token)

    def end_turn(self, conv: Conversation, reply_message: dict | None = None) -> None:
        """The turn is done: blocks reserved past the computed positions are freed, the conversation is idle (and
        in text mode has the assistant's message)."""
        self._free_tail(conv)
        conv.recompute = []
        if reply_message is not None:
            conv.messages.append(reply_message)
        conv.pinned = conv.preempted = False
        conv.last_active = time.monotonic()
        self._epoch += 1

    def abort_turn(self, conv: Conversation) -> None:
        """The turn failed: the conversation lets go of all its KV (what was computed may be partial)."""
        conv.pinned = conv.preempted = False
        self._epoch += 1
        self.drop_all(conv)
        if not conv.stored:
            self.remove(conv.conv_id)

    # ---- a turn's device blocks -----------------------------------------------------------------------------------

    def restore(self, conv: Conversation, protect: set[str], keep_free: int = 0) -> RestoreStats | None:
        """Extend conv with the cached prefix the tree holds beyond its own KV, then give every chunk a device block:
        swap in host chunks, load disk chunks (for the next forward), and set the dropped ones as recompute ranges.
        None (nothing changed) if the device cannot hold them with `keep_free` blocks to spare, even after moving
        every chunk not held by a conversation in `protect` or a running one down."""
        bs = self.block_size
        protect = protect | {conv.conv_id}
        saved = (list(conv.chunks), conv.num_computed)
        attached = self._attach(conv)
        need = sum(c.tier != Tier.DEVICE for c in conv.chunks)
        short = need + keep_free - self.device.num_free  # blocks that must be made free (O(chunks) to count)
        if short > 0 and short > self._movable(Tier.DEVICE, protect, conv):
            self._detach(conv, attached)
            conv.chunks, conv.num_computed = saved
            return None
        conv.preempted = False
        replaced = {id(c): c for c in saved[0]}
        for chunk in conv.chunks:
            replaced.pop(id(chunk), None)
        for chunk in replaced.values():  # a partial chunk the tree's full one replaced
            self._unhold(chunk)
        loaded = {}
        for i, chunk in enumerate(conv.chunks):  # disk first: a chunk that fails to load counts as dropped (recomputed)
            if chunk.tier == Tier.DISK:
                data = self.disk.read_chunk(self._file_key(conv, i), i * bs + self.chunk_tokens(conv, i))
                if data is None:
                    self.counters["disk_chunks_bad"] += 1
                    self._drop(chunk)
                else:
                    loaded[id(chunk)] = data
        tokens = Counter({t: 0 for t in Tier})
        chunks = Counter({t: 0 for t in Tier})
        shared = 0
        attached_ids = {id(c) for c in attached}
        for i, chunk in enumerate(conv.chunks):
            n = self.chunk_tokens(conv, i)
            tokens[chunk.tier] += n
            chunks[chunk.tier] += 1
            if chunk.tier != Tier.DROPPED and (chunk.refs > 1 or id(chunk) in attached_ids):
                shared += n
        for i, chunk in enumerate(conv.chunks):  # a dropped chunk others hold too: recompute a private copy
            if chunk.tier == Tier.DROPPED and chunk.refs > 1:
                chunk.refs -= 1
                conv.chunks[i] = Chunk(Tier.DROPPED, index=i, key=chunk.key, refs=1)
        missing = [i for i, c in enumerate(conv.chunks) if c.tier != Tier.DEVICE]
        self._make_room(Tier.DEVICE, len(missing), protect, allow_drop=True)
        ids = self.device.allocate(len(missing))
        assert ids is not None, "room was checked before"
        swap_host, swap_dev, load_data, load_dev = [], [], [], []
        recomputed = 0
        for i, d in zip(missing, ids, strict=True):
            chunk = conv.chunks[i]
            if chunk.tier == Tier.HOST:
                swap_host.append(chunk.block)
                swap_dev.append(d)
                self._host_free_after_forward.append(chunk.block)
            elif chunk.tier == Tier.DISK:
                load_data.append(loaded[id(chunk)])
                load_dev.append(d)
            else:
                start, end = i * bs, i * bs + self.chunk_tokens(conv, i)
                if conv.recompute and conv.recompute[-1][1] == start:
                    conv.recompute[-1][1] = end
                else:
                    conv.recompute.append([start, end])
                recomputed += 1
            self._trace_move(chunk, conv.conv_id, Tier.DEVICE)
            chunk.tier, chunk.block = Tier.DEVICE, d
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
        self.counters["recompute_chunks"] += recomputed
        self.counters["shared_tokens_reused"] += shared
        return RestoreStats(dict(tokens), dict(chunks), bytes_in, shared)

    def _attach(self, conv: Conversation) -> list[Chunk]:
        """Take the tree's chunks for the full blocks of conv's tokens past its own computed KV, then a kept tail
        that continues them (leaving at least one token to compute: the turn samples from it). A partial last chunk
        is replaced by the tree's full one (the caller lets go of it). -> the chunks taken (their refs counted)."""
        if not self.share_prefixes or not (self.tree.nodes or self.tree.tails):
            return []
        bs = self.block_size
        first = conv.num_computed // bs  # the first block conv has not computed in full
        if first and conv.chunks[first - 1].key is None:
            return []  # its own KV has no key (bookkeeping-only tests): nothing to chain from
        parent = conv.chunks[first - 1].key if first else ROOT
        limit = len(conv.tokens) - 1
        found = self.tree.match(conv.tokens, first, parent, limit=limit)
        if found:
            del conv.chunks[first:]
            conv.chunks += found
            conv.num_computed = len(conv.chunks) * bs
            parent = found[-1].key
        if conv.num_computed == len(conv.chunks) * bs:  # no partial chunk of its own: a kept tail may continue it
            tail = self.tree.take_tail(parent, conv.tokens, conv.num_computed, limit)
            if tail is not None:
                chunk, n = tail
                chunk.index = len(conv.chunks)
                conv.chunks.append(chunk)
                conv.num_computed += n
                found.append(chunk)
        for chunk in found:
            chunk.refs += 1
        return found

    def _detach(self, conv: Conversation, attached: list[Chunk]) -> None:
        """Undo `_attach` (the room check failed): a tail taken goes back to the tree."""
        for chunk in attached:
            chunk.refs -= 1
            if chunk.key is None:  # the tail: full chunks keep their keys
                start = chunk.index * self.block_size
                n = conv.num_computed - start
                self.tree.add_tail(chunk, self._parent_key(conv, chunk.index), conv.tokens[start : start + n])

    def reserve(self, conv: Conversation, num_tokens: int, protect: set[str], keep_free: int = 0) -> bool:
        """Device blocks covering num_tokens positions of conv (already restored). False, nothing changed, if that
        would leave fewer than keep_free blocks even after moving every movable chunk down."""
        need = self.blocks_for(num_tokens) - len(conv.chunks)
        if need <= 0:
            return True
        protect = protect | {conv.conv_id}
        short = need + keep_free - self.device.num_free
        if short > 0 and short > self._movable(Tier.DEVICE, protect, conv):
            return False
        self._make_room(Tier.DEVICE, need, protect, allow_drop=True)
        start = len(conv.chunks)
        blocks = self.device.allocate(need)
        conv.chunks += [Chunk(Tier.DEVICE, b, index=start + j, refs=1) for j, b in enumerate(blocks)]
        return True

    def advance(self, conv: Conversation, num_tokens: int, recompute: bool = False) -> None:
        """num_tokens positions were computed: of the first recompute range, else the next new tokens. Chunks that
        became full and computed get their key and join the tree."""
        bs = self.block_size
        if recompute:
            span = conv.recompute[0]
            start = span[0]
            span[0] += num_tokens
            assert span[0] <= span[1], "advanced past a recompute range"
            if span[0] == span[1]:
                conv.recompute.pop(0)
            done = range(start // bs, span[0] // bs)
        else:
            start = conv.num_computed
            conv.num_computed += num_tokens
            done = range(start // bs, conv.num_computed // bs)
        for i in done:
            chunk = conv.chunks[i]
            if chunk.key is None:
                chunk.key = chunk_key(self._parent_key(conv, i), conv.tokens[i * bs : (i + 1) * bs])
            if self.tree.insert(chunk) or not self.share_prefixes:
                continue
            cached = self.tree.get(chunk.key)  # computed twice (e.g. a prompt's last block): keep one copy
            if cached.tier == Tier.DEVICE:
                cached.refs += 1
                conv.chunks[i] = cached
                self._unhold(chunk)
                self.counters["deduplicated_chunks"] += 1

    def preempt(self, conv: Conversation) -> None:
        """Take a running turn's conversation off the device (its turn restores it when scheduled again): a recompute
        in progress is abandoned (its chunks dropped), the rest moves down like an idle conversation's chunks, except
        chunks a running conversation holds too."""
        bs = self.block_size
        conv.preempted = True
        self._epoch += 1
        for start, end in conv.recompute:
            for i in range(start // bs, self.blocks_for(end)):
                self._drop(conv.chunks[i])
        conv.recompute = []
        self._free_tail(conv)
        holders = self._holders()
        for chunk in list(conv.chunks):
            if chunk.tier == Tier.DEVICE and not any(h.running for h in holders[id(chunk)][1]):
                self._demote(chunk, holders[id(chunk)][1], allow_drop=True)
        self._flush_swap_out()
        _trim(self, conv)
        self.counters["preempted_conversations"] += 1

    def after_forward(self) -> None:
        """The forward that read them is issued (and, on GPU, ordered before any later reuse): free swapped-in host
        blocks."""
        if self._host_free_after_forward:
            self.host.free(self._host_free_after_forward)
            self._host_free_after_forward = []

    def swap_out_ahead(self) -> int:
        """Ahead-of-time swap-out: move idle chunks down while device free blocks are under the watermark; only
        into a tier with room (host, or disk when there is no host tier), never dropping. -> chunks moved."""
        if self.device.num_free >= self.watermark_blocks or (self.host.num_free == 0 and self.disk is None):
            return 0  # (a full host tier and no disk: nothing can move without dropping; don't walk the chunks)
        if self._ahead_exhausted == (self._epoch, self.host.num_free):
            return 0  # every chunk that could move has (the rest belong to running turns): walking again finds none
        before = self.device.num_free
        if not self._make_room(Tier.DEVICE, self.watermark_blocks, set(), allow_drop=False):
            self._ahead_exhausted = (self._epoch, self.host.num_free)
        moved = self.device.num_free - before
        self.counters["ahead_swap_out_chunks"] += moved
        return moved

    # ---- idle conversations -------------------------------------------------------------------------------------

    def truncate(self, conv: Conversation, num_tokens: int, reclaim: bool = False) -> None:
        """Keep KV for the first num_tokens positions only (the rest of the history was rewritten). A cut inside a
        chunk conv may not write into (shared, in the tree, or on disk / dropped) lets go of that chunk too: its
        first positions are computed again, into a private chunk. `reclaim` (an aborted turn handing back what it
        filled): a chunk only conv holds is taken back out of the tree instead, and kept."""
        bs = self.block_size
        if num_tokens < conv.num_computed:
            conv.num_computed = num_tokens
            i = num_tokens // bs
            if num_tokens % bs:
                chunk = conv.chunks[i]
                if reclaim and chunk.refs == 1 and chunk.tier not in (Tier.DISK, Tier.DROPPED):
                    self.tree.delete(chunk)
                    chunk.key = None
                if chunk.key is not None or chunk.refs > 1 or chunk.tier in (Tier.DISK, Tier.DROPPED):
                    conv.num_computed = i * bs
        self._free_tail(conv)
        _trim(self, conv)

    def fork(self, conv: Conversation, new_id: str) -> Conversation:
        """A new conversation with conv's tokens (and messages) holding all of conv's full chunks; conv's partial
        last chunk is conv's own, so the fork computes those few positions again on its next turn."""
        bs = self.block_size
        full = conv.num_computed // bs
        for i in range(full):
            self._ensure_key(conv, i)
        new = Conversation(
            new_id,
            tokens=list(conv.tokens),
            num_computed=full * bs,
            chunks=list(conv.chunks[:full]),
            last_active=conv.last_active,
            messages=None if conv.messages is None else [dict(m) for m in conv.messages],
        )
        for chunk in new.chunks:
            chunk.refs += 1
        _trim(self, new)
        self.conversations[new_id] = new
        if self.disk is not None:
            self.disk.append_turn(new_id, 0, list(new.tokens), new.messages, new.tokens)
        return new

    def cut(self, conv: Conversation, num_tokens: int) -> None:
        """Keep the first num_tokens tokens of conv's history (raw mode) and their KV; the rest is forgotten, in
        the stored record too."""
        self.truncate(conv, num_tokens)
        del conv.tokens[num_tokens:]
        if self.is_stored(conv.conv_id):
            self.disk.append_turn(conv.conv_id, num_tokens, [], None, conv.tokens)

    def adopt(self, conv_id: str, tokens: list[int], messages: list[dict] | None) -> None:
        """conv_id's history becomes `tokens` (and `messages`), as another instance had it: KV for the common prefix
        with what is here is kept; the stored record is replaced. The conversation must be idle."""
        conv = self.lookup(conv_id) or self.conversation(conv_id)
        self.truncate(conv, common_prefix(conv.tokens, tokens))
        conv.tokens = list(tokens)
        conv.messages = None if messages is None else [dict(m) for m in messages]
        conv.stored = True
        if self.disk is not None:
            self.disk.forget(conv_id, self._disk_keys_in_use())
            self.disk.append_turn(conv_id, 0, list(conv.tokens), conv.messages, conv.tokens)

    def rewind(self, conv: Conversation, tokens: list[int], messages: list[dict] | None, keep: int) -> None:
        """An aborted turn is undone: conv's tokens and messages are as before it, with the KV of its first `keep`
        positions (what the turn filled past them is handed back), and conv is idle."""
        self.truncate(conv, keep, reclaim=True)
        conv.tokens, conv.messages = tokens, messages
        self.end_turn(conv)

    def drop_all(self, conv: Conversation) -> None:
        """conv lets go of all its chunks (the tree keeps those it indexes)."""
        for chunk in conv.chunks:
            self._unhold(chunk)
        conv.chunks, conv.num_computed, conv.recompute = [], 0, []

    # ---- the durable record (with a disk tier) ----------------------------------------------------------------

    def is_stored(self, conv_id: str) -> bool:
        """Whether conv_id has a record on disk (it survives a restart)."""
        return self.disk is not None and conv_id in self.disk.index

    def stored_ids(self) -> set[str]:
        return set(self.disk.index) if self.disk is not None else set()

    def log_turn(self, conv: Conversation, keep: int, new_messages: list[dict] | None) -> None:
        """A finished turn is made durable (before its reply is returned): conv's tokens past `keep` and the turn's
        messages are appended to its record. Nothing without a disk tier or for a conversation that is not stored."""
        if self.disk is not None and conv.stored:
            self.disk.append_turn(conv.conv_id, keep, conv.tokens[keep:], new_messages, conv.tokens)

    def close(self) -> None:
        """Write every idle stored conversation's device and host KV to disk and release the disk_dir."""
        if self.disk is None:
            return
        try:
            for conv in self.conversations.values():
                if not conv.pinned:
                    self.persist(conv)
        finally:
            self.disk.close()

    def disk_errors(self) -> dict[str, int]:
        disk = self.disk
        return {
            "disk_write_errors": disk.num_write_errors if disk is not None else 0,
            "disk_bad_files": disk.num_bad_files if disk is not None else 0,
        }

    def persist(self, conv: Conversation) -> None:
        """Write conv's device and host chunks to disk too (close / end): they survive a restart. Only for a stored
        conversation (one with a token log): KV without its tokens could never be used. A chunk whose file exists
        (another conversation wrote it) is not written again."""
        if self.disk is None or conv.conv_id not in self.disk.index:
            return
        for i, chunk in enumerate(conv.chunks):
            if chunk.tier in (Tier.DEVICE, Tier.HOST) and self.chunk_tokens(conv, i) > 0:
                if self._write_to_disk(conv, i):
                    self.counters["persisted_chunks"] += 1

    def remove(self, conv_id: str, forget: bool = False) -> None:
        """conv lets go of its chunks; those the tree indexes stay cached (evictable) unless `forget`: then the ones
        no other conversation holds are dropped, and with a disk tier the conversation and its files are deleted."""
        conv = self.conversations.pop(conv_id, None)
        if conv is not None:
            if not forget:
                self._keep_tail(conv)
            chunks = list(conv.chunks)
            self.drop_all(conv)
            if forget:
                for chunk in chunks:
                    if chunk.refs == 0 and chunk in self.tree:
                        self.tree.delete(chunk)
                        self._release(chunk)
        if forget and self.disk is not None:
            self.disk.forget(conv_id, self._disk_keys_in_use())

    def _keep_tail(self, conv: Conversation) -> None:
        """conv goes: its partial last chunk stays cached as a tree tail, for a request that continues its tokens."""
        if not self.share_prefixes or not conv.chunks:
            return
        i = len(conv.chunks) - 1
        chunk, n = conv.chunks[i], self.chunk_tokens(conv, i)
        if 0 < n < self.block_size and chunk.refs == 1 and chunk.tier in self.pools:
            start = i * self.block_size
            chunk.refs = 0  # the tree takes it over from conv
            self._epoch += 1
            if self.tree.add_tail(chunk, self._parent_key(conv, i), conv.tokens[start : start + n]):
                conv.chunks.pop()
                chunk.last_used = time.monotonic()
            else:
                chunk.refs = 1

    def _disk_keys_in_use(self) -> set[bytes]:
        """Content keys of every disk-tier chunk in memory (their files must stay)."""
        keys = set()
        for conv in self.conversations.values():
            for i, chunk in enumerate(conv.chunks):
                if chunk.tier == Tier.DISK:
                    keys.add(self._file_key(conv, i))
        keys.update(c.key for c in self.tree.nodes.values() if c.tier == Tier.DISK)
        return keys

    # ---- blocks by content: the MemPool verbs (pensieve/cluster/mempool.py) --------------------------------------

    def alloc(self, tier: Tier, n: int) -> list[int] | None:
        """n free blocks of `tier` (DEVICE or HOST) for KV written from outside (a transfer), moving idle chunks down
        to make room; None, nothing changed, when even that cannot free n. Held until `insert` or `free`."""
        pool = self.pools[tier]
        if n > pool.num_blocks or (n > pool.num_free and n - pool.num_free > self._movable(tier, set())):
            return None
        self._make_room(tier, n, set(), allow_drop=True)
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
        self.pools[tier].free(list(ids))

    def insert(self, tokens: list[int], start: int, num_tokens: int, tier: Tier, ids: list[int]) -> int:
        """Index KV written into held blocks `ids` of `tier`: block j holds positions of block `start + j` of
        `tokens`, up to position `num_tokens` (the last block may be partial: it becomes a tree tail). Blocks whose
        content the tree holds already are freed. The tree owns the rest (cached, evictable). -> chunks indexed."""
        bs = self.block_size
        if len(ids) != self.blocks_for(num_tokens) - start or not start * bs < num_tokens <= len(tokens):
            raise ValueError(f"{len(ids)} blocks from block {start} do not cover positions up to {num_tokens}")
        self.check_held(tier, ids)
        parent = parent_key(tokens, bs, start)
        now, indexed, unused = time.monotonic(), 0, []
        for j, block in enumerate(ids):
            index = start + j
            end = min((index + 1) * bs, num_tokens)
            self.held[tier].discard(block)
            chunk = Chunk(tier, block, index=index, last_used=now)
            if end - index * bs == bs:
                chunk.key = parent = chunk_key(parent, tokens[index * bs : end])
                ok = self.tree.insert(chunk)
            else:
                ok = self.tree.add_tail(chunk, parent, tokens[index * bs : end])
            if ok:
                indexed += 1
            else:
                unused.append(block)
        self.pools[tier].free(unused)
        self._epoch += 1
        self.counters["inserted_chunks"] += indexed
        return indexed

    def delete(self, tokens: list[int], start: int = 0) -> int:
        """Unindex the cached chunks of tokens' full blocks from block `start` on (and a tail continuing them);
        those no conversation holds are dropped. -> chunks unindexed."""
        bs = self.block_size
        parent = parent_key(tokens, bs, start)
        found = self.tree.match(tokens, start, parent)
        tail = self.tree.find_tail(found[-1].key if found else parent, tokens, (start + len(found)) * bs, len(tokens))
        for chunk in found + ([tail[0]] if tail else []):
            self.tree.delete(chunk)
            if chunk.refs == 0:
                self._release(chunk)
        self._epoch += 1
        return len(found) + (tail is not None)

    def cached(self, tokens: list[int], start: int = 0, conv: Conversation | None = None) -> tuple[list[Chunk], int]:
        """The chunks holding KV for tokens from block `start` on, and the positions they cover: `conv`'s own
        (its computed positions, when its tokens are `tokens`), else the tree's longest match and a tail continuing
        it. Stops at the first chunk without KV (dropped)."""
        bs = self.block_size
        if conv is not None:
            chunks = conv.chunks[start : self.blocks_for(conv.num_computed)]
            end = conv.num_computed
        else:
            parent = parent_key(tokens, bs, start)
            chunks = self.tree.match(tokens, start, parent)
            end = (start + len(chunks)) * bs
            tail = self.tree.find_tail(chunks[-1].key if chunks else parent, tokens, end, len(tokens))
            if tail is not None:
                chunks = [*chunks, tail[0]]
                end += tail[1]
        for j, chunk in enumerate(chunks):
            if chunk.tier == Tier.DROPPED:
                return chunks[:j], min(end, (start + j) * bs)
        return chunks, end

    def read_kv(self, chunks: list[Chunk], tokens: list[int], num_tokens: int, device: str = "cpu") -> tuple:
        """k, v [num_layers, len(chunks), block_size, Hkv, D] on `device` for consecutive chunks of `tokens` (the last
        one covering up to position num_tokens), from whichever tier each lives in. None if a disk file fails to
        read."""
        bs = self.block_size
        shape = (self.storage.num_layers, len(chunks), *self.storage.chunk_shape[1:])
        k = torch.empty(shape, dtype=self.storage.dtype, device=device)
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
                parent = parent_key(tokens, bs, chunk.index)
                key = chunk_key(parent, tokens[chunk.index * bs : end])
            data = self.disk.read_chunk(key, end)
            if data is None:
                return None
            k[:, j], v[:, j] = data[0].to(device), data[1].to(device)
        for tier, (slots, blocks) in by_tier.items():
            if blocks:
                bk, bv = self.storage.read_blocks(tier, blocks, device)
                index = torch.tensor(slots, device=device)
                k.index_copy_(1, index, bk)
                v.index_copy_(1, index, bv)
        return k, v

    # ---- keys -------------------------------------------------------------------------------------------------

    def _parent_key(self, conv: Conversation, i: int) -> bytes:
        """The key of conv's chunk i-1 (ROOT for i = 0), computed from the tokens where the chunk has none."""
        return self._ensure_key(conv, i - 1) if i else ROOT

    def _ensure_key(self, conv: Conversation, i: int) -> bytes:
        chunk = conv.chunks[i]
        if chunk.key is None:
            bs = self.block_size
            chunk.key = chunk_key(self._parent_key(conv, i), conv.tokens[i * bs : (i + 1) * bs])
        return chunk.key

    def _file_key(self, conv: Conversation, i: int) -> bytes:
        """The content key naming chunk i's disk file: its key if full, else the key of the positions it covers."""
        n = self.chunk_tokens(conv, i)
        if n == self.block_size:
            return self._ensure_key(conv, i)
        start = i * self.block_size
        return chunk_key(self._parent_key(conv, i), conv.tokens[start : start + n])

    # ---- moving chunks down ---------------------------------------------------------------------------------------

    def chunks(self) -> list[Chunk]:
        """Every chunk in memory, once however many conversations hold it (and those only the tree holds)."""
        return [chunk for chunk, _ in self._holders().values()]

    def _holders(self) -> dict[int, tuple[Chunk, list[Conversation]]]:
        """Every chunk in memory (held by a conversation or only by the tree) -> (chunk, its holders)."""
        holders: dict[int, tuple[Chunk, list[Conversation]]] = {}
        for conv in self.conversations.values():
            for chunk in conv.chunks:
                holders.setdefault(id(chunk), (chunk, []))[1].append(conv)
        for chunk in self.tree.nodes.values():
            holders.setdefault(id(chunk), (chunk, []))
        for chunk, _ in self.tree.tails.values():
            holders.setdefault(id(chunk), (chunk, []))
        return holders

    def _candidates(self, tier: Tier, protect: set[str], also: Conversation | None = None) -> list:
        """(chunk, holders) for the chunks in `tier` that may move: none of their holders is running a turn or
        in `protect` (nor is `also`, a conversation being restored whose new chunks are not counted yet)."""
        out = []
        for chunk, convs in self._holders().values():
            if chunk.tier != tier:
                continue
            if any(c.running or c.conv_id in protect or c is also for c in convs):
                continue
            out.append((chunk, convs))
        return out

    def _movable(self, tier: Tier, protect: set[str], also: Conversation | None = None) -> int:
        return len(self._candidates(tier, protect, also))

    def _make_room(self, tier: Tier, n: int, protect: set[str], allow_drop: bool) -> bool:
        """Move chunks out of `tier` in policy order until n of its blocks are free."""
        pool = self.pools[tier]
        if pool.num_free >= n:
            return True
        # Finding and ordering the candidates walks every chunk in memory: in a full cache, where every new block
        # costs an eviction, doing that per block made a decode step of 64 long conversations spend ~300 ms here.
        # So free a slice of the tier beyond n (1/64 of it): the next allocations find blocks without a walk.
        target = n + pool.num_blocks // EVICTION_SLICE
        candidates = self._candidates(tier, protect)
        last = None
        for chunk, convs in self.policy.order(candidates, self.block_size, time.monotonic()):
            if chunk.tier != tier:  # moved meanwhile (a cascade below it)
                continue
            if pool.num_free >= target and not self.policy.continues(last, chunk, convs):
                break
            if not self._demote(chunk, convs, allow_drop):
                break
            last = (chunk, convs)
        if tier == Tier.DEVICE:  # (the outermost call: a host tier's is nested in a device chunk's demotion)
            self._flush_swap_out()
        return pool.num_free >= n

    def _demote(self, chunk: Chunk, holders: list[Conversation], allow_drop: bool) -> bool:
        """Move chunk one enabled tier down. False if allow_drop is off and no lower tier has room."""
        src = chunk.tier
        if src == Tier.DEVICE and self.host.num_blocks > 0:
            if self.host.num_free == 0:
                self._make_room(Tier.HOST, 1, set(), allow_drop)
            if self.host.num_free > 0:
                (h,) = self.host.allocate(1)
                if self.storage is not None:
                    self.storage.defer_swap_out(chunk.block, h)
                self.device.free([chunk.block])
                self._trace_move(chunk, _names(holders), Tier.HOST)
                chunk.tier, chunk.block = Tier.HOST, h
                self.counters["swap_out_chunks"] += 1
                self.counters["bytes_swapped_out"] += self.storage.bytes_per_block if self.storage else 0
                return True
        if src in (Tier.DEVICE, Tier.HOST) and self.disk is not None and self._to_disk(chunk, holders):
            self.pools[src].free([chunk.block])
            self._trace_move(chunk, _names(holders), Tier.DISK)
            chunk.tier, chunk.block = Tier.DISK, -1
            self.counters["disk_write_chunks"] += 1
            return True
        if not allow_drop:
            return False
        self._drop(chunk, holders)
        return True

    def _flush_swap_out(self) -> None:
        if self.storage is not None:
            self.storage.flush_swap_out()

    def _to_disk(self, chunk: Chunk, holders: list[Conversation]) -> bool:
        """Chunk's KV is in its file (written now, or already there). A chunk only the tree holds is full and keyed;
        otherwise any holder names the same content."""
        if self.storage is None:
            return False
        if holders:
            return self._write_to_disk(holders[0], chunk.index)
        if self.tree.nodes.get(chunk.key) is not chunk:
            return False  # a tail: not worth a file (its next owner continues it in memory or not at all)
        return self._write_key(chunk, chunk.key, (chunk.index + 1) * self.block_size)

    def _write_to_disk(self, conv: Conversation, i: int) -> bool:
        if self.disk is None or self.storage is None:
            return False
        num_tokens = i * self.block_size + self.chunk_tokens(conv, i)
        return self._write_key(conv.chunks[i], self._file_key(conv, i), num_tokens)

    def _write_key(self, chunk: Chunk, key: bytes, num_tokens: int) -> bool:
        if self.disk.has(key):
            return True
        k, v = self.storage.read_chunk(chunk.tier, chunk.block)
        written = self.disk.write_chunk(key, k, v, num_tokens)
        self.counters["bytes_written_disk"] += written
        return written > 0

    def _drop(self, chunk: Chunk, holders: list[Conversation] | None = None) -> None:
        """Chunk's KV is gone, for every holder: its block is freed, the tree forgets it."""
        if chunk.tier == Tier.DROPPED:
            return
        if holders is None:
            holders = [c for c in self.conversations.values() if any(x is chunk for x in c.chunks)]
        self._trace_move(chunk, _names(holders), Tier.DROPPED)
        self._release(chunk)
        self.tree.delete(chunk)
        self.counters["dropped_chunks"] += 1
        for conv in holders:
            if not conv.running:  # (a running turn's conversation is mid-restore: its dropped chunks get recomputed)
                _trim(self, conv)

    def _unhold(self, chunk: Chunk) -> None:
        """A holder lets go of chunk: freed when nobody holds it and the tree does not index it."""
        chunk.refs -= 1
        assert chunk.refs >= 0, "a chunk let go of more often than held"
        self._epoch += 1
        if chunk.refs:
            return
        if chunk in self.tree:
            chunk.last_used = time.monotonic()
            return
        self._release(chunk)

    def _release(self, chunk: Chunk) -> None:
        """Free chunk's block (no copy): it is dropped."""
        if chunk.tier in self.pools:
            self.pools[chunk.tier].free([chunk.block])
        chunk.tier, chunk.block = Tier.DROPPED, -1

    def _free_tail(self, conv: Conversation) -> None:
        """Let go of chunks past the computed positions (allocated ahead for tokens that were never computed)."""
        keep = self.blocks_for(conv.num_computed)
        for chunk in conv.chunks[keep:]:
            self._unhold(chunk)
        del conv.chunks[keep:]

    def _trace_move(self, chunk: Chunk, holders: str, dst: Tier) -> None:
        if self.trace is not None:
            self.trace.append((holders, chunk.index, chunk.tier, dst))

    # ---- checks ---------------------------------------------------------------------------------------------------

    def check_integrity(self) -> None:
        """Every invariant of the pools, the tree and the conversations (pensieve/cache/integrity.py); tests call
        it after every operation."""
        check_integrity(self)


def _names(holders: list[Conversation]) -> str:
    return "+".join(sorted(str(c.conv_id) for c in holders))


def _trim(kv: KVManager, conv: Conversation) -> None:
    """Trailing dropped chunks are let go of: recomputing them is computing those positions anew."""
    while conv.chunks and conv.chunks[-1].tier == Tier.DROPPED:
        kv._unhold(conv.chunks.pop())
    if len(conv.chunks) * kv.block_size < conv.num_computed:
        conv.num_computed = len(conv.chunks) * kv.block_size
