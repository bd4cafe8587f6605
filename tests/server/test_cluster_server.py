"""The server over a `Cluster` (`pensieve serve --instances N`): two colocated instances on the session's Ray
runtime, driven by the openai client; replies equal HF generate, a disconnect aborts the turn on its instance, a
cancel stops it there and keeps it."""

from __future__ import annotations

import functools

import pytest

from tests.server.common import (
    MAX_OUT,
    abort_mid_stream,
    hf_chain,
    hf_reply,
    make_model,
    stream_and_cancel,
    tiny_chat_model,
)
from tests.tiny import oracle_copy

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx2")
pytest.importorskip("ray")

from pensieve import CacheConfig, EngineConfig  # noqa: E402
from pensieve.server import Server, ServerConfig  # noqa: E402

GREEDY = dict(temperature=0, max_output_tokens=MAX_OUT)


@pytest.fixture(scope="module")
def cluster_server(ray_runtime, tokenizer):
    from pensieve.cluster import Cluster

    factory = functools.partial(tiny_chat_model, len(tokenizer), tokenizer.convert_tokens_to_ids("<|im_end|>"))
    config = CacheConfig(block_size=4, num_device_blocks=512)
    cluster = Cluster(factory, tokenizer, roles=["colocated", "colocated"], cache_config=config, num_threads=1,
                      engine_config=EngineConfig(compile=False))  # fmt: skip
    server = Server(cluster, tokenizer, config=ServerConfig(model_name="tiny")).start(engine_thread=True)
    yield cluster, server
    server.stop()
    cluster.close()


def test_responses_and_chat_through_a_cluster(cluster_server, tokenizer):
    cluster, server = cluster_server
    oracle = oracle_copy(make_model(tokenizer))
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    turns, texts, previous = ["Hello there", "Tell me about cats", "And dogs?"], [], None
    for text in turns:
        response = client.responses.create(model="tiny", input=text, previous_response_id=previous, **GREEDY)
        if previous is not None:
            assert response.usage.input_tokens_details.cached_tokens > 0
        texts.append(response.output_text)
        previous = response.id
    assert texts == hf_chain(oracle, tokenizer, turns)
    branch = client.responses.create(model="tiny", input="Birds?", previous_response_id=previous, **GREEDY)
    fork = client.responses.create(model="tiny", input="Fish?", previous_response_id=previous, **GREEDY)
    assert branch.output_text == hf_chain(oracle, tokenizer, [*turns, "Birds?"])[-1]
    assert fork.output_text == hf_chain(oracle, tokenizer, [*turns, "Fish?"])[-1]
    messages = [{"role": "user", "content": "Name a color."}]
    pieces = [
        chunk.choices[0].delta.content or ""
        for chunk in client.chat.completions.create(
            model="tiny", messages=messages, temperature=0, max_tokens=MAX_OUT, stream=True
        )
        if chunk.choices
    ]
    assert "".join(pieces) == hf_reply(oracle, tokenizer, messages)
    metrics = httpx.get(server.url + "/metrics").text
    assert "pensieve_kv_blocks" in metrics
    health = httpx.get(server.url + "/health").json()
    assert health == {"status": "ok", "disk_tier": False, "streamed_complete": False, "num_instances": 2,
                      "max_model_len": 512, "vocab_size": 49152}  # fmt: skip
    cluster.check_integrity()


def test_disconnect_aborts_on_the_instance(cluster_server, tokenizer):
    cluster, server = cluster_server
    oracle = oracle_copy(make_model(tokenizer))
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    base = client.responses.create(model="tiny", input="Start here", **GREEDY)
    thread = server.store.responses[base.id].thread_id
    before = list(server.store.threads[thread].tokens)

    def completed() -> int:
        return sum(s["turns_completed"] for s in cluster.stats()["per_instance"].values())

    turns_before = completed()
    abort_mid_stream(server, None, base.id)
    assert server.store.threads[thread].tokens == before
    assert completed() == turns_before  # aborted on its instance, not run to its end
    after = client.responses.create(model="tiny", input="Go on", previous_response_id=base.id, **GREEDY)
    assert [base.output_text, after.output_text] == hf_chain(oracle, tokenizer, ["Start here", "Go on"])
    cluster.check_integrity()


def test_cancel_stops_the_turn_on_its_instance_and_keeps_it(cluster_server, tokenizer):
    cluster, server = cluster_server
    oracle = oracle_copy(make_model(tokenizer))
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    base = client.responses.create(model="tiny", input="Begin", **GREEDY)
    body = {"model": "tiny", "input": "Write a long story", "previous_response_id": base.id, "temperature": 0,
            "max_output_tokens": 400}  # fmt: skip
    with httpx.Client(base_url=server.url, timeout=60) as http:
        cancelled, last, _ = stream_and_cancel(server, http, body)
    assert cancelled["incomplete_details"] == {"reason": "cancelled"} and last["response"] == cancelled
    kept = cancelled["usage"]["output_tokens"]
    after = client.responses.create(model="tiny", input="Go on", previous_response_id=cancelled["id"], **GREEDY)
    want = hf_chain(oracle, tokenizer, ["Begin", "Write a long story", "Go on"], cut={1: kept})
    assert [base.output_text, cancelled["output"][0]["content"][0]["text"], after.output_text] == want
    assert after.usage.input_tokens_details.cached_tokens > 0
    cluster.check_integrity()
