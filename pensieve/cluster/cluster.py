"""Cluster: the StatefulGenerator API over N instances on Ray (MemServe, arXiv 2406.17565; DESIGN §8).

    cluster = Cluster(make_model, tokenizer, roles=["colocated", "colocated"])
    reply = cluster.generate("conv-42", "And in French?")

The driver (this object) keeps, for every conversation, the record that makes it durable off any instance: its
tokens (and chat messages in text mode) after each completed turn, and which instance holds it. Each turn:

1. render the turn's tokens (the same function an instance uses, so bad input fails here, before anything moves);
2. route it (pensieve/cluster/router.py) among the live instances that decode: colocated and decode roles;
3. if the router chose to move KV (load imbalance, transfer cheaper than recompute), the holder sends it to the
   chosen instance, which inserts it into its prompt tree (MemPool.read -> receive, through the object store);
4. P/D: if the chosen instance is a decode instance and the cluster has prefill instances, a prefill instance
   (routed by its own prompt tree) computes the turn's new tokens but the last, attending to its cached history,
   and its KV goes straight to the decode instance as an argument of the turn's call;
5. the turn runs on the chosen instance, which first adopts the driver's record if its copy differs;
6. the record, the router's index (the tokens the instance now caches, and the keys its tree dropped) and the
   load counts are updated; P/D: the decode instance sends the reply's KV back to the prefill instance, so the
   next turn's prefill computes only the new message (MemServe's PD-Caching with send-back).

Faults: a call that fails because its instance died marks it gone (never routed to again), and the turn runs
again elsewhere from the record: the conversation loses nothing and its replies stay exact (what the new instance
lacks is recomputed). Instances are pinged every `health_check_s` without waiting; one that has not answered within
`ping_timeout_s` is not routed to until it answers. A transfer that fails is skipped (the receiver recomputes).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from pensieve.api import Capabilities, Generator
from pensieve.cache.tree import prefix_keys
from pensieve.cluster import runtime
from pensieve.cluster.instance import ROLES
from pensieve.cluster.router import Route, Router, RouterConfig
from pensieve.config import CacheConfig, EngineConfig, SamplingParams, SchedulerConfig
from pensieve.engine.admission import check_token_ids, render_prompt, render_turn, require_idle
from pensieve.engine.turn import Delta, Reply, next_piece

DECODERS = ("colocated", "decode")


@dataclass
class _Conversation:
    tokens: list[int] = field(default_factory=list)
    messages: list[dict] | None = None
    owner: str | None = None  # the instance holding it
    computed: int = 0  # positions whose KV the owner computed (as of the last turn)
    busy: bool = False  # a turn is running
    sendback: object = None  # P/D: the ObjectRef of the reply's KV being sent to the prefill instance


@dataclass
class _Turn:
    """A turn between its start (routed, called) and its end (result read)."""

    conv_id: str | None  # None: a completion
    msg: object
    sampling: SamplingParams | None
    tokens: list[int]  # the rendered sequence the turn prefills
    keys: list[bytes]
    instance: str = ""
    ref: object = None
    prefill: str | None = None  # P/D: the prefill instance
    prefilled_ref: object = None
    evicted_ref: object = None
    attempts: int = 0


class Cluster(Generator):
    """`StatefulGenerator`'s API over N pensieve instances (Ray actors), each with a role and a prompt tree."""

    def __init__(
        self,
        model: Callable | str,
        tokenizer=None,
        *,
        roles: list[str] | tuple[str, ...] = ("colocated", "colocated"),
        cache_config: CacheConfig | None = None,
        scheduler_config: SchedulerConfig | None = None,
        engine_config: EngineConfig | None = None,
        router_config: RouterConfig | None = None,
        address: str | None = None,
        num_cpus: float | None = None,
        num_gpus: float | None = None,
        num_threads: int | None = None,
        object_store_memory: int | None = None,
        min_prefill_tokens: int | None = None,
        send_back: bool = True,
        health_check_s: float = 5.0,
        ping_timeout_s: float = 10.0,
        transport: str = "object_store",
    ) -> None:
        """model: a picklable callable that returns the model (built on each instance), or a model path.
        roles: one per instance, "colocated" | "prefill" | "decode" (prefill needs a decode instance).
        address: None starts a local Ray runtime sized for this machine (or uses the one this process started);
        "auto" (or an address) joins a running Ray cluster. num_cpus: Ray CPUs per instance (default: the free CPUs
        shared evenly); num_gpus: Ray GPUs per instance (default: the free GPUs shared evenly, so instances see them
        — Ray hides GPUs from actors that ask for none; the model factory puts the model on "cuda"); num_threads:
        torch threads per instance (default: the cluster's CPUs shared evenly, >= 1).
        min_prefill_tokens: P/D hands a turn to a prefill instance only when it has at least this many tokens to
        prefill (default: one block); shorter ones are prefilled where they decode. send_back: P/D sends each reply's
        KV back to the prefill instance (False: the next turn's prefill recomputes it; benchmarks' baseline).
        health_check_s / ping_timeout_s: how often instances are pinged (without waiting), and how long one may take
        to answer before it is not routed to (until it answers). transport: how KV moves between instances,
        "object_store" (Ray's object store; CPU bytes) or "collective" (ray.util.collective send/recv between the
        instances' devices: NCCL when every instance has a GPU of its own, else gloo through the host; `backend`
        says which)."""
        roles = list(roles)
        if not roles or any(r not in ROLES for r in roles):
            raise ValueError(f"roles must be a non-empty list of {ROLES}, got {roles!r}")
        if not any(r in DECODERS for r in roles):
            raise ValueError("a cluster needs at least one colocated or decode instance")
        if "decode" in roles and "prefill" not in roles:
            raise ValueError("decode instances need a prefill instance (or make them colocated)")
        if transport not in ("object_store", "collective"):
            raise ValueError(f'transport must be "object_store" or "collective", got {transport!r}')
        cache_config = cache_config or CacheConfig()
        if cache_config.disk_dir is not None:
            raise ValueError("disk_dir is per instance: not supported in a Cluster yet (the driver keeps the record)")
        self._ray = ray = runtime.ray_module()
        self._started_ray = runtime.start(address, object_store_memory)
        where = runtime.placement(len(roles), num_cpus, num_gpus, num_threads)
        self._handles = runtime.place(roles, model, tokenizer, cache_config, scheduler_config, engine_config, where)
        self.roles: dict[str, str] = dict(zip(self._handles, roles, strict=True))
        infos = ray.get([h.info.remote() for h in self._handles.values()])
        info = infos[0]
        self.transport = transport
        self._stage = transport == "collective"  # instances keep what they read for send_kv
        self._ranks = {name: rank for rank, name in enumerate(self._handles)}
        self._seq: Counter[tuple[str, str]] = Counter()  # collective transfers issued per (sender, receiver)
        # the collective transport's backend ("nccl" or "gloo")
        self.backend = runtime.join_collective(self._handles, self._ranks, infos) if transport == "collective" else None
        self.block_size = info["block_size"]
        self._vocab = info["vocab_size"]
        self._max_positions = info["max_positions"]
        self.tokenizer = tokenizer
        config = router_config or RouterConfig()
        if config.bytes_per_token == 0:
            config = RouterConfig(**{**config.__dict__, "bytes_per_token": info["bytes_per_token"]})
        self.router = Router(list(self._handles), self.block_size, config)
        self.min_prefill_tokens = self.block_size if min_prefill_tokens is None else min_prefill_tokens
        self.send_back = send_back
        self.alive: set[str] = set(self._handles)  # routed to
        self._gone: set[str] = set()  # dead actors
        self._pings: dict[str, tuple] = {}  # instance -> (ObjectRef of a ping not yet answered, when it was sent)
        self.health_check_s, self.ping_timeout_s = health_check_s, ping_timeout_s
        self._last_health = time.monotonic()
        self.counters: Counter[str] = Counter()
        self._convs: dict[str, _Conversation] = {}
        self._running: dict[str, _Turn] = {}  # conversation id -> its turn on an instance
        self._pool: ThreadPoolExecutor | None = None  # `submit`'s threads (made at first use)
        self._lock = threading.RLock()  # the driver's state: records, router, counters
        self._closed = False

    # ---- public API (the Generator protocol, pensieve/api.py) -----------------------------------------------

    @property
    def capabilities(self) -> Capabilities:
        """No disk tier yet (the driver keeps the record); a completion is not streamed by its instance."""
        return Capabilities(disk_tier=False, streamed_complete=False, num_instances=len(self.alive),
                            max_model_len=self._max_positions, vocab_size=self._vocab)  # fmt: skip

    def generate(
        self,
        conv_id: str,
        msg,
        sampling: SamplingParams | None = None,
        *,
        tools=None,
    ) -> Reply:
        """One turn on conv_id, on the instance the router picks."""
        _no_tools(tools)
        return self._finish(self._start(conv_id, msg, sampling))

    def generate_batch(
        self,
        messages: dict,
        sampling: SamplingParams | None = None,
        *,
        tools=None,
    ) -> dict[str, Reply]:
        """One turn on each of several conversations, run concurrently across instances (and batched on each).
        All are validated before any starts."""
        _no_tools(tools)
        if not isinstance(messages, dict):
            raise ValueError(f"messages must be a dict of conv_id -> message, got {type(messages).__name__}")
        turns = self._start_all(list(messages.items()), sampling)
        return {turn.conv_id: self._finish(turn) for turn in turns}

    def stream(
        self,
        conv_id: str,
        msg,
        sampling: SamplingParams | None = None,
        token_ids: bool = False,
        *,
        tools=None,
    ):
        """The reply's pieces as the instance produces them (str pieces that join to the reply's text with a
        tokenizer, else or with `token_ids` token ids); the stream's `.reply` is the whole Reply once done."""
        _no_tools(tools)
        turn = self._start(conv_id, msg, sampling, streaming=True)
        return ClusterStream(self, turn, token_ids or self.tokenizer is None)

    def submit(
        self,
        conv_id: str,
        msg,
        sampling: SamplingParams | None = None,
        on_token=None,
        *,
        tools=None,
    ) -> Future:
        """Start a turn without waiting (as `StatefulGenerator.submit`): -> a Future of its Reply; on_token(delta)
        is called (on a driver thread) as the instance streams the reply."""
        _no_tools(tools)
        future: Future = Future()
        future.conv_id = conv_id  # what `abort` is given this Future for

        def run() -> None:
            try:
                stream = self.stream(conv_id, msg, sampling)
                for delta in stream.deltas():
                    if on_token is not None:
                        on_token(delta)
                future.set_result(stream.reply)
            except BaseException as error:  # noqa: BLE001  (handed to the caller)
                future.set_exception(error)

        self._workers().submit(run)
        return future

    def submit_complete(
        self,
        prompt,
        sampling: SamplingParams | None = None,
        on_token=None,
        *,
        tools=None,
    ) -> Future:
        """`complete` without waiting: -> a Future of its Reply. A completion is not streamed by the instance: on_token
        sees the reply's deltas when it is done (the last carries the text), and `abort` cannot stop it."""
        _no_tools(tools)
        future: Future = Future()

        def run() -> None:
            try:
                reply = self.complete(prompt, sampling)
                last = len(reply.token_ids) - 1
                for i, token in enumerate(reply.token_ids if on_token is not None else ()):
                    logprob = None if reply.logprobs is None else reply.logprobs[i]
                    on_token(Delta(token, (reply.text or "") if i == last else "", logprob))
                future.set_result(reply)
            except BaseException as error:  # noqa: BLE001  (handed to the caller)
                future.set_exception(error)

        self._workers().submit(run)
        return future

    def abort(self, target) -> bool:
        """Abort a conversation's running turn (target: its id, or the Future `submit` returned) on its instance:
        none of it is kept there or in the driver's record; its caller gets TurnAborted. -> False if no turn of it
        was running on an instance yet (or any more)."""
        return self._running_call(target, "abort")

    def stop(self, target) -> bool:
        """Cut a conversation's running turn short on its instance, keeping it (`StatefulGenerator.stop`): the
        reply so far, finish_reason "cancelled", comes back as any finished turn's does. -> False if no turn of it
        was running on an instance yet (or any more)."""
        return self._running_call(target, "stop")

    def _running_call(self, target, method: str) -> bool:
        """`method` (abort or stop) on the instance where target's turn runs -> False if none runs there."""
        conv_id = getattr(target, "conv_id", target)
        with self._lock:
            turn = self._running.get(conv_id) if isinstance(conv_id, str) else None
        if turn is None:
            return False
        try:
            return bool(self._call(turn.instance, method, conv_id))
        except self._ray.exceptions.RayError:
            return False

    def truncate(self, conv_id: str, num_tokens: int) -> None:
        """Keep the first num_tokens tokens of a raw-mode conversation (its record, and its KV where it lives)."""
        if not isinstance(conv_id, str):
            raise ValueError(f"conv_id must be a str, got {conv_id!r}")
        with self._lock:
            self._check_open()
            conv = self._idle(conv_id)
            if conv.messages is not None:
                raise ValueError(f"conversation {conv_id!r} is in text mode: its tokens follow its messages")
            n = len(conv.tokens)
            if not isinstance(num_tokens, int) or isinstance(num_tokens, bool) or not 0 <= num_tokens <= n:
                raise ValueError(f"num_tokens must be an int in [0, {len(conv.tokens)}], got {num_tokens!r}")
            del conv.tokens[num_tokens:]
            conv.computed = min(conv.computed, num_tokens)
            owner = conv.owner if conv.owner in self.alive else None
        if owner is not None:  # (if this fails, the instance adopts the record at the next turn)
            try:
                self._call(owner, "truncate", conv_id, num_tokens)
            except (self._ray.exceptions.RayError, KeyError, ValueError):
                pass

    def serve(self, stop: threading.Event) -> None:
        """Wait until `stop` is set (the instances step their engines themselves; a server calls this as it calls
        `StatefulGenerator.serve`)."""
        while not stop.wait(0.5):
            pass

    def owner(self, conv_id: str) -> str | None:
        """The instance holding conv_id's KV (None: none yet, or no such conversation)."""
        with self._lock:
            conv = self._convs.get(conv_id)
            return None if conv is None else conv.owner

    def _workers(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=128, thread_name_prefix="pensieve-cluster")
            return self._pool

    def complete_batch(
        self,
        prompts: list,
        sampling: SamplingParams | None = None,
        *,
        tools=None,
    ) -> list[Reply]:
        """`complete` on several prompts, run concurrently across instances (and batched on each). All are
        validated before any starts."""
        _no_tools(tools)
        self._check_open()
        if not isinstance(prompts, (list, tuple)):
            raise ValueError(f"prompts must be a list of prompts, got {type(prompts).__name__}")
        turns = []
        for prompt in prompts:
            tokens = render_prompt(self.tokenizer, prompt, lambda ids: check_token_ids(ids, self._vocab))
            _check_sampling(sampling)
            self._check_fits(None, len(tokens), sampling)
            turns.append(_Turn(None, list(prompt), sampling, tokens, prefix_keys(tokens, self.block_size)))
        with self._lock:
            for turn in turns:
                self._dispatch(turn)
        return [self._finish(turn) for turn in turns]

    def fork(self, conv_id: str, new_conv_id: str) -> None:
        """Start new_conv_id as a branch of conv_id: the same history; on the same instance, sharing its KV."""
        for name, value in (("conv_id", conv_id), ("new_conv_id", new_conv_id)):
            if not isinstance(value, str) or not value:
                raise ValueError(f"{name} must be a non-empty str, got {value!r}")
        with self._lock:
            self._check_open()
            conv = self._idle(conv_id)
            if new_conv_id in self._convs:
                raise ValueError(f"conversation {new_conv_id!r} already exists")
            new = _Conversation(list(conv.tokens), conv.messages and [dict(m) for m in conv.messages])
            if conv.owner in self.alive:
                try:
                    self._call(conv.owner, "fork", conv_id, new_conv_id)
                    new.owner, new.computed = conv.owner, conv.computed // self.block_size * self.block_size
                except self._ray.exceptions.RayActorError:
                    self._dead(conv.owner)
            self._convs[new_conv_id] = new

    def end(self, conv_id: str, forget: bool = False) -> None:
        """Release a conversation everywhere: the driver's record and the instance's memory (its full chunks stay
        cached in that instance's prompt tree unless forget)."""
        if not isinstance(conv_id, str):
            raise ValueError(f"conv_id must be a str, got {conv_id!r}")
        with self._lock:
            self._check_open()
            conv = self._idle(conv_id)
            del self._convs[conv_id]
            if conv.owner in self.alive:
                self._handles[conv.owner].end.remote(conv_id, forget)

    def conversations(self) -> list[str]:
        with self._lock:
            return sorted(self._convs)

    def stats(self) -> dict:
        """The cluster's counters and every live instance's `stats()`."""
        with self._lock:
            alive = sorted(self.alive)
            reachable = sorted(set(self._handles) - self._gone)
            counters = dict(self.counters)
            loads = {name: self.router.load(name) for name in self._handles}
        per_instance = dict(
            zip(reachable, self._ray.get([self._handles[n].stats.remote() for n in reachable]), strict=True)
        )
        return {
            "instances": {name: self.roles[name] for name in self._handles},
            "alive": alive,
            "gone": sorted(self._gone),
            "conversations": len(self._convs),
            "in_flight": loads,
            **counters,
            "per_instance": per_instance,
        }

    def ping(self, timeout_s: float = 5.0) -> list[str]:
        """Ask every instance now: those that answer within timeout_s are routed to; the others are not until they
        answer (a dead one never does). -> the live instances."""
        refs = {name: self._handles[name].ping.remote() for name in self._handles if name not in self._gone}
        self._ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
        with self._lock:
            now = time.monotonic()
            for name, ref in refs.items():
                self._pings[name] = (ref, now - timeout_s)  # (counts as sent timeout_s ago)
            self._check_pings(now, timeout_s)
            return sorted(self.alive)

    def _health(self) -> None:
        """Every `health_check_s`, ping every instance without waiting; look at earlier pings' answers (under the
        lock, at each dispatch): answered -> live again; no answer after `ping_timeout_s` -> not routed to; the actor
        died -> gone for good."""
        now = time.monotonic()
        self._check_pings(now, self.ping_timeout_s)
        if now - self._last_health >= self.health_check_s:
            self._last_health = now
            for name, handle in self._handles.items():
                if name not in self._gone and name not in self._pings:
                    self._pings[name] = (handle.ping.remote(), now)

    def _check_pings(self, now: float, timeout_s: float) -> None:
        ray = self._ray
        for name, (ref, sent) in list(self._pings.items()):
            ready, _ = ray.wait([ref], timeout=0)
            if ready:
                del self._pings[name]
                try:
                    ray.get(ref)
                except ray.exceptions.RayError:
                    self._dead(name)
                    continue
                if name not in self.alive:
                    self.alive.add(name)
                    self.counters["instances_back"] += 1
            elif now - sent >= timeout_s and name in self.alive:
                self.alive.discard(name)  # slow: not routed to until it answers (its index is kept)
                self.counters["instances_unresponsive"] += 1

    def check_integrity(self) -> None:
        """Every live instance's cache invariants (tests)."""
        self._ray.get([self._handles[n].check_integrity.remote() for n in sorted(set(self._handles) - self._gone)])

    def handle(self, name: str):
        """The Ray actor of an instance (tests, and MemPool calls of your own)."""
        return self._handles[name]

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
        for name in sorted(set(self._handles) - self._gone):
            try:
                self._ray.get(self._handles[name].close.remote(), timeout=60)
            except Exception:  # noqa: BLE001  (closing anyway)
                pass
        for handle in self._handles.values():
            self._ray.kill(handle)
        if self._started_ray:
            self._ray.shutdown()

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- a turn ------------------------------------------------------------------------------------------------

    def _start(self, conv_id, msg, sampling, streaming: bool = False) -> _Turn:
        (turn,) = self._start_all([(conv_id, msg)], sampling, streaming)
        return turn

    def _start_all(self, items, sampling, streaming: bool = False) -> list[_Turn]:
        """Validate every turn (nothing changes if one is bad), then route and call each."""
        _check_sampling(sampling)
        # P/D: a conversation's last reply may still be on its way back to the prefill instance; wait for that
        # here, not under the lock (it takes milliseconds, unless an instance is stuck: then 30 s at most).
        pending = [c.sendback for conv_id, _ in items if (c := self._convs.get(conv_id)) and c.sendback is not None]
        if pending:
            self._ray.wait(pending, num_returns=len(pending), timeout=30)
        with self._lock:
            self._check_open()
            ids = [conv_id for conv_id, _ in items]
            if len(set(ids)) != len(ids):
                raise ValueError("two messages for the same conversation in one call")
            turns = []
            for conv_id, msg in items:
                if not isinstance(conv_id, str) or not conv_id:
                    raise ValueError(f"conv_id must be a non-empty str, got {conv_id!r}")
                conv = self._convs.get(conv_id) or _Conversation()
                if conv.busy:
                    raise ValueError(f"conversation {conv_id!r} already has a turn running")
                check = lambda ids: check_token_ids(ids, self._vocab)  # noqa: E731
                tokens, _ = render_turn(self.tokenizer, conv_id, conv.tokens, conv.messages, msg, check)
                self._check_fits(conv_id, len(tokens), sampling)
                keys = prefix_keys(tokens, self.block_size)
                turns.append(_Turn(conv_id, msg, sampling, tokens, keys))
            for turn in turns:
                conv = self._convs.setdefault(turn.conv_id, _Conversation())
                conv.busy = True
                self._running[turn.conv_id] = turn
                self._dispatch(turn, streaming)
            return turns

    def _dispatch(self, turn: _Turn, streaming: bool = False) -> None:
        """Route the turn and call its instance (under the lock)."""
        turn.attempts += 1
        conv = self._convs.get(turn.conv_id) if turn.conv_id is not None else None
        if conv is not None:
            conv.sendback = None  # (waited for in _start_all)
        self._health()
        now = time.monotonic()
        decoders = sorted(n for n in self.alive if self.roles[n] in DECODERS)
        route = self.router.route(
            turn.keys,
            len(turn.tokens),
            decoders,
            now,
            conv_id=turn.conv_id,
            owner=conv.owner if conv is not None else None,
            owner_tokens=conv.computed if conv is not None else 0,
        )
        turn.instance = name = route.instance
        self.counters[f"routed_{route.reason}"] += 1
        if conv is not None and conv.owner is not None and conv.owner != name:
            self.counters["moved_conversations"] += 1
        # A P/D prefill delivers everything past what the decode instance caches; else the router may move KV.
        # (Never both: with the collective transport every send issued must meet its receive.)
        kv = self._prefill(turn, route)
        if kv is None and route.transfer_from:
            kv = self._move(turn, conv, route)
        handle = self._handles[name]
        self.router.started(name)
        if turn.conv_id is None:
            turn.ref = handle.complete.remote(turn.msg, turn.sampling, kv)
            return
        history = (list(conv.tokens), conv.messages)
        if streaming:
            turn.ref = handle.stream.options(num_returns="streaming").remote(
                turn.conv_id, turn.msg, turn.sampling, history, kv
            )
        else:
            turn.ref = handle.generate.remote(turn.conv_id, turn.msg, turn.sampling, history, kv)

    def _move(self, turn: _Turn, conv: _Conversation | None, route: Route):
        """The router chose to move KV: the holder reads it (its conversation's chunks if it owns this one, else its
        tree's), and the reference goes to the chosen instance with the turn."""
        source = route.transfer_from
        start = route.cached // self.block_size
        if conv is not None and conv.owner == source:
            ref = self._handles[source].read.remote(None, start, turn.conv_id, self._stage)
        else:
            tokens = list(turn.tokens[: route.cached + route.transfer_tokens])
            ref = self._handles[source].read.remote(tokens, start, None, self._stage)
        self.counters["transfers"] += 1
        self.counters["transferred_tokens"] += route.transfer_tokens
        return self._send(source, turn.instance, ref)

    def _send(self, source: str, dest: str, ref):
        """The `kv` argument for `dest`'s call, for KV that `source` read into `ref`: through the object store,
        [ref] (unresolved by Ray: the receiver uses it if it arrives, else recomputes); through the collective
        group, the source sends the bytes (numbered per pair, so send and recv meet in order) and dest gets the
        header's ref to receive them."""
        if self.transport == "object_store":
            return [ref]
        seq = self._seq[(source, dest)]
        self._seq[(source, dest)] += 1
        self._handles[source].send_kv.remote([ref], self._ranks[dest], seq)
        return ("collective", self._ranks[source], seq, [ref])

    def _prefill(self, turn: _Turn, route: Route):
        """P/D: a prefill instance computes tokens[:-1] past what the decode instance caches; -> the payload's
        reference (None when the turn is prefilled where it decodes)."""
        if self.roles[turn.instance] != "decode":
            return None
        prefills = sorted(n for n in self.alive if self.roles[n] == "prefill")
        need = len(turn.tokens) - 1 - route.cached
        if not prefills or need < self.min_prefill_tokens:
            return None
        p = self.router.route(turn.keys, len(turn.tokens), prefills, time.monotonic(), conv_id=turn.conv_id)
        turn.prefill = p.instance
        start = route.cached // self.block_size
        payload, turn.prefilled_ref, turn.evicted_ref = (
            self._handles[p.instance].prefill.options(num_returns=3).remote(list(turn.tokens[:-1]), start, self._stage)
        )
        self.counters["pd_prefills"] += 1
        return self._send(p.instance, turn.instance, payload)

    def _finish(self, turn: _Turn) -> Reply:
        """Wait for the turn's result, update the record and the router; on a dead instance, run it elsewhere."""
        ray = self._ray
        while True:
            try:
                result = ray.get(turn.ref)
                return self._done(turn, result)
            except ray.exceptions.RayActorError:
                self._failed(turn)
            except ray.exceptions.RayTaskError as error:
                self._failed(turn, error)

    def _failed(self, turn: _Turn, error=None) -> None:
        """The turn's call failed: bad input (re-raised as the instance raised it) or a dead instance (the turn
        runs again from the record, elsewhere)."""
        dead = self._find_dead(turn)
        with self._lock:
            self.router.finished(turn.instance)
            if not dead or turn.attempts > len(self._handles):
                self._release(turn)
                if error is not None:
                    raise _cause(error) from None
                raise RuntimeError(f"turn failed: no live instance could serve it (tried {turn.attempts})")
            self.counters["failovers"] += 1
            conv = self._convs.get(turn.conv_id) if turn.conv_id is not None else None
            if conv is not None and conv.owner in dead:
                conv.owner, conv.computed = None, 0
            turn.prefill = turn.prefilled_ref = turn.evicted_ref = None
            self._dispatch(turn)

    def _abort(self, turn: _Turn) -> None:
        """A streamed turn failed: the record stays as before the turn; an instance that died is marked."""
        self._find_dead(turn)
        with self._lock:
            self.router.finished(turn.instance)
            self._release(turn)

    def _release(self, turn: _Turn) -> None:
        """The turn ended without a result: its conversation is idle again, as before it (a new one is forgotten)."""
        if turn.conv_id is None:
            return
        self._running.pop(turn.conv_id, None)
        conv = self._convs.get(turn.conv_id)
        if conv is not None:
            conv.busy = False
            if conv.owner is None and not conv.tokens:
                del self._convs[turn.conv_id]

    def _find_dead(self, turn: _Turn, names: list[str] | None = None) -> list[str]:
        """Of the turn's instances (or `names`), those that do not answer a ping within ping_timeout_s. Each is
        marked: gone for good if its actor died, else not routed to until it answers."""
        if names is None:
            names = [turn.instance] + ([turn.prefill] if turn.prefill else [])
        failed = []
        for name in names:
            try:
                self._ray.get(self._handles[name].ping.remote(), timeout=self.ping_timeout_s)
            except self._ray.exceptions.RayActorError:
                failed.append(name)
                with self._lock:
                    self._dead(name)
            except self._ray.exceptions.GetTimeoutError:
                failed.append(name)
                with self._lock:
                    if name in self.alive:
                        self.alive.discard(name)
                        self.counters["instances_unresponsive"] += 1
                        self._pings.setdefault(name, (self._handles[name].ping.remote(), time.monotonic()))
        return failed

    def _done(self, turn: _Turn, result: dict) -> Reply:
        ray = self._ray
        reply: Reply = result["reply"]
        prefilled, prefill_evicted = 0, []
        if turn.prefilled_ref is not None:
            try:
                prefilled, prefill_evicted = ray.get([turn.prefilled_ref, turn.evicted_ref])
            except ray.exceptions.RayError:  # the prefill failed: the decode instance computed the turn itself
                self._find_dead(turn, [turn.prefill])
                turn.prefill = None
        if prefilled:  # the turn's prefill, wherever it ran
            reply = dataclasses.replace(reply, num_prefilled=reply.num_prefilled + prefilled)
        now = time.monotonic()
        with self._lock:
            name = turn.instance
            self.router.finished(name)
            self.router.evicted(name, result["evicted"])
            self.counters["turns"] += 1
            self.counters["tokens_prefilled"] += reply.num_prefilled
            self.counters["tokens_prefilled_remote"] += prefilled
            self.counters["tokens_new"] += reply.num_new_tokens
            self.counters["tokens_recomputed"] += reply.num_recomputed
            self.counters["tokens_reused"] += reply.num_reused_device + reply.num_reused_host + reply.num_reused_disk
            if turn.prefill is not None:
                self.router.evicted(turn.prefill, prefill_evicted)
                self.router.cached(turn.prefill, turn.keys[: (len(turn.tokens) - 1) // self.block_size], now)
            if turn.conv_id is None:
                computed = len(turn.tokens) + len(reply.token_ids) - 1
                self.router.cached(name, turn.keys[: computed // self.block_size], now)
                return reply
            self._running.pop(turn.conv_id, None)
            conv = self._convs[turn.conv_id]
            old = conv.owner
            conv.tokens, conv.messages = result["tokens"], result["messages"]
            conv.owner, conv.computed, conv.busy = name, result["computed"], False
            held = prefix_keys(conv.tokens, self.block_size, conv.computed // self.block_size)
            self.router.cached(name, held, now)
            if old is not None and old != name and old in self.alive:
                self._handles[old].end.remote(turn.conv_id)  # its chunks stay cached in old's tree
            if self.send_back and turn.prefill is not None and turn.prefill in self.alive:  # the reply's KV goes back
                start = (len(turn.tokens) - 1) // self.block_size
                payload = self._handles[name].read.remote(None, start, turn.conv_id, self._stage)
                conv.sendback = self._handles[turn.prefill].receive.remote(self._send(name, turn.prefill, payload))
                self.router.cached(turn.prefill, held, now)
                self.counters["sendbacks"] += 1
        return reply

    # ---- helpers ----------------------------------------------------------------------------------------------

    def _call(self, name: str, method: str, *args):
        try:
            return self._ray.get(getattr(self._handles[name], method).remote(*args))
        except self._ray.exceptions.RayTaskError as error:
            raise _cause(error) from None

    def _dead(self, name: str) -> None:
        """The instance's actor is gone: never routed to again, and nothing is cached there."""
        if name not in self._gone:
            self._gone.add(name)
            self._pings.pop(name, None)
            self.alive.discard(name)
            self.router.forget(name)
            self.counters["instances_lost"] += 1
            for conv in self._convs.values():
                if conv.owner == name:
                    conv.owner, conv.computed = None, 0

    def _idle(self, conv_id: str) -> _Conversation:
        conv = self._convs.get(conv_id)
        return require_idle(conv_id, conv, conv is not None and conv.busy)

    def _check_fits(self, conv_id: str | None, num_tokens: int, sampling: SamplingParams | None) -> None:
        """The model's positions bound a turn (as on an instance, before any instance is involved)."""
        total = num_tokens + (sampling.max_new_tokens or 0 if sampling is not None else 0)
        if total > self._max_positions:
            what = "a completion" if conv_id is None else f"conversation {conv_id!r}"
            raise ValueError(
                f"{what} would reach {total} tokens ({num_tokens} + max_new_tokens), "
                f"over the model's {self._max_positions} positions"
            )

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this Cluster is closed")


class ClusterStream(Iterator):
    """The pieces of a streamed turn (`ReplyStream`'s, from the instance's deltas); `.reply` waits for the turn."""

    def __init__(self, cluster: Cluster, turn: _Turn, token_ids: bool) -> None:
        self._cluster = cluster
        self._turn = turn
        self._token_ids = token_ids
        self._reply: Reply | None = None

    def __next__(self):
        return next_piece(self.deltas(), self._token_ids)

    def deltas(self) -> Iterator[Delta]:
        return iter(self._next_delta, None)

    def _next_delta(self) -> Delta | None:
        if self._reply is not None:
            return None
        ray = self._cluster._ray
        try:
            item = ray.get(next(self._turn.ref))
        except ray.exceptions.RayError as error:  # a stream is not re-run elsewhere: its pieces were handed out
            self._cluster._abort(self._turn)
            raise _cause(error) from None
        if isinstance(item, dict):
            self._reply = self._cluster._done(self._turn, item)
            return None
        return item

    @property
    def reply(self) -> Reply:
        for _ in self.deltas():
            pass
        return self._reply


def _no_tools(tools) -> None:
    if tools is not None:
        raise ValueError("a Cluster runs turns without tools; tools run on a StatefulGenerator")


def _check_sampling(sampling) -> None:
    if sampling is not None and not isinstance(sampling, SamplingParams):
        raise ValueError(f"sampling must be a SamplingParams, got {type(sampling).__name__}")
    if sampling is not None and sampling.n > 1:
        raise ValueError("a Cluster serves one candidate a turn (n=1); n > 1 runs on a StatefulGenerator")


def _cause(error):
    """The exception an instance raised (Ray wraps it)."""
    cause = getattr(error, "cause", None)
    return cause if isinstance(cause, BaseException) else error
