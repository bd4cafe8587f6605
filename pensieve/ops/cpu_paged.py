"""Paged multi-query attention in plain torch: the fallback where the C++ kernels (`csrc/cpu_paged.cpp`) cannot be
built, and the path for devices with no kernel of their own.

The work splits into a per-step *plan* and a per-layer *run* (flashinfer's split):

- `plan_cpu_attention` turns the metadata (block tables, lengths) into gather indices and masks. It depends on
  nothing layer-specific, so the op caches it on the metadata's content: every layer of a step reuses it.
- `run_cpu_attention` gathers whole KV blocks with one `index_select` per group (12 KB rows: near memcpy speed)
  into reused scratch, and calls SDPA on a strided `[n, Hkv, L, D]` view of it.

Sequences are grouped so that no Python loop runs over tokens:

- all decode sequences (q_len == 1) form one batched call; the GQA group is folded into the query rows
  (`[n, Hkv, G, D]`), so each K/V row is read once for the whole group;
- every sequence with q_len > 1 (prefill, prefill over history, recompute) is one call of its own.

Keys start at the first block a sliding window can still see, so windowed layers gather only the window.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pensieve.ops.quant import dequantize_kv, quantize_kv
from pensieve.ops.validation import cache_head_dim, check_attention_values, check_write_values, values_trusted


@dataclass(frozen=True)
class DecodeGroup:
    q_rows: torch.Tensor  # [n] int64: packed row of each sequence's single query
    block_ids: torch.Tensor  # [n * num_cols] int64: blocks to gather, row-major per sequence
    num_cols: int
    mask: torch.Tensor | None  # [n, 1, 1, num_cols * block_size] bool, None when every key is visible
    dead_rows: torch.Tensor | None  # gathered rows past a sequence's end (or filler): zeroed so NaN can't leak


@dataclass(frozen=True)
class PrefillSeq:
    q_start: int
    q_len: int
    block_ids: torch.Tensor  # [num_cols] int64
    mask: torch.Tensor | None  # [q_len, num_cols * block_size] bool; None means top-left causal
    live_rows: int  # gathered rows [live_rows:] lie past the sequence's end and are zeroed


@dataclass(frozen=True)
class CpuAttentionPlan:
    block_size: int
    decodes: tuple[DecodeGroup, ...]  # decode sequences, sorted by length, in cache-sized chunks
    prefills: tuple[PrefillSeq, ...]
    validated: bool


# Decode sequences are gathered and attended in chunks of about this many bytes of K+V, so the gathered copy is
# still in cache when SDPA reads it (measured on this machine's 32 MiB L3: see docs/architecture.md).
DECODE_CHUNK_BYTES = 16 << 20


def _visible(query_pos: torch.Tensor, key_pos: torch.Tensor, sliding_window: int | None) -> torch.Tensor:
    """query_pos [..., Q, 1], key_pos [..., 1, K] -> bool [..., Q, K]."""
    allowed = key_pos <= query_pos
    if sliding_window is not None:
        allowed &= query_pos - key_pos < sliding_window
    return allowed


def plan_cpu_attention(
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens_k: torch.Tensor,
    block_size: int,
    sliding_window: int | None,
    token_bytes: int = 0,
    chunk_bytes: int | None = None,
) -> CpuAttentionPlan:
    """token_bytes: K+V bytes per token in one layer (Hkv * D * itemsize * 2); 0 puts all decodes in one chunk."""
    cu = cu_seqlens_q.tolist()
    seq_lens = seq_lens_k.tolist()
    tables = block_tables.long()
    decode_seqs, prefills = [], []
    for b, seq_len in enumerate(seq_lens):
        q_len = cu[b + 1] - cu[b]
        if q_len == 0:
            continue
        first_key = 0 if sliding_window is None else max(0, seq_len - q_len - sliding_window + 1)
        first_col = first_key // block_size
        num_cols = (seq_len + block_size - 1) // block_size - first_col
        if q_len == 1:
            decode_seqs.append((b, first_col, num_cols))
            continue
        ids = tables[b, first_col : first_col + num_cols]
        mask = None
        if not (first_col == 0 and seq_len == q_len and sliding_window is None):
            query_pos = torch.arange(seq_len - q_len, seq_len)[:, None]
            key_pos = torch.arange(first_col * block_size, (first_col + num_cols) * block_size)[None, :]
            mask = _visible(query_pos, key_pos, sliding_window)
        prefills.append(PrefillSeq(cu[b], q_len, ids, mask, seq_len - first_col * block_size))
    decodes = [
        _plan_decode(chunk, tables, cu, seq_lens, block_size, sliding_window)
        for chunk in _decode_chunks(decode_seqs, block_size * token_bytes, chunk_bytes or DECODE_CHUNK_BYTES)
    ]
    return CpuAttentionPlan(block_size, tuple(decodes), tuple(prefills), validated=False)


def _decode_chunks(decode_seqs: list, block_bytes: int, chunk_bytes: int) -> list[list]:
    """Longest first, so each chunk pads to similar lengths; a chunk holds at least one sequence."""
    ordered = sorted(decode_seqs, key=lambda s: -s[2])
    chunks: list[list] = []
    for seq in ordered:
        # the chunk's first sequence is its longest: every row of the chunk is padded to its length
        if chunks and (len(chunks[-1]) + 1) * chunks[-1][0][2] * block_bytes <= chunk_bytes:
            chunks[-1].append(seq)
        else:
            chunks.append([seq])
    return chunks


def _plan_decode(decode_seqs, tables, cu, seq_lens, block_size, sliding_window) -> DecodeGroup:
    seqs = torch.tensor([b for b, _, _ in decode_seqs])
    first_cols = torch.tensor([c for _, c, _ in decode_seqs])
    counts = torch.tensor([n for _, _, n in decode_seqs])
    num_cols = int(counts.max())
    cols = first_cols[:, None] + torch.arange(num_cols)[None, :]  # [n, num_cols]
    in_range = cols < (first_cols + counts)[:, None]
    block_ids = torch.where(in_range, tables[seqs[:, None], cols.clamp(max=tables.shape[1] - 1)], 0)
    query_pos = torch.tensor([seq_lens[b] - 1 for b, _, _ in decode_seqs])[:, None]  # [n, 1]
    key_pos = first_cols[:, None] * block_size + torch.arange(num_cols * block_size)[None, :]  # [n, L]
    mask = _visible(query_pos, key_pos, sliding_window)
    dead = (key_pos > query_pos).flatten().nonzero().flatten()
    mask = None if bool(mask.all()) else mask[:, None, None, :]
    q_rows = torch.tensor([cu[b] for b, _, _ in decode_seqs])
    return DecodeGroup(q_rows, block_ids.flatten(), num_cols, mask, dead if dead.numel() else None)


class _PlanCache:
    """The last plan, keyed on the metadata's content (not identity: callers may rebuild equal tensors)."""

    def __init__(self) -> None:
        self._entry = None

    def get(self, key: tuple, block_tables, cu_seqlens_q, seq_lens_k) -> CpuAttentionPlan | None:
        entry = self._entry
        if entry is None or entry[0] != key:
            return None
        _, tables, cu, lens, plan = entry
        same = torch.equal(tables, block_tables) and torch.equal(cu, cu_seqlens_q) and torch.equal(lens, seq_lens_k)
        return plan if same else None

    def put(self, key: tuple, block_tables, cu_seqlens_q, seq_lens_k, plan: CpuAttentionPlan) -> None:
        self._entry = (key, block_tables.clone(), cu_seqlens_q.clone(), seq_lens_k.clone(), plan)


