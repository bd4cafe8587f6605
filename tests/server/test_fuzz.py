"""Schema fuzzing with schemathesis over the server's own `/openapi.json`: every operation gets generated requests,
valid and not (a tiny model behind it, `--max-tokens 4`, a fixed derandomized example budget). No request may be
a 5xx, and every 4xx must be an OpenAI-shaped error (`error.message`, `.type`, `.param`, `.code`)."""

from __future__ import annotations

import os

import pytest

from pensieve import CacheConfig, StatefulGenerator
from tests.server.common import make_model

schemathesis = pytest.importorskip("schemathesis")
pytest.importorskip("fastapi")

from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402

from pensieve.server import Server, ServerConfig  # noqa: E402

EXAMPLES = 200 if os.environ.get("PENSIEVE_THOROUGH") else 25  # per operation


@pytest.fixture(scope="module")
def fuzzed(tokenizer):
    gen = StatefulGenerator(make_model(tokenizer), tokenizer, CacheConfig(block_size=4, num_device_blocks=512))
    config = ServerConfig(model_name="tiny", max_tokens=4, default_max_tokens=4, max_messages=16)
    server = Server(gen, tokenizer, config=config).start(engine_thread=True)
    yield server
    server.stop()
    gen.check_integrity()
    gen.close()


def check(case, url: str) -> None:
    response = case.call(base_url=url, timeout=60)
    where = f"{case.method} {case.path} {str(case.body)[:300]}"
    assert response.status_code < 500, f"{where} -> {response.status_code} {response.text[:300]}"
    if response.status_code >= 400:
        error = response.json().get("error")
        assert isinstance(error, dict) and isinstance(error.get("message"), str) and error["message"], where
        assert {"type", "param", "code"} <= set(error), where


def test_no_5xx_and_every_error_in_openais_shape(fuzzed):
    schema = schemathesis.openapi.from_url(fuzzed.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 15  # every endpoint is in the schema
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])  # fmt: skip
        def fuzz(case) -> None:
            check(case, fuzzed.url)

        fuzz()
