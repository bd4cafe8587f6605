"""Where a decode step's time goes: the torch profiler over a few steps of SmolLM2 at a given batch and context.

B conversations get `--context`-token histories; then one turn of `--steps` decode steps runs under the profiler
(after an unprofiled turn that warms, and compiles, the decode step). Prints ms per step and the top operators by
self time (per step); with --python, the top Python functions (cProfile) instead: the engine's host-side work,
which is what is left of a step on a GPU once its forward replays from a CUDA graph. With --prefill N, a prefill
step instead: each conversation sends N new tokens (on top of its --context history; --context 0 for a first turn)
and one token is generated; `--compile-prefill` picks EngineConfig.compile_prefill. With --live N, the host overhead
of a decode step instead (issue 35's target: <= 10% at batch 64 with 256 live conversations): N conversations hold
--context-token histories in the device pool, --batch of them decode --steps steps at a time (every conversation
takes its turn), and each step's wall time is split into the forward (the compiled model call, kernels included:
timed around it) and everything else the engine does on its thread (scheduling, the plan, uploads, sampling,
detokenizing, the cache's bookkeeping and eviction checks). docs/performance-log.md quotes it.

Usage: python benchmarks/profile_step.py [--batch 6] [--context 1500] [--dtype float32] [--compile on|off]
                                         [--device cuda] [--random-weights --shape llama-1b] [--python]
       python benchmarks/profile_step.py --prefill 1500 --batch 1 --context 0 --dtype bfloat16 [--compile-prefill off]
       python benchmarks/profile_step.py --live 256 --batch 64 --context 200 --steps 16
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch
from decode import SHAPES, history, load_model
from torch.profiler import ProfilerActivity, profile

import pensieve.engine.runner as runner_module
from pensieve import CacheConfig, EngineConfig, SamplingParams, SchedulerConfig, StatefulGenerator


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=6)
    parser.add_argument("--context", type=int, default=1500)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--compile", default="on", choices=("on", "off"))
    parser.add_argument("--rows", type=int, default=12)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--random-weights", action="store_true", help="a model of --shape with random weights")
    parser.add_argument("--shape", default="smollm2", choices=sorted(SHAPES))
    parser.add_argument("--python", action="store_true", help="profile Python functions (cProfile), not operators")
    parser.add_argument("--prefill", type=int, default=0, help="a prefill step of N new tokens per conversation")
    parser.add_argument("--compile-prefill", default="on", choices=("on", "off"))
    parser.add_argument("--live", type=int, default=0, help="host overhead with N live conversations (see above)")
    args = parser.parse_args(argv)
    if args.prefill:
        return profile_prefill(args)
    if args.live:
        return host_overhead(args)
    model = load_model(getattr(torch, args.dtype), args)
    blocks = args.batch * (args.context + 4 * args.steps + 64) // 16 + 64
    cache = CacheConfig(num_device_blocks=blocks)
    engine = EngineConfig(compile=args.compile == "on")
    scheduler = SchedulerConfig(2048)
    with StatefulGenerator(model, cache_config=cache, scheduler_config=scheduler, engine_config=engine) as gen:
        convs = {f"c{i}": history(i, args.context) for i in range(args.batch)}
        gen.generate_batch(convs, SamplingParams(max_new_tokens=1, ignore_eos=True))
        turn = SamplingParams(max_new_tokens=args.steps, ignore_eos=True, temperature=0)
        gen.generate_batch({c: [5] for c in convs}, turn)  # warm (and compile)
        t0 = time.perf_counter()
        gen.generate_batch({c: [6] for c in convs}, turn)  # unprofiled: the step time quoted
        step_ms = (time.perf_counter() - t0) / args.steps * 1e3
        if args.python:
            prof = cProfile.Profile()
            prof.runcall(gen.generate_batch, {c: [7] for c in convs}, turn)
        else:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                gen.generate_batch({c: [7] for c in convs}, turn)
    print(f"{_name(args)} {args.dtype}, batch {args.batch}, context {args.context}, compile {args.compile}: "
          f"{step_ms:.1f} ms per step ({_where(args)})")  # fmt: skip
    if args.python:
        pstats.Stats(prof).sort_stats("tottime").print_stats(args.rows)
        return
    _print_ops(prof, args.rows, args.steps)


class _Timed:
    """A forward (the compiled one, or the eager `forward` of pensieve.engine.runner) with a stopwatch around each
    call, shared by both (wants() passes through)."""

    def __init__(self, inner, clock: list | None = None) -> None:
        self.inner, self.clock = inner, clock if clock is not None else [0.0, 0]

    def wants(self, plan) -> bool:
        return self.inner.wants(plan)

    def __call__(self, *args):
        t0 = time.perf_counter()
        out = self.inner(*args)
        self.clock[0] += time.perf_counter() - t0
        self.clock[1] += 1
        return out


def host_overhead(args) -> None:
    if args.compile != "on" or args.device != "cpu":
        raise SystemExit("--live measures the compiled CPU decode step (--compile on, --device cpu)")
    model = load_model(getattr(torch, args.dtype), args)
    blocks = args.live * -(-(args.context + 4 * args.steps + 16) // 16) + 64
    with StatefulGenerator(model, cache_config=CacheConfig(num_device_blocks=blocks),
                           scheduler_config=SchedulerConfig(2048, max_num_seqs=args.batch),
                           engine_config=EngineConfig(compile=True)) as gen:  # fmt: skip
        convs = [f"c{i}" for i in range(args.live)]
        for start in range(0, args.live, args.batch):
            first = {c: history(i, args.context) for i, c in enumerate(convs) if start <= i < start + args.batch}
            gen.generate_batch(first, SamplingParams(max_new_tokens=1, ignore_eos=True))
        turn = SamplingParams(max_new_tokens=args.steps, ignore_eos=True, temperature=0)
        gen.generate_batch({c: [5] for c in convs[: args.batch]}, turn)  # warm (and compile)
        runner = gen.engine.runner
        runner.compiled = _Timed(runner.compiled)
        eager = runner_module.forward = _Timed(runner_module.forward, runner.compiled.clock)
        steps0, wall = gen.engine.num_steps, 0.0
        for start in range(0, args.live, args.batch):  # every live conversation takes a turn, a batch at a time
            t0 = time.perf_counter()
            gen.generate_batch({c: [6] for c in convs[start : start + args.batch]}, turn)
            wall += time.perf_counter() - t0
        steps = gen.engine.num_steps - steps0
        live = len(gen.engine.kv.conversations)
        runner_module.forward = eager.inner
    seconds, calls = runner.compiled.clock
    if calls != steps:
        raise SystemExit(f"{steps} steps but {calls} forwards timed")
    step_ms, forward_ms = wall / steps * 1e3, seconds / steps * 1e3
    print(f"{_name(args)} {args.dtype}, {live} live conversations of ~{args.context} tokens, decode batch "
          f"{args.batch}, {steps} steps ({_where(args)}): {step_ms:.1f} ms per step, forward {forward_ms:.1f} ms, "
          f"host {step_ms - forward_ms:.1f} ms = {(step_ms - forward_ms) / step_ms:.1%} of the step")  # fmt: skip


def _name(args) -> str:
    return f"random {args.shape}" if args.random_weights else "SmolLM2"


def _where(args) -> str:
    return torch.cuda.get_device_name() if args.device == "cuda" else f"{torch.get_num_threads()} threads"


def _print_ops(prof, rows: int, steps: int) -> None:
    """The top operators by self time, per step of the `steps` the profiler saw."""
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:rows]
    print(f"{'operator':60}{'ms/step':>9}{'calls/step':>12}")
    for e in events:
        print(f"{e.key[:58]:60}{e.self_cpu_time_total / 1e3 / steps:>9.2f}{e.count / steps:>12.1f}")


def profile_prefill(args) -> None:
    model = load_model(getattr(torch, args.dtype), args)
    blocks = 5 * args.batch * (args.context + args.prefill + 64) // 16 + 64
    engine = EngineConfig(compile=args.compile == "on", compile_prefill=args.compile_prefill == "on")
    one = SamplingParams(max_new_tokens=1, ignore_eos=True)
    with StatefulGenerator(model, cache_config=CacheConfig(num_device_blocks=blocks),
                           scheduler_config=SchedulerConfig(max(2048, args.batch * args.prefill)),
                           engine_config=engine) as gen:  # fmt: skip

        def turn(r: int):
            convs = {f"r{r}c{i}": history(7 * r + i, args.context) for i in range(args.batch)}
            if args.context:
                gen.generate_batch(convs, one)
            new = {c: history(100 + 7 * r + i, args.prefill) for i, c in enumerate(convs)}
            return lambda: gen.generate_batch(new, one)

        turn(0)()  # warm (and compile)
        times = []
        for r in range(1, 4):
            step = turn(r)
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
        step = turn(4)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
    print(f"{_name(args)} {args.dtype}, {args.batch} x {args.prefill} new tokens over {args.context}-token "
          f"histories, compile {args.compile}, compile_prefill {args.compile_prefill}: {min(times):.0f}-"
          f"{max(times):.0f} ms per prefill step ({_where(args)})")  # fmt: skip
    _print_ops(prof, args.rows, 1)


if __name__ == "__main__":
    main()
