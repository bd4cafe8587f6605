"""One instance of a cluster: a `StatefulGenerator` and its `MemPool`, built where it runs (a Ray actor).

Its methods are what the driver calls (pensieve/cluster/cluster.py). The actor is threaded: concurrent turns on
different conversations arrive on different threads and the generator batches them into the same forwards, as it
does for threads in one process (pensieve/generator.py). A turn's call carries the driver's record of the
conversation (its tokens, and messages in text mode), so any instance can serve any turn: one that holds the
conversation finds the same tokens and changes nothing; another adopts it and computes what its caches lack.
"""

from __future__ import annotations

import dataclasses
import threading
import uuid
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from pensieve.cluster.mempool import KVPayload, MemPool, MemPoolFull
from pensieve.config import CacheConfig, EngineConfig, SamplingParams, SchedulerConfig
from pensieve.generator import StatefulGenerator
from pensieve.models.support import model_shape

ROLES = ("colocated", "prefill", "decode")


@dataclass(frozen=True)
class InstanceSpec:
    """How to build an instance where it runs. `model`: a picklable callable returning the model (a module-level
    function, or functools.partial of one), or a model path / hub id for `AutoModelForCausalLM.from_pretrained`."""

    name: str
    role: str
    model: Callable | str
    tokenizer: object = None
    cache_config: CacheConfig | None = None
    scheduler_config: SchedulerConfig | None = None
    engine_config: EngineConfig | None = None
    num_threads: int | None = None  # torch threads in the instance's process


def load_model(model: Callable | str):
    if callable(model):
        return model()
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model).eval()


