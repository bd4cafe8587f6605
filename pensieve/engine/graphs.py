"""Faster ways to run a step's forward than eager PyTorch: inductor-compiled (CPU) and CUDA graphs (GPU).

`CompiledForward` (CPU): `torch.compile` (inductor) of the packed forward, pensieve's attention inside as opaque
custom ops. One graph for every batch size: the token/sequence dims are dynamic (Dynamo specializes sizes 0 and 1,
so batch 1 is a second graph); the block table is the full-width persistent buffer, so its width never changes.
Decode-only steps use it; steps with prefill or recompute chunks too, per EngineConfig.compile_prefill: padded to
two or more sub-sequences and sampled rows (`StepBuffers.pad_mixed`), they run the graph batched decode steps use,
so they add no graph of their own ("auto": once that graph exists; docs/performance-log.md).

`CudaGraphRunner` (GPU): captures decode-only forwards for a few batch buckets over the fixed KV pools and the
runner's persistent buffers, and replays them; padded rows write to the storage's padding block and sample nothing.
"""

from __future__ import annotations

import logging
import time
import types
import warnings

import torch
import torch.fx.experimental._config as shape_config
from torch._dynamo.utils import counters

from pensieve.engine.plan import StepPlan
from pensieve.forward import AttentionBatch

log = logging.getLogger("pensieve")


def forward(model, input_ids, position_ids, logits_rows, batch: AttentionBatch) -> torch.Tensor:
    """One packed forward -> logits [S, V] for the rows in logits_rows (every way a step runs: eager, compiled,
    captured in a CUDA graph)."""
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


def _private_forward(model):
    """`forward` bound to `model`, with a code object of its own. Dynamo keeps compiled graphs per code object (the
    model's own forward is inlined into this frame), so each generator's model gets a cache of its own instead of
    one shared by every model in the process (where one model's graphs count against another's recompile limit)."""

    def step(input_ids, position_ids, logits_rows, batch, model=model):
        return forward(model, input_ids, position_ids, logits_rows, batch)

    code = step.__code__.replace()
    return types.FunctionType(code, step.__globals__, step.__name__, step.__defaults__)


# Per-call overhead of the compiled step, measured at batch 1 (SmolLM2 fp32, ~27 ms steps; docs/performance-log.md):
# - Dynamo's guards on the model's ~270 parameters and module attributes cost ~1.5 ms per call. The model belongs
#   to the generator and is not changed while it serves (its linears are already switched and packed once), and
#   each generator has a code object of its own, so only the guards on the step's inputs (shapes: batch 1 vs other)
#   are kept.
# - inductor's Python wrapper checks the size and stride of every input and custom-op output (~700 asserts per
#   call, ~1 ms); the inputs are the runner's own persistent buffers.
_OPTIONS = {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe, "size_asserts": False}


class CompiledForward:
    """The packed forward under torch.compile (inductor), compiled at first use and cached on disk by inductor."""

    def __init__(self, model: torch.nn.Module, enabled: bool, prefill: str | bool = "auto") -> None:
        self.model = model
        self.enabled = enabled
        self.prefill = prefill  # steps with prefill/recompute chunks: True, False, or "auto" (once `batched`)
        self.batched = False  # the graph for batches (every step but batch-1 decode) has run
        self.num_steps = 0  # steps run compiled
        self.num_graphs = 0  # graphs compiled (batch 1 specializes: usually 2)
        self.compile_s = 0.0  # wall time of the calls that compiled one
        self._fn = None
        self._failed = False

    NO_STATS = {"compiled_graphs": 0, "compiled_steps": 0, "compile_s": 0.0}  # stats() where nothing compiles

    def stats(self) -> dict:
        return {"compiled_graphs": self.num_graphs, "compiled_steps": self.num_steps, "compile_s": self.compile_s}

    def wants(self, plan: StepPlan) -> bool:
        if not self.enabled or self._failed:
            return False
        return plan.decode_only or self.prefill is True or (self.prefill == "auto" and self.batched)

    def __call__(self, input_ids, position_ids, logits_rows, batch: AttentionBatch) -> torch.Tensor:
        if self._fn is None:
            log.warning("pensieve: compiling the decode step (tens of seconds the first time on a machine; cached)")
            # a copy: torch.compile pops guard_filter_fn out of the dict it is given (every later generator in the
            # process compiled with Dynamo's guards on all ~270 parameters again)
            self._fn = torch.compile(
                _private_forward(self.model), fullgraph=True, dynamic=False, options=dict(_OPTIONS)
            )
        # Only the step's sizes vary; everything else (the KV pools above all) stays static: dynamic=False turns off
        # automatic dynamic shapes. With the pools' shapes symbolic, inductor loses the per-layer storage offset of
        # the views a mutating custom op writes through (measured: every layer's write_kv wrote layer 0's pool).
        for t in (input_ids, position_ids):
            torch._dynamo.maybe_mark_dynamic(t, 1)
        for t in (logits_rows, batch.slot_mapping, batch.block_tables, batch.cu_seqlens_q, batch.seq_lens_k):
            torch._dynamo.maybe_mark_dynamic(t, 0)
        graphs_before = counters["stats"]["unique_graphs"]
        t0 = time.perf_counter()
        try:
            # No duck shaping: sizes equal when a graph is traced (a decode step's tokens, sequences and logits rows
            # all equal the batch) must not become one symbol, or the graph guards on their equality and every step
            # with prefill chunks (more tokens than sequences) compiles a graph of its own.
            duck, shape_config.use_duck_shape = shape_config.use_duck_shape, False
            try:
                logits = self._fn(input_ids, position_ids, logits_rows, batch)
            finally:
                shape_config.use_duck_shape = duck
        except Exception as error:  # noqa: BLE001  (a model inductor cannot compile: run it eagerly)
            self._failed = True
            warnings.warn(
                f"pensieve: torch.compile failed for {type(self.model).__name__} ({type(error).__name__}: "
                f"{str(error)[:200]}); running eagerly",
                RuntimeWarning,
                stacklevel=2,
            )
            return forward(self.model, input_ids, position_ids, logits_rows, batch)
        self.num_steps += 1
        self.batched = self.batched or input_ids.shape[1] > 1
        if counters["stats"]["unique_graphs"] > graphs_before:
            self.num_graphs += counters["stats"]["unique_graphs"] - graphs_before
            self.compile_s += time.perf_counter() - t0
        return logits


