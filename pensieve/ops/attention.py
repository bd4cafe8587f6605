"""The `pensieve::write_kv` and `pensieve::paged_attention` custom ops.

Registered with `torch.library.custom_op` and fake implementations, so they trace under `torch.compile`
(fullgraph) and pass `opcheck`. Kernels per device: CUDA -> Triton; CPU -> the C++ kernels (`cpu_kernel.py`, built at
first use), or the torch path in `cpu_paged` where they cannot be built; any other device -> the torch path. The op
wraps the Triton launcher instead of being a `triton_op` because `triton_op` breaks fake-tensor tracing under
TRITON_INTERPRET=1 (measured here, DESIGN §3).

`step_kernels(device)` gives the engine's forward the fastest callables for a device: on CPU the C++ ops themselves
(`torch.ops.pensieve_cpu.*`: no Python between the dispatcher and the kernel, which matters 60 times a step), else
these ops.
"""

from __future__ import annotations

import torch

from pensieve.ops import cpu_kernel
from pensieve.ops.cpu_paged import torch_paged_attention, torch_write_kv
from pensieve.ops.validation import (
    check_attention_shapes,
    check_attention_shapes_cached,
    check_write_shapes,
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
    if k.device.type == "cpu" and cpu_kernel.load():  # checks every slot itself
        torch.ops.pensieve_cpu.write_kv(k, v, k_cache, v_cache, slot_mapping)
    else:
        torch_write_kv(k, v, k_cache, v_cache, slot_mapping)


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
    if q.device.type == "cpu" and cpu_kernel.load():  # checks every index itself
        return torch.ops.pensieve_cpu.paged_attention(
            q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens_k, scale, sliding_window, softcap
        )
    return torch_paged_attention(
        q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens_k, scale, sliding_window, softcap
    )


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


def step_kernels(device: torch.device):
    """(write_kv, paged_attention) for a model forward on `device`, same signatures as the ops above (the attention
    takes sliding_window and softcap positionally)."""
    if device.type == "cpu" and cpu_kernel.load():
        return torch.ops.pensieve_cpu.write_kv, torch.ops.pensieve_cpu.paged_attention
    return write_kv, _paged_attention_positional


def _paged_attention_positional(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens_k, scale, window, softcap):
    return paged_attention(
        q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens_k, scale, sliding_window=window, softcap=softcap
    )
