"""Triton kernels: paged multi-query attention and the KV scatter.

Grid of the attention kernel: (query tile, KV head). A tile holds BLOCK_Q query tokens of one sequence times the
GROUP query heads that share the KV head, packed into BLOCK_M = BLOCK_Q * GROUP rows (padded to a power of two),
so each K/V tile is loaded once for the whole GQA group. The sequence of a tile is found by binary search over
`cu_seqlens_q` on the device: the grid size depends only on shapes (T // BLOCK_Q + B tiles bound the total), so
a launch needs no host sync and can be captured in a CUDA graph. Keys are visited in TILE_N slices through the
block table, from the first tile a sliding window can see to the last key the tile's queries can see; the causal
and window masks are fused; softmax is online, in fp32.

These launchers run on CPU tensors under TRITON_INTERPRET=1, which is how CI tests them.

int8 caches (pensieve/ops/quant.py: rows of head_dim int8 values, then their fp32 scale and minimum): the attention
loads a K/V tile's values, scales and minima and dequantizes them in registers (QUANT); `_write_kv_int8_kernel`
quantizes one row per program. q and out are float32 there.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pensieve.ops.validation import (
    QPARAM_BYTES,
    check_attention_shapes_cached,
    check_attention_values,
    check_write_shapes,
    check_write_values,
    values_trusted,
)


@triton.jit
def _tanh(x):
    # Stable for large |x|: exp overflows to inf and the expression goes to +/-1.
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _find_seq(cu_seqlens_q_ptr, tile_idx, num_seqs, BLOCK_Q: tl.constexpr):
    """Largest b with cu_seqlens_q[b] // BLOCK_Q + b <= tile_idx (where sequence b's tiles start)."""
    lo = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        start = tl.load(cu_seqlens_q_ptr + mid) // BLOCK_Q + mid
        if start <= tile_idx:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _paged_attention_kernel(
    out_ptr,
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    cu_seqlens_q_ptr,
    seq_lens_k_ptr,
    scale,
    softcap,
    num_seqs,
    stride_q_t,
    stride_q_h,
    stride_o_t,
    stride_o_h,
    stride_k_blk,
    stride_k_off,
    stride_k_head,
    stride_v_blk,
    stride_v_off,
    stride_v_head,
    stride_bt,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_M: tl.constexpr,
    TILE_N: tl.constexpr,
    SLIDING_WINDOW: tl.constexpr,
    USE_SOFTCAP: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    QUANT: tl.constexpr = False,
):
    tile_idx = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq = _find_seq(cu_seqlens_q_ptr, tile_idx, num_seqs, BLOCK_Q)
    q_start = tl.load(cu_seqlens_q_ptr + seq)
    q_len = tl.load(cu_seqlens_q_ptr + seq + 1) - q_start
    q_tile = tile_idx - (q_start // BLOCK_Q + seq)
    if q_tile * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_k_ptr + seq)
    context_len = seq_len - q_len

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    offs_t = tl.arange(0, TILE_N)
    q_local = q_tile * BLOCK_Q + offs_m // GROUP  # [BLOCK_M] query index within the sequence
    head = kv_head * GROUP + offs_m % GROUP  # [BLOCK_M] query head
    row_ok = (offs_m < BLOCK_Q * GROUP) & (q_local < q_len)
    d_ok = offs_d < HEAD_DIM
    query_pos = context_len + q_local  # [BLOCK_M] absolute position

    q_offs = (q_start + q_local)[:, None].to(tl.int64) * stride_q_t + head[:, None] * stride_q_h + offs_d[None, :]
    q = tl.load(q_ptr + q_offs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_M, HEAD_DIM_PAD]

    last_q = tl.minimum(q_tile * BLOCK_Q + BLOCK_Q, q_len) - 1
    kv_end = context_len + last_q + 1  # keys [kv_begin, kv_end) can be seen by some row of this tile
    kv_begin = 0
    if SLIDING_WINDOW > 0:
        kv_begin = tl.maximum(0, context_len + q_tile * BLOCK_Q - SLIDING_WINDOW + 1)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    for tile in range(kv_begin // TILE_N, tl.cdiv(kv_end, TILE_N)):
        key_pos = tile * TILE_N + offs_t  # [TILE_N]
        key_ok = (key_pos >= kv_begin) & (key_pos < kv_end)
        block = tl.load(table + key_pos // BLOCK_SIZE, mask=key_ok, other=0).to(tl.int64)
        in_block = key_pos % BLOCK_SIZE
        k_offs = block[None, :] * stride_k_blk + in_block[None, :] * stride_k_off + kv_head * stride_k_head
        v_offs = block[:, None] * stride_v_blk + in_block[:, None] * stride_v_off + kv_head * stride_v_head
        if QUANT:  # int8 values, then the row's fp32 scale and minimum: dequantized here
            k = tl.load(k_cache_ptr + k_offs + offs_d[:, None], mask=d_ok[:, None] & key_ok[None, :], other=0)
            k_params = (k_cache_ptr + k_offs + HEAD_DIM).to(tl.pointer_type(tl.float32))
            k_scale = tl.load(k_params, mask=key_ok[None, :], other=0.0)
            k_lo = tl.load(k_params + 1, mask=key_ok[None, :], other=0.0)
            k = (k.to(tl.float32) + 128.0) * k_scale + k_lo
            v = tl.load(v_cache_ptr + v_offs + offs_d[None, :], mask=key_ok[:, None] & d_ok[None, :], other=0)
            v_params = (v_cache_ptr + v_offs + HEAD_DIM).to(tl.pointer_type(tl.float32))
            v_scale = tl.load(v_params, mask=key_ok[:, None], other=0.0)
            v_lo = tl.load(v_params + 1, mask=key_ok[:, None], other=0.0)
            v = (v.to(tl.float32) + 128.0) * v_scale + v_lo
        else:
            k = tl.load(k_cache_ptr + k_offs + offs_d[:, None], mask=d_ok[:, None] & key_ok[None, :], other=0.0)
            v = tl.load(v_cache_ptr + v_offs + offs_d[None, :], mask=key_ok[:, None] & d_ok[None, :], other=0.0)

        s = tl.dot(q, k, input_precision=DOT_PRECISION) * scale  # [BLOCK_M, TILE_N]
        if USE_SOFTCAP:
            s = softcap * _tanh(s / softcap)
        visible = key_ok[None, :] & (key_pos[None, :] <= query_pos[:, None])
        if SLIDING_WINDOW > 0:
            visible = visible & (query_pos[:, None] - key_pos[None, :] < SLIDING_WINDOW)
        s = tl.where(visible, s, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen nothing yet
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    acc = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    o_offs = (q_start + q_local)[:, None].to(tl.int64) * stride_o_t + head[:, None] * stride_o_h + offs_d[None, :]
    tl.store(out_ptr + o_offs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _write_kv_kernel(
    k_ptr,
    v_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_ptr,
    stride_k_t,
    stride_k_h,
    stride_v_t,
    stride_v_h,
    stride_kc_blk,
    stride_kc_off,
    stride_kc_head,
    stride_vc_blk,
    stride_vc_off,
    stride_vc_head,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    ROW_PAD: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t)
    if slot < 0:
        return
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    idx = tl.arange(0, ROW_PAD)
    ok = idx < NUM_KV_HEADS * HEAD_DIM
    head = idx // HEAD_DIM
    d = idx % HEAD_DIM
    k = tl.load(k_ptr + t.to(tl.int64) * stride_k_t + head * stride_k_h + d, mask=ok)
    v = tl.load(v_ptr + t.to(tl.int64) * stride_v_t + head * stride_v_h + d, mask=ok)
    tl.store(k_cache_ptr + block * stride_kc_blk + offset * stride_kc_off + head * stride_kc_head + d, k, mask=ok)
    tl.store(v_cache_ptr + block * stride_vc_blk + offset * stride_vc_off + head * stride_vc_head + d, v, mask=ok)


@triton.jit
def _write_kv_int8_kernel(
    src_ptr,
    cache_ptr,
    slot_ptr,
    stride_t,
    stride_h,
    stride_c_blk,
    stride_c_off,
    stride_c_head,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """Row (token t, head h) of src quantized into its slot (pensieve/ops/quant.py): scale = hi / 255 - lo / 255,
    q = round_half_even((x - lo) / scale) - 128, then the scale and lo."""
    t = tl.program_id(0)
    h = tl.program_id(1)
    slot = tl.load(slot_ptr + t)
    if slot < 0:
        return
    d = tl.arange(0, HEAD_DIM_PAD)
    ok = d < HEAD_DIM
    x = tl.load(src_ptr + t.to(tl.int64) * stride_t + h * stride_h + d, mask=ok, other=0.0).to(tl.float32)
    # IEEE divisions (div_rn): Triton's `/` on CUDA is div.full.f32 (up to 2 ulp), which would not match quantize_kv
    lo = tl.min(tl.where(ok, x, float("inf")), axis=0)
    hi = tl.max(tl.where(ok, x, float("-inf")), axis=0)
    bad = tl.sum(((x != x) | (tl.abs(x) == float("inf"))).to(tl.int32), axis=0)  # (tl.max may skip a NaN)
    lo = tl.where(bad == 0, lo, float("nan"))  # a row with a NaN or inf: values -128, a NaN scale and minimum
    scale = tl.where(bad == 0, tl.math.div_rn(hi, 255.0) - tl.math.div_rn(lo, 255.0), float("nan"))
    y = tl.where(scale > 0, tl.math.div_rn(x - lo, tl.where(scale > 0, scale, 1.0)), 0.0)
    y = tl.minimum(tl.maximum(y, 0.0), 255.0)
    y = (y + 12582912.0) - 12582912.0  # 1.5 * 2^23: rounds 0 <= y <= 255 to the nearest integer, ties to even
    row = cache_ptr + (slot // BLOCK_SIZE) * stride_c_blk + (slot % BLOCK_SIZE) * stride_c_off + h * stride_c_head
    tl.store(row + d, (y - 128.0).to(tl.int8), mask=ok)
    params = (row + HEAD_DIM).to(tl.pointer_type(tl.float32))
    tl.store(params, scale)
    tl.store(params + 1, lo)


_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _cache_strides(k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple[int, ...]:
    """(block, offset, head) strides of both caches, in the order the kernels take them."""
    return (*k_cache.stride()[:3], *v_cache.stride()[:3])


def _require_triton_layout(**tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        if t.dtype == torch.int8 and name.endswith("cache"):  # an int8 cache (pensieve/ops/quant.py)
            if (t.shape[-1] - QPARAM_BYTES) % 4:
                raise ValueError(f"an int8 {name} on the Triton kernels needs head_dim % 4 == 0 (its fp32 scales "
                                 f"are read aligned), got head_dim {t.shape[-1] - QPARAM_BYTES}")  # fmt: skip
            continue
        if t.dtype not in _TRITON_DTYPES:
            raise ValueError(f"{name} dtype {t.dtype} is not supported by the Triton kernel (fp16/bf16/fp32)")
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last (head_dim) dimension")


def triton_paged_attention(
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
    out: torch.Tensor | None = None,
    tile_n: int = 32,
) -> torch.Tensor:
    """Launch the Triton kernel; same contract as `pensieve.ops.paged_attention`. Returns out [T, Hq, D]."""
    check_attention_shapes_cached(
        q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens_k, scale, sliding_window, softcap
    )
    _require_triton_layout(q=q, k_cache=k_cache, v_cache=v_cache)
    if not values_trusted():
        check_attention_values(q, k_cache, block_tables, cu_seqlens_q, seq_lens_k)
    num_tokens, num_q_heads, head_dim = q.shape
    num_seqs = block_tables.shape[0]
    num_kv_heads = k_cache.shape[2]
    group = num_q_heads // num_kv_heads
    if out is None:
        out = torch.empty(num_tokens, num_q_heads, head_dim, dtype=q.dtype, device=q.device)
    if num_tokens == 0 or num_seqs == 0:
        return out
    # Decode-heavy steps (about one query per sequence) want small tiles; prefill wants taller ones.
    # Chosen from shapes only, so no host sync.
    min_rows = 16 if num_tokens <= 2 * num_seqs else 64
    block_m = max(min_rows, triton.next_power_of_2(group))
    block_q = block_m // group
    grid = (num_tokens // block_q + num_seqs, num_kv_heads)
    _paged_attention_kernel[grid](
        out,
        q,
        k_cache,
        v_cache,
        block_tables,
        cu_seqlens_q,
        seq_lens_k,
        float(scale),
        float(softcap or 0.0),
        num_seqs,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        *_cache_strides(k_cache, v_cache),
        block_tables.stride(0),
        GROUP=group,
        HEAD_DIM=head_dim,
        HEAD_DIM_PAD=max(16, triton.next_power_of_2(head_dim)),
        BLOCK_SIZE=k_cache.shape[1],
        BLOCK_Q=block_q,
        BLOCK_M=block_m,
        TILE_N=tile_n,
        SLIDING_WINDOW=sliding_window or 0,
        USE_SOFTCAP=softcap is not None,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        QUANT=k_cache.dtype == torch.int8,
    )
    return out


def triton_write_kv(k, v, k_cache, v_cache, slot_mapping) -> None:
    """Scatter k, v [T, Hkv, D] into the caches at slot_mapping [T] (-1 = skip). Mutates the caches."""
    check_write_shapes(k, v, k_cache, v_cache, slot_mapping)
    _require_triton_layout(k=k, v=v, k_cache=k_cache, v_cache=v_cache)
    if not values_trusted():
        check_write_values(k_cache, slot_mapping)
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    if k_cache.dtype == torch.int8:
        for src, cache in ((k, k_cache), (v, v_cache)):
            _write_kv_int8_kernel[(num_tokens, num_kv_heads)](
                src, cache, slot_mapping, src.stride(0), src.stride(1), *cache.stride()[:3],
                HEAD_DIM=head_dim, HEAD_DIM_PAD=triton.next_power_of_2(head_dim), BLOCK_SIZE=cache.shape[1],
            )  # fmt: skip
        return
    _write_kv_kernel[(num_tokens,)](
        k,
        v,
        k_cache,
        v_cache,
        slot_mapping,
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        *_cache_strides(k_cache, v_cache),
        NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_SIZE=k_cache.shape[1],
        ROW_PAD=triton.next_power_of_2(num_kv_heads * head_dim),
    )
