"""Sampling from the rows of a step's logits, one turn per row.

Greedy rows take the argmax. Sampled rows apply temperature, top-k, top-p, then draw with the turn's own
torch.Generator when it has a seed, so a seeded turn's tokens do not depend on what else is in the batch.
"""

from __future__ import annotations

import torch

from pensieve.engine.turn import Turn


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """logits [V] -> scaled logits [V] with filtered entries at -inf."""
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= top_p  # keep the smallest prefix reaching top_p
        logits = logits.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    return logits


def sample(logits: torch.Tensor, turns: list[Turn]) -> list[int]:
    """logits [S, V] (row i belongs to turns[i]) -> one token id per row."""
    logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    greedy = logits.argmax(dim=-1).tolist()
    tokens = []
    for i, turn in enumerate(turns):
        params = turn.sampling
        if params.temperature == 0:
            tokens.append(greedy[i])
            continue
        probs = filter_logits(logits[i], params.temperature, params.top_k, params.top_p).softmax(-1)
        tokens.append(int(torch.multinomial(probs.cpu(), 1, generator=turn.generator)))
    return tokens
