"""Persistence and disk faults: restarts, crashes and bad files never give wrong tokens.

Every test compares replies with the oracle (HF generate over the full history) after the fault.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
from contextlib import nullcontext
from pathlib import Path

import pytest

from pensieve import CacheConfig, SamplingParams, StatefulGenerator
from pensieve.cache import disk as disk_module
from pensieve.cache.disk import DiskWarning, conv_key, referenced_keys
from pensieve.cache.tree import prefix_keys
from tests.tiny import VOCAB, hf_greedy, oracle_copy, oracle_turn, tiny_model

GREEDY = SamplingParams(max_new_tokens=4, temperature=0, ignore_eos=True)
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", seed=11)


def _open(model, disk_dir, device=16, host=0) -> StatefulGenerator:
    config = CacheConfig(block_size=4, num_device_blocks=device, num_host_blocks=host, disk_dir=disk_dir)
    return StatefulGenerator(model, None, config)


def _msg(seed: int, n: int = 6) -> list[int]:
    return [3 + (seed * 31 + i * 17) % (VOCAB - 3) for i in range(n)]


def _turn(gen, oracle, histories, conv_id, msg):
    return oracle_turn(gen, oracle, histories, conv_id, msg, GREEDY)


def _chat(gen, oracle, histories, rounds=2, convs="abc"):
    for r in range(rounds):
        for i, conv_id in enumerate(convs):
            _turn(gen, oracle, histories, conv_id, _msg(r * 10 + i))


def _chunk_files(disk_dir, tokens) -> list[Path]:
    """The chunk files of a history's full blocks, in order (files are named by content key)."""
    paths = [Path(disk_dir) / "kv" / f"{key.hex()}.safetensors" for key in prefix_keys(tokens, 4)]
    return [p for p in paths if p.exists()]


def _any_file_of(disk_dir, tokens) -> bool:
    return any((Path(disk_dir) / "kv" / f"{key.hex()}.safetensors").exists() for key in referenced_keys(tokens, 4))


def test_a_restart_continues_every_conversation_from_disk_without_recompute(model, oracle, tmp_path):
    histories = {}
    with _open(model, tmp_path, device=12, host=4) as gen:
        _chat(gen, oracle, histories, rounds=3)
        assert gen.stats()["disk_write_chunks"] > 0  # the device and host tiers overflowed onto disk
    with _open(model, tmp_path) as gen:
        assert gen.conversations() == ["a", "b", "c"]
        for conv_id in "abc":
            reply = _turn(gen, oracle, histories, conv_id, _msg(99))
            assert reply.num_reused_disk == len(histories[conv_id]) - len(_msg(99)) - 4 - 1  # all history but last
            assert reply.num_recomputed == 0 and reply.num_chunks_disk > 0


def test_text_mode_conversations_survive_a_restart_with_their_messages(tmp_path):
    from tests.engine.test_text_mode import _hf_reply, tokenizer  # SmolLM2's ChatML tokenizer

    tok = tokenizer.__wrapped__()
    model = tiny_model("llama", seed=5, vocab=len(tok))
    oracle = oracle_copy(model)
    sp = SamplingParams(max_new_tokens=5, temperature=0, ignore_eos=True)
    with StatefulGenerator(model, tok, CacheConfig(block_size=4, disk_dir=tmp_path)) as gen:
        first = gen.generate("t", "hello there", sp)
    with StatefulGenerator(model, tok, CacheConfig(block_size=4, disk_dir=tmp_path)) as gen:
        second = gen.generate("t", "and again", sp)
        conv = gen.engine.kv.conversations["t"]
        assert [m["role"] for m in conv.messages] == ["user", "assistant", "user", "assistant"]
        assert conv.messages[1]["content"] == first.text
        assert second.num_reused_disk > 0
        with pytest.raises(ValueError, match="text mode"):
            gen.generate("t", [5, 6], sp)
        tokens = list(conv.tokens)
    assert second.num_recomputed == 0  # the restored history's tokens are kept as sampled: all its KV reused
    assert second.token_ids == _hf_reply(oracle, tokens[: -len(second.token_ids)], 5)


