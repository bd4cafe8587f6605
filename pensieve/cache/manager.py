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

The manager is the only writer of a conversation and of `Chunk.refs` (`ref` / `unref`). It delegates the rest:
where a chunk lives and how it moves between tiers to `self.mover` (pensieve/cache/mover.py), the MemPool's verbs
by content to `self.content` (pensieve/cache/content.py), the invariants to pensieve/cache/integrity.py.
"""

from __future__ import annotations

import math
import time
import warnings
from collections import Counter

from pensieve.cache.blocks import BlockPool
from pensieve.cache.content import ContentIndex
from pensieve.cache.disk import DiskStore
from pensieve.cache.integrity import check_integrity
from pensieve.cache.mover import TierMover
from pensieve.cache.policy import LRUPolicy, PensievePolicy, RecomputeCost
from pensieve.cache.tiers import KVStorage
from pensieve.cache.tree import ROOT, PromptTree, chunk_key, common_prefix, prefix_keys
from pensieve.cache.types import Chunk, Conversation, RestoreStats, Tier
from pensieve.cache.writebehind import WriteBehind


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
        write_behind_s: float | None = None,
        write_behind_bytes_s: float = 64 * 2**20,
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
        self.mover = TierMover(self)  # where chunks live, tier moves, the disk writes
        self.content = ContentIndex(self)  # the MemPool's verbs: blocks by content
        # clean disk copies of idle stored conversations' chunks, written in the background (cache/writebehind.py)
        self.write_behind = (
            WriteBehind(self, write_behind_s, write_behind_bytes_s)
            if write_behind_s is not None and disk is not None and storage is not None
            else None
        )

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
        conv = Conversation(
            conv_id, tokens=stored.tokens, last_active=0.0, messages=stored.messages, tools=stored.tools
        )
        bs = self.block_size
        keys = prefix_keys(stored.tokens, bs)
        for i, key in enumerate(keys):
            chunk = self.tree.get(key)
            if chunk is None:
                tier = Tier.DISK if self.disk.has(key) else Tier.DROPPED
                chunk = Chunk(tier, index=i, key=key)
                if tier == Tier.DISK:
                    self.tree.insert(chunk)
            self.ref(chunk)
            conv.chunks.append(chunk)
        self.trim(conv)
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
        self,
        conv_id,
        tokens: list[int],
        keep: int,
        messages: list[dict] | None,
        stored: bool = True,
        tools: str | None = None,
    ) -> Conversation:
        """A turn starts: the conversation's tokens become `tokens`, of which the first `keep` are its history's
        (KV past them is let go of: those tokens differ), rendered (text mode) from `messages` with the tools keyed
        `tools`; it is pinned until `end_turn` / `abort_turn`."""
        conv = self.conversation(conv_id)
        conv.stored = stored
        self.truncate(conv, keep)
        conv.tokens = tokens
        conv.pinned = True
        if messages is not None:
            conv.messages, conv.tools = messages, tools
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
        self.mover.changed()

    def abort_turn(self, conv: Conversation) -> None:
        """The turn failed: the conversation lets go of all its KV (what was computed may be partial)."""
        conv.pinned = conv.preempted = False
        self.mover.changed()
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
        if short > 0 and short > self.mover.movable(Tier.DEVICE, protect, conv):
            self._detach(conv, attached)
            conv.chunks, conv.num_computed = saved
            return None
        conv.preempted = False
        replaced = {id(c): c for c in saved[0]}
        for chunk in conv.chunks:
            replaced.pop(id(chunk), None)
        for chunk in replaced.values():  # a partial chunk the tree's full one replaced
            self.unref(chunk)
        loaded = self.mover.read_from_disk(conv)  # first: a chunk that fails to load counts as dropped (recomputed)
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
                self.unref(chunk, free=False)
                conv.chunks[i] = Chunk(Tier.DROPPED, index=i, key=chunk.key, refs=1)
        missing = [i for i, c in enumerate(conv.chunks) if c.tier != Tier.DEVICE]
        self.mover.make_room(Tier.DEVICE, len(missing), protect, allow_drop=True)
        ids = self.device.allocate(len(missing))
        assert ids is not None, "room was checked before"
        recomputed = 0
        for i in missing:
            if conv.chunks[i].tier == Tier.DROPPED:
                start, end = i * bs, i * bs + self.chunk_tokens(conv, i)
                if conv.recompute and conv.recompute[-1][1] == start:
                    conv.recompute[-1][1] = end
                else:
                    conv.recompute.append([start, end])
                recomputed += 1
        bytes_in = self.mover.move_in(conv.conv_id, [conv.chunks[i] for i in missing], ids, loaded)
        self.counters["recompute_chunks"] += recomputed
        self.counters["shared_tokens_reused"] += shared
        return RestoreStats(dict(tokens), dict(chunks), bytes_in, shared)

    def _attach(self, conv: Conversation) -> list[Chunk]:
        """Take the tree's chunks for the full blocks of conv's tokens past its own computed KV — past blocks the
        tree lacks too, which become dropped chunks to recompute (`PromptTree.match_sparse`) — then a kept tail
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
        matched = self.tree.match_sparse(conv.tokens, first, parent, limit=limit)
        if matched and matched[0][1] is None and conv.num_computed > first * bs:
            matched = []  # a hole would replace conv's own partial chunk, whose KV it keeps: take none
        found: list[Chunk] = []
        if matched:
            del conv.chunks[first:]
            for i, (key, chunk) in enumerate(matched, start=first):  # holes: dropped chunks, recomputed (restore)
                conv.chunks.append(chunk if chunk is not None else Chunk(Tier.DROPPED, index=i, key=key))
            found = conv.chunks[first:]
            conv.num_computed = len(conv.chunks) * bs
            parent = matched[-1][0]
        if conv.num_computed == len(conv.chunks) * bs:  # no partial chunk of its own: a kept tail may continue it
            tail = self.tree.take_tail(parent, conv.tokens, conv.num_computed, limit)
            if tail is not None:
                chunk, n = tail
                chunk.key = None  # conv owns it now and writes the rest of its block
                chunk.index = len(conv.chunks)
                conv.chunks.append(chunk)
                conv.num_computed += n
                found.append(chunk)
        for chunk in found:
            self.ref(chunk)
        return found

    def _detach(self, conv: Conversation, attached: list[Chunk]) -> None:
        """Undo `_attach` (the room check failed): a tail taken goes back to the tree."""
        for chunk in attached:
            self.unref(chunk, free=False)
            if chunk.key is None:  # the tail: full chunks keep their keys
                chunk.key = self.file_key(conv, chunk.index)
                self.tree.add_tail(chunk, self.chunk_tokens(conv, chunk.index))

    def reserve(self, conv: Conversation, num_tokens: int, protect: set[str], keep_free: int = 0) -> bool:
        """Device blocks covering num_tokens positions of conv (already restored). False, nothing changed, if that
        would leave fewer than keep_free blocks even after moving every movable chunk down."""
        need = self.blocks_for(num_tokens) - len(conv.chunks)
        if need <= 0:
            return True
        protect = protect | {conv.conv_id}
        short = need + keep_free - self.device.num_free
        if short > 0 and short > self.mover.movable(Tier.DEVICE, protect, conv):
            return False
        self.mover.make_room(Tier.DEVICE, need, protect, allow_drop=True)
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
            if start % bs:  # positions written into a partial chunk: a disk copy of it covers fewer
                conv.chunks[start // bs].copy = None
        for i in done:
            chunk = conv.chunks[i]
            if chunk.key is None:
                chunk.key = chunk_key(self._parent_key(conv, i), conv.tokens[i * bs : (i + 1) * bs])
            if self.tree.insert(chunk) or not self.share_prefixes:
                continue
            cached = self.tree.get(chunk.key)  # computed twice (e.g. a prompt's last block): keep one copy
            if cached.tier == Tier.DEVICE:
                self.ref(cached)
                conv.chunks[i] = cached
                self.unref(chunk)
                self.counters["deduplicated_chunks"] += 1

    def preempt(self, conv: Conversation) -> None:
        """Take a running turn's conversation off the device (its turn restores it when scheduled again): a recompute
        in progress is abandoned (its chunks dropped), the rest moves down like an idle conversation's chunks, except
        chunks a running conversation holds too."""
        bs = self.block_size
        conv.preempted = True
        self.mover.changed()
        for start, end in conv.recompute:
            for i in range(start // bs, self.blocks_for(end)):
                self.mover.drop(conv.chunks[i])
        conv.recompute = []
        self._free_tail(conv)
        holders = self.holders()
        for chunk in list(conv.chunks):
            if chunk.tier == Tier.DEVICE and not any(h.running for h in holders[id(chunk)][1]):
                self.mover.demote(chunk, holders[id(chunk)][1], allow_drop=True)
        self.mover.flush_swap_out()
        self.trim(conv)
        self.counters["preempted_conversations"] += 1

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
                else:
                    chunk.copy = None  # kept, covering fewer positions than a disk copy of it
        self._free_tail(conv)
        self.trim(conv)

    def fork(self, conv: Conversation, new_id, stored: bool = True) -> Conversation:
        """A new conversation with conv's tokens (and messages) holding all of conv's full chunks; conv's partial
        last chunk is conv's own, so the fork computes those few positions again on its next turn. conv may be
        running a turn (a candidate's fork is made when its prompt is computed). stored=False: a completion's."""
        bs = self.block_size
        full = conv.num_computed // bs
        for i in range(full):
            self.key_of(conv, i)
        new = Conversation(
            new_id,
            tokens=list(conv.tokens),
            num_computed=full * bs,
            chunks=list(conv.chunks[:full]),
            last_active=conv.last_active,
            messages=None if conv.messages is None else [dict(m) for m in conv.messages],
            tools=conv.tools,
            stored=stored,
        )
        for chunk in new.chunks:
            self.ref(chunk)
        self.trim(new)
        self.conversations[new_id] = new
        if self.disk is not None and stored:
            self.disk.append_turn(new_id, 0, list(new.tokens), new.messages, new.tokens, new.tools)
        return new

    def cut(self, conv: Conversation, num_tokens: int) -> None:
        """Keep the first num_tokens tokens of conv's history (raw mode) and their KV; the rest is forgotten, in
        the stored record too."""
        self.truncate(conv, num_tokens)
        del conv.tokens[num_tokens:]
        if self.is_stored(conv.conv_id):
            self.disk.append_turn(conv.conv_id, num_tokens, [], None, conv.tokens)

    def adopt(self, conv_id: str, tokens: list[int], messages: list[dict] | None) -> None:
        """conv_id's history becomes `tokens` (and `messages`, rendered without tools: the cluster's), as another
        instance had it: KV for the common prefix with what is here is kept; the stored record is replaced. The
        conversation must be idle."""
        conv = self.lookup(conv_id) or self.conversation(conv_id)
        self.truncate(conv, common_prefix(conv.tokens, tokens))
        conv.tokens = list(tokens)
        conv.messages = None if messages is None else [dict(m) for m in messages]
        conv.tools = None if messages is None else ""
        conv.stored = True
        if self.disk is not None:
            self._forget(conv_id)
            self.disk.append_turn(conv_id, 0, list(conv.tokens), conv.messages, conv.tokens, conv.tools)

    def rewind(
        self, conv: Conversation, tokens: list[int], messages: list[dict] | None, tools: str | None, keep: int
    ) -> None:
        """An aborted turn is undone: conv's tokens, messages and tools key are as before it, with the KV of its
        first `keep` positions (what the turn filled past them is handed back), and conv is idle."""
        self.truncate(conv, keep, reclaim=True)
        conv.tokens, conv.messages, conv.tools = tokens, messages, tools
        self.end_turn(conv)

    def drop_all(self, conv: Conversation) -> None:
        """conv lets go of all its chunks (the tree keeps those it indexes)."""
        for chunk in conv.chunks:
            self.unref(chunk)
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
            self.disk.append_turn(conv.conv_id, keep, conv.tokens[keep:], new_messages, conv.tokens, conv.tools)

    def close(self) -> None:
        """Write every idle stored conversation's device and host KV to disk and release the disk_dir."""
        if self.disk is None:
            return
        try:
            if self.write_behind is not None:
                self.write_behind.close()
            for conv in self.conversations.values():
                if not conv.pinned:
                    self.persist(conv)
        finally:
            self.disk.close()

    def maintain(self, now: float | None = None) -> None:
        """Background work that is due (between steps, and while idle): the write-behind's clean disk copies. A
        failure is warned about, never raised: background work must not fail a turn or stop the engine."""
        if self.write_behind is None:
            return
        try:
            self.write_behind.poll(time.monotonic() if now is None else now)
        except Exception as error:  # noqa: BLE001
            self.counters["background_errors"] += 1
            warnings.warn(f"pensieve: the write-behind failed ({error!r}); it retries later", RuntimeWarning,
                          stacklevel=2)  # fmt: skip

    def settle_copies(self) -> None:
        """A step failed: the copies queued for its forward run now; if they cannot, the chunks they target are
        dropped (their blocks hold stale KV) and their conversations recompute them."""
        if self.storage is None:
            return
        try:
            self.storage.complete_queued()
        except Exception:  # noqa: BLE001  (the device itself may be what failed)
            stale = set(self.storage.cancel_queued())
            for chunk, holders in list(self.holders().values()):
                if chunk.tier == Tier.DEVICE and chunk.block in stale:
                    self.mover.drop(chunk, holders)

    def disk_stats(self) -> dict[str, int]:
        disk = self.disk
        return {
            "disk_write_errors": disk.num_write_errors if disk is not None else 0,
            "disk_bad_files": disk.num_bad_files if disk is not None else 0,
            "bytes_read_disk": disk.bytes_read if disk is not None else 0,
        }

    def persist(self, conv: Conversation) -> None:
        """Write conv's device and host chunks to disk too (close / end): they survive a restart. Only for a stored
        conversation (one with a token log): KV without its tokens could never be used. A chunk whose file exists
        (another conversation wrote it) is not written again."""
        if self.disk is None or conv.conv_id not in self.disk.index:
            return
        for i, chunk in enumerate(conv.chunks):
            if chunk.tier in (Tier.DEVICE, Tier.HOST) and self.chunk_tokens(conv, i) > 0:
                if self.mover.write_to_disk(conv, i):
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
                        self.mover.release(chunk)
        if forget and self.disk is not None:
            self._forget(conv_id)

    def collect_disk(self) -> int:
        """Remove the chunk files no stored conversation references and nothing in memory uses. -> removed."""
        return self.disk.collect(self._disk_keys_in_use()) if self.disk is not None else 0

    def _forget(self, conv_id: str) -> None:
        """Delete conv_id's record and the chunk files nothing else needs (a write-behind in flight lands first, so
        no file of it appears after)."""
        if self.write_behind is not None:
            self.write_behind.drain()
        self.disk.forget(conv_id, self._disk_keys_in_use())

    def _keep_tail(self, conv: Conversation) -> None:
        """conv goes: its partial last chunk stays cached as a tree tail, for a request that continues its tokens."""
        if not self.share_prefixes or not conv.chunks:
            return
        i = len(conv.chunks) - 1
        chunk, n = conv.chunks[i], self.chunk_tokens(conv, i)
        if 0 < n < self.block_size and chunk.refs == 1 and chunk.tier in self.pools:
            self.unref(chunk, free=False)  # the tree takes it over from conv
            chunk.key = self.file_key(conv, i)
            self.mover.changed()
            if self.tree.add_tail(chunk, n):
                conv.chunks.pop()
                chunk.last_used = time.monotonic()
            else:
                chunk.key = None
                self.ref(chunk)

    def _disk_keys_in_use(self) -> set[bytes]:
        """Content keys of every disk-tier chunk in memory and of every clean copy (their files must stay)."""
        keys = set()
        for conv in self.conversations.values():
            for i, chunk in enumerate(conv.chunks):
                if chunk.tier == Tier.DISK:
                    keys.add(self.file_key(conv, i))
        keys.update(c.key for c in self.tree.nodes.values() if c.tier == Tier.DISK)
        keys.update(c.copy for c in self.chunks() if c.copy is not None)  # clean copies of chunks in memory
        return keys

    # ---- keys -------------------------------------------------------------------------------------------------

    def _parent_key(self, conv: Conversation, i: int) -> bytes:
        """The key of conv's chunk i-1 (ROOT for i = 0), computed from the tokens where the chunk has none."""
        return self.key_of(conv, i - 1) if i else ROOT

    def key_of(self, conv: Conversation, i: int) -> bytes:
        """conv's full chunk i's content key, computed from the tokens (and kept) where it has none yet."""
        chunk = conv.chunks[i]
        if chunk.key is None:
            bs = self.block_size
            chunk.key = chunk_key(self._parent_key(conv, i), conv.tokens[i * bs : (i + 1) * bs])
        return chunk.key

    def file_key(self, conv: Conversation, i: int) -> bytes:
        """The content key naming chunk i's disk file: its key if full, else the key of the positions it covers."""
        n = self.chunk_tokens(conv, i)
        if n == self.block_size:
            return self.key_of(conv, i)
        start = i * self.block_size
        return chunk_key(self._parent_key(conv, i), conv.tokens[start : start + n])

    # ---- holders and reference counts -------------------------------------------------------------------------------

    def chunks(self) -> list[Chunk]:
        """Every chunk in memory, once however many conversations hold it (and those only the tree holds)."""
        return [chunk for chunk, _ in self.holders().values()]

    def holders(self) -> dict[int, tuple[Chunk, list[Conversation]]]:
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

    def ref(self, chunk: Chunk) -> None:
        """One more conversation holds chunk."""
        chunk.refs += 1

    def unref(self, chunk: Chunk, free: bool = True) -> None:
        """A holder lets go of chunk: freed when nobody holds it and the tree does not index it. `free=False`: only
        the count (the chunk changes hands: back to the tree, or replaced by a private copy)."""
        chunk.refs -= 1
        assert chunk.refs >= 0, "a chunk let go of more often than held"
        if not free:
            return
        self.mover.changed()
        if chunk.refs:
            return
        if chunk in self.tree:
            chunk.last_used = time.monotonic()
            return
        self.mover.release(chunk)

    def _free_tail(self, conv: Conversation) -> None:
        """Let go of chunks past the computed positions (allocated ahead for tokens that were never computed)."""
        keep = self.blocks_for(conv.num_computed)
        for chunk in conv.chunks[keep:]:
            self.unref(chunk)
        del conv.chunks[keep:]

    def trim(self, conv: Conversation) -> None:
        """Trailing dropped chunks are let go of: recomputing them is computing those positions anew."""
        while conv.chunks and conv.chunks[-1].tier == Tier.DROPPED:
            self.unref(conv.chunks.pop())
        if len(conv.chunks) * self.block_size < conv.num_computed:
            conv.num_computed = len(conv.chunks) * self.block_size

    # ---- checks ---------------------------------------------------------------------------------------------------

    def check_integrity(self) -> None:
        """Every invariant of the pools, the tree and the conversations (pensieve/cache/integrity.py); tests call
        it after every operation."""
        check_integrity(self)
