"""Decode step time: pensieve eager vs pensieve compiled vs HF's decode step, by batch size and context length.

For each dtype, context L and batch B:
  pensieve   B conversations are given L-token histories (a real prefill), then each measured turn appends one token
             per conversation and decodes N tokens: every step of it is a decode step of B rows (the first feeds
             the new message token). ms/step = turn wall time / N, engine overheads (scheduling, sampling) included.
             "eager" and "compiled" are the same generator with the compiled forward switched off and on, measured
             alternately (R times each) so that drift of this shared machine hits both alike.
  hf         the same model under HF's own attention (sdpa): one forward of the B x L prompt into a DynamicCache,
             then N single-token forwards with the cache, as `generate` runs them (argmax between steps).
Reported: median ms per step, ms per token (step / B), and pensieve compiled vs HF; and the step against its bytes
floor: the bytes a decode step must read (every weight once, the tied embedding as the LM head, plus B x L tokens of
KV) over a plain streaming read's bandwidth measured in the same run (`stream_gb_s`: the sum of a 1 GiB tensor, the
best of 5, on the same threads) — a figure to watch, not a target. JSON + PNG.

On a GPU (--device cuda) the two pensieve modes are "graphs" (decode replayed from captured CUDA graphs) and
"eager"; HF runs the same model on the same GPU. --shape picks a model shape for --random-weights runs (a device
machine without the SmolLM2 package: step times depend on the shapes, not on the weights' values).

Usage: python benchmarks/decode.py [--dtypes float32,bfloat16] [--batches 1,4,16,64] [--contexts 256,2048]
                                   [--device cuda] [--random-weights --shape smollm2|llama-1b]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch
from plotting import cpu_name, pyplot, save, write_results
from tqdm import tqdm

from pensieve import CacheConfig, EngineConfig, SamplingParams, SchedulerConfig, StatefulGenerator
from pensieve.models.smollm2 import load_smollm2


def history(b: int, length: int) -> list[int]:
    """Conversation b's synthetic `length`-token history (also used by profile_step.py)."""
    return [1000 + (b * 7919 + i * 104729) % 40000 for i in range(length)]


# Model shapes for --random-weights (SmolLM2-135M-Instruct's own config; Llama-3.2-1B's published shape).
SHAPES = {
    "smollm2": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, head_dim=64, vocab_size=49152, tie_word_embeddings=True,
                    rope_theta=100000.0, max_position_embeddings=8192),
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True,
                     rope_theta=500000.0, max_position_embeddings=8192),
}  # fmt: skip


def load_model(dtype: torch.dtype, args) -> torch.nn.Module:
    if not args.random_weights:
        return load_smollm2(dtype)[0].to(args.device)
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(args.device):
        return LlamaForCausalLM(LlamaConfig(**SHAPES[args.shape])).to(dtype).eval()


def fast_mode(device: str) -> str:
    return "graphs" if device == "cuda" else "compiled"


def bench_pensieve(gen, batch, context, args) -> dict:
    convs = {f"b{batch}-c{context}-{i}": history(i, context) for i in range(batch)}
    gen.generate_batch(convs, SamplingParams(max_new_tokens=1, ignore_eos=True))  # the prefill, untimed
    turn = SamplingParams(max_new_tokens=args.steps, ignore_eos=True, temperature=0)
    runner = gen.engine.runner  # the benchmark flips its fast path on and off between turns
    fast = fast_mode(args.device)
    times = {"eager": [], fast: []}
    for rep in range(args.reps + 1):
        for mode in (fast, "eager"):
            (runner.graphs if fast == "graphs" else runner.compiled).enabled = mode == fast
            t0 = time.perf_counter()
            gen.generate_batch({c: [7 + rep] for c in convs}, turn)
            if rep > 0:  # rep 0 warms both paths (compiles / captures the fast path's graph the first time)
                times[mode].append((time.perf_counter() - t0) / args.steps * 1e3)
    for conv_id in convs:
        gen.end(conv_id)
    return {mode: statistics.median(ts) for mode, ts in times.items()}


@torch.inference_mode()
def bench_hf(model, batch, context, args) -> float:
    from transformers import DynamicCache

    ids = torch.tensor([history(i, context) for i in range(batch)], device=args.device)
    cache = DynamicCache(config=model.config)
    out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    times = []
    next_ids = out.logits[:, -1].argmax(-1, keepdim=True)
    for _ in range(args.reps):
        synchronize(args.device)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            out = model(input_ids=next_ids, past_key_values=cache, use_cache=True)
            next_ids = out.logits[:, -1].argmax(-1, keepdim=True)
        synchronize(args.device)
        times.append((time.perf_counter() - t0) / args.steps * 1e3)
    return statistics.median(times)


