"""Which chunks leave a tier first.

Pensieve's policy (EuroSys'25 §4.3): the retention value of a chunk is the cost to recompute it divided by the
time since its conversation was last active; the lowest value goes first. Recompute cost grows with the context a
chunk attends to, so within one conversation the leading chunk is always the cheapest: evicting in value order
takes every conversation's chunks from its leading end, which is what keeps the per-conversation tier order
`[dropped][disk][host][device]`.

The cost is analytic (documented in docs/architecture.md): recomputing the token at position p costs
`2 * P` FLOPs for the weights (P = parameters outside the input/output embeddings: recomputed rows need no
logits) plus `4 * L * Hq * D * p` for attention over
the p positions before it (QK^T and PV, a multiply-add each). Only ratios between chunks matter.

The LRU policy, for comparison, evicts whole conversations, least recently active first (what a prefix cache
with whole-sequence LRU does).
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from pensieve.cache.tiers import leading_chunk

MIN_IDLE_S = 1e-3  # a conversation that was active this instant is not infinitely valuable, just very


@dataclass(frozen=True)
class RecomputeCost:
    flops_per_token: float  # 2 * parameters outside the embeddings
    flops_per_context_position: float  # 4 * num_layers * num_heads * head_dim

    def chunk(self, start: int, num_tokens: int) -> float:
        """FLOPs to recompute positions [start, start + num_tokens)."""
        positions = num_tokens * start + num_tokens * (num_tokens - 1) / 2
        return num_tokens * self.flops_per_token + positions * self.flops_per_context_position

    @staticmethod
    def for_model(model, num_layers: int, num_heads: int, head_dim: int) -> RecomputeCost:
        # Recomputed rows need no logits: the input and output embeddings cost nothing.
        skip = [m for m in model.modules() if isinstance(m, torch.nn.Embedding)] + [model.get_output_embeddings()]
        skipped = {id(p) for m in skip if m is not None for p in m.parameters()}
        weights = sum(p.numel() for p in model.parameters() if id(p) not in skipped)
        return RecomputeCost(2.0 * weights, 4.0 * num_layers * num_heads * head_dim)


# A candidate the policy may move: (conversation, chunk index). The caller moves it out of the tier before asking for
# the next one; the policy re-reads the conversation each time, so anything moved meanwhile is skipped.
Candidate = tuple[object, int]


class PensievePolicy:
    name = "pensieve"
    whole_conversation = False

    def __init__(self, cost: RecomputeCost, block_size: int) -> None:
        self.cost = cost
        self.block_size = block_size

    def value(self, conv, index: int, now: float) -> float:
        start = index * self.block_size
        num_tokens = max(min(self.block_size, conv.num_computed - start), 1)
        return self.cost.chunk(start, num_tokens) / max(now - conv.last_active, MIN_IDLE_S)

    def order(self, convs: list, tier, now: float) -> Iterator[Candidate]:
        """Chunks in `tier` of `convs`, lowest retention value first (lazily: the caller mutates as it goes)."""
        tie = itertools.count()
        heap = []
        for conv in convs:
            first = leading_chunk(conv.chunks, tier)
            if first is not None:
                heap.append((self.value(conv, first, now), next(tie), conv, first))
        heapq.heapify(heap)
        while heap:
            _, _, conv, index = heapq.heappop(heap)
            if index >= len(conv.chunks) or conv.chunks[index].tier != tier:
                index = leading_chunk(conv.chunks, tier)  # moved meanwhile (e.g. dropped with an earlier chunk)
                if index is None:
                    continue
            yield conv, index
            following = leading_chunk(conv.chunks, tier)
            if following is not None:
                heapq.heappush(heap, (self.value(conv, following, now), next(tie), conv, following))


class LRUPolicy:
    name = "lru"
    whole_conversation = True

    def order(self, convs: list, tier, now: float) -> Iterator[Candidate]:
        for conv in sorted(convs, key=lambda c: c.last_active):
            while (index := leading_chunk(conv.chunks, tier)) is not None:
                yield conv, index


def make_policy(name: str, cost: RecomputeCost, block_size: int) -> PensievePolicy | LRUPolicy:
    return LRUPolicy() if name == "lru" else PensievePolicy(cost, block_size)
