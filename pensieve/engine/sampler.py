"""Sampling a step's logits, all rows at once, on the logits' device.

Greedy rows take the argmax. Sampled rows are filtered together (temperature, top-k, top-p as per-row tensors) and
drawn with the exponential race (argmax of probs / q, q ~ Exp(1) i.i.d.; what vLLM does): the only per-row work is
filling q from the turn's own generator when it has a seed, so a seeded turn draws the same tokens alone or in any
batch. One host sync per step: the chosen ids.
"""

from __future__ import annotations

import torch

from pensieve.engine.turn import Turn


def filter_logits(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor):
    """logits [S, V], temperature [S] (> 0), top_k [S] (0 = off), top_p [S] (1 = off) -> scaled logits [S, V] with
    the filtered entries at -inf. top-k keeps the k largest (ties with the k-th kept); top-p keeps the smallest
    prefix of the sorted probabilities whose sum reaches p."""
    logits = logits / temperature[:, None]
    vocab = logits.shape[-1]
    k = torch.where((top_k > 0) & (top_k < vocab), top_k, vocab)
    if bool((k < vocab).any()):
        kth = torch.topk(logits, int(k.max()), dim=-1).values.gather(1, (k - 1)[:, None])  # [S, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if bool((top_p < 1).any()):
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p[:, None]  # the mass before an entry already reaches p
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return logits


def sample(logits: torch.Tensor, turns: list[Turn]) -> list[int]:
    """logits [S, V] (row i belongs to turns[i]) -> one token id per row."""
    logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    tokens = logits.argmax(dim=-1)  # [S]
    rows = [i for i, turn in enumerate(turns) if turn.sampling.temperature > 0]
    if rows:
        params = [turns[i].sampling for i in rows]
        dev = logits.device
        filtered = filter_logits(
            logits[rows],
            torch.tensor([p.temperature for p in params], dtype=logits.dtype, device=dev),
            torch.tensor([p.top_k for p in params], device=dev),
            torch.tensor([p.top_p for p in params], dtype=logits.dtype, device=dev),
        )
        probs = filtered.softmax(-1)
        race = torch.empty_like(probs).exponential_()  # unseeded rows: one draw from the default generator
        for j, i in enumerate(rows):
            if turns[i].generator is not None:  # seeded rows: their own stream, whatever shares the batch
                race[j].exponential_(generator=turns[i].generator)
        tokens[rows] = probs.div_(race).argmax(dim=-1)
    return tokens.tolist()
