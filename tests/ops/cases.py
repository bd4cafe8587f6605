"""Random paged-attention problems for the kernel tests: block tables permuted through a pool, unused and
trailing blocks, every slot outside a sequence's history poisoned with NaN."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hypothesis import strategies as st

KINDS = ("decode", "prefill", "mixed", "full", "long_history")


@dataclass
class Case:
    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    block_tables: torch.Tensor
    cu_seqlens_q: torch.Tensor
    seq_lens_k: torch.Tensor
    scale: float
    sliding_window: int | None
    softcap: float | None

    def args(self):
        return (self.q, self.k_cache, self.v_cache, self.block_tables, self.cu_seqlens_q, self.seq_lens_k, self.scale)

    def kwargs(self):
        return {"sliding_window": self.sliding_window, "softcap": self.softcap}


def _lengths(draw, kind: str, num_seqs: int) -> list[tuple[int, int]]:
    """(q_len, seq_len) per sequence."""
    out = []
    for _ in range(num_seqs):
        k = draw(st.sampled_from(("decode", "prefill", "full"))) if kind == "mixed" else kind
        if k == "decode":
            seq_len = draw(st.integers(1, 150))
            out.append((draw(st.sampled_from((1, 1, 1, 0))) if kind == "mixed" else 1, seq_len))
        elif k == "long_history":  # long enough for the C++ kernel to split the keys (>= 2 x kMinSplitKeys)
            out.append((draw(st.sampled_from((1, 1, 3, 16))), draw(st.integers(300, 700))))
        elif k == "full":
            seq_len = draw(st.integers(1, 90))
            out.append((seq_len, seq_len))
        else:
            seq_len = draw(st.integers(2, 160))
            out.append((draw(st.integers(2, seq_len)), seq_len))
    return out


@st.composite
def cases(draw, dtype=torch.float64, head_dims=(32, 36, 64, 80, 128), block_sizes=(1, 8, 16, 32)) -> Case:
    kind = draw(st.sampled_from(KINDS))
    block_size = draw(st.sampled_from(block_sizes))
    head_dim = draw(st.sampled_from(head_dims))
    num_kv_heads = draw(st.integers(1, 3))
    group = draw(st.integers(1, 8))
    num_seqs = draw(st.integers(1, 2 if kind == "long_history" else 5))
    lengths = _lengths(draw, kind, num_seqs)
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)

    blocks_needed = [(s + block_size - 1) // block_size for _, s in lengths]
    num_blocks = sum(blocks_needed) + draw(st.integers(0, 8))
    max_blocks = max(blocks_needed) + draw(st.integers(0, 3))
    perm = torch.randperm(num_blocks, generator=gen)
    # Entries past a sequence's blocks are garbage the kernels must never read.
    block_tables = torch.randint(-5, 10 * num_blocks + 5, (num_seqs, max_blocks), generator=gen, dtype=torch.int32)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.full(shape, float("nan"), dtype=dtype)
    v_cache = torch.full(shape, float("nan"), dtype=dtype)
    used = 0
    for b, (_, seq_len) in enumerate(lengths):
        ids = perm[used : used + blocks_needed[b]]
        used += blocks_needed[b]
        block_tables[b, : blocks_needed[b]] = ids.int()
        pos = torch.arange(seq_len)
        rows = (ids[pos // block_size], pos % block_size)
        k_cache[rows] = torch.randn(seq_len, num_kv_heads, head_dim, generator=gen).to(dtype)
        v_cache[rows] = torch.randn(seq_len, num_kv_heads, head_dim, generator=gen).to(dtype)

    q_lens = torch.tensor([q for q, _ in lengths])
    cu_seqlens_q = torch.cat([torch.zeros(1, dtype=torch.long), q_lens.cumsum(0)]).int()
    num_tokens = int(cu_seqlens_q[-1])
    q_heads = num_kv_heads * group
    if draw(st.booleans()):  # HF hands q over as [B, H, T, D]: a non-contiguous [T, H, D] view
        q = torch.randn(q_heads, num_tokens, head_dim, generator=gen).to(dtype).transpose(0, 1)
    else:
        q = torch.randn(num_tokens, q_heads, head_dim, generator=gen).to(dtype)
    return Case(
        q=q,
        k_cache=k_cache,
        v_cache=v_cache,
        block_tables=block_tables,
        cu_seqlens_q=cu_seqlens_q,
        seq_lens_k=torch.tensor([s for _, s in lengths], dtype=torch.int32),
        scale=head_dim**-0.5,
        sliding_window=draw(st.one_of(st.none(), st.integers(1, 64))),
        softcap=draw(st.one_of(st.none(), st.floats(0.5, 30.0))),
    )


def cpp_into_poison(case: Case, threads: int) -> torch.Tensor:
    """The C++ op's result for case at `threads` threads, written into an output poisoned with NaN."""
    out = torch.full(case.q.shape, float("nan"), dtype=case.q.dtype)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.ops.pensieve_cpu.paged_attention_out(*case.args(), case.sliding_window, case.softcap, out)
    finally:
        torch.set_num_threads(before)
    return out
