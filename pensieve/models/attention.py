"""The "pensieve" attention implementation for transformers' AttentionInterface.

HF's attention modules do everything family-specific (RoPE, q/k norms, scaling such as Gemma2's
`query_pre_attn_scalar`, per-layer sliding windows, softcaps) and hand this function q/k/v after it; the function
writes the layer's new K/V into pensieve's block pool and runs the paged op over the step's plan.
No mask is registered in AttentionMaskInterface, so HF builds none (its mask creation exits early).
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface

from pensieve.engine.plan import current_forward
from pensieve.ops import paged_attention, write_kv

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
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """query [1, Hq, T, D], key/value [1, Hkv, T, D] (packed over the step's sequences) -> ([1, T, Hq, D], None)."""
    ctx = current_forward()
    if ctx is None:
        raise RuntimeError(
            "pensieve attention ran outside a pensieve step: this model's attention implementation is "
            f"{ATTN_IMPLEMENTATION!r}; StatefulGenerator.close() restores the original one"
        )
    plan = ctx.plan
    ctx.gate.wait(module.layer_idx)  # this layer's swapped-in / loaded KV is in place (GPU: its copy event)
    k_cache, v_cache = ctx.kv_caches[module.layer_idx]
    q = query[0].transpose(0, 1)  # [T, Hq, D]
    k = key[0].transpose(0, 1).to(k_cache.dtype)  # [T, Hkv, D]
    v = value[0].transpose(0, 1).to(v_cache.dtype)
    write_kv(k, v, k_cache, v_cache, plan.slot_mapping)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = paged_attention(
        q.to(k_cache.dtype),
        k_cache,
        v_cache,
        plan.block_tables,
        plan.cu_seqlens_q,
        plan.seq_lens_k,
        scale,
        sliding_window=sliding_window if sliding_window and sliding_window > 0 else None,
        softcap=softcap if softcap else None,
    )
    return out.to(query.dtype)[None], None


def register() -> None:
    """Idempotent: make "pensieve" a valid attn_implementation for every transformers model."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, pensieve_attention)
