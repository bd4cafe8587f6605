"""Cluster routing and P/D on this machine: prompt_tree vs session vs round_robin, colocated vs prefill/decode.

Workload (multi-tenant, raw token ids, seeded): K system prompts of --system-tokens tokens (a multiple of the block
size), N conversations (conversation i behind prompt i % K), each --turns turns of ShareGPT-length user messages
(lognormal, mean 37.8 tokens) and replies of --reply-tokens tokens (greedy, EOS ignored). Conversations arrive over
time (exponential gaps, mean --gap-s) and run closed-loop (next turn when the reply is done, after --think-s).
Every turn is streamed through `Cluster.stream`; TTFT is measured on the driver (routing, transfers and a P/D
prefill included).

Configurations, each on a fresh cluster of SmolLM2-135M instances (one torch thread each):
  colocated x2 with each policy (prompt_tree, session, round_robin), and P/D (1 prefill + 1 decode) with and
  without send-back.
Reported per configuration: cache hit rate (reused / (reused + prefilled) positions), prefilled tokens, recomputed
tokens (= prefilled - the minimum a single instance with an unbounded shared cache would prefill: each system prompt
once, each turn's new tokens plus the previous reply's last token), transferred tokens, TTFT p50/p99, job completion
time, output tok/s; and P/D's prefilled / new tokens on turns after the first.

Usage: python benchmarks/cluster.py [--conversations 16] [--prompts 4] [--system-tokens 320] [--turns 3]
           [--reply-tokens 24] [--gap-s 0.5] [--configs all] [--dtype float32]
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import statistics
import threading
import time
from pathlib import Path

import torch
from multiturn import SHAREGPT, lognormal_int
from plotting import cpu_name, pyplot, run_threads, save
from tqdm import tqdm

from pensieve import CacheConfig, EngineConfig, SamplingParams
from pensieve.models.smollm2 import smollm2_model

BLOCK_SIZE = 16
CONFIGS = {
    "prompt_tree": (["colocated", "colocated"], "prompt_tree", True),
    "session": (["colocated", "colocated"], "session", True),
    "round_robin": (["colocated", "colocated"], "round_robin", True),
    "pd": (["prefill", "decode"], "prompt_tree", True),
    "pd_no_send_back": (["prefill", "decode"], "prompt_tree", False),
}


def make_workload(args):
    """-> (per conversation: arrival time, user messages per turn; turn 0 opens with its system prompt), prompts."""
    rng = random.Random(args.seed)
    systems = [[rng.randrange(1000, 40000) for _ in range(args.system_tokens)] for _ in range(args.prompts)]
    convs, t = [], 0.0
    for i in range(args.conversations):
        msgs = [[rng.randrange(1000, 40000) for _ in range(lognormal_int(rng, SHAREGPT["user"], 0.6))]
                for _ in range(args.turns)]  # fmt: skip
        msgs[0] = systems[i % args.prompts] + msgs[0]
        convs.append((t, msgs))
        t += rng.expovariate(1.0 / args.gap_s)
    return convs, systems


def run_config(name: str, args, convs) -> dict:
    from pensieve.cluster import Cluster, RouterConfig

    roles, policy, send_back = CONFIGS[name]
    cluster = Cluster(
        functools.partial(smollm2_model, args.dtype),
        roles=roles,
        cache_config=CacheConfig(block_size=BLOCK_SIZE, num_device_blocks=args.device_blocks),
        engine_config=EngineConfig(compile=args.compile),
        router_config=RouterConfig(policy=policy),
        num_threads=1,
        send_back=send_back,
    )
    try:
        sampling = SamplingParams(max_new_tokens=args.reply_tokens, temperature=0, ignore_eos=True)
        cluster.complete([1, 2, 3], SamplingParams(max_new_tokens=2, ignore_eos=True))  # untimed: warms every path
        turns: list[dict] = []
        lock = threading.Lock()
        progress = tqdm(total=len(convs) * args.turns, desc=name, leave=False)
        start = time.perf_counter()

        def conversation(i: int) -> None:
            arrival, msgs = convs[i]
            time.sleep(max(0.0, start + arrival - time.perf_counter()))
            for t, msg in enumerate(msgs):
                t0 = time.perf_counter()
                stream = cluster.stream(f"c{i}", msg, sampling)
                next(stream)
                ttft = time.perf_counter() - t0
                reply = stream.reply
                row = {"conv": i, "turn": t, "ttft_s": ttft, "latency_s": time.perf_counter() - t0,
                       "new": reply.num_new_tokens, "prefilled": reply.num_prefilled,
                       "recomputed": reply.num_recomputed, "output": len(reply.token_ids),
                       "reused": reply.num_reused_device + reply.num_reused_host + reply.num_reused_disk}  # fmt: skip
                with lock:
                    turns.append(row)
                    progress.update()
                time.sleep(args.think_s)

        run_threads([threading.Thread(target=conversation, args=(i,)) for i in range(len(convs))])
        jct = time.perf_counter() - start
        progress.close()
        stats = cluster.stats()
    finally:
        cluster.close()
    if len(turns) != len(convs) * args.turns:
        raise RuntimeError(f"{name}: {len(turns)} turns completed of {len(convs) * args.turns}")
    return summarize(name, roles, policy, turns, stats, jct, args)


def measure_transfer(args, sizes=(256, 1024, 2048)) -> list[dict]:
    """Moving a prefix between two instances (MemPool read -> receive, through the object store or the collective
    group) vs computing it there: what the router's cost model weighs."""
    return [row for transport in ("object_store", "collective") for row in _measure_transfer(args, transport, sizes)]


