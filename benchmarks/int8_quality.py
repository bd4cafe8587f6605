"""How much int8 KV changes SmolLM2's predictions (issue 35): a fixed multi-turn chat (benchmarks/data/int8_chat.json)
with KV in int8 against KV in the model's dtype.

1. Teacher-forced, through pensieve's own kernels: the whole chat in one forward whose attention writes K and V into
   a paged cache with `pensieve.ops.write_kv` and reads it with `pensieve.ops.paged_attention`, once into an int8
   cache and once into a cache of the model's dtype. Over every position of the assistant replies: top-1 agreement
   (argmax equal) and the perplexity of the reference reply tokens.
2. Greedy, through the engine (`StatefulGenerator`, decode steps over the paged cache): after each user turn (the
   reference replies as history), a greedy reply with each KV dtype; the share of tokens the int8 reply matches
   before its first divergence, over all turns.

    python benchmarks/int8_quality.py [--dtype float32] [--max-new-tokens 96] [--out results/int8_quality.json]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pensieve import CacheConfig, SamplingParams, StatefulGenerator  # noqa: E402
from pensieve.models.smollm2 import load_smollm2  # noqa: E402
from pensieve.ops import paged_attention, write_kv  # noqa: E402
from pensieve.ops.quant import row_bytes  # noqa: E402

BLOCK = 16


def _attention(kv_dtype: torch.dtype):
    """An HF attention function that runs a single sequence through pensieve's paged kernels with a fresh cache of
    kv_dtype (int8: quantized rows) for this forward."""

    def attend(module, query, key, value, attention_mask, scaling=None, **kwargs):
        q = query[0].transpose(0, 1)  # [T, Hq, D]
        k, v = key[0].transpose(0, 1), value[0].transpose(0, 1)  # [T, Hkv, D]
        t, hkv, d = k.shape
        compute = torch.float32 if kv_dtype == torch.int8 else kv_dtype
        blocks = -(-t // BLOCK)
        width = row_bytes(d, "int8") if kv_dtype == torch.int8 else d
        caches = [torch.empty(blocks, BLOCK, hkv, width, dtype=kv_dtype) for _ in "kv"]
        write_kv(k.to(compute), v.to(compute), *caches, torch.arange(t))
        out = paged_attention(q.to(compute), *caches, torch.arange(blocks, dtype=torch.int32)[None],
                              torch.tensor([0, t], dtype=torch.int32), torch.tensor([t], dtype=torch.int32),
                              scaling if scaling is not None else d**-0.5)  # fmt: skip
        return out.to(query.dtype)[None], None

    return attend


def _reply_positions(tokenizer, messages) -> list[int]:
    """Positions p whose next token (p + 1) belongs to an assistant reply of the rendered chat."""
    positions = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        render = dict(tokenize=True, return_dict=False)
        start = len(tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True, **render))
        end = len(tokenizer.apply_chat_template(messages[: i + 1], **render))
        positions += range(start - 1, end - 1)
    return positions


def teacher_forced(model, tokenizer, messages, kv_dtype: torch.dtype) -> torch.Tensor:
    """log-probabilities [T, V] of the whole chat with KV through a cache of kv_dtype."""
    from transformers import AttentionInterface

    name = f"pensieve_tf_{str(kv_dtype).removeprefix('torch.')}"
    AttentionInterface.register(name, _attention(kv_dtype))
    model.set_attn_implementation(name)
    ids = torch.tensor([tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)])
    with torch.no_grad():
        logits = model(ids).logits[0].float()
    model.set_attn_implementation("sdpa")
    return logits.log_softmax(-1), ids[0]


def greedy_turns(model, tokenizer, messages, kv_dtype: str | None, max_new_tokens: int) -> list[list[int]]:
    """A greedy reply after each user turn (the reference replies as history), through the engine."""
    config = CacheConfig(block_size=BLOCK, num_device_blocks=512, kv_dtype=kv_dtype)
    sampling = SamplingParams(max_new_tokens=max_new_tokens, temperature=0)
    with StatefulGenerator(model, tokenizer, config) as gen:
        return [gen.complete(messages[: i + 1], sampling).token_ids
                for i, m in enumerate(messages) if m["role"] == "user"]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--chat", default=str(ROOT / "benchmarks" / "data" / "int8_chat.json"))
    parser.add_argument("--out", default="results/int8_quality.json")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    model, tokenizer = load_smollm2(dtype)
    messages = json.loads(Path(args.chat).read_text())["messages"]
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads

    ref, ids = teacher_forced(model, tokenizer, messages, dtype)
    q8, _ = teacher_forced(model, tokenizer, messages, torch.int8)
    pos = torch.tensor(_reply_positions(tokenizer, messages))
    target = ids[pos + 1]
    agree = (ref[pos].argmax(-1) == q8[pos].argmax(-1)).float().mean().item()
    ppl_ref = math.exp(-ref[pos, target].mean().item())
    ppl_q8 = math.exp(-q8[pos, target].mean().item())

    exact = greedy_turns(model, tokenizer, messages, None, args.max_new_tokens)
    quant = greedy_turns(model, tokenizer, messages, "int8", args.max_new_tokens)
    prefixes = []
    for a, b in zip(exact, quant, strict=True):
        n = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
        prefixes.append(n)
    share = sum(prefixes) / sum(len(a) for a in exact)

    result = {
        "cpu": platform.processor() or platform.machine(),
        "model": f"SmolLM2-135M-Instruct {args.dtype}",
        "reply_positions": len(pos),
        "chat_tokens": len(ids),
        "top1_agreement": agree,
        "perplexity": {"model_dtype": ppl_ref, "int8": ppl_q8, "change": ppl_q8 / ppl_ref - 1},
        "greedy": {
            "turns": len(exact),
            "tokens_before_first_divergence": prefixes,
            "reply_tokens": [len(a) for a in exact],
            "share_before_divergence": share,
        },  # fmt: skip
        "bytes_per_token_row": {
            name: row_bytes(head_dim, getattr(torch, name, name)) for name in ("float32", "bfloat16", "int8")
        },  # fmt: skip
        "tokens_per_byte_vs": {
            name: row_bytes(head_dim, getattr(torch, name)) / row_bytes(head_dim, "int8")
            for name in ("float32", "bfloat16")
        },  # fmt: skip
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"teacher-forced over {len(pos)} reply positions ({len(ids)} tokens): top-1 agreement {agree:.2%}; "
          f"perplexity {ppl_ref:.3f} -> {ppl_q8:.3f} ({ppl_q8 / ppl_ref - 1:+.2%})")  # fmt: skip
    print(f"greedy through the engine, {len(exact)} turns: {share:.1%} of the reply tokens before the first divergence "
          f"(per turn {prefixes} of {[len(a) for a in exact]})")  # fmt: skip
    print(f"int8 rows: {row_bytes(head_dim, 'int8')} bytes vs {row_bytes(head_dim, torch.float32)} fp32 "
          f"({result['tokens_per_byte_vs']['float32']:.2f}x tokens) and {row_bytes(head_dim, torch.bfloat16)} bf16 "
          f"({result['tokens_per_byte_vs']['bfloat16']:.2f}x)")  # fmt: skip


if __name__ == "__main__":
    main()
