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


def _check(x, weight, bias):
    out = torch.ops.pensieve_cpu.linear(x, weight, bias)
    ref = x.double() @ weight.double().t() + (bias.double() if bias is not None else 0)
    assert out.shape == ref.shape and out.dtype == x.dtype and not out.isnan().any()
    scale = (x.double().abs() @ weight.double().abs().t()).clamp(min=1)  # the size of the sum's terms
    assert ((out.double() - ref).abs() / scale).max() <= TOL[x.dtype]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@given(data=st.data())
def test_linear_matches_reference(dtype, data):
    _check(*data.draw(problems(dtype)))


@pytest.mark.parametrize("threads", [1, 3])
def test_linear_at_other_thread_counts(threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(threads)
        for m in (1, 2, 5, 16):
            _check(torch.randn(m, 96, generator=gen), torch.randn(43, 96, generator=gen), None)
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
    x = torch.randint(3, 100, (1, 9))
    with torch.no_grad():
        before = model(x).logits
    restore = use_fast_linears(model)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(type(m) is FastLinear for m in linears)
    clone = copy.deepcopy(model)  # a copy holds its own weights, never the original's
    with torch.inference_mode():
        torch.testing.assert_close(model(x).logits, before, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        next(clone.parameters()).add_(1.0)
        torch.testing.assert_close(model(x).logits, before, rtol=1e-5, atol=1e-5)
    restore()
    assert all(type(m) is torch.nn.Linear for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert set(model.state_dict()) == set(tiny_model("llama").state_dict())


def test_fast_linear_keeps_autograd():
    layer = torch.nn.Linear(8, 3)
    restore = use_fast_linears(layer)
    assert type(layer) is FastLinear
    x = torch.randn(2, 8, requires_grad=True)
    layer(x).sum().backward()  # grad mode: plain F.linear, so backward works
    assert x.grad is not None and layer.weight.grad is not None
    restore()
