"""Shared prefixes: N conversations behind K long system prompts, through the prompt tree and without it.

Workload: K system prompts of ~--system-tokens tokens (raw token ids), N conversations (conversation i uses prompt
i % K), then ShareGPT-shaped turns (user ~37.8 tokens, replies lognormal around --reply-mean, --turns turns); greedy,
EOS ignored, lock-step rounds (round t sends turn t of every conversation at once), as benchmarks/multiturn.py.
Peers, each in the same run on the same model, dtype and threads:
  pensieve            conversation ids, prefix sharing on (CacheConfig.share_prefixes)
  pensieve_private    conversation ids, sharing off: every conversation computes and stores its system prompt
  pensieve_stateless  a stateless client: complete_batch() resending each conversation's whole history every turn
  hf_cb               HF generate_batch (continuous batching, prefix sharing over 16-token pages), full histories
  vllm                vLLM's CPU build (prefix caching on), full histories, in its own venv (--vllm-python)
Reported: output tokens/s, first-turn TTFT p50, prefilled tokens / new tokens (all turns / the turns after the
first: a resent history's cost), and for pensieve the device blocks
in use after each round against the bound (unique tokens / block size + 1 per conversation). Separately, the TTFT of
one conversation's first turn with its system prompt already cached vs cold (batch 1, median of --ttft-repeats).

Usage: python benchmarks/shared_prefix.py [--conversations 32] [--prompts 4] [--system-tokens 1000]
           [--turns 3] [--reply-mean 32] [--dtype float32] [--vllm-python .venv-vllm/bin/python]
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import time
from pathlib import Path

import torch
from multiturn import SHAREGPT, lognormal_int, run_hf_cb, run_vllm, summarize
from plotting import cpu_name, pyplot, save
from tqdm import tqdm

from pensieve import CacheConfig, EngineConfig, SamplingParams, StatefulGenerator

BLOCK_SIZE = 16


def make_workload(args) -> tuple[list[list[list[int]]], list[int], list[list[int]]]:
    """-> user messages per conversation per turn (turn 0 opens with its system prompt), reply length per round,
    the system prompts."""
    rng = random.Random(args.seed)
    systems = [[rng.randrange(1000, 40000) for _ in range(args.system_tokens)] for _ in range(args.prompts)]
    convs = []
    for i in range(args.conversations):
        msgs = [[rng.randrange(1000, 40000) for _ in range(lognormal_int(rng, SHAREGPT["user"], 0.6))]
                for _ in range(args.turns)]  # fmt: skip
        msgs[0] = systems[i % args.prompts] + msgs[0]
        convs.append(msgs)
    reply_lens = [lognormal_int(rng, args.reply_mean, 0.4, lo=4) for _ in range(args.turns)]
    return convs, reply_lens, systems


def _generator(model, args, share: bool) -> StatefulGenerator:
    cache = CacheConfig(block_size=BLOCK_SIZE, num_device_blocks=args.device_blocks, share_prefixes=share)
    gen = StatefulGenerator(model, cache_config=cache, engine_config=EngineConfig(compile="auto"))
    warm = SamplingParams(max_new_tokens=3, ignore_eos=True)  # untimed: compiles the decode steps
    gen.generate_batch({f"warmup{i}": [1000 + i, 1001, 1002] for i in range(2)}, warm)
    gen.generate("warmup", [1000, 1001, 1002], warm)
    for conv_id in ("warmup", "warmup0", "warmup1"):
        gen.end(conv_id, forget=True)
    return gen


def _blocks_in_use(gen: StatefulGenerator) -> int:
    stats = gen.stats()
    return stats["device_blocks_total"] - stats["device_blocks_free"]


def run_pensieve(model, convs, reply_lens, args, share: bool = True, stateless: bool = False) -> list[dict]:
    rows = []
    histories = [[] for _ in convs]
    name = "pensieve" + ("_stateless" if stateless else "" if share else "_private")
    with _generator(model, args, share) as gen:
        for t, reply_len in enumerate(tqdm(reply_lens, desc=name, leave=False)):
            live = [i for i, c in enumerate(convs) if t < len(c)]
            sp = SamplingParams(max_new_tokens=reply_len, temperature=0, ignore_eos=True)
            t0 = time.perf_counter()
            if stateless:
                replies = gen.complete_batch([histories[i] + convs[i][t] for i in live], sp)
            else:
                by_id = gen.generate_batch({str(i): convs[i][t] for i in live}, sp)
                replies = [by_id[str(i)] for i in live]
            elapsed = time.perf_counter() - t0
            blocks = _blocks_in_use(gen)
            for i, reply in zip(live, replies, strict=True):
                histories[i] += convs[i][t] + reply.token_ids
                rows.append({"conv": i, "turn": t, "new": len(convs[i][t]), "prefilled": reply.num_prefilled,
                             "output": len(reply.token_ids), "ttft": reply.ttft_s, "latency": reply.latency_s,
                             "round_s": elapsed, "tokens": reply.token_ids, "blocks_in_use": blocks,
                             "reused_shared": reply.num_reused_shared})  # fmt: skip
    return rows


def block_bound(convs, reply_lens, systems, turns_done: int) -> int:
    """The issue's bound on device blocks after `turns_done` rounds: unique tokens / block size, + 1 a conversation."""
    unique = sum(map(len, systems))
    for c in convs:
        unique += sum(len(m) for m in c[:turns_done]) + sum(reply_lens[:turns_done]) - len(systems[0])
    return unique // BLOCK_SIZE + len(convs)


