"""int8 KV: the quantization every kernel, tier and test agrees on (`CacheConfig(kv_dtype="int8")`).

A KV row (one token's one head, `head_dim` values) is stored as `head_dim` int8 values followed by its scale and its
minimum, two fp32 in 8 bytes: an int8 cache is [num_blocks, block_size, Hkv, head_dim + 8]. Asymmetric, per token
and head, all 256 levels (a zero point per row: the row's minimum):

    lo, hi = min x, max x          scale = hi / 255 - lo / 255        (no overflow for any finite row)
    q = clamp(round_half_even((x - lo) / scale), 0, 255) - 128          x' = (q + 128) * scale + lo

all in fp32. A constant row (zeros included) has scale 0, values -128 and reads back exactly as its minimum; a row
with a NaN or inf has values -128 and a NaN scale and minimum, so it reads back as NaN. The zero point is what
reaches 99% top-1 agreement on SmolLM2: its K rows are far from centred on zero, and a symmetric amax / 127 scale
(pensieve's first int8 scheme, 4 bytes a row) wasted about half the levels on them (benchmarks/int8_schemes.py:
98.30% symmetric, 99.04% with the zero point, fake-quantized in the model's attention).

The scale and minimum travel inside the row, so a block is one contiguous run of bytes like any other: swaps, disk
files, MemPool transfers and the write-behind move int8 blocks unchanged. Per token and head this costs 8 bytes per
head_dim values (SmolLM2, head_dim 64: 72 bytes a row where fp32 takes 256 and bf16 128: 3.56x and 1.78x the tokens
in the same bytes). A file or transfer of the earlier 4-byte layout has another row shape and is dropped
(recomputed), never misread.

The kernels (C++ `pensieve_cpu::write_kv` / `paged_attention` on an int8 cache, the Triton ones) compute exactly
this quantization (bit for bit) and dequantize rows on the fly, in fp32 (they may fuse the multiply-add, one
rounding fewer); the functions here are the definition tests hold them to.
"""

from __future__ import annotations

import torch

from pensieve.ops.validation import QPARAM_BYTES

LEVELS = 255  # q + 128 in [0, 255]


def quantize_kv(x: torch.Tensor) -> torch.Tensor:
    """x [..., D] (any float dtype) -> int8 [..., D + 8]: each row's values, then its fp32 scale's and minimum's
    bytes."""
    x = x.float()
    if x.numel() == 0:
        return torch.empty(*x.shape[:-1], x.shape[-1] + QPARAM_BYTES, dtype=torch.int8, device=x.device)
    finite = x.isfinite().all(dim=-1, keepdim=True)
    lo = torch.where(finite, x.amin(dim=-1, keepdim=True), float("nan"))
    scale = torch.where(finite, x.amax(dim=-1, keepdim=True) / LEVELS - lo / LEVELS, float("nan"))
    spread = scale > 0
    q = torch.where(spread, torch.round((x - lo) / torch.where(spread, scale, 1.0)), 0.0)
    q = (q.clamp(0, LEVELS) - 128).to(torch.int8)
    params = torch.cat([scale, lo], dim=-1).contiguous().view(torch.int8)
    return torch.cat([q, params], dim=-1)


def dequantize_kv(packed: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """int8 [..., D + 8] -> [..., D] in `dtype` ((q + 128) * scale + lo in fp32, then cast)."""
    values = packed[..., :-QPARAM_BYTES].float()
    params = packed[..., -QPARAM_BYTES:].contiguous().view(torch.float32)
    return ((values + 128) * params[..., :1] + params[..., 1:]).to(dtype)


def row_bytes(head_dim: int, dtype: torch.dtype | str) -> int:
    """Bytes of one KV row (a token's head) in a cache of `dtype` ("int8": values, scale and minimum)."""
    if dtype in ("int8", torch.int8):
        return head_dim + QPARAM_BYTES
    return head_dim * (dtype.itemsize if isinstance(dtype, torch.dtype) else getattr(torch, dtype).itemsize)
