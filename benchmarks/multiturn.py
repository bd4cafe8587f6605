"""Multi-turn serving: pensieve vs HF stateless `generate`, HF `generate_batch` (continuous batching) and vLLM.

Workloads (DESIGN §6), raw token ids (no template), greedy, EOS ignored, so every peer generates exactly the same
number of tokens:
  sharegpt   N conversations, turn counts and user/reply lengths lognormal around ShareGPT's means (5.56 turns,
             37.8 user tokens, 204.6 reply tokens); --reply-mean scales replies down for quick CPU runs
  docqa      N conversations that each open with a ~1.5k-token document + a question, then 7 more short turns
             (--doc-tokens, user ~37.8, replies lognormal mean --reply-mean, 64 in the suite)
The peers run the same lock-step rounds: round t sends turn t of every conversation that has one, all at once;
each peer keeps the history of its own replies.
  pensieve   StatefulGenerator.generate_batch: KV kept between turns; only new tokens are prefilled
  hf         model.generate over each conversation's full history, batched with left padding (stateless)
  hf_cb      model.generate_batch (continuous batching, attn "paged|sdpa", persistent manager, prefix sharing
             with 16-token pages) over the full histories
  vllm       vLLM's CPU build (prefix caching on, block 32) over the full histories, in its own venv
             (--vllm-python; `make vllm-peer` builds it): benchmarks/vllm_peer.py as a subprocess
The in-process peers share the model, dtype and thread count; vLLM loads the same weights (SmolLM2 exported as an
HF folder) in the same dtype and binds the same number of threads.

Usage: python benchmarks/multiturn.py [--workload sharegpt] [--conversations 4] [--reply-mean 32] [--dtype float32]
       python benchmarks/multiturn.py --suite [--vllm-python .venv-vllm/bin/python]   # the issue-8 tables
                                          [--suite-dtypes bfloat16]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from plotting import cpu_name, pyplot, save
from tqdm import tqdm

from pensieve import CacheConfig, EngineConfig, SamplingParams, StatefulGenerator

SHAREGPT = {"turns": 5.56, "user": 37.8, "reply": 204.6}


def lognormal_int(rng: random.Random, mean: float, sigma: float, lo: int = 1) -> int:
    mu = math.log(mean) - sigma**2 / 2  # so that the mean is `mean`
    return max(lo, round(rng.lognormvariate(mu, sigma)))


def make_workload(args) -> tuple[list[list[list[int]]], list[int]]:
    """-> user messages per conversation per turn, reply length per round (shared by the round's turns)."""
    rng = random.Random(args.seed)
    convs = []
    for _ in range(args.conversations):
        if args.workload == "docqa":
            turns = args.max_turns
        else:
            turns = max(args.min_turns, min(lognormal_int(rng, args.turns_mean, 0.5), args.max_turns))
        msgs = [[rng.randrange(1000, 40000) for _ in range(lognormal_int(rng, args.user_mean, 0.6))]
                for _ in range(turns)]  # fmt: skip
        if args.workload == "docqa":
            msgs[0] = [rng.randrange(1000, 40000) for _ in range(args.doc_tokens)] + msgs[0]
        convs.append(msgs)
    rounds = max(len(c) for c in convs)
    reply_lens = [lognormal_int(rng, args.reply_mean, 0.4, lo=4) for _ in range(rounds)]
    return convs, reply_lens


class _FirstTokenClock:
    """HF streamer: the time of the first generated token (the first put() is the prompt)."""

    def __init__(self) -> None:
        self.calls = 0
        self.first_token_at = None

    def put(self, value) -> None:
        self.calls += 1
        if self.calls == 2:
            self.first_token_at = time.perf_counter()

    def end(self) -> None:
        pass


def run_pensieve(model, convs, reply_lens, args) -> list[dict]:
    rows = []
    cache = CacheConfig(block_size=16, num_device_blocks=args.device_blocks)
    engine = EngineConfig(compile={"auto": "auto", "on": True, "off": False}[args.compile])
    with StatefulGenerator(model, cache_config=cache, engine_config=engine) as gen:
        # untimed: compiling the decode step for batch 1 and larger batches (inductor caches it on disk)
        warm = SamplingParams(max_new_tokens=3, ignore_eos=True)
        gen.generate_batch({f"warmup{i}": [1000 + i, 1001, 1002] for i in range(2)}, warm)
        gen.generate("warmup", [1000, 1001, 1002], warm)
        for conv_id in ("warmup", "warmup0", "warmup1"):
            gen.end(conv_id)
        for t, reply_len in enumerate(tqdm(reply_lens, desc="pensieve", leave=False)):
            batch = {str(i): c[t] for i, c in enumerate(convs) if t < len(c)}
            sp = SamplingParams(max_new_tokens=reply_len, temperature=0, ignore_eos=True)
            t0 = time.perf_counter()
            replies = gen.generate_batch(batch, sp)
            elapsed = time.perf_counter() - t0
            for conv_id, reply in replies.items():
                rows.append({"conv": int(conv_id), "turn": t, "new": len(batch[conv_id]),
                             "prefilled": reply.num_prefilled, "output": len(reply.token_ids), "ttft": reply.ttft_s,
                             "latency": reply.latency_s, "round_s": elapsed, "tokens": reply.token_ids})  # fmt: skip
    return rows


def run_hf(model, convs, reply_lens, args) -> list[dict]:
    rows = []
    histories = [[] for _ in convs]
    pad = model.generation_config.pad_token_id or 0
    with torch.inference_mode():  # untimed warm-up
        model.generate(torch.tensor([[1000, 1001, 1002]]), max_new_tokens=2, do_sample=False, pad_token_id=pad)
    for t, reply_len in enumerate(tqdm(reply_lens, desc="hf generate", leave=False)):
        live = [i for i, c in enumerate(convs) if t < len(c)]
        prompts = [histories[i] + convs[i][t] for i in live]
        width = max(map(len, prompts))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        clock = _FirstTokenClock()
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=reply_len, min_new_tokens=reply_len,
                                 do_sample=False, streamer=clock, pad_token_id=pad)  # fmt: skip
        elapsed = time.perf_counter() - t0
        for row, i in enumerate(live):
            reply = out[row, width:].tolist()
            histories[i] = prompts[row] + reply
            rows.append({"conv": i, "turn": t, "new": len(convs[i][t]), "prefilled": len(prompts[row]),
                         "output": len(reply), "ttft": clock.first_token_at - t0, "latency": elapsed,
                         "round_s": elapsed, "tokens": reply})  # fmt: skip
    return rows