def ttft_cached_vs_cold(model, args) -> dict:
    """One conversation's first turn (batch 1): its system prompt cached by another conversation, vs cold."""
    rng = random.Random(args.seed + 1)
    sp = SamplingParams(max_new_tokens=4, temperature=0, ignore_eos=True)
    cold, cached = [], []
    with _generator(model, args, share=True) as gen:
        for r in tqdm(range(args.ttft_repeats), desc="ttft cached vs cold", leave=False):
            system = [rng.randrange(1000, 40000) for _ in range(args.system_tokens)]
            msg = lambda: [rng.randrange(1000, 40000) for _ in range(38)]  # noqa: E731
            cold.append(gen.generate(f"cold{r}", system + msg(), sp).ttft_s)
            cached.append(gen.generate(f"cached{r}", system + msg(), sp).ttft_s)
    return {"cold_s": statistics.median(cold), "cached_s": statistics.median(cached),
            "ratio": statistics.median(cached) / statistics.median(cold), "all_cold_s": cold,
            "all_cached_s": cached}  # fmt: skip


PEERS = {
    "pensieve": lambda m, c, r, a: run_pensieve(m, c, r, a, share=True),
    "pensieve_private": lambda m, c, r, a: run_pensieve(m, c, r, a, share=False),
    "pensieve_stateless": lambda m, c, r, a: run_pensieve(m, c, r, a, share=True, stateless=True),
    "hf_cb": run_hf_cb,
    "vllm": run_vllm,
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="local HF checkpoint (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--conversations", type=int, default=32)
    parser.add_argument("--prompts", type=int, default=4, help="distinct system prompts (K)")
    parser.add_argument("--system-tokens", type=int, default=1000)
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--reply-mean", type=float, default=32, help=f"ShareGPT: {SHAREGPT['reply']}")
    parser.add_argument("--device-blocks", type=int, default=4096)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--peers", default="pensieve,pensieve_private,pensieve_stateless,hf_cb",
                        help="comma-separated: " + ",".join(PEERS))  # fmt: skip
    parser.add_argument("--vllm-python", help="python of vLLM's venv: adds the vllm peer")
    parser.add_argument("--ttft-repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results/shared_prefix.json")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    from multiturn import load_model

    model = load_model(args)
    convs, reply_lens, systems = make_workload(args)
    print(f"== shared prefixes, {args.dtype}: {len(convs)} conversations behind {len(systems)} system prompts of "
          f"{args.system_tokens} tokens, {args.turns} turns, reply lengths {reply_lens}, "
          f"{torch.get_num_threads()} threads, {cpu_name()}")  # fmt: skip
    peers = args.peers.split(",") + (["vllm"] if args.vllm_python and "vllm" not in args.peers else [])
    summaries, all_rows = [], {}
    for name in peers:
        rows = PEERS[name](copy.deepcopy(model) if name != "vllm" else None, convs, reply_lens, args)
        summary = summarize(name, rows)
        summary["first_turn_ttft_p50"] = statistics.median(r["ttft"] for r in rows if r["turn"] == 0)
        summary["prefilled_tokens"] = sum(r["prefilled"] for r in rows)
        later = [r for r in rows if r["turn"] > 0]  # after the first turn: what a resent history costs
        summary["later_prefilled_over_new"] = sum(r["prefilled"] for r in later) / max(1, sum(r["new"] for r in later))
        if "blocks_in_use" in rows[0]:
            by_round = [max(r["blocks_in_use"] for r in rows if r["turn"] == t) for t in range(args.turns)]
            summary["blocks_in_use"] = by_round
        summaries.append(summary)
        all_rows[name] = rows
    bounds = [block_bound(convs, reply_lens, systems, t + 1) for t in range(args.turns)]
    ttft = ttft_cached_vs_cold(copy.deepcopy(model), args)
    report(summaries, all_rows, bounds, ttft)
    for rows in all_rows.values():
        for r in rows:
            r.pop("tokens", None)
    meta = {**vars(args), "threads": torch.get_num_threads(), "torch": torch.__version__, "reply_lens": reply_lens,
            "block_size": BLOCK_SIZE, "block_bound_by_round": bounds}  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "summaries": summaries, "ttft_cached_vs_cold": ttft, "rows": all_rows},
                              indent=2))  # fmt: skip
    print(f"json: {out}")
    plot(summaries, bounds, out.with_suffix(".png"))


