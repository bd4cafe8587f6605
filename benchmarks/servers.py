"""The servers the HTTP benchmarks drive (benchmarks/agent.py, benchmarks/scale.py): `pensieve serve` and vLLM CPU's
OpenAI server, started with KV budgets equal in tokens, scraped and stopped the same way.

Budgets: pensieve gets `--device-blocks N --host-blocks 0` (overflow: its disk tier when a disk dir is given, else
recompute); vLLM gets `--num-gpu-blocks-override N+1` (block 0 is vLLM's null block, never used for KV, so its usable
capacity is N blocks; its quoted "KV cache size" line counts the null block). Both compute on every core of the
machine (pensieve: torch threads; vLLM: VLLM_CPU_OMP_THREADS_BIND=0-(n-1)) with the same block size and scheduler
limits. Each engine's own start-up line with its KV capacity is what the results quote (`capacity_line`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx2

CORES = len(os.sched_getaffinity(0))
BLOCK = 32  # vLLM's CPU attention wants a multiple of 32; pensieve runs the same


def start_pensieve(
    folder: Path, blocks: int, log: Path, *, port: int, dtype: str, max_num_seqs: int, max_num_batched_tokens: int,
    disk_dir: Path | None = None, extra: tuple[str, ...] = (),
) -> subprocess.Popen:  # fmt: skip
    """`pensieve serve` on `folder` with a device pool of `blocks` blocks and no host tier; record retention off."""
    cmd = [sys.executable, "-m", "pensieve", "serve", "--model", str(folder), "--served-model-name", "bench",
           "--dtype", dtype, "--port", str(port), "--block-size", str(BLOCK), "--device-blocks", str(blocks),
           "--host-blocks", "0", "--max-num-seqs", str(max_num_seqs), "--max-num-batched-tokens",
           str(max_num_batched_tokens), "--max-stored-responses", "0", "--log-level", "warning", *extra]  # fmt: skip
    if disk_dir is not None:
        cmd += ["--disk-dir", str(disk_dir)]
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env={**os.environ},
                            start_new_session=True)  # fmt: skip


def start_vllm(
    python: str, folder: Path, blocks: int, log: Path, *, port: int, dtype: str, max_num_seqs: int,
    max_num_batched_tokens: int, prefix_caching: bool = True, extra: tuple[str, ...] = (),
) -> subprocess.Popen:  # fmt: skip
    """vLLM's OpenAI server on `folder` with `blocks` usable KV blocks (one more for its null block)."""
    cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder), "--served-model-name", "bench",
           "--dtype", dtype, "--port", str(port), "--block-size", str(BLOCK),
           "--enable-prefix-caching" if prefix_caching else "--no-enable-prefix-caching",
           "--num-gpu-blocks-override", str(blocks + 1),
           # vLLM refuses a budget below one max-length request: a budget under 8192 tokens caps the length
           "--max-model-len", str(min(8192, blocks * BLOCK)),
           "--max-num-seqs", str(max_num_seqs), "--max-num-batched-tokens", str(max_num_batched_tokens),
           "--enable-prompt-tokens-details", "--seed", "0", "--disable-uvicorn-access-log", *extra]  # fmt: skip
    # vLLM's CPU KV space (GiB, whole) only has to hold the blocks: the override sets how many it uses
    per_token = kv_bytes_per_token(folder, 4 if dtype == "float32" else 2)
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(max(1, math.ceil(blocks * BLOCK * per_token / 2**30) + 1)),
           "VLLM_CPU_OMP_THREADS_BIND": f"0-{CORES - 1}"}  # fmt: skip
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)


def kv_bytes_per_token(folder: Path, itemsize: int) -> int:
    """K and V of every layer for one token, in bytes."""
    config = json.loads((folder / "config.json").read_text())
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or config["num_attention_heads"]
    return 2 * config["num_hidden_layers"] * kv_heads * head_dim * itemsize


LLAMA_VENV = Path(__file__).resolve().parents[1] / ".venv-llama"


