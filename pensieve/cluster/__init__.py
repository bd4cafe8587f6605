"""Scale-out (MemServe on Ray, DESIGN §8): `Cluster` serves StatefulGenerator's API over N instances; `MemPool` is
each instance's memory/index/transfer API; the router is pure. Ray is imported only when a Cluster starts
(`pip install 'pensieve[cluster]'`)."""

from pensieve.cluster.cluster import Cluster, ClusterStream
from pensieve.cluster.mempool import KVPayload, MemPool, MemPoolFull, PrefixMatch
from pensieve.cluster.router import Route, Router, RouterConfig

__all__ = [
    "Cluster",
    "ClusterStream",
    "KVPayload",
    "MemPool",
    "MemPoolFull",
    "PrefixMatch",
    "Route",
    "Router",
    "RouterConfig",
]