_plans = _PlanCache()
_scratch = threading.local()


def cached_plan(q, k_cache, block_tables, cu_seqlens_q, seq_lens_k, sliding_window) -> CpuAttentionPlan:
    """Validate (unless trusted) and plan, once per distinct metadata."""
    gathered = 4 if k_cache.dtype == torch.int8 else k_cache.element_size()  # int8 rows are gathered into fp32
    token_bytes = 2 * k_cache.shape[2] * cache_head_dim(k_cache) * gathered
    key = (k_cache.shape[0], k_cache.shape[1], token_bytes, q.shape[0], tuple(block_tables.shape), sliding_window)
    plan = _plans.get(key, block_tables, cu_seqlens_q, seq_lens_k)
    must_validate = not values_trusted()
    if plan is not None and (plan.validated or not must_validate):
        return plan
    if must_validate:
        check_attention_values(q, k_cache, block_tables, cu_seqlens_q, seq_lens_k)
    plan = plan_cpu_attention(block_tables, cu_seqlens_q, seq_lens_k, k_cache.shape[1], sliding_window, token_bytes)
    plan = CpuAttentionPlan(plan.block_size, plan.decodes, plan.prefills, validated=must_validate)
    _plans.put(key, block_tables, cu_seqlens_q, seq_lens_k, plan)
    return plan


def _gather(cache: torch.Tensor, block_ids: torch.Tensor, slot: str) -> torch.Tensor:
    """cache [N, bs, Hkv, D], block_ids [m] -> [m * bs, Hkv, D] in reused per-thread scratch."""
    num_blocks, block_size, num_kv_heads, head_dim = cache.shape
    numel = block_ids.numel() * block_size * num_kv_heads * head_dim
    # Separate buffers inside and outside inference mode: an inference tensor cannot be written outside it.
    slot = f"{slot}_inference" if torch.is_inference_mode_enabled() else slot
    buf = getattr(_scratch, slot, None)
    if buf is None or buf.dtype != cache.dtype or buf.device != cache.device or buf.numel() < numel:
        buf = torch.empty(numel, dtype=cache.dtype, device=cache.device)
        setattr(_scratch, slot, buf)
    out = buf[:numel].view(block_ids.numel(), block_size * num_kv_heads * head_dim)
    torch.index_select(cache.view(num_blocks, -1), 0, block_ids, out=out)
    if cache.dtype == torch.int8:  # rows of head_dim + 8 bytes: dequantized (fp32) after the gather
        return dequantize_kv(out.view(-1, num_kv_heads, head_dim))
    return out.view(-1, num_kv_heads, head_dim)


