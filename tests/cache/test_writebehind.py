"""Write-behind (pensieve/cache/writebehind.py): clean disk copies of idle conversations' KV, in the background.

Every reply is checked against the oracle (HF generate over the full history); check_integrity (which covers the
copies) runs after every operation.
"""

import os
import textwrap
import threading
import time
from pathlib import Path

import pytest

from pensieve import CacheConfig, StatefulGenerator
from pensieve.cache import disk as disk_module
from pensieve.cache.types import Tier
from pensieve.cache.writebehind import in_flight_for
from tests.cache.test_persistence import GREEDY, _msg, _turn, run_child_until
from tests.tiny import hf_greedy, tiny_model

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", seed=11)


def _open(model, disk_dir, device=16, host=0, idle=0.0, mb_s=64.0) -> StatefulGenerator:
    config = CacheConfig(block_size=4, num_device_blocks=device, num_host_blocks=host, disk_dir=disk_dir,
                         write_behind_s=idle, write_behind_mb_s=mb_s)  # fmt: skip
    return StatefulGenerator(model, None, config)


def _dirty(kv) -> int:
    """Chunks of stored conversations that are in memory, hold KV and have no clean copy."""
    return sum(
        chunk.copy is None and chunk.tier in (Tier.DEVICE, Tier.HOST) and kv.chunk_tokens(conv, i) > 0
        for conv in kv.conversations.values()
        if conv.stored
        for i, chunk in enumerate(conv.chunks)
    )


def _settle(gen, timeout=30.0) -> dict:
    """Run the write-behind (as the engine's thread does between steps; pretending everyone has been idle for
    long) until every chunk of a stored conversation in memory is clean."""
    kv = gen.engine.kv
    deadline = time.monotonic() + timeout
    while True:
        gen.call(lambda: kv.write_behind.drain() or kv.maintain(time.monotonic() + 1e6))
        gen.check_integrity()
        if not gen.call(lambda: _dirty(kv)) and not kv.write_behind.in_flight:
            return gen.stats()
        assert time.monotonic() < deadline, f"not clean after {timeout} s: {gen.stats()}"


def _chat(gen, oracle, histories, rounds, convs="abc"):
    for r in range(rounds):
        for i, conv_id in enumerate(convs):
            _turn(gen, oracle, histories, conv_id, _msg(r * 10 + i))
            gen.check_integrity()


def test_idle_chunks_get_clean_copies_and_evicting_them_writes_nothing(model, oracle, tmp_path):
    histories = {}
    with _open(model, tmp_path, device=24, host=4) as gen:
        _chat(gen, oracle, histories, rounds=2)
        stats = _settle(gen)
        assert stats["write_behind_chunks"] > 0 and stats["bytes_written_behind"] > 0
        assert stats["clean_chunks"] > 0 and stats["disk_write_chunks"] == 0  # copies, not moves: nothing left memory
        kv = gen.engine.kv
        for conv in kv.conversations.values():  # each copy is its chunk's KV, byte for byte
            for i, chunk in enumerate(conv.chunks):
                k, v = kv.storage.read_chunk(chunk.tier, chunk.block)
                n = kv.chunk_tokens(conv, i)
                on_disk = kv.disk.read_chunk(chunk.copy, i * kv.block_size + n)
                # (a partial chunk's positions past n hold whatever its block held before: not KV, not compared)
                assert on_disk is not None and on_disk[0][:, :n].equal(k[:, :n]) and on_disk[1][:, :n].equal(v[:, :n])
        written = stats["bytes_written_disk"]
        # a long new conversation pushes the others out of memory: their clean chunks move to disk without a write
        _turn(gen, oracle, histories, "d", _msg(77, n=60))
        gen.check_integrity()
        after = gen.stats()
        assert after["disk_write_chunks"] > 0 and after["disk_clean_evictions"] == after["disk_write_chunks"]
        assert after["bytes_written_disk"] == written
        for conv_id in "abc":  # and they come back exactly from their copies
            reply = _turn(gen, oracle, histories, conv_id, _msg(5))
            gen.check_integrity()
            assert reply.num_recomputed == 0


