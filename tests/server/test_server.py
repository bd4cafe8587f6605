"""`pensieve serve` driven by the official `openai` client over real HTTP (uvicorn on 127.0.0.1, an ephemeral port):
every reply equals what `StatefulGenerator` / HF generate give on the same turns (a tiny float64 model behind
SmolLM2's tokenizer and chat template, greedy)."""

from __future__ import annotations

import concurrent.futures as cf

import pytest

from pensieve import CacheConfig, SamplingParams, StatefulGenerator
from tests.server.common import MAX_OUT, abort_mid_stream, hf_chain, hf_reply, make_model
from tests.tiny import oracle_copy

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx2")

from pensieve.server import Server, ServerConfig  # noqa: E402

KEY = "sk-test-key"


CONFIG = ServerConfig(model_name="tiny", api_key=KEY, max_body_bytes=64 * 1024, max_tokens=64, max_messages=12)


def start(tokenizer, disk_dir=None, config=CONFIG):
    cache = CacheConfig(block_size=4, num_device_blocks=1024, disk_dir=disk_dir)
    gen = StatefulGenerator(make_model(tokenizer), tokenizer, cache)
    return gen, Server(gen, tokenizer, config=config, disk_dir=disk_dir).start(engine_thread=True)


@pytest.fixture(scope="module")
def served(tokenizer):
    gen, server = start(tokenizer)
    yield gen, server
    server.stop()
    gen.close()


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[1].url + "/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def reference(tokenizer):
    """The same weights behind a StatefulGenerator in text mode (the API this server must agree with)."""
    with StatefulGenerator(make_model(tokenizer), tokenizer, CacheConfig(block_size=4, num_device_blocks=1024)) as g:
        yield g


def integrity(gen) -> None:
    gen.check_integrity()


GREEDY = dict(temperature=0, max_output_tokens=MAX_OUT)


# ---- chat completions (stateless) -------------------------------------------------------------------------------


