"""int8 KV end to end (`CacheConfig(kv_dtype="int8")`): every path — decode, prefill over history, swaps to a host
tier and back, recompute of dropped chunks, a disk round trip with a restart, a MemPool transfer — gives the greedy
tokens of HF generate over the full history with every K/V row quantized and dequantized the same way
(`tests.tiny.int8_oracle`: the reference over the same numbers). Files of another kv_dtype are recomputed, never
misread."""

import copy

import pytest
from safetensors import safe_open

from pensieve import CacheConfig, SamplingParams, StatefulGenerator
from pensieve.cluster.mempool import MemPool
from tests.tiny import VOCAB, check_every_step, hf_greedy, int8_oracle, oracle_copy, oracle_turn

BS = 4
GREEDY = SamplingParams(max_new_tokens=5, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def oracle8(model):
    return int8_oracle(model)


def _open(model, device=64, host=0, disk_dir=None, kv_dtype="int8") -> StatefulGenerator:
    config = CacheConfig(block_size=BS, num_device_blocks=device, num_host_blocks=host, disk_dir=disk_dir,
                         kv_dtype=kv_dtype, write_behind_s=None)  # fmt: skip
    return check_every_step(StatefulGenerator(copy.deepcopy(model), None, config))


def _msg(seed: int, n: int = 6) -> list[int]:
    return [3 + (seed * 41 + i * 19) % (VOCAB - 3) for i in range(n)]


def _turn(gen, oracle, histories, conv_id, msg):
    return oracle_turn(gen, oracle, histories, conv_id, msg, GREEDY)


def test_int8_blocks_hold_values_and_scales_in_their_bytes(model):
    with _open(model) as gen:
        k_cache, _ = gen.engine.kv.storage.device_caches[0]
        assert k_cache.dtype.is_signed and k_cache.element_size() == 1 and k_cache.shape[-1] == 16 + 8
        stats = gen.stats()
        assert stats["kv_dtype"] == "int8"
        assert stats["kv_bytes_per_block"] == 2 * 2 * BS * 2 * (16 + 8)  # K and V, layers, slots, heads, row


def test_decode_prefill_swaps_and_recompute_match_the_int8_oracle(model, oracle8):
    """A device pool of 10 blocks for three conversations, and a small host tier: every turn swaps or drops the
    others' chunks and brings its own back (swap-in, or recompute of the dropped leading ones)."""
    histories: dict[str, list[int]] = {}
    with _open(model, device=10, host=6) as gen:
        for rnd in range(3):
            for i, conv_id in enumerate("abc"):
                _turn(gen, oracle8, histories, conv_id, _msg(10 * rnd + i, 5 + i))
        counters = gen.stats()
        assert counters["swap_out_chunks"] > 0 and counters["swap_in_chunks"] > 0
        assert counters["recompute_chunks"] > 0 and counters["tokens_recomputed"] > 0


def test_the_int8_reply_differs_from_exact_kv_only_by_the_quantization(model, oracle8):
    """Sanity of the oracle: it is not the float64 model (else the test above would prove nothing about int8)."""
    exact = oracle_copy(model)
    prompts = [_msg(s, 12) for s in range(40)]
    differ = sum(hf_greedy(oracle8, p, 8) != hf_greedy(exact, p, 8) for p in prompts)
    assert differ > 0, "int8 KV never changed a greedy token on 40 prompts: the oracle does not quantize"


def test_a_disk_round_trip_and_a_restart_reuse_int8_files(model, oracle8, tmp_path):
    histories: dict[str, list[int]] = {}
    with _open(model, device=16, disk_dir=tmp_path) as gen:
        for i, conv_id in enumerate("ab"):
            _turn(gen, oracle8, histories, conv_id, _msg(i, 9))
            _turn(gen, oracle8, histories, conv_id, _msg(i + 5))
    files = list((tmp_path / "kv").glob("*.safetensors"))
    assert files
    with safe_open(str(files[0]), "pt") as f:
        assert f.get_tensor("k").dtype.is_signed and f.get_tensor("k").element_size() == 1
    with _open(model, device=16, disk_dir=tmp_path) as gen:
        for i, conv_id in enumerate("ab"):
            reply = _turn(gen, oracle8, histories, conv_id, _msg(i + 20))
            assert reply.num_reused_disk > 0 and reply.num_recomputed == 0


@pytest.mark.parametrize("first, then", [(None, "int8"), ("int8", None)])
def test_files_of_another_kv_dtype_are_recomputed_never_misread(model, oracle8, tmp_path, first, then):
    oracles = {None: oracle_copy(model), "int8": oracle8}
    histories: dict[str, list[int]] = {}
    with _open(model, device=16, disk_dir=tmp_path, kv_dtype=first) as gen:
        _turn(gen, oracles[first], histories, "a", _msg(3, 10))
    with _open(model, device=16, disk_dir=tmp_path, kv_dtype=then) as gen:
        with pytest.warns(Warning):
            reply = gen.generate("a", _msg(4), GREEDY)
        history = histories["a"] + _msg(4)
        assert reply.token_ids == hf_greedy(oracles[then], history, GREEDY.max_new_tokens)
        assert reply.num_reused_disk == 0 and reply.num_recomputed == len(histories["a"]) - 1
        histories["a"] = history + reply.token_ids
    with _open(model, device=16, disk_dir=tmp_path, kv_dtype=then) as gen:  # the rejected files were replaced
        reply = _turn(gen, oracles[then], histories, "a", _msg(5))
        assert reply.num_reused_disk == len(histories["a"]) - len(_msg(5)) - GREEDY.max_new_tokens - 1


def test_a_mempool_transfer_moves_int8_kv_and_refuses_another_kv_dtype(model, oracle8):
    a, b = MemPool(_open(model)), MemPool(_open(model))
    histories: dict[str, list[int]] = {}
    for seed in (1, 2):
        _turn(a.generator, oracle8, histories, "c", _msg(seed))
    history = histories["c"]
    computed = len(history) - 1
    a.transfer_with_insert(b, conv_id="c")
    b.adopt("c", history)
    reply = _turn(b.generator, oracle8, histories, "c", _msg(3))
    assert reply.num_reused_device == computed and reply.num_recomputed == 0
    exact = MemPool(_open(model, kv_dtype=None))
    with pytest.raises(ValueError, match="int8"):
        a.transfer_with_insert(exact, tokens=history[: BS * 2])
    for pool in (a, b, exact):
        pool.generator.check_integrity()
        pool.generator.close()
