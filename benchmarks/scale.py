"""Pensieve's own experiment at scale (issue 35, DESIGN §11): an open-loop multi-turn load over HTTP.

Conversations arrive as a Poisson process at rate λ (conversations/s); each is drawn from ShareGPT's statistics as
Pensieve measured them (5.56 turns, 37.8 user and 204.6 reply tokens per turn, lognormal: benchmarks/workload.py;
`--trace long` draws conversations that reach 6-7k tokens instead). After each reply the user thinks for an
exponential time, mean --think-mean (default 15 s: reading a ~200-token reply and typing a ~40-token message; with
the ~5 turns and the latencies this CPU gives, that keeps λ x ~100-150 s conversations live at once, so the live KV
state is a multiple of the budget at every rate measured). Every turn resends the whole history through
/v1/chat/completions (what chat front-ends do), streamed, greedy, `ignore_eos` with max_tokens = the drawn reply
length, so every system generates the same number of tokens.

Systems (each one server process for all of its rates; each rate a fresh trace, seeded by the rate):
  pensieve         `pensieve serve`, Pensieve's policy (recompute cost over idle time); overflow is recomputed
  pensieve-lru     the same with --policy lru (whole conversations, least recently active first)
  pensieve-disk    Pensieve's policy with a disk tier beyond the DRAM budget (chunk files dropped from the page
                   cache once written and once read; the bytes read back are reported), write-behind on
  pensieve-int8    Pensieve's policy with int8 KV (--kv-dtype int8) in the same bytes as the others' KV budget:
                   3.56x the tokens at SmolLM2's head_dim 64 (fp32 model; a row's fp32 scale and minimum included)
  vllm             vLLM CPU's OpenAI server with prefix caching
  vllm-noprefix    the same without prefix caching: a stateless system, every turn recomputes its history
  llamacpp         llama-cpp-python's OpenAI server (`make llamacpp-peer`) on SmolLM2 as an F32 GGUF, its RAM prompt
                   cache on (whole saved states, longest matching prefix restored): one request at a time. It
                   takes no ignore_eos: min_tokens = max_tokens holds the end-of-turn token back instead, and its
                   streams carry no usage, so the client counts the tokens (the chat template, the reply)
  hf               HF transformers behind the same endpoint (benchmarks/hf_server.py): stateless, one request at a
                   time, no continuous batching (what a plain transformers deployment does); no KV budget applies
KV budgets are equal in tokens (benchmarks/servers.py: `--device-blocks N` vs `--num-gpu-blocks-override N+1`), as are
block size, max sequences per step and tokens per step (vLLM's chunked prefill takes max_num_batched_tokens per step,
pensieve chunks its prefills to the same budget). Each engine's start-up line naming its KV capacity is quoted.

One point = one rate on one system: arrivals for --duration seconds; requests sent in the first --warmup seconds
are not counted (the number of live conversations is still growing); the rest are measured until they finish, at
most --grace seconds after the arrivals end (a request unfinished then counts as infinitely slow). Per point:
throughput (requests/s and output tokens/s over the window), normalized latency (end-to-end seconds per output token)
p50/p90, TTFT p50/p99, live conversations and their history tokens (the client's count, sampled each second: the
live state), computed / new tokens of later turns, pensieve's KV hits per tier, disk bytes read, vLLM preemptions.
A rate is *sustained* when p90 normalized latency <= --slo (seconds per output token). Per system at most
--max-points rates: from --rate0, doubled while sustained (halved while not), then bisected between the highest
sustained and the lowest not. Partial results are written after every point (JSON), the curves plotted (PNG).

Usage: python benchmarks/scale.py --vllm-python .venv-vllm/bin/python [--systems pensieve,pensieve-lru,vllm,
       vllm-noprefix] [--budget-tokens 3072] [--rate0 0.1] [--max-points 4] [--duration 300] [--warmup 90]
       [--slo 0.1] [--out results/scale.json]    # --quick: short points for the docs
Conversations are capped at the budget (less a turn's template) so that every engine can hold any one of them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import openai
from plotting import cpu_name, pyplot, save, wait_ready
from servers import (
    BLOCK,
    capacity_line,
    process_read_bytes,
    scrape,
    start_hf,
    start_llamacpp,
    start_pensieve,
    start_vllm,
    stop,
)
from tqdm import tqdm
from workload import LONG, SHAREGPT, open_loop

SYSTEMS = ("pensieve", "pensieve-lru", "pensieve-disk", "pensieve-int8", "vllm", "vllm-noprefix", "llamacpp", "hf")
WORDS = ("the a of and to in is it that for on with as was be at by this from or have not are but an they which "
         "you one all were we there can her has more if will their so what about out up into them would my make "
         "like time no just him know take people year your good some could see other than then now look only come "
         "its over think also back after use two how our work first well way even new want because any these give "
         "day most us cache memory turn story river light music garden window city paper number question answer "
         "reason system model token history French recipe travel weather code bug test").split()  # fmt: skip


def user_text(rng: random.Random, tokenizer, n_tokens: int) -> str:
    """Plausible-looking text of n_tokens tokens (random words, trimmed to exactly that many tokens)."""
    words = [rng.choice(WORDS) for _ in range(n_tokens)]
    ids = tokenizer.encode(" ".join(words), add_special_tokens=False)
    while len(ids) < n_tokens:
        words += [rng.choice(WORDS) for _ in range(n_tokens)]
        ids = tokenizer.encode(" ".join(words), add_special_tokens=False)
    return tokenizer.decode(ids[:n_tokens])


def make_trace(rate: float, args, tokenizer) -> list[dict]:
    stats = LONG if args.trace == "long" else SHAREGPT
    convs = open_loop(rate, args.duration, args.seed, stats, args.think_mean, max_tokens=args.max_conv_tokens)
    rng = random.Random(f"text:{args.seed}:{rate!r}")
    return [{"index": c.index, "arrival_s": c.arrival_s,
             "turns": [{"text": user_text(rng, tokenizer, t.user_tokens), "user_tokens": t.user_tokens,
                        "reply_tokens": t.reply_tokens, "think_s": t.think_s} for t in c.turns]}
            for c in convs]  # fmt: skip


# ---- the client ---------------------------------------------------------------------------------------------------


class Point:
    """One rate on one system: the requests, and the live state sampled each second."""

    def __init__(self, system: str, tokenizer) -> None:
        self.requests: list[dict] = []
        self.live: dict[int, int] = {}  # conversation -> its history tokens (the client's count; a prompt's at send)
        self.samples: list[tuple[float, int, int]] = []  # (t, live conversations, their history tokens)
        self.t0 = 0.0
        self.system = system
        self.tokenizer = tokenizer  # counts the tokens where a server's stream carries no usage (llama.cpp)

    def run_to_max_tokens(self, max_tokens: int) -> dict:
        """What the server takes to run a reply to max_tokens, greedy and unpenalized."""
        if self.system == "llamacpp":  # no ignore_eos; its default repeat_penalty is 1.1
            return {"min_tokens": max_tokens, "repeat_penalty": 1.0}
        return {"ignore_eos": True}


async def conversation(client, conv: dict, point: Point, bar) -> None:
    await asyncio.sleep(max(0.0, point.t0 + conv["arrival_s"] - time.perf_counter()))
    point.live[conv["index"]] = 0
    messages: list[dict] = []
    before = 0  # the previous turn's prompt + completion tokens
    try:
        for i, turn in enumerate(conv["turns"]):
            if turn["think_s"]:
                await asyncio.sleep(turn["think_s"])
            messages.append({"role": "user", "content": turn["text"]})
            point.live[conv["index"]] = before + turn.get("user_tokens", 0)  # its state once this prompt is in
            record = {"conv": conv["index"], "turn": i, "sent_s": time.perf_counter() - point.t0, "done": False,
                      "reply_tokens": turn["reply_tokens"]}  # fmt: skip
            point.requests.append(record)
            t_send = time.perf_counter()
            stream = await client.chat.completions.create(
                model="bench", messages=messages, max_tokens=turn["reply_tokens"], temperature=0, stream=True,
                stream_options={"include_usage": True},
                extra_body=point.run_to_max_tokens(turn["reply_tokens"]),
            )  # fmt: skip
            pieces, first, usage, stats = [], None, None, None
            async with stream:  # closed on cancellation too: the server sees the disconnect and aborts the turn
                async for chunk in stream:
                    if chunk.choices and chunk.choices[0].delta.content:
                        first = first or time.perf_counter()
                        pieces.append(chunk.choices[0].delta.content)
                    if chunk.usage is not None:
                        usage, stats = chunk.usage, (chunk.model_extra or {}).get("stats")
            end = time.perf_counter()
            counted = usage is None  # then: what the server reused is unknown (llama.cpp)
            if counted:  # the client's count: the prompt through the chat template, the reply as text
                rendered = point.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
                prompt = len(rendered)
                reply = len(point.tokenizer.encode("".join(pieces), add_special_tokens=False))
                usage = openai.types.CompletionUsage(prompt_tokens=prompt, completion_tokens=reply,
                                                     total_tokens=prompt + reply)  # fmt: skip
            details = usage.prompt_tokens_details
            cached = (details.cached_tokens or 0) if details is not None else 0
            record.update(
                done=True, latency_s=end - t_send, ttft_s=(first or end) - t_send, prompt=usage.prompt_tokens,
                completion=usage.completion_tokens, cached=cached, new=usage.prompt_tokens - before,
                # pensieve: every position it ran before the first token (recompute included); vLLM: prompt - cached
                computed=None if counted else stats["prefilled_tokens"] if stats else usage.prompt_tokens - cached,
                cached_by_tier=stats["cached_tokens"] if stats else None,
            )  # fmt: skip
            record["norm_latency_s"] = record["latency_s"] / max(1, record["completion"])
            before = usage.prompt_tokens + usage.completion_tokens
            point.live[conv["index"]] = before
            messages.append({"role": "assistant", "content": "".join(pieces)})
            bar.update(1)
    finally:
        point.live.pop(conv["index"], None)


async def sample_live(point: Point, until: float) -> None:
    while time.perf_counter() < until:
        point.samples.append((time.perf_counter() - point.t0, len(point.live), sum(point.live.values())))
        await asyncio.sleep(1.0)


async def run_point(port: int, trace: list[dict], args, desc: str, system: str, tokenizer) -> Point:
    point = Point(system, tokenizer)
    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0,
                                timeout=args.duration + args.grace + 60)  # fmt: skip
    bar = tqdm(total=sum(len(c["turns"]) for c in trace), desc=desc, unit="turn", mininterval=10)
    point.t0 = time.perf_counter()
    end = point.t0 + args.duration + args.grace
    tasks = [asyncio.create_task(conversation(client, c, point, bar)) for c in trace]
    sampler = asyncio.create_task(sample_live(point, point.t0 + args.duration))
    # the arrivals end at --duration; what was sent in the window runs on until --grace after (then: unfinished)
    while time.perf_counter() < end:
        window = [r for r in point.requests if r["sent_s"] >= args.warmup]
        if time.perf_counter() > point.t0 + args.duration and all(r["done"] for r in window):
            break
        await asyncio.sleep(1.0)
    for task in [*tasks, sampler]:
        task.cancel()
    await asyncio.gather(*tasks, sampler, return_exceptions=True)
    bar.close()
    await client.close()
    return point


# ---- one system ---------------------------------------------------------------------------------------------------


def start(system: str, args, folder: Path, log: Path, disk_dir: Path | None):
    limits = dict(port=args.port, dtype=args.dtype, max_num_seqs=args.max_num_seqs,
                  max_num_batched_tokens=args.max_num_batched_tokens)  # fmt: skip
    blocks = args.budget_tokens // BLOCK
    if system == "pensieve-int8":  # the same bytes: as many int8 blocks as fit in the budget's bytes in args.dtype
        config = json.loads((folder / "config.json").read_text())
        head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
        from pensieve.ops.quant import row_bytes  # an int8 row: head_dim values, its scale and its minimum

        blocks = blocks * row_bytes(head_dim, args.dtype) // row_bytes(head_dim, "int8")
    if system.startswith("pensieve"):
        extra = {"pensieve-lru": ("--policy", "lru"), "pensieve-int8": ("--kv-dtype", "int8")}.get(system, ())
        return start_pensieve(folder, blocks, log, disk_dir=disk_dir, extra=extra, **limits)
    if system == "hf":
        return start_hf(folder, log, port=args.port, dtype=args.dtype)
    if system == "llamacpp":
        return start_llamacpp(folder, args.budget_tokens, log, port=args.port)
    return start_vllm(args.vllm_python, folder, blocks, log, prefix_caching=system == "vllm", **limits)


def warm_up(port: int, args, system: str, tokenizer) -> float:
    """Compile every batch shape the run will use (a burst as wide as --max-num-seqs, twice) before timing."""
    rng = random.Random(0)
    trace = [{"index": i, "arrival_s": 0.0,
              "turns": [{"text": user_text(rng, tokenizer, 40), "reply_tokens": 16, "think_s": 0.0},
                        {"text": user_text(rng, tokenizer, 40), "reply_tokens": 16, "think_s": 0.0}]}
             for i in range(args.max_num_seqs)]  # fmt: skip
    warm = argparse.Namespace(**{**vars(args), "duration": 1.0, "warmup": 0.0, "grace": 600.0})
    t = time.perf_counter()
    for _ in range(2):
        asyncio.run(run_point(port, trace, warm, "warm-up", system, tokenizer))
    return time.perf_counter() - t


def summarize(system: str, rate: float, point: Point, args, moved: dict, read_bytes, capacity: str) -> dict:
    window = [r for r in point.requests if args.warmup <= r["sent_s"] < args.duration]
    done = [r for r in window if r["done"]]
    span = args.duration - args.warmup
    norm = sorted([r["norm_latency_s"] for r in done] + [math.inf] * (len(window) - len(done)))
    ttft = sorted([r["ttft_s"] for r in done] + [math.inf] * (len(window) - len(done)))
    later = [r for r in done if r["turn"] > 0]
    live = [(n, tok) for t, n, tok in point.samples if t >= args.warmup]
    tiers = {"device": 0, "host": 0, "disk": 0}
    for r in done:
        for tier, n in (r["cached_by_tier"] or {}).items():
            tiers[tier] += n
    p90 = _pct(norm, 0.9)
    later_new = sum(r["new"] for r in later)
    known = [r["computed"] for r in later if r["computed"] is not None]
    computed = sum(known) if len(known) == len(later) else None  # None: the server did not say (llama.cpp)
    return {
        "system": system,
        "rate": rate,
        "budget_tokens": args.budget_tokens,
        "capacity_line": capacity,
        "requests": len(window),
        "unfinished": len(window) - len(done),
        "requests_per_s": round(len(done) / span, 4),
        "output_tokens_per_s": round(sum(r["completion"] for r in done) / span, 2),
        "norm_latency_p50_s": _round(_pct(norm, 0.5)),
        "norm_latency_p90_s": _round(p90),
        "ttft_p50_s": _round(_pct(ttft, 0.5)),
        "ttft_p99_s": _round(_pct(ttft, 0.99)),
        "sustained": p90 <= args.slo,
        "live_conversations_mean": round(statistics.fmean(n for n, _ in live), 1) if live else None,
        "live_tokens_mean": round(statistics.fmean(t for _, t in live)) if live else None,
        "live_tokens_max": max((t for _, t in live), default=None),
        "later_new_tokens": later_new,
        "later_computed_tokens": computed,
        "later_computed_over_new": None if computed is None else round(computed / max(1, later_new), 3),
        "pensieve_cached_by_tier": tiers if system.startswith("pensieve") else None,
        "disk_tier_bytes": {k.split("=")[1]: int(v) for k, v in moved.items() if k.startswith("disk")} or None,
        "preemptions": int(moved.get("preemptions", 0)),
        "process_storage_read_bytes": read_bytes,
    }


def _pct(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))] if values else math.nan


def _times(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}x"


def _round(x: float):
    return None if math.isinf(x) or math.isnan(x) else round(x, 4)


def next_rate(results: list[dict], rate0: float) -> float:
    """Doubling (halving) from rate0 until the SLO flips, then bisecting between the highest sustained rate and the
    lowest rate above it that was not."""
    if not results:
        return rate0
    ok = [r["rate"] for r in results if r["sustained"]]
    if not ok:
        return min(r["rate"] for r in results) / 2
    above = [r["rate"] for r in results if not r["sustained"] and r["rate"] > max(ok)]
    return round((max(ok) + min(above)) / 2, 4) if above else max(ok) * 2


def run_system(system: str, args, folder: Path, tokenizer, rows: list, write) -> None:
    log = Path(args.out).with_name(f"scale-{system}.log")
    disk_dir = (
        Path(tempfile.mkdtemp(prefix="pensieve-scale-", dir=args.disk_root)) if system == "pensieve-disk" else None
    )
    proc = start(system, args, folder, log, disk_dir)
    try:
        wait_ready(proc, args.port, log, path="/v1/models" if system == "llamacpp" else "/health")
        warm = warm_up(args.port, args, system, tokenizer)
        capacity = capacity_line(system, log)
        print(f"{system}: warm-up {warm:.0f} s; {capacity}", flush=True)
        mine: list[dict] = []
        rates = [float(r) for r in args.rates.split(",")] if args.rates else None
        for i in range(len(rates) if rates else args.max_points):
            rate = rates[i] if rates else next_rate(mine, args.rate0)
            trace = make_trace(rate, args, tokenizer)
            read_before, metrics_before = process_read_bytes(proc.pid), scrape(args.port)
            point = asyncio.run(run_point(args.port, trace, args, f"{system} @ {rate:g}/s", system, tokenizer))
            read_after, metrics_after = process_read_bytes(proc.pid), scrape(args.port)
            moved = {k: metrics_after[k] - metrics_before.get(k, 0) for k in metrics_after}
            read = None if read_before is None or read_after is None else read_after - read_before
            row = summarize(system, rate, point, args, moved, read, capacity)
            row["conversations"] = len(trace)
            mine.append(row)
            rows.append(row)
            write()
            print(table([row]).splitlines()[-1], flush=True)
    finally:
        stop(proc)
        if disk_dir is not None:
            shutil.rmtree(disk_dir, ignore_errors=True)


def max_sustained(rows: list[dict]) -> dict[str, float | None]:
    out = {}
    for system in dict.fromkeys(r["system"] for r in rows):
        ok = [r["rate"] for r in rows if r["system"] == system and r["sustained"]]
        out[system] = max(ok) if ok else None
    return out


def table(rows: list[dict]) -> str:
    out = ["| system | rate conv/s | req/s | out tok/s | norm. latency p50 / p90 s/tok | TTFT p50 / p99 s | live convs "
           "| live tokens (mean) | later: computed / new | unfinished | SLO |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]  # fmt: skip
    for r in rows:
        out.append(
            f"| {r['system']} | {r['rate']:g} | {r['requests_per_s']:.3f} | {r['output_tokens_per_s']:.1f} | "
            f"{r['norm_latency_p50_s']} / {r['norm_latency_p90_s']} | {r['ttft_p50_s']} / {r['ttft_p99_s']} | "
            f"{r['live_conversations_mean']} | {r['live_tokens_mean']} | {_times(r['later_computed_over_new'])} | "
            f"{r['unfinished']} | {'met' if r['sustained'] else 'missed'} |"
        )
    return "\n".join(out)


def plot(rows: list[dict], path: Path, slo: float) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for system in dict.fromkeys(r["system"] for r in rows):
        mine = sorted((r for r in rows if r["system"] == system), key=lambda r: r["rate"])
        x = [r["rate"] for r in mine]
        axes[0].plot(x, [r["norm_latency_p90_s"] or float("nan") for r in mine], marker="o", label=system)
        axes[1].plot(x, [r["output_tokens_per_s"] for r in mine], marker="o", label=system)
    axes[0].axhline(slo, color="gray", linestyle="--", label=f"SLO {slo} s/token")
    axes[0].set_ylabel("p90 normalized latency (s / output token)")
    axes[0].set_yscale("log")
    axes[1].set_ylabel("output tokens / s")
    for ax in axes:
        ax.set_xlabel("conversation arrival rate (/s)")
        ax.legend(fontsize=8)
    save(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--systems", default="pensieve,pensieve-lru,vllm,vllm-noprefix")
    parser.add_argument("--trace", choices=["sharegpt", "long"], default="sharegpt")
    parser.add_argument("--budget-tokens", type=int, default=3072, help="KV budget of every system, in tokens")
    parser.add_argument("--rates", help="comma-separated rates (conversations/s) instead of the bisection")
    parser.add_argument("--rate0", type=float, default=0.1)
    parser.add_argument("--max-points", type=int, default=4)
    parser.add_argument("--duration", type=float, default=300.0, help="seconds of arrivals per point")
    parser.add_argument("--warmup", type=float, default=90.0, help="requests sent before this are not counted")
    parser.add_argument("--grace", type=float, default=120.0, help="seconds after the arrivals end for the rest")
    parser.add_argument("--think-mean", type=float, default=15.0)
    parser.add_argument("--max-conv-tokens", type=int, default=7000)
    parser.add_argument("--slo", type=float, default=0.1,
                        help="p90 normalized latency, s per output token (0.1: streams at reading speed)")  # fmt: skip
    parser.add_argument("--vllm-python", default=".venv-vllm/bin/python")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--max-num-seqs", type=int, default=32)
    parser.add_argument("--max-num-batched-tokens", type=int, default=512)
    parser.add_argument("--disk-root", default=None, help="where pensieve-disk's disk tier goes (not tmpfs)")
    parser.add_argument("--port", type=int, default=8331)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="short points (docs): 120 s, warm-up 40 s")
    parser.add_argument("--out", default="results/scale.json")
    parser.add_argument(
        "--merge",
        nargs="+",
        metavar="JSON",
        help="no run: the rows of these results (same settings) in one table, JSON and PNG at --out",
    )
    args = parser.parse_args()
    if args.merge:
        return merge(args)
    if args.quick:
        args.duration, args.warmup, args.grace = 120.0, 40.0, 60.0
    # every turn must fit every engine's KV budget (vLLM refuses a request longer than its capacity)
    args.max_conv_tokens = min(args.max_conv_tokens, args.budget_tokens - 72)

    from transformers import AutoTokenizer

    from pensieve.cache.disk import in_memory_filesystem
    from pensieve.models.smollm2 import cached_folder, load_smollm2

    load_smollm2()  # writes the HF folder the servers load, the first time
    folder = cached_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    systems = args.systems.split(",")
    unknown = set(systems) - set(SYSTEMS)
    if unknown:
        raise SystemExit(f"unknown systems {sorted(unknown)}; choose from {SYSTEMS}")
    if "pensieve-disk" in systems and in_memory_filesystem(args.disk_root or tempfile.gettempdir()):
        raise SystemExit("--disk-root is in memory (tmpfs): pensieve's disk tier would be DRAM; give a disk folder")
    if any(s.startswith("vllm") for s in systems) and not Path(args.vllm_python).exists():
        raise SystemExit(f"no vLLM venv at {args.vllm_python}: `make vllm-peer`, or leave vllm out of --systems")
    meta = {"machine": cpu_name(), "dtype": args.dtype, "args": vars(args), "block_size": BLOCK}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []

    def write() -> None:
        out.write_text(json.dumps({"meta": meta, "rows": rows, "max_sustained": max_sustained(rows)}, indent=1))

    print(f"{cpu_name()}; KV budget {args.budget_tokens} tokens; SLO p90 {args.slo} s/token; think {args.think_mean} s")
    for system in systems:
        run_system(system, args, folder, tokenizer, rows, write)
    report(rows, out, args.slo)


def report(rows: list[dict], out: Path, slo: float) -> None:
    print(f"\n{table(rows)}\n")
    best = max_sustained(rows)
    for system, rate in best.items():
        print(f"max sustained rate under the SLO: {system}: {rate if rate is not None else 'none measured'}")
    for mine, peer in (("pensieve", "vllm"), ("pensieve", "vllm-noprefix"), ("pensieve-int8", "pensieve")):
        if best.get(mine) and best.get(peer):
            print(f"{mine} / {peer}: {best[mine] / best[peer]:.2f}x")
    plot(rows, out.with_suffix(".png"), slo)
    print(f"json: {out}")


def merge(args) -> None:
    """Several runs' rows (one system's points may come from several runs) as one result; the settings that decide
    a point must agree."""
    decide = ("duration", "warmup", "grace", "budget_tokens", "think_mean", "max_conv_tokens", "slo", "trace", "dtype",
              "max_num_seqs", "max_num_batched_tokens", "seed")  # fmt: skip
    rows, metas = [], []
    for path in args.merge:
        data = json.loads(Path(path).read_text())
        metas.append(data["meta"])
        rows += [{**r, "from": path} for r in data["rows"]]
    for meta in metas[1:]:
        differ = [k for k in decide if meta["args"].get(k) != metas[0]["args"].get(k)]
        if differ or meta["machine"] != metas[0]["machine"]:
            raise SystemExit(f"the runs differ in {differ or ['machine']}: not one experiment")
    rows.sort(key=lambda r: (SYSTEMS.index(r["system"]), r["rate"]))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {**metas[0], "merged_from": args.merge}
    out.write_text(json.dumps({"meta": meta, "rows": rows, "max_sustained": max_sustained(rows)}, indent=1))
    report(rows, out, metas[0]["args"]["slo"])


if __name__ == "__main__":
    main()
