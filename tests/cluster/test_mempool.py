"""MemPool verbs between two in-process generators (no Ray): KV moved by transfer is exact (the receiver's replies
equal HF generate over the full history), block accounting is exact on both sides (check_integrity after every
verb), and a receiver without room fails cleanly with nothing taken."""

import copy

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pensieve import CacheConfig, SamplingParams, StatefulGenerator
from pensieve.cache.types import Tier
from pensieve.cluster.mempool import KVPayload, MemPool, MemPoolFull
from tests.tiny import VOCAB, hf_greedy, tiny_model

BS = 4
GREEDY = SamplingParams(max_new_tokens=4, temperature=0, ignore_eos=True)


def _pool(model, device=64, host=0) -> MemPool:
    config = CacheConfig(block_size=BS, num_device_blocks=device, num_host_blocks=host)
    return MemPool(StatefulGenerator(copy.deepcopy(model), None, config))


def _check(*pools: MemPool) -> None:
    for pool in pools:
        pool.generator.check_integrity()


def _msg(seed: int, n: int = 6) -> list[int]:
    return [3 + (seed * 37 + i * 13) % (VOCAB - 3) for i in range(n)]


def _turn(pool: MemPool, oracle, history: list[int], conv_id: str, msg: list[int]):
    reply = pool.generator.generate(conv_id, msg, GREEDY)
    history += msg
    assert reply.token_ids == hf_greedy(oracle, history, GREEDY.max_new_tokens)
    history += reply.token_ids
    return reply