def test_end_keeps_a_stored_conversation_and_forget_deletes_it(model, oracle, tmp_path):
    histories = {}
    with _open(model, tmp_path) as gen:
        _chat(gen, oracle, histories, rounds=1, convs="ab")
        gen.end("a")
        assert gen.conversations() == ["a", "b"] and "a" not in gen.engine.kv.conversations
        reply = _turn(gen, oracle, histories, "a", _msg(50))  # continues from disk
        assert reply.num_reused_disk > 0
        gen.end("b", forget=True)
        assert gen.conversations() == ["a"]
        assert not _any_file_of(tmp_path, histories["b"]) and _any_file_of(tmp_path, histories["a"])
        assert not (tmp_path / "convs" / f"{conv_key('b')}.log").exists()
        with pytest.raises(KeyError):
            gen.end("b")
    with _open(model, tmp_path) as gen:
        assert gen.conversations() == ["a"]


def test_conversation_ids_never_become_paths(model, tmp_path):
    evil = "../../escape/" + "x" * 300
    with _open(model, tmp_path / "store") as gen:
        gen.generate(evil, _msg(1), GREEDY)
        assert gen.conversations() == [evil]
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert written and all(p.is_relative_to(tmp_path / "store") for p in written)
    assert all(len(p.name) < 64 for p in written)


