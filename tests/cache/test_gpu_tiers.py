"""GPU-only paths of the tiered cache: pinned host tier, side-stream copies, per-layer swap-in events.

Skipped without CUDA. The same logic runs on CPU (plain copies) in every other cache test.
"""

import pytest
import torch

from pensieve import CacheConfig, SamplingParams, StatefulGenerator
from pensieve.cache.tiers import KVStorage
from pensieve.cache.types import Tier
from tests.tiny import VOCAB, hf_greedy, oracle_copy, tiny_model

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICE = torch.device("cuda") if torch.cuda.is_available() else None


def _storage(layers=3, device_blocks=8, host_blocks=8) -> KVStorage:
    return KVStorage(layers, (4, 2, 16), torch.float32, DEVICE, device_blocks, host_blocks)


@cuda
def test_host_tier_is_pinned_and_copies_use_a_side_stream():
    s = _storage()
    assert all(t.is_pinned() for layer in s.host_caches for t in layer)
    assert s.side is not None and s.side != torch.cuda.current_stream()


@cuda
def test_swap_out_then_layer_gated_swap_in_round_trips_exactly():
    s = _storage()
    for layer, (k, v) in enumerate(s.device_caches):
        k.copy_(torch.randn_like(k) + layer)
        v.copy_(torch.randn_like(v) - layer)
    expected = [(k[[1, 5, 6]].cpu(), v[[1, 5, 6]].cpu()) for k, v in s.device_caches]
    s.swap_out([1, 5, 6], [0, 3, 4])
    for k, v in s.device_caches:  # the main stream overwrites the blocks; the swap-out must have read them first
        k.fill_(float("nan"))
        v.fill_(float("nan"))
    s.queue_swap_in([0, 3, 4], [7, 2, 3])
    gate = s.begin_forward()
    for layer, (k, v) in enumerate(s.device_caches):
        gate.wait(layer)  # what the attention of each layer does before reading its cache
        got_k, got_v = k[[7, 2, 3]].cpu(), v[[7, 2, 3]].cpu()  # enqueued on the main stream after the wait
        assert torch.equal(got_k, expected[layer][0]) and torch.equal(got_v, expected[layer][1]), layer
    gate.finish()


@cuda
def test_disk_loads_go_through_pinned_staging_per_layer():
    s = _storage()
    chunks = [(torch.randn(s.chunk_shape), torch.randn(s.chunk_shape)) for _ in range(2)]
    s.queue_load(chunks, [4, 0])
    gate = s.begin_forward()
    gate.finish()
    torch.cuda.current_stream().synchronize()
    for layer, (k, v) in enumerate(s.device_caches):
        assert torch.equal(k[4].cpu(), chunks[0][0][layer]) and torch.equal(v[0].cpu(), chunks[1][1][layer])


@cuda
def test_read_chunk_waits_for_a_swap_out_in_flight():
    s = _storage()
    s.device_caches[0][0][2].fill_(3.0)
    s.swap_out([2], [5])
    k, _ = s.read_chunk(Tier.HOST, 5)
    assert torch.all(k[0] == 3.0)


@cuda
def test_tiered_generation_on_gpu_is_token_identical(tmp_path):
    model = tiny_model("llama").float().to(DEVICE)
    oracle = oracle_copy(model)
    sp = SamplingParams(max_new_tokens=5, temperature=0, ignore_eos=True)
    config = CacheConfig(block_size=4, num_device_blocks=12, num_host_blocks=6, disk_dir=tmp_path)
    histories: dict[str, list[int]] = {}
    with StatefulGenerator(model, None, config) as gen:
        for turn in range(3):
            for conv_id in "abcd":
                msg = [(7 * turn + 3 * ord(conv_id) + i) % (VOCAB - 3) + 3 for i in range(6)]
                reply = gen.generate(conv_id, msg, sp)
                history = histories.get(conv_id, []) + msg
                assert reply.token_ids == hf_greedy(oracle, history, 5), (conv_id, turn)
                histories[conv_id] = history + reply.token_ids
                gen.engine.kv.check_integrity()
        stats = gen.stats()
    assert stats["swap_in_chunks"] > 0 and stats["swap_out_chunks"] > 0
