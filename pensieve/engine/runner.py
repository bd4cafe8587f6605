"""ModelRunner: packs a step's chunks into a StepPlan and runs the model once over the device tier's KV pool.

The HF model sees input_ids/position_ids [1, T] packed over all chunks and `use_cache=False`: pensieve owns the
cache, HF's past_key_values is unused. `logits_to_keep` takes the sampling rows, so the LM head runs on S rows.
"""

from __future__ import annotations

import torch

from pensieve.cache.manager import KVManager
from pensieve.cache.tiers import KVStorage
from pensieve.engine.plan import StepPlan, forward_context
from pensieve.engine.scheduler import ScheduledChunk
from pensieve.models.support import ModelShape
from pensieve.ops import trusted_inputs


def kv_bytes_per_block(shape: ModelShape, block_size: int, dtype: torch.dtype) -> int:
    return 2 * shape.num_layers * block_size * shape.num_kv_heads * shape.head_dim * dtype.itemsize


def default_num_blocks(shape: ModelShape, block_size: int, dtype: torch.dtype, device: torch.device) -> int:
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


class ModelRunner:
    def __init__(self, model: torch.nn.Module, kv: KVManager, storage: KVStorage) -> None:
        self.model = model
        self.kv = kv
        self.storage = storage
        self.device = storage.device
        self.kv_caches = storage.device_caches

    def build_plan(self, chunks: list[ScheduledChunk]) -> StepPlan:
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        cu = [0]
        seq_lens: list[int] = []
        logits_rows: list[int] = []
        tables = []
        for chunk in chunks:
            conv = chunk.turn.conv
            end = chunk.start + chunk.num_tokens
            input_ids += conv.tokens[chunk.start : end]
            positions += range(chunk.start, end)
            slots += [self.kv.slot(conv, p) for p in range(chunk.start, end)]
            cu.append(cu[-1] + chunk.num_tokens)
            seq_lens.append(end)
            tables.append(conv.block_table)
            if chunk.samples:
                logits_rows.append(cu[-1] - 1)
        max_blocks = max(len(t) for t in tables)
        tables = [t + [0] * (max_blocks - len(t)) for t in tables]
        dev = self.device
        return StepPlan(
            input_ids=torch.tensor([input_ids], dtype=torch.long, device=dev),
            position_ids=torch.tensor([positions], dtype=torch.long, device=dev),
            cu_seqlens_q=torch.tensor(cu, dtype=torch.int32, device=dev),
            seq_lens_k=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            block_tables=torch.tensor(tables, dtype=torch.int32, device=dev),
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
            logits_rows=torch.tensor(logits_rows, dtype=torch.long, device=dev),
        )

    @torch.inference_mode()
    def run(self, plan: StepPlan) -> torch.Tensor:
        """-> logits [S, V] for plan.logits_rows (S may be 0). Issues the step's queued swap-ins first: each
        layer's attention waits for its own layer's copies only."""
        gate = self.storage.begin_forward()
        # The plan was built from the manager's own block tables: the ops' value checks would re-verify it per layer.
        with forward_context(plan, self.kv_caches, gate), trusted_inputs():
            out = self.model(
                input_ids=plan.input_ids,
                position_ids=plan.position_ids,
                use_cache=False,
                logits_to_keep=plan.logits_rows,
            )
        gate.finish()
        return out.logits[0]