def run_hf_cb(model, convs, reply_lens, args) -> list[dict]:
    from transformers import ContinuousBatchingConfig, GenerationConfig

    rows = []
    histories = [[] for _ in convs]
    cb_config = ContinuousBatchingConfig(page_size=16)
    for t, reply_len in enumerate(tqdm(reply_lens, desc="hf generate_batch", leave=False)):
        live = [i for i, c in enumerate(convs) if t < len(c)]
        prompts = [histories[i] + convs[i][t] for i in live]
        gen_config = GenerationConfig(max_new_tokens=reply_len, do_sample=False, eos_token_id=None,
                                      pad_token_id=model.generation_config.pad_token_id)  # fmt: skip
        t0 = time.perf_counter()
        results = model.generate_batch(prompts, generation_config=gen_config, continuous_batching_config=cb_config,
                                       persistent_manager=True, record_timestamps=True, warmup=False)  # fmt: skip
        elapsed = time.perf_counter() - t0
        for row, (i, result) in enumerate(zip(live, results.values(), strict=True)):
            reply = list(result.generated_tokens)
            histories[i] = prompts[row] + reply
            ttft = result.timestamps[0] - result.created_time if result.timestamps else float("nan")
            rows.append({"conv": i, "turn": t, "new": len(convs[i][t]), "prefilled": float("nan"),
                         "output": len(reply), "ttft": ttft, "latency": elapsed, "round_s": elapsed,
                         "tokens": reply})  # fmt: skip
    return rows


def run_vllm(model, convs, reply_lens, args) -> list[dict]:
    """vLLM in its own venv, on the same weights and dtype: benchmarks/vllm_peer.py as a subprocess."""
    folder = export_model_folder(args)
    with tempfile.TemporaryDirectory() as tmp:
        workload, out = Path(tmp) / "workload.json", Path(tmp) / "out.json"
        longest = max(sum(map(len, c)) for c in convs) + sum(reply_lens)
        workload.write_text(json.dumps({"model": str(folder), "dtype": args.dtype, "threads": torch.get_num_threads(),
                                        "conversations": convs, "reply_lens": reply_lens,
                                        "max_model_len": max(2048, longest + 64)}))  # fmt: skip
        script = Path(__file__).with_name("vllm_peer.py")
        print(f"vllm: {args.vllm_python} {script.name} (engine start-up takes minutes)", flush=True)
        subprocess.run([args.vllm_python, str(script), str(workload), str(out)], check=True)
        result = json.loads(out.read_text())
    return result["rows"]


