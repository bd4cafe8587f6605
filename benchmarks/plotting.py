"""Shared by the benchmark scripts: matplotlib when it is installed (headless), saving a figure, writing results,
waiting for a server to answer."""

from __future__ import annotations

import json
import os
import platform
import threading
import time
from collections.abc import Callable
from pathlib import Path


def pyplot():
    """matplotlib.pyplot on the Agg backend, or None (with a note) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return None
    return plt


def save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


def write_results(path: str | Path, meta: dict, rows: list[dict], plot: Callable[[list[dict], Path], None]) -> None:
    """{"meta": meta, "rows": rows} as JSON at path, and plot(rows) beside it as PNG."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"json: {out}")
    plot(rows, out.with_suffix(".png"))


def cpu_name() -> str:
    """The CPU's model name and the instruction sets that choose pensieve's kernels (a run names its machine)."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    lines = info.splitlines()
    name = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), platform.processor())
    flags = set(next((ln.split(":", 1)[1].split() for ln in lines if ln.startswith("flags")), []))
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{name} ({platform.machine()}; {', '.join(isa) or 'no AVX2'}; {os.cpu_count()} cores)"


def run_threads(threads: list[threading.Thread]) -> float:
    """Start every thread, wait for all of them; -> wall seconds from the first start to the last join."""
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0


def wait_ready(proc, port: int, log: Path, limit_s: float = 600, path: str = "/health") -> None:
    """Until the server process on 127.0.0.1:port answers GET `path` with 200; RuntimeError with its log's tail if
    it exits or does not answer in limit_s (then it is killed)."""
    import httpx2

    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited: {log.read_text(errors='replace')[-3000:]}")
        try:
            if httpx2.get(f"http://127.0.0.1:{port}{path}", timeout=1).status_code == 200:
                return
        except httpx2.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"the server did not start in {limit_s:.0f} s: {log.read_text(errors='replace')[-3000:]}")
