"""pensieve_cpu::linear (decode-sized batches) against a float64 reference, and FastLinear in a model."""

import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from pensieve.models.linear import FastLinear, use_fast_linears
from pensieve.ops import cpu_kernel
from tests.tiny import tiny_model

pytestmark = pytest.mark.skipif(not cpu_kernel.load(), reason="the C++ CPU kernels could not be built here")

TOL = {torch.float64: 1e-12, torch.float32: 3e-5, torch.bfloat16: 2e-2}


@st.composite
def problems(draw, dtype):
    rows = draw(st.integers(1, 40))  # across the kernel/at::linear boundary (10 for bf16, 24 otherwise)
    n = draw(st.integers(1, 70))
    k = draw(st.sampled_from((1, 7, 16, 33, 64, 100, 576)))  # vector tails included
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    lead = draw(st.sampled_from(((rows,), (1, rows))))  # HF hands [1, T, K]
    x = torch.randn(*lead, k, generator=gen).to(dtype)
    if draw(st.booleans()) and k > 1:  # a strided view (rows not contiguous)
        x = torch.randn(*lead, 2 * k, generator=gen).to(dtype)[..., ::2]
    weight = torch.randn(n, k, generator=gen).to(dtype)
    bias = torch.randn(n, generator=gen).to(dtype) if draw(st.booleans()) else None
    return x, weight, bias


def _packed(weight):
    """The weight packed for brgemm, or None where brgemm does not run here for its dtype (then linear ignores it)."""
    usable = weight.dtype in (torch.float32, torch.bfloat16) and not (
        weight.dtype == torch.bfloat16 and weight.shape[1] % 2
    )
    if not usable or not torch.ops.pensieve_cpu.can_pack(weight.dtype):
        return None
    return torch.ops.pensieve_cpu.pack_weight(weight)


def _check(x, weight, bias, packed=None):
    out = torch.ops.pensieve_cpu.linear(x, weight, bias, packed)
    ref = x.double() @ weight.double().t() + (bias.double() if bias is not None else 0)
    assert out.shape == ref.shape and out.dtype == x.dtype and not out.isnan().any()
    scale = (x.double().abs() @ weight.double().abs().t()).clamp(min=1)  # the size of the sum's terms
    assert ((out.double() - ref).abs() / scale).max() <= TOL[x.dtype]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@given(data=st.data())
