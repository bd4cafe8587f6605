"""A device pool too small for every conversation: eviction and recompute every turn, still token-identical."""

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from pensieve.config import CacheConfig, SamplingParams, SchedulerConfig
from pensieve.engine.engine import Engine
from pensieve.models import register
from tests.tiny import VOCAB, hf_greedy, oracle_copy, tiny_model

GREEDY = SamplingParams(max_new_tokens=5, temperature=0, ignore_eos=True)


def _engine(model, num_blocks, block_size=4, budget=64, **cache):
    register()
    model.set_attn_implementation("pensieve")
    config = CacheConfig(block_size=block_size, num_device_blocks=num_blocks, **cache)
    return Engine(model, None, config, SchedulerConfig(budget))


def _run(engine, turns):
    """Step until every turn finishes, checking integrity after every step."""
    steps = 0
    while engine.has_work():
        engine.step()
        engine.check_integrity()
        steps += 1
        assert steps < 10_000
    return [t.future.result() for t in turns]


def test_pool_too_small_for_all_conversations_evicts_and_stays_exact():
    model = tiny_model("llama")
    oracle = oracle_copy(model)
    engine = _engine(model, num_blocks=12)  # 48 tokens: one conversation's history + reply at most
    for (
        k_cache,
        v_cache,
    ) in engine.runner.storage.device_caches:  # the pool is uninitialized memory: garbage must never leak
        k_cache.fill_(float("nan"))
        v_cache.fill_(float("nan"))
    rng = random.Random(0)
    histories = {c: [] for c in "abc"}
    recomputed = 0
    for turn in range(4):
        for conv_id in "abc":
            msg = [rng.randrange(3, VOCAB) for _ in range(rng.randint(2, 6))]
            replies = _run(engine, [engine.admit(engine.admission.prepare(conv_id, msg, GREEDY))])
            assert replies[0].token_ids == hf_greedy(oracle, histories[conv_id] + msg, 5), (conv_id, turn)
            recomputed += replies[0].num_recomputed
            histories[conv_id] += msg + replies[0].token_ids
    assert engine.kv.counters["dropped_chunks"] > 0 and recomputed > 0


def test_concurrent_turns_that_do_not_fit_together_preempt_and_stay_exact():
    model = tiny_model("mistral")
    oracle = oracle_copy(model)
    # 32 tokens; each turn needs up to ~20. No decode reserve: it exists to avoid exactly these preemptions.
    engine = _engine(model, num_blocks=8, budget=16, decode_reserve=0.0)
    msgs = {c: [random.Random(c).randrange(3, VOCAB) for _ in range(14)] for c in "wxyz"}
    turns = [engine.admit(engine.admission.prepare(c, m, GREEDY)) for c, m in msgs.items()]
    replies = _run(engine, turns)
    for (c, m), reply in zip(msgs.items(), replies, strict=True):
        assert reply.token_ids == hf_greedy(oracle, m, 5), c
    assert engine.scheduler.num_preemptions > 0


@settings(deadline=None)
@given(st.data())
def test_random_schedules_under_pressure(data):
    model = tiny_model("qwen3", seed=3)
    oracle = oracle_copy(model)
    block_size = data.draw(st.sampled_from((2, 4)))
    # each conversation reaches at most 3 * (6 + 5) = 33 tokens: it fits alone, four of them do not
    capacity = data.draw(st.integers(36, 64))
    engine = _engine(
        model, num_blocks=-(-capacity // block_size), block_size=block_size, budget=data.draw(st.integers(3, 24))
    )
    histories: dict[str, list[int]] = {}
    for _ in range(data.draw(st.integers(1, 3))):
        batch = data.draw(st.lists(st.sampled_from("pqrs"), min_size=1, max_size=4, unique=True))
        msgs = {c: data.draw(st.lists(st.integers(3, VOCAB - 1), min_size=1, max_size=6)) for c in batch}
        turns = [engine.admit(engine.admission.prepare(c, m, GREEDY)) for c, m in msgs.items()]
        for (c, m), reply in zip(msgs.items(), _run(engine, turns), strict=True):
            assert reply.token_ids == hf_greedy(oracle, histories.get(c, []) + m, 5)
            histories[c] = histories.get(c, []) + m + reply.token_ids