def test_a_conversation_moved_with_its_kv_continues_exactly(model, oracle):
    a, b = _pool(model), _pool(model)
    history: list[int] = []
    for seed in (1, 2):
        _turn(a, oracle, history, "c", _msg(seed))
    computed = len(history) - 1  # every position but the last reply token's
    free_before = b._kv.device.num_free
    inserted = a.transfer_with_insert(b, conv_id="c")
    _check(a, b)
    assert inserted == -(-computed // BS)  # every chunk, the partial last one as a tail
    assert b._kv.device.num_free == free_before - inserted
    assert b.match(history) == b.match(history[:computed])
    assert b.match(history).num_tokens == computed and set(b.match(history).tiers) == {"device"}
    b.adopt("c", history)
    reply = _turn(b, oracle, history, "c", _msg(3))
    _check(a, b)
    assert reply.num_reused_device == computed and reply.num_recomputed == 0
    assert reply.num_prefilled == len(_msg(3)) + 1  # the message and the last reply token: nothing else
    assert b._kv.counters["received_chunks"] == inserted


def test_tree_prefix_transfer_is_used_by_another_conversation(model, oracle):
    a, b = _pool(model), _pool(model)
    system = _msg(9, 4 * BS + 2)
    one = SamplingParams(max_new_tokens=1, temperature=0, ignore_eos=True)
    a.generator.complete(system, one)  # leaves the prompt's chunks in a's tree: 4 full ones and a tail of 2 positions
    assert a.match(system).num_tokens == len(system)
    n = a.transfer_with_insert(b, system)
    _check(a, b)
    assert n == 5 and b.match(system).num_tokens == len(system)
    assert a.transfer_with_insert(b, system) == 0  # all cached there already: nothing copied
    reply = _turn(b, oracle, [], "x", system + _msg(4))
    assert reply.num_reused_shared == len(system) and reply.num_prefilled == len(_msg(4))
    _check(a, b)


def test_block_verbs_account_exactly(model, oracle):
    a, b = _pool(model), _pool(model)
    history: list[int] = []
    _turn(a, oracle, history, "c", _msg(5, 3 * BS + 1))
    src = [chunk.block for chunk in a._kv.conversations["c"].chunks[:3]]  # three full chunks
    free = b._kv.device.num_free
    dst = b.alloc_mem(3)
    assert b._kv.device.num_free == free - 3
    _check(b)
    a.transfer(b, src, dst)
    assert b.insert(history, dst, num_tokens=3 * BS) == 3
    _check(a, b)
    assert b.match(history).num_tokens == 3 * BS
    assert b._kv.device.num_free == free - 3
    assert b.insert(history, b.alloc_mem(3), num_tokens=3 * BS) == 0  # duplicates: the blocks are freed again
    assert b._kv.device.num_free == free - 3
    _check(b)
    assert b.delete(history) == 3 and b.match(history).num_tokens == 0
    assert b._kv.device.num_free == free
    _check(a, b)
    spare = b.alloc_mem(2)
    b.free_mem(spare)
    assert b._kv.device.num_free == free
    with pytest.raises(ValueError, match="not allocated"):
        b.free_mem(spare)
    with pytest.raises(ValueError, match="tier must be one of"):
        b.alloc_mem(1, tier="gpu")
    _check(b)
    # the receiver continues a conversation from inserted blocks exactly
    a.transfer_with_insert(b, conv_id="c")
    b.adopt("c", history)
    reply = _turn(b, oracle, history, "c", _msg(6))
    assert reply.num_recomputed == 0
    _check(b)


def test_a_receiver_without_room_fails_cleanly(model, oracle):
    a, b = _pool(model), _pool(model, device=8)
    history: list[int] = []
    _turn(a, oracle, history, "c", _msg(7, 10 * BS))
    payload = a.read(conv_id="c")
    assert payload.num_blocks == 11
    free = b._kv.device.num_free
    with pytest.raises(MemPoolFull, match="no room for 11 device blocks"):
        b.receive(payload)
    assert b._kv.device.num_free == free and len(b._kv.tree) == 0
    held = b.alloc_mem(6)  # held blocks never move: now 2 are left, and 3 cannot be had
    with pytest.raises(MemPoolFull):
        b.alloc_mem(3)
    small = a.read(history[: 3 * BS], 0)
    with pytest.raises(MemPoolFull):
        b.receive(small)
    assert b._kv.device.num_free == 2
    _check(b)
    b.free_mem(held)
    assert b.receive(small) == 3
    _check(a, b)


def test_bad_payloads_are_refused_before_anything_changes(model, oracle):
    a, b = _pool(model), _pool(model)
    config = CacheConfig(block_size=BS, num_device_blocks=64)
    other = MemPool(StatefulGenerator(tiny_model("llama", seed=4), None, config))
    history: list[int] = []
    _turn(a, oracle, history, "c", _msg(8))
    payload = a.read(conv_id="c")
    with pytest.raises(ValueError, match="another model"):
        other.receive(payload)
    odd = MemPool(StatefulGenerator(copy.deepcopy(model), None, CacheConfig(block_size=8, num_device_blocks=64)))
    with pytest.raises(ValueError, match="block size 4"):
        odd.receive(payload)
    with pytest.raises(ValueError, match="KVPayload"):
        b.receive({"not": "a payload"})
    with pytest.raises(ValueError, match="token ids"):
        b.match([VOCAB + 1])
    with pytest.raises(KeyError):
        a.read(conv_id="nobody")
    assert len(other._kv.tree) == len(odd._kv.tree) == len(b._kv.tree) == 0
    _check(a, b, other, odd)


def test_host_chunks_are_sent_from_the_host_tier(model, oracle):
    a, b = _pool(model, device=16, host=32), _pool(model)
    history: list[int] = []
    _turn(a, oracle, history, "c", _msg(10, 5 * BS))
    other: list[int] = []
    _turn(a, oracle, other, "d", _msg(11, 9 * BS))  # pushes c's chunks to the host tier
    tiers = {chunk.tier for chunk in a._kv.conversations["c"].chunks}
    assert Tier.HOST in tiers
    payload = a.read(conv_id="c")
    assert isinstance(payload, KVPayload) and payload.num_tokens == len(history) - 1
    b.receive(payload)
    b.adopt("c", history)
    reply = _turn(b, oracle, history, "c", _msg(12))
    assert reply.num_recomputed == 0
    _check(a, b)


@given(
    st.lists(
        st.tuples(st.sampled_from(["turn", "send", "delete"]), st.integers(0, 2), st.integers(1, 9)),
        min_size=1,
        max_size=10,
    )
)
def test_random_schedules_of_turns_and_transfers_stay_exact(model, oracle, ops):
    """Two small instances; conversations hop between them with their KV (or without: recomputed); every reply is
    HF's and both caches keep their invariants after every operation."""
    pools = [_pool(model, device=24, host=8), _pool(model, device=24)]
    where: dict[str, int] = {}
    histories: dict[str, list[int]] = {}
    for op, conv, size in ops:
        conv_id = f"c{conv}"
        here = where.setdefault(conv_id, 0)
        history = histories.setdefault(conv_id, [])
        if op == "turn":
            _turn(pools[here], oracle, history, conv_id, _msg(size + conv, size))
        elif op == "send" and history:
            there = 1 - here
            try:
                pools[here].transfer_with_insert(pools[there], conv_id=conv_id)
            except MemPoolFull:
                pass  # recomputed there instead
            pools[there].adopt(conv_id, history)
            pools[here].generator.end(conv_id)
            where[conv_id] = there
        elif op == "delete" and history:
            pools[1 - here].delete(history)
        _check(*pools)