def _measure_transfer(args, transport: str, sizes) -> list[dict]:
    import ray

    from pensieve.cluster import Cluster

    cluster = Cluster(
        functools.partial(smollm2_model, args.dtype),
        roles=["colocated", "colocated"],
        cache_config=CacheConfig(block_size=BLOCK_SIZE, num_device_blocks=args.device_blocks),
        engine_config=EngineConfig(compile=args.compile),
        num_threads=1,
        transport=transport,
    )
    rows = []
    try:
        a, b = cluster.handle("colocated-0"), cluster.handle("colocated-1")
        one = SamplingParams(max_new_tokens=1, temperature=0, ignore_eos=True)
        rng = random.Random(args.seed + 1)
        warm = [rng.randrange(1000, 40000) for _ in range(2 * BLOCK_SIZE)]  # untimed: the first transfer's setup
        ray.get(a.complete.remote(warm, one, None))
        ray.get(
            b.receive.remote(
                cluster._send("colocated-0", "colocated-1", a.read.remote(warm, 0, None, transport == "collective"))
            )
        )
        for n in tqdm(sizes, desc="transfer", leave=False):
            tokens = [rng.randrange(1000, 40000) for _ in range(n)]
            t0 = time.perf_counter()
            ray.get(a.complete.remote(tokens, one, None))
            compute = time.perf_counter() - t0
            t0 = time.perf_counter()
            payload = a.read.remote(tokens, 0, None, transport == "collective")
            inserted = ray.get(b.receive.remote(cluster._send("colocated-0", "colocated-1", payload)))
            move = time.perf_counter() - t0
            nbytes = ray.get(payload).nbytes
            assert ray.get(b.match.remote(tokens)) == n, "the moved prefix is not cached on the receiver"
            rows.append({"transport": transport, "tokens": n, "compute_s": compute, "transfer_s": move,
                         "bytes": nbytes, "chunks": inserted, "transfer_MB_s": nbytes / move / 1e6,
                         "prefill_tok_s": n / compute})  # fmt: skip
    finally:
        cluster.close()
    return rows


def summarize(name, roles, policy, turns, stats, jct, args) -> dict:
    prefilled = sum(t["prefilled"] for t in turns)
    reused = sum(t["reused"] for t in turns)
    # The minimum: each system prompt computed once, then only what no instance ever computed.
    minimum = args.prompts * args.system_tokens + sum(
        t["new"] - (args.system_tokens if t["turn"] == 0 else -1) for t in turns
    )
    later = [t for t in turns if t["turn"] > 0]
    ttfts = sorted(t["ttft_s"] for t in turns)
    return {
        "config": name,
        "roles": roles,
        "policy": policy,
        "turns": len(turns),
        "hit_rate": reused / max(reused + prefilled, 1),
        "prefilled": prefilled,
        "minimum_prefill": minimum,
        "recomputed": prefilled - minimum,
        "recomputed_history": sum(t["recomputed"] for t in turns),
        "transferred_tokens": stats.get("transferred_tokens", 0),
        "transfers": stats.get("transfers", 0),
        "sendbacks": stats.get("sendbacks", 0),
        "later_prefill_per_new": sum(t["prefilled"] for t in later) / max(sum(t["new"] for t in later), 1),
        "ttft_p50_s": statistics.median(ttfts),
        "ttft_p99_s": ttfts[min(len(ttfts) - 1, round(0.99 * (len(ttfts) - 1)))],
        "jct_s": jct,
        "output_tok_s": sum(t["output"] for t in turns) / jct,
        "routes": {k: v for k, v in stats.items() if k.startswith("routed_")},
        "per_instance_turns": {n: s["turns_completed"] for n, s in stats["per_instance"].items()},
        "rows": turns,
    }


