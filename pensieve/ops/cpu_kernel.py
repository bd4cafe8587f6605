"""The C++ CPU kernels (`csrc/`): built as one torch extension at first use, cached, loaded once.

`load()` compiles the source with the vector ISA inductor picks for this CPU (AVX-512 where present, else AVX2, else
plain C++), under a name that hashes the source, the flags and the torch version, in torch's extension cache
(`TORCH_EXTENSIONS_DIR`, default `~/.cache/torch_extensions`): a second start loads the cached library in well under a
second. When there is no compiler, or the build fails, it warns once and pensieve runs the torch path
(`cpu_paged.py`). `PENSIEVE_CPU_KERNEL=0` switches the C++ kernels off.

Ops: `torch.ops.pensieve_cpu.write_kv` and `torch.ops.pensieve_cpu.paged_attention` (same contract as
`pensieve::write_kv` / `pensieve::paged_attention`; every index is checked in C++ and a bad one is a ValueError), and
`torch.ops.pensieve_cpu.linear` (`F.linear` for decode-sized batches: each weight streamed once per call).
"""

from __future__ import annotations

import hashlib
import os
import threading
import warnings
from pathlib import Path

import torch

CSRC = Path(__file__).parent / "csrc"
SOURCES = (CSRC / "cpu_paged.cpp", CSRC / "cpu_linear.cpp")

_lock = threading.Lock()
_loaded: bool | None = None  # None: not tried yet


def _build_flags() -> list[str]:
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    isa = pick_vec_isa()
    # -fopenmp: at::parallel_for is a template expanded here; without it the loop runs on one thread. The library
    # links libgomp.so.1, which resolves to the copy torch has already loaded.
    flags = ["-O3", "-fopenmp", "-ffp-contract=fast", "-fno-math-errno"]
    if isa:
        arch = isa.build_arch_flags().split()
        # inductor's AVX-512 ISA without AMX leaves out AVX-512 BF16 even where the CPU has it (Zen 4). The
        # packed linears' vdpbf16ps kernel is compiled in any build (a target attribute, csrc/bf16_dot.h); the
        # streaming kernel's and the attention's vdpbf16ps paths need the flag.
        if "-mavx512f" in arch and "-mavx512bf16" not in arch and torch.cpu._is_avx512_bf16_supported():
            arch.append("-mavx512bf16")
        flags += list(dict.fromkeys(arch)) + [f"-D{macro}" for macro in isa.build_macro()]
    return flags


def _build() -> None:
    from torch.utils import cpp_extension

    flags = _build_flags()
    digest = hashlib.sha256(" ".join(flags).encode() + torch.__version__.encode())
    for path in sorted(CSRC.iterdir()):
        digest.update(path.name.encode() + path.read_bytes())
    cpp_extension.load(
        name=f"pensieve_cpu_{digest.hexdigest()[:16]}",
        sources=[str(p) for p in SOURCES],
        extra_cflags=flags,
        extra_ldflags=["-fopenmp"],
        is_python_module=False,
        verbose=False,
    )
    _register_fakes()


def _register_fakes() -> None:
    @torch.library.register_fake("pensieve_cpu::paged_attention")
    def _(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens_k, scale, sliding_window=None, softcap=None):
        return torch.empty(q.shape, dtype=q.dtype, device=q.device)

    @torch.library.register_fake("pensieve_cpu::write_kv")
    def _(k, v, k_cache, v_cache, slot_mapping):
        return None

    @torch.library.register_fake("pensieve_cpu::linear")
    def _(x, weight, bias=None, packed=None):
        return x.new_empty((*x.shape[:-1], weight.shape[0]))

    @torch.library.register_fake("pensieve_cpu::pack_weight")
    def _(weight):
        return weight.new_empty(((weight.shape[0] + 31) // 32, weight.shape[1] * 32))

    @torch.library.register_fake("pensieve_cpu::paged_attention_out")
    def _(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens_k, scale, sliding_window, softcap, out):
        return None


def load() -> bool:
    """Build (first time on this machine) and load the C++ kernels; False if they cannot be had here."""
    global _loaded
    if _loaded is not None:
        return _loaded
    with _lock:
        if _loaded is None:
            if os.environ.get("PENSIEVE_CPU_KERNEL", "1") == "0":
                _loaded = False
            else:
                try:
                    _build()
                    _loaded = True
                except Exception as error:  # noqa: BLE001  (no compiler, no ninja, a failed build: fall back)
                    warnings.warn(
                        f"pensieve: the C++ CPU attention kernel could not be built ({type(error).__name__}: "
                        f"{str(error)[:300]}); using the slower torch path",
                        RuntimeWarning,
                        stacklevel=2,
                    )
                    _loaded = False
    return _loaded


def paths() -> dict[str, str]:
    """Which kernel runs each bf16 job in this process (after `load()`), as `report()` prints it."""
    ops = torch.ops.pensieve_cpu
    amx, dot, brgemm = bool(ops.uses_amx()), bool(ops.uses_bf16_dot()), bool(ops.brgemm_bf16())
    widened = "bf16 widened to fp32 (fp32 FMAs)"
    if brgemm:
        few = many = "oneDNN brgemm (AMX)"
    elif dot:
        few, many = "vdpbf16ps", "VNNI blocks widened to fp32 (brgemm's fp32 kernel)"
    else:
        few = many = widened
    return {
        "bf16 linear, 1-32 rows (packed)": "AMX tiles" if amx else few,
        "bf16 linear, 33+ rows (packed)": many,
        "bf16 linear, unpacked rows": "vdpbf16ps" if dot and _streaming_dot() else widened,
        "bf16 attention scores": "AMX tiles" if amx else ("vdpbf16ps" if dot and _streaming_dot() else widened),
        "fp32 packed linears": "pensieve FMA loop / oneDNN brgemm" if ops.can_pack(torch.float32) else "unpacked",
    }


def _streaming_dot() -> bool:
    return "-mavx512bf16" in _build_flags()


def report() -> None:
    """Build now (`make install` runs this) and say what was built and which paths run."""
    print("pensieve C++ CPU kernels:", "loaded" if load() else "unavailable", "flags:", " ".join(_build_flags()))
    if _loaded:
        for job, path in paths().items():
            print(f"  {job}: {path}")


if __name__ == "__main__":
    report()
