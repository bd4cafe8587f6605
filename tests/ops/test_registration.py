"""The ops as torch.library ops: opcheck, and torch.compile(fullgraph=True) against eager."""

import torch

import pensieve.ops  # noqa: F401  (registers torch.ops.pensieve.*)
from pensieve.ops import paged_attention, write_kv


def _problem(dtype=torch.float32):
    torch.manual_seed(0)
    k_cache = torch.randn(10, 4, 2, 32, dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    block_tables = torch.tensor([[7, 2, 9, 0], [4, 1, 0, 0]], dtype=torch.int32)
    cu_seqlens_q = torch.tensor([0, 1, 6], dtype=torch.int32)
    seq_lens_k = torch.tensor([13, 7], dtype=torch.int32)
    q = torch.randn(6, 4, 32, dtype=dtype)
    return q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens_k


def test_opcheck_paged_attention():
    args = (*_problem(), 32**-0.5)
    torch.library.opcheck(torch.ops.pensieve.paged_attention.default, args)
    torch.library.opcheck(torch.ops.pensieve.paged_attention.default, args, {"sliding_window": 3, "softcap": 20.0})


def test_opcheck_write_kv():
    _, k_cache, v_cache, *_ = _problem()
    k, v = torch.randn(3, 2, 32), torch.randn(3, 2, 32)
    torch.library.opcheck(torch.ops.pensieve.write_kv.default, (k, v, k_cache, v_cache, torch.tensor([5, -1, 30])))


def _step(q, k_new, v_new, k_cache, v_cache, slots, block_tables, cu_seqlens_q, seq_lens_k):
    write_kv(k_new, v_new, k_cache, v_cache, slots)
    return paged_attention(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens_k, 0.125, sliding_window=8)


def test_compile_fullgraph_matches_eager_and_writes_are_visible():
    q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens_k = _problem()
    # the new tokens' K/V go to their positions' slots: seq 0 pos 12 -> block 0 (slot 0);
    # seq 1 pos 2, 3 -> block 4 (slots 18, 19), pos 4, 5, 6 -> block 1 (slots 4, 5, 6)
    slots = torch.tensor([0, 18, 19, 4, 5, 6])
    k_new, v_new = torch.randn(6, 2, 32), torch.randn(6, 2, 32)
    eager_k, eager_v = k_cache.clone(), v_cache.clone()
    expected = _step(q, k_new, v_new, eager_k, eager_v, slots, block_tables, cu_seqlens_q, seq_lens_k)
    compiled = torch.compile(_step, fullgraph=True)
    got = compiled(q, k_new, v_new, k_cache, v_cache, slots, block_tables, cu_seqlens_q, seq_lens_k)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(k_cache, eager_k, rtol=0, atol=0)
    torch.testing.assert_close(v_cache, eager_v, rtol=0, atol=0)
    assert torch.equal(k_cache.view(-1, 2, 32)[slots], k_new)
