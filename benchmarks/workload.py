"""Synthetic multi-turn workloads from published statistics (DESIGN §6, §11), seeded and reproducible.

ShareGPT as Pensieve measured it: 5.56 turns per conversation, 37.8 user tokens and 204.6 reply tokens per turn.
Lengths are lognormal around those means (sigma 0.5 for turns, 0.6 for user messages, 0.4 for replies: the spread
benchmarks/multiturn.py uses), clamped to a conversation's context limit.

`open_loop` draws an open-loop trace: conversations arrive as a Poisson process at `rate` per second over
`duration` seconds; a turn follows the previous reply after an exponential think time. No client waits for the
system to be ready: arrivals do not slow down when the server does, which is what an overloaded server sees.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

SHAREGPT = {"turns": 5.56, "user": 37.8, "reply": 204.6}
# Long conversations (a document, then questions): the second trace of benchmarks/scale.py, reaching 6-7k tokens
# (SmolLM2 has 8,192 positions).
LONG = {"turns": 12.0, "user": 400.0, "reply": 204.6}


def lognormal_int(rng: random.Random, mean: float, sigma: float, lo: int = 1) -> int:
    """A lognormal draw with mean `mean`, rounded, at least lo."""
    mu = math.log(mean) - sigma**2 / 2  # so that the mean is `mean`
    return max(lo, round(rng.lognormvariate(mu, sigma)))


@dataclass
class Turn:
    user_tokens: int
    reply_tokens: int
    think_s: float  # the pause before this turn is sent (0 for the first)


@dataclass
class TraceConversation:
    index: int
    arrival_s: float
    turns: list[Turn] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return sum(t.user_tokens + t.reply_tokens for t in self.turns)


def open_loop(
    rate: float,
    duration_s: float,
    seed: int,
    stats: dict = SHAREGPT,
    think_mean_s: float = 15.0,
    max_tokens: int = 7000,
    template_tokens: int = 8,
) -> list[TraceConversation]:
    """Conversations arriving at `rate` per second (Poisson) during [0, duration_s). Each has a turn count and per
    turn a user length and a reply length drawn from `stats`; turns that would take its history (+ template_tokens a
    turn for the chat template) past max_tokens are cut off (a conversation keeps at least one turn)."""
    if rate <= 0 or duration_s <= 0:
        raise ValueError(f"rate and duration must be > 0, got {rate}, {duration_s}")
    rng = random.Random(f"open-loop:{seed}:{rate!r}")  # (str seeds are hashed deterministically)
    conversations: list[TraceConversation] = []
    t = rng.expovariate(rate)
    while t < duration_s:
        conv = TraceConversation(len(conversations), t)
        total = 0
        for i in range(lognormal_int(rng, stats["turns"], 0.5)):
            turn = Turn(
                lognormal_int(rng, stats["user"], 0.6),
                lognormal_int(rng, stats["reply"], 0.4, lo=4),
                rng.expovariate(1 / think_mean_s) if i and think_mean_s > 0 else 0.0,
            )
            total += turn.user_tokens + turn.reply_tokens + template_tokens
            if total > max_tokens and conv.turns:
                break
            conv.turns.append(turn)
        conversations.append(conv)
        t += rng.expovariate(rate)
    return conversations