def _attend(q, k, v, mask, scale, softcap, is_causal=False):
    """q [n, Hq, Mq, D], k/v [n, Hkv, L, D] -> [n, Hq, Mq, D].

    mask: bool, [Mq, L] or [n, 1, 1, L]; `is_causal` means top-left causal (query i sees keys <= i).
    """
    num_q_heads, num_kv_heads = q.shape[1], k.shape[1]
    if softcap is None:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale, enable_gqa=num_q_heads != num_kv_heads
        )
    n, _, q_len, head_dim = q.shape
    group = num_q_heads // num_kv_heads
    compute = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    qc = q.to(compute).reshape(n, num_kv_heads, group * q_len, head_dim)  # heads of a group are adjacent
    scores = torch.matmul(qc, k.to(compute).transpose(-1, -2)) * scale  # [n, Hkv, G * Mq, L]
    scores = (softcap * torch.tanh(scores / softcap)).view(n, num_kv_heads, group, q_len, -1)
    if is_causal:
        mask = torch.ones(q_len, scores.shape[-1], dtype=torch.bool).tril()
    if mask is not None:
        scores = scores.masked_fill(~(mask[:, :, None] if mask.dim() == 4 else mask), float("-inf"))
    probs = scores.softmax(dim=-1).view(n, num_kv_heads, group * q_len, -1)
    return torch.matmul(probs, v.to(compute)).view(n, num_q_heads, q_len, head_dim).to(q.dtype)


def run_cpu_attention(q, k_cache, v_cache, plan: CpuAttentionPlan, scale, softcap, out=None) -> torch.Tensor:
    """q [T, Hq, D] -> out [T, Hq, D]; every row belongs to exactly one sequence of the plan."""
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_q_heads // num_kv_heads
    if out is None:
        out = torch.empty(num_tokens, num_q_heads, head_dim, dtype=q.dtype, device=q.device)
    for decode in plan.decodes:
        n = decode.q_rows.numel()
        k, v = _gather(k_cache, decode.block_ids, "k"), _gather(v_cache, decode.block_ids, "v")  # [rows, Hkv, D]
        if decode.dead_rows is not None:
            k.index_fill_(0, decode.dead_rows, 0)
            v.index_fill_(0, decode.dead_rows, 0)
        k = k.view(n, -1, num_kv_heads, head_dim).transpose(1, 2)  # [n, Hkv, L, D]
        v = v.view(n, -1, num_kv_heads, head_dim).transpose(1, 2)
        qd = q[decode.q_rows].view(n, num_kv_heads, group, head_dim)  # GQA group folded into query rows
        out[decode.q_rows] = _attend(qd, k, v, decode.mask, scale, softcap).reshape(n, num_q_heads, head_dim)
    for seq in plan.prefills:
        rows = slice(seq.q_start, seq.q_start + seq.q_len)
        k, v = _gather(k_cache, seq.block_ids, "k"), _gather(v_cache, seq.block_ids, "v")  # [L, Hkv, D]
        k[seq.live_rows :] = 0
        v[seq.live_rows :] = 0
        k, v = k.transpose(0, 1)[None], v.transpose(0, 1)[None]  # [1, Hkv, L, D]
        qs = q[rows].transpose(0, 1)[None]  # [1, Hq, q_len, D]
        res = _attend(qs, k, v, seq.mask, scale, softcap, is_causal=seq.mask is None)
        out[rows] = res[0].transpose(0, 1)
    return out


def torch_paged_attention(
    q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens_k, scale, sliding_window=None, softcap=None, out=None
) -> torch.Tensor:
    """The torch path of `pensieve::paged_attention` (values validated unless trusted; shapes are the caller's)."""
    plan = cached_plan(q, k_cache, block_tables, cu_seqlens_q, seq_lens_k, sliding_window)
    return run_cpu_attention(q, k_cache, v_cache, plan, scale, softcap, out=out)


def torch_write_kv(k, v, k_cache, v_cache, slot_mapping) -> None:
    """The torch path of `pensieve::write_kv` (slots validated unless trusted; shapes are the caller's)."""
    if not values_trusted():
        check_write_values(k_cache, slot_mapping)
    valid = slot_mapping >= 0
    slots = slot_mapping[valid]
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    if k_cache.dtype == torch.int8:
        k, v = quantize_kv(k), quantize_kv(v)
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, k[valid])
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, v[valid])
