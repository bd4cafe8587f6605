"""Every supported family through the tiered cache: evicted to host and disk, restarted, recomputed — exact."""

import pytest

from pensieve import CacheConfig, SamplingParams, StatefulGenerator
from tests.tiny import FAMILIES, VOCAB, hf_greedy, oracle_copy, tiny_model

GREEDY = SamplingParams(max_new_tokens=4, temperature=0, ignore_eos=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_tiers_and_restart_are_exact_for_every_family(family, tmp_path):
    model = tiny_model(family, seed=2)
    oracle = oracle_copy(model)
    # 10 device blocks of 4 tokens, 3 host blocks: three conversations of ~30 tokens cannot all stay
    config = CacheConfig(block_size=4, num_device_blocks=10, num_host_blocks=3, disk_dir=tmp_path)
    histories: dict[str, list[int]] = {}

    def turn(gen, conv_id, seed):
        msg = [3 + (seed * 13 + i * 7) % (VOCAB - 3) for i in range(5)]
        reply = gen.generate(conv_id, msg, GREEDY)
        history = histories.get(conv_id, []) + msg
        assert reply.token_ids == hf_greedy(oracle, history, 4), (family, conv_id, seed)
        histories[conv_id] = history + reply.token_ids
        gen.engine.kv.check_integrity()
        return reply

    with StatefulGenerator(model, None, config) as gen:
        for seed in range(3):
            for conv_id in "xyz":
                turn(gen, conv_id, seed * 3 + ord(conv_id))
        stats = gen.stats()
    assert stats["swap_in_chunks"] > 0 and stats["disk_read_chunks"] > 0
    with StatefulGenerator(model, None, config) as gen:
        assert turn(gen, "x", 99).num_reused_disk > 0
