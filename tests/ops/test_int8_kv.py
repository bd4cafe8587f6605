"""int8 KV (pensieve/ops/quant.py): write_kv quantizes exactly as `quantize_kv` defines it (bit for bit, every other
slot untouched), and every attention path on an int8 cache matches the float64 reference over the dequantized cache.
Rows outside a sequence's history carry a NaN scale and minimum (poison): a path that reads one returns NaN."""

import importlib.util
import os

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from pensieve.ops import cpu_kernel, paged_attention, triton_paged_attention, triton_write_kv, write_kv
from pensieve.ops.cpu_paged import torch_paged_attention, torch_write_kv
from pensieve.ops.quant import dequantize_kv, quantize_kv, row_bytes
from pensieve.ops.reference import reference_paged_attention, reference_write_kv
from tests.ops.cases import Case, cases, cpp_into_poison

needs_cpp = pytest.mark.skipif(not cpu_kernel.load(), reason="the C++ CPU kernels could not be built here")
TOL = 2e-5  # fp32 arithmetic over the same dequantized numbers


def test_quantize_round_trip_is_within_half_a_step_and_constant_rows_are_exact():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(50, 3, 64, generator=gen) * torch.rand(50, 3, 1, generator=gen) * 10
    x += torch.randn(50, 3, 1, generator=gen) * 5  # rows off centre: what the zero point is for
    x[7, 1] = 0
    x[8, 2] = -3.25
    packed = quantize_kv(x)
    assert packed.shape == (50, 3, 72) and packed.dtype == torch.int8
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    step = (hi - lo) / 255
    assert ((dequantize_kv(packed) - x).abs() <= step / 2 + 1e-6 * hi.abs().clamp_min(1)).all()
    assert (dequantize_kv(packed)[7, 1] == 0).all() and (dequantize_kv(packed)[8, 2] == -3.25).all()
    q = packed[..., :64]
    assert q.min() == -128 and q.max() == 127  # all 256 levels: each row's minimum and maximum are its ends
    assert ((q == -128).any(-1) & ((q == 127).any(-1) | (step.squeeze(-1) == 0))).all()
    # each row's end points come back within rounding of fp32, not within half a step
    torch.testing.assert_close(dequantize_kv(packed).amin(-1), lo.squeeze(-1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dequantize_kv(packed).amax(-1), hi.squeeze(-1), rtol=1e-6, atol=1e-5)
    assert row_bytes(64, "int8") == 72 and row_bytes(64, torch.float32) == 256 and row_bytes(64, "bfloat16") == 128


def test_the_zero_point_halves_the_error_of_an_off_centre_row():
    """A row in [0, 10]: symmetric amax / 127 steps would be 10 / 127, this scheme's are 10 / 255."""
    x = torch.linspace(0, 10, 64).view(1, 64)
    err = (dequantize_kv(quantize_kv(x)) - x).abs().max()
    assert err <= 10 / 255 / 2 + 1e-6 and err < 10 / 127 / 2 / 1.9


@st.composite
def int8_writes(draw):
    num_blocks, block_size = draw(st.integers(1, 10)), draw(st.sampled_from((1, 8, 16)))
    heads, head_dim = draw(st.integers(1, 3)), draw(st.sampled_from((32, 64, 80)))
    num_tokens = draw(st.integers(0, min(num_blocks * block_size, 30)))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[torch.rand(num_tokens, generator=gen) < draw(st.sampled_from((0.0, 0.3)))] = -1
    shape = (num_blocks, block_size, heads, head_dim + 8)
    k_cache = torch.full(shape, -1, dtype=torch.int8)  # poison: as parameters, two NaN floats
    v_cache = torch.randint(-128, 128, shape, generator=gen, dtype=torch.int8)
    scale = draw(st.sampled_from((1e-3, 1.0, 300.0)))
    k = torch.randn(num_tokens, heads, head_dim, generator=gen) * scale
    v = (torch.randn(heads, num_tokens, head_dim, generator=gen) * scale).transpose(0, 1)  # strided
    k += torch.randn(num_tokens, heads, 1, generator=gen) * scale  # off centre
    if num_tokens:
        k[0, 0] = 0  # a zero row: scale 0
    if num_tokens > 1:
        k[1, 0] = -scale  # a constant row
    return k, v, k_cache, v_cache, slots.long()


@pytest.mark.parametrize("impl", ["op", "torch"])
@given(problem=int8_writes())
def test_write_kv_quantizes_bit_for_bit_and_leaves_other_slots(impl, problem):
    k, v, k_cache, v_cache, slots = problem
    want_k, want_v = reference_write_kv(k, v, k_cache, v_cache, slots)
    (write_kv if impl == "op" else torch_write_kv)(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)


def _quantized(case: Case) -> Case:
    """The case over int8 caches (q float32); rows outside every history keep a NaN scale and minimum."""
    return Case(
        case.q.float(), quantize_kv(case.k_cache), quantize_kv(case.v_cache), case.block_tables, case.cu_seqlens_q,
        case.seq_lens_k, case.scale, case.sliding_window, case.softcap,
    )  # fmt: skip


def _check(out: torch.Tensor, case: Case) -> None:
    ref = reference_paged_attention(
        case.q, dequantize_kv(case.k_cache), dequantize_kv(case.v_cache), *case.args()[3:], **case.kwargs()
    )
    assert out.dtype == torch.float32 and not out.isnan().any(), "a row unwritten or a poisoned row read"
    torch.testing.assert_close(out.double(), ref, atol=TOL, rtol=TOL)


@needs_cpp
@given(cases(dtype=torch.float32, head_dims=(32, 36, 64, 80, 128)), st.sampled_from((1, 2)))
def test_cpp_kernel_on_an_int8_cache_matches_the_reference_over_its_dequantized_rows(case, threads):
    """Decodes, prefills (the gather + SDPA path past 16 queries), long split histories, windows, softcaps."""
    case = _quantized(case)
    _check(cpp_into_poison(case, threads), case)


@given(cases(dtype=torch.float32))
def test_the_op_and_the_torch_path_on_an_int8_cache(case):
    case = _quantized(case)
    _check(paged_attention(*case.args(), **case.kwargs()), case)
    _check(torch_paged_attention(*case.args(), case.sliding_window, case.softcap), case)


def test_an_int8_cache_refuses_other_q_dtypes_and_shapes():
    cache = torch.zeros(2, 4, 1, 72, dtype=torch.int8)
    args = (torch.ones(1, dtype=torch.int32).view(1, 1) * 0, torch.tensor([0, 1], dtype=torch.int32),
            torch.tensor([1], dtype=torch.int32), 0.125)  # fmt: skip
    with pytest.raises(ValueError, match="float32"):
        paged_attention(torch.zeros(1, 2, 64, dtype=torch.bfloat16), cache, cache, *args)
    with pytest.raises(ValueError, match="head_dim"):
        paged_attention(torch.zeros(1, 2, 72), cache, cache, *args)
    with pytest.raises(ValueError, match="float32"):
        write_kv(torch.zeros(1, 1, 64, dtype=torch.float64), torch.zeros(1, 1, 64, dtype=torch.float64), cache,
                 cache, torch.zeros(1, dtype=torch.long))  # fmt: skip
    if cpu_kernel.load():
        with pytest.raises(ValueError, match="float32"):
            torch.ops.pensieve_cpu.paged_attention(torch.zeros(1, 2, 64, dtype=torch.bfloat16), cache, cache, *args)


needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None
    or (not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"),
    reason="Triton on CPU tensors needs TRITON_INTERPRET=1 (and the gpu extra)",
)


@needs_triton
@given(problem=int8_writes())
def test_triton_write_kv_quantizes_bit_for_bit(problem):
    k, v, k_cache, v_cache, slots = problem
    want_k, want_v = reference_write_kv(k, v, k_cache, v_cache, slots)
    triton_write_kv(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)


@needs_triton
@given(cases(dtype=torch.float32))
def test_triton_attention_on_an_int8_cache(case):
    case = _quantized(case)
    _check(triton_paged_attention(*case.args(), **case.kwargs(), out=torch.full(case.q.shape, float("nan"))), case)


def _ties() -> tuple[torch.Tensor, torch.Tensor]:
    """A row whose scale is exactly 1 (min 0, max 255) holding halves: round half to even decides every value."""
    row = torch.tensor([255.0, 0.0, 2.5, 3.5, 0.5, 1.5, 126.5, 127.5, 254.5, 253.5] + [7.0] * 6)
    want = torch.tensor([255, 0, 2, 4, 0, 2, 126, 128, 254, 254] + [7] * 6) - 128
    return row.view(1, 1, 16), want.to(torch.int8)


@pytest.mark.parametrize("impl", ["cpp", "torch", "triton"])
def test_every_write_path_rounds_half_to_even_and_poisons_non_finite_rows(impl):
    if impl == "cpp" and not cpu_kernel.load():
        pytest.skip("the C++ CPU kernels could not be built here")
    if impl == "triton" and (importlib.util.find_spec("triton") is None or os.environ.get("TRITON_INTERPRET") != "1"):
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1")
    write = {"cpp": torch.ops.pensieve_cpu.write_kv if cpu_kernel.load() else None, "torch": torch_write_kv,
             "triton": triton_write_kv}[impl]  # fmt: skip
    row, want = _ties()
    bad = torch.full((1, 1, 16), 1.0)
    bad[0, 0, 3] = float("nan")
    k = torch.cat([row, bad, bad.nan_to_num(nan=float("inf"))])  # [3, 1, 16]
    k_cache, v_cache = (torch.zeros(1, 4, 1, 24, dtype=torch.int8) for _ in "kv")
    write(k, k.clone(), k_cache, v_cache, torch.arange(3))
    assert torch.equal(k_cache[0, 0, 0, :16], want) and dequantize_kv(k_cache[0, 0, 0])[0] == 255
    assert k_cache[0, 0, 0, 16:].view(torch.float32).tolist() == [1.0, 0.0]  # scale, minimum
    assert torch.equal(quantize_kv(row)[0, 0, :16], want)  # the definition agrees
    for slot in (1, 2):
        assert dequantize_kv(k_cache[0, slot]).isnan().all() and (k_cache[0, slot, 0, :16] == -128).all()
    assert (k_cache[0, 3] == 0).all()  # the unwritten slot
