"""Sampling a step's logits, all rows at once, on the logits' device.

Rows with a grammar (`StructuredOutput`) are masked first: tokens that cannot continue their reply get -inf.
Rows whose sampling changes the logits (logit_bias, repetition / presence / frequency penalties) are processed
together first, from per-turn token statistics (`Penalties`, kept on the turn and updated as tokens are sampled).
Greedy rows then take the argmax. Sampled rows are filtered together (temperature, min-p, top-k, top-p as per-row
tensors) and drawn by inverse CDF (`draw`: one uniform number a row against the cumulative probabilities, which
need no sort): the only per-row work is drawing that number from the turn's own generator when it has a seed, so a
seeded turn draws the same tokens alone or in any batch. Rows that asked for logprobs get them from the raw logits
(before any processing). One host sync per step: the chosen ids (and the logprobs, when asked for).
"""

from __future__ import annotations

import torch

from pensieve.engine.turn import TokenLogprob, Turn


class Penalties:
    """A turn's token statistics for the penalties, [vocab] tensors on the logits' device: how often each token
    occurs in the reply so far (presence / frequency), and which occur anywhere in the conversation, history and
    reply (repetition: the whole conversation is its prompt)."""

    def __init__(self, conversation: list[int], vocab: int, device: torch.device) -> None:
        self.counts = torch.zeros(vocab, dtype=torch.float32, device=device)
        self.seen = torch.zeros(vocab, dtype=torch.bool, device=device)
        if conversation:
            self.seen[torch.tensor(conversation, device=device)] = True

    def add(self, token: int) -> None:
        self.counts[token] += 1
        self.seen[token] = True


def penalize(logits: torch.Tensor, turns: list[Turn]) -> torch.Tensor:
    """logits [P, V] of turns that penalize -> logits after logit_bias, repetition, presence and frequency
    penalties (in that order, vLLM's), each row by its own turn's parameters."""
    vocab, dev = logits.shape[-1], logits.device
    for turn in turns:
        if turn.penalties is None:
            turn.penalties = Penalties(turn.conv.tokens, vocab, dev)
    params = [t.sampling for t in turns]
    bias = [(row, token, value) for row, p in enumerate(params) for token, value in p.logit_bias]
    if bias:
        rows, tokens, values = zip(*bias, strict=True)
        index = (torch.tensor(rows, device=dev), torch.tensor(tokens, device=dev))
        logits = logits.index_put(index, torch.tensor(values, dtype=logits.dtype, device=dev), accumulate=True)
    if any(p.repetition_penalty != 1 for p in params):
        rep = torch.tensor([p.repetition_penalty for p in params], dtype=logits.dtype, device=dev)[:, None]
        seen = torch.stack([t.penalties.seen for t in turns])
        logits = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
    if any(p.presence_penalty or p.frequency_penalty for p in params):
        counts = torch.stack([t.penalties.counts for t in turns]).to(logits.dtype)
        presence = torch.tensor([p.presence_penalty for p in params], dtype=logits.dtype, device=dev)[:, None]
        frequency = torch.tensor([p.frequency_penalty for p in params], dtype=logits.dtype, device=dev)[:, None]
        logits = logits - frequency * counts - presence * (counts > 0).to(logits.dtype)
    return logits


def filter_logits(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor | None = None,
):
    """logits [S, V], temperature [S] (> 0), top_k [S] (0 = off), top_p [S] (1 = off), min_p [S] (0 = off) ->
    scaled logits [S, V] with the filtered entries at -inf, in vLLM's order: temperature, then min-p (drops what is
    less likely than min_p times the most likely token), top-k (keeps the k largest, ties with the k-th kept), then
    top-p (keeps the smallest prefix of the sorted probabilities whose sum reaches p)."""
    logits = logits / temperature[:, None]
    vocab = logits.shape[-1]
    if min_p is not None and bool((min_p > 0).any()):
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < probs.amax(-1, keepdim=True) * min_p[:, None], float("-inf"))
    k = torch.where((top_k > 0) & (top_k < vocab), top_k, vocab)
    if bool((k < vocab).any()):
        kth = torch.topk(logits, int(k.max()), dim=-1).values.gather(1, (k - 1)[:, None])  # [S, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if bool((top_p < 1).any()):
        logits = logits.masked_fill(_top_p_drop(logits, top_p), float("-inf"))
    return logits


TOP_P_CANDIDATES = 1024  # top-p looks at this many most likely tokens first (a full sort only if they hold < p)


