"""Chat completions as agents and front-ends call them, through the official `openai` client against a real server
on 127.0.0.1 (tiny float64 model, SmolLM2's tokenizer): the neutral values clients send by default, the sampling
surface (penalties, logit_bias, logprobs, n), response_format, tools (forced calls, tool results sent back,
streamed call deltas), each checked against the library's own `complete` on the same weights (itself tested
against HF generate)."""

from __future__ import annotations

import json

import jsonschema
import pytest

from pensieve import CacheConfig, SamplingParams, StatefulGenerator, ToolUse
from tests.server.common import make_model
from tests.structured.conftest import WEATHER

openai = pytest.importorskip("openai")
pytest.importorskip("xgrammar")

from pensieve.server import Server, ServerConfig  # noqa: E402

CONFIG = ServerConfig(model_name="tiny", max_tokens=128)
MSGS = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Weather in Paris?"}]
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
    expected = reference.complete(MSGS, SamplingParams(max_new_tokens=100, temperature=0),
                                  tools=ToolUse([WEATHER], NAMED))  # fmt: skip
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
    # the server remembered the call's sampled tokens: everything up to the result is cached (prefill <= new + 1)
    assert answer.usage.prompt_tokens_details.cached_tokens >= out.usage.prompt_tokens + out.usage.completion_tokens - 1


def test_a_streamed_request_refused_at_admission_is_a_400(client):
    for extra in ({"logit_bias": {"999999": 1}}, {"tools": [WEATHER], "tool_choice": NAMED,
                                                  "response_format": {"type": "json_object"}}):  # fmt: skip
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=4, stream=True, **extra)


# ---- the Responses API with tools --------------------------------------------------------------------------------

FLAT = {"type": "function", **WEATHER["function"]}  # the Responses API's tool shape
FORCE = {"type": "function", "name": "get_weather"}


def test_a_responses_tool_loop_continues_the_thread_in_place(client, reference):
    sp = SamplingParams(max_new_tokens=100, temperature=0)
    first = client.responses.create(model="tiny", input="Weather in Paris?", tools=[FLAT], tool_choice=FORCE,
                                    temperature=0, max_output_tokens=100)  # fmt: skip
    (call,) = [item for item in first.output if item.type == "function_call"]
    assert [item.type for item in first.output] == ["function_call"] and first.status == "completed"
    jsonschema.validate(json.loads(call.arguments), WEATHER["function"]["parameters"])
    expected = reference.generate("resp", "Weather in Paris?", sp, tools=ToolUse([WEATHER], NAMED))
    assert (call.name, call.arguments) == (expected.tool_calls[0].name, expected.tool_calls[0].arguments)
    assert call.call_id.startswith("call_") and call.id.startswith("fc_")
    # the result continues the thread in place: only it and the generation prompt are prefilled
    result = {"type": "function_call_output", "call_id": call.call_id, "output": '{"temp": 18}'}
    second = client.responses.create(model="tiny", input=[result], previous_response_id=first.id, tools=[FLAT],
                                     temperature=0, max_output_tokens=6)  # fmt: skip
    tool_message = {"role": "tool", "tool_call_id": call.call_id, "content": '{"temp": 18}'}
    answer = reference.generate("resp", tool_message, SamplingParams(max_new_tokens=6, temperature=0), tools=[WEATHER])
    assert second.output_text == answer.text
    total = first.usage.input_tokens + first.usage.output_tokens
    assert second.usage.input_tokens_details.cached_tokens == total - 1
    stats = second.model_extra["stats"]
    assert stats["prefilled_tokens"] == second.usage.input_tokens - total + 1 == answer.num_new_tokens + 1
    # the stored chain reads back with the call and its result as items
    items = client.responses.input_items.list(second.id).data
    assert [i.type for i in items] == ["function_call_output"]
    assert client.responses.retrieve(first.id).output[0].arguments == call.arguments
    reference.end("resp")


