"""The scale benchmark's load generator (benchmarks/workload.py, benchmarks/scale.py): a seeded, reproducible open-loop
trace whose arrivals are a Poisson process and whose lengths follow the stated statistics."""

import math
import statistics
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from workload import LONG, SHAREGPT, open_loop  # noqa: E402


def test_the_same_seed_gives_the_same_trace_and_another_seed_another():
    a, b = open_loop(0.5, 600, seed=3), open_loop(0.5, 600, seed=3)
    assert [(c.arrival_s, c.turns) for c in a] == [(c.arrival_s, c.turns) for c in b]
    assert [c.arrival_s for c in open_loop(0.5, 600, seed=4)] != [c.arrival_s for c in a]


def test_arrivals_are_a_poisson_process_at_the_rate():
    rate, duration = 2.0, 5000.0
    convs = open_loop(rate, duration, seed=1)
    arrivals = [c.arrival_s for c in convs]
    assert arrivals == sorted(arrivals) and 0 <= arrivals[0] and arrivals[-1] < duration
    n = len(arrivals)  # Poisson(rate x duration): mean 10,000, sd 100
    assert abs(n - rate * duration) < 4 * math.sqrt(rate * duration)
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)]
    mean = statistics.fmean(gaps)  # exponential gaps: mean 1/rate, coefficient of variation 1
    assert abs(mean - 1 / rate) < 0.05 / rate
    assert abs(statistics.stdev(gaps) / mean - 1) < 0.05
    counts = [0] * 50  # counts in equal windows: variance = mean (a Poisson process, not a regular one)
    for t in arrivals:
        counts[int(t / duration * 50)] += 1
    assert 0.6 < statistics.variance(counts) / statistics.fmean(counts) < 1.6


@pytest.mark.parametrize("stats", [SHAREGPT, LONG])
def test_lengths_and_think_times_follow_the_stated_means(stats):
    convs = open_loop(1.0, 4000, seed=2, stats=stats, think_mean_s=15.0, max_tokens=10**9)
    turns = [t for c in convs for t in c.turns]
    assert abs(statistics.fmean(len(c.turns) for c in convs) - stats["turns"]) < 0.05 * stats["turns"]
    assert abs(statistics.fmean(t.user_tokens for t in turns) - stats["user"]) < 0.05 * stats["user"]
    assert abs(statistics.fmean(t.reply_tokens for t in turns) - stats["reply"]) < 0.05 * stats["reply"]
    thinks = [t.think_s for c in convs for t in c.turns[1:]]
    assert all(c.turns[0].think_s == 0 for c in convs)
    assert abs(statistics.fmean(thinks) - 15.0) < 0.05 * 15.0


def test_a_conversation_stops_before_its_history_would_pass_the_limit():
    convs = open_loop(1.0, 2000, seed=5, stats=LONG, max_tokens=7000)
    assert all(c.turns for c in convs)
    assert all(c.tokens + 8 * len(c.turns) <= 7000 for c in convs if len(c.turns) > 1)
    assert max(c.tokens for c in convs) > 5000  # the long trace does reach 6-7k tokens
    with pytest.raises(ValueError, match="rate"):
        open_loop(0, 10, seed=0)


def test_the_rate_search_doubles_until_the_slo_breaks_then_bisects():
    from scale import next_rate

    def row(rate, ok):
        return {"rate": rate, "sustained": ok}

    assert next_rate([], 0.05) == 0.05
    assert next_rate([row(0.05, True)], 0.05) == 0.1
    assert next_rate([row(0.05, True), row(0.1, False)], 0.05) == 0.075
    assert next_rate([row(0.05, True), row(0.1, False), row(0.075, True)], 0.05) == 0.0875
    assert next_rate([row(0.05, False)], 0.05) == 0.025
    assert next_rate([row(0.05, False), row(0.025, True)], 0.05) == 0.0375
