"""ModelRunner: packs a step's chunks into a StepPlan and runs the model once over the device tier's KV pool.

The HF model sees input_ids/position_ids [1, T] packed over all chunks and `use_cache=False`: pensieve owns the
cache, HF's past_key_values is unused. The step's attention metadata reaches every layer as the keyword argument
`pensieve=` (an `AttentionBatch`). `logits_to_keep` takes the sampling rows, so the LM head runs on S rows.

The plan lives in persistent buffers (`StepBuffers`), filled in place each step: host tensors backed by numpy arrays
(pinned on GPU) and, on GPU, device copies made with non_blocking copies — fixed addresses, which CUDA graphs need.
A step runs one of three ways (`ModelRunner.run`): a captured CUDA graph (GPU, decode-only, no swap-in), the
compiled forward (CPU, `CompiledForward`), or eager (anything else, and every step with a swap-in on GPU: those
wait per layer on their copies).
"""

from __future__ import annotations

import numpy as np
import torch

from pensieve.cache.manager import KVManager
from pensieve.cache.tiers import KVStorage
from pensieve.config import EngineConfig
from pensieve.engine.graphs import CompiledForward, CudaGraphRunner, forward, resolve_compile
from pensieve.engine.plan import StepPlan
from pensieve.engine.scheduler import ScheduledChunk
from pensieve.forward import AttentionBatch
from pensieve.models.support import ModelShape
from pensieve.ops import trusted_inputs
from pensieve.ops.quant import row_bytes


def kv_bytes_per_block(shape: ModelShape, block_size: int, dtype: torch.dtype | str) -> int:
    """K and V of one block, every layer; dtype: the model's, or "int8" (values and per-row scales)."""
    return 2 * shape.num_layers * block_size * shape.num_kv_heads * row_bytes(shape.head_dim, dtype)


def default_num_blocks(shape: ModelShape, block_size: int, dtype: torch.dtype | str, device: torch.device) -> int:
    """Size the device tier from free memory: half of free GPU memory, or a quarter of available RAM (<= 4 GiB)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = free // 2
    else:
        budget = min(_available_ram() // 4, 4 << 30)
    return max(1, budget // kv_bytes_per_block(shape, block_size, dtype))


def _available_ram() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


class StepBuffers:
    """Preallocated step inputs, filled in place: `host` tensors share memory with numpy arrays (written without
    per-element Python), `device` tensors are their copies on the model's device (the same tensors on CPU)."""

    FIELDS = ("input_ids", "position_ids", "slot_mapping", "cu_seqlens_q", "seq_lens_k", "block_tables", "logits_rows")

    def __init__(self, max_tokens: int, max_seqs: int, max_cols: int, device: torch.device) -> None:
        shapes = {
            "input_ids": ((max_tokens,), torch.long),
            "position_ids": ((max_tokens,), torch.long),
            "slot_mapping": ((max_tokens,), torch.long),
            "cu_seqlens_q": ((max_seqs + 1,), torch.int32),
            "seq_lens_k": ((max_seqs,), torch.int32),
            "block_tables": ((max_seqs, max_cols), torch.int32),
            "logits_rows": ((max_seqs,), torch.long),
        }
        pin = device.type == "cuda"
        self.device = device
        self.host = {name: torch.zeros(shape, dtype=dtype, pin_memory=pin) for name, (shape, dtype) in shapes.items()}
        self.np = {name: t.numpy() for name, t in self.host.items()}
        self.dev = self.host if device.type == "cpu" else {n: t.to(device) for n, t in self.host.items()}
        self.max_tokens, self.max_seqs, self.max_cols = max_tokens, max_seqs, max_cols

    def pad(self, plan: StepPlan, num_seqs: int, padding_block: int, block_size: int) -> None:
        """Pad a decode-only step to `num_seqs` one-token sequences (a CUDA-graph bucket). Padded row i is a sequence
        of (i % block_size) + 1 positions that all live in `padding_block`: it writes one slot of that block, reads
        only that block, and its logits are never sampled."""
        n, b = plan.num_seqs, self.np
        pad = np.arange(num_seqs - n)
        b["input_ids"][n:num_seqs] = 0
        b["position_ids"][n:num_seqs] = pad % block_size
        b["slot_mapping"][n:num_seqs] = padding_block * block_size + pad % block_size
        b["cu_seqlens_q"][n + 1 : num_seqs + 1] = n + 1 + pad
        b["seq_lens_k"][n:num_seqs] = pad % block_size + 1
        b["block_tables"][n:num_seqs, 0] = padding_block

    def pad_mixed(self, plan: StepPlan) -> tuple[int, int]:
        """Pad a step with prefill chunks to >= 2 sub-sequences and >= 2 logits rows -> (sub-sequences, rows) to
        upload. The compiled forward specializes sizes 0 and 1 (docs/performance-log.md): padded like this, every such
        step runs the one graph that batched decode steps use, instead of a graph each for one sequence, one
        sampled row or none. The padded sub-sequence has no tokens and no keys (the attention op skips it); padded
        rows repeat the step's last token and are not sampled."""
        b = self.np
        num_seqs, num_rows = plan.num_seqs, plan.num_logits
        if num_seqs < 2:
            b["cu_seqlens_q"][num_seqs + 1 : 3] = plan.num_tokens
            b["seq_lens_k"][num_seqs:2] = 0
            num_seqs = 2
        if num_rows < 2:
            b["logits_rows"][num_rows:2] = plan.num_tokens - 1
            num_rows = 2
        return num_seqs, num_rows

    def upload(self, num_tokens: int, num_seqs: int, num_rows: int) -> dict[str, torch.Tensor]:
        """Copy the filled prefixes to the device (non_blocking from pinned memory); -> device views of them."""
        sizes = {"input_ids": num_tokens, "position_ids": num_tokens, "slot_mapping": num_tokens,
                 "cu_seqlens_q": num_seqs + 1, "seq_lens_k": num_seqs, "block_tables": num_seqs,
                 "logits_rows": num_rows}  # fmt: skip
        views = {}
        for name, n in sizes.items():
            dst = self.dev[name][:n]
            if self.dev is not self.host:
                dst.copy_(self.host[name][:n], non_blocking=True)
            views[name] = dst
        return views


