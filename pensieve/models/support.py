"""Which HF causal LMs pensieve serves, and the facts about each that the KV pool needs."""

from __future__ import annotations

from dataclasses import dataclass

import torch

# model_type -> what differs (all handled by HF's own modules + the kwargs our attention function honours)
SUPPORTED_FAMILIES = {
    "llama": "RoPE",
    "mistral": "RoPE, sliding window",
    "qwen2": "RoPE, qkv bias, optional sliding window",
    "qwen3": "RoPE, q/k RMSNorm",
    "phi3": "fused qkv, RoPE, optional sliding window",
    "gemma2": "logit softcap, alternating sliding window, query_pre_attn_scalar",
    "gpt2": "learned absolute positions",
}


@dataclass(frozen=True)
class ModelShape:
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_positions: int
    vocab_size: int


def model_shape(model: torch.nn.Module) -> ModelShape:
    """Raises ValueError for a model pensieve does not serve, listing what it does."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_FAMILIES:
        supported = ", ".join(sorted(SUPPORTED_FAMILIES))
        raise ValueError(f"model type {model_type!r} is not supported; supported: {supported}")
    if model_type == "gpt2":
        heads = config.n_head
        return ModelShape(config.n_layer, heads, heads, config.n_embd // heads, config.n_positions, config.vocab_size)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return ModelShape(
        num_layers=config.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        max_positions=config.max_position_embeddings,
        vocab_size=config.vocab_size,
    )
