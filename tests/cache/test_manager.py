"""Scripted scenarios for the tiered cache's bookkeeping: exactly which chunks move where, in what order."""

import time

import pytest

from pensieve.cache.manager import KVManager
from pensieve.cache.policy import LRUPolicy, PensievePolicy, RecomputeCost
from pensieve.cache.types import Chunk, Tier

D, H, K, X = Tier.DEVICE, Tier.HOST, Tier.DISK, Tier.DROPPED
BS = 4


def _manager(device=8, host=0, policy="pensieve", watermark=0.0, reserve=0.0) -> KVManager:
    chosen = PensievePolicy(RecomputeCost(1.0, 1.0), BS) if policy == "pensieve" else LRUPolicy()
    kv = KVManager(
        device, BS, num_host_blocks=host, policy=chosen, swap_out_watermark=watermark, decode_reserve=reserve
    )
    kv.mover.trace = []
    return kv


def _idle(kv: KVManager, conv_id: str, num_chunks: int, idle_s: float, tokens: int | None = None):
    """An idle conversation whose num_chunks chunks are all on the device."""
    conv = kv.conversation(conv_id)
    conv.tokens = list(range(3, 3 + (tokens or num_chunks * BS) + 1))
    conv.num_computed = tokens or num_chunks * BS
    assert kv.reserve(conv, conv.num_computed, set())
    conv.last_active = time.monotonic() - idle_s
    kv.mover.trace.clear()
    kv.check_integrity()
    return conv


def _tiers(conv) -> list[Tier]:
    return [c.tier for c in conv.chunks]


def _new_turn(kv: KVManager, conv_id: str, num_tokens: int, keep_free: int = 0) -> bool:
    conv = kv.conversation(conv_id)
    conv.tokens = list(range(3, 3 + num_tokens))
    conv.pinned = True
    ok = kv.reserve(conv, num_tokens, set(), keep_free)
    kv.check_integrity()
    return ok


def test_pensieve_moves_lowest_cost_over_idle_first_leading_chunks_first():
    kv = _manager(device=8, host=8)
    a = _idle(kv, "a", 4, idle_s=100.0)
    b = _idle(kv, "b", 3, idle_s=5.0)
    # values with cost(start, 4) = 4 + 4*start + 6: a0 = 10/100, a1 = 26/100, a2 = 42/100, a3 = 58/100, b0 = 10/5
    assert _new_turn(kv, "c", 4 * BS)  # 1 free block, 4 needed: three chunks move
    assert kv.mover.trace == [("a", 0, D, H), ("a", 1, D, H), ("a", 2, D, H)]
    assert _tiers(a) == [H, H, H, D] and _tiers(b) == [D, D, D]


def test_pensieve_takes_a_recent_conversations_cheap_leading_chunk_before_an_old_ones_costly_tail():
    kv = _manager(device=8, host=8)
    a = _idle(kv, "a", 5, idle_s=10.0)  # a4 = cost(16, 4) = 74 -> 7.4 per s idle
    b = _idle(kv, "b", 2, idle_s=5.0)  # b0 = 10 / 5 = 2.0, b1 = 26 / 5 = 5.2
    assert _new_turn(kv, "c", 7 * BS)  # 1 free, 7 needed: a0..a3 (1.0, 2.6, 4.2, 5.8) interleave with b0, b1
    order = [("a", 0), ("b", 0), ("a", 1), ("a", 2), ("b", 1), ("a", 3)]
    assert kv.mover.trace == [(name, i, D, H) for name, i in order]
    assert _tiers(a) == [H, H, H, H, D] and _tiers(b) == [H, H]


def test_lru_moves_whole_conversations_least_recently_active_first():
    kv = _manager(device=8, host=8, policy="lru")
    a = _idle(kv, "a", 3, idle_s=5.0)
    b = _idle(kv, "b", 4, idle_s=50.0)
    assert _new_turn(kv, "c", 2 * BS)  # 1 free, 2 needed, but b goes whole
    assert kv.mover.trace == [("b", i, D, H) for i in range(4)]
    assert _tiers(a) == [D, D, D] and _tiers(b) == [H] * 4 and kv.device.num_free == 3


