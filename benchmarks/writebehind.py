"""What the write-behind costs (issue 35): SmolLM2-135M fp32, in process, chunk files on a real disk.

Setup: --idle conversations of --history tokens each are prefilled and left idle (their KV on the device tier, no
copy yet: a backlog of chunks to copy); --running other conversations then decode in blocks of --steps steps,
batched. Blocks alternate between the write-behind paused ("off") and copying the backlog at --mb-s ("on": its
snapshots on the engine's thread between steps, its writer thread beside the forward), in one generator, so drift
between runs does not enter the ratio. Reported: decode step ms (p50 and mean) per phase and on / off; the snapshot's
time per chunk on the engine's thread (`KVStorage.read_chunk`); the writer's own time per chunk, unpaced (checksum +
serialize + write + fsync + rename); bytes written behind during each phase. JSON in results/.

Usage: python benchmarks/writebehind.py [--idle 16] [--history 1024] [--running 8] [--steps 40] [--blocks 4]
       [--mb-s 64] [--disk-root DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from plotting import cpu_name

from pensieve import CacheConfig, SamplingParams, StatefulGenerator
from pensieve.cache.disk import in_memory_filesystem
from pensieve.models.smollm2 import load_smollm2


def decode_steps(gen, running: list[str], steps: int, seed: int) -> list[float]:
    """Start one turn on each running conversation, then time `steps` engine steps (the write-behind polls after
    each, as in serving)."""
    engine = gen.engine
    futures = [gen.submit(c, [100 + (seed * 7 + i) % 5000 for i in range(8)],
                          SamplingParams(max_new_tokens=steps + 8, temperature=0, ignore_eos=True))
               for c in running]  # fmt: skip

    def run() -> list[float]:
        while any(t.conv.pending > 1 for t in engine.scheduler.active) or len(engine.scheduler.active) < len(running):
            engine.step()  # the prompts: not timed
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            engine.step()
            times.append(time.perf_counter() - t)
        while engine.has_work():
            engine.step()
        return times

    times = gen.call(run)
    for f in futures:
        f.result()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--idle", type=int, default=16)
    parser.add_argument("--history", type=int, default=1024)
    parser.add_argument("--running", type=int, default=8)
    parser.add_argument("--steps", type=int, default=40, help="decode steps per block")
    parser.add_argument("--blocks", type=int, default=4, help="blocks per phase, alternated")
    parser.add_argument("--mb-s", type=float, default=64.0)
    parser.add_argument("--disk-root", default=None)
    parser.add_argument("--out", default="results/writebehind.json")
    args = parser.parse_args()
    root = args.disk_root or tempfile.gettempdir()
    if in_memory_filesystem(root):
        raise SystemExit(f"{root} is tmpfs: give --disk-root on a disk")
    torch.manual_seed(0)
    model, _ = load_smollm2(torch.float32)
    block = 32
    need = (args.idle * args.history + args.running * (args.blocks * 2 * (args.steps + 16) + 64)) // block + 64
    disk = Path(tempfile.mkdtemp(prefix="pensieve-wb-", dir=root))
    config = CacheConfig(block_size=block, num_device_blocks=need, disk_dir=disk, write_behind_s=3600.0,
                         write_behind_mb_s=args.mb_s)  # fmt: skip
    times: dict[str, list[float]] = {"off": [], "on": []}
    written = {"off": 0, "on": 0}
    try:
        with StatefulGenerator(model, None, config) as gen:
            idle = [f"idle-{i}" for i in range(args.idle)]
            gen.generate_batch({c: [1000 + (i * 31 + j) % 30000 for j in range(args.history)]
                                for i, c in enumerate(idle)},
                               SamplingParams(max_new_tokens=1, temperature=0))  # fmt: skip
            running = [f"run-{i}" for i in range(args.running)]
            decode_steps(gen, running, 8, seed=1)  # compile the batch shapes
            kv = gen.engine.kv
            wb = kv.write_behind
            k_block = kv.conversations[idle[0]].chunks[0].block
            t = time.perf_counter()
            for _ in range(20):
                kv.storage.read_chunk(kv.conversations[idle[0]].chunks[0].tier, k_block)
            snapshot_ms = (time.perf_counter() - t) / 20 * 1e3
            wb.idle_s = 0.0  # every idle conversation is due: a backlog of idle chunks to copy
            for i in range(2 * args.blocks):  # off, on, off, on, ...: the same generator, interleaved
                phase = "on" if i % 2 else "off"
                gen.call(wb.drain)
                wb._next_poll = 0.0 if phase == "on" else float("inf")  # resume / pause the write-behind
                before = gen.stats()["bytes_written_behind"]
                times[phase] += decode_steps(gen, running, args.steps, seed=2 + i)
                written[phase] += gen.stats()["bytes_written_behind"] - before
                print(phase, f"{statistics.median(times[phase]) * 1e3:.2f} ms", flush=True)
            clean = gen.stats()["clean_chunks"]
            wb._next_poll = float("inf")
    finally:
        shutil.rmtree(disk, ignore_errors=True)
    rows = {phase: {"step_ms_p50": round(statistics.median(ts) * 1e3, 2), "step_ms_mean":
                    round(statistics.fmean(ts) * 1e3, 2), "steps": len(ts), "bytes_written_behind": written[phase]}
            for phase, ts in times.items()}  # fmt: skip
    # the writer's own time per chunk, unpaced: write the same chunk under fresh keys
    disk = Path(tempfile.mkdtemp(prefix="pensieve-wb-", dir=root))
    try:
        from pensieve.cache.disk import DiskStore

        store = DiskStore(disk, "bench", (30, block, 3, 64), torch.float32)
        k, v = torch.randn(30, block, 3, 64), torch.randn(30, block, 3, 64)
        t = time.perf_counter()
        n = 40
        written = sum(store.write_file(i.to_bytes(16, "little"), k, v, block)[0] for i in range(n))
        writer_ms = (time.perf_counter() - t) / n * 1e3
        store.close()
    finally:
        shutil.rmtree(disk, ignore_errors=True)
    off = rows["off"]["step_ms_mean"]
    result = {
        "machine": cpu_name(),
        "args": vars(args),
        "phases": rows,
        "on_over_off_mean": round(rows["on"]["step_ms_mean"] / off, 3),
        "on_over_off_p50": round(rows["on"]["step_ms_p50"] / rows["off"]["step_ms_p50"], 3),
        "clean_chunks_at_end": clean,
        "writer_ms_per_chunk_unpaced": round(writer_ms, 2),
        "chunk_bytes": written // n,
        "snapshot_ms_per_chunk": round(snapshot_ms, 3),
    }
    print(json.dumps({k: v for k, v in result.items() if k != "phases"}, indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
