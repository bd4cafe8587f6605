"""Text mode: str messages through the chat template. Tokens are the truth; KV is reused only for a shared prefix."""

import copy

import pytest
import torch

from pensieve import CacheConfig, SamplingParams, StatefulGenerator
from pensieve.models.smollm2 import load_smollm2, smollm2_path
from tests.tiny import oracle_copy, tiny_model

# Rewrites every earlier turn when a message is added (it prints the turn count in the header and numbers turns
# from the end), so stored history is never a prefix of the next rendering.
REWRITING_TEMPLATE = (
    "<|im_start|>system\nturns so far: {{ messages|length }}<|im_end|>\n"
    "{% for m in messages %}<|im_start|>{{ m['role'] }} #{{ messages|length - loop.index }}\n"
    "{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from pensieve.models.smollm2 import GGUF_NAME

    return AutoTokenizer.from_pretrained(smollm2_path(), gguf_file=GGUF_NAME)


def _render(tokenizer, messages):
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False))


def _hf_reply(oracle, ids: list[int], max_new_tokens):
    ids = torch.tensor([ids])
    with torch.no_grad():
        out = oracle.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, ids.shape[1] :].tolist()


def _tokens(gen, conv_id="c") -> list[int]:
    return gen.call(lambda: list(gen.engine.kv.conversations[conv_id].tokens))


def _chat(gen, oracle, tokenizer, turns, sp):
    """Each turn against HF generate over the conversation's whole token sequence as pensieve holds it."""
    replies = []
    for text in turns:
        reply = gen.generate("c", text, sp)
        prompt = _tokens(gen)[: -len(reply.token_ids)]
        assert reply.token_ids == _hf_reply(oracle, prompt, sp.max_new_tokens), text
        replies.append(reply)
    return replies


USER_TURNS = ["Hello there", "Tell me about cats", "And dogs?", "Thanks!"]


def test_append_only_template_keeps_the_sampled_tokens_and_all_their_kv(tokenizer):
    """A random model's reply rarely survives decode -> re-encode, so rendering the whole conversation again would
    cut the KV inside it. pensieve appends only the new message and the generation prompt to the tokens it sampled:
    all history KV is reused, and the history is exactly the earlier prompt + reply tokens."""
    model = tiny_model("llama", vocab=len(tokenizer))
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    oracle = oracle_copy(model)
    sp = SamplingParams(max_new_tokens=6, temperature=0)
    messages: list[dict] = []
    stored: list[int] = []
    rewritten = 0
    with StatefulGenerator(model, tokenizer, CacheConfig(block_size=8, num_device_blocks=64)) as gen:
        for text in USER_TURNS:
            reply = gen.generate("c", text, sp)
            tokens = _tokens(gen)
            assert tokens[: len(stored)] == stored  # the sampled reply tokens stay as they were
            assert reply.token_ids == _hf_reply(oracle, tokens[: -len(reply.token_ids)], sp.max_new_tokens)
            if stored:
                assert reply.num_recomputed == 0 and reply.num_reused_device == len(stored) - 1
                assert reply.num_prefilled == reply.num_new_tokens + 1
            messages += [{"role": "user", "content": text}, {"role": "assistant", "content": reply.text}]
            rendered = list(tokenizer.apply_chat_template(messages, return_dict=False))
            rewritten += _common_prefix(rendered, tokens) < len(tokens) - 1
            stored = tokens
    assert rewritten > 0  # a whole re-render would have cut the KV somewhere here (the case this covers)


def _common_prefix(a, b):
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def test_rewriting_template_recomputes_and_still_matches(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = REWRITING_TEMPLATE
    model = tiny_model("qwen2", vocab=len(tok))
    oracle = oracle_copy(model)
    sp = SamplingParams(max_new_tokens=5, temperature=0, ignore_eos=True)
    with StatefulGenerator(model, tok, CacheConfig(block_size=4, num_device_blocks=128)) as gen:
        replies = _chat(gen, oracle, tok, USER_TURNS, sp)
    head = len(tok("<|im_start|>system\nturns so far: ")["input_ids"])
    for prev, reply in zip(replies, replies[1:], strict=False):
        # only the head before the turn count survives the rewrite, and only its full blocks: the rewrite starts
        # inside a full (keyed, shareable) chunk, which is never written again, so its first positions are recomputed
        assert reply.num_reused_device == head - head % 4
        assert reply.num_recomputed > prev.num_recomputed > 0 or prev is replies[0]


def test_text_needs_same_mode_and_nonempty(tokenizer):
    model = tiny_model("llama", vocab=len(tokenizer))
    with StatefulGenerator(model, tokenizer, CacheConfig(num_device_blocks=64)) as gen:
        sp = SamplingParams(max_new_tokens=2, temperature=0)
        gen.generate("raw", [5, 6, 7], sp)
        with pytest.raises(ValueError, match="raw token mode"):
            gen.generate("raw", "hello", sp)
        gen.generate("text", "hello", sp)
        with pytest.raises(ValueError, match="text mode"):
            gen.generate("text", [5, 6], sp)
        with pytest.raises(ValueError, match="empty"):
            gen.generate("text", "", sp)


def test_stop_strings_end_the_turn(tokenizer):
    model = tiny_model("llama", vocab=len(tokenizer))
    with StatefulGenerator(model, tokenizer, CacheConfig(num_device_blocks=64)) as gen:
        free = gen.generate("a", "hi", SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True))
        stop = free.text[len(free.text) // 2 :][:3]
        assert stop
        reply = gen.generate("b", "hi", SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True, stop=[stop]))
    assert reply.finish_reason == "stop"
    assert stop not in reply.text and free.text.startswith(reply.text)
    assert reply.token_ids == free.token_ids[: len(reply.token_ids)]


@pytest.mark.slow
def test_smollm2_real_model_matches_hf():
    model, tokenizer = load_smollm2(torch.float32)
    oracle = oracle_copy(model)
    sp = SamplingParams(max_new_tokens=16, temperature=0)
    turns = ["What is the capital of France?", "And of Germany?", "Which one is bigger?"]
    with StatefulGenerator(model, tokenizer, CacheConfig(num_device_blocks=64)) as gen:
        replies = _chat(gen, oracle, tokenizer, turns, sp)
    assert "Paris" in replies[0].text
    assert all(r.num_recomputed == 0 for r in replies)
    assert replies[2].num_reused_device > replies[1].num_reused_device > 0
