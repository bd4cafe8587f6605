"""Write-behind: clean disk copies of idle conversations' KV, written in the background (DESIGN §4, turn 3).

A chunk has one *live* place (device, host, disk or dropped) and, while it is on the device or host, optionally a
*clean copy*: a chunk file on disk holding exactly its KV (`Chunk.copy`, the file's content key, pensieve/cache/
disk.py). Evicting a clean chunk to disk writes nothing; a crash loses only the KV that had no copy yet, because a
restarted generator finds the files through the conversations' token logs (`KVManager.lookup`).

Which chunks: those of stored conversations (the ones with a token log: KV without its tokens could never be used
again) that have been idle for `idle_s` seconds, oldest conversation first and, within one, leading chunks first
(the order eviction takes them in). A chunk whose file exists already (another conversation's copy of a shared
prefix, a file it was loaded from) becomes clean without a write.

Off the step's critical path: `poll` runs on the engine's thread between steps and while idle (at most every
`interval` seconds); it only takes a snapshot of each chunk (`KVStorage.read_chunk`, a copy) and queues it. A writer
thread checksums, serializes, writes, fsyncs and renames the file (`DiskStore.write_file`, which touches no shared
state), paced to `bytes_s` bytes per second. At most `max_in_flight` snapshots wait at once: by default as many
chunks as the bound lets through between two polls, plus one being written (`in_flight_for`), so the bound binds
and not the poll, while steps are shorter than the poll interval (at 64 MiB/s and 0.25 s per poll: 13 of SmolLM2's
1.47 MB chunks, fp32). The next `poll` records what landed (`DiskStore.record_write`) and marks the chunks clean.
A crash mid-write leaves a temp file (removed when the disk_dir is opened), never a half-written chunk file.
"""

from __future__ import annotations

import math
import queue
import threading
import time
import weakref
from typing import TYPE_CHECKING

from pensieve.cache.types import Tier

if TYPE_CHECKING:
    from pensieve.cache.manager import KVManager


MIN_POLL_S = 0.05  # the in-flight sizing's floor on the poll interval (with idle_s = 0 poll runs every step)
FAILURE_BACKOFF_S = 10.0  # after a failed write, the next snapshots wait this long
COLLECT_S = 60.0  # how often chunk files nothing needs any more (a partial chunk's older copies) are removed


