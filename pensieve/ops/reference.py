"""Plain reference for paged attention: gather every sequence's KV, dense masked softmax in float64.

Used by tests only. Deliberately simple: a Python loop over sequences, no shared code with the kernels.
"""

from __future__ import annotations

import torch


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, seq_len: int) -> torch.Tensor:
    """cache [num_blocks, block_size, Hkv, D], block_table [max_blocks] -> [seq_len, Hkv, D]."""
    block_size = cache.shape[1]
    positions = torch.arange(seq_len)
    blocks = block_table.long()[positions // block_size]
    return cache[blocks, positions % block_size]


def reference_paged_attention(
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
    """Same contract as `pensieve.ops.paged_attention`; returns float64 [T, Hq, D]."""
    num_q_heads, num_kv_heads = q.shape[1], k_cache.shape[2]
    group = num_q_heads // num_kv_heads
    out = torch.full(q.shape, float("nan"), dtype=torch.float64)
    for b in range(block_tables.shape[0]):
        q_start, q_end = int(cu_seqlens_q[b]), int(cu_seqlens_q[b + 1])
        seq_len = int(seq_lens_k[b])
        q_len = q_end - q_start
        if q_len == 0:
            continue
        qb = q[q_start:q_end].double()  # [q_len, Hq, D]
        kb = gather_kv(k_cache, block_tables[b], seq_len).double().repeat_interleave(group, dim=1)
        vb = gather_kv(v_cache, block_tables[b], seq_len).double().repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", qb, kb) * scale  # [Hq, q_len, seq_len]
        if softcap is not None:
            scores = softcap * torch.tanh(scores / softcap)
        query_pos = torch.arange(seq_len - q_len, seq_len)[:, None]
        key_pos = torch.arange(seq_len)[None, :]
        allowed = key_pos <= query_pos
        if sliding_window is not None:
            allowed &= query_pos - key_pos < sliding_window
        scores = scores.masked_fill(~allowed, float("-inf"))
        out[q_start:q_end] = torch.einsum("hqk,khd->qhd", scores.softmax(dim=-1), vb)
    return out


def reference_write_kv(k, v, k_cache, v_cache, slot_mapping) -> tuple[torch.Tensor, torch.Tensor]:
    """Return updated copies of the caches, written one slot at a time (an int8 cache: each row quantized by
    `pensieve.ops.quant.quantize_kv`, the definition)."""
    from pensieve.ops.quant import quantize_kv

    k_cache, v_cache = k_cache.clone(), v_cache.clone()
    block_size = k_cache.shape[1]
    if k_cache.dtype == torch.int8:
        k, v = quantize_kv(k), quantize_kv(v)
    for t, slot in enumerate(slot_mapping.tolist()):
        if slot < 0:
            continue
        k_cache[slot // block_size, slot % block_size] = k[t]
        v_cache[slot // block_size, slot % block_size] = v[t]
    return k_cache, v_cache
