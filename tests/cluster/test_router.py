"""The router's decisions on scripted traces (pure: no Ray, explicit clocks), asserted exactly."""

import pytest

from pensieve.cache.tree import prefix_keys
from pensieve.cluster.router import Route, Router, RouterConfig

BS = 4
NAMES = ["i0", "i1", "i2"]


def _tokens(seed: int, n: int) -> list[int]:
    return [(seed * 31 + i * 7) % 97 for i in range(n)]


def _router(**config) -> Router:
    return Router(list(NAMES), BS, RouterConfig(**config))


def _route(router: Router, tokens, now=0.0, **kw) -> Route:
    return router.route(prefix_keys(tokens, BS), len(tokens), NAMES, now, **kw)


def test_a_turn_goes_where_its_prefix_is_cached():
    r = _router()
    system = _tokens(1, 40)
    r.cached("i2", prefix_keys(system, BS), now=0.0)
    route = _route(r, system + _tokens(2, 8))
    assert route == Route("i2", "prefix", 40)
    r.cached("i1", prefix_keys(system + _tokens(2, 8), BS), now=0.0)  # a longer match wins
    assert _route(r, system + _tokens(2, 12)) == Route("i1", "prefix", 48)
    assert _route(r, system + _tokens(3, 12)) == Route("i1", "prefix", 40)  # equal: the less loaded, then first
    r.started("i1")
    assert _route(r, system + _tokens(3, 12)) == Route("i2", "prefix", 40)


def test_new_prefixes_spread_to_the_emptiest_instance():
    r = _router()
    r.cached("i0", prefix_keys(_tokens(1, 16), BS), now=0.0)
    r.started("i1")
    # nothing of it cached: least loaded first (i0, i2), then the smallest index (i2)
    assert _route(r, _tokens(5, 20)) == Route("i2", "spread", 0)
    # under cache_threshold (8 of 24 < 50%) it spreads too
    r.cached("i1", prefix_keys(_tokens(5, 8), BS), now=0.0)
    assert _route(r, _tokens(5, 24)) == Route("i2", "spread", 0)
    assert _route(r, _tokens(5, 24)).reason == "spread"
    assert _route(r, _tokens(5, 12)) == Route("i1", "prefix", 8)  # 8 of 12: over the threshold


def test_the_owner_is_credited_with_its_partial_last_chunk():
    r = _router()
    history = _tokens(4, 22)  # 5 full blocks + 2 positions
    r.cached("i1", prefix_keys(history, BS), now=0.0)
    r.cached("i0", prefix_keys(history, BS), now=0.0)
    turn = history + _tokens(6, 5)
    assert _route(r, turn, conv_id="c", owner="i1", owner_tokens=22) == Route("i1", "prefix", 22)
    # the owner's credit stops where its index stops (an evicted middle chunk)
    r.evicted("i1", prefix_keys(history, BS)[2:3])
    assert _route(r, turn, conv_id="c", owner="i1", owner_tokens=22) == Route("i0", "prefix", 20)


def test_imbalance_weighs_recompute_against_transfer_and_waiting():
    # Transfer is cheap: the hot instance's prefix moves to the idle one.
    r = _router(balance_abs_threshold=2, balance_rel_threshold=1.5, prefill_tokens_per_s=100.0,
                transfer_bytes_per_s=1e9, bytes_per_token=1000, queue_s=0.5)  # fmt: skip
    history = _tokens(7, 200)
    r.cached("i0", prefix_keys(history, BS), now=0.0)
    for _ in range(6):
        r.started("i0")
    r.started("i1")
    route = _route(r, history + _tokens(8, 10))
    # i0: 6 * 0.5 + 10/100 = 3.1 s; i2: transfer 200 tokens (0.2 MB, ~5 ms) + 0.1 s; i1 the same + 0.5 s queue
    assert route == Route("i2", "balance", 0, "i0", 200)
    assert r.cost(0, 210, 0, 200) == pytest.approx(0.005 + 200 * 1000 / 1e9 + 10 / 100)
    # Transfer is slow (a thin link): recomputing beats it, and waiting at the holder beats both.
    slow = _router(balance_abs_threshold=2, balance_rel_threshold=1.5, prefill_tokens_per_s=1000.0,
                   transfer_bytes_per_s=1e3, bytes_per_token=1000, queue_s=0.01)  # fmt: skip
    slow.cached("i0", prefix_keys(history, BS), now=0.0)
    for _ in range(6):
        slow.started("i0")
    # i0: 0.06 + 0.01 s; elsewhere: recompute 0.21 s; transfer 200 s
    assert _route(slow, history + _tokens(8, 10)) == Route("i0", "balance", 200)
    heavy = _router(balance_abs_threshold=2, prefill_tokens_per_s=1000.0, transfer_bytes_per_s=1e3,
                    bytes_per_token=1000, queue_s=0.1)  # fmt: skip
    heavy.cached("i0", prefix_keys(history, BS), now=0.0)
    for _ in range(6):
        heavy.started("i0")
    # i0: 0.6 + 0.01 s; i1/i2: recompute 0.21 s, no transfer
    assert _route(heavy, history + _tokens(8, 10)) == Route("i1", "balance", 0)


