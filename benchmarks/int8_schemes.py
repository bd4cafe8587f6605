"""Which int8 KV scheme would reach issue 35's 99% top-1 agreement: fake-quantized K and V in SmolLM2's own attention.

Before any kernel changes, on the same committed chat as benchmarks/int8_quality.py, teacher-forced: every K and V row
is quantized and dequantized by a scheme, then HF's sdpa attention runs over the dequantized values. The top-1
agreement and the perplexity of the reference replies are measured against KV in the model's dtype. Schemes:
  row-sym      what pensieve stores today: per token and head, scale = amax / 127 (pensieve/ops/quant.py). Its row
               should match int8_quality.py's figure; this is the check that the fake quantization is faithful.
  row-asym     per token and head, min/max with a zero point: scale = (max - min) / 255.
  k-chan-sym   K per channel over groups of --group positions (KIVI: K's outliers sit in fixed channels), symmetric;
               V per token as row-sym.
  k-chan-asym  the same with min/max and zero points for K and per-row asym V.
Every scheme stores about the same bytes: row scales are one fp32 per row, channel scales one fp32 per channel per
group (KIVI-style schemes need a block's scales kept beside the block).

    python benchmarks/int8_schemes.py [--group 32] [--out results/int8_schemes.json]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from int8_quality import _reply_positions  # noqa: E402

from pensieve.models.smollm2 import load_smollm2  # noqa: E402
from pensieve.ops.quant import dequantize_kv, quantize_kv  # noqa: E402


def sym(x: torch.Tensor, dim: int) -> torch.Tensor:
    """int8 with one scale = amax / 127 along dim, round half to even, dequantized."""
    scale = x.abs().amax(dim, keepdim=True) / 127
    return torch.round(x / scale.clamp_min(1e-30)).clamp(-127, 127) * scale


def asym(x: torch.Tensor, dim: int) -> torch.Tensor:
    """uint8 with scale = (max - min) / 255 and a zero point (the minimum) along dim, dequantized."""
    lo, hi = x.amin(dim, keepdim=True), x.amax(dim, keepdim=True)
    scale = ((hi - lo) / 255).clamp_min(1e-30)
    return torch.round((x - lo) / scale).clamp(0, 255) * scale + lo


def per_channel(x: torch.Tensor, group: int, quant) -> torch.Tensor:
    """x [B, H, T, D] quantized per channel over groups of `group` positions (the last group may be shorter)."""
    return torch.cat([quant(x[:, :, s : s + group], 2) for s in range(0, x.shape[2], group)], dim=2)


def schemes(group: int) -> dict:
    """name -> (K, V) -> (K, V) dequantized; K and V as HF's attention gets them, [B, H, T, D]."""

    def row_sym(k, v):  # exactly pensieve's quantize_kv over rows [.., D]
        return dequantize_kv(quantize_kv(k.float())).to(k.dtype), dequantize_kv(quantize_kv(v.float())).to(v.dtype)

    return {
        "row-sym": row_sym,
        "row-asym": lambda k, v: (asym(k, -1), asym(v, -1)),
        "k-chan-sym": lambda k, v: (per_channel(k, group, sym), sym(v, -1)),
        "k-chan-asym": lambda k, v: (per_channel(k, group, asym), asym(v, -1)),
    }


def log_probs(model, ids: torch.Tensor, fake) -> torch.Tensor:
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def attend(module, query, key, value, attention_mask, **kwargs):
        if fake is not None:
            key, value = fake(key, value)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("int8_scheme", attend)
    model.set_attn_implementation("int8_scheme")
    with torch.no_grad():
        out = model(ids[None]).logits[0].float().log_softmax(-1)
    model.set_attn_implementation("sdpa")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--group", type=int, default=32, help="positions per K channel scale (a block)")
    parser.add_argument("--chat", default=str(ROOT / "benchmarks" / "data" / "int8_chat.json"))
    parser.add_argument("--out", default="results/int8_schemes.json")
    args = parser.parse_args()
    model, tokenizer = load_smollm2(torch.float32)
    messages = json.loads(Path(args.chat).read_text())["messages"]
    ids = torch.tensor(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False))
    pos = torch.tensor(_reply_positions(tokenizer, messages))
    target = ids[pos + 1]
    ref = log_probs(model, ids, None)
    ppl_ref = math.exp(-ref[pos, target].mean().item())
    rows = []
    print(f"SmolLM2-135M fp32, {len(ids)} tokens, {len(pos)} reply positions; fp32 KV perplexity {ppl_ref:.3f}")
    for name, fake in schemes(args.group).items():
        lp = log_probs(model, ids, fake)
        agree = (ref[pos].argmax(-1) == lp[pos].argmax(-1)).float().mean().item()
        ppl = math.exp(-lp[pos, target].mean().item())
        rows.append({"scheme": name, "top1_agreement": round(agree, 4), "perplexity": round(ppl, 3),
                     "perplexity_change": round(ppl / ppl_ref - 1, 4)})  # fmt: skip
        print(f"{name:12} top-1 agreement {agree:7.2%}   perplexity {ppl:.3f} ({ppl / ppl_ref - 1:+.2%})")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"group": args.group, "reference_perplexity": ppl_ref, "rows": rows}, indent=1))
    print(f"json: {out}")


if __name__ == "__main__":
    main()
