"""Every bf16 path of the C++ CPU kernels this host can run, each against the float64 reference.

The kernels choose a path once per process (AMX tiles, AVX-512 BF16 dot products, or bf16 widened to fp32) from what
the CPU reports and the switches `PENSIEVE_CPU_AMX=0` and `PENSIEVE_CPU_BF16_DOT=0`; `ONEDNN_MAX_CPU_ISA` caps
oneDNN's (so its brgemm has no bf16 kernel, as on AMD Zen 4). The suite's own process covers the host's default
path; this module runs the bf16 op tests again in a subprocess for each other path the host supports, after checking
that the switches select it (`cpu_kernel.paths()`), so a Sapphire Rapids host tests what Zen 4 and AVX-512-only
hosts run.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from pensieve.ops import cpu_kernel
from tests.conftest import ROOT

pytestmark = pytest.mark.skipif(not cpu_kernel.load(), reason="the C++ CPU kernels could not be built here")

# oneDNN without AMX: its brgemm has no bf16 kernel, as on a CPU without AMX
NO_AMX = {"PENSIEVE_CPU_AMX": "0", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"}
CONFIGS = {
    "bf16-dot": ({**NO_AMX, "PENSIEVE_CPU_BF16_DOT": "1"}, "vdpbf16ps"),  # AMD Zen 4/5 (33+ rows: widened VNNI blocks)
    "widened": ({**NO_AMX, "PENSIEVE_CPU_BF16_DOT": "0"}, "bf16 widened to fp32"),  # AVX-512 without BF16
}
BF16_TESTS = ["tests/ops/test_linear.py", "tests/ops/test_paged_attention.py", "-k", "bf16 or bfloat16"]


def _run(env_update: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, **env_update}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _paths(env_update: dict[str, str]) -> dict[str, str]:
    code = "import json; from pensieve.ops import cpu_kernel; cpu_kernel.load(); print(json.dumps(cpu_kernel.paths()))"
    done = _run(env_update, "-c", code)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_bf16_path_matches_the_reference(name):
    env_update, expected = CONFIGS[name]
    if expected == "vdpbf16ps" and not torch.cpu._is_avx512_bf16_supported():
        pytest.skip("this CPU has no AVX-512 BF16")
    paths = _paths(env_update)
    assert paths["bf16 linear, 1-32 rows (packed)"].startswith(expected), paths
    if name == "widened":
        assert paths["bf16 linear, 33+ rows (packed)"].startswith(expected), paths
    done = _run(env_update, "-m", "pytest", "-q", "-p", "no:cacheprovider", *BF16_TESTS)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert " passed" in done.stdout