def test_balanced_load_keeps_cache_affinity():
    r = _router(balance_abs_threshold=4, balance_rel_threshold=1.5)
    history = _tokens(9, 40)
    r.cached("i0", prefix_keys(history, BS), now=0.0)
    for _ in range(4):  # 4 - 0 is not over 4
        r.started("i0")
    assert _route(r, history + [1, 2]).instance == "i0"
    r.started("i0")
    assert _route(r, history + [1, 2]).reason == "balance"
    for _ in range(5):
        r.finished("i0")
    assert r.load("i0") == 0


def test_entries_expire_unless_confirmed_and_leave_with_eviction_reports():
    r = _router(ttl_s=10.0)
    tokens = _tokens(3, 32)
    r.cached("i1", prefix_keys(tokens, BS), now=0.0)
    assert r.match("i1", prefix_keys(tokens, BS), now=9.0) == 8
    assert r.match("i1", prefix_keys(tokens, BS), now=11.0) == 0
    r.cached("i1", prefix_keys(tokens, BS)[:4], now=11.0)  # a reply confirmed the first half
    assert r.match("i1", prefix_keys(tokens, BS), now=12.0) == 4
    r.evicted("i1", prefix_keys(tokens, BS)[1:2])
    assert r.match("i1", prefix_keys(tokens, BS), now=12.0) == 1
    r.forget("i1")
    assert r.match("i1", prefix_keys(tokens, BS), now=12.0) == 0


def test_session_and_round_robin():
    rr = _router(policy="round_robin")
    tokens = _tokens(1, 10)
    rr.cached("i2", prefix_keys(tokens, BS), now=0.0)
    assert [_route(rr, tokens).instance for _ in range(4)] == ["i0", "i1", "i2", "i0"]
    s = _router(policy="session")
    first = _route(s, tokens, conv_id="conv-7").instance
    assert all(_route(s, tokens, conv_id="conv-7").instance == first for _ in range(3))  # sticky, cache or not
    assert _route(s, tokens, conv_id="conv-7", owner="i1").instance == "i1"  # the owner keeps it
    spread = {_route(s, tokens, conv_id=f"conv-{i}").instance for i in range(30)}
    assert spread == set(NAMES)
    # the owner is gone: rehashed over the live ones
    route = s.route(prefix_keys(tokens, BS), len(tokens), ["i0", "i2"], 0.0, conv_id="conv-7", owner="i1")
    assert route.instance in ("i0", "i2") and route.reason == "session"
    assert s.route([], 3, ["i2"], 0.0) == Route("i2", "only", 0)
    with pytest.raises(RuntimeError, match="no live instance"):
        s.route([], 3, [], 0.0)


def test_config_is_validated():
    with pytest.raises(ValueError, match="policy must be one of"):
        RouterConfig(policy="random")
    with pytest.raises(ValueError, match="balance_abs_threshold"):
        RouterConfig(balance_abs_threshold=0)
    with pytest.raises(ValueError, match="queue_s"):
        RouterConfig(queue_s=-1)
