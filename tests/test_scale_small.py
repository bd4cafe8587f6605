"""A small scale run (issue 35): 32 conversations arriving over time, turns separated by think time, pools under
pressure (device, host and disk tiers, write-behind on), every reply checked against the oracle (HF generate over the
full history, float64, greedy) and check_integrity after every engine step."""

import random
import time

import pytest

from pensieve import CacheConfig, SamplingParams, StatefulGenerator
from tests.tiny import VOCAB, hf_greedy, tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", seed=35)


def _schedule(rng: random.Random, conversations: int, ticks: int) -> dict[int, list[tuple[str, list[int], int]]]:
    """tick -> the turns sent then (conv id, message, reply length): conversations arrive at random ticks (an open
    loop), each turn follows the previous reply after a random think time of 1-4 ticks."""
    plan: dict[int, list] = {}
    for c in range(conversations):
        t = rng.randrange(ticks // 2)
        for _ in range(rng.randint(2, 4)):
            message = [rng.randrange(3, VOCAB) for _ in range(rng.randint(3, 14))]
            plan.setdefault(t, []).append((f"c{c}", message, rng.randint(2, 7)))
            t += rng.randint(1, 4)
    return plan


def test_a_small_open_loop_run_under_pressure_matches_the_oracle(model, oracle, tmp_path):
    rng = random.Random(35)
    config = CacheConfig(block_size=4, num_device_blocks=48, num_host_blocks=12, disk_dir=tmp_path,
                         write_behind_s=0.0)  # fmt: skip
    plan = _schedule(rng, 32, 40)
    histories: dict[str, list[int]] = {}
    waiting: dict[str, tuple] = {}  # conv -> (future, message, reply length) of its turn in flight
    checked = 0
    with StatefulGenerator(model, None, config) as gen:
        engine = gen.engine
        backlog: list[tuple[str, list[int], int]] = []
        for tick in range(max(plan) + 60):
            backlog += plan.get(tick, [])
            still = []
            for conv_id, message, n in backlog:  # a conversation's next turn waits for its previous reply
                if conv_id in waiting:
                    still.append((conv_id, message, n))
                    continue
                sampling = SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True)
                waiting[conv_id] = (gen.submit(conv_id, message, sampling), message, n)
            backlog = still

            def steps(count: int = 3) -> None:  # a few engine steps per tick: turns overlap across ticks
                for _ in range(count):
                    if engine.has_work():
                        engine.step()
                    engine.check_integrity()
                engine.kv.maintain(time.monotonic() + 1e6)  # (as if everyone were idle long: write-behind runs)
                engine.check_integrity()

            gen.call(steps)
            for conv_id in [c for c, (f, _, _) in waiting.items() if f.done()]:
                future, message, n = waiting.pop(conv_id)
                reply = future.result()
                history = histories.get(conv_id, []) + message
                assert reply.token_ids == hf_greedy(oracle, history, n), (conv_id, tick)
                histories[conv_id] = history + reply.token_ids
                checked += 1
            if not backlog and not waiting and tick > max(plan):
                break
        stats = gen.stats()
    assert checked == sum(len(v) for v in plan.values())
    assert len(histories) == 32
    # the pools were under pressure: chunks went to host and disk, copies were written behind, some came back
    assert stats["swap_out_chunks"] > 0 and stats["disk_write_chunks"] > 0 and stats["write_behind_chunks"] > 0
    assert stats["disk_read_chunks"] + stats["swap_in_chunks"] > 0 and stats["disk_clean_evictions"] > 0