def test_full_host_tier_makes_room_by_dropping_its_own_lowest_value_chunk():
    kv = _manager(device=8, host=1)
    a = _idle(kv, "a", 4, idle_s=100.0)
    _idle(kv, "b", 3, idle_s=1.0)
    assert _new_turn(kv, "c", 3 * BS)  # 1 free, 3 needed
    assert kv.mover.trace == [("a", 0, D, H), ("a", 0, H, X), ("a", 1, D, H)]
    assert _tiers(a) == [X, H, D, D]
    assert kv.counters["dropped_chunks"] == 1 and kv.counters["swap_out_chunks"] == 2


def test_without_lower_tiers_chunks_are_dropped_leading_first():
    kv = _manager(device=6)
    a = _idle(kv, "a", 4, idle_s=10.0, tokens=14)
    assert _new_turn(kv, "c", 4 * BS)
    assert kv.mover.trace == [("a", 0, D, X), ("a", 1, D, X)]
    assert _tiers(a) == [X, X, D, D] and a.num_computed == 14


def test_dropping_the_last_chunk_resets_the_conversation():
    kv = _manager(device=4)
    a = _idle(kv, "a", 2, idle_s=10.0, tokens=6)
    assert _new_turn(kv, "c", 4 * BS)
    assert a.chunks == [] and a.num_computed == 0  # everything was dropped: a plain prefill next time


def test_pinned_conversations_never_move():
    kv = _manager(device=4, host=4)
    busy = _idle(kv, "busy", 2, idle_s=100.0)
    busy.pinned = True
    assert not _new_turn(kv, "c", 3 * BS)  # only 2 free and busy cannot move
    assert kv.mover.trace == [] and _tiers(busy) == [D, D] and len(kv.conversation("c").chunks) == 0


def test_reserve_refuses_to_eat_into_the_kept_free_blocks():
    kv = _manager(device=8)
    assert not _new_turn(kv, "c", 8 * BS, keep_free=1)
    assert kv.conversation("c").chunks == []  # nothing allocated on failure
    assert _new_turn(kv, "d", 7 * BS, keep_free=1)


def test_ahead_of_time_swap_out_fills_the_watermark_but_never_drops():
    kv = _manager(device=8, host=2, watermark=0.5)  # keep 4 blocks free
    a = _idle(kv, "a", 4, idle_s=100.0)
    b = _idle(kv, "b", 3, idle_s=1.0)
    assert kv.device.num_free == 1
    assert kv.mover.swap_out_ahead() == 2  # the host has room for 2 only; the rest stays on the device
    assert kv.mover.trace == [("a", 0, D, H), ("a", 1, D, H)]
    assert _tiers(a) == [H, H, D, D] and _tiers(b) == [D, D, D]
    assert kv.mover.swap_out_ahead() == 0 and kv.counters["dropped_chunks"] == 0


def test_ahead_of_time_swap_out_does_nothing_above_the_watermark():
    kv = _manager(device=8, host=8, watermark=0.25)
    _idle(kv, "a", 6, idle_s=100.0)
    assert kv.device.num_free == 2 and kv.mover.swap_out_ahead() == 0 and kv.mover.trace == []


def test_restore_swaps_in_host_chunks_and_recomputes_dropped_leading_ones():
    kv = _manager(device=8, host=4)
    a = _idle(kv, "a", 4, idle_s=100.0)
    a.chunks[0].tier, a.chunks[0].block = X, -1  # hand-built [X, H, D, D]: free a0's device block first
    kv.device.free([0])
    (h,) = kv.host.allocate(1)
    kv.device.free([a.chunks[1].block])
    a.chunks[1] = Chunk(H, h, index=1, refs=1)
    kv.check_integrity()
    a.pinned = True
    stats = kv.restore(a, set())
    assert _tiers(a) == [D] * 4 and a.recompute == [[0, BS]]
    assert stats.chunks == {X: 1, K: 0, H: 1, D: 2} and stats.tokens == {X: 4, K: 0, H: 4, D: 8}
    assert kv.host.num_free == 3  # the swapped-in host block is freed only after the forward that reads it
    kv.check_integrity()
    kv.mover.after_forward()
    assert kv.host.num_free == 4
    kv.check_integrity()


