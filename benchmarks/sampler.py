"""What sampling costs per step on the engine's thread, by the controls a turn asks for (SmolLM2-Instruct's fp32
logits over its 49,152-token vocabulary, at 64 positions of a real reply): greedy; temperature + top-p; + min-p;
penalties (logit_bias, repetition, presence, frequency) greedy; logprobs with 5 alternatives; everything at once.
Each rep samples `--steps` steps of a batch, with each turn's statistics updated as the engine updates them; the
configurations alternate rep by rep; medians.
A SmolLM2 fp32 decode step is ~24-30 ms at batch 1 and ~45-60 ms at batch 16 on the machines of docs/performance.md:
compare against those. JSON + PNG.

Usage: python benchmarks/sampler.py [--batches 1,16] [--steps 32] [--reps 5] [--out results/sampler.json]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from plotting import cpu_name, pyplot, save, write_results
from tqdm import tqdm

from pensieve.engine import sampler
from pensieve.engine.turn import ResolvedSampling

VOCAB = 49152
CONFIGS = {
    "greedy": {},
    "top_p": dict(temperature=0.8, top_p=0.9),
    "top_p+min_p": dict(temperature=0.8, top_p=0.9, min_p=0.05),
    "penalties (greedy)": dict(
        logit_bias=((11, -100.0), (12, 5.0)), repetition_penalty=1.1, presence_penalty=0.5, frequency_penalty=0.3
    ),  # fmt: skip
    "logprobs=5": dict(logprobs=5),
    "all": dict(
        temperature=0.8,
        top_p=0.9,
        min_p=0.05,
        logit_bias=((11, -100.0),),
        repetition_penalty=1.1,
        presence_penalty=0.5,
        frequency_penalty=0.3,
        logprobs=5,
    ),  # fmt: skip
}


def turns(batch: int, params: dict, history: int = 2000) -> list:
    base = dict(max_new_tokens=64, temperature=0.0, top_k=0, top_p=1.0, seed=None, stop_token_ids=frozenset(), stop=())
    sampling = ResolvedSampling(**{**base, **params})
    g = torch.Generator().manual_seed(0)
    return [
        SimpleNamespace(
            sampling=sampling,
            generator=None,
            penalties=None,
            conv=SimpleNamespace(tokens=torch.randint(0, VOCAB, (history,), generator=g).tolist()),
        )  # fmt: skip
        for _ in range(batch)
    ]


def real_logits(rows: int = 64) -> torch.Tensor:
    """SmolLM2-Instruct's fp32 logits at `rows` positions of a real chat reply (a model's distributions are far
    peakier than random logits, which decides how much top-p can skip)."""
    from pensieve.models.smollm2 import load_smollm2

    model, tokenizer = load_smollm2(torch.float32)
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()[:4000]
    messages = [{"role": "user", "content": "Summarize this README."}, {"role": "assistant", "content": text}]
    ids = tokenizer.apply_chat_template(messages, return_tensors="pt", return_dict=False)[:, : rows + 64]
    with torch.no_grad():
        return model(ids).logits[0, -rows:].float()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "results" / "sampler.json"))
    args = parser.parse_args()
    logits = real_logits()
    rows = []
    for batch in [int(b) for b in args.batches.split(",")]:
        times: dict[str, list[float]] = {name: [] for name in CONFIGS}
        for _ in tqdm(range(args.reps), desc=f"batch {batch}"):
            for name, params in CONFIGS.items():
                ts = turns(batch, params)
                sampler.sample(logits[:batch], ts)  # first step builds the penalties' statistics: not timed
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    sampler.sample(logits[:batch], ts)
                times[name].append((time.perf_counter() - t0) / args.steps)
        for name, ts in times.items():
            rows.append({"batch": batch, "config": name, "ms_per_step": statistics.median(ts) * 1e3})
    cpu = cpu_name()
    print(f"{cpu}, {torch.get_num_threads()} threads; median of {args.reps} reps of {args.steps} steps")
    for row in rows:
        print(f"  batch {row['batch']:3}  {row['config']:20} {row['ms_per_step']:8.3f} ms per step")
    meta = {"cpu": cpu, "threads": torch.get_num_threads(), "steps": args.steps, "reps": args.reps, "vocab": VOCAB}
    write_results(args.out, meta, rows, lambda rows, path: _plot(rows, path, meta))


def _plot(rows: list[dict], path: Path, meta: dict) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(8, 4))
    batches = sorted({r["batch"] for r in rows})
    width = 0.8 / len(batches)
    names = list(CONFIGS)
    for j, b in enumerate(batches):
        values = [next(r["ms_per_step"] for r in rows if r["batch"] == b and r["config"] == n) for n in names]
        ax.bar([i + j * width for i in range(len(names))], values, width, label=f"batch {b}")
    ax.set_xticks([i + width * (len(batches) - 1) / 2 for i in range(len(names))], names, rotation=20, fontsize=7)
    ax.set_ylabel("ms per step")
    ax.set_title(f"sampling per step: {meta['cpu'][:60]}", fontsize=8)
    ax.legend()
    save(fig, path)


if __name__ == "__main__":
    main()
