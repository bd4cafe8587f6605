"""Input checks for the ops. Every problem is a `ValueError` naming it, raised before any kernel runs.

Two levels: `check_*_shapes` reads only metadata (free, safe under tracing and CUDA-graph capture);
`check_*_values` reads tensor contents (a device sync on GPU), and is skipped inside `trusted_inputs()`,
which the engine uses after validating a step's metadata once.
"""

from __future__ import annotations

import contextlib
import math
import threading

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
QPARAM_BYTES = 8  # an int8 KV row's fp32 scale and fp32 minimum, after its head_dim values (pensieve/ops/quant.py)

_trust = threading.local()


@contextlib.contextmanager
def trusted_inputs():
    """Skip the value checks (not the shape checks) of ops called in this thread inside the block."""
    previous = getattr(_trust, "on", False)
    _trust.on = True
    try:
        yield
    finally:
        _trust.on = previous


def values_trusted() -> bool:
    return getattr(_trust, "on", False) or torch.compiler.is_compiling() or _capturing()


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _check_same_device(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    first = next(iter(devices.values()))
    _require(
        all(d == first for d in devices.values()),
        "all tensors must be on one device, got " + ", ".join(f"{n}={d}" for n, d in devices.items()),
    )


def _check_cache_pair(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    _require(k_cache.dim() == 4, f"k_cache must be [num_blocks, block_size, Hkv, D], got rank {k_cache.dim()}")
    _require(
        v_cache.shape == k_cache.shape,
        f"v_cache shape {tuple(v_cache.shape)} differs from k_cache shape {tuple(k_cache.shape)}",
    )
    _require(
        k_cache.dtype in FLOAT_DTYPES or k_cache.dtype == torch.int8,
        f"k_cache dtype {k_cache.dtype} is not a floating type or int8",
    )
    _require(v_cache.dtype == k_cache.dtype, f"v_cache dtype {v_cache.dtype} != k_cache dtype {k_cache.dtype}")


_passed_signatures: set[tuple] = set()  # metadata signatures already checked: every layer of a step repeats one


def _signature(*tensors: torch.Tensor) -> tuple:
    return tuple((t.shape, t.stride(), t.dtype, t.device) for t in tensors)


def check_attention_shapes_cached(
    q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens_k, scale, sliding_window, softcap
) -> None:
    """`check_attention_shapes` remembered per signature; real tensors only (SymInts don't hash)."""
    key = (_signature(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens_k), scale, sliding_window, softcap)
    if key in _passed_signatures:
        return
    check_attention_shapes(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens_k, scale, sliding_window, softcap)
    if len(_passed_signatures) > 4096:
        _passed_signatures.clear()
    _passed_signatures.add(key)


def check_attention_shapes(
    q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens_k, scale, sliding_window, softcap
) -> None:
    _require(q.dim() == 3, f"q must be [T, Hq, D], got rank {q.dim()}")
    _check_cache_pair(k_cache, v_cache)
    quantized = k_cache.dtype == torch.int8
    if quantized:
        _require(q.dtype == torch.float32, f"an int8 KV cache takes float32 q, got {q.dtype}")
    else:
        _require(q.dtype == k_cache.dtype, f"q dtype {q.dtype} != k_cache dtype {k_cache.dtype}")
    _check_same_device(
        q=q,
        k_cache=k_cache,
        v_cache=v_cache,
        block_tables=block_tables,
        cu_seqlens_q=cu_seqlens_q,
        seq_lens_k=seq_lens_k,
    )
    for name, t, rank in (
        ("block_tables", block_tables, 2),
        ("cu_seqlens_q", cu_seqlens_q, 1),
        ("seq_lens_k", seq_lens_k, 1),
    ):
        _require(t.dim() == rank, f"{name} must have rank {rank}, got {t.dim()}")
        _require(t.dtype == torch.int32, f"{name} must be int32, got {t.dtype}")
    num_seqs = block_tables.shape[0]
    _require(
        cu_seqlens_q.shape[0] == num_seqs + 1,
        f"cu_seqlens_q has {cu_seqlens_q.shape[0]} entries, expected num_seqs + 1 = {num_seqs + 1}",
    )
    _require(
        seq_lens_k.shape[0] == num_seqs,
        f"seq_lens_k has {seq_lens_k.shape[0]} entries, expected num_seqs = {num_seqs}",
    )
    num_q_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_cache.shape[2]
    _require(
        head_dim == cache_head_dim(k_cache),
        f"q head_dim {head_dim} != cache head_dim {cache_head_dim(k_cache)}"
        + (f" (an int8 cache's rows hold head_dim + {QPARAM_BYTES} bytes)" if quantized else ""),
    )
    _require(
        num_kv_heads > 0 and num_q_heads % num_kv_heads == 0,
        f"Hq={num_q_heads} is not a multiple of Hkv={num_kv_heads}",
    )
    _require(math.isfinite(scale) and scale > 0, f"scale must be a positive finite float, got {scale}")
    _require(sliding_window is None or sliding_window > 0, f"sliding_window must be None or > 0, got {sliding_window}")
    _require(softcap is None or softcap > 0, f"softcap must be None or > 0, got {softcap}")


def check_attention_values(q, k_cache, block_tables, cu_seqlens_q, seq_lens_k) -> None:
    cu = cu_seqlens_q.cpu().long()
    seq_lens = seq_lens_k.cpu().long()
    _require(int(cu[0]) == 0, f"cu_seqlens_q must start at 0, got {int(cu[0])}")
    q_lens = cu[1:] - cu[:-1]
    _require(bool((q_lens >= 0).all()), f"cu_seqlens_q must be non-decreasing, got {cu.tolist()}")
    _require(int(cu[-1]) == q.shape[0], f"cu_seqlens_q ends at {int(cu[-1])} but q has {q.shape[0]} tokens")
    short = (seq_lens < q_lens).nonzero().flatten()
    _require(
        short.numel() == 0,
        "seq_lens_k < q_len for sequence(s) " + str(short.tolist()) + f": seq_lens_k={seq_lens.tolist()}, "
        f"q_lens={q_lens.tolist()}",
    )
    block_size, num_blocks = k_cache.shape[1], k_cache.shape[0]
    blocks_needed = (seq_lens + block_size - 1) // block_size
    max_blocks = block_tables.shape[1]
    too_short = (blocks_needed > max_blocks).nonzero().flatten()
    _require(
        too_short.numel() == 0,
        f"block table too short: sequence(s) {too_short.tolist()} need {blocks_needed.max().item()} blocks, "
        f"block_tables has {max_blocks} columns",
    )
    used = torch.arange(max_blocks)[None, :] < blocks_needed[:, None]
    ids = block_tables.cpu().long()[used]
    bad = ids[(ids < 0) | (ids >= num_blocks)]
    _require(
        bad.numel() == 0, f"block id(s) {bad.unique().tolist()[:8]} out of range [0, {num_blocks}) in block_tables"
    )


def check_write_shapes(k, v, k_cache, v_cache, slot_mapping) -> None:
    _check_cache_pair(k_cache, v_cache)
    _require(k.dim() == 3, f"k must be [T, Hkv, D], got rank {k.dim()}")
    _require(v.shape == k.shape, f"v shape {tuple(v.shape)} differs from k shape {tuple(k.shape)}")
    _require(
        k.dim() == 3 and (k.shape[1], k.shape[2]) == (k_cache.shape[2], cache_head_dim(k_cache)),
        f"k is [T, {k.shape[1]}, {k.shape[2]}] but the cache holds [.., {k_cache.shape[2]}, {cache_head_dim(k_cache)}]",
    )
    want = torch.float32 if k_cache.dtype == torch.int8 else k_cache.dtype  # an int8 cache quantizes float32 rows
    _require(
        k.dtype == want and v.dtype == want,
        f"k/v dtypes {k.dtype}/{v.dtype} != {want}"
        + (" (an int8 cache takes float32 k, v)" if want != k_cache.dtype else " (the cache dtype)"),
    )
    _require(
        slot_mapping.dim() == 1 and slot_mapping.shape[0] == k.shape[0],
        f"slot_mapping must be [T={k.shape[0]}], got {tuple(slot_mapping.shape)}",
    )
    _require(slot_mapping.dtype == torch.int64, f"slot_mapping must be int64, got {slot_mapping.dtype}")
    _check_same_device(k=k, v=v, k_cache=k_cache, v_cache=v_cache, slot_mapping=slot_mapping)


def cache_head_dim(cache: torch.Tensor) -> int:
    """head_dim of a KV cache [num_blocks, block_size, Hkv, D] (int8: [.., D + QPARAM_BYTES], each row's scale and
    minimum last)."""
    return cache.shape[3] - QPARAM_BYTES if cache.dtype == torch.int8 else cache.shape[3]


def check_write_values(k_cache, slot_mapping) -> None:
    slots = slot_mapping.cpu()
    num_slots = k_cache.shape[0] * k_cache.shape[1]
    bad = slots[(slots < -1) | (slots >= num_slots)]
    _require(bad.numel() == 0, f"slot(s) {bad.tolist()[:8]} out of range [-1, {num_slots}) in slot_mapping")
    valid = slots[slots >= 0]
    _require(valid.unique().numel() == valid.numel(), "slot_mapping writes the same slot twice")