def test_a_continued_conversation_writes_into_its_last_chunk_and_that_copy_goes(model, oracle, tmp_path):
    histories = {}
    with _open(model, tmp_path) as gen:
        _turn(gen, oracle, histories, "a", _msg(1))  # 6 + 4 tokens, 9 computed: the third chunk is partial
        _settle(gen)
        conv = gen.engine.kv.conversations["a"]
        last = conv.chunks[-1]
        assert gen.engine.kv.chunk_tokens(conv, len(conv.chunks) - 1) < 4 and last.copy is not None
        old = last.copy
        _turn(gen, oracle, histories, "a", _msg(2, n=1))
        gen.check_integrity()  # the copy it had covered fewer positions: cleared, or a copy of the new ones
        assert conv.chunks[2].copy != old
        stats = _settle(gen)
        assert stats["clean_chunks"] == len(conv.chunks)


def test_only_idle_stored_conversations_are_copied_and_writes_leave_the_engines_thread(
    model, oracle, tmp_path, monkeypatch
):
    threads = set()
    real = os.replace

    def spy(src, dst):  # every chunk file lands through one rename: which thread made it
        if str(dst).endswith(".safetensors"):
            threads.add(threading.current_thread().name)
        return real(src, dst)

    histories = {}
    with _open(model, tmp_path, idle=3600.0) as gen:  # nobody is idle for an hour
        _chat(gen, oracle, histories, rounds=1)
        gen.call(lambda: gen.engine.kv.maintain())
        assert gen.stats()["write_behind_chunks"] == 0 and gen.stats()["clean_chunks"] == 0
        gen.complete(_msg(3), GREEDY)  # a completion's conversation is never stored
        monkeypatch.setattr(disk_module.os, "replace", spy)
        stats = _settle(gen)  # (settling pretends an hour passed)
        monkeypatch.undo()
        assert stats["write_behind_chunks"] > 0
        assert threads == {"pensieve-write-behind"}
        kv = gen.engine.kv
        completion_chunks = [c for c in kv.tree.nodes.values() if c.refs == 0]
        assert completion_chunks and all(c.copy is None for c in completion_chunks)  # not a stored conversation's


def test_the_writer_keeps_to_its_bandwidth(model, oracle, tmp_path):
    with _open(model, tmp_path / "probe") as gen:
        per_chunk = gen.stats()["kv_bytes_per_block"]
    histories = {}
    with _open(model, tmp_path / "kv", idle=3600.0, mb_s=10 * per_chunk / 2**20) as gen:  # 10 chunks a second
        _chat(gen, oracle, histories, rounds=2)
        kv = gen.engine.kv
        start = time.monotonic()
        while gen.call(lambda: _dirty(kv)) or kv.write_behind.in_flight:  # polls as the engine does (no drain)
            gen.call(lambda: kv.maintain(time.monotonic() + 1e6))
            time.sleep(0.01)
        took = time.monotonic() - start
        gen.check_integrity()
        files = gen.stats()["write_behind_chunks"]
    assert files >= 6
    assert took >= (files - 1) / 10 * 0.9, f"{files} chunk files in {took:.2f} s at 10 chunks/s"


def test_one_poll_queues_what_the_bound_lets_through_until_the_next(model, oracle, tmp_path):
    """The in-flight limit comes from the bound (in_flight_for), so the bound binds, not a fixed limit per poll."""
    with _open(model, tmp_path / "probe") as gen:
        per_chunk = gen.stats()["kv_bytes_per_block"]
    histories = {}
    # 39.5 chunks a second and polls 0.25 s apart: 9.875 chunks per poll, so 10 + the one being written
    with _open(model, tmp_path / "kv", idle=3600.0, mb_s=39.5 * per_chunk / 2**20) as gen:
        write_behind = gen.engine.kv.write_behind
        assert write_behind.interval == 0.25
        assert write_behind.max_in_flight == 11 == in_flight_for(39.5 * per_chunk, 0.25, per_chunk)
        _chat(gen, oracle, histories, rounds=2)
        kv = gen.engine.kv
        dirty = gen.call(lambda: _dirty(kv))
        queued = gen.call(lambda: write_behind.poll(time.monotonic() + 1e6))  # everyone idle long enough
        assert dirty > 11 and queued == 11  # (a limit of 4 per poll capped it at 25 MiB/s at 64 MiB/s: issue 35)
        _settle(gen)
    assert in_flight_for(64 * 2**20, 0.25, 1_474_560) == 13  # SmolLM2's 32-token chunk, fp32: 11.4 per poll
    assert in_flight_for(1.0, 0.25, 1 << 20) == 2 and in_flight_for(1e9, 0.0, 1 << 20) == 49  # the smallest


