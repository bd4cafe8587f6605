"""Test-wide settings. Imported before any test module, so TRITON_INTERPRET is set before triton is imported."""

import os

import torch

if not torch.cuda.is_available():
    # No GPU: the Triton kernels run in the interpreter on CPU tensors (fp32/fp16; its bf16 is broken).
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import HealthCheck, settings  # noqa: E402

# CI keeps the budgets small; PENSIEVE_THOROUGH=1 runs the big ones.
settings.register_profile(
    "ci", max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
settings.register_profile(
    "thorough",
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("thorough" if os.environ.get("PENSIEVE_THOROUGH") else "ci")
