"""Paged attention vs SDPA on the same KV laid out contiguously.

Each measured "step" builds fresh metadata tensors (as the engine does every step) and then calls the op once per
layer over --layers distinct KV pools, so the per-step plan is built once and reused by the other layers, exactly
as in a forward pass. The peers see the same KV, per layer, as contiguous [B, Hkv, L, D] tensors:
  sdpa        F.scaled_dot_product_attention(..., enable_gqa=True), the natural call
  sdpa_fold   SDPA with the GQA group folded into query rows (decode only; a stronger peer, for transparency)
Ratios are paged time / sdpa time (lower is better). On CUDA the op dispatches to the Triton kernel.

Usage: python benchmarks/kernel.py [--quick] [--out results/kernel.json]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from plotting import pyplot, save, write_results

from pensieve.ops import paged_attention

SHAPE = {"num_q_heads": 9, "num_kv_heads": 3, "head_dim": 64, "block_size": 16}  # SmolLM2-135M attention


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _median_ms(fn, device, reps: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def paged_problem(batch, context, q_len, layers, dtype, device, gen, dense=True):
    """Per-layer pools with randomly permuted blocks, plus (`dense`) the same KV as contiguous tensors."""
    bs, hkv, d, hq = SHAPE["block_size"], SHAPE["num_kv_heads"], SHAPE["head_dim"], SHAPE["num_q_heads"]
    seq_len = context + q_len
    blocks_per_seq = (seq_len + bs - 1) // bs
    num_blocks = batch * blocks_per_seq + 16
    tables = torch.randperm(num_blocks, generator=gen)[: batch * blocks_per_seq].view(batch, blocks_per_seq)
    pools, copies = [], []
    for _ in range(layers):
        k_cache = torch.randn(num_blocks, bs, hkv, d, generator=gen).to(device, dtype)
        v_cache = torch.randn(num_blocks, bs, hkv, d, generator=gen).to(device, dtype)
        if dense:  # contiguous copies of the same KV: [B, Hkv, L, D]
            pos = torch.arange(seq_len)
            idx = tables[:, pos // bs].to(device), (pos % bs).to(device)
            copies.append((k_cache[idx].transpose(1, 2).contiguous(), v_cache[idx].transpose(1, 2).contiguous()))
        pools.append((k_cache, v_cache))
    q = torch.randn(batch * q_len, hq, d, generator=gen).to(device, dtype)
    meta = (
        tables.int().to(device),
        torch.arange(0, batch * q_len + 1, q_len, dtype=torch.int32, device=device),
        torch.full((batch,), seq_len, dtype=torch.int32, device=device),
    )
    return q, pools, copies, meta


def bench_case(kind, batch, context, q_len, args, device, gen) -> dict:
    dtype = getattr(torch, args.dtype)
    hq, hkv, d = SHAPE["num_q_heads"], SHAPE["num_kv_heads"], SHAPE["head_dim"]
    scale = d**-0.5
    q, pools, dense, meta = paged_problem(batch, context, q_len, args.layers, dtype, device, gen)
    seq_len = context + q_len

    def paged_step():
        tables, cu, lens = (t.clone() for t in meta)  # new metadata every step, as the engine makes it
        for k_cache, v_cache in pools:
            paged_attention(q, k_cache, v_cache, tables, cu, lens, scale)

    q_dense = q.view(batch, q_len, hq, d).transpose(1, 2)  # [B, Hq, q_len, D]
    mask = None
    if q_len > 1 and context > 0:  # bottom-right causal: query i sees keys <= context + i
        mask = torch.ones(q_len, seq_len, dtype=torch.bool, device=device).tril(diagonal=context)

    def sdpa_step():
        for k, v in dense:
            F.scaled_dot_product_attention(
                q_dense, k, v, attn_mask=mask, is_causal=q_len > 1 and context == 0, scale=scale, enable_gqa=True
            )

    row = {"kind": kind, "batch": batch, "context": context, "q_len": q_len}
    row["paged_ms"] = _median_ms(paged_step, device, args.reps) / args.layers
    row["sdpa_ms"] = _median_ms(sdpa_step, device, args.reps) / args.layers
    row["ratio_vs_sdpa"] = row["paged_ms"] / row["sdpa_ms"]
    if q_len == 1:
        q_fold = q.view(batch, hkv, hq // hkv, d)

        def fold_step():
            for k, v in dense:
                F.scaled_dot_product_attention(q_fold, k, v, scale=scale)

        row["sdpa_fold_ms"] = _median_ms(fold_step, device, args.reps) / args.layers
        row["ratio_vs_sdpa_fold"] = row["paged_ms"] / row["sdpa_fold_ms"]
    return row


def cases(quick: bool):
    batches = (1, 8, 32) if quick else (1, 4, 8, 16, 32)
    contexts = (256, 1024) if quick else (256, 1024, 4096)
    for batch in batches:
        for context in contexts:
            yield "decode", batch, context, 1
    news = (32, 512) if quick else (32, 128, 512)
    cached = (0, 1024) if quick else (0, 1024, 4096)
    for q_len in news:
        for context in cached:
            yield "prefill", 1, context, q_len


def plot(rows, path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    labels = [f"{r['kind'][0]} b{r['batch']} c{r['context']} q{r['q_len']}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(8, len(rows) * 0.45), 4))
    ax.bar(range(len(rows)), [r["ratio_vs_sdpa"] for r in rows], color="tab:blue")
    ax.axhline(1.0, color="black", lw=0.8)
    ax.axhline(1.3, color="tab:red", lw=0.8, ls="--", label="decode target 1.3x")
    ax.set_xticks(range(len(rows)), labels, rotation=70, fontsize=7)
    ax.set_ylabel("paged / contiguous SDPA time")
    ax.set_title("pensieve paged attention vs SDPA on contiguous KV")
    ax.legend()
    save(fig, path)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer shapes (the demo runs this)")
    parser.add_argument("--layers", type=int, default=4, help="distinct KV pools per step (plan built once)")
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="results/kernel.json")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    backend = "triton" if device.type == "cuda" else "torch-cpu"
    print(f"paged attention ({backend}) vs SDPA, {args.dtype}, {torch.get_num_threads()} threads, shape {SHAPE}")
    print(f"{'kind':8}{'batch':>6}{'context':>8}{'q_len':>6}{'paged ms':>10}{'sdpa ms':>9}{'ratio':>7}{'vs fold':>8}")
    rows = []
    for kind, batch, context, q_len in cases(args.quick):
        row = bench_case(kind, batch, context, q_len, args, device, gen)
        rows.append(row)
        fold = f"{row['ratio_vs_sdpa_fold']:.2f}x" if "ratio_vs_sdpa_fold" in row else ""
        print(
            f"{kind:8}{batch:>6}{context:>8}{q_len:>6}{row['paged_ms']:>10.3f}{row['sdpa_ms']:>9.3f}"
            f"{row['ratio_vs_sdpa']:>6.2f}x{fold:>8}",
            flush=True,
        )
    decode = [r["ratio_vs_sdpa"] for r in rows if r["kind"] == "decode"]
    print(f"decode: median ratio {statistics.median(decode):.2f}x, worst {max(decode):.2f}x (target <= 1.3x)")
    meta = {
        "device": str(device),
        "backend": backend,
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "layers": args.layers,
        "torch": torch.__version__,
        "machine": platform.machine(),
        **SHAPE,
    }
    write_results(args.out, meta, rows, plot)


if __name__ == "__main__":
    main()