def test_forget_leaves_no_file_of_a_write_in_flight(model, oracle, tmp_path):
    histories = {}
    with _open(model, tmp_path, idle=3600.0, mb_s=0.05) as gen:  # slow: writes are still queued when the forget comes
        _chat(gen, oracle, histories, rounds=1, convs="ab")
        gen.call(lambda: gen.engine.kv.maintain(time.monotonic() + 1e6))
        assert gen.engine.kv.write_behind.in_flight
        gen.end("b", forget=True)
        gen.check_integrity()
        gen.end("a", forget=True)
        gen.check_integrity()
        assert not gen.engine.kv.write_behind.in_flight
    assert not list((tmp_path / "kv").iterdir())  # every file was a, b's (no prefix shared with anything kept)


def test_a_copy_of_other_positions_fails_the_integrity_check(model, oracle, tmp_path):
    histories = {}
    with _open(model, tmp_path) as gen:
        _chat(gen, oracle, histories, rounds=1, convs="ab")
        _settle(gen)
        kv = gen.engine.kv
        a, b = kv.conversations["a"], kv.conversations["b"]
        saved = a.chunks[0].copy
        a.chunks[0].copy = b.chunks[0].copy  # a file that exists, but of b's tokens
        with pytest.raises(AssertionError, match="copy is of other positions"):
            gen.check_integrity()
        a.chunks[0].copy = saved
        gen.check_integrity()


def test_config_rejects_bad_write_behind_settings():
    with pytest.raises(ValueError, match="write_behind_s"):
        CacheConfig(write_behind_s=-1)
    with pytest.raises(ValueError, match="write_behind_mb_s"):
        CacheConfig(write_behind_mb_s=0)
    assert CacheConfig(write_behind_s=None).write_behind_s is None


# ---- crashes -------------------------------------------------------------------------------------------------

_CHILD = textwrap.dedent(
    """
    import json, os, sys, threading, time
    sys.path.insert(0, {root!r})
    from pensieve import CacheConfig, SamplingParams, StatefulGenerator
    from pensieve.cache import disk as disk_module
    from tests.tiny import tiny_model
    from tests.cache.test_persistence import _msg

    gen = StatefulGenerator(tiny_model("llama", seed=11), None,
                            CacheConfig(block_size=4, num_device_blocks=24, disk_dir={disk!r}, write_behind_s=3600))
    greedy = SamplingParams(max_new_tokens=4, temperature=0, ignore_eos=True)
    for r in range(2):
        for i, conv_id in enumerate("abc"):
            reply = gen.generate(conv_id, _msg(r * 10 + i), greedy)
            print("DONE", json.dumps([conv_id, reply.token_ids]), flush=True)
    if {crash_mid_write!r}:  # die in the middle of the write-behind's first chunk file
        real_fsync = os.fsync
        def fsync(fd):
            if threading.current_thread().name == "pensieve-write-behind":
                os.ftruncate(fd, os.fstat(fd).st_size // 2)
                os._exit(137)
            return real_fsync(fd)
        disk_module.os.fsync = fsync
    gen.engine.kv.write_behind.idle_s = 0.2  # (due only now: no copy may be made while the turns run)
    deadline = time.monotonic() + 60
    while True:  # idle: the write-behind copies everything (nothing drives the engine: the idle loop runs it)
        stats = gen.stats()
        if stats["clean_chunks"] == stats["chunks_by_tier"]["device"] and stats["clean_chunks"] > 0:
            break
        if time.monotonic() > deadline:
            print("NOT CLEAN", stats, flush=True)
            sys.exit(1)
        time.sleep(0.05)
    print("CLEAN", stats["write_behind_chunks"], flush=True)
    time.sleep(120)
    """
)


def _run_child(tmp_path, crash_mid_write: bool) -> tuple[dict, list[str]]:
    code = _CHILD.format(root=str(ROOT), disk=str(tmp_path), crash_mid_write=crash_mid_write)
    histories, lines, _ = run_child_until(code, "CLEAN")
    return histories, lines


def test_after_a_sigkill_every_conversation_continues_with_its_kv_from_disk(model, oracle, tmp_path):
    histories, lines = _run_child(tmp_path, crash_mid_write=False)
    assert lines[-1].startswith("CLEAN")
    with _open(model, tmp_path, idle=None) as gen:
        assert gen.conversations() == ["a", "b", "c"]
        for conv_id in "bca":
            history = len(histories[conv_id])
            reply = _turn(gen, oracle, histories, conv_id, _msg(7))
            gen.check_integrity()
            # every position of the history but the last (the turn samples from it) came from the disk copies
            assert reply.num_reused_disk == history - 1 and reply.num_recomputed == 0


