"""Over-subscription: the multi-turn workload with device capacity from 100% down to 1/8 of its working set.

Workload: N conversations with lognormal user lengths (ShareGPT mean 37.8) and a fixed number of turns; replies of
a seeded lognormal length (EOS ignored, greedy). Users come back in a seeded random order (closed loop: the next
turn of a conversation only after its reply; `--order round-robin` for a strict cycle), C turns at a time (one
generate_batch per group), so most conversations are idle while others talk — the access pattern that makes a
cache policy matter. The working set is the KV of every conversation at the end, in blocks.

For each device capacity (a fraction of the working set, never below what one turn needs) and each tier setup
  device        device tier only: what leaves the device is dropped
  +host         a host tier as large as the device tier
  +host+disk    and a disk tier (unbounded; nothing is ever dropped)
the two policies run the same workload: Pensieve (recompute cost / idle time, leading chunks first) and LRU (whole
conversations). Reported per run: output tokens/s, recomputed tokens, hit rate per tier (history positions found on
device / host / disk over all history positions), TTFT p50/p90; and Pensieve's recomputed tokens relative to LRU's
in the same setup. JSON + PNG.

Usage: python benchmarks/oversubscription.py [--conversations 12] [--turns 3] [--reply-mean 16] [--quick]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from multiturn import SHAREGPT, load_model, lognormal_int  # noqa: E402
from plotting import pyplot, save  # noqa: E402

from pensieve import CacheConfig, SamplingParams, StatefulGenerator  # noqa: E402
from pensieve.cache.policy import RecomputeCost  # noqa: E402
from pensieve.config import SchedulerConfig  # noqa: E402
from pensieve.models.support import model_shape  # noqa: E402

BLOCK_SIZE = 16
TIERS = ("device", "+host", "+host+disk")
POLICIES = ("pensieve", "lru")


def make_workload(args) -> tuple[list[list[list[int]]], list[tuple[list[int], int]]]:
    """-> user messages per conversation per turn, and the schedule: groups of conversations (indices) sent together
    in one generate_batch, in order, each with its reply length."""
    rng = random.Random(args.seed)

    def message() -> list[int]:
        return [rng.randrange(1000, 40000) for _ in range(lognormal_int(rng, args.user_mean, 0.6))]

    convs = [[message() for _ in range(args.turns)] for _ in range(args.conversations)]
    if args.order == "round-robin":
        order = [i for _ in range(args.turns) for i in range(len(convs))]
    else:  # every conversation's turns in a random interleaving
        order = [i for i in range(len(convs)) for _ in range(args.turns)]
        rng.shuffle(order)
    groups: list[list[int]] = []
    for i in order:  # C at a time, never two turns of one conversation in one group
        if groups and len(groups[-1]) < args.concurrency and i not in groups[-1]:
            groups[-1].append(i)
        else:
            groups.append([i])
    return convs, [(g, lognormal_int(rng, args.reply_mean, 0.4, lo=4)) for g in groups]


def working_set(convs, schedule) -> tuple[int, int]:
    """(blocks of every conversation's final KV, blocks one turn needs at most)."""
    lengths = [sum(len(m) for m in c) for c in convs]
    for group, reply_len in schedule:
        for i in group:
            lengths[i] += reply_len
    return sum(math.ceil(n / BLOCK_SIZE) for n in lengths), math.ceil(max(lengths) / BLOCK_SIZE)


def run(model, convs, schedule, device_blocks: int, tiers: str, policy: str, cost: RecomputeCost) -> dict:
    disk_dir = tempfile.mkdtemp(prefix="pensieve-oversub-") if "disk" in tiers else None
    cache = CacheConfig(
        block_size=BLOCK_SIZE,
        num_device_blocks=device_blocks,
        num_host_blocks=device_blocks if "host" in tiers else 0,
        disk_dir=disk_dir,
        policy=policy,
    )
    rows = []
    try:
        with StatefulGenerator(model, cache_config=cache, scheduler_config=SchedulerConfig(512)) as gen:
            turn_of = [0] * len(convs)
            t0 = time.perf_counter()
            for group, reply_len in schedule:
                sp = SamplingParams(max_new_tokens=reply_len, temperature=0, ignore_eos=True)
                batch = {str(i): convs[i][turn_of[i]] for i in group}
                for conv_id, reply in gen.generate_batch(batch, sp).items():
                    rows.append({"conv": conv_id, "turn": turn_of[int(conv_id)], **_reply_row(reply)})
                    turn_of[int(conv_id)] += 1
            wall_s = time.perf_counter() - t0
            stats = gen.stats()
    finally:
        if disk_dir is not None:
            shutil.rmtree(disk_dir, ignore_errors=True)
    history = sum(r["device"] + r["host"] + r["disk"] + r["recomputed"] for r in rows)
    ttft = sorted(r["ttft"] for r in rows)
    return {
        "tiers": tiers,
        "policy": policy,
        "device_blocks": device_blocks,
        "wall_s": wall_s,
        "output_tok_s": sum(len(r["tokens"]) for r in rows) / wall_s,
        "recomputed_tokens": sum(r["recomputed"] for r in rows),
        # both policies recompute leading ranges: [0, n) for a reply that recomputed n positions
        "recompute_gflop": sum(cost.chunk(0, r["recomputed"]) for r in rows) / 1e9,
        "prefilled_tokens": sum(r["prefilled"] for r in rows),
        "history_tokens": history,
        "hit_rate": {tier: sum(r[tier] for r in rows) / max(history, 1) for tier in ("device", "host", "disk")},
        "ttft_p50_s": statistics.median(ttft),
        "ttft_p90_s": ttft[min(len(ttft) - 1, int(0.9 * len(ttft)))],
        "cache_stats": {k: v for k, v in stats.items() if isinstance(v, int)},
        "rows": rows,
    }


def _reply_row(reply) -> dict:
    return {
        "tokens": reply.token_ids,
        "device": reply.num_reused_device,
        "host": reply.num_reused_host,
        "disk": reply.num_reused_disk,
        "recomputed": reply.num_recomputed,
        "prefilled": reply.num_prefilled,
        "ttft": reply.ttft_s,
    }


def plot(results: list[dict], path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    setups = list(dict.fromkeys(r["tiers"] for r in results))
    fig, axes = plt.subplots(1, len(setups), figsize=(5 * len(setups), 4), squeeze=False)
    for tiers, ax in zip(setups, axes[0], strict=True):
        for policy, style in zip(POLICIES, ("-o", "--s"), strict=True):
            runs = sorted((r for r in results if r["tiers"] == tiers and r["policy"] == policy),
                          key=lambda r: -r["fraction"])  # fmt: skip
            ax.plot([f"1/{round(1 / r['fraction'])}" for r in runs], [r["recomputed_tokens"] for r in runs], style,
                    label=policy)  # fmt: skip
        ax.set_title(f"{tiers}: recomputed tokens")
        ax.set_xlabel("device capacity / working set")
        ax.legend()
    save(fig, path)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="local HF checkpoint (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--conversations", type=int, default=12)
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=2, help="conversations per generate_batch")
    parser.add_argument("--order", choices=("random", "round-robin"), default="random")
    parser.add_argument("--user-mean", type=float, default=SHAREGPT["user"])
    parser.add_argument("--reply-mean", type=float, default=16, help=f"ShareGPT: {SHAREGPT['reply']}")
    parser.add_argument("--fractions", default="1,0.5,0.25,0.125")
    parser.add_argument("--tiers", default=",".join(TIERS))
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a random 2-layer model (smoke test, not a measurement)")
    parser.add_argument("--out", default="results/oversubscription.json")
    args = parser.parse_args(argv)

    if args.quick:
        import transformers as tf

        torch.manual_seed(0)
        config = tf.LlamaConfig(vocab_size=40000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)  # fmt: skip
        model = tf.LlamaForCausalLM(config).eval()
    else:
        model = load_model(args)
    convs, schedule = make_workload(args)
    ws_blocks, turn_blocks = working_set(convs, schedule)
    print(f"{len(convs)} conversations x {args.turns} turns, {args.order} order, {len(schedule)} batches, "
          f"working set {ws_blocks} blocks "
          f"of {BLOCK_SIZE}, one turn needs <= {turn_blocks}; {torch.get_num_threads()} threads, "
          f"{platform.machine()}")  # fmt: skip
    shape = model_shape(model)
    cost = RecomputeCost.for_model(model, shape.num_layers, shape.num_heads, shape.head_dim)
    results = []
    for tiers in args.tiers.split(","):
        for fraction in map(float, args.fractions.split(",")):
            device_blocks = max(math.ceil(fraction * ws_blocks), turn_blocks * args.concurrency)
            for policy in POLICIES:
                r = run(model, convs, schedule, device_blocks, tiers, policy, cost)
                r["fraction"] = fraction
                results.append(r)
                hits = " ".join(f"{k} {v:5.1%}" for k, v in r["hit_rate"].items())
                print(f"{tiers:11} 1/{round(1 / fraction):<3} {device_blocks:5} blk {policy:9} "
                      f"{r['output_tok_s']:7.1f} tok/s  recomputed {r['recomputed_tokens']:6} tok "
                      f"{r['recompute_gflop']:7.1f} GFLOP  hits {hits}  "
                      f"TTFT p50 {r['ttft_p50_s'] * 1e3:6.0f} p90 {r['ttft_p90_s'] * 1e3:6.0f} ms",
                      flush=True)  # fmt: skip

    reference = {r["conv"] + "/" + str(r["turn"]): r["tokens"] for r in results[0]["rows"]}
    print("\nPensieve vs LRU, same setup (recomputed tokens and analytic recompute GFLOP: pensieve / lru):")
    for tiers in args.tiers.split(","):
        for fraction in map(float, args.fractions.split(",")):
            pair = {r["policy"]: r for r in results if r["tiers"] == tiers and r["fraction"] == fraction}
            cells = []
            for key in ("recomputed_tokens", "recompute_gflop"):
                p, lru = pair["pensieve"][key], pair["lru"][key]
                ratio = f"{1 - p / lru:+.0%} fewer" if lru else "n/a"
                cells.append(f"{p:9.1f} / {lru:<9.1f} {ratio:>11}")
            print(f"  {tiers:11} 1/{round(1 / fraction):<3} " + "   ".join(cells))
    same = sum(
        r2["tokens"] == reference[r2["conv"] + "/" + str(r2["turn"])] for r in results for r2 in r["rows"]
    )  # fmt: skip
    total = sum(len(r["rows"]) for r in results)
    print(f"replies identical to the first run's: {same}/{total} (float32: recompute batching may flip a near-tie)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {**vars(args), "threads": torch.get_num_threads(), "torch": torch.__version__, "schedule": schedule,
            "working_set_blocks": ws_blocks, "turn_blocks": turn_blocks}  # fmt: skip
    for r in results:
        for row in r["rows"]:
            row.pop("tokens")
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print(f"json: {out}")
    plot(results, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
