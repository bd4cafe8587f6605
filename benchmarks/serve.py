"""A load run against `pensieve serve` over HTTP (the official openai client), on SmolLM2-135M-Instruct.

Workload: --clients concurrent clients, each a chat of --turns turns (user messages cycled from a fixed list, replies
of at most --max-tokens tokens, greedy), streamed, closed-loop (the next turn when the reply is done). TTFT is measured
by the client (request sent -> first text delta). Configurations, each on a freshly started server process:

  responses/main     /v1/responses with previous_response_id (stateful), the engine on the main thread
  responses/worker   the same with the engine on a second thread (`--engine-thread worker`)
  chat/main          /v1/chat/completions resending the whole history each turn (stateless, the prompt tree)

Reported: output tokens/s over the run, TTFT p50/p99, the share of later turns' input tokens served from cache, the
share of the history they resend that was reused (1.0: nothing recomputed; more: another client's identical
conversation computed more of it), and ratios against the first config.
JSON + PNG in results/.

Usage: python benchmarks/serve.py [--clients 16] [--turns 4] [--max-tokens 32] [--configs all]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import openai
from plotting import cpu_name, pyplot, run_threads, save, wait_ready
from tqdm import tqdm

MESSAGES = [
    "Hi! Can you tell me about the history of Paris?",
    "What is a famous landmark there, and why is it famous?",
    "How would I get there from the airport?",
    "What should I eat while I am there?",
    "Give me a one-day plan for a visit.",
    "Thanks! Summarize our conversation in two sentences.",
]
CONFIGS = {
    "responses/main": ("responses", "main"),
    "responses/worker": ("responses", "worker"),
    "chat/main": ("chat", "main"),
}


def start_server(port: int, engine_thread: str, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "pensieve", "serve", "--port", str(port), "--engine-thread", engine_thread,
           "--log-level", "warning"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env={**os.environ})
    wait_ready(proc, port, log, limit_s=300)
    return proc


def one_client(client, model: str, api: str, i: int, args, out: list, bar) -> None:
    previous, history = None, []
    for turn in range(args.turns):
        text = MESSAGES[(i + turn) % len(MESSAGES)]
        t0 = time.perf_counter()
        first, pieces, usage = None, [], None
        if api == "responses":
            stream = client.responses.create(model=model, input=text, previous_response_id=previous, stream=True,
                                             temperature=0, max_output_tokens=args.max_tokens)  # fmt: skip
            for event in stream:
                if event.type == "response.output_text.delta":
                    first = first or time.perf_counter()
                    pieces.append(event.delta)
                elif event.type in ("response.completed", "response.incomplete"):
                    previous, usage = event.response.id, event.response.usage
            prompt, cached, completion = (
                usage.input_tokens,
                usage.input_tokens_details.cached_tokens,
                usage.output_tokens,
            )
        else:
            history.append({"role": "user", "content": text})
            stream = client.chat.completions.create(
                model=model, messages=history, stream=True, temperature=0, max_tokens=args.max_tokens,
                stream_options={"include_usage": True},
            )  # fmt: skip
            for chunk in stream:
                if chunk.usage is not None:
                    usage = chunk.usage
                for choice in chunk.choices:
                    if choice.delta.content:
                        first = first or time.perf_counter()
                        pieces.append(choice.delta.content)
            history.append({"role": "assistant", "content": "".join(pieces)})
            prompt, completion = usage.prompt_tokens, usage.completion_tokens
            cached = usage.prompt_tokens_details.cached_tokens
        end = time.perf_counter()
        out.append({"client": i, "turn": turn, "ttft_s": (first or end) - t0, "latency_s": end - t0,
                    "prompt": prompt, "cached": cached, "completion": completion})  # fmt: skip
        bar.update(1)


def run_config(name: str, args, port: int) -> dict:
    api, engine_thread = CONFIGS[name]
    log = Path(args.out).with_name(f"serve-{name.replace('/', '-')}.log")
    proc = start_server(port, engine_thread, log)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=600)
        model = client.models.list().data[0].id
        # warm-up: a burst as wide as the run, so compiling decode steps (batch shapes included) is not timed
        burst = [threading.Thread(target=client.responses.create,
                                  kwargs=dict(model=model, input=f"Warm up {i}.", max_output_tokens=args.max_tokens,
                                              temperature=0, store=False)) for i in range(args.clients)]  # fmt: skip
        warmup = run_threads(burst)
        turns: list = []
        bar = tqdm(total=args.clients * args.turns, desc=name, unit="turn")
        threads = [threading.Thread(target=one_client, args=(client, model, api, i, args, turns, bar))
                   for i in range(args.clients)]  # fmt: skip
        wall = run_threads(threads)
        bar.close()
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    assert len(turns) == args.clients * args.turns, "a client failed (see above)"
    ttfts = sorted(t["ttft_s"] for t in turns)
    later = [t for t in turns if t["turn"] > 0]
    return {
        "config": name,
        "warmup_s": round(warmup, 2),
        "wall_s": round(wall, 2),
        "output_tokens": sum(t["completion"] for t in turns),
        "tok_per_s": round(sum(t["completion"] for t in turns) / wall, 2),
        "ttft_p50_s": round(statistics.median(ttfts), 3),
        "ttft_p99_s": round(ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))], 3),
        "later_cached_share": round(sum(t["cached"] for t in later) / max(1, sum(t["prompt"] for t in later)), 3),
        # of the history a later turn resends (the previous turn's input and reply, but the reply's last token,
        # whose KV no turn computed), the share found cached: 1.0 = nothing recomputed (above: clients whose
        # conversations are identical so far computed more of it)
        "history_reused": round(
            sum(t["cached"] for t in later) / max(1, sum(_previous_total(turns, t) - 1 for t in later)), 3
        ),
        "later_prompt_tokens": sum(t["prompt"] for t in later),
    }


def _previous_total(turns: list[dict], turn: dict) -> int:
    prev = next(t for t in turns if t["client"] == turn["client"] and t["turn"] == turn["turn"] - 1)
    return prev["prompt"] + prev["completion"]


def plot(rows: list[dict], path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    names = [r["config"] for r in rows]
    axes[0].bar(names, [r["tok_per_s"] for r in rows])
    axes[0].set_ylabel("output tokens/s")
    axes[1].bar([f"{n}\np50" for n in names], [r["ttft_p50_s"] for r in rows])
    axes[1].bar([f"{n}\np99" for n in names], [r["ttft_p99_s"] for r in rows])
    axes[1].set_ylabel("TTFT s")
    for ax in axes:
        ax.tick_params(axis="x", labelsize=7)
    save(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--configs", default="all", help=f"comma-separated of {list(CONFIGS)}")
    parser.add_argument("--port", type=int, default=8311)
    parser.add_argument("--out", default="results/serve.json")
    args = parser.parse_args()
    names = list(CONFIGS) if args.configs == "all" else args.configs.split(",")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    rows = [run_config(name, args, args.port) for name in names]
    base = rows[0]
    print(f"\n{args.clients} clients x {args.turns} turns, replies <= {args.max_tokens} tokens, SmolLM2-135M fp32")
    print(
        "| config | tok/s | vs first | TTFT p50 s | TTFT p99 s | later turns' input cached | history reused | wall s |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['config']} | {r['tok_per_s']} | {r['tok_per_s'] / base['tok_per_s']:.2f}x | {r['ttft_p50_s']} | "
              f"{r['ttft_p99_s']} | {r['later_cached_share']:.1%} | {r['history_reused']:.1%} | "
              f"{r['wall_s']} |")  # fmt: skip
    meta = {"clients": args.clients, "turns": args.turns, "max_tokens": args.max_tokens,
            "machine": cpu_name()}  # fmt: skip
    out = Path(args.out)
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    plot(rows, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
