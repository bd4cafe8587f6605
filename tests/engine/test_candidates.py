"""n > 1: the candidates of one turn share its prompt's KV and each equals a seeded single run.

The reference for candidate i is the same turn run alone with seed `seed + i` on its own conversation, and for greedy
candidates HF generate over the full history (float64 tiny model).
"""

import pytest

from pensieve import CacheConfig, SamplingParams, StatefulGenerator, TurnAborted
from tests.tiny import drive, hf_greedy, tiny_model

CACHE = CacheConfig(block_size=4, num_device_blocks=128)


def sampled(seed, n=1, **kw) -> SamplingParams:
    return SamplingParams(max_new_tokens=8, temperature=1.3, seed=seed, ignore_eos=True, n=n, **kw)


def test_candidates_equal_seeded_single_runs_and_continue_as_conversations(model, oracle):
    prompt = [5, 9, 2, 7, 7, 1, 3, 8, 4, 6]  # 10 tokens: 2 full chunks shared, 2 positions each fork computes
    with StatefulGenerator(model, cache_config=CACHE) as gen:
        reply = gen.generate("c", prompt, sampled(11, n=3, logprobs=2))
        gen.check_integrity()
        singles = [gen.generate(f"alone-{i}", prompt, sampled(11 + i, logprobs=2)) for i in range(3)]
        replies = [reply, *reply.candidates]
        assert [r.conv_id for r in replies] == ["c", "c/1", "c/2"]
        assert [r.token_ids for r in replies] == [s.token_ids for s in singles]
        assert [[lp.token_id for lp in r.logprobs] for r in replies] == [r.token_ids for r in replies]
        assert len({tuple(r.token_ids) for r in replies}) > 1  # seeds differ, so do the candidates here
        # the prompt was prefilled once: the forks computed only the partial last chunk
        assert reply.num_prefilled == len(prompt)
        assert [r.num_prefilled for r in reply.candidates] == [len(prompt) % 4] * 2
        # each candidate is a conversation that continues with its own reply (greedy: HF over its history)
        for r in replies:
            history = prompt + r.token_ids
            more = gen.generate(r.conv_id, [2, 3], SamplingParams(max_new_tokens=5, ignore_eos=True))
            assert more.token_ids == hf_greedy(oracle, history + [2, 3], 5)
        gen.check_integrity()
        assert set(gen.conversations()) >= {"c", "c/1", "c/2"}


def test_greedy_candidates_equal_hf_and_completions_keep_nothing(model, oracle):
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    greedy = SamplingParams(max_new_tokens=6, ignore_eos=True, n=2)
    with StatefulGenerator(model, cache_config=CACHE) as gen:
        reply = gen.complete(prompt, greedy)
        assert reply.conv_id is None and [r.conv_id for r in reply.candidates] == [None]
        assert reply.token_ids == reply.candidates[0].token_ids == hf_greedy(oracle, prompt, 6)
        one = gen.generate("one", prompt, SamplingParams(max_new_tokens=6, ignore_eos=True))
        assert one.token_ids == hf_greedy(oracle, prompt, 6) and one.candidates == ()
        assert gen.conversations() == ["one"]
        gen.check_integrity()


def test_candidates_stream_with_their_index_and_batch_with_other_turns(model):
    prompt = [7, 2, 9, 4, 4, 1]
    with StatefulGenerator(model, cache_config=CACHE) as gen:
        deltas = []
        future = gen.submit("s", prompt, sampled(3, n=3), on_token=deltas.append)
        other = gen.submit("other", [1, 2, 3], sampled(1))
        reply = drive(gen, future)
        assert drive(gen, other).token_ids
        for i, r in enumerate([reply, *reply.candidates]):
            assert [d.token_id for d in deltas if d.index == i] == r.token_ids
        stream = gen.stream("t", prompt, sampled(3, n=3))
        assert list(stream) == reply.token_ids  # a stream yields candidate 0's pieces
        assert [r.token_ids for r in stream.reply.candidates] == [r.token_ids for r in reply.candidates]
        gen.check_integrity()


def test_abort_removes_every_candidate_and_restores_the_conversation(model):
    with StatefulGenerator(model, cache_config=CACHE) as gen:
        gen.generate("a", [1, 2, 3, 4, 5], SamplingParams(max_new_tokens=2, ignore_eos=True))
        before = gen.call(lambda: list(gen.engine.kv.conversations["a"].tokens))
        future = gen.submit("a", [6, 7, 8], SamplingParams(max_new_tokens=30, ignore_eos=True, n=3))

        def step_until_forked():
            while "a/2" not in gen.engine.kv.conversations:
                gen.engine.step()
            gen.engine.step()

        gen.call(step_until_forked)
        assert gen.abort(future)
        with pytest.raises(TurnAborted):
            future.result()
        assert gen.conversations() == ["a"]
        assert gen.call(lambda: gen.engine.kv.conversations["a"].tokens) == before
        gen.check_integrity()
        # the ids are free again, and a new n = 3 turn runs
        reply = gen.generate("a", [6, 7, 8], SamplingParams(max_new_tokens=3, ignore_eos=True, n=3))
        assert [r.conv_id for r in reply.candidates] == ["a/1", "a/2"]


def test_taken_candidate_ids_and_bad_n_are_refused_before_anything_changes(model):
    with StatefulGenerator(model, cache_config=CACHE) as gen:
        gen.generate("x/2", [1, 2], SamplingParams(max_new_tokens=1))
        with pytest.raises(ValueError, match="'x/2', which exists"):
            gen.generate("x", [4, 5], SamplingParams(max_new_tokens=2, n=3))
        assert gen.conversations() == ["x/2"]
        for bad in (0, 65, 1.5, True):
            with pytest.raises(ValueError, match="n must be an int in"):
                SamplingParams(n=bad)
        small = StatefulGenerator(tiny_model("llama"), cache_config=CacheConfig(block_size=4, num_device_blocks=8))
        with small, pytest.raises(ValueError, match="and 3 more candidates"):
            small.generate("y", [1, 2, 3], SamplingParams(max_new_tokens=8, n=4))


def test_abort_after_candidate_0_finished_and_forks_continue_with_their_own_candidates(model, tmp_path):
    """Candidate 0 finishes a step before its forks (they sample their first token one step later): an abort then
    still reaches the caller, and takes the forks' records off the disk too. A fork continues with n > 1 itself."""
    cache = CacheConfig(block_size=4, num_device_blocks=128, disk_dir=tmp_path)
    with StatefulGenerator(model, cache_config=cache) as gen:
        future = gen.submit("a", [1, 2, 3, 4, 5], SamplingParams(max_new_tokens=4, ignore_eos=True, n=3))

        def until_first_finished():
            while not gen.engine.scheduler.active or gen.engine.scheduler.active[0].conv.conv_id == "a":
                gen.engine.step()

        gen.call(until_first_finished)
        assert not future.done()
        assert gen.abort(future)
        with pytest.raises(TurnAborted):
            future.result()
        assert gen.conversations() == []
        gen.check_integrity()
        reply = gen.generate("a", [1, 2, 3], SamplingParams(max_new_tokens=3, ignore_eos=True, n=2))
        again = gen.generate("a/1", [4], SamplingParams(max_new_tokens=3, ignore_eos=True, n=2))
        assert [r.conv_id for r in again.candidates] == ["a/1/1"] and reply.candidates[0].conv_id == "a/1"
        with pytest.raises(ValueError, match="which this call also runs"):
            gen.generate_batch({"b": [1], "b/1": [2]}, SamplingParams(max_new_tokens=2, n=2))
        assert "b" not in gen.conversations()
        gen.check_integrity()
