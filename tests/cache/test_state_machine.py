"""Random interleavings of turns, shared system prompts, forks, truncations, stateless completions, end() and restarts
on tiny tiered caches: every reply token-identical to the oracle.

Device 4-16 blocks, host 0-16, disk on/off, both policies, random block size and step budget. After every engine
step the manager's integrity holds (pools consistent, no block owned twice, every chunk's ref count equal to its
holders, tree nodes keyed by their tokens); after every rule `conversations()` lists exactly what should exist.
"""

import shutil
import tempfile
import time

from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from pensieve import CacheConfig, SamplingParams, StatefulGenerator
from pensieve.config import SchedulerConfig
from tests.tiny import VOCAB, hf_greedy, oracle_copy, tiny_model

MAX_NEW = 3
GREEDY = SamplingParams(max_new_tokens=MAX_NEW, temperature=0, ignore_eos=True)
CONVS = st.sampled_from("abcde")
MESSAGES = st.lists(st.integers(3, VOCAB - 1), min_size=1, max_size=6)
# system prompts new conversations may start with: inside a block, on a boundary, across several (block size 2 or 4)
SYSTEM = ([11, 12, 13], [21, 22, 23, 24], [31, 32, 33, 34, 35, 36, 37, 38, 39])

_MODEL = tiny_model("llama", seed=7)
_ORACLE = oracle_copy(_MODEL)


class TieredCacheMachine(RuleBasedStateMachine):
    @initialize(
        block_size=st.sampled_from((2, 4)),
        device=st.integers(4, 16),
        host=st.one_of(st.just(0), st.integers(1, 16)),
        disk=st.booleans(),
        policy=st.sampled_from(("pensieve", "lru")),
        budget=st.integers(3, 32),
        share=st.booleans(),
    )
    def start(self, block_size, device, host, disk, policy, budget, share):
        self.disk_dir = tempfile.mkdtemp(prefix="pensieve-sm-") if disk else None
        self.config = CacheConfig(
            block_size=block_size,
            num_device_blocks=device,
            num_host_blocks=host,
            disk_dir=self.disk_dir,
            policy=policy,
            share_prefixes=share,
            write_behind_s=3600.0,  # copies are made by the write_behind rule (deterministic), not by the clock
        )
        self.scheduler = SchedulerConfig(max_num_batched_tokens=budget)
        self.capacity = device * block_size
        self.histories: dict[str, list[int]] = {}
        self.gen = self._open()

    def _open(self) -> StatefulGenerator:
        gen = StatefulGenerator(_MODEL, None, self.config, scheduler_config=self.scheduler)
        engine = gen.engine
        step = engine.step

        def checked_step():  # integrity after every engine step, not just after every turn
            step()
            engine.check_integrity()

        engine.step = checked_step
        return gen

    def _fits(self, conv_id: str, msg: list[int]) -> bool:
        return len(self.histories.get(conv_id, [])) + len(msg) + MAX_NEW <= self.capacity

    @rule(conv_id=CONVS, msg=MESSAGES, system=st.sampled_from((None, 0, 1, 2)))
    def turn(self, conv_id, msg, system):
        if system is not None and conv_id not in self.histories:
            msg = SYSTEM[system] + msg  # a new conversation behind a shared system prompt
        if not self._fits(conv_id, msg):
            return
        reply = self.gen.generate(conv_id, msg, GREEDY)
        _record(reply)
        history = self.histories.get(conv_id, []) + msg
        assert reply.token_ids == hf_greedy(_ORACLE, history, MAX_NEW), (conv_id, reply)
        self.histories[conv_id] = history + reply.token_ids

    @rule(batch=st.dictionaries(CONVS, MESSAGES, min_size=2, max_size=4))
    def batch(self, batch):
        batch = {c: m for c, m in batch.items() if self._fits(c, m)}
        if not batch:
            return
        replies = self.gen.generate_batch(batch, GREEDY)
        for conv_id, msg in batch.items():
            history = self.histories.get(conv_id, []) + msg
            assert replies[conv_id].token_ids == hf_greedy(_ORACLE, history, MAX_NEW), conv_id
            _record(replies[conv_id])
            self.histories[conv_id] = history + replies[conv_id].token_ids

    @rule(src=CONVS, dst=CONVS)
    def fork(self, src, dst):
        if src not in self.histories or dst in self.histories:
            return
        self.gen.fork(src, dst)
        self.histories[dst] = list(self.histories[src])
        event("fork")

    @rule(conv_id=CONVS, keep=st.floats(0, 1))
    def truncate(self, conv_id, keep):
        if conv_id not in self.histories:
            return
        n = int(keep * len(self.histories[conv_id]))
        self.gen.truncate(conv_id, n)
        del self.histories[conv_id][n:]
        event("truncate")

    @rule(conv_id=CONVS, msg=MESSAGES, system=st.sampled_from((0, 1, 2)))
    def complete(self, conv_id, msg, system):
        prompt = self.histories.get(conv_id, SYSTEM[system]) + msg  # a stateless client resending a history
        if len(prompt) + MAX_NEW > self.capacity:
            return
        reply = self.gen.complete(prompt, GREEDY)
        _record(reply)
        assert reply.conv_id is None
        assert reply.token_ids == hf_greedy(_ORACLE, prompt, MAX_NEW), ("complete", prompt, reply)

    @rule(conv_id=CONVS, forget=st.booleans())
    def end(self, conv_id, forget):
        if conv_id not in self.histories:
            return
        self.gen.end(conv_id, forget=forget)
        if forget or self.disk_dir is None:
            del self.histories[conv_id]

    @precondition(lambda self: self.disk_dir is not None)
    @rule()
    def write_behind(self):
        """Every idle stored conversation's chunks get their clean copies (as if idle for long); later turns,
        truncates, forks, evictions and drops must keep the copies true (check_integrity covers them)."""
        kv = self.gen.engine.kv
        for _ in range(50):
            if not self.gen.call(lambda: kv.write_behind.drain() or kv.write_behind.poll(time.monotonic() + 1e7)):
                break
        self.gen.call(kv.write_behind.drain)
        event("write-behind")

    @precondition(lambda self: self.disk_dir is not None)
    @rule()
    def restart(self):
        self.gen.close()
        self.gen = self._open()
        event("restart")

    @invariant()
    def consistent(self):
        self.gen.engine.kv.check_integrity()
        assert self.gen.conversations() == sorted(self.histories)

    def teardown(self):
        self.gen.close()
        if self.disk_dir is not None:
            shutil.rmtree(self.disk_dir, ignore_errors=True)


def _record(reply) -> None:
    """Which paths the examples exercised (pytest --hypothesis-show-statistics)."""
    for name in ("num_chunks_host", "num_chunks_disk", "num_chunks_dropped", "num_reused_shared"):
        if getattr(reply, name):
            event(f"turn with {name}")
    event("turn")


TieredCacheMachine.TestCase.settings = settings(
    settings.default, max_examples=settings.default.max_examples, stateful_step_count=30
)
test_tiered_cache = TieredCacheMachine.TestCase
