"""Paged multi-query attention: the op everything in pensieve stands on (DESIGN §3)."""

from pensieve.ops.attention import paged_attention, step_kernels, write_kv
from pensieve.ops.validation import trusted_inputs


def triton_paged_attention(*args, **kwargs):
    """The Triton launcher itself (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1)."""
    from pensieve.ops.triton_paged import triton_paged_attention as launch

    return launch(*args, **kwargs)


def triton_write_kv(*args, **kwargs):
    """The Triton KV scatter launcher (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1)."""
    from pensieve.ops.triton_paged import triton_write_kv as launch

    return launch(*args, **kwargs)


__all__ = ["paged_attention", "step_kernels", "write_kv", "triton_paged_attention", "triton_write_kv", "trusted_inputs"]
