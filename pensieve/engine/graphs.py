"""Faster ways to run a step's forward than eager PyTorch: inductor-compiled (CPU) and CUDA graphs (GPU).

`CompiledForward` (CPU): `torch.compile` (inductor) of the packed forward, pensieve's attention inside as opaque
custom ops. One graph for every batch size: the token/sequence dims are dynamic (Dynamo specializes sizes 0 and 1,
so batch 1 is a second graph); the block table is the full-width persistent buffer, so its width never changes.
Only decode-only steps use it (what "auto" chooses: measured faster there; see docs/performance.md).

`CudaGraphRunner` (GPU): captures decode-only forwards for a few batch buckets over the fixed KV pools and the
runner's persistent buffers, and replays them; padded rows write to a dummy block and sample nothing.
"""

from __future__ import annotations

import functools
import logging
import time
import types
import warnings

import torch

from pensieve.engine.plan import StepPlan
from pensieve.forward import AttentionBatch

log = logging.getLogger("pensieve")


def _forward(model, input_ids, position_ids, logits_rows, batch: AttentionBatch) -> torch.Tensor:
    out = model(
        input_ids=input_ids, position_ids=position_ids, use_cache=False, logits_to_keep=logits_rows, pensieve=batch
    )
    return out.logits[0]


def compile_supported() -> bool:
    """inductor's CPU backend needs a working C++ compiler."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
        return True
    except Exception:  # noqa: BLE001
        return False


def resolve_compile(mode, model: torch.nn.Module) -> bool:
    """EngineConfig.compile -> whether this generator compiles its CPU decode steps."""
    if mode is True or mode is False:
        return mode
    dtype = next(model.parameters()).dtype
    return dtype in (torch.float32, torch.bfloat16, torch.float16) and compile_supported()


def _private_forward():
    """A copy of `_forward` with a code object of its own. Dynamo keeps compiled graphs per code object (the model's
    own forward is inlined into this frame), so each generator's model gets a cache of its own instead of one
    shared by every model in the process, where guards on one model's weights evict another's graphs."""
    return types.FunctionType(_forward.__code__.replace(), _forward.__globals__, _forward.__name__)


class CompiledForward:
    """The packed forward under torch.compile (inductor), compiled at first use and cached on disk by inductor."""

    def __init__(self, model: torch.nn.Module, enabled: bool) -> None:
        self.model = model
        self.enabled = enabled
        self.compile_s: float | None = None  # wall time of the first compiled call (compile + run)
        self._fn = None
        self._failed = False

    def wants(self, plan: StepPlan) -> bool:
        return self.enabled and not self._failed and plan.decode_only

    def __call__(self, input_ids, position_ids, logits_rows, batch: AttentionBatch) -> torch.Tensor:
        first = self._fn is None
        if first:
            log.warning("pensieve: compiling the decode step (first run on this machine only; cached after)")
            self._fn = torch.compile(functools.partial(_private_forward(), self.model), fullgraph=True, dynamic=False)
        # Only the step's sizes vary; everything else (the KV pools above all) stays static: dynamic=False turns off
        # automatic dynamic shapes. With the pools' shapes symbolic, inductor loses the per-layer storage offset of
        # the views a mutating custom op writes through (measured: every layer's write_kv wrote layer 0's pool).
        for t in (input_ids, position_ids):
            torch._dynamo.maybe_mark_dynamic(t, 1)
        for t in (logits_rows, batch.slot_mapping, batch.block_tables, batch.cu_seqlens_q, batch.seq_lens_k):
            torch._dynamo.maybe_mark_dynamic(t, 0)
        t0 = time.perf_counter()
        try:
            logits = self._fn(input_ids, position_ids, logits_rows, batch)
        except Exception as error:  # noqa: BLE001  (a model inductor cannot compile: run it eagerly)
            self._failed = True
            warnings.warn(
                f"pensieve: torch.compile failed for {type(self.model).__name__} ({type(error).__name__}: "
                f"{str(error)[:200]}); running eagerly",
                RuntimeWarning,
                stacklevel=2,
            )
            return _forward(self.model, input_ids, position_ids, logits_rows, batch)
        if first:
            self.compile_s = time.perf_counter() - t0
        return logits


class CudaGraphRunner:
    """Placeholder until the CUDA-graph runner lands: never captures, so every GPU step runs eagerly."""

    def __init__(self, model, storage, buffers, batch_sizes) -> None:
        self.model = model

    def run(self, plan: StepPlan):
        return None
