"""What the write-behind costs (issue 35): SmolLM2-135M, in process, on a real disk.

Setup: --idle conversations of --history tokens each are prefilled and left idle (their KV on the device tier, no
copy yet); --running other conversations then decode --steps steps, batched. Three phases, each measured over the
same decode steps:
  off        write-behind off: the decode steps alone
  on         write-behind on (--mb-s, the default bandwidth) while it copies the idle conversations' chunks: the
             snapshots on the engine's thread between steps, the writer thread beside the forward
  drained    write-behind on, every copy written (nothing left to do): what an idle write-behind costs a step
Reported: decode step ms (p50 and mean) per phase and the ratio to "off"; per chunk, the snapshot time on the engine's
thread (poll's time / chunks queued) and the writer's time (unpaced: checksum + serialize + write + fsync + rename);
bytes written; how many of the idle chunks got a copy during the "on" phase. JSON in results/.

Usage: python benchmarks/writebehind.py [--idle 24] [--history 1024] [--running 8] [--steps 60] [--mb-s 64]
       [--disk-root DIR]
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


def run_phase(phase: str, model, args, block: int, need: int, root: str) -> dict:
    disk = Path(tempfile.mkdtemp(prefix="pensieve-wb-", dir=root))
    behind = None if phase == "off" else 3600.0  # (made due by hand below)
    config = CacheConfig(block_size=block, num_device_blocks=need, disk_dir=disk, write_behind_s=behind,
                         write_behind_mb_s=args.mb_s)  # fmt: skip
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
            snapshot = {}
            if wb is not None:
                wb.idle_s = 0.0  # the idle conversations are due now (the running ones are pinned while they run)
                if phase == "drained":
                    while True:  # copy everything first, then time an idle write-behind
                        gen.call(wb.drain)
                        time.sleep(wb.interval + 0.01)
                        if gen.call(lambda: wb.poll(time.monotonic())) == 0 and not wb.in_flight:
                            break
                else:
                    time.sleep(wb.interval + 0.01)
                    t = time.perf_counter()
                    queued = gen.call(lambda: wb.poll(time.monotonic()))
                    snapshot = {"poll_ms": (time.perf_counter() - t) * 1e3, "chunks": queued}
            before = gen.stats()
            times = decode_steps(gen, running, args.steps, seed=2)
            after = gen.stats()
    finally:
        shutil.rmtree(disk, ignore_errors=True)
    return {
        "step_ms_p50": round(statistics.median(times) * 1e3, 2),
        "step_ms_mean": round(statistics.fmean(times) * 1e3, 2),
        "chunks_written_during": after["write_behind_chunks"] - before["write_behind_chunks"],
        "bytes_written_during": after["bytes_written_behind"] - before["bytes_written_behind"],
        "snapshot": snapshot,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--idle", type=int, default=24)
    parser.add_argument("--history", type=int, default=1024)
    parser.add_argument("--running", type=int, default=8)
    parser.add_argument("--steps", type=int, default=60)
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
    need = (args.idle * args.history + args.running * (args.steps + 64)) // block + 64
    rows = {}
    for phase in ("off", "on", "drained"):
        rows[phase] = run_phase(phase, model, args, block, need, root)
        print(phase, rows[phase], flush=True)
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
        "on_over_off": round(rows["on"]["step_ms_mean"] / off, 3),
        "drained_over_off": round(rows["drained"]["step_ms_mean"] / off, 3),
        "writer_ms_per_chunk_unpaced": round(writer_ms, 2),
        "chunk_bytes": written // n,
        "snapshot_ms_per_chunk": round(rows["on"]["snapshot"]["poll_ms"] / max(1, rows["on"]["snapshot"]["chunks"]), 3),
    }
    print(json.dumps({k: v for k, v in result.items() if k != "phases"}, indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
