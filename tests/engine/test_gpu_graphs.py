"""CUDA graphs of decode steps (GPU only; skipped without CUDA): replayed tokens equal eager tokens and HF's, across
bucket boundaries and with swap-ins mixed in; padded rows never write outside the padding block."""

import random

import pytest
import torch

from pensieve import CacheConfig, EngineConfig, SamplingParams, StatefulGenerator
from tests.tiny import VOCAB, hf_greedy, oracle_copy, tiny_model

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
GREEDY = SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True)


def _msgs(rng, names):
    return {n: [rng.randrange(3, VOCAB) for _ in range(rng.randint(2, 8))] for n in names}


def _run(graphs: bool, schedule, config):
    model = tiny_model("llama").float().cuda()
    rng = random.Random(0)
    out = []
    with StatefulGenerator(model, None, config, engine_config=EngineConfig(cuda_graphs=graphs)) as gen:
        for names in schedule:
            batch = _msgs(rng, names)
            out.append((batch, {c: r.token_ids for c, r in gen.generate_batch(batch, GREEDY).items()}))
            gen.engine.kv.check_integrity()
        stats = gen.stats()
    return out, stats, model


@cuda
def test_replayed_decode_equals_eager_and_hf_across_buckets():
    schedule = [["a"], ["a", "b", "c"], [f"c{i}" for i in range(9)], ["a", "b"]]  # buckets 1, 4, 16, 2
    config = CacheConfig(block_size=4, num_device_blocks=128)
    replayed, stats, model = _run(True, schedule, config)
    eager, eager_stats, _ = _run(False, schedule, config)
    assert stats["cuda_graphs"] >= 3 and eager_stats["cuda_graphs"] == 0
    assert [r for _, r in replayed] == [r for _, r in eager]
    oracle = oracle_copy(model)
    histories: dict = {}
    for batch, replies in replayed:
        for conv_id, msg in batch.items():
            history = histories.get(conv_id, []) + msg
            assert replies[conv_id] == hf_greedy(oracle, history, 6), conv_id
            histories[conv_id] = history + replies[conv_id]


@cuda
def test_replay_with_swap_ins_and_recompute_stays_exact():
    schedule = [["a", "b", "c", "d"], ["a"], ["b", "c"], ["d", "a", "b"], ["c", "d"]]
    config = CacheConfig(block_size=4, num_device_blocks=14, num_host_blocks=6)
    replayed, stats, _ = _run(True, schedule, config)
    eager, _, _ = _run(False, schedule, config)
    assert [r for _, r in replayed] == [r for _, r in eager]
    assert stats["swap_in_chunks"] > 0 and stats["cuda_graphs"] > 0


@cuda
def test_padded_rows_write_only_the_padding_block():
    model = tiny_model("llama").float().cuda()
    with StatefulGenerator(model, None, CacheConfig(block_size=4, num_device_blocks=32)) as gen:
        gen.generate_batch({"a": [5, 6, 7], "b": [8, 9]}, SamplingParams(max_new_tokens=1, ignore_eos=True))
        storage = gen.engine.runner.storage
        block = storage.padding_block
        owned = {c.block for conv in gen.engine.kv.conversations.values() for c in conv.chunks}
        for t in storage.device_kv:  # poison every block nobody owns; then 3 rows pad to bucket 4
            for b in range(t.shape[1]):
                if b not in owned:
                    t[:, b].fill_(float("nan"))
        gen.generate_batch({"a": [10], "b": [11], "c": [12]}, SamplingParams(max_new_tokens=3, ignore_eos=True))
        owned = {c.block for conv in gen.engine.kv.conversations.values() for c in conv.chunks}
        for t in storage.device_kv:
            for b in range(t.shape[1]):
                if b not in owned and b != block:
                    assert t[:, b].isnan().all(), f"block {b} was written by a padded row"
        assert gen.stats()["cuda_graphs"] > 0


@cuda
def test_serve_thread_abort_with_graphs_and_host_tier():
    """The engine on a thread of its own (`serve`) on a GPU with CUDA graphs and a pinned host tier: concurrent
    turns equal HF's; a turn aborted mid-decode leaves its conversation exactly as before, the next turn is exact."""
    import threading

    from pensieve import TurnAborted

    model = tiny_model("llama").float().cuda()
    oracle = oracle_copy(model)
    config = CacheConfig(block_size=4, num_device_blocks=64, num_host_blocks=32)
    rng = random.Random(1)
    with StatefulGenerator(model, None, config) as gen:
        stop = threading.Event()
        engine = threading.Thread(target=gen.serve, args=(stop,))
        engine.start()
        try:
            histories: dict = {}
            for _ in range(2):
                batch = _msgs(rng, [f"s{i}" for i in range(6)])
                futures = {c: gen.submit(c, m, GREEDY) for c, m in batch.items()}
                for conv_id, future in futures.items():
                    history = histories.get(conv_id, []) + batch[conv_id]
                    tokens = future.result(timeout=120).token_ids
                    assert tokens == hf_greedy(oracle, history, 6), conv_id
                    histories[conv_id] = history + tokens
            conv = gen.engine.kv.conversations["s0"]
            before = (list(conv.tokens), conv.num_computed, list(conv.chunks))
            started = threading.Event()
            endless = SamplingParams(max_new_tokens=200, temperature=0, ignore_eos=True)
            long = gen.submit("s0", [5, 6, 7], endless, on_token=lambda _: started.set())
            assert started.wait(timeout=120)
            assert gen.abort(long) is True
            with pytest.raises(TurnAborted):
                long.result(timeout=120)
            gen.check_integrity()
            conv = gen.engine.kv.conversations["s0"]
            assert (conv.tokens, conv.num_computed, conv.chunks) == before
            tokens = gen.submit("s0", [9, 10], GREEDY).result(timeout=120).token_ids
            assert tokens == hf_greedy(oracle, histories["s0"] + [9, 10], 6)
            assert gen.stats()["cuda_graphs"] > 0
        finally:
            stop.set()
            engine.join()
