"""An agent trace over HTTP against pensieve serve and vLLM CPU's OpenAI server, at three KV budgets (issue 34).

The workload is what an agent framework sends. --sessions sessions run at once, each making --round-trips forced tool
calls (tool_choice names the function, so the model's behaviour does not decide the trace) and then one final answer
(tool_choice "none"). Between a call and its result each session pauses for an exponential time (the tool running,
mean --pause-mean s). A tool result is 100-500 tokens of file or search output. Every request resends the whole history
through /v1/chat/completions: the system prompt, the tools, the task, each call as the server returned it, and each
result. The same client drives both servers, greedy, with the same seeds, over the same messages, and a session
stays under 7k tokens.

Both servers get the same model folder and dtype, the same chat template (benchmarks/agent_template.jinja, ChatML
with Hermes tool calls, because SmolLM2's own template has no tools), block size 32, equal scheduler limits
(--max-num-seqs, --max-num-batched-tokens) and every core of the machine (pensieve: torch threads; vLLM:
VLLM_CPU_OMP_THREADS_BIND=0-(n-1)). Tools are `strict`: vLLM enforces a forced call's argument schema only then.
Their KV budgets are equal in tokens:
  pensieve  --device-blocks N --host-blocks 0 --disk-dir (fresh per run, refused on tmpfs). Overflow goes to the
            disk tier, whose chunk files are dropped from the page cache (posix_fadvise DONTNEED) once written and
            once read. Reported over the timed run: the disk-tier bytes read and written (/metrics), and the bytes
            the server process read from storage (/proc/PID/io).
  vLLM      --num-gpu-blocks-override N+1 --enable-prefix-caching: block 0 is vLLM's null block, never used for KV,
            so its usable capacity is N blocks (its quoted "KV cache size" line counts the null block). Overflow is
            recomputed.
A budget is a fraction of the working set W, the tokens of every session's final history (estimated from the trace
before the run). The full budget is 1.1 W (>= the working set); the others are 1/2 and 1/4 of W. Each engine's own
start-up line with its KV capacity is quoted in the results.

Reported per (budget, server): round trips/s, calls/s and output tokens/s over the wall time, call latency p50/p90,
and later calls' computed tokens over their new tokens. A call's new tokens are counted the same way for both, on
the client: its rendered messages past the previous call's messages and reply (the tool result and the generation
prompt). Computed: pensieve's own count of the positions it ran before the first token (`stats.prefilled_tokens`,
recompute included); vLLM's prompt - cached, its cache hits at first scheduling (work redone after a preemption is
missed: its preemptions are reported beside). JSON (written after every run) + PNG in results/.

Usage: python benchmarks/agent.py --vllm-python .venv-vllm/bin/python [--sessions 16] [--round-trips 12]
       [--budgets 0.25,0.5,1.1] [--servers pensieve,vllm] [--pause-mean 1.0] [--out results/agent.json]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

import openai
from plotting import cpu_name, pyplot, run_threads, save, wait_ready
from servers import BLOCK, CORES, capacity_line, process_read_bytes, scrape, start_pensieve, start_vllm, stop
from tqdm import tqdm

HERE = Path(__file__).resolve().parent
TEMPLATE = HERE / "agent_template.jinja"
SYSTEM = (
    "You are a coding agent. You work in a Python repository through the tools you are given: read files, search "
    "the code and run the tests, one call at a time, then explain the fix in one or two sentences."
)
PATHS = ["src/cache/manager.py", "src/cache/mover.py", "src/engine/scheduler.py", "src/engine/runner.py",
         "src/server/chat.py", "tests/test_cache.py", "tests/test_server.py", "README.md"]  # fmt: skip
QUERIES = ["evict", "swap_in", "max_tokens", "tool_calls", "KeyError", "deadline", "block_size", "refcount"]
TARGETS = ["tests/test_cache.py", "tests/test_server.py", "tests/", "tests/test_cache.py::test_evict"]


def _tool(name: str, description: str, param: str, values: list[str]) -> dict:
    schema = {"type": "object", "properties": {param: {"type": "string", "enum": values}}, "required": [param],
              "additionalProperties": False}  # fmt: skip
    # strict: vLLM enforces a forced call's argument schema only for a strict tool (pensieve always does)
    return {"type": "function",
            "function": {"name": name, "description": description, "parameters": schema, "strict": True}}  # fmt: skip


TOOLS = [
    _tool("read_file", "Read a file of the repository.", "path", PATHS),
    _tool("search_code", "Search the repository for a word; returns the matching lines.", "query", QUERIES),
    _tool("run_tests", "Run pytest on a target; returns its output.", "target", TARGETS),
]
TASKS = [
    "The cache evicts a conversation that is still running. Find out why and fix it.",
    "A request with max_tokens=0 crashes the server. Find the cause.",
    "test_evict fails with a KeyError after a swap-in. Investigate.",
    "Tool calls are dropped when two arrive in one reply. Find where.",
    "The scheduler starves long prompts under load. Find the cause.",
    "A refcount goes negative when a conversation is forked twice. Why?",
    "The block_size option is ignored by the server. Track it down.",
    "Deadlines are not enforced on streamed requests. Find out why.",
]
WORDS = ("def return self if else for in None True False import from class raise assert kv cache block chunk tier "
         "device host disk conv turn token tokens step batch prefill decode evict swap policy tree key value "
         "error test passed failed line file path query match len list dict int str free pool").split()  # fmt: skip


def tool_result(rng: random.Random, tokenizer, n_tokens: int, name: str) -> str:
    """Plausible output of tool `name`, grown line by line to n_tokens tokens (trimmed to exactly that)."""
    lines = []
    while True:
        i = len(lines) + 1
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 10)))
        if name == "read_file":
            lines.append(f"{i:4d}    {words}")
        elif name == "search_code":
            lines.append(f"{rng.choice(PATHS)}:{rng.randint(1, 900)}: {words}")
        else:
            lines.append(
                f"{rng.choice(TARGETS)}::test_{rng.choice(WORDS)}_{i} {rng.choice(['PASSED', 'FAILED'])} {words}"
            )
        ids = tokenizer.encode("\n".join(lines), add_special_tokens=False)
        if len(ids) >= n_tokens:
            return tokenizer.decode(ids[:n_tokens])


def make_trace(args, tokenizer) -> list[dict]:
    """Per session: its task, and per round trip the tool it is forced to call, the result it gets back and the
    pause before it is sent. Deterministic in --seed."""
    rng = random.Random(args.seed)
    sessions = []
    for s in range(args.sessions):
        rounds = []
        for r in range(args.round_trips):
            name = TOOLS[(s + r) % len(TOOLS)]["function"]["name"]
            n = rng.randint(args.result_min, args.result_max)
            pause = rng.expovariate(1 / args.pause_mean) if args.pause_mean > 0 else 0.0
            rounds.append({"tool": name, "result": tool_result(rng, tokenizer, n, name), "result_tokens": n,
                           "pause_s": pause})  # fmt: skip
        sessions.append({"task": f"Session {s}. {TASKS[s % len(TASKS)]}", "start_s": s * args.stagger,
                         "rounds": rounds})  # fmt: skip
    return sessions


def working_set(trace: list[dict], tokenizer, args) -> int:
    """Tokens of every session's final history (calls written as a typical call), + its final answer."""
    total = 0
    for session in trace:
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": session["task"]}]
        for r, rnd in enumerate(session["rounds"]):
            call = {"id": f"call_{r}", "type": "function",
                    "function": {"name": rnd["tool"], "arguments": json.dumps({"path": PATHS[0]})}}  # fmt: skip
            messages += [{"role": "assistant", "content": None, "tool_calls": [call]},
                         {"role": "tool", "tool_call_id": f"call_{r}", "content": rnd["result"]}]  # fmt: skip
        ids = tokenizer.apply_chat_template(messages, tools=TOOLS, add_generation_prompt=True, tokenize=True)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        if len(ids) + args.answer_tokens > 7000:
            raise SystemExit(f"a session reaches {len(ids)} tokens: over the 7k a session may take (SmolLM2: 8192)")
        total += len(ids) + args.answer_tokens
    return total


