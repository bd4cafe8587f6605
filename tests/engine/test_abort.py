"""Aborting a turn (`StatefulGenerator.abort`): none of the turn is kept, the conversation is exactly as before it
(the next turn equals HF generate over the history without the aborted turn), a conversation the turn started is
gone, and the cache's invariants hold. Stopping one (`stop`) keeps what it sampled, and its KV. Also `submit` /
`serve`: a dedicated engine thread, callers only waiting."""

import threading

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pensieve import CacheConfig, SamplingParams, SchedulerConfig, StatefulGenerator, TurnAborted
from tests.tiny import drive, hf_greedy, oracle_copy, oracle_turn, tiny_model

GREEDY = SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True)
LONG = SamplingParams(max_new_tokens=40, temperature=0, ignore_eos=True)


def _abort_after(gen, conv_id, msg, pieces: int) -> int:
    """Stream a turn, abort it after `pieces` tokens; -> tokens seen. The stream must end with TurnAborted."""
    stream = gen.stream(conv_id, msg, LONG)
    seen = 0
    with pytest.raises(TurnAborted):
        for _ in stream:
            seen += 1
            if seen == pieces:
                assert gen.abort(conv_id) is True
    return seen


@given(
    pieces=st.integers(1, 12),
    msg_len=st.integers(1, 30),
    block_size=st.sampled_from([2, 4, 16]),
    share=st.booleans(),
)
def test_abort_keeps_none_of_the_turn(model, oracle, pieces, msg_len, block_size, share):
    config = CacheConfig(block_size=block_size, num_device_blocks=96, share_prefixes=share)
    with StatefulGenerator(model, cache_config=config) as gen:
        histories: dict = {}
        oracle_turn(gen, oracle, histories, "a", [5 + i % 90 for i in range(9)], GREEDY)
        oracle_turn(gen, oracle, histories, "b", [7 + i % 80 for i in range(5)], GREEDY)
        conv = gen.engine.kv.conversations["a"]
        before = (list(conv.tokens), conv.num_computed, list(conv.chunks))
        assert _abort_after(gen, "a", [11 + i % 70 for i in range(msg_len)], pieces) == pieces
        gen.engine.check_integrity()
        assert gen.stats()["active_turns"] == 0
        # the conversation holds exactly what it held before; the turn's full chunks are only cached (evictable)
        conv = gen.engine.kv.conversations["a"]
        assert (conv.tokens, conv.num_computed, conv.chunks) == before and not conv.pinned
        reply = oracle_turn(gen, oracle, histories, "a", [3, 4, 5], GREEDY)  # continues the pre-abort history
        assert reply.num_recomputed == 0
        oracle_turn(gen, oracle, histories, "b", [8], GREEDY)
        gen.engine.check_integrity()


def test_abort_of_a_new_conversation_removes_it(model, oracle):
    with StatefulGenerator(model, cache_config=CacheConfig(block_size=4, num_device_blocks=64)) as gen:
        _abort_after(gen, "new", [9, 8, 7, 6, 5], 3)
        assert "new" not in gen.conversations()
        gen.engine.check_integrity()
        histories: dict = {}
        oracle_turn(gen, oracle, histories, "new", [1, 2, 3], GREEDY)  # starts afresh


def test_abort_of_a_finished_turn_or_unknown_target(model):
    with StatefulGenerator(model, cache_config=CacheConfig(block_size=4, num_device_blocks=64)) as gen:
        gen.generate("x", [1, 2, 3], GREEDY)
        assert gen.abort("x") is False
        assert gen.abort("nobody") is False
        assert gen.generate("x", [4], GREEDY).num_recomputed == 0


def test_abort_in_text_mode_restores_messages(model, oracle, tmp_path):
    """A disk-backed text-mode conversation: after the abort its messages and stored record are as before."""
    from transformers import AutoTokenizer

    from pensieve.models.smollm2 import GGUF_NAME, smollm2_path

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path(), gguf_file=GGUF_NAME)
    text_model = tiny_model("llama", seed=4, vocab=len(tokenizer))
    text_oracle = oracle_copy(text_model)
    config = CacheConfig(block_size=4, num_device_blocks=128, disk_dir=tmp_path)
    sp = SamplingParams(max_new_tokens=5, temperature=0, ignore_eos=True)
    with StatefulGenerator(text_model, tokenizer, cache_config=config) as gen:
        first = gen.generate("t", "Hello there", sp)
        stream = gen.stream("t", "This turn is aborted", LONG)
        with pytest.raises(TurnAborted):
            for _ in stream:
                gen.abort("t")
        gen.engine.check_integrity()
    with StatefulGenerator(text_model, tokenizer, cache_config=config) as gen:  # restarted on the same disk_dir
        reply = gen.generate("t", "And dogs?", sp)
    messages = [
        {"role": "user", "content": "Hello there"},
        {"role": "assistant", "content": first.text},
        {"role": "user", "content": "And dogs?"},
    ]
    prompt = list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False))
    assert reply.token_ids == hf_greedy(text_oracle, prompt, sp.max_new_tokens)


