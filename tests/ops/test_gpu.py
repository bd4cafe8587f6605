"""The ops on a real GPU: the CUDA dispatch goes to Triton. Skipped cleanly without CUDA."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pensieve.ops import paged_attention, write_kv
from pensieve.ops.reference import reference_paged_attention, reference_write_kv
from tests.ops.cases import cases

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def _cuda(case):
    for name in ("q", "k_cache", "v_cache", "block_tables", "cu_seqlens_q", "seq_lens_k"):
        setattr(case, name, getattr(case, name).cuda())
    return case


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@settings(max_examples=60)
@given(data=st.data())
def test_op_on_cuda_matches_reference(dtype, data):
    case = _cuda(data.draw(cases(dtype=dtype)))
    out = paged_attention(*case.args(), **case.kwargs())
    assert out.is_cuda and not out.isnan().any()
    ref = reference_paged_attention(*(t.cpu() if torch.is_tensor(t) else t for t in case.args()), **case.kwargs())
    torch.testing.assert_close(out.double().cpu(), ref, atol=TOL[dtype], rtol=TOL[dtype])


def test_write_kv_on_cuda():
    torch.manual_seed(0)
    k_cache = torch.full((8, 16, 2, 64), float("nan"), device="cuda", dtype=torch.bfloat16)
    v_cache = torch.zeros_like(k_cache)
    k = torch.randn(20, 2, 64, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    slots = torch.randperm(128, device="cuda")[:20]
    slots[::3] = -1
    want_k, want_v = reference_write_kv(k.cpu(), v.cpu(), k_cache.cpu(), v_cache.cpu(), slots.cpu())
    write_kv(k, v, k_cache, v_cache, slots)
    torch.testing.assert_close(k_cache.cpu(), want_k, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(v_cache.cpu(), want_v, rtol=0, atol=0, equal_nan=True)


def test_cuda_graph_replay_follows_new_metadata():
    """Capture a decode step once; replay with other block tables / lengths written into the same buffers."""
    torch.manual_seed(0)
    num_seqs, block_size, max_blocks = 4, 16, 8
    k_cache = torch.randn(64, block_size, 2, 64, device="cuda", dtype=torch.float16)
    v_cache = torch.randn_like(k_cache)
    q = torch.randn(num_seqs, 8, 64, device="cuda", dtype=torch.float16)
    tables = torch.zeros(num_seqs, max_blocks, dtype=torch.int32, device="cuda")
    cu = torch.arange(num_seqs + 1, dtype=torch.int32, device="cuda")
    lens = torch.ones(num_seqs, dtype=torch.int32, device="cuda")
    out = torch.empty_like(q)
    paged_attention(q, k_cache, v_cache, tables, cu, lens, 0.125)  # warm up / compile outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out.copy_(paged_attention(q, k_cache, v_cache, tables, cu, lens, 0.125))
    for trial in range(3):
        tables.copy_(torch.randperm(64, device="cuda")[: num_seqs * max_blocks].view(num_seqs, max_blocks).int())
        lens.copy_(torch.randint(1, max_blocks * block_size + 1, (num_seqs,), device="cuda", dtype=torch.int32))
        q.normal_()
        graph.replay()
        ref = reference_paged_attention(
            q.cpu(), k_cache.cpu(), v_cache.cpu(), tables.cpu(), cu.cpu(), lens.cpu(), 0.125
        )
        torch.testing.assert_close(out.double().cpu(), ref, atol=4e-3, rtol=4e-3, msg=f"replay {trial}")
