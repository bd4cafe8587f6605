"""The `pensieve::write_kv` and `pensieve::paged_attention` custom ops.

Registered with `torch.library.custom_op` and fake implementations, so they trace under `torch.compile`
(fullgraph) and pass `opcheck`. Kernels per device: CUDA -> Triton, everything else -> the torch path in
`cpu_paged`. The op wraps the Triton launcher instead of being a `triton_op` because `triton_op` breaks
fake-tensor tracing under TRITON_INTERPRET=1 (measured here, DESIGN §3).
"""

from __future__ import annotations

import torch

from pensieve.ops.cpu_paged import cached_plan, run_cpu_attention
from pensieve.ops.validation import (
    check_attention_shapes,
    check_attention_shapes_cached,
    check_write_shapes,
    check_write_values,
    values_trusted,
)

try:
    from pensieve.ops import triton_paged
except ImportError:  # triton is the `gpu` extra; CPU-only installs run without it
    triton_paged = None


@torch.library.custom_op("pensieve::write_kv", mutates_args=("k_cache", "v_cache"))
def write_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Scatter k, v [T, Hkv, D] into k_cache, v_cache [num_blocks, block_size, Hkv, D].

    slot_mapping [T] int64: flat slot = block * block_size + offset; -1 is padding and writes nothing.
    """
    check_write_shapes(k, v, k_cache, v_cache, slot_mapping)
    if not values_trusted():
        check_write_values(k_cache, slot_mapping)
    valid = slot_mapping >= 0
    slots = slot_mapping[valid]
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, k[valid])
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, v[valid])


@write_kv.register_fake
def _(k, v, k_cache, v_cache, slot_mapping) -> None:
    check_write_shapes(k, v, k_cache, v_cache, slot_mapping)


@torch.library.custom_op("pensieve::paged_attention", mutates_args=())
def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens_k: torch.Tensor,
    scale: float,
    *,
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Paged multi-query attention; returns out [T, Hq, D].

    q [T, Hq, D] packed over sequences; k_cache/v_cache [num_blocks, block_size, Hkv, D];
    block_tables [B, max_blocks] int32; cu_seqlens_q [B+1] int32; seq_lens_k [B] int32.
    Sequence b's q_len_b queries are the last q_len_b of its seq_lens_k[b] positions; the query at position p
    sees key j iff j <= p and, with a window W, p - j < W. softcap s maps a (scaled) score x to s*tanh(x/s).
    """
    check_attention_shapes_cached(
        q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens_k, scale, sliding_window, softcap
    )
    plan = cached_plan(q, k_cache, block_tables, cu_seqlens_q, seq_lens_k, sliding_window)
    return run_cpu_attention(q, k_cache, v_cache, plan, scale, softcap)


@paged_attention.register_fake
def _(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens_k, scale, *, sliding_window=None, softcap=None):
    check_attention_shapes(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens_k, scale, sliding_window, softcap)
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)


if triton_paged is not None:

    @paged_attention.register_kernel("cuda")
    def _(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens_k, scale, *, sliding_window=None, softcap=None):
        return triton_paged.triton_paged_attention(
            q,
            k_cache,
            v_cache,
            block_tables,
            cu_seqlens_q,
            seq_lens_k,
            scale,
            sliding_window=sliding_window,
            softcap=softcap,
        )

    @write_kv.register_kernel("cuda")
    def _(k, v, k_cache, v_cache, slot_mapping) -> None:
        triton_paged.triton_write_kv(k, v, k_cache, v_cache, slot_mapping)
