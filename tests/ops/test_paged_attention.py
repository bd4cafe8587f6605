"""The CPU op (C++ kernels), the C++ kernel with a poisoned output at several thread counts, the torch fallback path
and the Triton launcher, against the float64 reference on random paged problems."""

import os

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from pensieve.ops import cpu_kernel, paged_attention, triton_paged_attention
from pensieve.ops.cpu_paged import _decode_chunks, plan_cpu_attention, run_cpu_attention, torch_paged_attention
from pensieve.ops.reference import reference_paged_attention
from tests.ops.cases import Case, cases, cpp_into_poison

TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}

needs_cpp = pytest.mark.skipif(not cpu_kernel.load(), reason="the C++ CPU kernels could not be built here")


def _check(out: torch.Tensor, case: Case) -> None:
    ref = reference_paged_attention(*case.args(), **case.kwargs())
    assert out.shape == case.q.shape
    assert not out.isnan().any(), "a row was left unwritten (poison) or read poisoned KV"
    torch.testing.assert_close(out.double(), ref, atol=TOL[case.q.dtype], rtol=TOL[case.q.dtype])


def _poisoned(case: Case) -> torch.Tensor:
    return torch.full(case.q.shape, float("nan"), dtype=case.q.dtype)


@given(cases(dtype=torch.float64))
def test_cpu_op_float64(case):
    _check(paged_attention(*case.args(), **case.kwargs()), case)


@needs_cpp
@given(cases(dtype=torch.float64, head_dims=(16, 32, 36, 64, 80, 128)), st.sampled_from((1, 2, 3)))
def test_cpp_kernel_writes_every_row_at_any_thread_count(case, threads):
    """Thread counts change how key ranges are split and dealt out; head dims 16..128 take every vector-count path
    (36 is not a multiple of any vector width: the generic path with a masked last vector)."""
    _check(cpp_into_poison(case, threads), case)


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@given(data=st.data())
def test_cpp_kernel_low_precision(dtype, data):
    case = data.draw(cases(dtype=dtype))
    _check(cpp_into_poison(case, 2), case)


@given(cases(dtype=torch.float64))
def test_torch_path_float64(case):
    _check(torch_paged_attention(*case.args(), **case.kwargs()), case)


@given(cases(dtype=torch.float64), st.sampled_from((None, 1)))
def test_torch_path_writes_every_row(case, chunk_bytes):
    """chunk_bytes=1 puts every decode sequence in a chunk of its own."""
    plan = plan_cpu_attention(
        case.block_tables,
        case.cu_seqlens_q,
        case.seq_lens_k,
        case.k_cache.shape[1],
        case.sliding_window,
        token_bytes=2 * case.k_cache[0, 0].numel() * case.k_cache.element_size(),
        chunk_bytes=chunk_bytes,
    )
    out = run_cpu_attention(case.q, case.k_cache, case.v_cache, plan, case.scale, case.softcap, out=_poisoned(case))
    _check(out, case)


def test_decode_chunks_longest_first_within_budget():
    # (seq index, first column, number of columns)
    seqs = [(0, 0, 2), (1, 0, 5), (2, 0, 1), (3, 0, 5), (4, 0, 3)]
    chunks = _decode_chunks(seqs, block_bytes=10, chunk_bytes=100)
    assert [[s[0] for s in c] for c in chunks] == [[1, 3], [4, 0, 2]]  # 2 * 5 * 10 <= 100; 3 * 3 * 10 <= 100
    assert [[s[0] for s in c] for c in _decode_chunks(seqs, 10, 1)] == [[1], [3], [4], [0], [2]]
    assert len(_decode_chunks(seqs, 0, 100)) == 1


@pytest.mark.parametrize("impl", [paged_attention, torch_paged_attention], ids=["op", "torch_path"])
@given(data=st.data())
def test_float32(impl, data):
    case = data.draw(cases(dtype=torch.float32))
    _check(impl(*case.args(), **case.kwargs()), case)


@needs_cpp
def test_amx_kernels_run_where_oneDNN_runs_amx():
    """Where oneDNN packs bf16 for AMX here, pensieve's own AMX paths (bf16 scores with block sizes of 16k and head
    dims of 32k, bf16 linears of 1..32 rows) must be the ones the bf16 tests exercise, not a silent fallback."""
    if not torch.ops.pensieve_cpu.brgemm_bf16():
        pytest.skip("no AMX for bf16 here")
    assert torch.ops.pensieve_cpu.uses_amx() == (os.environ.get("PENSIEVE_CPU_AMX") != "0")


@pytest.mark.parametrize("impl", [paged_attention, torch_paged_attention], ids=["op", "torch_path"])
@given(data=st.data())
def test_bfloat16(impl, data):
    case = data.draw(cases(dtype=torch.bfloat16, head_dims=(64,), block_sizes=(16,)))
    _check(impl(*case.args(), **case.kwargs()), case)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@given(data=st.data())
def test_triton_launcher(dtype, data):
    case = data.draw(cases(dtype=dtype))
    if case.q.is_cuda is False and not _interpreting():
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1")
    _check(triton_paged_attention(*case.args(), **case.kwargs(), out=_poisoned(case)), case)


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET") == "1"


def test_plan_is_reused_across_layers_and_invalidated_by_content():
    torch.manual_seed(0)
    from pensieve.ops import cpu_paged

    k_cache = torch.randn(8, 4, 1, 32, dtype=torch.float64)
    v_cache = torch.randn_like(k_cache)
    tables = torch.tensor([[3, 5, 0]], dtype=torch.int32)
    cu = torch.tensor([0, 1], dtype=torch.int32)
    lens = torch.tensor([9], dtype=torch.int32)
    q = torch.randn(1, 2, 32, dtype=torch.float64)
    torch_paged_attention(q, k_cache, v_cache, tables, cu, lens, 0.2)
    first = cpu_paged._plans._entry[-1]
    torch_paged_attention(q, k_cache, v_cache, tables.clone(), cu.clone(), lens.clone(), 0.2)
    assert cpu_paged._plans._entry[-1] is first  # equal content: same plan
    tables[0, 2] = 7  # same tensor object, new content: must re-plan
    out = torch_paged_attention(q, k_cache, v_cache, tables, cu, lens, 0.2)
    assert cpu_paged._plans._entry[-1] is not first
    case = Case(q, k_cache, v_cache, tables, cu, lens, 0.2, None, None)
    _check(out, case)


def test_alternating_inference_mode_and_plain_calls():
    """Scratch reused across modes once made an inference tensor that plain calls could not write."""
    from pensieve.ops import cpu_paged

    cpu_paged._scratch.__dict__.clear()  # the first buffer is made inside inference mode
    case = Case(*_small_problem(), 0.2, None, None)
    with torch.inference_mode():
        inside = torch_paged_attention(*case.args())
    _check(torch_paged_attention(*case.args()), case)
    _check(inside.clone(), case)


def _small_problem():
    torch.manual_seed(1)
    k_cache = torch.randn(6, 4, 1, 32, dtype=torch.float64)
    tables = torch.tensor([[3, 5], [1, 0]], dtype=torch.int32)
    cu = torch.tensor([0, 1, 2], dtype=torch.int32)
    lens = torch.tensor([7, 3], dtype=torch.int32)
    return torch.randn(2, 2, 32, dtype=torch.float64), k_cache, torch.randn_like(k_cache), tables, cu, lens
