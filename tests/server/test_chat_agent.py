"""Chat completions as agents and front-ends call them, through the official `openai` client against a real server
on 127.0.0.1 (tiny float64 model, SmolLM2's tokenizer): the neutral values clients send by default, the sampling
surface (penalties, logit_bias, logprobs, n), response_format, tools (forced calls, tool results sent back,
streamed call deltas), each checked against the library's own `complete` on the same weights (itself tested
against HF generate)."""

from __future__ import annotations

import json

import jsonschema
import pytest

from pensieve import CacheConfig, SamplingParams, StatefulGenerator
from tests.server.common import make_model

openai = pytest.importorskip("openai")
pytest.importorskip("xgrammar")

from pensieve.server import Server, ServerConfig  # noqa: E402

CONFIG = ServerConfig(model_name="tiny", max_tokens=128)
MSGS = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Weather in Paris?"}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"enum": ["Paris", "Oslo"]}, "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
NAMED = {"type": "function", "function": {"name": "get_weather"}}


@pytest.fixture(scope="module")
def served(tokenizer):
    cache = CacheConfig(block_size=4, num_device_blocks=1024)
    gen = StatefulGenerator(make_model(tokenizer), tokenizer, cache)
    server = Server(gen, tokenizer, config=CONFIG).start(engine_thread=True)
    yield gen, server
    server.stop()
    gen.close()


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[1].url + "/v1", api_key="none", max_retries=0)


@pytest.fixture(scope="module")
def reference(tokenizer):
    with StatefulGenerator(make_model(tokenizer), tokenizer, CacheConfig(block_size=4, num_device_blocks=1024)) as g:
        yield g


def test_the_neutral_values_clients_send_by_default(client, reference):
    """LangChain, LiteLLM and chat front-ends send these on every call: all accepted, and the reply is the plain
    greedy one."""
    out = client.chat.completions.create(
        model="tiny", messages=MSGS, temperature=0, max_tokens=6, frequency_penalty=0, presence_penalty=0, n=1,
        logit_bias={}, top_p=1, user="u1", metadata={"k": "v"}, store=False, service_tier="auto",
        prompt_cache_key="conv-1", safety_identifier="s1", reasoning_effort="low", verbosity="low",
        modalities=["text"], parallel_tool_calls=True, stream_options=None,
    )  # fmt: skip
    expected = reference.complete(MSGS, SamplingParams(max_new_tokens=6, temperature=0))
    assert out.choices[0].message.content == expected.text
    assert out.usage.completion_tokens == len(expected.token_ids)


def test_sampling_surface_equals_the_library(client, reference):
    kwargs = dict(temperature=0.9, seed=5, max_tokens=8, frequency_penalty=0.5, presence_penalty=0.3, top_p=0.9)
    out = client.chat.completions.create(
        model="tiny", messages=MSGS, n=3, logprobs=True, top_logprobs=2, logit_bias={"30": -100, "31": 5},
        extra_body={"top_k": 50, "min_p": 0.01, "repetition_penalty": 1.1}, **kwargs,
    )  # fmt: skip
    sp = SamplingParams(max_new_tokens=8, temperature=0.9, seed=5, top_p=0.9, top_k=50, min_p=0.01, n=3, logprobs=2,
                        frequency_penalty=0.5, presence_penalty=0.3, repetition_penalty=1.1,
                        logit_bias={30: -100, 31: 5})  # fmt: skip
    expected = reference.complete(MSGS, sp)
    assert [c.index for c in out.choices] == [0, 1, 2]
    for choice, reply in zip(out.choices, (expected, *expected.candidates), strict=True):
        assert choice.message.content == reply.text
        got = choice.logprobs.content
        assert [t.logprob for t in got] == pytest.approx([t.logprob for t in reply.logprobs])
        assert all(len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob for t in got)
    assert out.usage.completion_tokens == sum(len(r.token_ids) for r in (expected, *expected.candidates))


def test_response_format_json_schema_and_json_object(client):
    schema = {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}, "days": {"type": "integer"}},
              "required": ["city", "days"], "additionalProperties": False}  # fmt: skip
    out = client.chat.completions.create(
        model="tiny", messages=MSGS, temperature=0, max_tokens=100,
        response_format={"type": "json_schema", "json_schema": {"name": "w", "schema": schema, "strict": True}},
    )  # fmt: skip
    assert out.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(out.choices[0].message.content), schema)
    out = client.chat.completions.create(
        model="tiny", messages=MSGS, temperature=0, max_tokens=100, response_format={"type": "json_object"}
    )
    assert out.choices[0].finish_reason in ("stop", "length")
    if out.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(out.choices[0].message.content), dict)


def test_a_tool_loop_plain_and_streamed(client, reference):
    out = client.chat.completions.create(
        model="tiny", messages=MSGS, temperature=0, max_tokens=100, tools=[WEATHER], tool_choice=NAMED
    )
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    expected = reference.complete(MSGS, SamplingParams(max_new_tokens=100, temperature=0), tools=[WEATHER],
                                  tool_choice=NAMED)  # fmt: skip
    assert (call.function.name, call.function.arguments) == (expected.tool_calls[0].name,
                                                             expected.tool_calls[0].arguments)  # fmt: skip
    # streamed: no text, the call arrives in tool_calls deltas that accumulate to the same call
    chunks = list(client.chat.completions.create(
        model="tiny", messages=MSGS, temperature=0, max_tokens=100, tools=[WEATHER], tool_choice=NAMED, stream=True
    ))  # fmt: skip
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    calls = [d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or []]
    assert text == "" and [(d.function.name, d.function.arguments) for d in calls] == [
        (call.function.name, call.function.arguments)
    ]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # the result goes back with the assistant's call message, as a stateless client resends the history
    history = [*MSGS, choice.message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 18}'}]  # fmt: skip
    answer = client.chat.completions.create(model="tiny", messages=history, temperature=0, max_tokens=6,
                                            tools=[WEATHER])  # fmt: skip
    expected = reference.complete(history, SamplingParams(max_new_tokens=6, temperature=0), tools=[WEATHER])
    assert answer.choices[0].message.content == expected.text
    assert answer.usage.prompt_tokens_details.cached_tokens > 0


def test_a_streamed_request_refused_at_admission_is_a_400(client):
    for extra in ({"logit_bias": {"999999": 1}}, {"tools": [WEATHER], "tool_choice": NAMED,
                                                  "response_format": {"type": "json_object"}}):  # fmt: skip
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=4, stream=True, **extra)