def test_responses_streamed_function_call_events(client):
    events = list(client.responses.create(model="tiny", input="Weather in Oslo?", tools=[FLAT], tool_choice=FORCE,
                                          temperature=0, max_output_tokens=100, stream=True))  # fmt: skip
    kinds = [e.type for e in events]
    assert "response.output_text.delta" not in kinds  # a call's text is never streamed
    assert kinds[-5:] == ["response.output_item.added", "response.function_call_arguments.delta",
                          "response.function_call_arguments.done", "response.output_item.done",
                          "response.completed"]  # fmt: skip
    done = events[-1].response
    (call,) = done.output
    delta = next(e for e in events if e.type == "response.function_call_arguments.delta")
    assert delta.delta == call.arguments and delta.item_id == call.id and delta.output_index == 0
    assert [e.sequence_number for e in events] == list(range(len(events)))
    usage = done.usage  # (the system prompt with the tools is shared with earlier requests through the prompt tree)
    assert (
        done.model_extra["stats"]["prefilled_tokens"] == usage.input_tokens - usage.input_tokens_details.cached_tokens
    )


def test_stateless_responses_items_and_text_format(client, reference):
    """A client that keeps the history itself sends the call and its result back as items (store: false)."""
    items = [
        {"type": "message", "role": "user", "content": "Weather in Paris?"},
        {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
        {"type": "function_call_output", "call_id": "c1", "output": '{"temp": 18}'},
    ]  # fmt: skip
    out = client.responses.create(model="tiny", input=items, tools=[FLAT], store=False, temperature=0,
                                  max_output_tokens=6)  # fmt: skip
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": items[1]["arguments"]}}
    messages = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": "", "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "c1", "content": '{"temp": 18}'}]  # fmt: skip
    expected = reference.complete(messages, SamplingParams(max_new_tokens=6, temperature=0), tools=[WEATHER])
    assert out.output_text == expected.text
    schema = {
        "type": "object",
        "properties": {"a": {"enum": [1, 2]}},
        "required": ["a"],
        "additionalProperties": False,
    }
    fmt = {"format": {"type": "json_schema", "name": "a", "schema": schema, "strict": True}}
    shaped = client.responses.create(model="tiny", input="Give me a.", text=fmt, temperature=0, max_output_tokens=40)
    jsonschema.validate(json.loads(shaped.output_text), schema)
    assert shaped.text.format.type == "json_schema"


def test_a_conversation_keeps_function_items(client, served):
    conv = client.conversations.create(items=[{"type": "message", "role": "user", "content": "Weather in Oslo?"}])
    first = client.responses.create(model="tiny", input="Now.", conversation=conv.id, tools=[FLAT], tool_choice=FORCE,
                                    temperature=0, max_output_tokens=100)  # fmt: skip
    (call,) = first.output
    result = {"type": "function_call_output", "call_id": call.call_id, "output": "-3"}
    second = client.responses.create(model="tiny", input=[result], conversation=conv.id, tools=[FLAT], temperature=0,
                                     max_output_tokens=4)  # fmt: skip
    types = [i.type for i in client.conversations.items.list(conv.id).data]
    assert types == ["message", "message", "function_call", "function_call_output", "message"]
    # an item a later response could not render is refused when added, not stored
    bad = {"type": "function_call", "call_id": "c9", "name": "get_weather", "arguments": "[1, 2]"}
    with pytest.raises(openai.BadRequestError) as error:
        client.conversations.items.create(conv.id, items=[bad])
    assert error.value.body["param"] == "items" and len(client.conversations.items.list(conv.id).data) == 5
    total = first.usage.input_tokens + first.usage.output_tokens
    assert second.usage.input_tokens_details.cached_tokens == total - 1  # the thread continued in place


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"tools": [FLAT], "tool_choice": {"type": "function", "name": "nope"}}, "tools"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"include": ["reasoning.encrypted_content"]}, "include"),
        ({"max_tool_calls": 2}, "max_tool_calls"),
        ({"background": True}, "background"),
        ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text"),
        ({"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "[1]"}]}, "input"),
    ],
)
def test_bad_responses_requests_are_400s_naming_the_field(client, served, extra, param):
    server = served[1]
    before = (len(server.store.responses), len(server.store.threads), sorted(served[0].conversations()))
    body = {"model": "tiny", "input": "hi", "max_output_tokens": 2, **extra}
    with pytest.raises(openai.BadRequestError) as error:
        client.responses.create(**body)
    assert error.value.body["param"] == param
    assert (len(server.store.responses), len(server.store.threads), sorted(served[0].conversations())) == before
