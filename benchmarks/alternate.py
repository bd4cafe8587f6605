"""A redesign's speed against its base commit, alternated so that this machine's drift cannot hide a regression.

Each round runs one subprocess per side (the base commit's checkout, e.g. a `git worktree`, and this tree), in
turn, with that side's code first on the path; each measures, on SmolLM2-135M (fp32, compiled decode):
- the decode step time at batch 1 and batch 16 over 512-token histories (median of turns of 16 steps),
- the host overhead per step: step time minus the time in `ModelRunner.run` (scheduling, cache bookkeeping,
  sampling, post-processing — what a GPU would not hide),
- a multi-turn run: 8 conversations x 4 turns (ShareGPT-like lengths, seeded), seconds per output token.
Medians over the rounds, the ratio new / base, and the CPU are printed and written as JSON.

Usage: python benchmarks/alternate.py --base /tmp/base [--rounds 3] [--out results/alternate.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from plotting import cpu_name

HERE = Path(__file__).resolve().parent


def measure() -> dict:
    """One side's numbers (runs in the subprocess, on whichever pensieve is first on the path)."""
    import random

    import torch

    from pensieve import CacheConfig, SamplingParams, SchedulerConfig, StatefulGenerator
    from pensieve.models.smollm2 import load_smollm2

    model = load_smollm2(torch.float32)[0]
    rng = random.Random(0)
    out = {}
    with StatefulGenerator(
        model, None, CacheConfig(num_device_blocks=2048), scheduler_config=SchedulerConfig(2048)
    ) as gen:
        engine = getattr(gen, "engine", None) or gen._engine  # (the base has no public `engine`)
        run, in_run = engine.runner.run, []

        def timed(plan):
            t0 = time.perf_counter()
            logits = run(plan)
            in_run.append(time.perf_counter() - t0)
            return logits

        engine.runner.run = timed
        for batch in (1, 16):
            convs = {f"b{batch}c{i}": [rng.randrange(100, 40000) for _ in range(512)] for i in range(batch)}
            gen.generate_batch(convs, SamplingParams(max_new_tokens=1, ignore_eos=True))
            steps, per_step, host = 16, [], []
            for turn in range(4):  # the first warms (and compiles)
                in_run.clear()
                sp = SamplingParams(max_new_tokens=steps, ignore_eos=True, temperature=0)
                t0 = time.perf_counter()
                gen.generate_batch({c: [5 + turn] for c in convs}, sp)
                wall = time.perf_counter() - t0
                if turn:
                    per_step.append(wall / len(in_run))
                    host.append((wall - sum(in_run)) / len(in_run))
            out[f"decode_b{batch}_ms"] = statistics.median(per_step) * 1e3
            out[f"host_b{batch}_ms"] = statistics.median(host) * 1e3
            for c in convs:
                gen.end(c)
        convs = [f"mt{i}" for i in range(8)]
        tokens, t0 = 0, time.perf_counter()
        for _ in range(4):
            msgs = {c: [rng.randrange(100, 40000) for _ in range(rng.randint(40, 120))] for c in convs}
            replies = gen.generate_batch(msgs, SamplingParams(max_new_tokens=rng.randint(40, 80), ignore_eos=True))
            tokens += sum(len(r.token_ids) for r in replies.values())
        out["multiturn_ms_per_token"] = (time.perf_counter() - t0) / tokens * 1e3
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="the base commit's checkout")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default="results/alternate.json")
    args = parser.parse_args()
    sides = {"base": Path(args.base).resolve(), "new": HERE.parent}
    runs: dict[str, list[dict]] = {name: [] for name in sides}
    for r in range(args.rounds):
        for name, root in sides.items():
            env = {**os.environ, "PYTHONPATH": str(root)}
            code = f"import sys, json; sys.path.insert(0, {str(HERE)!r}); from alternate import measure; "
            code += "print(json.dumps(measure()))"
            done = subprocess.run([sys.executable, "-c", code], env=env, cwd="/", capture_output=True, text=True)
            if done.returncode:
                sys.exit(f"{name} failed:\n{done.stderr[-3000:]}")
            runs[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"round {r + 1}/{args.rounds} {name}: {runs[name][-1]}", flush=True)
    keys = list(runs["base"][0])
    medians = {name: {k: statistics.median(run[k] for run in rs) for k in keys} for name, rs in runs.items()}
    ratio = {k: medians["new"][k] / medians["base"][k] for k in keys}
    cpu = cpu_name()
    result = {"cpu": cpu, "rounds": args.rounds, "runs": runs, "median": medians,
              "new_over_base": ratio}  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"\n{cpu}, {args.rounds} rounds, medians")
    print(f"{'':28}{'base':>10}{'new':>10}{'new/base':>10}")
    for k in keys:
        print(f"{k:28}{medians['base'][k]:>10.2f}{medians['new'][k]:>10.2f}{ratio[k]:>10.3f}")


if __name__ == "__main__":
    main()
