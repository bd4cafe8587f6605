"""A/B of CPU attention kernel sources in one process: each variant of cpu_paged.cpp built under its own op namespace.

Whole-step timings on a shared machine drift by more than a kernel change moves them; this times variants of
`pensieve/ops/csrc/cpu_paged.cpp` side by side, alternated repetition by repetition over the same pools: a decode
step's attention (one query per sequence, `--layers` distinct KV pools, blocks scattered at random) and, for
reference, a plain `sum` over the same pools (the streaming bandwidth of that minute). `--hot N` points every table
at N blocks (cache-resident: the arithmetic alone). A variant is a path to a cpu_paged.cpp or `git:REV` (the file at
that revision). Prints ms per step, GB/s of KV and each variant's median ratio to the first; writes JSON.

Usage: python benchmarks/attention_ab.py git:HEAD~1 pensieve/ops/csrc/cpu_paged.cpp [--batch 6 --context 1500]
       [--layers 30] [--dtype float32] [--hot 8] [--reps 30]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from kernel import SHAPE, paged_problem
from torch.utils import cpp_extension
from tqdm import tqdm

from pensieve.ops.cpu_kernel import CSRC, _build_flags

ROOT = Path(__file__).resolve().parents[1]

KERNEL = "pensieve/ops/csrc/cpu_paged.cpp"


def source_of(variant: str, tmp: Path) -> Path:
    if not variant.startswith("git:"):
        return Path(variant)
    text = subprocess.run(["git", "show", f"{variant[4:]}:{KERNEL}"], cwd=ROOT, check=True, capture_output=True).stdout
    path = tmp / f"{hashlib.sha256(variant.encode()).hexdigest()[:12]}.cpp"
    path.write_bytes(text)
    return path


def build(source: Path, namespace: str):
    """Builds `source` with its op library renamed to `namespace`; returns its paged_attention op."""
    digest = hashlib.sha256(source.read_bytes() + namespace.encode()).hexdigest()[:12]
    cpp_extension.load(
        name=f"attention_ab_{namespace}_{digest}",
        sources=[str(source)],
        extra_cflags=_build_flags() + [f"-Dpensieve_cpu={namespace}"],
        extra_ldflags=["-fopenmp"],
        extra_include_paths=[str(CSRC)],
        is_python_module=False,
    )
    return getattr(torch.ops, namespace).paged_attention


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variants", nargs="+", help="cpu_paged.cpp paths or git:REV")
    parser.add_argument("--batch", type=int, default=6)
    parser.add_argument("--context", type=int, default=1500, help="keys per sequence")
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--hot", type=int, default=0, help="every table on this many blocks (0: scattered)")
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="results/attention_ab.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    with tempfile.TemporaryDirectory() as tmp:
        ops = [build(source_of(v, Path(tmp)), f"attention_ab{i}") for i, v in enumerate(args.variants)]

    # SmolLM2's attention shape (kernel.SHAPE); one query per sequence that sees --context keys
    gen = torch.Generator().manual_seed(0)
    q, pools, _, (tables, cu, seq_lens) = paged_problem(
        args.batch, args.context - 1, 1, args.layers, dtype, torch.device("cpu"), gen, dense=False
    )
    if args.hot:
        tables = tables % args.hot
    head_dim = SHAPE["head_dim"]

    def step(op):
        return [op(q, k, v, tables, cu, seq_lens, head_dim**-0.5, None, None) for k, v in pools]

    first = step(ops[0])
    for i, op in enumerate(ops[1:], 1):
        diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(step(op), first, strict=True))
        print(f"variant {i}: max |difference| from variant 0 over the layers: {diff:.3g}")
    times: list[list[float]] = [[] for _ in ops]
    stream = []
    for _ in range(3):
        for op in ops:
            step(op)
    for _ in tqdm(range(args.reps), desc="alternated repetitions"):
        for i, op in enumerate(ops):
            t0 = time.perf_counter()
            step(op)
            times[i].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for k, v in pools:
            k.sum()
            v.sum()
        stream.append(time.perf_counter() - t0)

    kv_bytes = 2 * args.layers * tables.numel() * pools[0][0][0].numel() * q.element_size()  # the blocks read
    pool_bytes = 2 * args.layers * pools[0][0].numel() * q.element_size()
    rows = []
    for i, variant in enumerate(args.variants):
        ms = statistics.median(times[i]) * 1e3
        ratio = statistics.median(a / b for a, b in zip(times[i], times[0], strict=True))
        rows.append({"variant": variant, "ms": ms, "kv_gb_s": kv_bytes / ms / 1e6, "ratio_to_first": ratio})
        print(f"{variant}: {ms:.2f} ms per step, {kv_bytes / ms / 1e6:.1f} GB/s of KV, ratio to the first {ratio:.3f}")
    stream_ms = statistics.median(stream) * 1e3
    print(f"plain sum over the pools: {stream_ms:.2f} ms ({pool_bytes / stream_ms / 1e6:.1f} GB/s)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "rows": rows, "stream_ms": stream_ms}, indent=2))
    print(f"json: {out}")


if __name__ == "__main__":
    main()