def test_chat_completions_plain_and_streamed(client, tokenizer):
    oracle = oracle_copy(make_model(tokenizer))
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a color."},
    ]
    first = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=MAX_OUT)
    text = first.choices[0].message.content
    assert text == hf_reply(oracle, tokenizer, messages)
    assert first.usage.completion_tokens <= MAX_OUT and first.usage.prompt_tokens > 10
    # the same history again: served from the prompt tree (all full blocks of the prompt cached)
    again = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=MAX_OUT)
    assert again.choices[0].message.content == text
    assert again.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens - 4
    # a follow-up resends the history: everything up to the new message is a cache hit
    follow = [*messages, {"role": "assistant", "content": text}, {"role": "user", "content": "Another."}]
    stream = client.chat.completions.create(
        model="tiny", messages=follow, temperature=0, max_tokens=MAX_OUT, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    pieces, usage, finish = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert "".join(pieces) == hf_reply(oracle, tokenizer, follow)
    assert finish in ("stop", "length") and usage.completion_tokens <= MAX_OUT
    assert usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens - 4


# ---- responses (stateful) -----------------------------------------------------------------------------------------

TURNS = ["Hello there", "Tell me about cats", "And dogs?", "Thanks, bye"]


def test_responses_chain_equals_stateful_generator(client, reference, tokenizer):
    sp = SamplingParams(max_new_tokens=MAX_OUT, temperature=0)
    previous, last_total = None, 0
    for i, text in enumerate(TURNS):
        response = client.responses.create(model="tiny", input=text, previous_response_id=previous, **GREEDY)
        # each follow-up is rendered alone after the tokens sampled before, as the library's text mode does
        expected = reference.generate("chain", text, sp)
        assert response.output_text == expected.text, i
        assert response.id.startswith("resp_") and len(response.id) == len("resp_") + 32
        usage = response.usage
        assert usage.input_tokens == len(reference.engine.kv.conversations["chain"].tokens) - len(expected.token_ids)
        if i:  # all of the previous turns' KV is reused
            assert usage.input_tokens_details.cached_tokens == last_total - 1
        stats = response.model_extra["stats"]
        assert stats["prefilled_tokens"] == usage.input_tokens - usage.input_tokens_details.cached_tokens
        assert stats["cached_tokens"]["device"] == usage.input_tokens_details.cached_tokens
        assert stats["ttft_s"] > 0 and stats["recomputed_tokens"] == 0
        last_total = usage.input_tokens + usage.output_tokens
        previous = response.id
    assert client.responses.retrieve(previous).output_text == response.output_text
    reference.end("chain")


def test_responses_streamed_and_branching(client, reference, tokenizer, served):
    first = client.responses.create(model="tiny", input="Pick a number", instructions="Be brief.", **GREEDY)
    events = list(
        client.responses.create(model="tiny", input="Why?", previous_response_id=first.id, stream=True, **GREEDY)
    )
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created" and kinds[-1] in ("response.completed", "response.incomplete")
    done = events[-1].response
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == done.output_text
    # instructions are not carried over by previous_response_id (OpenAI's rule)
    oracle = oracle_copy(make_model(tokenizer))
    history = [
        {"role": "user", "content": "Pick a number"},
        {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "Why?"},
    ]
    assert done.output_text == hf_reply(oracle, tokenizer, history)  # rendered whole: the system message went
    # a second follow-up of `first`: a branch (fork), its own history
    branch = client.responses.create(model="tiny", input="Another one", previous_response_id=first.id, **GREEDY)
    history_b = [*history[:2], {"role": "user", "content": "Another one"}]
    assert branch.output_text == hf_reply(oracle, tokenizer, history_b)
    assert branch.usage.input_tokens_details.cached_tokens > 0
    # and the first branch continues as before
    more = client.responses.create(model="tiny", input="Go on", previous_response_id=done.id, **GREEDY)
    # the same instructions (none): "Go on" is rendered alone after the tokens sampled for `done`
    assert [done.output_text, more.output_text] == hf_chain(oracle, tokenizer, [history, "Go on"])
    assert more.usage.input_tokens_details.cached_tokens == done.usage.input_tokens + done.usage.output_tokens - 1
    integrity(served[0])


def test_store_false_and_delete(client, served):
    gen, server = served
    kept = client.responses.create(model="tiny", input="Remember me", **GREEDY)
    transient = client.responses.create(
        model="tiny", input="Forget me", previous_response_id=kept.id, store=False, **GREEDY
    )
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(transient.id)
    assert transient.usage.input_tokens_details.cached_tokens > 0  # served from kept's KV via the prompt tree
    thread = server.store.responses[kept.id].thread_id
    assert thread in gen.conversations()
    deleted = client.responses.delete(kept.id)
    assert deleted is None or getattr(deleted, "deleted", True)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(kept.id)
    assert thread not in gen.conversations()  # nothing continues from it: its KV is gone
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="tiny", input="x", previous_response_id=kept.id, **GREEDY)


def test_conversations_api(client, served, tokenizer):
    oracle = oracle_copy(make_model(tokenizer))
    conv = client.conversations.create(
        items=[{"type": "message", "role": "user", "content": "Hi, I am Ann."}], metadata={"topic": "intro"}
    )
    assert conv.id.startswith("conv_") and client.conversations.retrieve(conv.id).metadata == {"topic": "intro"}
    r1 = client.responses.create(model="tiny", input="What is my name?", conversation=conv.id, **GREEDY)
    client.conversations.items.create(conv.id, items=[{"type": "message", "role": "user", "content": "Really?"}])
    r2 = client.responses.create(model="tiny", input="Say it again.", conversation=conv.id, **GREEDY)
    # the item added between the responses and the new input are rendered after the tokens sampled for r1
    turns = [
        [{"role": "user", "content": "Hi, I am Ann."}, {"role": "user", "content": "What is my name?"}],
        [{"role": "user", "content": "Really?"}, {"role": "user", "content": "Say it again."}],
    ]
    assert [r1.output_text, r2.output_text] == hf_chain(oracle, tokenizer, turns)
    assert r2.usage.input_tokens_details.cached_tokens == r1.usage.input_tokens + r1.usage.output_tokens - 1
    items = client.conversations.items.list(conv.id)
    assert [i.role for i in items.data] == ["user", "user", "assistant", "user", "user", "assistant"]
    client.conversations.delete(conv.id)
    with pytest.raises(openai.NotFoundError):
        client.conversations.retrieve(conv.id)
    assert conv.id not in served[0].conversations()