def plot(summaries: list[dict], path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    names = [s["config"] for s in summaries]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    axes[0].bar(names, [s["recomputed"] for s in summaries])
    axes[0].set_title("recomputed tokens (prefilled - minimum)")
    axes[1].bar(names, [s["ttft_p50_s"] for s in summaries], label="p50")
    axes[1].bar(names, [s["ttft_p99_s"] - s["ttft_p50_s"] for s in summaries],
                bottom=[s["ttft_p50_s"] for s in summaries], label="p99", alpha=0.6)  # fmt: skip
    axes[1].set_title("TTFT (s)")
    axes[1].legend()
    axes[2].bar(names, [s["jct_s"] for s in summaries])
    axes[2].set_title("job completion time (s)")
    for ax in axes:
        ax.tick_params(axis="x", rotation=30)
    save(fig, path)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conversations", type=int, default=16)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--system-tokens", type=int, default=320)
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--reply-tokens", type=int, default=24)
    parser.add_argument("--gap-s", type=float, default=0.5)
    parser.add_argument("--think-s", type=float, default=0.2)
    parser.add_argument("--device-blocks", type=int, default=1024)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--compile", action="store_true", help="torch.compile decode steps (minutes per instance)")
    parser.add_argument("--configs", default="all", help=f"comma-separated of {list(CONFIGS)}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results/cluster.json")
    args = parser.parse_args(argv)
    if args.system_tokens % BLOCK_SIZE:
        parser.error(f"--system-tokens must be a multiple of {BLOCK_SIZE}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    import ray

    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=512 * 2**20, log_to_driver=False)
    names = list(CONFIGS) if args.configs == "all" else args.configs.split(",")
    convs, _ = make_workload(args)
    summaries = [run_config(name, args, convs) for name in names]
    transfers = measure_transfer(args)
    ray.shutdown()
    print(f"\n{len(convs)} conversations x {args.turns} turns, {args.prompts} system prompts of {args.system_tokens}"
          f" tokens, replies {args.reply_tokens} tokens, {args.dtype}, 2 instances x 1 thread")  # fmt: skip
    header = ("config", "hit rate", "prefilled", "recomputed", "moved tok", "TTFT p50", "TTFT p99", "JCT s", "tok/s",
              "later pre/new")  # fmt: skip
    print(" | ".join(header))
    for s in summaries:
        print(f"{s['config']} | {s['hit_rate']:.2f} | {s['prefilled']} | {s['recomputed']} | "
              f"{s['transferred_tokens']} | {s['ttft_p50_s']:.3f} | {s['ttft_p99_s']:.3f} | {s['jct_s']:.1f} | "
              f"{s['output_tok_s']:.1f} | {s['later_prefill_per_new']:.2f}")  # fmt: skip
    by = {s["config"]: s for s in summaries}
    if {"prompt_tree", "round_robin", "session"} <= set(by):
        pt, rr, se = by["prompt_tree"], by["round_robin"], by["session"]
        print(f"prompt_tree recomputes {1 - pt['recomputed'] / max(rr['recomputed'], 1):.0%} fewer tokens than "
              f"round_robin, {1 - pt['recomputed'] / max(se['recomputed'], 1):.0%} fewer than session; "
              f"TTFT p99 {pt['ttft_p99_s']:.3f} vs {rr['ttft_p99_s']:.3f} / {se['ttft_p99_s']:.3f} s")  # fmt: skip
    print("moving a prefix between instances vs computing it (one instance, 1 thread):")
    for t in transfers:
        print(f"  {t['transport']}, {t['tokens']} tokens: compute {t['compute_s']:.2f} s "
              f"({t['prefill_tok_s']:.0f} tok/s), transfer {t['transfer_s'] * 1e3:.0f} ms "
              f"({t['bytes'] / 1e6:.1f} MB, {t['transfer_MB_s']:.0f} MB/s)")  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"args": vars(args), "machine": cpu_name(), "torch": torch.__version__, "time": time.ctime()}
    out.write_text(json.dumps({"meta": meta, "rows": summaries, "transfer": transfers}, indent=1))
    print(f"results: {out}")
    plot(summaries, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
