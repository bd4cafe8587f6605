"""A pool of fixed-size KV blocks, named by integer id. Bookkeeping only: the tensors live with the runner.

`allocate(n)` returns None when n blocks cannot fit now (the caller evicts and asks again); freeing a block
that is not allocated is a bug and raises. Free blocks are handed out lowest id first, so tests can assert
exact ids and the device tier stays compact.
"""

from __future__ import annotations

import heapq


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 0:
            raise ValueError(f"num_blocks must be >= 0, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free: list[int] = list(range(num_blocks))  # a heap: lowest id first
        self._allocated: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_allocated(self) -> int:
        return len(self._allocated)

    @property
    def allocated(self) -> frozenset[int]:
        return frozenset(self._allocated)

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def allocate(self, n: int) -> list[int] | None:
        """n block ids, or None (and nothing taken) when fewer than n are free."""
        if n < 0:
            raise ValueError(f"cannot allocate {n} blocks")
        if n > len(self._free):
            return None
        ids = [heapq.heappop(self._free) for _ in range(n)]
        self._allocated.update(ids)
        return ids

    def free(self, ids: list[int]) -> None:
        stray = [i for i in ids if i not in self._allocated]
        if stray or len(set(ids)) != len(ids):
            raise RuntimeError(f"freeing blocks that are not allocated (or twice): {sorted(stray) or ids}")
        for i in ids:
            self._allocated.remove(i)
            heapq.heappush(self._free, i)

    def check_integrity(self) -> None:
        free = set(self._free)
        assert len(free) == len(self._free), "a block is on the free list twice"
        assert not (free & self._allocated), f"blocks both free and allocated: {sorted(free & self._allocated)}"
        assert free | self._allocated == set(range(self.num_blocks)), "used + free != capacity"