def test_concurrent_clients_equal_serial(client, served):
    """32 clients at once on different conversations, two turns each: the replies equal serial runs."""

    def chat(i: int) -> list[str]:
        first = client.responses.create(model="tiny", input=f"Client {i} says hi", **GREEDY)
        second = client.responses.create(
            model="tiny", input=f"Client {i} asks {i * 7}", previous_response_id=first.id, **GREEDY
        )
        return [first.output_text, second.output_text]

    serial = {i: chat(i) for i in range(0, 32, 4)}
    with cf.ThreadPoolExecutor(32) as pool:
        together = dict(zip(range(32), pool.map(chat, range(32)), strict=True))
    for i, texts in serial.items():
        assert together[i] == texts, i
    integrity(served[0])


# ---- disconnects, bad input, restarts -----------------------------------------------------------------------------


def test_disconnect_mid_stream_keeps_none_of_the_turn(client, served, tokenizer):
    gen, server = served
    oracle = oracle_copy(make_model(tokenizer))
    base = client.responses.create(model="tiny", input="Start here", **GREEDY)
    thread = server.store.responses[base.id].thread_id
    tokens_before = list(server.store.threads[thread].tokens)
    aborted_id = abort_mid_stream(server, KEY, base.id)
    assert server.store.threads[thread].tokens == tokens_before
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(aborted_id)  # nothing of the aborted turn was stored
    integrity(gen)
    # the next turn continues from `base` exactly, with its KV reused
    after = client.responses.create(model="tiny", input="Go on", previous_response_id=base.id, **GREEDY)
    assert [base.output_text, after.output_text] == hf_chain(oracle, tokenizer, ["Start here", "Go on"])
    assert after.usage.input_tokens_details.cached_tokens == len(tokens_before) - 1


def test_bad_input_is_refused_and_changes_nothing(client, served):
    gen, server = served
    base = client.responses.create(model="tiny", input="Anchor", **GREEDY)
    conv = client.conversations.create()
    snapshot = (
        {k: list(t.tokens) for k, t in server.store.threads.items()},
        set(server.store.responses),
        len(server.store.conversations[conv.id].items),
        sorted(gen.conversations()),
    )
    http = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"})

    def post(path, body, status, headers=None):
        reply = http.post(path, json=body, headers=headers)
        assert reply.status_code == status, (path, body, reply.text)
        error = reply.json()["error"]
        assert error["message"] and error["type"]
        return error

    msg = [{"role": "user", "content": "hi"}]
    post("/v1/chat/completions", {"model": "tiny", "messages": msg, "max_tokens": 65}, 400)  # over max_tokens
    post("/v1/chat/completions", {"model": "tiny", "messages": msg * 13}, 400)  # too many messages
    post("/v1/chat/completions", {"model": "tiny", "messages": []}, 400)
    post("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}, 400)
    for bad, field in [
        ({"n": 99}, "n"),  # over the server's candidates per request
        ({"frequency_penalty": 3}, "frequency_penalty"),
        ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"logit_bias": {"x": 1}}, "logit_bias"),
        ({"logit_bias": {"999999": 1}}, "logit_bias"),  # outside the vocabulary
        ({"top_logprobs": 2}, "top_logprobs"),  # without logprobs
        ({"tool_choice": "required"}, "tool_choice"),  # without tools
        (
            {
                "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nope"}}}],
                "tool_choice": "required",
            },
            "schema",
        ),  # fmt: skip
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "json_schema"),
        ({"modalities": ["audio"]}, "modalities"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "content"),
    ]:
        error = post("/v1/chat/completions", {"model": "tiny", "messages": msg, **bad}, 400)
        assert field in error["message"] or field == error["param"], (bad, error)
    post("/v1/chat/completions", {"model": "tiny", "messages": msg, "bogus": 1}, 400)
    post("/v1/chat/completions", {"model": "other", "messages": msg}, 404)
    post("/v1/chat/completions", {"model": "tiny", "messages": msg, "temperature": -1}, 400)
    long = " ".join(["word"] * 2000)  # over the model's 512 positions
    assert "positions" in post("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user",
                                                        "content": long}]}, 400)["message"]  # fmt: skip
    post("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x" * 70_000}]}, 413)
    post("/v1/responses", {"model": "tiny", "input": ""}, 400)
    post("/v1/responses", {"model": "tiny", "input": "x", "previous_response_id": "resp_" + "0" * 32}, 404)
    post("/v1/responses", {"model": "tiny", "input": "x", "conversation": "conv_nope"}, 404)
    both = {"model": "tiny", "input": "x", "previous_response_id": base.id, "conversation": conv.id}
    post("/v1/responses", both, 400)
    post("/v1/responses", {"model": "tiny", "input": "x", "previous_response_id": base.id, "max_output_tokens": 0},
         400)  # fmt: skip
    post("/v1/responses", {"model": "tiny", "input": long, "previous_response_id": base.id}, 400)
    post("/v1/conversations/conv_nope/items", {"items": msg}, 404)
    assert http.get("/v1/responses/resp_nope").status_code == 404
    assert http.delete("/v1/conversations/conv_nope").status_code == 404
    # keys: every endpoint but /health
    for path in ("/v1/models", "/metrics", f"/v1/responses/{base.id}"):
        assert httpx.get(server.url + path).status_code == 401
        assert httpx.get(server.url + path, headers={"Authorization": "Bearer wrong"}).status_code == 401
    post("/v1/responses", {"model": "tiny", "input": "x"}, 401, headers={"Authorization": "Bearer wrong"})
    health = httpx.get(server.url + "/health")
    assert health.status_code == 200
    assert health.json() == {"status": "ok", "disk_tier": False, "streamed_complete": True, "num_instances": 1,
                             "max_model_len": 512, "vocab_size": 49152}  # fmt: skip
    # nothing changed anywhere
    assert snapshot == (
        {k: list(t.tokens) for k, t in server.store.threads.items()},
        set(server.store.responses),
        len(server.store.conversations[conv.id].items),
        sorted(gen.conversations()),
    )
    assert not any(t.busy for t in server.store.threads.values())
    integrity(gen)
    http.close()


