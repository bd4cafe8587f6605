"""The public API around a turn: sampling, stops, streaming, asyncio, end/stats/close, bad input."""

import asyncio
import threading

import pytest
import torch

from pensieve import CacheConfig, SamplingParams, StatefulGenerator
from tests.tiny import VOCAB, hf_greedy, oracle_copy, tiny_model


@pytest.fixture
def gen():
    g = StatefulGenerator(tiny_model("llama"), cache_config=CacheConfig(block_size=4, num_device_blocks=64))
    yield g
    g.close()


def _msg(n=8, seed=0):
    return torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_seeded_sampling_is_reproducible_and_independent_of_batch(gen):
    sp = SamplingParams(max_new_tokens=12, temperature=0.9, top_k=40, top_p=0.9, seed=1234, ignore_eos=True)
    alone = gen.generate("a", _msg(), sp).token_ids
    gen.end("a")
    crowd = {"a": _msg(), "b": _msg(30, 1), "c": _msg(3, 2)}
    batched = gen.generate_batch(crowd, sp)["a"].token_ids
    assert batched == alone
    unseeded = [
        gen.generate(f"u{i}", _msg(), SamplingParams(max_new_tokens=12, temperature=1.5)).token_ids for i in range(3)
    ]
    assert len({tuple(t) for t in unseeded}) > 1  # sampling does sample


def test_top_k_one_is_greedy(gen):
    oracle = oracle_copy(gen.engine.model)
    msg = _msg()
    sp = SamplingParams(max_new_tokens=6, temperature=0.7, top_k=1, seed=5, ignore_eos=True)
    assert gen.generate("a", msg, sp).token_ids == hf_greedy(oracle, msg, 6)


def test_stop_token_ids_end_the_turn_and_history_holds_what_was_returned(gen):
    oracle = oracle_copy(gen.engine.model)
    msg = _msg()
    free = hf_greedy(oracle, msg, 8)
    stop_at = free[3]
    reply = gen.generate(
        "a", msg, SamplingParams(max_new_tokens=8, temperature=0, stop_token_ids=[stop_at], ignore_eos=True)
    )
    assert reply.finish_reason == "stop"
    assert reply.token_ids == free[: free.index(stop_at) + 1]  # includes the stop token
    nxt = _msg(4, 9)
    reply2 = gen.generate("a", nxt, SamplingParams(max_new_tokens=5, temperature=0, ignore_eos=True))
    assert reply2.token_ids == hf_greedy(oracle, msg + reply.token_ids + nxt, 5)


def test_eos_from_generation_config_stops_unless_ignored():
    model = tiny_model("llama")
    oracle = oracle_copy(model)
    msg = _msg()
    free = hf_greedy(oracle, msg, 10)
    model.generation_config.eos_token_id = free[2]
    with StatefulGenerator(model, cache_config=CacheConfig(num_device_blocks=16)) as g:
        assert g.generate("a", msg, SamplingParams(max_new_tokens=10, temperature=0)).token_ids == free[:3]
        reply = g.generate("b", msg, SamplingParams(max_new_tokens=10, temperature=0, ignore_eos=True))
        assert reply.token_ids == free and reply.finish_reason == "length"


def test_max_new_tokens_default_comes_from_generation_config():
    model = tiny_model("llama")
    model.generation_config.max_new_tokens = 3
    model.generation_config.eos_token_id = None
    with StatefulGenerator(model, cache_config=CacheConfig(num_device_blocks=16)) as g:
        assert len(g.generate("a", _msg()).token_ids) == 3


def test_stream_yields_the_reply_token_by_token(gen):
    sp = SamplingParams(max_new_tokens=7, temperature=0, ignore_eos=True)
    stream = gen.stream("s", _msg(), sp)
    streamed = list(stream)
    assert stream.reply.token_ids == streamed and stream.reply.finish_reason == "length"
    gen.end("s")
    assert streamed == gen.generate("s", _msg(), sp).token_ids


def test_agenerate(gen):
    sp = SamplingParams(max_new_tokens=5, temperature=0, ignore_eos=True)

    async def main():
        return await asyncio.gather(*(gen.agenerate(f"c{i}", _msg(seed=i), sp) for i in range(3)))

    replies = asyncio.run(main())
    assert [r.conv_id for r in replies] == ["c0", "c1", "c2"]
    assert all(len(r.token_ids) == 5 for r in replies)