def test_preempting_a_recompute_in_progress_drops_the_range_and_moves_the_rest_down():
    kv = _manager(device=8, host=8)
    a = _idle(kv, "a", 3, idle_s=1.0, tokens=11)
    a.pinned = True
    a.recompute = [[2, 2 * BS]]  # chunks 0-1 were being recomputed, 2 positions are done
    kv.preempt(a)
    assert _tiers(a) == [X, X, H] and a.recompute == [] and a.num_computed == 11
    kv.check_integrity()


def test_truncate_frees_the_rewritten_tail():
    kv = _manager(device=8)
    a = _idle(kv, "a", 4, idle_s=1.0)
    kv.truncate(a, 6)
    assert a.num_computed == 6 and len(a.chunks) == 2 and kv.device.num_free == 6
    kv.check_integrity()


def test_integrity_check_catches_a_block_owned_twice():
    kv = _manager(device=8)
    a = _idle(kv, "a", 2, idle_s=1.0)
    a.chunks[1].block = a.chunks[0].block
    with pytest.raises(AssertionError):
        kv.check_integrity()


def test_integrity_check_catches_a_wrong_reference_count():
    kv = _manager(device=8)
    a = _idle(kv, "a", 2, idle_s=1.0)
    a.chunks[0].refs = 2
    with pytest.raises(AssertionError, match="refs"):
        kv.check_integrity()


def test_integrity_check_catches_a_chunk_keyed_for_other_tokens():
    from pensieve.cache.tree import chunk_key

    kv = _manager(device=8)
    a = _idle(kv, "a", 2, idle_s=1.0)
    a.chunks[1].key = chunk_key(b"", [1, 2, 3, 4])
    with pytest.raises(AssertionError, match="other tokens"):
        kv.check_integrity()


def test_preempting_with_a_full_host_moves_its_own_host_chunk_to_disk_first(tmp_path):
    """A preempted (pinned) conversation fills the one host block with its chunk 0; its chunk 1 makes room there by
    the policy's order (a preempted turn's chunks may move), so chunk 0 goes to disk first, then chunk 1 to host."""
    import torch

    from pensieve.cache.disk import DiskStore
    from pensieve.cache.tiers import KVStorage

    storage = KVStorage(2, (BS, 1, 4), torch.float32, torch.device("cpu"), 4, 1)
    for k, v in storage.device_caches:
        k.normal_()
        v.normal_()
    disk = DiskStore(tmp_path, "fingerprint", storage.chunk_shape, torch.float32)
    kv = KVManager(4, BS, num_host_blocks=1, storage=storage, disk=disk, swap_out_watermark=0, decode_reserve=0)
    kv.mover.trace = []
    b = _idle(kv, "b", 2, idle_s=1.0, tokens=6)
    b.pinned = True
    kv.preempt(b)
    assert kv.mover.trace == [("b", 0, D, H), ("b", 0, H, K), ("b", 1, D, H)]
    assert _tiers(b) == [K, H]
    kv.check_integrity()


def _turn_through(kv: KVManager, conv_id: str, tokens: list[int], idle_s: float):
    """A whole turn by the manager's verbs: restore (taking the tree's chunks), reserve, advance, finish."""
    conv = kv.conversation(conv_id)
    conv.tokens = list(tokens)
    conv.pinned = True
    assert kv.restore(conv, set()) is not None
    assert kv.reserve(conv, len(tokens), set())
    kv.advance(conv, len(tokens) - conv.num_computed)
    kv.end_turn(conv)
    conv.last_active = time.monotonic() - idle_s
    kv.check_integrity()
    return conv


