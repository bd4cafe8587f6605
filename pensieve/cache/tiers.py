"""The tensors of the device and host tiers, and every copy between tiers.

A chunk (one block of `block_size` tokens) lives in exactly one tier:

    DEVICE  a block of the device pool, per layer k/v [num_device_blocks, block_size, Hkv, D]
    HOST    a block of the host pool, same layout on the CPU (pinned on GPU machines)
    DISK    a safetensors file (pensieve/cache/disk.py)
    DROPPED nowhere: recomputed from the conversation's tokens when needed

Copies, and when they happen:

- Swap-out (device -> host) is issued at once: on GPU on a side stream, after the work the main stream has queued
  so far (the forward that wrote the blocks); on CPU it is a plain copy. The main stream waits for the side stream
  before the next forward writes into the freed device blocks.
- Swap-in (host -> device) and loads (disk -> staging -> device) are queued, then issued by `begin_forward()` layer by
  layer: on GPU each layer's copies go on the side stream followed by an event, and the attention of layer l waits
  on event l only (`LayerGate.wait`), so restoring a conversation overlaps the forward of earlier layers. On CPU the
  same gate runs layer l's copies right before layer l's attention.
- Host blocks whose data a queued swap-in still has to read are freed by the manager only after the forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pensieve.cache.types import Tier

LayerCaches = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: (k, v) [num_blocks, block_size, Hkv, D]


def _runs(src_ids: list[int], dst_ids: list[int]) -> list[tuple[int, int, int]]:
    """(src_start, dst_start, length) of maximal runs where both id lists are consecutive."""
    runs: list[list[int]] = []
    for s, d in zip(src_ids, dst_ids, strict=True):
        if runs and runs[-1][0] + runs[-1][2] == s and runs[-1][1] + runs[-1][2] == d:
            runs[-1][2] += 1
        else:
            runs.append([s, d, 1])
    return [tuple(r) for r in runs]


def copy_blocks(src: torch.Tensor, dst: torch.Tensor, src_ids: list[int], dst_ids: list[int]) -> None:
    """dst[dst_ids] = src[src_ids] along dim 0. Between CPU tensors: one gather + one scatter. Across devices: one
    non_blocking copy per run of consecutive ids (cudaMemcpyAsync under the hood, like vLLM's swap_blocks)."""
    if not src_ids:
        return
    if src.device == dst.device and src.device.type == "cpu":
        dst.index_copy_(0, torch.tensor(dst_ids), src.index_select(0, torch.tensor(src_ids)))
        return
    for s, d, n in _runs(src_ids, dst_ids):
        dst[d : d + n].copy_(src[s : s + n], non_blocking=True)


@dataclass
class _QueuedCopy:
    source: LayerCaches  # per layer (k, v) to read from
    src_ids: list[int]
    dst_ids: list[int]  # device blocks


class LayerGate:
    """Handed to the attention of every layer for one forward: `wait(layer)` before touching that layer's cache."""

    def __init__(self, storage: KVStorage, work: list[_QueuedCopy], events: list | None) -> None:
        self._storage = storage
        self._work = work
        self._events = events
        self._done = [not work] * storage.num_layers

    @property
    def pending(self) -> bool:
        """This forward has copies to wait for."""
        return bool(self._work)

    def wait(self, layer: int) -> None:
        if self._done[layer]:
            return
        self._done[layer] = True
        if self._events is not None:
            torch.cuda.current_stream(self._storage.device).wait_event(self._events[layer])
        else:
            self._storage.copy_layer(self._work, layer)

    def finish(self) -> None:
        """Run whatever a layer did not ask for (a model that skipped a layer's attention must not lose copies)."""
        for layer in range(self._storage.num_layers):
            self.wait(layer)


class KVStorage:
    def __init__(
        self,
        num_layers: int,
        block_shape: tuple[int, int, int],  # block_size, Hkv, D
        dtype: torch.dtype,
        device: torch.device,
        num_device_blocks: int,
        num_host_blocks: int,
    ) -> None:
        self.num_layers = num_layers
        self.device = device
        self.cuda = device.type == "cuda"
        # Fixed tensors whose addresses never change (CUDA graphs and compiled steps rely on it): one
        # [L, num_blocks, block_size, Hkv, D] tensor each for K and V, so a forward takes the whole pool as two
        # inputs; `device_caches[l]` are layer l's views. Uninitialized: a slot is written before any query sees it,
        # and the kernels never let an unwritten slot reach a result.
        # One block more than the pool hands out: `padding_block`, which padded rows of a CUDA-graph step write to.
        self.device_kv = tuple(
            torch.empty((num_layers, num_device_blocks + 1, *block_shape), dtype=dtype, device=device) for _ in "kv"
        )
        self.padding_block = num_device_blocks
        self.device_caches: LayerCaches = [(self.device_kv[0][i], self.device_kv[1][i]) for i in range(num_layers)]
        self.host_kv = tuple(
            torch.empty((num_layers, num_host_blocks, *block_shape), dtype=dtype, pin_memory=self.cuda) for _ in "kv"
        )
        self.host_caches: LayerCaches = [(self.host_kv[0][i], self.host_kv[1][i]) for i in range(num_layers)]
        self.bytes_per_block = 2 * num_layers * block_shape[0] * block_shape[1] * block_shape[2] * dtype.itemsize
        self.chunk_shape = (num_layers, *block_shape)
        self.dtype = dtype
        self.side = torch.cuda.Stream(device) if self.cuda else None
        self._queued: list[_QueuedCopy] = []
        self._side_unwaited = False  # the side stream has copies the main stream has not waited for
        self._in_flight: tuple[torch.cuda.Event | None, list] = (None, [])  # last forward's copies, staging kept alive
        self._deferred_out: tuple[list[int], list[int]] = ([], [])  # swap-outs collected, issued by flush_swap_out

    # ---- copies issued now ------------------------------------------------------------------------------------

    def swap_out(self, dev_ids: list[int], host_ids: list[int]) -> None:
        """Device blocks -> host blocks, now (GPU: side stream, after the main stream's queued work)."""
        if self.side is None:
            self._copy_all(self.device_caches, self.host_caches, dev_ids, host_ids)
            return
        self.side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.side):
            self._copy_all(self.device_caches, self.host_caches, dev_ids, host_ids)
        self._side_unwaited = True

    def defer_swap_out(self, dev_id: int, host_id: int) -> None:
        """A swap-out issued later, together with the others collected (one copy per run of blocks instead of one
        per chunk, layer and k/v): by `flush_swap_out`, which the manager calls when it has moved what it moves,
        and before anything reads the host tier or the next forward writes the device tier."""
        self._deferred_out[0].append(dev_id)
        self._deferred_out[1].append(host_id)

    def flush_swap_out(self) -> None:
        dev_ids, host_ids = self._deferred_out
        if dev_ids:
            self._deferred_out = ([], [])
            self.swap_out(dev_ids, host_ids)

    def _copy_all(self, src: LayerCaches, dst: LayerCaches, src_ids: list[int], dst_ids: list[int]) -> None:
        for layer in range(self.num_layers):
            for s, d in zip(src[layer], dst[layer], strict=True):
                copy_blocks(s, d, src_ids, dst_ids)

    def read_chunk(self, tier: Tier, block: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One chunk's KV as CPU tensors k, v [num_layers, block_size, Hkv, D] (for a disk write)."""
        self.flush_swap_out()
        if tier == Tier.HOST:
            caches = self.host_caches
            if self.side is not None:
                self.side.synchronize()  # a swap-out into this block may still be in flight
        else:
            caches = self.device_caches
        k = torch.stack([layer[0][block] for layer in caches]).to("cpu")  # (stack copies: no second copy on CPU)
        v = torch.stack([layer[1][block] for layer in caches]).to("cpu")
        return k, v

    def read_blocks(self, tier: Tier, ids: list[int], device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """Blocks of the device or host tier as tensors k, v [num_layers, len(ids), block_size, Hkv, D] on `device`:
        all layers of every block, one gather each (a transfer to another instance ships them as one object)."""
        pools = self._pools(tier)
        index = torch.tensor(ids, dtype=torch.long, device=pools[0].device)
        return tuple(t.index_select(1, index).to(device) for t in pools)

    def write_blocks(self, tier: Tier, ids: list[int], k: torch.Tensor, v: torch.Tensor) -> None:
        """Write k, v [num_layers, len(ids), block_size, Hkv, D] into blocks of the device or host tier, now (between
        forwards; on GPU ordered on the main stream before the next one)."""
        pools = self._pools(tier)
        index = torch.tensor(ids, dtype=torch.long, device=pools[0].device)
        for pool, src in zip(pools, (k, v), strict=True):
            pool.index_copy_(1, index, src.to(pool.device, pool.dtype))

    def _pools(self, tier: Tier) -> tuple[torch.Tensor, torch.Tensor]:
        """The [L, num_blocks, ...] k and v tensors of a tier, safe to read or write now (swap-outs issued first)."""
        self.flush_swap_out()
        if tier == Tier.DEVICE:
            if self.side is not None:
                torch.cuda.current_stream(self.device).wait_stream(self.side)
                self._side_unwaited = False
            return self.device_kv
        if self.side is not None:
            self.side.synchronize()  # a swap-out into these blocks may still be in flight
        return self.host_kv

    # ---- copies for the next forward ----------------------------------------------------------------------------

    def queue_swap_in(self, host_ids: list[int], dev_ids: list[int]) -> None:
        self.flush_swap_out()
        self._queued.append(_QueuedCopy(self.host_caches, list(host_ids), list(dev_ids)))

    def queue_load(self, chunks: list[tuple[torch.Tensor, torch.Tensor]], dev_ids: list[int]) -> None:
        """Chunks read from disk (k, v [num_layers, block_size, Hkv, D] each) -> device blocks, next forward."""
        k = torch.stack([c[0] for c in chunks], dim=1)  # [L, n, block_size, Hkv, D]: each layer's slice contiguous
        v = torch.stack([c[1] for c in chunks], dim=1)
        if self.cuda:
            k, v = k.pin_memory(), v.pin_memory()
        staged = [(k[layer], v[layer]) for layer in range(self.num_layers)]
        self._queued.append(_QueuedCopy(staged, list(range(len(chunks))), list(dev_ids)))

    def complete_queued(self) -> None:
        """Run the queued swap-ins / loads now (a step failed before its forward: their chunks already count as on
        the device, so their blocks must hold their KV)."""
        if self._queued:
            self.begin_forward().finish()

    def cancel_queued(self) -> list[int]:
        """Forget the queued swap-ins / loads. -> the device blocks they targeted (whose contents are now stale)."""
        targets = [d for item in self._queued for d in item.dst_ids]
        self._queued = []
        return targets

    def copy_layer(self, work: list[_QueuedCopy], layer: int) -> None:
        for item in work:
            for s, d in zip(item.source[layer], self.device_caches[layer], strict=True):
                copy_blocks(s, d, item.src_ids, item.dst_ids)

    def begin_forward(self) -> LayerGate:
        """Issue the queued swap-ins/loads; the returned gate orders each layer's attention after its copies."""
        self.flush_swap_out()
        work, self._queued = self._queued, []
        if self.side is None:
            return LayerGate(self, work, None)
        main = torch.cuda.current_stream(self.device)
        last_event, _ = self._in_flight
        if last_event is not None:
            last_event.synchronize()  # long done in practice: it preceded the last forward's layers
        self._in_flight = (None, [])
        if not work:
            if self._side_unwaited:  # swap-outs read device blocks this forward may overwrite
                main.wait_stream(self.side)
                self._side_unwaited = False
            return LayerGate(self, work, None)
        self.side.wait_stream(main)  # the blocks we overwrite were last read by earlier forwards
        events = []
        with torch.cuda.stream(self.side):
            for layer in range(self.num_layers):
                self.copy_layer(work, layer)
                event = torch.cuda.Event()
                event.record(self.side)
                events.append(event)
        # Every swap-out issued before is ahead of these copies on the side stream, so waiting on a layer's event
        # also covers them.
        self._side_unwaited = False
        self._in_flight = (events[-1], [item.source for item in work])
        return LayerGate(self, work, events)