def test_linear_matches_reference(dtype, data):
    _check(*data.draw(problems(dtype)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@given(data=st.data())
def test_packed_linear_matches_reference(dtype, data):
    if not torch.ops.pensieve_cpu.can_pack(dtype):
        pytest.skip(f"brgemm does not run here for {dtype}")
    x, weight, bias = data.draw(problems(dtype))
    if dtype == torch.bfloat16 and weight.shape[1] % 2:
        with pytest.raises(ValueError, match="odd"):  # VNNI packs pairs of K; use_fast_linears leaves such a weight
            torch.ops.pensieve_cpu.pack_weight(weight)
        return
    _check(x, weight, bias, _packed(weight))


def test_packed_linear_covers_row_tiles_and_the_row_bounds():
    """Rows 2..256 (bf16: 1..256) take the packed weight (fp32: 2..16 rows through the FMA loop, every count of
    rows its own kernel; above, brgemm in 32-row tiles; bf16 1..32 rows through pensieve's AMX tiles where this CPU
    has them, one or two row tiles; without AMX, 1..32 rows through the vdpbf16ps loop in balanced tiles of up to 12
    rows and more through widened VNNI blocks, every row count; a padded last column block); fp32's 1 and 257+ do
    not."""
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        if not torch.ops.pensieve_cpu.can_pack(dtype):
            continue
        weight, bias = torch.randn(70, 96, generator=gen).to(dtype), torch.randn(70, generator=gen).to(dtype)
        packed = torch.ops.pensieve_cpu.pack_weight(weight)
        assert packed.shape == (3, 96 * 32)
        for rows in (*range(1, 18), 24, 25, 31, 32, 33, 65, 256, 257, 300):
            _check(torch.randn(rows, 96, generator=gen).to(dtype), weight, bias, packed)


def test_amx_linear_leaves_aten_brgemm_and_sdpa_correct():
    """pensieve's AMX linear loads tile configurations of its own, between ATen's brgemm calls (its packed-linear
    path here, and its bf16 SDPA): they alternate on one thread, with shapes that keep brgemm's cached kernel, every
    result against float64. ATen's brgemm remembers which configuration it loaded last on a thread; the AMX kernel
    releases its tiles and clears that. (Measured: ATen's callers release after themselves as well, so a kernel that
    skipped the clearing passes this today; the test guards the interleaving, not that one line.)"""
    if not torch.ops.pensieve_cpu.uses_amx():
        pytest.skip("pensieve's AMX kernels do not run here")
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(64, 96, generator=gen).bfloat16()
    packed = torch.ops.pensieve_cpu.pack_weight(weight)
    q, k, v = (torch.randn(1, 2, 300, 32, generator=gen).bfloat16() for _ in range(3))
    ref_attn = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True)
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # every call on this thread
    try:
        for rows in (40, 8, 40, 20, 8, 40, 20):  # 40: brgemm (ATen's tiles); 8, 20: AMX (pensieve's)
            _check(torch.randn(rows, 96, generator=gen).bfloat16(), weight, None, packed)
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            torch.testing.assert_close(out.double(), ref_attn, atol=3e-2, rtol=3e-2)
    finally:
        torch.set_num_threads(before)


def test_packed_linear_rejects_a_packed_weight_of_another_shape():
    if not torch.ops.pensieve_cpu.can_pack(torch.float32):
        pytest.skip("brgemm does not run here for fp32")
    packed = torch.ops.pensieve_cpu.pack_weight(torch.randn(40, 16))
    with pytest.raises(ValueError, match="does not hold"):
        torch.ops.pensieve_cpu.linear(torch.randn(4, 16), torch.randn(70, 16), None, packed)
    with pytest.raises(ValueError, match="odd"):
        torch.ops.pensieve_cpu.pack_weight(torch.randn(4, 7).bfloat16())
    assert not torch.ops.pensieve_cpu.can_pack(torch.float64)


def test_bf16_packs_wherever_fp32_does():
    """bf16 weights pack in VNNI pairs where the CPU has bf16 dot products (read by AMX, oneDNN's brgemm or
    pensieve's vdpbf16ps loop), and into fp32's plain blocks, widened per block when used, where it has not (AVX2):
    either way bf16 is not left to at::linear, whose bf16 GEMM without them is a generic loop (~10x slower than fp32
    there; docs/performance-log.md)."""
    assert torch.ops.pensieve_cpu.can_pack(torch.bfloat16) == torch.ops.pensieve_cpu.can_pack(torch.float32)
    dot = torch.ops.pensieve_cpu.uses_bf16_dot() or torch.ops.pensieve_cpu.brgemm_bf16()
    assert torch.ops.pensieve_cpu.packs_bf16_vnni() == dot


@pytest.mark.parametrize("n", [1, 70, 130])
def test_bf16_linear_past_the_streaming_kernel(n):
    """bf16 rows past the streaming kernel without a packed weight (prefill chunks: 257+ rows always; 11+ where the
    CPU has no bf16 dot products, through fp32 panels of the weight and sgemm), and with one (1..256 rows), every
    panel count and a bias or none, against float64."""
    gen = torch.Generator().manual_seed(n)
    weight = torch.randn(n, 96, generator=gen).bfloat16()
    packed = _packed(weight)
    for rows in (11, 40, 257, 513):
        for bias in (None, torch.randn(n, generator=gen).bfloat16()):
            x = torch.randn(rows, 96, generator=gen).bfloat16()
            _check(x, weight, bias)
            _check(x, weight, bias, packed)


@pytest.mark.parametrize("threads", [1, 3])
def test_linear_at_other_thread_counts(threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(threads)
        for m in (1, 2, 5, 16):
            weight = torch.randn(43, 96, generator=gen)
            _check(torch.randn(m, 96, generator=gen), weight, None)
            _check(torch.randn(m, 96, generator=gen), weight, None, _packed(weight))
        weight = torch.randn(43, 96, generator=gen).bfloat16()  # bf16: panels split over the threads
        for m in (1, 5, 16, 300):
            _check(torch.randn(m, 96, generator=gen).bfloat16(), weight, None)
            _check(torch.randn(m, 96, generator=gen).bfloat16(), weight, None, _packed(weight))
    finally:
        torch.set_num_threads(before)


def test_linear_rejects_bad_input():
    with pytest.raises(ValueError, match="K ="):
        torch.ops.pensieve_cpu.linear(torch.randn(2, 5), torch.randn(3, 4), None)
    with pytest.raises(ValueError, match="dtype"):
        torch.ops.pensieve_cpu.linear(torch.randn(2, 4), torch.randn(3, 4).double(), None)
    with pytest.raises(ValueError, match="bias"):
        torch.ops.pensieve_cpu.linear(torch.randn(2, 4), torch.randn(3, 4), torch.randn(4))


def test_fast_linears_switch_and_restore_and_stay_correct():
    model = tiny_model("llama").float()
    x = torch.randint(3, 100, (1, 9))  # 9 rows: the packed path where brgemm runs
    with torch.no_grad():
        before = model(x).logits
    restore = use_fast_linears(model)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(type(m) is FastLinear for m in linears)
    if torch.ops.pensieve_cpu.can_pack(torch.float32):
        assert all(m.packed_weight is not None for m in linears)
        by_weight = {}  # layers sharing a weight (a tied head) share its packed copy
        for m in linears:
            assert by_weight.setdefault(m.weight.data_ptr(), m.packed_weight) is m.packed_weight
    clone = copy.deepcopy(model)  # a copy holds its own weights, never the original's
    with torch.inference_mode():
        torch.testing.assert_close(model(x).logits, before, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        next(clone.parameters()).add_(1.0)
        torch.testing.assert_close(model(x).logits, before, rtol=1e-5, atol=1e-5)
    restore()
    assert all(type(m) is torch.nn.Linear for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert not any(hasattr(m, "packed_weight") for m in model.modules())
    assert set(model.state_dict()) == set(tiny_model("llama").state_dict())


def test_fast_linear_keeps_autograd():
    layer = torch.nn.Linear(8, 3)
    restore = use_fast_linears(layer)
    assert type(layer) is FastLinear
    x = torch.randn(2, 8, requires_grad=True)
    layer(x).sum().backward()  # grad mode: plain F.linear, so backward works
    assert x.grad is not None and layer.weight.grad is not None
    restore()