# ---- servers ------------------------------------------------------------------------------------------------------


def start_server(server: str, args, folder: Path, blocks: int, log: Path, disk_dir: Path):
    limits = dict(port=args.port, dtype=args.dtype, max_num_seqs=args.max_num_seqs,
                  max_num_batched_tokens=args.max_num_batched_tokens)  # fmt: skip
    if server == "pensieve":
        template = ("--chat-template", str(TEMPLATE))
        return start_pensieve(folder, blocks, log, disk_dir=disk_dir, extra=template, **limits)
    return start_vllm(args.vllm_python, folder, blocks, log, **limits,
                      extra=("--chat-template", str(TEMPLATE), "--enable-auto-tool-choice", "--tool-call-parser",
                             "hermes"))  # fmt: skip


# ---- the client ---------------------------------------------------------------------------------------------------


def run_session(client, s: int, session: dict, args, t_start: float, out: list, bar, histories: dict) -> None:
    time.sleep(max(0.0, t_start + session["start_s"] - time.perf_counter()))
    messages = histories[s] = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": session["task"]}]
    for r in range(len(session["rounds"]) + 1):
        forced = r < len(session["rounds"])
        choice = {"type": "function", "function": {"name": session["rounds"][r]["tool"]}} if forced else "none"
        t0 = time.perf_counter()
        resp = client.chat.completions.create(
            model="bench", messages=messages, tools=TOOLS, tool_choice=choice, temperature=0, seed=0,
            max_tokens=args.call_tokens if forced else args.answer_tokens,
        )  # fmt: skip
        latency = time.perf_counter() - t0
        usage, message = resp.usage, resp.choices[0].message
        details = usage.prompt_tokens_details
        cached = details.cached_tokens if details is not None and details.cached_tokens is not None else 0
        stats = (resp.model_extra or {}).get("stats")  # pensieve's: what the turn computed, measured by the engine
        # computed: pensieve counts every position it ran before the first token (recompute included); vLLM reports
        # the prompt's cache hits at its first scheduling, so prompt - cached misses work redone after a preemption
        computed = stats["prefilled_tokens"] if stats else usage.prompt_tokens - cached
        out.append({"session": s, "call": r, "messages": len(messages), "prompt": usage.prompt_tokens,
                    "cached": cached, "computed": computed, "completion": usage.completion_tokens,
                    "latency_s": latency, "end_s": time.perf_counter() - t_start, "pensieve_stats": stats})  # fmt: skip
        bar.update(1)
        if not forced:
            return
        calls = message.tool_calls or []
        if len(calls) != 1 or calls[0].function.name != session["rounds"][r]["tool"]:
            raise RuntimeError(f"session {s} call {r}: expected one {session['rounds'][r]['tool']} call, got {message}")
        call = calls[0]
        messages.append({"role": "assistant", "content": message.content,
                         "tool_calls": [{"id": call.id, "type": "function",
                                         "function": {"name": call.function.name,
                                                      "arguments": call.function.arguments}}]})  # fmt: skip
        time.sleep(session["rounds"][r]["pause_s"])  # the tool runs
        messages.append({"role": "tool", "tool_call_id": call.id, "content": session["rounds"][r]["result"]})


