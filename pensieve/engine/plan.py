"""The per-step plan: built once per step on the host, read by the attention function of every layer.

Set with `forward_context(...)`, which always resets (nano-vllm's Context, mini-sglang's forward_batch).
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass

import torch

from pensieve.cache.tiers import LayerGate


@dataclass(frozen=True)
class StepPlan:
    """One packed forward over B sequence chunks, T tokens in all."""

    input_ids: torch.Tensor  # [1, T] int64
    position_ids: torch.Tensor  # [1, T] int64
    cu_seqlens_q: torch.Tensor  # [B + 1] int32
    seq_lens_k: torch.Tensor  # [B] int32
    block_tables: torch.Tensor  # [B, max_blocks] int32
    slot_mapping: torch.Tensor  # [T] int64
    logits_rows: torch.Tensor  # [S] int64: rows whose logits are sampled


@dataclass(frozen=True)
class ForwardContext:
    plan: StepPlan
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]]  # per layer: k_cache, v_cache [N, block_size, Hkv, D]
    gate: LayerGate  # swap-ins/loads of this step: wait(layer) before touching that layer's cache


_current: contextvars.ContextVar[ForwardContext | None] = contextvars.ContextVar("pensieve_forward", default=None)


@contextlib.contextmanager
def forward_context(plan: StepPlan, kv_caches: list[tuple[torch.Tensor, torch.Tensor]], gate: LayerGate):
    token = _current.set(ForwardContext(plan, kv_caches, gate))
    try:
        yield
    finally:
        _current.reset(token)


def current_forward() -> ForwardContext | None:
    return _current.get()
