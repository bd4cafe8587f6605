"""Which chunks leave a tier first.

Pensieve's policy (EuroSys'25 §4.3), extended to shared chunks. The retention value of a chunk is the cost to
recompute it times how active the conversations that need it are:

    value(chunk) = cost(chunk) * sum over the conversations holding it of 1 / idle(conversation)

with idle(c) = seconds since c was last active (at least MIN_IDLE_S). A chunk only the prompt tree holds (a
conversation ended, or a stateless `complete()` left it) counts as one holder idle since it was let go of. The
lowest value leaves first. For a chunk one conversation holds this is exactly Pensieve's cost / idle time; a system
prompt held by a hundred conversations is worth the sum of their activity, so it is the last thing to leave the
device. Recompute cost grows with the context a chunk attends to, so among one conversation's private chunks the
leading one is always the cheapest: they still leave from the leading end.

The cost is analytic (documented in docs/architecture.md): recomputing the token at position p costs
`2 * P` FLOPs for the weights (P = parameters outside the input/output embeddings: recomputed rows need no
logits) plus `4 * L * Hq * D * p` for attention over the p positions before it (QK^T and PV, a multiply-add
each). Only ratios between chunks matter.

The LRU policy, for comparison, evicts by recency alone (the most recent activity of any holder), leading chunks
first, and once it starts on a conversation's chunks moves all chunks of that recency (whole conversations, what
a prefix cache with whole-sequence LRU does).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

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


# A candidate the policy may move: (chunk, the conversations holding it). The caller re-checks each chunk's tier
# before moving it (a cascade may have moved it meanwhile).
Candidate = tuple[object, list]


def _idle(now: float, since: float) -> float:
    return max(now - since, MIN_IDLE_S)


class PensievePolicy:
    name = "pensieve"

    def __init__(self, cost: RecomputeCost, block_size: int) -> None:
        self.cost = cost
        self.block_size = block_size

    def value(self, chunk, holders: list, now: float) -> float:
        start = chunk.index * self.block_size
        num_tokens = self.block_size
        if len(holders) == 1:  # a conversation's last chunk may be partial (only its own chunks are)
            num_tokens = max(min(self.block_size, holders[0].num_computed - start), 1)
        if holders:
            activity = sum(1.0 / _idle(now, conv.last_active) for conv in holders)
        else:
            activity = 1.0 / _idle(now, chunk.last_used)
        return self.cost.chunk(start, num_tokens) * activity

    def order(self, candidates: list[Candidate], block_size: int, now: float) -> Iterator[Candidate]:
        """Lowest retention value first (ties: the earlier position, then the order given)."""
        keyed = [(self.value(chunk, holders, now), chunk.index, i) for i, (chunk, holders) in enumerate(candidates)]
        for _, _, i in sorted(keyed):
            yield candidates[i]

    def continues(self, last: Candidate | None, chunk, holders: list) -> bool:
        """Keep moving once enough room is made? Never: Pensieve moves chunk by chunk."""
        return False


class LRUPolicy:
    name = "lru"

    @staticmethod
    def recency(chunk, holders: list) -> float:
        return max((conv.last_active for conv in holders), default=chunk.last_used)

    def order(self, candidates: list[Candidate], block_size: int, now: float) -> Iterator[Candidate]:
        keyed = [(self.recency(chunk, holders), chunk.index, i) for i, (chunk, holders) in enumerate(candidates)]
        for _, _, i in sorted(keyed):
            yield candidates[i]

    def continues(self, last: Candidate | None, chunk, holders: list) -> bool:
        """Whole conversations: keep moving the chunks as recent as the last one moved."""
        return last is not None and self.recency(*last) == self.recency(chunk, holders)


def make_policy(name: str, cost: RecomputeCost, block_size: int) -> PensievePolicy | LRUPolicy:
    return LRUPolicy() if name == "lru" else PensievePolicy(cost, block_size)