def count_new_tokens(calls: list[dict], histories: dict, tokenizer) -> None:
    """Each call's new tokens, the same way for both servers: the tokens of the benchmark template's rendering of
    its messages past the previous call's messages and the reply it got (the tool result and the generation prompt;
    the first call: its whole prompt). Sets calls[i]["new"]."""

    def length(messages: list[dict], prompt: bool) -> int:
        ids = tokenizer.apply_chat_template(messages, tools=TOOLS, add_generation_prompt=prompt, tokenize=True)
        return len(ids["input_ids"] if hasattr(ids, "keys") else ids)

    for c in calls:
        messages = histories[c["session"]]
        before = next((p for p in calls if p["session"] == c["session"] and p["call"] == c["call"] - 1), None)
        whole = length(messages[: c["messages"]], True)
        c["new"] = whole - length(messages[: before["messages"] + 1], False) if before else whole


def warm_up(client, args) -> list[float]:
    """Bursts as wide as the run, each tool forced and the final answer, so compiling (batch shapes, grammars) is not
    timed: at least 3, until two in a row agree within 15% (at most 6). -> each burst's seconds."""

    def one(i: int) -> None:
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"Warm-up {i}: look around."}]
        tool = TOOLS[i % (len(TOOLS) + 1)]["function"]["name"] if i % (len(TOOLS) + 1) < len(TOOLS) else None
        choice = {"type": "function", "function": {"name": tool}} if tool else "none"
        client.chat.completions.create(model="bench", messages=messages, tools=TOOLS, temperature=0,
                                       tool_choice=choice, max_tokens=args.call_tokens)  # fmt: skip

    times: list[float] = []
    while len(times) < 6 and (len(times) < 3 or abs(times[-1] - times[-2]) > 0.15 * times[-2]):
        times.append(run_threads([threading.Thread(target=one, args=(i,)) for i in range(args.sessions)]))
    return times