class WriteBehind:
    def __init__(self, kv: KVManager, idle_s: float, bytes_s: float, max_in_flight: int | None = None) -> None:
        if idle_s < 0 or bytes_s <= 0:
            raise ValueError(f"write-behind needs idle_s >= 0 and bytes_s > 0, got {idle_s!r}, {bytes_s!r}")
        self.kv = kv
        self.idle_s = float(idle_s)
        self.bytes_s = float(bytes_s)
        self.interval = min(0.25, self.idle_s / 4) if self.idle_s else 0.0  # how often poll walks the conversations
        chunk_bytes = kv.storage.bytes_per_block
        self.max_in_flight = max_in_flight or in_flight_for(self.bytes_s, self.interval, chunk_bytes)
        self.in_flight: set[bytes] = set()  # keys of the snapshots queued or being written
        self._todo: queue.SimpleQueue = queue.SimpleQueue()  # (key, k, v, num_tokens), or None: stop
        self._done: queue.SimpleQueue = queue.SimpleQueue()  # (key, bytes written, error)
        self._clean: dict[str, tuple] = {}  # conv_id -> its state when every chunk in memory had a copy
        self._next_poll = 0.0
        self._next_collect = time.monotonic() + COLLECT_S
        self._hurry = threading.Event()  # set while draining: the writer skips its pacing
        # The writer holds the queues, the disk store and the pacing, not this object: a generator that is never
        # closed is still collected, and then its writer stops (the finalizer).
        self._thread: threading.Thread | None = threading.Thread(
            target=_writer, args=(self._todo, self._done, kv.disk.write_file, self.bytes_s, self._hurry),
            name="pensieve-write-behind", daemon=True,
        )  # fmt: skip
        self._thread.start()
        self._finalizer = weakref.finalize(self, self._todo.put, None)

    # ---- the engine's thread ----------------------------------------------------------------------------------

    def poll(self, now: float) -> int:
        """Record the writes that landed; if due, snapshot more dirty chunks of idle stored conversations for the
        writer. -> snapshots queued."""
        self._harvest()
        if now < self._next_poll or self._thread is None:
            return 0
        self._next_poll = now + self.interval
        if now >= self._next_collect:  # a partial chunk's older copies: no conversation names them any more
            self._next_collect = now + COLLECT_S
            self.kv.collect_disk()
        budget = self.max_in_flight - len(self.in_flight)
        if budget <= 0:
            return 0
        kv = self.kv
        stored = kv.disk.index
        idle = [
            c
            for c in kv.conversations.values()
            if not c.pinned and c.stored and now - c.last_active >= self.idle_s and c.conv_id in stored
        ]
        idle.sort(key=lambda c: c.last_active)
        queued = 0
        for conv in idle:
            state = (len(conv.chunks), conv.num_computed, conv.last_active)
            if self._clean.get(conv.conv_id) == state:
                continue  # unchanged since every chunk of it was found clean
            dirty = False
            for i, chunk in enumerate(conv.chunks):
                if chunk.copy is not None or chunk.tier not in (Tier.DEVICE, Tier.HOST):
                    continue
                n = kv.chunk_tokens(conv, i)
                if n == 0:
                    continue
                key = kv.file_key(conv, i)
                if kv.disk.has(key):
                    chunk.copy = key  # written by another conversation, an eviction, or this writer
                    continue
                dirty = True
                if key in self.in_flight or queued == budget:
                    continue
                k, v = kv.storage.read_chunk(chunk.tier, chunk.block)  # the snapshot: a copy, taken here
                self.in_flight.add(key)
                self._todo.put((key, k, v, i * kv.block_size + n))
                queued += 1
            if not dirty:
                self._clean[conv.conv_id] = state
            if queued == budget:
                break
        if len(self._clean) > 2 * len(kv.conversations) + 64:  # forget conversations that went
            self._clean = {c: s for c, s in self._clean.items() if c in kv.conversations}
        return queued

    def drain(self) -> None:
        """Wait until every queued snapshot is written (or failed) and recorded; the writer does not pace itself
        meanwhile. (Gives up on the writes in flight if the writer thread is gone.)"""
        self._hurry.set()
        try:
            while self.in_flight:
                try:
                    self._record(*self._done.get(timeout=1.0))
                except queue.Empty:
                    if self._thread is None or not self._thread.is_alive():
                        self.in_flight.clear()
        finally:
            self._hurry.clear()

    def close(self) -> None:
        """Finish the queued writes (unpaced), record them, stop the writer."""
        if self._thread is None:
            return
        self._hurry.set()
        self._todo.put(None)
        self._thread.join()
        self._thread = None
        self._finalizer.detach()
        self._harvest()

    def _harvest(self) -> None:
        while True:
            try:
                item = self._done.get_nowait()
            except queue.Empty:
                return
            self._record(*item)

    def _record(self, key: bytes, written: int, error: OSError | None) -> None:
        self.in_flight.discard(key)
        if error is not None:  # (a full or failing disk: back off rather than retry every interval)
            self._next_poll = max(self._next_poll, time.monotonic() + FAILURE_BACKOFF_S)
        if self.kv.disk.record_write(key, written, error, instead="it stays in memory without a copy"):
            self.kv.counters["write_behind_chunks"] += 1
            self.kv.counters["bytes_written_behind"] += written


def in_flight_for(bytes_s: float, interval: float, chunk_bytes: int) -> int:
    """Snapshots to keep queued so that the writer can run at bytes_s between two polls `interval` apart: the chunks
    one interval lets through, plus the one being written (the snapshots are copies, chunk_bytes each). Polls run
    between steps, so a step longer than the interval (a long prefill chunk) still caps the writer below the bound."""
    return math.ceil(bytes_s * max(interval, MIN_POLL_S) / chunk_bytes) + 1


# ---- the writer thread ----------------------------------------------------------------------------------------


def _writer(todo: queue.SimpleQueue, done: queue.SimpleQueue, write_file, bytes_s: float, hurry: threading.Event):
    """Write each queued snapshot (write_file: DiskStore.write_file), paced to bytes_s on average unless hurried;
    report (key, bytes written, error) on `done`. Stops at None."""
    start_next = time.monotonic()
    while True:
        item = todo.get()
        if item is None:
            return
        key, k, v, num_tokens = item
        wait = start_next - time.monotonic()
        if wait > 0 and not hurry.is_set():
            hurry.wait(wait)
        began = time.monotonic()
        try:
            written, error = write_file(key, k, v, num_tokens)
        except Exception as unexpected:  # noqa: BLE001  (recorded as a failed write: the chunk stays dirty)
            written, error = 0, OSError(f"write-behind failed: {unexpected!r}")
        start_next = began + written / bytes_s  # paced: bytes_s on average
        done.put((key, written, error))
