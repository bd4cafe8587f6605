"""Tiny float64 random models of every supported family (2 layers, hidden 64), and the HF oracle."""

from __future__ import annotations

import copy

import torch
import transformers as tf

VOCAB = 120


def _configs(vocab: int) -> dict:
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2, initializer_range=0.2)  # fmt: skip
    return {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, dict(common)),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM, dict(common, sliding_window=8)),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, dict(common)),
        "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM, dict(common, head_dim=16)),
        "phi3": (tf.Phi3Config, tf.Phi3ForCausalLM, dict(common, sliding_window=12)),
        "gemma2": (  # untied and init 0.1: tied, sqrt(hidden)-scaled embeddings make a tiny Gemma2 echo its input
            tf.Gemma2Config,
            tf.Gemma2ForCausalLM,
            dict(
                common,
                head_dim=16,
                sliding_window=8,
                attn_logit_softcapping=1.0,
                final_logit_softcapping=None,
                query_pre_attn_scalar=24,
                tie_word_embeddings=False,
                initializer_range=0.1,
            ),
        ),  # fmt: skip
        "gpt2": (
            tf.GPT2Config,
            tf.GPT2LMHeadModel,
            dict(
                vocab_size=vocab,
                n_embd=64,
                n_layer=2,
                n_head=4,
                n_positions=512,
                bos_token_id=1,
                eos_token_id=2,
                initializer_range=0.2,
            ),
        ),
    }


FAMILIES = tuple(_configs(VOCAB))


def tiny_model(
    family: str, seed: int = 0, vocab: int = VOCAB, dtype: torch.dtype = torch.float64, device: str = "cpu"
) -> torch.nn.Module:
    """A tiny random model (float64 on CPU unless asked otherwise; the weights depend on the seed alone)."""
    config_cls, model_cls, kwargs = _configs(vocab)[family]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**kwargs)).double().eval().to(dtype=dtype, device=device)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = 2
    return model


def oracle_copy(model: torch.nn.Module) -> torch.nn.Module:
    """An independent copy for HF generate, on HF's own attention (a generator switches the original's)."""
    oracle = copy.deepcopy(model)
    if oracle.config._attn_implementation == "pensieve":
        oracle.set_attn_implementation("eager")
    return oracle


def hf_greedy(oracle: torch.nn.Module, history: list[int], max_new_tokens: int, ignore_eos: bool = True) -> list[int]:
    """The truth: HF generate over the full history."""
    ids = torch.tensor([history], device=next(oracle.parameters()).device)
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, attention_mask=torch.ones_like(ids))
    if ignore_eos:
        kwargs["eos_token_id"] = None
    with torch.no_grad():
        out = oracle.generate(ids, **kwargs)
    return out[0, len(history) :].tolist()


def oracle_turn(gen, oracle, histories: dict, conv_id: str, msg: list[int], sampling) -> object:
    """One turn through gen, checked token for token against HF generate over the full history; histories[conv_id]
    grows by the message and the reply."""
    reply = gen.generate(conv_id, msg, sampling)
    history = histories.get(conv_id, []) + msg
    assert reply.token_ids == hf_greedy(oracle, history, sampling.max_new_tokens), conv_id
    histories[conv_id] = history + reply.token_ids
    return reply


def drive(gen, future):
    """Step the engine until a submitted turn is done (as a command, on the thread that drives)."""

    def run():
        while not future.done():
            gen.engine.step()

    gen.call(run)
    return future.result()


def int8_oracle(model: torch.nn.Module) -> torch.nn.Module:
    """The truth for `CacheConfig(kv_dtype="int8")`: HF generate on a copy whose attention sees every K and V row
    quantized and dequantized as pensieve/ops/quant.py defines it (through fp32, as the int8 cache takes them)."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from pensieve.ops.quant import dequantize_kv, quantize_kv

    def fake_int8(module, query, key, value, attention_mask, **kwargs):
        key = dequantize_kv(quantize_kv(key)).to(key.dtype)
        value = dequantize_kv(quantize_kv(value)).to(value.dtype)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("int8_reference", fake_int8)
    oracle = copy.deepcopy(model)
    oracle.set_attn_implementation("int8_reference")
    return oracle


def check_every_step(gen):
    """gen, its engine checking the cache's and the scheduler's invariants after every step."""
    engine, step = gen.engine, gen.engine.step

    def checked_step():
        step()
        engine.check_integrity()

    engine.step = checked_step
    return gen