def run_one(server: str, fraction: float, blocks: int, trace: list[dict], folder: Path, args, tokenizer) -> dict:
    name = f"{server}@{fraction:g}"
    log = Path(args.out).with_name(f"agent-{server}-{fraction:g}.log")
    disk_dir = Path(tempfile.mkdtemp(prefix="pensieve-agent-", dir=args.disk_root))
    proc = start_server(server, args, folder, blocks, log, disk_dir)
    try:
        wait_ready(proc, args.port, log)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{args.port}/v1", api_key="none", max_retries=0,
                               timeout=1800)  # fmt: skip
        warmup_s = warm_up(client, args)
        read_before, metrics_before = process_read_bytes(proc.pid), scrape(args.port)
        calls: list = []
        histories: dict = {}
        bar = tqdm(total=sum(len(s["rounds"]) + 1 for s in trace), desc=name, unit="call", mininterval=5)
        t_start = time.perf_counter()
        threads = [threading.Thread(target=run_session, args=(client, s, session, args, t_start, calls, bar, histories))
                   for s, session in enumerate(trace)]  # fmt: skip
        wall = run_threads(threads)
        bar.close()
        read_after, metrics_after = process_read_bytes(proc.pid), scrape(args.port)
    finally:
        stop(proc)
        shutil.rmtree(disk_dir, ignore_errors=True)
    expected = sum(len(s["rounds"]) + 1 for s in trace)
    if len(calls) != expected:
        raise RuntimeError(f"{name}: {len(calls)} of {expected} calls finished (a session failed: see above)")
    count_new_tokens(calls, histories, tokenizer)
    moved = {k: metrics_after[k] - metrics_before.get(k, 0) for k in metrics_after}  # over the timed run only
    read = None if read_before is None or read_after is None else read_after - read_before
    return summarize(server, fraction, blocks, calls, wall, warmup_s, capacity_line(server, log), moved, read)


def summarize(server, fraction, blocks, calls, wall, warmup_s, capacity, moved, read_bytes) -> dict:
    later = [c for c in calls if c["call"] > 0]
    answer = max(c["call"] for c in calls)  # the final answer's index = the round trips a session makes
    latencies = sorted(c["latency_s"] for c in calls)
    output = sum(c["completion"] for c in calls)
    reused = {"device": 0, "host": 0, "disk": 0}
    for c in calls:
        for tier, n in ((c["pensieve_stats"] or {}).get("cached_tokens") or {}).items():
            reused[tier] += n
    return {
        "server": server,
        "budget_fraction": fraction,
        "budget_blocks": blocks,
        "budget_tokens": blocks * BLOCK,
        "capacity_line": capacity,
        "warmup_s": [round(t, 2) for t in warmup_s],
        "wall_s": round(wall, 2),
        "calls": len(calls),
        "round_trips_per_s": round(sum(c["call"] < answer for c in calls) / wall, 4),
        "calls_per_s": round(len(calls) / wall, 4),
        "output_tokens_per_s": round(output / wall, 3),
        "latency_p50_s": round(statistics.median(latencies), 3),
        "latency_p90_s": round(latencies[int(0.9 * (len(latencies) - 1))], 3),
        "prompt_tokens": sum(c["prompt"] for c in calls),
        "later_new_tokens": sum(c["new"] for c in later),
        "later_computed_tokens": sum(c["computed"] for c in later),
        "later_computed_over_new": round(sum(c["computed"] for c in later) / max(1, sum(c["new"] for c in later)), 3),
        "pensieve_reused_tokens_by_tier": reused if server == "pensieve" else None,
        "disk_tier_bytes": {k.split("=")[1]: int(v) for k, v in moved.items() if k.startswith("disk")} or None,
        "recomputed_tokens": sum((c["pensieve_stats"] or {}).get("recomputed_tokens", 0) for c in calls)
        if server == "pensieve"
        else None,
        "vllm_preemptions": int(moved.get("preemptions", 0)) if server == "vllm" else None,
        "process_storage_read_bytes": read_bytes,
        "per_call": [{k: v for k, v in c.items() if k != "pensieve_stats"} for c in calls],
    }