def _top_p_drop(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """[S, V] True where top-p drops an entry: in descending order, those whose preceding mass already reaches p.
    A full sort of a 49k vocabulary costs ~2 ms a row on a CPU; the kept prefix almost always lies within the top
    few hundred tokens, so those are found with topk first, and only a row whose candidates hold less than p is
    sorted whole. The same entries either way (ties at the boundary are ordered as the sort orders them)."""
    vocab = logits.shape[-1]
    k = min(vocab, TOP_P_CANDIDATES)
    probs = logits.softmax(-1)
    top, order = probs.topk(k, dim=-1)  # descending
    cum = top.cumsum(-1)
    drop = torch.ones_like(probs, dtype=torch.bool).scatter(1, order, cum - top >= top_p[:, None])
    drop &= (top_p < 1)[:, None]  # a row with top-p off keeps everything (rounding may sum its mass to >= 1 early)
    short = ((cum[:, -1] < top_p) & (top_p < 1)).nonzero()[:, 0].tolist() if k < vocab else []
    if short:  # the candidates hold less than p: the boundary lies beyond them
        sorted_probs, full_order = probs[short].sort(dim=-1, descending=True)
        beyond = sorted_probs.cumsum(-1) - sorted_probs >= top_p[short, None]
        drop[short] = beyond.scatter(1, full_order, beyond)
    return drop


def sample(logits: torch.Tensor, turns: list[Turn]) -> tuple[list[int], list[TokenLogprob | None]]:
    """logits [S, V] (row i belongs to turns[i]) -> one token id per row, and its logprob where asked for."""
    logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    raw = logits
    constrained = [i for i, turn in enumerate(turns) if turn.grammar is not None]
    if constrained:
        logits = logits.clone()
        states = [turns[i].grammar for i in constrained]
        states[0].grammars.mask(logits, constrained, states)
    penalized = [i for i, turn in enumerate(turns) if turn.sampling.penalized]
    if penalized:
        logits = logits if constrained else logits.clone()
        logits[penalized] = penalize(logits[penalized], [turns[i] for i in penalized])
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
            torch.tensor([p.min_p for p in params], dtype=logits.dtype, device=dev),
        )
        tokens[rows] = draw(filtered.softmax(-1), [turns[i].generator for i in rows])
    chosen = tokens.tolist()
    logprobs = _logprobs(raw, tokens, chosen, turns)
    for i in penalized:
        turns[i].penalties.add(chosen[i])
    for i in constrained:
        turns[i].grammar.accept(chosen[i])
    return chosen, logprobs


def draw(probs: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
    """One token per row of probs [S, V] by inverse CDF: the first token whose cumulative probability reaches u x
    the row's total, u ~ U(0, 1] (never 0, so a token of probability 0 is never drawn). One random number a row:
    unseeded rows from the default generator, a seeded row from its turn's own (whatever shares the batch)."""
    u = 1 - torch.rand(len(generators), dtype=torch.float64, device=probs.device)  # (0, 1]
    for j, generator in enumerate(generators):
        if generator is not None:
            u[j] = 1 - torch.rand((), generator=generator, dtype=torch.float64, device=generator.device)
    cdf = probs.double().cumsum(-1)  # float64: a token's share is resolved down to ~1e-16, not float32's ~6e-8
    chosen = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None]).clamp_(max=probs.shape[-1] - 1)
    # a parallel scan (CUDA) may round a zero-probability entry above its neighbour: never return one
    return torch.where(probs.gather(1, chosen) > 0, chosen, probs.argmax(-1, keepdim=True))[:, 0]


def _logprobs(
    raw: torch.Tensor, tokens: torch.Tensor, chosen: list[int], turns: list[Turn]
) -> list[TokenLogprob | None]:
    """Each asking row's chosen token's logprob and its top alternatives, from the raw logits."""
    out: list[TokenLogprob | None] = [None] * len(turns)
    asking = [i for i, turn in enumerate(turns) if turn.sampling.logprobs is not None]
    if not asking:
        return out
    logprobs = raw[asking].log_softmax(-1)
    values = logprobs.gather(1, tokens[asking][:, None])[:, 0].tolist()
    k = max(turns[i].sampling.logprobs for i in asking)
    top_values, top_ids = logprobs.topk(k, dim=-1) if k else (logprobs[:, :0], logprobs[:, :0].long())
    top_values, top_ids = top_values.tolist(), top_ids.tolist()
    for j, i in enumerate(asking):
        n = turns[i].sampling.logprobs
        top = tuple(zip(top_ids[j][:n], top_values[j][:n], strict=True))
        out[i] = TokenLogprob(chosen[i], values[j], top)
    return out