class CudaGraphRunner:
    """CUDA graphs of decode-only forwards, one per batch bucket, captured at first use and replayed.

    The graph reads the runner's persistent device buffers (`StepBuffers.dev`, fixed addresses) and the fixed KV
    pools, and writes logits for every row of its bucket into a tensor it owns. A step of B sequences is padded to
    the smallest bucket >= B (`StepBuffers.pad`: padded rows write only to the storage's padding block); the
    plan's sampling rows are picked from the graph's logits after the replay. Steps with more sequences than the
    largest bucket, and steps with swap-ins (whose layers wait on copy events), run eagerly.
    """

    def __init__(self, model, storage, buffers, batch_sizes, block_size: int) -> None:
        self.model = model
        self.storage = storage
        self.buffers = buffers
        self.block_size = block_size
        self.batch_sizes = [b for b in batch_sizes if b <= buffers.max_seqs and b <= buffers.max_tokens]
        self.enabled = True  # benchmarks/decode.py flips it to time eager steps on the same generator
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = None  # one memory pool shared by every bucket's graph

    def bucket(self, num_seqs: int) -> int | None:
        return next((b for b in self.batch_sizes if b >= num_seqs), None)

    def run(self, plan: StepPlan) -> torch.Tensor | None:
        """-> logits [S, V] of the plan's sampling rows, or None when this step cannot be replayed."""
        bucket = self.bucket(plan.num_seqs) if self.enabled else None
        if bucket is None:
            return None
        self.buffers.pad(plan, bucket, self.storage.padding_block, self.block_size)
        self.buffers.upload(bucket, bucket, plan.num_logits)
        if bucket not in self.graphs:
            self.graphs[bucket] = self._capture(bucket)
        graph, logits = self.graphs[bucket]
        graph.replay()
        rows = self.buffers.dev["logits_rows"][: plan.num_logits]  # decode-only: row index == token index
        return logits[rows]

    def _static_inputs(self, bucket: int):
        dev = self.buffers.dev
        batch = AttentionBatch(
            dev["slot_mapping"][:bucket],
            dev["block_tables"][:bucket],
            dev["cu_seqlens_q"][: bucket + 1],
            dev["seq_lens_k"][:bucket],
            *self.storage.device_kv,
        )
        return dev["input_ids"][:bucket][None], dev["position_ids"][:bucket][None], batch

    def _capture(self, bucket: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """The step's inputs are already in the static buffers: the warm-up forwards compute (and write) exactly what
        the replay will."""
        input_ids, position_ids, batch = self._static_inputs(bucket)
        side = torch.cuda.Stream(self.storage.device)
        side.wait_stream(torch.cuda.current_stream(self.storage.device))
        with torch.cuda.stream(side):  # warm-up off the capture: allocator, kernel autotuning, lazy init
            for _ in range(2):
                forward(self.model, input_ids, position_ids, 0, batch)
        torch.cuda.current_stream(self.storage.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = forward(self.model, input_ids, position_ids, 0, batch)  # logits_to_keep=0: every row
        self._pool = graph.pool()
        log.info("pensieve: captured a CUDA graph for decode batches of %d", bucket)
        return graph, logits