def plot(rows: list[dict], path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for server, marker in (("pensieve", "o"), ("vllm", "s")):
        mine = sorted((r for r in rows if r["server"] == server), key=lambda r: r["budget_fraction"])
        if not mine:
            continue
        x = [r["budget_fraction"] for r in mine]
        axes[0].plot(x, [r["calls_per_s"] for r in mine], marker=marker, label=server)
        axes[1].plot(x, [r["latency_p90_s"] for r in mine], marker=marker, label=server)
        axes[2].plot(x, [r["later_computed_over_new"] for r in mine], marker=marker, label=server)
    for ax, label in zip(axes, ("calls/s", "call latency p90 (s)", "later calls: computed / new tokens"),
                         strict=True):  # fmt: skip
        ax.set_xlabel("KV budget (fraction of the working set)")
        ax.set_ylabel(label)
        ax.legend()
    axes[2].set_yscale("log")
    save(fig, path)


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.0f} MiB"


def table(rows: list[dict]) -> str:
    out = ["| budget | server | KV tokens | calls/s | out tok/s | latency p50 / p90 s | later calls: computed / new "
           "| disk-tier bytes read | process storage reads | wall s |",
           "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for r in rows:
        out.append(
            f"| {r['budget_fraction']:g} W | {r['server']} | {r['budget_tokens']} | {r['calls_per_s']:.3f} | "
            f"{r['output_tokens_per_s']:.1f} | {r['latency_p50_s']} / {r['latency_p90_s']} | "
            f"{r['later_computed_over_new']:.2f}x | {_mib((r['disk_tier_bytes'] or {}).get('read'))} | "
            f"{_mib(r['process_storage_read_bytes'])} | {r['wall_s']} |"
        )
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=16)
    parser.add_argument("--round-trips", type=int, default=12)
    parser.add_argument("--result-min", type=int, default=100)
    parser.add_argument("--result-max", type=int, default=500)
    parser.add_argument("--pause-mean", type=float, default=1.0, help="mean seconds between a call and its result")
    parser.add_argument("--stagger", type=float, default=0.5, help="seconds between two sessions' starts")
    parser.add_argument("--call-tokens", type=int, default=64, help="max_tokens of a forced call")
    parser.add_argument("--answer-tokens", type=int, default=32, help="max_tokens of the final answer")
    parser.add_argument("--budgets", default="0.25,0.5,1.1", help="KV budgets, fractions of the working set")
    parser.add_argument("--servers", default="pensieve,vllm")
    parser.add_argument("--vllm-python", default=".venv-vllm/bin/python")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--max-num-seqs", type=int, default=16)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--disk-root", default=None, help="where pensieve's disk tier goes (default: the temp dir)")
    parser.add_argument("--port", type=int, default=8321)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results/agent.json")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from pensieve.cache.disk import in_memory_filesystem
    from pensieve.models.smollm2 import cached_folder, load_smollm2

    load_smollm2()  # writes the HF folder both servers load, the first time
    folder = cached_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = TEMPLATE.read_text()
    trace = make_trace(args, tokenizer)
    work = working_set(trace, tokenizer, args)
    servers = args.servers.split(",")
    if "pensieve" in servers and in_memory_filesystem(args.disk_root or tempfile.gettempdir()):
        raise SystemExit("--disk-root is in memory (tmpfs): pensieve's disk tier would be DRAM; give a disk folder")
    if "vllm" in servers and not Path(args.vllm_python).exists():
        raise SystemExit(f"no vLLM venv at {args.vllm_python}: `make vllm-peer`, or --servers pensieve")
    meta = {"machine": cpu_name(), "dtype": args.dtype, "working_set_tokens": work, "compute_cores": CORES,
            "disk_root_in_memory": in_memory_filesystem(args.disk_root or tempfile.gettempdir()),
            "args": {k: v for k, v in vars(args).items()},
            "tool_result_tokens": sum(r["result_tokens"] for s in trace for r in s["rounds"])}  # fmt: skip
    print(f"{args.sessions} sessions x {args.round_trips} round trips; working set W = {work} tokens; {cpu_name()}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    for fraction in (float(f) for f in args.budgets.split(",")):
        blocks = math.ceil(fraction * work / BLOCK)
        for server in servers:
            rows.append(run_one(server, fraction, blocks, trace, folder, args, tokenizer))
            out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    print(f"\n{table(rows)}")
    for fraction in sorted({r["budget_fraction"] for r in rows}):
        pair = {r["server"]: r for r in rows if r["budget_fraction"] == fraction}
        if len(pair) == 2:
            ratio = pair["pensieve"]["calls_per_s"] / pair["vllm"]["calls_per_s"]
            print(f"{fraction:g} W: pensieve / vllm calls/s = {ratio:.2f}x")
    plot(rows, out.with_suffix(".png"))
    print(f"json: {out}")


if __name__ == "__main__":
    main()
