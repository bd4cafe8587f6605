"""A cluster of GPU instances (skipped without CUDA): P/D with send-back through the collective transport (NCCL
when each instance has a GPU of its own and Ray has NCCL — it needs cupy — else gloo staged through the host) and
through the object store; every reply equals HF generate on the same fp32 weights, and KV moved both ways."""

import functools

import pytest
import torch

from pensieve import CacheConfig, SamplingParams
from tests.tiny import hf_greedy, oracle_copy, tiny_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

GREEDY = SamplingParams(max_new_tokens=4, temperature=0, ignore_eos=True)


@pytest.mark.parametrize("transport", ["collective", "object_store"])
def test_pd_on_gpus_is_exact(ray_runtime, transport):
    from pensieve.cluster import Cluster

    # the factory must live in a module the Ray workers can import (tests.tiny), not in this test file
    factory = functools.partial(tiny_model, "llama", seed=8, dtype=torch.float32, device="cuda")
    oracle = oracle_copy(factory())
    config = CacheConfig(block_size=4, num_device_blocks=128)
    with Cluster(factory, roles=["prefill", "decode"], cache_config=config, num_threads=1, transport=transport) as c:
        if transport == "collective" and torch.cuda.device_count() < 2:
            assert c.backend == "gloo"  # two instances on one GPU cannot be two NCCL ranks (NCCL: invalid usage)
        histories: dict = {}
        for turn in range(3):
            batch = {f"g{i}": [3 + (turn * 17 + i * 7 + j * 5) % 110 for j in range(6 + i)] for i in range(4)}
            for conv, reply in c.generate_batch(batch, GREEDY).items():
                histories[conv] = histories.get(conv, []) + batch[conv]
                assert reply.token_ids == hf_greedy(oracle, histories[conv], GREEDY.max_new_tokens), conv
                histories[conv] += reply.token_ids
                if turn:
                    assert reply.num_prefilled == reply.num_new_tokens + 1 and reply.num_recomputed == 0
        stats = c.stats()
        for name in ("prefill-0", "decode-1"):
            assert stats["per_instance"][name]["received_chunks"] > 0
            assert stats["per_instance"][name]["transfers_failed"] == 0
        c.check_integrity()
