"""What one forward hands every layer's attention: a leaf module that `models/` and `engine/` both read.

The runner builds an `AttentionBatch` once per step and passes it to the HF model call as the keyword argument
`pensieve=`; transformers forwards unknown keyword arguments down to the attention function of every layer
(DESIGN §7). So the per-step state reaches the attention as an argument, not through an ambient global: a compiled
forward sees the metadata tensors and the KV pools as graph inputs (Dynamo graph-breaks on `ContextVar.get()`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch


class AttentionBatch(NamedTuple):
    """The step's attention metadata (DESIGN §3) and the device KV pools; B sub-sequences, T tokens in all."""

    slot_mapping: torch.Tensor  # [T] int64: where each token's K/V is written (block * block_size + offset)
    block_tables: torch.Tensor  # [B, max_blocks] int32 (columns past a sequence's blocks are never read)
    cu_seqlens_q: torch.Tensor  # [B + 1] int32
    seq_lens_k: torch.Tensor  # [B] int32
    k_caches: torch.Tensor  # [L, num_blocks, block_size, Hkv, D]: layer l's pool is k_caches[l]
    v_caches: torch.Tensor
    gate: Any = None  # a LayerGate when this step swaps KV in (eager steps only): wait(layer) before reading