class Instance:
    def __init__(self, spec: InstanceSpec) -> None:
        if spec.role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {spec.role!r}")
        if spec.num_threads is not None:
            torch.set_num_threads(spec.num_threads)
        self.name, self.role = spec.name, spec.role
        model = load_model(spec.model)
        self.gen = StatefulGenerator(
            model,
            spec.tokenizer,
            spec.cache_config,
            scheduler_config=spec.scheduler_config,
            engine_config=spec.engine_config,
        )
        self.pool = MemPool(self.gen)
        self._kv = self.gen.engine.kv
        self._kv.tree.track_removals()  # eviction reports: keys the tree dropped since the last reply
        self.transfers_failed = 0  # KV sent for a turn that could not be used (recomputed instead)
        self._staged: dict[str, torch.Tensor] = {}  # collective transport: data read, waiting for send_kv
        self._sent: dict[int, int] = defaultdict(int)  # transfers done per peer rank (send_kv / _recv_kv order)
        self._received: dict[int, int] = defaultdict(int)
        self._order = threading.Condition()
        self._group: str | None = None
        self._wire_device = torch.device("cpu")

    def info(self) -> dict:
        shape = model_shape(self.gen.engine.model)
        storage = self._kv.storage
        return {
            "name": self.name,
            "role": self.role,
            "block_size": self._kv.block_size,
            "vocab_size": shape.vocab_size,
            "max_positions": shape.max_positions,
            "bytes_per_token": storage.bytes_per_block // self._kv.block_size,
            "device_blocks": self._kv.device.num_blocks,
            "device": str(storage.device),
            "gpu_uuid": str(torch.cuda.get_device_properties(storage.device).uuid)
            if storage.device.type == "cuda"
            else None,
            "nccl": _nccl_available(),
        }

    def ping(self) -> str:
        return self.name

    # ---- turns --------------------------------------------------------------------------------------------

    def generate(self, conv_id: str, msg, sampling: SamplingParams | None, history, kv: KVPayload | None) -> dict:
        """One turn on conv_id, whose history is the driver's `history` = (tokens, messages); `kv`: KV a prefill
        instance computed for the turn, inserted first."""
        self._prepare(conv_id, history, kv)
        reply = self.gen.generate(conv_id, msg, sampling)
        return self._result(reply, conv_id)

    def stream(self, conv_id: str, msg, sampling: SamplingParams | None, history, kv: KVPayload | None):
        """`generate`, yielding each token's `Delta` as it comes, then the turn's result (a dict)."""
        self._prepare(conv_id, history, kv)
        stream = self.gen.stream(conv_id, msg, sampling)
        for delta in stream.deltas():  # noqa: UP028  (not `yield from`: Ray drives the generator with send())
            yield delta
        yield self._result(stream.reply, conv_id)

    def abort(self, conv_id: str) -> bool:
        """Abort conv_id's running turn here (`StatefulGenerator.abort`): its stream ends with TurnAborted."""
        return self.gen.abort(conv_id)

    def stop(self, conv_id: str) -> bool:
        """Cut conv_id's running turn here short, keeping it (`StatefulGenerator.stop`)."""
        return self.gen.stop(conv_id)

    def truncate(self, conv_id: str, num_tokens: int) -> None:
        self.gen.truncate(conv_id, num_tokens)

    def complete(self, prompt, sampling: SamplingParams | None, kv: KVPayload | None) -> dict:
        if kv is not None:
            self._receive(kv)
        return self._result(self.gen.complete(prompt, sampling), None)

    def prefill(self, tokens: list[int], start: int, stage: bool = False) -> tuple[KVPayload | None, int, list]:
        """P/D: compute KV for tokens (attending to what this instance caches; they stay cached here) and return it
        from block `start` on for the decode instance, with the tokens prefilled here and the eviction report. (The
        driver calls it with num_returns=3, and hands the payload's reference straight to the decode instance.)"""
        reply = self.gen.complete(list(tokens), SamplingParams(max_new_tokens=1, temperature=0.0, ignore_eos=True))
        return self.read(list(tokens), start, stage=stage), reply.num_prefilled, self._evicted()

    def _prepare(self, conv_id: str, history, kv: KVPayload | None) -> None:
        if kv is not None:
            self._receive(kv)
        if history is not None:
            tokens, messages = history

            def sync():
                conv = self._kv.lookup(conv_id)
                if conv is None or conv.tokens != tokens or conv.messages != messages:
                    self.gen.engine.adopt(conv_id, tokens, messages)

            self.gen.call(sync)

    # ---- the collective transport (ray.util.collective: NCCL between GPUs, gloo between CPUs) -------------------

    def join_group(self, world_size: int, rank: int, backend: str, group: str) -> int:
        """Join the cluster's collective group (every instance, one rank each)."""
        import ray.util.collective as collective

        collective.init_collective_group(world_size, rank, backend=backend, group_name=group)
        self._group, self._rank = group, rank
        # NCCL moves device tensors; gloo moves CPU tensors (on a GPU without NCCL, KV is staged through the host)
        self._wire_device = self._kv.storage.device if backend == "nccl" else torch.device("cpu")
        return rank

    def _in_order(self, table: dict, peer: int, seq: int):
        """Wait until `seq` is the next transfer with `peer` in `table` (sends or receives): the driver numbers the
        transfers of each (sender, receiver) pair, and both sides run them in that order, so every send meets its
        own recv (collective point-to-point has no tags)."""
        with self._order:
            self._order.wait_for(lambda: table[peer] == seq)

    def _next(self, table: dict, peer: int) -> None:
        with self._order:
            table[peer] += 1
            self._order.notify_all()

    def send_kv(self, header, dst: int, seq: int) -> None:
        """The sending side: `header` ([ObjectRef] of a staged payload from read/prefill with stage=True, resolved
        here so a failed read still takes its turn) -> its bytes to rank dst."""
        import ray
        import ray.util.collective as collective

        self._in_order(self._sent, dst, seq)
        try:
            try:
                payload = ray.get(header[0])
            except ray.exceptions.RayError:
                payload = None
            data = self._staged.pop(payload.staged, None) if payload is not None else None
            if data is not None:
                collective.send(data, dst, self._group)
        finally:
            self._next(self._sent, dst)

    def _recv_kv(self, src: int, seq: int, header) -> KVPayload | None:
        """The receiving side, in the pair's order: the header, then its bytes into a tensor on this device."""
        import ray
        import ray.util.collective as collective

        self._in_order(self._received, src, seq)
        try:
            try:
                payload = ray.get(header[0])
            except ray.exceptions.RayError:
                return None
            if payload is None:
                return None
            data = torch.empty(payload.nbytes, dtype=torch.uint8, device=self._wire_device)
            collective.recv(data, src, self._group)
            return dataclasses.replace(payload, data=data, staged=None)
        finally:
            self._next(self._received, src)

    def _stage(self, payload: KVPayload | None) -> KVPayload | None:
        """Keep a payload's data here for send_kv; -> its header."""
        if payload is None:
            return None
        header = dataclasses.replace(payload, data=None, staged=uuid.uuid4().hex)
        self._staged[header.staged] = payload.data
        return header

    def _receive(self, kv) -> int:
        """Insert KV sent for a turn: a KVPayload, [ObjectRef] of one (left unresolved by Ray so that a transfer
        that failed — its sender died, or had nothing — costs a recompute here instead of failing the turn), or
        ("collective", src rank, seq, [ObjectRef] of the header) for bytes sent by send_kv."""
        if isinstance(kv, tuple) and kv and kv[0] == "collective":
            kv = self._recv_kv(*kv[1:])
            if kv is None:
                self.transfers_failed += 1
                return 0
        if isinstance(kv, list):
            import ray

            try:
                kv = ray.get(kv[0])
            except ray.exceptions.RayError:
                self.transfers_failed += 1
                return 0
        if kv is None:
            return 0
        try:
            return self.pool.receive(kv)
        except MemPoolFull:  # no room here: the turn computes it instead
            self.transfers_failed += 1
            return 0

    def _result(self, reply, conv_id: str | None) -> dict:
        def state():
            conv = self._kv.conversations.get(conv_id) if conv_id is not None else None
            if conv is None:
                return None, None, 0
            return list(conv.tokens), conv.messages and [dict(m) for m in conv.messages], conv.num_computed

        tokens, messages, computed = self.gen.call(state)
        return {
            "reply": reply,
            "tokens": tokens,
            "messages": messages,
            "computed": computed,
            "evicted": self._evicted(),
        }

    def _evicted(self) -> list[bytes]:
        return self.gen.call(self._kv.tree.take_removals)

    # ---- MemPool and conversations ---------------------------------------------------------------------------

    def read(self, tokens=None, start: int = 0, conv_id: str | None = None, stage: bool = False) -> KVPayload | None:
        """The KV for a transfer; stage=True keeps the data here for send_kv and returns the header."""
        if not stage:
            return self.pool.read(tokens, start, conv_id)
        return self._stage(self.pool.read(tokens, start, conv_id, device=self._wire_device))

    def receive(self, payload) -> int:
        """Insert a payload (or [ObjectRef] of one; None: nothing was sent); a failed or refused transfer is not an
        error here (the KV is recomputed where it is needed). -> chunks inserted."""
        return self._receive(payload)

    def match(self, tokens) -> int:
        return self.pool.match(tokens).num_tokens

    def fork(self, conv_id: str, new_conv_id: str) -> None:
        self.gen.fork(conv_id, new_conv_id)

    def end(self, conv_id: str, forget: bool = False) -> None:
        if conv_id in self.gen.conversations():
            self.gen.end(conv_id, forget)

    def stats(self) -> dict:
        return {**self.gen.stats(), "transfers_failed": self.transfers_failed}

    def check_integrity(self) -> None:
        self.gen.check_integrity()

    def close(self) -> None:
        self.gen.close()


def _nccl_available() -> bool:
    try:
        import ray.util.collective as collective

        return bool(collective.nccl_available())
    except ImportError:
        return False