def export_model_folder(args) -> Path:
    """The benchmark's model as an HF folder vLLM can load (SmolLM2: the dequantized cache folder)."""
    if args.model:
        return Path(args.model)
    from pensieve.models.smollm2 import cached_folder, load_smollm2

    load_smollm2()  # makes the folder the first time
    return cached_folder()


def summarize(name: str, rows: list[dict]) -> dict:
    """Wall time is the sum of the rounds' times: one-time setup (model copies, pools) is not counted."""
    round_s = {r["turn"]: r["round_s"] for r in rows}
    wall_s = sum(round_s.values())
    steady_s = sum(v for t, v in round_s.items() if t > 0)
    steady_out = sum(r["output"] for r in rows if r["turn"] > 0)
    output = sum(r["output"] for r in rows)
    new = sum(r["new"] for r in rows)
    prefilled = sum(r["prefilled"] for r in rows)
    by_turn = {}
    for t in sorted({r["turn"] for r in rows}):
        ttfts = sorted(r["ttft"] for r in rows if r["turn"] == t)
        by_turn[t] = {"p50": statistics.median(ttfts), "p90": ttfts[min(len(ttfts) - 1, int(0.9 * len(ttfts)))]}
    return {
        "peer": name,
        "wall_s": wall_s,
        "output_tokens": output,
        "output_tok_s": output / wall_s,
        "steady_output_tok_s": steady_out / steady_s if steady_s else float("nan"),
        "ttft_by_turn": by_turn,
        "ttft_p50": statistics.median(r["ttft"] for r in rows),
        "normalized_latency_s": statistics.mean(r["latency"] / r["output"] for r in rows),
        "prefilled_over_new": prefilled / new if not math.isnan(prefilled) else None,
    }


def plot(summaries: list[dict], path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for s in summaries:
        turns = sorted(s["ttft_by_turn"])
        ax1.plot(turns, [s["ttft_by_turn"][t]["p50"] * 1e3 for t in turns], marker="o", label=s["peer"])
    ax1.set_xlabel("turn index")
    ax1.set_ylabel("TTFT p50 (ms, log)")
    ax1.set_yscale("log")
    ax1.set_title("time to first token per turn")
    ax1.legend()
    ax2.bar([s["peer"] for s in summaries], [s["output_tok_s"] for s in summaries], color="tab:green")
    ax2.set_ylabel("output tokens / s")
    ax2.set_title("throughput")
    save(fig, path)


def load_model(args):
    dtype = getattr(torch, args.dtype)
    if args.model:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).eval()
    from pensieve.models.smollm2 import load_smollm2

    return load_smollm2(dtype)[0]


PEERS = {"pensieve": run_pensieve, "hf": run_hf, "hf_cb": run_hf_cb, "vllm": run_vllm}

# The issue-8 runs: name -> workload settings (every peer, fp32 and bf16).
SUITE = {
    "sharegpt": {"workload": "sharegpt", "conversations": 8, "min_turns": 5, "max_turns": 6,
                 "reply_mean": SHAREGPT["reply"]},
    "docqa": {"workload": "docqa", "conversations": 4, "max_turns": 8, "doc_tokens": 1500, "reply_mean": 64},
}  # fmt: skip


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="local HF checkpoint (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--workload", choices=("sharegpt", "docqa"), default="sharegpt")
    parser.add_argument("--conversations", type=int, default=4)
    parser.add_argument("--turns-mean", type=float, default=SHAREGPT["turns"])
    parser.add_argument("--min-turns", type=int, default=1)
    parser.add_argument("--max-turns", type=int, default=6)
    parser.add_argument("--user-mean", type=float, default=SHAREGPT["user"])
    parser.add_argument("--reply-mean", type=float, default=32, help=f"ShareGPT: {SHAREGPT['reply']}")
    parser.add_argument("--doc-tokens", type=int, default=1500, help="docqa: the document's length")
    parser.add_argument("--device-blocks", type=int, default=4096)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--compile", default="auto", choices=("auto", "on", "off"), help="pensieve's EngineConfig")
    parser.add_argument("--peers", default="pensieve,hf,hf_cb", help="comma-separated: " + ",".join(PEERS))
    parser.add_argument("--vllm-python", help="python of vLLM's venv: adds the vllm peer")
    parser.add_argument("--suite", action="store_true", help="sharegpt + docqa, float32 + bfloat16, every peer")
    parser.add_argument("--suite-dtypes", default="float32,bfloat16", help="the suite's dtypes (comma-separated)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results/multiturn.json")
    return parser.parse_args(argv)


