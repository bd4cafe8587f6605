"""write_kv writes exactly the given slots: every other slot keeps its bits, -1 slots are skipped."""

import os

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from pensieve.ops import cpu_kernel, triton_write_kv, write_kv
from pensieve.ops.cpu_paged import torch_write_kv
from pensieve.ops.reference import reference_write_kv


@st.composite
def write_problems(draw, dtype):
    num_blocks = draw(st.integers(1, 12))
    block_size = draw(st.sampled_from((1, 8, 16)))
    num_kv_heads = draw(st.integers(1, 4))
    head_dim = draw(st.sampled_from((32, 64, 80)))
    num_slots = num_blocks * block_size
    num_tokens = draw(st.integers(0, min(num_slots, 40)))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    slots = torch.randperm(num_slots, generator=gen)[:num_tokens]
    pad = torch.rand(num_tokens, generator=gen) < draw(st.sampled_from((0.0, 0.3)))
    slots[pad] = -1
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.full(shape, float("nan"), dtype=dtype)
    v_cache = torch.randn(shape, generator=gen).to(dtype)
    k = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen).to(dtype)
    v = torch.randn(num_kv_heads, num_tokens, head_dim, generator=gen).to(dtype).transpose(0, 1)  # strided
    return k, v, k_cache, v_cache, slots.long()


def _check_write(write, problem):
    k, v, k_cache, v_cache, slots = problem
    want_k, want_v = reference_write_kv(k, v, k_cache, v_cache, slots)
    write(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache.isnan(), want_k.isnan())  # untouched slots keep their (NaN) poison
    torch.testing.assert_close(k_cache, want_k, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(v_cache, want_v, rtol=0, atol=0, equal_nan=True)


@given(write_problems(torch.float32))
def test_write_kv_writes_exactly_the_given_slots(problem):
    _check_write(write_kv, problem)


@pytest.mark.skipif(not cpu_kernel.load(), reason="the C++ CPU kernels could not be built here")
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@given(data=st.data())
def test_cpp_write_kv(dtype, data):
    _check_write(torch.ops.pensieve_cpu.write_kv, data.draw(write_problems(dtype)))


@given(write_problems(torch.float32))
def test_torch_path_write_kv(problem):
    _check_write(torch_write_kv, problem)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1 for CPU tensors")
@given(write_problems(torch.float16))
def test_triton_write_kv(problem):
    _check_write(triton_write_kv, problem)


def test_padding_slots_leave_cache_untouched():
    k_cache = torch.zeros(2, 4, 1, 32)
    v_cache = torch.zeros(2, 4, 1, 32)
    k = torch.ones(3, 1, 32)
    write_kv(k, k, k_cache, v_cache, torch.tensor([-1, 5, -1]))
    assert k_cache.flatten(0, 1)[5].eq(1).all()
    assert k_cache.sum() == 32 and v_cache.sum() == 32
