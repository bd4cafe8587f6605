"""Bounded records (server/retention.py) through the official client: past `max_stored_responses` the least
recently used response that nothing builds on goes, its thread's KV with it once nothing continues from it; a
record idle past `records_ttl_s` goes, also across a restart on the same disk_dir; a gone id is a 404. The store's
clock is a fake one the test moves."""

from __future__ import annotations

import pytest

from pensieve import CacheConfig, StatefulGenerator
from tests.server.common import MAX_OUT, make_model

openai = pytest.importorskip("openai")

from pensieve.server import Server, ServerConfig  # noqa: E402

GREEDY = dict(temperature=0, max_output_tokens=MAX_OUT)


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        self.now += 1.0  # every reading is a moment later: an order without ties
        return self.now


def start(tokenizer, config, disk_dir=None):
    cache = CacheConfig(block_size=4, num_device_blocks=1024, disk_dir=disk_dir)
    gen = StatefulGenerator(make_model(tokenizer), tokenizer, cache)
    server = Server(gen, tokenizer, config=config, disk_dir=disk_dir)
    clock = server.store.clock = Clock(1000.0)
    server.start(engine_thread=True)
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    return gen, server, client, clock


def gone(client, response_id: str) -> bool:
    try:
        client.responses.retrieve(response_id)
    except openai.NotFoundError:
        return True
    return False


def test_past_the_bound_the_least_recently_used_tip_goes_with_its_kv(tokenizer):
    config = ServerConfig(model_name="tiny", max_tokens=16, max_stored_responses=3, records_ttl_s=None)
    gen, server, client, _ = start(tokenizer, config)
    try:
        a1 = client.responses.create(model="tiny", input="A", **GREEDY)
        a2 = client.responses.create(model="tiny", input="A again", previous_response_id=a1.id, **GREEDY)
        thread_a = server.store.responses[a1.id].thread_id
        b1 = client.responses.create(model="tiny", input="B", **GREEDY)
        c1 = client.responses.create(model="tiny", input="C", **GREEDY)  # 4 kept: the next request sweeps
        # a2 is the least recently used response nothing builds on; a1 stays (b1, c1 are newer)
        assert gone(client, a2.id) and not gone(client, a1.id)
        assert thread_a in gen.conversations()  # a1 still continues from the thread
        with pytest.raises(openai.NotFoundError):
            client.responses.create(model="tiny", input="x", previous_response_id=a2.id, **GREEDY)
        client.responses.create(model="tiny", input="D", **GREEDY)
        assert gone(client, a1.id)  # now a1 was the least recently used tip: it goes, and the thread's KV
        assert thread_a not in gen.conversations() and thread_a not in server.store.threads
        assert not gone(client, b1.id) and not gone(client, c1.id) and len(server.store.responses) == 3
        # a chain is kept from its tip back: continuing b1 makes it recent, c1 is the next to go
        b2 = client.responses.create(model="tiny", input="B again", previous_response_id=b1.id, **GREEDY)
        assert gone(client, c1.id) and not gone(client, b1.id) and not gone(client, b2.id)
        gen.check_integrity()
    finally:
        server.stop()
        gen.close()


def test_idle_records_expire_across_a_restart(tokenizer, tmp_path):
    config = ServerConfig(model_name="tiny", max_tokens=16, max_stored_responses=None, records_ttl_s=100.0)
    gen, server, client, clock = start(tokenizer, config, tmp_path)
    try:
        old = client.responses.create(model="tiny", input="Remember apple", **GREEDY)
        conv = client.conversations.create(items=[{"type": "message", "role": "user", "content": "Hello"}])
        client.responses.create(model="tiny", input="Hi", conversation=conv.id, **GREEDY)
        thread = server.store.responses[old.id].thread_id
    finally:
        server.stop()
        gen.close()
    gen, server, client, clock = start(tokenizer, config, tmp_path)
    try:
        clock.now = 1050.0  # idle 50 s of 100: kept, and continued from the disk tier
        after = client.responses.create(model="tiny", input="Which word?", previous_response_id=old.id, **GREEDY)
        assert after.usage.input_tokens_details.cached_tokens >= old.usage.input_tokens
        assert client.conversations.retrieve(conv.id).id == conv.id
        clock.now = 1500.0  # the conversation and both responses are idle past the TTL
        assert gone(client, after.id) and gone(client, old.id)
        with pytest.raises(openai.NotFoundError):
            client.conversations.retrieve(conv.id)
        assert thread not in gen.conversations() and conv.id not in gen.conversations()
        assert server.store.responses == {} and server.store.conversations == {} and server.store.threads == {}
        gen.check_integrity()
    finally:
        server.stop()
        gen.close()
    # and the restart after sees none of it (the SQLite records went too)
    gen, server, client, clock = start(tokenizer, config, tmp_path)
    try:
        assert server.store.responses == {} and gen.conversations() == []
    finally:
        server.stop()
        gen.close()