def run(args) -> dict:
    """One workload, one dtype, every peer -> {"meta", "summaries", "rows"}."""
    model = load_model(args)
    convs, reply_lens = make_workload(args)
    print(f"\n== {args.workload}, {args.dtype}: {len(convs)} conversations, {sum(map(len, convs))} turns, reply "
          f"lengths per round {reply_lens}, {torch.get_num_threads()} threads, {cpu_name()}")  # fmt: skip
    peers = args.peers.split(",")
    if args.vllm_python and "vllm" not in peers:
        peers.append("vllm")
    summaries, all_rows = [], {}
    for name in peers:
        peer_model = copy.deepcopy(model) if name != "vllm" else None
        rows = PEERS[name](peer_model, convs, reply_lens, args)
        summaries.append(summarize(name, rows))
        all_rows[name] = rows
        del peer_model
    report(summaries, all_rows)
    meta = {**vars(args), "threads": torch.get_num_threads(), "torch": torch.__version__, "reply_lens": reply_lens,
            "turns": [len(c) for c in convs]}  # fmt: skip
    for rows in all_rows.values():
        for r in rows:
            r.pop("tokens", None)
    return {"meta": meta, "summaries": summaries, "rows": all_rows}


def report(summaries: list[dict], all_rows: dict) -> None:
    base = next((s for s in summaries if s["peer"] == "pensieve"), summaries[0])
    print(f"\n{'peer':10}{'wall s':>9}{'out tok/s':>11}{'pensieve is':>13}{'steady tok/s':>14}{'TTFT p50 ms':>13}"
          f"{'norm lat ms':>13}{'prefill/new':>13}")  # fmt: skip
    for s in summaries:
        speedup = base["output_tok_s"] / s["output_tok_s"]  # how much faster pensieve is than this peer
        pn = f"{s['prefilled_over_new']:.2f}" if s["prefilled_over_new"] is not None else "n/a"
        print(f"{s['peer']:10}{s['wall_s']:>9.1f}{s['output_tok_s']:>11.1f}{speedup:>12.2f}x"
              f"{s['steady_output_tok_s']:>14.1f}{s['ttft_p50'] * 1e3:>13.0f}"
              f"{s['normalized_latency_s'] * 1e3:>13.1f}{pn:>13}")  # fmt: skip
    print("\nTTFT p50 (ms) by turn index:")
    for s in summaries:
        print(f"  {s['peer']:10}" + " ".join(f"{v['p50'] * 1e3:7.0f}" for v in s["ttft_by_turn"].values()))
    if "pensieve" in all_rows:
        for name, rows in all_rows.items():
            if name != "pensieve":
                same = sum(a["tokens"] == b["tokens"] for a, b in zip(all_rows["pensieve"], rows, strict=True))
                print(f"pensieve replies token-identical to {name}: {same}/{len(rows)}")


def main(argv=None) -> None:
    args = parse_args(argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not args.suite:
        result = run(args)
        out.write_text(json.dumps(result, indent=2))
        print(f"json: {out}")
        plot(result["summaries"], out.with_suffix(".png"))
        return
    if args.peers == "pensieve,hf,hf_cb" and args.vllm_python:
        args.peers = "pensieve,hf,hf_cb,vllm"
    results = {}
    for dtype in args.suite_dtypes.split(","):
        for name, settings in SUITE.items():
            run_args = argparse.Namespace(**{**vars(args), **settings, "dtype": dtype})
            results[f"{name}-{dtype}"] = run(run_args)
            out.write_text(json.dumps(results, indent=2))  # after every run: a long suite keeps what it measured
    print("\n== suite: output tokens/s (pensieve's speed-up over each peer)")
    for key, result in results.items():
        by_peer = {s["peer"]: s["output_tok_s"] for s in result["summaries"]}
        cells = [f"{p} {v:.1f} ({by_peer.get('pensieve', float('nan')) / v:.2f}x)" for p, v in by_peer.items()]
        print(f"  {key:20} " + "  ".join(cells))
    print(f"json: {out}")
    plot_suite(results, out.with_suffix(".png"))


def plot_suite(results: dict, path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(10, 4))
    keys = list(results)
    peers = sorted({s["peer"] for r in results.values() for s in r["summaries"]}, key=list(PEERS).index)
    width = 0.8 / len(peers)
    for j, peer in enumerate(peers):
        vals = [next((s["output_tok_s"] for s in results[k]["summaries"] if s["peer"] == peer), 0) for k in keys]
        ax.bar([i + j * width for i in range(len(keys))], vals, width, label=peer)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(keys))], keys)
    ax.set_ylabel("output tokens / s")
    ax.set_title("multi-turn throughput, same model and dtype per group")
    ax.legend()
    save(fig, path)


if __name__ == "__main__":
    main()
