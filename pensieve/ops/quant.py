"""int8 KV: the quantization every kernel, tier and test agrees on (`CacheConfig(kv_dtype="int8")`).

A KV row (one token's one head, `head_dim` values) is stored as `head_dim` int8 values followed by its scale, an fp32
in 4 bytes: an int8 cache is [num_blocks, block_size, Hkv, head_dim + 4]. Symmetric, per token and head:

    scale = max |x| / 127        q = round_half_even(x / scale), clamped to [-127, 127]        x' = q * scale

all in fp32 (a row of zeros has scale 0 and stays zeros; a row with a NaN or inf has values 0 and a NaN scale, so
it reads back as NaN). The scale travels inside the row, so a block is one
contiguous run of bytes like any other: swaps, disk files, MemPool transfers and the write-behind move int8 blocks
unchanged, scales included. Per token-and-head costs 4 bytes per head_dim values (SmolLM2, head_dim 64: 68 bytes a
row where fp32 takes 256 and bf16 128: 3.76x and 1.88x the tokens in the same bytes).

The kernels (C++ `pensieve_cpu::write_kv` / `paged_attention` on an int8 cache, the Triton ones) compute exactly
this quantization and dequantize rows on the fly, in fp32; the functions here are the definition tests hold them to.
"""

from __future__ import annotations

import torch

from pensieve.ops.validation import SCALE_BYTES

QMAX = 127


def quantize_kv(x: torch.Tensor) -> torch.Tensor:
    """x [..., D] (any float dtype) -> int8 [..., D + 4]: each row's values, then its fp32 scale's bytes."""
    x = x.float()
    if x.numel() == 0:
        return torch.empty(*x.shape[:-1], x.shape[-1] + SCALE_BYTES, dtype=torch.int8, device=x.device)
    amax = x.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(amax.isfinite(), amax / QMAX, float("nan"))  # a non-finite row: values 0, scale NaN
    q = torch.where(scale > 0, torch.round(x / torch.where(scale > 0, scale, 1.0)), 0.0)
    q = q.clamp(-QMAX, QMAX).to(torch.int8)
    return torch.cat([q, scale.contiguous().view(torch.int8)], dim=-1)


def dequantize_kv(packed: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """int8 [..., D + 4] -> [..., D] in `dtype` (q * scale in fp32, then cast)."""
    values = packed[..., :-SCALE_BYTES].float()
    scale = packed[..., -SCALE_BYTES:].contiguous().view(torch.float32)
    return (values * scale).to(dtype)


def row_bytes(head_dim: int, dtype: torch.dtype | str) -> int:
    """Bytes of one KV row (a token's head) in a cache of `dtype` ("int8": values and scale)."""
    if dtype in ("int8", torch.int8):
        return head_dim + SCALE_BYTES
    return head_dim * (dtype.itemsize if isinstance(dtype, torch.dtype) else getattr(torch, dtype).itemsize)
