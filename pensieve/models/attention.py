"""The "pensieve" attention implementation for transformers' AttentionInterface.

HF's attention modules do everything family-specific (RoPE, q/k norms, scaling such as Gemma2's
`query_pre_attn_scalar`, per-layer sliding windows, softcaps) and hand this function q/k/v after it; the function
writes the layer's new K/V into pensieve's block pool and runs the paged op over the step's metadata, which arrives
as the model call's keyword argument `pensieve=` (an `AttentionBatch`, pensieve/forward.py). No mask is registered
in AttentionMaskInterface, so HF builds none (its mask creation exits early).
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface

from pensieve.forward import AttentionBatch
from pensieve.ops import step_kernels

ATTN_IMPLEMENTATION = "pensieve"


def pensieve_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    softcap: float | None = None,
    pensieve: AttentionBatch | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """query [1, Hq, T, D], key/value [1, Hkv, T, D] (packed over the step's sequences) -> ([1, T, Hq, D], None)."""
    if pensieve is None:
        raise RuntimeError(
            "pensieve attention ran outside a pensieve step: this model's attention implementation is "
            f"{ATTN_IMPLEMENTATION!r}; StatefulGenerator.close() restores the original one"
        )
    layer = module.layer_idx
    if pensieve.gate is not None:
        pensieve.gate.wait(layer)  # this layer's swapped-in / loaded KV is in place (GPU: its copy event)
    k_cache, v_cache = pensieve.k_caches[layer], pensieve.v_caches[layer]  # [N, block_size, Hkv, D]
    write_kv, paged_attention = step_kernels(k_cache.device)
    # an int8 cache (CacheConfig.kv_dtype) takes float32 k, v and q: the kernels quantize and dequantize
    dtype = torch.float32 if k_cache.dtype == torch.int8 else k_cache.dtype
    q = query[0].transpose(0, 1)  # [T, Hq, D]
    k = key[0].transpose(0, 1).to(dtype)  # [T, Hkv, D]
    v = value[0].transpose(0, 1).to(dtype)
    write_kv(k, v, k_cache, v_cache, pensieve.slot_mapping)
    out = paged_attention(
        q.to(dtype),
        k_cache,
        v_cache,
        pensieve.block_tables,
        pensieve.cu_seqlens_q,
        pensieve.seq_lens_k,
        scaling if scaling is not None else query.shape[-1] ** -0.5,
        sliding_window if sliding_window and sliding_window > 0 else None,
        softcap if softcap else None,
    )  # [T, Hq, D]
    return out.to(query.dtype)[None], None


def register() -> None:
    """Idempotent: make "pensieve" a valid attn_implementation for every transformers model."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, pensieve_attention)