def test_concurrent_turn_on_one_conversation_is_409(client, served):
    conv = client.conversations.create()
    with cf.ThreadPoolExecutor(2) as pool:
        slow = pool.submit(
            client.responses.create, model="tiny", input="Long one", conversation=conv.id, temperature=0,
            max_output_tokens=64,
        )  # fmt: skip
        import time

        deadline = time.monotonic() + 30
        while not served[1].store.threads[conv.id].busy:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        with pytest.raises(openai.ConflictError):
            client.responses.create(model="tiny", input="Me too", conversation=conv.id, **GREEDY)
        slow.result()
    assert len(client.conversations.items.list(conv.id).data) == 2  # only the first turn's input and output


def test_metrics(client, served):
    client.responses.create(model="tiny", input="Count me", **GREEDY)
    text = httpx.get(served[1].url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    names = ["pensieve_requests_total", "pensieve_generation_tokens_total", "pensieve_ttft_seconds_bucket",
             "pensieve_cache_hit_tokens_total", "pensieve_kv_blocks", "pensieve_recomputed_tokens_total"]  # fmt: skip
    for name in names:
        assert name in text, name
    assert 'endpoint="/v1/responses",status="200"' in text
    assert client.models.list().data[0].id == "tiny"


def test_restart_on_the_same_disk_dir_continues(tokenizer, tmp_path):
    oracle = oracle_copy(make_model(tokenizer))
    gen, server = start(tokenizer, disk_dir=tmp_path)
    assert httpx.get(server.url + "/health").json()["disk_tier"] is True
    c = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
    first = c.responses.create(model="tiny", input="Remember the word apple", **GREEDY)
    conv = c.conversations.create(items=[{"type": "message", "role": "user", "content": "Hello"}])
    in_conv = c.responses.create(model="tiny", input="Hi again", conversation=conv.id, **GREEDY)
    server.stop()
    gen.close()  # writes the KV to disk
    gen, server = start(tokenizer, disk_dir=tmp_path)
    try:
        c = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
        assert c.responses.retrieve(first.id).output_text == first.output_text
        after = c.responses.create(model="tiny", input="Which word?", previous_response_id=first.id, **GREEDY)
        expected = hf_chain(oracle, tokenizer, ["Remember the word apple", "Which word?"])
        assert [first.output_text, after.output_text] == expected
        assert after.usage.input_tokens_details.cached_tokens >= first.usage.input_tokens  # from the disk tier
        more = c.responses.create(model="tiny", input="And now?", conversation=conv.id, **GREEDY)
        turns = [[{"role": "user", "content": "Hello"}, {"role": "user", "content": "Hi again"}], "And now?"]
        assert [in_conv.output_text, more.output_text] == hf_chain(oracle, tokenizer, turns)
        assert more.usage.input_tokens_details.cached_tokens >= in_conv.usage.input_tokens
        integrity(gen)
    finally:
        server.stop()
        gen.close()
