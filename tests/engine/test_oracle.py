"""Multi-turn outputs are token-identical to HF generate over the full history (float64 tiny models)."""

import random
import threading

import pytest
import torch

from pensieve import CacheConfig, SamplingParams, StatefulGenerator
from tests.tiny import FAMILIES, VOCAB, hf_greedy, oracle_copy, tiny_model

GREEDY = SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True)


def _messages(seed: int, turns: int, lo: int = 3, hi: int = 12) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, VOCAB) for _ in range(rng.randint(lo, hi))] for _ in range(turns)]


@pytest.mark.parametrize("family", FAMILIES)
def test_six_turns_match_hf(family):
    model = tiny_model(family)
    oracle = oracle_copy(model)
    history: list[int] = []
    with StatefulGenerator(model, cache_config=CacheConfig(block_size=4, num_device_blocks=64)) as gen:
        for i, msg in enumerate(_messages(1, 6)):
            reply = gen.generate("c", msg, GREEDY)
            assert reply.token_ids == hf_greedy(oracle, history + msg, 6), f"turn {i}"
            assert reply.num_reused_device == (len(history) - 1 if history else 0)  # all but the last reply token
            assert reply.num_recomputed == 0
            history += msg + reply.token_ids
    assert model.config._attn_implementation == oracle.config._attn_implementation  # restored by close()


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_models_are_attention_sensitive(family):
    """Guards the oracle tests' power: a tiny model whose greedy tokens ignore attention would pass anything."""
    model = tiny_model(family)
    msg = _messages(1, 1, 12, 12)[0]
    normal = hf_greedy(model, msg, 12)
    assert len(set(normal)) >= 4, f"degenerate generation {normal}"
    for module in model.modules():
        if hasattr(module, "scaling") and hasattr(module, "layer_idx"):
            module.scaling *= 2
    assert hf_greedy(model, msg, 12) != normal


def test_batched_conversations_of_different_lengths_match_each_alone():
    model = tiny_model("llama")
    oracle = oracle_copy(model)
    lengths = {"short": (1, 4), "mid": (20, 40), "long": (90, 140)}
    msgs = {c: _messages(hash(c) % 1000, 3, lo, hi) for c, (lo, hi) in lengths.items()}
    histories = {c: [] for c in msgs}
    with StatefulGenerator(model, cache_config=CacheConfig(block_size=8, num_device_blocks=128)) as gen:
        for turn in range(3):
            replies = gen.generate_batch({c: m[turn] for c, m in msgs.items()}, GREEDY)
            for c, reply in replies.items():
                assert reply.token_ids == hf_greedy(oracle, histories[c] + msgs[c][turn], 6), (c, turn)
                histories[c] += msgs[c][turn] + reply.token_ids
        assert gen.stats()["steps"] < 3 * 3 * 7  # batched: fewer steps than running them one by one


def test_concurrent_threads_match_serial():
    model = tiny_model("qwen2")
    oracle = oracle_copy(model)
    convs = {f"t{i}": _messages(100 + i, 3) for i in range(4)}
    results: dict[str, list[list[int]]] = {}
    errors = []

    def chat(conv_id, gen):
        try:
            results[conv_id] = [gen.generate(conv_id, m, GREEDY).token_ids for m in convs[conv_id]]
        except Exception as e:  # surfaced below
            errors.append(e)

    with StatefulGenerator(model, cache_config=CacheConfig(block_size=4, num_device_blocks=128)) as gen:
        threads = [threading.Thread(target=chat, args=(c, gen)) for c in convs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors
    for conv_id, msgs in convs.items():
        history: list[int] = []
        for msg, got in zip(msgs, results[conv_id], strict=True):
            assert got == hf_greedy(oracle, history + msg, 6)
            history += msg + got


def test_long_prompt_is_chunked_across_steps():
    from pensieve import SchedulerConfig

    model = tiny_model("llama")
    oracle = oracle_copy(model)
    msg = _messages(7, 1, 150, 150)[0]
    with StatefulGenerator(
        model, cache_config=CacheConfig(block_size=16, num_device_blocks=32), scheduler_config=SchedulerConfig(32)
    ) as gen:
        reply = gen.generate("c", msg, GREEDY)
        assert gen.stats()["steps"] >= 150 // 32 + 5
    assert reply.token_ids == hf_greedy(oracle, msg, 6)
    assert reply.num_prefilled == 150


def test_float32_model_matches_too():
    model = tiny_model("llama").float()
    oracle = oracle_copy(model)
    with StatefulGenerator(model, cache_config=CacheConfig(num_device_blocks=32)) as gen:
        msg = _messages(3, 1)[0]
        assert gen.generate("c", msg, GREEDY).token_ids == hf_greedy(oracle, msg, 6)
    assert torch.float32 == next(model.parameters()).dtype