def report(summaries, all_rows, bounds, ttft) -> None:
    base = next(s for s in summaries if s["peer"] == summaries[0]["peer"])
    print(f"\n{'peer':20}{'out tok/s':>11}{'vs first':>10}{'turn-0 TTFT p50 ms':>20}{'prefilled':>11}"
          f"{'prefill/new':>13}{'device blocks by round':>26}")  # fmt: skip
    for s in summaries:
        pn = "n/a"
        if s["prefilled_over_new"] is not None:  # all turns / turns after the first
            pn = f"{s['prefilled_over_new']:.2f}/{s['later_prefilled_over_new']:.2f}"
        prefilled = "n/a" if s["prefilled_tokens"] != s["prefilled_tokens"] else f"{s['prefilled_tokens']:.0f}"
        blocks = " ".join(map(str, s.get("blocks_in_use", []))) or "n/a"
        print(f"{s['peer']:20}{s['output_tok_s']:>11.1f}{s['output_tok_s'] / base['output_tok_s']:>9.2f}x"
              f"{s['first_turn_ttft_p50'] * 1e3:>20.0f}{prefilled:>11}{pn:>13}{blocks:>26}")  # fmt: skip
    print(f"{'bound (unique/bs + 1 per conversation)':75}{' '.join(map(str, bounds)):>26}")
    print(f"\nfirst-turn TTFT, system prompt cached vs cold (batch 1): {ttft['cached_s'] * 1e3:.0f} ms vs "
          f"{ttft['cold_s'] * 1e3:.0f} ms = {ttft['ratio']:.3f}x")  # fmt: skip
    if "pensieve" in all_rows:
        for name, rows in all_rows.items():
            if name != "pensieve":
                same = sum(a["tokens"] == b["tokens"] for a, b in zip(all_rows["pensieve"], rows, strict=True))
                print(f"pensieve replies token-identical to {name}: {same}/{len(rows)}")


def plot(summaries, bounds, path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4))
    names = [s["peer"] for s in summaries]
    ax1.bar(names, [s["output_tok_s"] for s in summaries], color="tab:green")
    ax1.set_ylabel("output tokens / s")
    ax1.set_title("throughput")
    ax1.tick_params(axis="x", rotation=30)
    ax2.bar(names, [s["first_turn_ttft_p50"] * 1e3 for s in summaries], color="tab:orange")
    ax2.set_ylabel("ms")
    ax2.set_title("first-turn TTFT p50")
    ax2.tick_params(axis="x", rotation=30)
    for s in summaries:
        if "blocks_in_use" in s:
            ax3.plot(range(1, len(s["blocks_in_use"]) + 1), s["blocks_in_use"], marker="o", label=s["peer"])
    ax3.plot(range(1, len(bounds) + 1), bounds, "k--", label="bound")
    ax3.set_xlabel("round")
    ax3.set_ylabel("device blocks in use")
    ax3.set_title("KV blocks")
    ax3.legend()
    save(fig, path)


if __name__ == "__main__":
    main()