@pytest.mark.parametrize("fault", ["truncated", "corrupt", "missing", "other-tokens", "garbage"])
def test_a_bad_chunk_file_is_recomputed_with_a_warning_never_used(model, oracle, tmp_path, fault):
    histories = {}
    with _open(model, tmp_path) as gen:
        _chat(gen, oracle, histories, rounds=2, convs="a")
    files = _chunk_files(tmp_path, histories["a"])
    assert len(files) >= 4
    victim = files[2]
    data = victim.read_bytes()
    if fault == "truncated":
        victim.write_bytes(data[: len(data) // 2])
    elif fault == "corrupt":  # one byte of tensor data: only the checksum can tell
        victim.write_bytes(data[:-9] + bytes([data[-9] ^ 0x40]) + data[-8:])
    elif fault == "missing":
        victim.unlink()
    elif fault == "other-tokens":  # a valid file of chunk 1 put in place of chunk 2: right model, wrong tokens
        victim.write_bytes(files[1].read_bytes())
    else:
        victim.write_bytes(b"\x00" * 100)
    with _open(model, tmp_path) as gen, pytest.warns(DiskWarning) if fault != "missing" else nullcontext():
        reply = _turn(gen, oracle, histories, "a", _msg(77))
        # the bad chunk alone is recomputed (a range in the middle of the history); the others are read from disk
        assert reply.num_recomputed == 4 and reply.num_reused_disk > 0


def test_files_of_another_model_are_never_used(model, oracle, tmp_path):
    histories = {}
    with _open(model, tmp_path) as gen:
        _chat(gen, oracle, histories, rounds=2, convs="ab")
    other = tiny_model("llama", seed=12)  # same shapes, other weights
    other_oracle = oracle_copy(other)
    with pytest.warns(DiskWarning, match="another model"), _open(other, tmp_path) as gen:
        for conv_id in "ab":
            msg = _msg(5)
            reply = gen.generate(conv_id, msg, GREEDY)
            assert reply.token_ids == hf_greedy(other_oracle, histories[conv_id] + msg, 4)
            assert reply.num_reused_disk == 0


def test_a_torn_or_corrupt_token_log_keeps_the_turns_before_it(model, oracle, tmp_path):
    histories = {}
    with _open(model, tmp_path) as gen:
        _chat(gen, oracle, histories, rounds=2, convs="ab")
    log_a = tmp_path / "convs" / f"{conv_key('a')}.log"
    with open(log_a, "ab") as f:
        f.write(b'0badc0de {"keep": 0, "append": [1, 2')  # a crash mid-append: no newline
    log_b = tmp_path / "convs" / f"{conv_key('b')}.log"
    lines = log_b.read_bytes().split(b"\n")
    lines[-2] = lines[-2].replace(b'"keep"', b'"kept"')  # the last turn's record corrupt: its crc fails
    log_b.write_bytes(b"\n".join(lines))
    first_turn_b = 6 + 4  # msg + reply of round 0
    with pytest.warns(DiskWarning, match="corrupt"), _open(model, tmp_path) as gen:
        _turn(gen, oracle, histories, "a", _msg(40))
        histories["b"] = histories["b"][:first_turn_b]
        _turn(gen, oracle, histories, "b", _msg(41))


def test_an_unwritable_disk_dir_warns_and_still_gives_correct_tokens(model, oracle, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    histories = {}
    with pytest.warns(DiskWarning), _open(model, blocker / "store", device=8) as gen:
        _chat(gen, oracle, histories, rounds=3)
        stats = gen.stats()
    assert stats["disk_write_errors"] > 0 and stats["dropped_chunks"] > 0


def test_a_full_disk_warns_drops_instead_and_keeps_the_old_files(model, oracle, tmp_path, monkeypatch):
    histories = {}
    with _open(model, tmp_path, device=10) as gen:
        _chat(gen, oracle, histories, rounds=1)
        before = {p: p.read_bytes() for p in tmp_path.rglob("*.safetensors")}

        def full(fd):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(disk_module.os, "fsync", full)
        with pytest.warns(DiskWarning, match="No space"):
            _chat(gen, oracle, histories, rounds=2)
        assert gen.stats()["disk_write_errors"] > 0
        assert not list(tmp_path.rglob("*.tmp*"))  # failed writes leave no temp files
        for path, data in before.items():  # no write got through: every old file is intact
            assert path.read_bytes() == data, path
        monkeypatch.undo()


def test_a_crash_between_write_and_rename_leaves_the_old_file_readable(model, oracle, tmp_path, monkeypatch):
    histories = {}
    with _open(model, tmp_path) as gen:
        _chat(gen, oracle, histories, rounds=2, convs="a")
    files = _chunk_files(tmp_path, histories["a"])
    old = {p: p.read_bytes() for p in files}

    def crash(src, dst):
        raise OSError(5, "simulated crash before rename")

    with _open(model, tmp_path) as gen:
        _turn(gen, oracle, histories, "a", _msg(55))  # the whole conversation is on the device now, newer than disk
        monkeypatch.setattr(disk_module.os, "replace", crash)
        with pytest.warns(DiskWarning, match="simulated crash"):
            gen.engine.kv.persist(gen.engine.kv.lookup("a"))  # every chunk write stops before its rename
        monkeypatch.undo()
        gen.engine.kv.remove("a")  # forget the in-memory copy: the next turn must read what is on disk
        (files[0].parent / "0.safetensors.tmp999").write_bytes(b"half a file")  # debris of a real crash
    assert all(p.read_bytes() == data for p, data in old.items())
    with _open(model, tmp_path) as gen:
        assert not list(tmp_path.rglob("*.tmp*"))  # start-up clears crash debris
        reply = _turn(gen, oracle, histories, "a", _msg(60))
        # the old files serve their positions; what only the crashed writes held is recomputed
        assert reply.num_reused_disk >= 4 * (len(files) - 1) and reply.num_recomputed > 0


_CHILD = textwrap.dedent(
    """
    import json, sys, time
    sys.path.insert(0, {root!r})
    from pensieve import CacheConfig, SamplingParams, StatefulGenerator
    from tests.tiny import tiny_model
    from tests.cache.test_persistence import _msg

    gen = StatefulGenerator(tiny_model("llama", seed=11), None,
                            CacheConfig(block_size=4, num_device_blocks=12, num_host_blocks=4, disk_dir={disk!r}))
    greedy = SamplingParams(max_new_tokens=4, temperature=0, ignore_eos=True)
    for r in range(2):
        for i, conv_id in enumerate("abc"):
            reply = gen.generate(conv_id, _msg(r * 10 + i), greedy)
            print("DONE", json.dumps([conv_id, reply.token_ids]), flush=True)
    stream = gen.stream("b", _msg(123), SamplingParams(max_new_tokens=20, temperature=0, ignore_eos=True))
    next(stream)  # the turn has started and produced a token; it will not complete
    print("MID-TURN", flush=True)
    time.sleep(120)
    """
)


def run_child_until(code: str, kill_at: str) -> tuple[dict[str, list[int]], list[str], int]:
    """Run a child that chats on conversations a, b, c (two rounds of `_msg(round * 10 + i)`, printing each reply as
    `DONE [conv_id, tokens]`) and SIGKILL it when it prints a line starting with `kill_at`. -> the histories of the
    turns it completed, every line it printed, its exit status."""
    child = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )  # fmt: skip
    histories: dict[str, list[int]] = {}
    lines, rounds = [], 0
    try:
        for line in child.stdout:
            lines.append(line)
            if line.startswith("DONE"):
                conv_id, reply = json.loads(line[5:])
                histories[conv_id] = histories.get(conv_id, []) + _msg(rounds // 3 * 10 + "abc".index(conv_id)) + reply
                rounds += 1
            elif line.startswith(kill_at):
                child.send_signal(signal.SIGKILL)
                break
    finally:
        child.kill()
        child.wait(timeout=60)
        child.stdout.close()
    assert rounds == 6, lines
    return histories, lines, child.returncode


def test_sigkill_mid_turn_loses_nothing_completed(model, oracle, tmp_path):
    histories, _, status = run_child_until(_CHILD.format(root=str(ROOT), disk=str(tmp_path)), "MID-TURN")
    assert status == -signal.SIGKILL
    with _open(model, tmp_path, device=12, host=4) as gen:
        assert gen.conversations() == ["a", "b", "c"]
        for conv_id in "bca":  # b was mid-turn: it continues from its last completed turn
            _turn(gen, oracle, histories, conv_id, _msg(7))


def test_a_conversation_stored_by_a_model_with_a_larger_vocabulary_is_rejected_clearly(model, tmp_path):
    big = tiny_model("llama", seed=1, vocab=500)
    with _open(big, tmp_path) as gen:
        gen.generate("v", [400, 450, 7], GREEDY)
    with _open(model, tmp_path) as gen:
        for _ in range(2):  # rejected every time: the failed load leaves it stored-only, not half-loaded
            with pytest.raises(ValueError, match="outside this model's vocabulary"):
                gen.generate("v", [5], GREEDY)
        assert gen.conversations() == ["v"]  # still stored, untouched
        assert "v" not in gen.engine.kv.conversations
        gen.engine.kv.check_integrity()  # its chunks were let go of again


def test_one_generator_per_disk_dir(model, tmp_path):
    first = _open(model, tmp_path)
    with pytest.raises(ValueError, match="in use by another StatefulGenerator"):
        _open(model, tmp_path)
    first.generate("a", _msg(2), GREEDY)  # the refused one disturbed nothing
    first.close()
    assert model.config._attn_implementation != "pensieve"
    with _open(model, tmp_path) as again:  # released on close
        again.generate("a", _msg(3), GREEDY)


def test_the_model_fingerprint_tells_weights_apart():
    import torch

    from pensieve.cache.disk import model_fingerprint

    a, b = tiny_model("llama", seed=3), tiny_model("llama", seed=3)
    assert model_fingerprint(a) == model_fingerprint(b)
    with torch.no_grad():
        b.model.layers[1].mlp.up_proj.weight[5, 7] += 1e-4  # one weight, not in the strided sample
    assert model_fingerprint(a) != model_fingerprint(b)


def _resident_pages(path: Path) -> int:
    """Pages of a file in the OS page cache now (mmap, which faults nothing in, then mincore)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    size, page = path.stat().st_size, os.sysconf("SC_PAGE_SIZE")
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, 1, 1, fd, 0)  # PROT_READ, MAP_SHARED
        assert addr not in (None, ctypes.c_void_p(-1).value), ctypes.get_errno()
        pages = (ctypes.c_ubyte * ((size + page - 1) // page))()
        try:
            assert libc.mincore(addr, size, pages) == 0, ctypes.get_errno()
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)
    return sum(p & 1 for p in pages)


def test_chunk_files_leave_the_page_cache_once_written_and_read_and_reads_are_counted(
    model, oracle, tmp_path, monkeypatch
):
    """The disk tier is not DRAM in disguise: every chunk file written (after its fsync) or read is dropped from the
    page cache (posix_fadvise DONTNEED over the whole file), none stays resident, and stats() counts the bytes read
    back."""
    if not hasattr(os, "posix_fadvise") or not Path("/proc/mounts").exists():
        pytest.skip("needs posix_fadvise and /proc")
    events: list[tuple[str, str, tuple]] = []  # (what, file, args)
    real_advise, real_fsync = os.posix_fadvise, os.fsync

    def advise(fd, offset, length, advice):
        events.append(("advise", os.readlink(f"/proc/self/fd/{fd}"), (offset, length, advice)))
        return real_advise(fd, offset, length, advice)

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"), ()))
        return real_fsync(fd)

    monkeypatch.setattr(os, "posix_fadvise", advise)
    monkeypatch.setattr(os, "fsync", fsync)
    histories = {}
    with _open(model, tmp_path, device=12) as gen:
        _chat(gen, oracle, histories, rounds=3)  # the device tier overflows: chunks go to disk and come back
        stats = gen.stats()
        seen = list(events)  # (close() writes more: the device tier's chunks)
    assert stats["disk_write_chunks"] > 0 and stats["disk_read_chunks"] > 0
    advised = [(path, args) for what, path, args in events if what == "advise"]
    assert advised and all(args == (0, 0, os.POSIX_FADV_DONTNEED) for _, args in advised)
    for i, (what, path, _) in enumerate(events):
        if what == "advise" and ".tmp" in Path(path).name:  # a written file: dropped only once it is on the disk
            assert ("fsync", path, ()) in events[:i]
    dropped = [path for what, path, _ in seen if what == "advise"]
    writes = [p for p in dropped if ".tmp" in Path(p).name]
    reads = [p for p in dropped if ".tmp" not in Path(p).name]
    assert writes and len(reads) >= stats["disk_read_chunks"]  # (a chunk's file is written once, whoever holds it)
    assert all(Path(p).parent == tmp_path / "kv" for p in dropped)
    assert stats["bytes_read_disk"] == sum(Path(p).stat().st_size for p in reads)
    if not disk_module.in_memory_filesystem(tmp_path):  # (tmpfs: the page cache is the file)
        assert sum(_resident_pages(f) for f in (tmp_path / "kv").iterdir()) == 0


def test_a_disk_dir_in_memory_is_named_so(model, tmp_path):
    """A disk_dir on tmpfs is DRAM, not a disk tier: told apart (checked against `stat -f`) and warned about."""

    def kind(path) -> str:
        return subprocess.run(["stat", "-f", "-c", "%T", str(path)], capture_output=True, text=True).stdout.strip()

    assert disk_module.in_memory_filesystem(tmp_path) == (kind(tmp_path) in ("tmpfs", "ramfs"))
    shm = Path("/dev/shm")
    if not shm.is_dir() or kind(shm) != "tmpfs":
        pytest.skip("no tmpfs at /dev/shm")
    assert disk_module.in_memory_filesystem(shm)
    folder = shm / f"pensieve-test-{os.getpid()}"
    try:
        with pytest.warns(DiskWarning, match="in-memory file system"), _open(model, folder):
            pass
    finally:
        subprocess.run(["rm", "-rf", str(folder)], check=True)
