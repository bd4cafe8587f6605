"""Test-wide settings. Imported before any test module, so TRITON_INTERPRET is set before triton is imported."""

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # No GPU: the Triton kernels run in the interpreter on CPU tensors (fp32/fp16; its bf16 is broken).
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import HealthCheck, settings  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model():
    """The tiny float64 Llama most cache and engine tests run (a module may define its own `model`)."""
    from tests.tiny import tiny_model

    return tiny_model("llama", seed=3)


@pytest.fixture(scope="module")
def oracle(model):
    """An independent copy of `model` for HF generate."""
    from tests.tiny import oracle_copy

    return oracle_copy(model)


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


@pytest.fixture(scope="session")
def ray_runtime():
    """One local Ray runtime for the whole test session (started by the first test that needs it)."""
    ray = pytest.importorskip("ray")
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=256 * 2**20,
        # instances import tests' model factories; the caller's own PYTHONPATH is kept behind the checkout
        runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.getenv("PYTHONPATH")]))}},
        log_to_driver=False,
    )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tokenizer():
    """SmolLM2's tokenizer (its ChatML template), loaded once: the server and chat-page tests use it."""
    from transformers import AutoTokenizer

    from pensieve.models.smollm2 import GGUF_NAME, smollm2_path

    return AutoTokenizer.from_pretrained(smollm2_path(), gguf_file=GGUF_NAME)