def stream_gb_s(device: str, nbytes: int = 1 << 30) -> float:
    """A plain streaming read's bandwidth: the sum of an nbytes float32 tensor (far past the last-level cache), the
    best of 5."""
    x = torch.ones(nbytes // 4, device=device)
    best = float("inf")
    for _ in range(5):
        synchronize(device)
        t0 = time.perf_counter()
        x.sum().item()
        best = min(best, time.perf_counter() - t0)
    return nbytes / best / 1e9


def step_bytes(model: torch.nn.Module, batch: int, context: int) -> int:
    """What one decode step must read: each parameter once (a tied embedding is one tensor: read whole as the LM
    head) and the KV of batch x context tokens."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())  # (parameters() yields a tie once)
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    itemsize = next(model.parameters()).element_size()
    kv_per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * itemsize
    return weights + batch * context * kv_per_token


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run_dtype(dtype_name: str, args) -> list[dict]:
    dtype = getattr(torch, dtype_name)
    model = load_model(dtype, args)
    hf_model = copy.deepcopy(model)
    rows = []
    most = max(args.batches) * (max(args.contexts) + (args.reps + 1) * 2 * (args.steps + 1) + 16)
    cache = CacheConfig(block_size=16, num_device_blocks=most // 16 + 64)
    sched = SchedulerConfig(max_num_batched_tokens=2048, max_num_seqs=max(64, max(args.batches)))
    points = [(c, b) for c in args.contexts for b in args.batches]
    engine = EngineConfig(compile=True, cuda_graphs=True)
    fast = fast_mode(args.device)
    with StatefulGenerator(model, cache_config=cache, scheduler_config=sched, engine_config=engine) as gen:
        for context, batch in tqdm(points, desc=f"pensieve {dtype_name}"):
            ms = bench_pensieve(gen, batch, context, args)
            rows.append({"dtype": dtype_name, "context": context, "batch": batch,
                         **{f"pensieve_{k}_ms": v for k, v in ms.items()}})  # fmt: skip
        compile_s = gen.stats()["compile_s"]
    for row in tqdm(rows, desc=f"hf {dtype_name}"):
        row["hf_ms"] = bench_hf(hf_model, row["batch"], row["context"], args)
    bandwidth = stream_gb_s(args.device)
    for row in rows:
        row["compile_s"] = compile_s
        row["stream_gb_s"] = round(bandwidth, 2)
        row["floor_ms"] = step_bytes(model, row["batch"], row["context"]) / (bandwidth * 1e9) * 1e3
        row[f"{fast}_vs_floor"] = row[f"pensieve_{fast}_ms"] / row["floor_ms"]
        row[f"{fast}_vs_hf"] = row["hf_ms"] / row[f"pensieve_{fast}_ms"]
        row[f"{fast}_vs_eager"] = row["pensieve_eager_ms"] / row[f"pensieve_{fast}_ms"]
    return rows


def plot(rows: list[dict], path: Path, fast: str) -> None:
    plt = pyplot()
    if plt is None:
        return
    groups = sorted({(r["dtype"], r["context"]) for r in rows})
    fig, axes = plt.subplots(1, len(groups), figsize=(4.5 * len(groups), 3.8), squeeze=False)
    for ax, (dtype, context) in zip(axes[0], groups, strict=True):
        sel = [r for r in rows if r["dtype"] == dtype and r["context"] == context]
        batches = [r["batch"] for r in sel]
        for key, label in ((f"pensieve_{fast}_ms", f"pensieve {fast}"), ("pensieve_eager_ms", "pensieve eager"),
                           ("hf_ms", "HF decode step")):  # fmt: skip
            ax.plot(batches, [r[key] / r["batch"] for r in sel], marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch")
        ax.set_ylabel("ms per token")
        ax.set_title(f"{dtype}, context {context}")
        ax.legend(fontsize=7)
    save(fig, path)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--batches", default="1,4,16,64")
    parser.add_argument("--contexts", default="256,2048")
    parser.add_argument("--steps", type=int, default=16, help="decode steps per measured turn")
    parser.add_argument("--reps", type=int, default=3, help="measured turns per mode (median)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--random-weights", action="store_true", help="a model of --shape with random weights")
    parser.add_argument("--shape", default="smollm2", choices=sorted(SHAPES))
    parser.add_argument("--out", default="results/decode.json")
    args = parser.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",")]
    args.contexts = [int(c) for c in args.contexts.split(",")]
    threads = torch.get_num_threads()
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"{threads} threads, {cpu_name()}"
    model_name = f"random weights of {args.shape}'s shape" if args.random_weights else "SmolLM2-135M"
    print(f"{model_name} decode step, {where}, torch {torch.__version__}")
    rows = []
    for dtype_name in args.dtypes.split(","):
        rows += run_dtype(dtype_name, args)
    fast = fast_mode(args.device)
    print(f"\n{'dtype':10}{'context':>8}{'batch':>6}{'eager ms':>10}{fast + ' ms':>12}{'HF ms':>9}"
          f"{'ms/token':>10}{'vs HF':>8}{'vs eager':>9}{'floor ms':>10}{'vs floor':>9}")  # fmt: skip
    for r in rows:
        print(f"{r['dtype']:10}{r['context']:>8}{r['batch']:>6}{r['pensieve_eager_ms']:>10.1f}"
              f"{r[f'pensieve_{fast}_ms']:>12.1f}{r['hf_ms']:>9.1f}{r[f'pensieve_{fast}_ms'] / r['batch']:>10.2f}"
              f"{r[f'{fast}_vs_hf']:>7.2f}x{r[f'{fast}_vs_eager']:>8.2f}x{r['floor_ms']:>10.1f}"
              f"{r[f'{fast}_vs_floor']:>8.2f}x")  # fmt: skip
    probes = ", ".join(dict.fromkeys(f"{r['stream_gb_s']} GB/s ({r['dtype']} rows)" for r in rows))
    print(f"floor: the step's bytes (weights + KV) at a streaming read's bandwidth, measured in this run: {probes}")
    meta = {**vars(args), "threads": threads, "torch": torch.__version__, "where": where, "model": model_name}
    write_results(args.out, meta, rows, lambda rows, path: plot(rows, path, fast))


if __name__ == "__main__":
    main()