def test_serve_thread_with_submit_and_abort(model, oracle):
    """The engine on a thread of its own (`serve`); other threads submit turns and completions, stream tokens
    through on_token, abort a completion by its Future; every reply equals HF generate."""
    with StatefulGenerator(model, cache_config=CacheConfig(block_size=4, num_device_blocks=128)) as gen:
        stop = threading.Event()
        engine = threading.Thread(target=gen.serve, args=(stop,))
        engine.start()
        try:
            msgs = {f"s{i}": [2 + (i * 13 + j * 7) % 100 for j in range(4 + i)] for i in range(6)}
            seen: dict = {c: [] for c in msgs}
            futures = {
                c: gen.submit(c, m, GREEDY, on_token=lambda d, c=c: seen[c].append(d.token_id)) for c, m in msgs.items()
            }
            started = threading.Event()
            endless = SamplingParams(max_new_tokens=100, temperature=0, ignore_eos=True)
            long = gen.submit_complete([1, 2, 3, 4, 5], endless, on_token=lambda _: started.set())
            assert started.wait(timeout=60)
            assert gen.abort(long) is True  # applied at the next step boundary, long before 100 tokens
            with pytest.raises(TurnAborted):
                long.result(timeout=60)
            for conv_id, future in futures.items():
                reply = future.result(timeout=60)
                assert reply.token_ids == seen[conv_id] == hf_greedy(oracle, msgs[conv_id], GREEDY.max_new_tokens)
            with pytest.raises(ValueError, match="token ids"):
                gen.submit("bad", [10**9], GREEDY).result(timeout=60)
            assert gen.generate("s0", [7], GREEDY).num_recomputed == 0  # a blocking call from another thread
            assert sorted(gen.conversations()) == sorted(msgs)
        finally:
            stop.set()
            engine.join()
        gen.engine.check_integrity()


# ---- stop: cut a turn short and keep it ---------------------------------------------------------------------------


@given(pieces=st.integers(1, 12), block_size=st.sampled_from([2, 4, 16]), share=st.booleans())
def test_stop_keeps_the_reply_so_far_and_the_next_turn_continues_it(model, oracle, pieces, block_size, share):
    """`stop` after `pieces` tokens: the turn ends after one more, finish_reason "cancelled", its tokens the first
    of HF's greedy reply; the conversation keeps them and their KV (the next turn recomputes nothing)."""
    config = CacheConfig(block_size=block_size, num_device_blocks=96, share_prefixes=share)
    with StatefulGenerator(model, cache_config=config) as gen:
        histories: dict = {}
        oracle_turn(gen, oracle, histories, "a", [5 + i % 90 for i in range(9)], GREEDY)
        msg = [11 + i for i in range(pieces)]
        stream = gen.stream("a", msg, LONG)
        seen = 0
        for _ in stream:
            seen += 1
            if seen == pieces:
                assert gen.stop("a") is True
        reply = stream.reply
        assert reply.finish_reason == "cancelled" and len(reply.token_ids) == seen == pieces + 1
        history = histories["a"] + msg
        assert reply.token_ids == hf_greedy(oracle, history, LONG.max_new_tokens)[: pieces + 1]
        histories["a"] = history + reply.token_ids
        gen.engine.check_integrity()
        assert gen.stats()["active_turns"] == 0 and gen.stop("a") is False  # nothing runs any more
        follow = oracle_turn(gen, oracle, histories, "a", [3, 4, 5], GREEDY)
        assert follow.num_recomputed == 0 and follow.num_reused_device == len(history) + pieces
        gen.engine.check_integrity()


def test_stop_before_the_first_token_keeps_one(model, oracle):
    """A stop while the turn still prefills (a long message in small chunks) ends it after its first token."""
    config = CacheConfig(block_size=4, num_device_blocks=96)
    with StatefulGenerator(model, cache_config=config, scheduler_config=SchedulerConfig(8)) as gen:
        future = gen.submit("p", list(range(3, 60)), LONG)
        gen.call(gen.engine.step)  # one prefill chunk of 8 tokens: no token sampled yet
        assert gen.stop(future) is True
        reply = drive(gen, future)
        assert reply.finish_reason == "cancelled"
        assert reply.token_ids == hf_greedy(oracle, list(range(3, 60)), 1)
        gen.engine.check_integrity()
        assert gen.generate("p", [7], GREEDY).num_recomputed == 0


def test_stop_during_the_prompt_stops_every_candidate(model):
    """n > 1: the candidates are forked at the first token, after the stop: they stop too, one token each."""
    sampling = SamplingParams(max_new_tokens=40, temperature=1.0, seed=5, n=3, ignore_eos=True)
    with StatefulGenerator(model, cache_config=CacheConfig(block_size=4, num_device_blocks=96),
                           scheduler_config=SchedulerConfig(8)) as gen:  # fmt: skip
        future = gen.submit("n", list(range(3, 40)), sampling)
        gen.call(gen.engine.step)
        assert gen.stop(future) is True
        reply = drive(gen, future)
        replies = [reply, *reply.candidates]
        assert len(replies) == 3 and all(r.finish_reason == "cancelled" and len(r.token_ids) == 1 for r in replies)
        gen.engine.check_integrity()


def test_stop_of_a_finished_turn_or_unknown_target(model):
    with StatefulGenerator(model, cache_config=CacheConfig(block_size=4, num_device_blocks=64)) as gen:
        gen.generate("x", [1, 2, 3], GREEDY)
        assert gen.stop("x") is False and gen.stop("nobody") is False