def test_end_forgets_and_stats_count(gen):
    sp = SamplingParams(max_new_tokens=4, temperature=0, ignore_eos=True)
    gen.generate("a", _msg(), sp)
    stats = gen.stats()
    assert stats["conversations"] == 1 and stats["turns_completed"] == 1
    assert stats["device_blocks_free"] < stats["device_blocks_total"]
    gen.end("a")
    stats = gen.stats()
    # its chunks stay cached in the prompt tree (evictable): the full ones as nodes, the partial last one as a tail
    assert stats["conversations"] == 0 and stats["tree_chunks"] > 0 and stats["tree_tails"] == 1
    assert stats["device_blocks_free"] == stats["device_blocks_total"] - stats["tree_chunks"] - 1
    with pytest.raises(KeyError):
        gen.end("a")
    reply = gen.generate("b", _msg(), sp)  # the same prompt: found in what "a" left
    assert reply.num_reused_shared == reply.num_reused_device > 0
    gen.end("b", forget=True)  # forget: nothing of it stays cached
    stats = gen.stats()
    assert stats["tree_chunks"] == 0 and stats["device_blocks_free"] == stats["device_blocks_total"] - 1  # a's tail


def test_close_restores_attention_and_rejects_use():
    model = tiny_model("llama")
    before = model.config._attn_implementation
    g = StatefulGenerator(model, cache_config=CacheConfig(num_device_blocks=16))
    assert model.config._attn_implementation == "pensieve"
    g.close()
    g.close()  # idempotent
    assert model.config._attn_implementation == before
    with pytest.raises(RuntimeError, match="closed"):
        g.generate("a", [5, 6])
    model(torch.tensor([[5, 6, 7]]))  # the model works again on its own


BAD = {
    "empty conv_id": ("", [5], None, "conv_id"),
    "non-str conv_id": (3, [5], None, "conv_id"),
    "empty message": ("a", [], None, "message"),
    "out of vocab": ("a", [5, VOCAB], None, "token ids"),
    "negative token": ("a", [-1], None, "token ids"),
    "non-int token": ("a", [5, 2.0], None, "token ids"),
    "bool token": ("a", [True], None, "token ids"),
    "str without tokenizer": ("a", "hello", None, "tokenizer"),
    "sampling type": ("a", [5], {"temperature": 0}, "SamplingParams"),
    "too long for positions": ("a", [5] * 500, SamplingParams(max_new_tokens=20), "positions"),
    "too long for the pool": ("a", [5] * 200, SamplingParams(max_new_tokens=100), "KV blocks"),
    "stop strings without tokenizer": ("a", [5], SamplingParams(stop=["x"]), "tokenizer"),
}


@pytest.mark.parametrize("conv_id,msg,sampling,message", BAD.values(), ids=BAD.keys())
def test_bad_input_raises_and_changes_nothing(gen, conv_id, msg, sampling, message):
    sp = SamplingParams(max_new_tokens=4, temperature=0, ignore_eos=True)
    first = gen.generate("a", _msg(), sp)
    before = gen.stats()
    with pytest.raises(ValueError, match=message):
        gen.generate(conv_id, msg, sampling)
    assert gen.stats() == before
    gen.end("a")
    assert gen.generate("a", _msg(), sp).token_ids == first.token_ids  # state was as before


def test_batch_with_one_bad_message_admits_nothing(gen):
    with pytest.raises(ValueError, match="token ids"):
        gen.generate_batch({"ok": _msg(), "bad": [VOCAB + 1]}, SamplingParams(max_new_tokens=4))
    assert gen.stats()["conversations"] == 0


def test_second_concurrent_turn_on_same_conversation_is_an_error(gen):
    sp = SamplingParams(max_new_tokens=200, temperature=0, ignore_eos=True)
    started = threading.Event()
    stream = gen.stream("a", _msg(), sp)
    next(stream)  # the first turn is running now
    started.set()
    with pytest.raises(ValueError, match="already has a turn running"):
        gen.generate("a", _msg(), sp)
    assert len([next(stream)] + list(stream)) == 199
