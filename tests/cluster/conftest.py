"""One local Ray runtime for the whole test session (started by the first cluster test, stopped at the end)."""

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def ray_runtime():
    ray = pytest.importorskip("ray")
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=256 * 2**20,
        # instances import tests.tiny's model factories; the caller's own PYTHONPATH is kept behind the checkout
        runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.getenv("PYTHONPATH")]))}},
        log_to_driver=False,
    )
    yield ray
    ray.shutdown()
