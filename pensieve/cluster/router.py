"""The global router: which instance serves a turn (MemServe's global scheduler; DESIGN §8). Pure: no Ray, no
clocks of its own (callers pass `now`), so scripted traces test it exactly.

What each instance caches is kept on the driver as a prompt tree per instance: the content keys of the KV chunks
it holds (pensieve/cache/tree.py: key i is the chained hash of tokens[: (i + 1) * block_size], so a request's keys
are a path from the root and "longest cached prefix" is the longest run of its keys an instance holds). Entries
come from replies (after a turn an instance holds the chunks of the conversation's tokens) and leave with the
instances' eviction reports (the keys their trees dropped); an entry not confirmed for `ttl_s` is not trusted.
Block granularity is the instances' own: an instance reuses whole chunks (plus a conversation's own partial last
chunk, which the router credits to the conversation's owner), so a token-level tree would add nothing it can use.

Policies (`RouterConfig.policy`):
- `prompt_tree` (default): the instance with the longest cached prefix (ties: least loaded, then first) — or,
  when less than `cache_threshold` of the request is cached anywhere, the least loaded instance with the smallest
  index (SGLang's rule: new prefixes spread, so caches fill evenly) — unless load is imbalanced (max - min
  in-flight turns over `balance_abs_threshold` and max over min x `balance_rel_threshold`, as SGLang's
  cache-aware router decides), in which case a cost model picks the cheapest
  of, for every candidate: wait behind its queue + recompute what it lacks, or wait + move the missing KV from the
  instance holding the most + recompute the rest. A move is chosen only where transfer is cheaper than recompute.
- `session`: sticky by conversation id (a stable hash over the live instances), MemServe's baseline.
- `round_robin`: the next live instance.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

POLICIES = ("prompt_tree", "session", "round_robin")


@dataclass(frozen=True)
class RouterConfig:
    policy: str = "prompt_tree"
    balance_abs_threshold: int = 4  # in-flight turns
    balance_rel_threshold: float = 1.5
    cache_threshold: float = 0.5  # below this fraction of the request cached anywhere: the emptiest instance
    ttl_s: float = 600.0  # an index entry not confirmed for this long is not trusted
    # The cost model (seconds): measure on your machines (benchmarks/cluster.py prints both rates); the defaults were
    # measured here: SmolLM2-135M fp32 prefill on one thread ~200-300 tok/s, a 47-94 MB prefix moved between two
    # instances through the object store or gloo at ~140-230 MB/s.
    prefill_tokens_per_s: float = 250.0
    transfer_bytes_per_s: float = 2.0e8
    transfer_overhead_s: float = 0.005  # per transfer (object store put/get, actor calls)
    bytes_per_token: int = 0  # KV bytes per token (the cluster fills it in from the model)
    queue_s: float = 0.05  # the delay one in-flight turn ahead adds to a new turn

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {self.policy!r}")
        for name in ("balance_abs_threshold", "balance_rel_threshold", "ttl_s", "prefill_tokens_per_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a number > 0, got {value!r}")
        for name in ("transfer_bytes_per_s", "transfer_overhead_s", "bytes_per_token", "queue_s", "cache_threshold"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")


@dataclass(frozen=True)
class Route:
    instance: str
    reason: str  # "prefix" | "spread" | "balance" | "session" | "round_robin" | "only"
    cached: int = 0  # tokens of the request the chosen instance holds (as the router knows)
    transfer_from: str | None = None  # move KV from this instance first (the cost model chose it)
    transfer_tokens: int = 0  # ... this many positions, from `cached` on


@dataclass
class _Instance:
    keys: dict[bytes, float] = field(default_factory=dict)  # content key -> expiry
    load: int = 0  # turns in flight


class Router:
    def __init__(self, names: list[str], block_size: int, config: RouterConfig | None = None) -> None:
        self.config = config or RouterConfig()
        self.block_size = block_size
        self.instances = {name: _Instance() for name in names}
        self._next = 0

    # ---- what instances hold and do ---------------------------------------------------------------------------

    def cached(self, name: str, keys: list[bytes], now: float) -> None:
        """`name` holds the chunks with these keys (a reply, or a transfer, put them there)."""
        expiry = now + self.config.ttl_s
        index = self.instances[name].keys
        for key in keys:
            index[key] = expiry

    def evicted(self, name: str, keys: list[bytes]) -> None:
        """`name` dropped these chunks (its eviction report)."""
        index = self.instances[name].keys
        for key in keys:
            index.pop(key, None)

    def forget(self, name: str) -> None:
        """`name` is gone (dead): it holds nothing."""
        self.instances[name] = _Instance()

    def started(self, name: str) -> None:
        self.instances[name].load += 1

    def finished(self, name: str) -> None:
        self.instances[name].load -= 1

    def load(self, name: str) -> int:
        return self.instances[name].load

    def match(self, name: str, keys: list[bytes], now: float) -> int:
        """Blocks of the request (its keys) `name` holds from the first on, as far as the router knows."""
        index = self.instances[name].keys
        n = 0
        for key in keys:
            expiry = index.get(key)
            if expiry is None or expiry < now:
                break
            n += 1
        return n

    # ---- the decision --------------------------------------------------------------------------------------------

    def route(
        self,
        keys: list[bytes],
        num_tokens: int,
        candidates: list[str],
        now: float,
        *,
        conv_id: str | None = None,
        owner: str | None = None,
        owner_tokens: int = 0,
    ) -> Route:
        """Where a request of `num_tokens` tokens (full-block keys `keys`) runs, among `candidates` (live instances
        of a role that can serve it). `owner` holds the conversation, with KV for its first `owner_tokens`
        positions as far as the driver knows (its partial last chunk included)."""
        if not candidates:
            raise RuntimeError("no live instance can serve this request")
        policy = self.config.policy
        if len(candidates) == 1:
            name = candidates[0]
            return Route(name, "only", self._cached(name, keys, now, owner, owner_tokens))
        if policy == "round_robin":
            name = candidates[self._next % len(candidates)]
            self._next += 1
            return Route(name, "round_robin", self._cached(name, keys, now, owner, owner_tokens))
        if policy == "session":
            if conv_id is None:  # a stateless request has no session: spread it
                name = candidates[self._next % len(candidates)]
                self._next += 1
            elif owner in candidates:
                name = owner
            else:
                digest = hashlib.blake2b(conv_id.encode("utf-8"), digest_size=8).digest()
                name = candidates[int.from_bytes(digest, "little") % len(candidates)]
            return Route(name, "session", self._cached(name, keys, now, owner, owner_tokens))
        cached = {name: self._cached(name, keys, now, owner, owner_tokens) for name in candidates}
        loads = {name: self.instances[name].load for name in candidates}
        if not self._imbalanced(loads):
            best = max(candidates, key=lambda n: (cached[n], -loads[n]))  # max keeps the first of equals
            if cached[best] >= self.config.cache_threshold * num_tokens:
                return Route(best, "prefix", cached[best])
            # Little of it is cached anywhere: where it adds least load and the cache has most room (SGLang).
            emptiest = min(candidates, key=lambda n: (loads[n], len(self.instances[n].keys)))
            return Route(emptiest, "spread", cached[emptiest])
        return self._cheapest(candidates, cached, loads, num_tokens)

    def _cached(self, name: str, keys: list[bytes], now: float, owner: str | None, owner_tokens: int) -> int:
        blocks = self.match(name, keys, now)
        tokens = blocks * self.block_size
        if name == owner and blocks >= owner_tokens // self.block_size:  # its own partial chunk continues them
            tokens = max(tokens, owner_tokens)
        return tokens

    def _imbalanced(self, loads: dict[str, int]) -> bool:
        high, low = max(loads.values()), min(loads.values())
        c = self.config
        return high - low > c.balance_abs_threshold and high > low * c.balance_rel_threshold

    def cost(self, load: int, num_tokens: int, cached: int, moved: int = 0) -> float:
        """Seconds until a request's prefill is done on an instance with `load` turns in flight holding `cached`
        of its tokens, after `moved` more positions are transferred there."""
        c = self.config
        transfer = c.transfer_overhead_s + moved * c.bytes_per_token / c.transfer_bytes_per_s if moved else 0.0
        return load * c.queue_s + transfer + (num_tokens - cached - moved) / c.prefill_tokens_per_s

    def _cheapest(self, candidates: list[str], cached: dict, loads: dict, num_tokens: int) -> Route:
        holder = max(candidates, key=lambda n: cached[n])
        best, best_cost = None, float("inf")
        for name in candidates:
            options = [(self.cost(loads[name], num_tokens, cached[name]), None, 0)]
            if cached[holder] > cached[name] and name != holder:
                moved = cached[holder] - cached[name]
                options.append((self.cost(loads[name], num_tokens, cached[name], moved), holder, moved))
            for cost, source, moved in options:
                if cost < best_cost:
                    best_cost, best = cost, Route(name, "balance", cached[name], source, moved)
        return best