def llamacpp_gguf(folder: Path) -> Path:
    """The HF folder written out as an F32 GGUF by the convert_hf_to_gguf.py of the llama.cpp that llama-cpp-python
    vendors (`make llamacpp-peer` unpacks it into .venv-llama/convert), once; next to the folder."""
    out = folder.with_name(folder.name + "-f32.gguf")
    if not out.exists():
        script = LLAMA_VENV / "convert" / "convert_hf_to_gguf.py"
        if not script.exists():
            raise SystemExit(f"no {script}: `make llamacpp-peer` first")
        partial = out.with_suffix(".partial")
        python = str(LLAMA_VENV / "bin" / "python")  # (the script's imports are installed there, not in the dev set)
        subprocess.run([python, str(script), str(folder), "--outtype", "f32", "--outfile", str(partial)],
                       check=True, env={**os.environ, "PYTHONPATH": str(script.parent / "gguf-py")})  # fmt: skip
        partial.rename(out)
    return out


def start_llamacpp(folder: Path, budget_tokens: int, log: Path, *, port: int) -> subprocess.Popen:
    """llama-cpp-python's OpenAI server on the F32 GGUF with its prompt cache on: one context of `budget_tokens`
    tokens for the running request, plus a RAM prompt cache (whole saved states, the longest matching prefix
    restored, LRU) of `budget_tokens` tokens' worth of its f16 KV. It runs one request at a time; the others wait
    (--interrupt_requests false: by default a waiting request cuts the running stream short)."""
    cache_bytes = budget_tokens * kv_bytes_per_token(folder, 2)  # llama.cpp's default KV type is f16
    cmd = [str(LLAMA_VENV / "bin" / "python"), "-m", "llama_cpp.server", "--model", str(llamacpp_gguf(folder)),
           "--host", "127.0.0.1", "--port", str(port), "--n_ctx", str(budget_tokens), "--n_batch", "512",
           "--n_threads", str(CORES), "--n_threads_batch", str(CORES), "--cache", "true", "--cache_type", "ram",
           "--cache_size", str(cache_bytes), "--interrupt_requests", "false", "--logits_all", "false",
           "--verbose", "true"]  # fmt: skip
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env={**os.environ},
                            start_new_session=True)  # fmt: skip


def start_hf(folder: Path, log: Path, *, port: int, dtype: str) -> subprocess.Popen:
    """benchmarks/hf_server.py: HF transformers, stateless (the whole history prefilled every request), one request
    at a time."""
    cmd = [sys.executable, str(Path(__file__).with_name("hf_server.py")), "--model", str(folder), "--port", str(port),
           "--dtype", dtype]  # fmt: skip
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env={**os.environ},
                            start_new_session=True)  # fmt: skip


def capacity_line(server: str, log: Path) -> str:
    """The engine's own start-up line naming its KV capacity."""
    patterns = {"pensieve": r"pensieve: KV cache:", "vllm": r"KV cache size|Overriding num_gpu_blocks",
                "hf": r"hf stateless:", "llamacpp": r"llama_kv_cache.*size|n_ctx\s*="}  # fmt: skip
    pattern = patterns[server.split("-")[0]]
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if re.search(pattern, ln)]
    return " | ".join(lines[:3]) or "(not found in the log)"


def process_read_bytes(pid: int) -> int | None:
    """Bytes the process (and its children) caused to be fetched from storage (/proc/PID/io read_bytes)."""
    total = None
    for p in [pid, *_children(pid)]:
        try:
            text = Path(f"/proc/{p}/io").read_text()
        except OSError:
            continue
        total = (total or 0) + int(re.search(r"^read_bytes: (\d+)", text, re.M).group(1))
    return total


def _children(pid: int) -> list[int]:
    try:
        kids = [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []
    return kids + [g for k in kids for g in _children(k)]


def scrape(port: int) -> dict[str, float]:
    """Counters read from /metrics: pensieve's disk-tier bytes (disk=read, disk=written, disk=written_behind), and
    either engine's preemptions."""
    text = httpx2.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
    found = {
        f"disk={d}": float(v) for d, v in re.findall(r'^pensieve_disk_kv_bytes\{direction="(\w+)"\} (\S+)$', text, re.M)
    }
    preempted = re.findall(r"^vllm:num_preemptions_total\{[^}]*\} (\S+)$", text, re.M)
    preempted += re.findall(r"^pensieve_preemptions (\S+)$", text, re.M)
    if preempted:
        found["preemptions"] = sum(float(v) for v in preempted)
    return found


def stop(proc: subprocess.Popen) -> None:
    """Stop a server and every process it started (vLLM's engine core and workers run in their own)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