def test_a_crash_in_the_middle_of_a_write_behind_never_gives_wrong_kv(model, oracle, tmp_path):
    histories, lines = _run_child(tmp_path, crash_mid_write=True)
    assert not any(line.startswith("CLEAN") for line in lines)  # it died writing its first copy
    assert list((tmp_path / "kv").glob("*.tmp*"))  # the half-written temp file is there
    with _open(model, tmp_path, idle=None) as gen:
        assert not list((tmp_path / "kv").glob("*.tmp*"))  # removed at start-up, never read
        for conv_id in "abc":
            _turn(gen, oracle, histories, conv_id, _msg(7))  # recomputed where no whole file is: exact
            gen.check_integrity()
        assert gen.stats()["disk_bad_files"] == 0


def test_a_step_that_fails_mid_forward_leaves_no_stale_kv_to_copy(model, oracle, tmp_path):
    """A forward that raises after its first layer's swap-ins: the rest of the queued copies still land, so the
    chunks the tree keeps hold their KV: a later turn through them gets the right values (as would a disk copy)."""
    histories = {}
    with _open(model, tmp_path, device=16, host=16, idle=3600.0) as gen:
        _turn(gen, oracle, histories, "a", _msg(1, n=17))  # 21 tokens: 5 chunks, 4 of them full
        kv, runner = gen.engine.kv, gen.engine.runner
        gen.call(lambda: kv.mover.make_room(Tier.DEVICE, kv.device.num_blocks, set(), allow_drop=False))
        assert gen.stats()["chunks_by_tier"]["host"] == 5  # all of a's KV is on the host tier now

        def fail_after_layer_0(plan, gate):
            gate.wait(0)  # layer 0's copies run, then the forward dies
            raise RuntimeError("simulated failure in layer 1")

        runner._forward = fail_after_layer_0
        try:
            with pytest.raises(RuntimeError, match="simulated failure"):
                gen.generate("a", _msg(2), GREEDY)
        finally:
            del runner._forward
        gen.check_integrity()
        _settle(gen)  # the write-behind copies whatever is in memory now
        prompt = histories["a"][:-1] + _msg(3)  # continues a's history, through the tree's chunks
        reply = gen.complete(prompt, GREEDY)
        assert reply.num_reused_device > 0
        assert reply.token_ids == hf_greedy(oracle, prompt, GREEDY.max_new_tokens)


@pytest.mark.parametrize("copies_run", [True, False])
def test_a_step_that_fails_before_its_forward_settles_its_queued_copies(model, oracle, tmp_path, copies_run):
    """A step that fails after its swap-ins were queued but before the forward: `fail_all` runs the queued copies
    (or, where even they fail, drops the chunks they targeted), so no chunk is left on a block that never got its KV."""
    histories = {}
    with _open(model, tmp_path, device=16, host=16, idle=3600.0) as gen:
        _turn(gen, oracle, histories, "a", _msg(1, n=17))
        kv, runner = gen.engine.kv, gen.engine.runner
        gen.call(lambda: kv.mover.make_room(Tier.DEVICE, kv.device.num_blocks, set(), allow_drop=False))
        for k_cache, v_cache in kv.storage.device_caches:  # poison the free device blocks: no stale KV to luck into
            k_cache.fill_(float("nan"))
            v_cache.fill_(float("nan"))

        def no_plan(chunks):
            raise RuntimeError("simulated failure before the forward")

        def no_copies():
            raise RuntimeError("the device failed too")

        runner.build_plan = no_plan
        if not copies_run:
            kv.storage.complete_queued = no_copies
        try:
            with pytest.raises(RuntimeError, match="before the forward"):
                gen.generate("a", _msg(2), GREEDY)
        finally:
            del runner.build_plan
            kv.storage.__dict__.pop("complete_queued", None)
        gen.check_integrity()
        assert (gen.stats()["dropped_chunks"] > 0) == (not copies_run)
        prompt = histories["a"][:-1] + _msg(3)
        reply = gen.complete(prompt, GREEDY)
        assert (reply.num_reused_device > 0) == copies_run
        assert reply.token_ids == hf_greedy(oracle, prompt, GREEDY.max_new_tokens)
