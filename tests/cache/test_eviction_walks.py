"""How often the cache walks its chunks (`TierMover.candidates`, O(every chunk in memory)) in a full cache.

A walk per evicted block made a decode step of 64 conversations with 2k-token histories spend ~300 ms in the
manager once the cache was full of cached chunks (docs/performance-log.md). These tests count walks — no timing — and
check the replies against the oracle, so the cheaper bookkeeping cannot change what is computed.
"""

import random

import pytest

from pensieve import CacheConfig, SamplingParams, StatefulGenerator
from pensieve.cache import mover as mover_module
from tests.tiny import VOCAB, hf_greedy, oracle_copy, tiny_model

BS = 4


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", seed=5)


def _count_walks(kv, monkeypatch) -> list:
    walks = []
    real = mover_module.TierMover.candidates

    def counted(self, tier, protect, also=None):
        out = real(self, tier, protect, also)
        walks.append((tier, len(out)))
        return out

    monkeypatch.setattr(mover_module.TierMover, "candidates", counted)
    return walks


def _tokens(rng, n):
    return [rng.randrange(3, VOCAB) for _ in range(n)]


def test_a_full_cache_walks_once_per_slice_of_evictions(model, monkeypatch):
    num_blocks = 512  # an eviction that walks frees at least 512 // 64 = 8 blocks
    rng = random.Random(0)
    oracle = oracle_copy(model)
    with StatefulGenerator(model, None, CacheConfig(block_size=BS, num_device_blocks=num_blocks)) as gen:
        kv = gen.engine.kv
        fill = {f"old{i}": _tokens(rng, 120) for i in range(16)}  # 16 x 31 blocks: the cache is nearly full...
        gen.generate_batch(fill, SamplingParams(max_new_tokens=4, ignore_eos=True))
        for conv_id in fill:
            gen.end(conv_id)  # ...of chunks only the prompt tree holds (cached, evictable)
        assert kv.device.num_free < 32
        walks = _count_walks(kv, monkeypatch)
        dropped = kv.counters["dropped_chunks"]
        params = SamplingParams(max_new_tokens=60, temperature=0, ignore_eos=True)
        new = {f"new{i}": _tokens(rng, 9) for i in range(8)}
        replies = gen.generate_batch(new, params)  # 8 x 18 blocks, most of them evicting a cached one
        evicted = kv.counters["dropped_chunks"] - dropped
        assert evicted > 100
        # Each eviction walk frees a slice; a reservation may count movable chunks (a second walk) before it.
        assert len(walks) <= 2 * (evicted // (num_blocks // mover_module.EVICTION_SLICE) + 1), (len(walks), evicted)
        kv.check_integrity()
    for conv_id, msg in new.items():
        assert replies[conv_id].token_ids == hf_greedy(oracle, msg, params.max_new_tokens), conv_id


def test_swap_out_ahead_does_not_walk_every_step_when_nothing_can_move(model, monkeypatch):
    rng = random.Random(1)
    config = CacheConfig(block_size=BS, num_device_blocks=128, num_host_blocks=64)  # watermark: 32 free blocks
    with StatefulGenerator(model, None, config) as gen:
        kv = gen.engine.kv
        walks = _count_walks(kv, monkeypatch)
        params = SamplingParams(max_new_tokens=20, temperature=0, ignore_eos=True)
        msgs = {f"c{i}": _tokens(rng, 130) for i in range(3)}  # 3 x 33-38 blocks, each held by a running turn...
        free, step = [], gen.engine.step

        def recorded_step():
            step()
            free.append(kv.device.num_free)

        gen.engine.step = recorded_step
        gen.generate_batch(msgs, params)
        assert len(free) >= 20 and max(free[:-1]) < kv.watermark_blocks  # ...so under the watermark at every step
        futile = [w for w in walks if w[1] == 0]
        assert len(futile) <= 2, f"{len(futile)} walks found nothing to move over {len(free)} steps"
        kv.check_integrity()