class ModelRunner:
    def __init__(
        self,
        model: torch.nn.Module,
        kv: KVManager,
        storage: KVStorage,
        max_tokens: int,
        max_seqs: int,
        max_positions: int,
        engine_config: EngineConfig,
    ) -> None:
        self.model = model
        self.kv = kv
        self.storage = storage
        self.device = storage.device
        max_cols = min(kv.device.num_blocks, -(-max_positions // kv.block_size))
        # a turn is at most two sub-sequences of a step (its recompute range and its new tokens)
        self.buffers = StepBuffers(max_tokens, 2 * max_seqs, max_cols, self.device)
        cpu = self.device.type == "cpu"
        enabled = resolve_compile(engine_config.compile, model)
        self.compiled = CompiledForward(model, enabled, engine_config.compile_prefill) if cpu else None
        self.graphs = None
        if self.device.type == "cuda" and engine_config.cuda_graphs:
            self.graphs = CudaGraphRunner(
                model, storage, self.buffers, engine_config.cuda_graph_batch_sizes, kv.block_size
            )

    def build_plan(self, chunks: list[ScheduledChunk]) -> StepPlan:
        buf, bs = self.buffers.np, self.kv.block_size
        ids, pos, slots = buf["input_ids"], buf["position_ids"], buf["slot_mapping"]
        cu, lens, tables, rows = buf["cu_seqlens_q"], buf["seq_lens_k"], buf["block_tables"], buf["logits_rows"]
        t = 0
        num_rows = 0
        num_decodes = 0
        cu[0] = 0
        for b, chunk in enumerate(chunks):
            conv = chunk.turn.conv
            start, n = chunk.start, chunk.num_tokens
            end = start + n
            table = conv.block_table
            tables[b, : len(table)] = table
            if n == 1:
                ids[t] = conv.tokens[start]
                pos[t] = start
                slots[t] = table[start // bs] * bs + start % bs
                num_decodes += 1
            else:
                ids[t : t + n] = conv.tokens[start:end]
                p = np.arange(start, end)
                pos[t : t + n] = p
                slots[t : t + n] = np.asarray(table, dtype=np.int64)[p // bs] * bs + p % bs
            t += n
            cu[b + 1] = t
            lens[b] = end
            if chunk.samples:
                rows[num_rows] = t - 1
                num_rows += 1
        return StepPlan(num_tokens=t, num_seqs=len(chunks), num_logits=num_rows, decode_only=num_decodes == len(chunks))

    @torch.inference_mode()
    def run(self, plan: StepPlan) -> torch.Tensor:
        """-> logits [S, V] for the plan's sampling rows (S may be 0). Issues the step's queued swap-ins first: each
        layer's attention waits for its own layer's copies only."""
        gate = self.storage.begin_forward()
        try:
            return self._forward(plan, gate)
        finally:
            gate.finish()  # (also when the forward raised: every queued copy lands, no block keeps stale KV)

    def _forward(self, plan: StepPlan, gate) -> torch.Tensor:
        if self.graphs is not None and plan.decode_only and not gate.pending:
            with trusted_inputs():
                logits = self.graphs.run(plan)
            if logits is not None:
                return logits
        compiled = self.compiled is not None and self.compiled.wants(plan)
        num_seqs, num_rows = plan.num_seqs, plan.num_logits
        if compiled and not plan.decode_only:
            num_seqs, num_rows = self.buffers.pad_mixed(plan)
        views = self.buffers.upload(plan.num_tokens, num_seqs, num_rows)
        if compiled:
            gate.finish()  # CPU: the copies are plain copies on this thread; all of them now, then one graph
        batch = AttentionBatch(
            views["slot_mapping"],
            views["block_tables"],
            views["cu_seqlens_q"],
            views["seq_lens_k"],
            *self.storage.device_kv,
            gate=None if compiled else gate,
        )
        input_ids, position_ids = views["input_ids"][None], views["position_ids"][None]  # [1, T]
        # The plan was built from the manager's own block tables: the ops' value checks would re-verify it per layer.
        with trusted_inputs():
            if compiled:
                logits = self.compiled(input_ids, position_ids, views["logits_rows"], batch)[: plan.num_logits]
            else:
                logits = forward(self.model, input_ids, position_ids, views["logits_rows"], batch)
        return logits
