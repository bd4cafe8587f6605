"""The linears of a decode step: pensieve's streaming kernel vs the packed (brgemm) path vs at::linear, by rows.

SmolLM2-135M's linear shapes (30 layers of q, k, v, o, gate, up, down, each layer with weights of its own; the LM
head with `--head`) with random weights, x of M rows. Each rep runs all 30 layers once per path, the paths
alternated rep by rep so that drift of this shared machine hits them alike; the median is reported. "streaming" is
`pensieve_cpu::linear` without a packed weight (it hands M above 24 fp32 / 10 bf16 rows to at::linear itself),
"packed" the same op with the weights packed by `pensieve_cpu::pack_weight` (fp32: 2..16 rows through the op's FMA
loop, 17..256 through brgemm; bf16: 1..256 through brgemm; the rest as streaming), "at::linear" is `F.linear`.
JSON + PNG.

Usage: python benchmarks/linear.py [--dtypes float32,bfloat16] [--rows 1,2,4,8,16,32,64,256,1024] [--reps 7]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from plotting import pyplot, save, write_results
from tqdm import tqdm

from pensieve.ops import cpu_kernel

HIDDEN, INTER, KV, VOCAB, LAYERS = 576, 1536, 192, 49152, 30
# (N, K) of one layer: q, k, v, o, gate, up, down
SHAPES = [
    (HIDDEN, HIDDEN),
    (KV, HIDDEN),
    (KV, HIDDEN),
    (HIDDEN, HIDDEN),
    (INTER, HIDDEN),
    (INTER, HIDDEN),
    (HIDDEN, INTER),
]


def run_dtype(dtype: torch.dtype, args) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    # Every layer has weights of its own, as in the model: a pass streams them all from memory (reusing one layer's
    # weights 30 times would measure the caches, not the memory).
    layers = [[(torch.randn(n, k, generator=gen) * 0.05).to(dtype) for n, k in SHAPES] for _ in range(LAYERS)]
    head = [(torch.randn(VOCAB, HIDDEN, generator=gen) * 0.05).to(dtype)] if args.head else []
    weights = [w for layer in layers for w in layer] + head  # in the order of a forward pass
    inputs = [w.shape[1] for w in weights]
    packable = bool(torch.ops.pensieve_cpu.can_pack(dtype))
    packed = [torch.ops.pensieve_cpu.pack_weight(w) if packable else None for w in weights]
    ops = torch.ops.pensieve_cpu
    paths = {
        "streaming": lambda x, i: ops.linear(x, weights[i], None),
        "at::linear": lambda x, i: F.linear(x, weights[i]),
    }
    if packable:
        paths["packed"] = lambda x, i: ops.linear(x, weights[i], None, packed[i])
    rows = []
    for m in tqdm(args.rows, desc=str(dtype).removeprefix("torch.")):
        xs = {k: torch.randn(m, k, generator=gen).to(dtype) for k in set(inputs)}
        times: dict[str, list[float]] = {name: [] for name in paths}
        for rep in range(args.reps + 1):
            for name, fn in paths.items():
                t0 = time.perf_counter()
                for i, k in enumerate(inputs):
                    fn(xs[k], i)
                if rep > 0:  # rep 0 warms every path
                    times[name].append((time.perf_counter() - t0) * 1e3)
        row = {"dtype": str(dtype).removeprefix("torch."), "rows": m}
        row.update({f"{name}_ms": statistics.median(ts) for name, ts in times.items()})
        rows.append(row)
    return rows


def plot(rows: list[dict], path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    dtypes = sorted({r["dtype"] for r in rows})
    fig, axes = plt.subplots(1, len(dtypes), figsize=(4.5 * len(dtypes), 3.8), squeeze=False)
    for ax, dtype in zip(axes[0], dtypes, strict=True):
        sel = [r for r in rows if r["dtype"] == dtype]
        for key in ("streaming_ms", "packed_ms", "at::linear_ms"):
            if key in sel[0]:
                ax.plot([r["rows"] for r in sel], [r[key] for r in sel], marker="o", label=key.removesuffix("_ms"))
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("rows (M)")
        ax.set_ylabel(f"ms for {LAYERS} layers of linears")
        ax.set_title(dtype)
        ax.legend(fontsize=7)
    save(fig, path)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--rows", default="1,2,4,8,16,32,64,256,1024")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--head", action="store_true", help="include the LM head (49152 x 576), once per pass")
    parser.add_argument("--out", default="results/linear.json")
    args = parser.parse_args(argv)
    args.rows = [int(m) for m in args.rows.split(",")]
    if not cpu_kernel.load():
        raise SystemExit("the C++ CPU kernels could not be built here")
    print(f"SmolLM2-135M linears x {LAYERS} layers, {torch.get_num_threads()} threads, torch {torch.__version__}")
    rows = []
    for name in args.dtypes.split(","):
        rows += run_dtype(getattr(torch, name), args)
    print(f"\n{'dtype':10}{'rows':>6}{'streaming ms':>14}{'packed ms':>11}{'at::linear ms':>15}{'packed x':>10}")
    for r in rows:
        packed = r.get("packed_ms", float("nan"))
        best_other = min(r["streaming_ms"], r["at::linear_ms"])
        print(f"{r['dtype']:10}{r['rows']:>6}{r['streaming_ms']:>14.1f}{packed:>11.1f}{r['at::linear_ms']:>15.1f}"
              f"{best_other / packed:>9.2f}x")  # fmt: skip
    meta = {**vars(args), "threads": torch.get_num_threads(), "torch": torch.__version__}
    write_results(args.out, meta, rows, plot)


if __name__ == "__main__":
    main()
