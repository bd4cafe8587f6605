"""A cluster's Ray side (DESIGN §8): start or join the Ray runtime, place one instance actor per role with its share
of CPUs, GPUs and threads, and join them into a collective group when KV moves device to device."""

from __future__ import annotations

import math
import os
import uuid
from dataclasses import dataclass

from pensieve.cluster.instance import Instance, InstanceSpec
from pensieve.config import CacheConfig, EngineConfig, SchedulerConfig


def ray_module():
    try:
        import ray
    except ImportError as error:  # pragma: no cover - the extra is part of the dev set
        raise ImportError("pensieve.cluster needs Ray: pip install 'pensieve[cluster]'") from error
    return ray


def start(address: str | None, object_store_memory: int | None) -> bool:
    """Make sure a Ray runtime is up: None starts a local one sized for this machine (unless this process has one);
    an address ("auto") joins a running cluster. -> whether this call started it (and so should shut it down)."""
    ray = ray_module()
    if ray.is_initialized():
        return False
    if address is None:
        memory = object_store_memory or 512 * 2**20
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, object_store_memory=memory, log_to_driver=True)
    else:
        ray.init(address=address)
    return True


@dataclass(frozen=True)
class Placement:
    """What each instance actor gets."""

    num_cpus: float  # Ray CPUs per instance
    num_gpus: float  # Ray GPUs per instance (0: none)
    num_threads: int  # torch threads per instance


def placement(num_instances: int, num_cpus: float | None, num_gpus: float | None, num_threads: int | None) -> Placement:
    """The free CPUs and GPUs shared evenly where not given (0 CPUs when another cluster holds them all: instances of
    two clusters then share cores rather than wait forever for Ray to place them); threads: the cluster's CPUs shared
    evenly, >= 1."""
    ray = ray_module()
    free = ray.available_resources()
    cpus = num_cpus if num_cpus is not None else math.floor(free.get("CPU", 0.0) / num_instances * 100) / 100
    gpus = num_gpus if num_gpus is not None else math.floor(free.get("GPU", 0.0) / num_instances * 100) / 100
    total = ray.cluster_resources().get("CPU", os.cpu_count() or 1)
    threads = num_threads if num_threads is not None else max(1, int(total // num_instances))
    return Placement(cpus, gpus, threads)


def place(
    roles: list[str],
    model,
    tokenizer,
    cache_config: CacheConfig,
    scheduler_config: SchedulerConfig | None,
    engine_config: EngineConfig | None,
    where: Placement,
) -> dict[str, object]:
    """One Instance actor per role, named "<role>-<i>" -> name -> actor handle (in role order)."""
    ray = ray_module()
    actor = ray.remote(Instance)
    seqs = (scheduler_config or SchedulerConfig()).max_num_seqs
    handles = {}
    for i, role in enumerate(roles):
        name = f"{role}-{i}"
        spec = InstanceSpec(
            name, role, model, tokenizer, cache_config, scheduler_config, engine_config, where.num_threads
        )
        options = dict(num_cpus=where.num_cpus, max_concurrency=seqs + 8)
        if where.num_gpus:
            options["num_gpus"] = where.num_gpus
        handles[name] = actor.options(**options).remote(spec)
    return handles


def join_collective(handles: dict[str, object], ranks: dict[str, int], infos: list[dict]) -> str:
    """Join the instances into one ray.util.collective group -> its backend. NCCL needs every rank on a GPU of its
    own (two ranks of one communicator on one device: invalid usage, seen on an H100 shared by two instances);
    otherwise gloo, staged through the host."""
    ray = ray_module()
    uuids = [i["gpu_uuid"] for i in infos]
    own_gpus = None not in uuids and len(set(uuids)) == len(uuids)
    backend = "nccl" if own_gpus and all(i["nccl"] for i in infos) else "gloo"
    group = f"pensieve-{uuid.uuid4().hex[:12]}"
    ray.get([h.join_group.remote(len(handles), ranks[name], backend, group) for name, h in handles.items()])
    return backend
