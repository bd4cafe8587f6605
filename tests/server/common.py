"""Shared by the server tests: the tiny float64 model behind SmolLM2's tokenizer, and the HF oracle on a chat."""

from __future__ import annotations

import torch

from tests.tiny import tiny_model

MAX_OUT = 6
SEED = 11


def make_model(tokenizer):
    return tiny_chat_model(len(tokenizer), tokenizer.convert_tokens_to_ids("<|im_end|>"))


def tiny_chat_model(vocab: int, eos: int):
    """The model factory (picklable: cluster instances build it): seeded weights, ChatML's end of turn as EOS."""
    model = tiny_model("llama", seed=SEED, vocab=vocab)
    model.generation_config.eos_token_id = eos
    return model


def hf_reply(oracle, tokenizer, messages, max_new_tokens=MAX_OUT) -> str:
    """The truth: HF generate over the chat template's rendering of every message, decoded."""
    ids = torch.tensor([tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)])
    with torch.no_grad():
        out = oracle.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1] :].tolist(), skip_special_tokens=True)