def test_a_shared_chunk_is_worth_the_activity_of_all_its_holders():
    kv = _manager(device=8, host=8)
    system = [50, 51, 52, 53, 54, 55, 56, 57]  # two full blocks, held by a, b and c
    a = _turn_through(kv, "a", system + [60, 61, 62, 63, 64, 65, 66, 67], idle_s=10.0)
    b = _turn_through(kv, "b", system + [70, 71, 72, 73], idle_s=10.0)
    c = _turn_through(kv, "c", system + [80, 81, 82, 83], idle_s=10.0)
    assert a.chunks[:2] == b.chunks[:2] == c.chunks[:2] and a.chunks[0].refs == 3
    assert kv.device.num_free == 2  # 2 shared + a's 2 + b's 1 + c's 1
    kv.mover.trace.clear()
    # cost(start, 4) = 10 + 4 * start. Shared: s0 = 10 * 3/10 = 3.0, s1 = 26 * 3/10 = 7.8; private: a2 = b2 = c2 =
    # 42/10 = 4.2, a3 = 58/10 = 5.8. Five must move: s0, a2, b2, c2, a3 -- s1 outlasts every private chunk, and a's
    # private chunks still leave from the leading end.
    assert _new_turn(kv, "d", 7 * BS)
    assert kv.mover.trace == [("a+b+c", 0, D, H), ("a", 2, D, H), ("b", 2, D, H), ("c", 2, D, H), ("a", 3, D, H)]
    assert _tiers(a) == [H, D, H, H] and _tiers(b) == _tiers(c) == [H, D, H]


def test_a_chunk_only_the_tree_holds_counts_as_one_holder_idle_since_let_go():
    kv = _manager(device=6, host=8)
    _turn_through(kv, "a", [50, 51, 52, 53, 54, 55, 56, 57], idle_s=1.0)  # 2 full chunks
    kv.remove("a")  # its chunks stay in the tree
    assert len(kv.tree) == 2 and kv.device.num_free == 4
    for chunk in kv.tree.nodes.values():
        chunk.last_used = time.monotonic() - 100.0
    b = _turn_through(kv, "b", [90, 91, 92, 93, 94, 95, 96, 97], idle_s=1.0)
    kv.mover.trace.clear()
    # tree-only t0 = 10/100, t1 = 26/100; b0 = 10/1, b1 = 26/1: the tree's chunks go first
    assert _new_turn(kv, "c", 4 * BS)
    assert kv.mover.trace == [("", 0, D, H), ("", 1, D, H)]
    assert _tiers(b) == [D, D]


def test_a_running_conversations_shared_chunk_never_moves():
    kv = _manager(device=6, host=8)
    system = [50, 51, 52, 53]
    a = _turn_through(kv, "a", system + [60, 61, 62, 63], idle_s=100.0)
    b = _turn_through(kv, "b", system + [70], idle_s=100.0)
    b.pinned = True  # b's turn is running: the shared chunk stays, a's private chunk may go
    kv.mover.trace.clear()
    assert kv.device.num_free == 3 and _new_turn(kv, "c", 4 * BS)
    assert kv.mover.trace == [("a", 1, D, H)] and _tiers(a) == [D, H] and a.chunks[0] is b.chunks[0]


def test_a_partial_last_chunk_is_kept_as_a_tail_and_handed_to_the_request_that_continues_it():
    kv = _manager(device=8, host=0)
    history = [50, 51, 52, 53, 54, 55]  # a full chunk and 2 positions of the next
    a = _turn_through(kv, "a", history, idle_s=1.0)
    tail = a.chunks[1]
    kv.remove("a")
    assert len(kv.tree) == 1 and len(kv.tree.tails) == 1 and kv.device.num_free == 6
    kv.check_integrity()
    b = kv.conversation("b")
    b.tokens = history + [60, 61, 62]  # a stateless client resends the history, and more
    b.pinned = True
    stats = kv.restore(b, set())
    assert b.chunks[1] is tail and b.num_computed == 6 and tail.refs == 1 and not kv.tree.tails
    assert stats.shared == 6 and stats.tokens[D] == 6
    kv.check_integrity()
    c = kv.conversation("c")  # the same history again: the tail has one owner, so c computes its own
    c.tokens = history + [70]
    c.pinned = True
    kv.restore(c, set())
    assert c.num_computed == 4 and c.chunks[0] is b.chunks[0]
    kv.check_integrity()
