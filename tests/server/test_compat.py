"""The compatibility table of docs/serving.md against the installed `openai` package: every key of its request
types has a row, and every chat-completions row is sent once through the official client — implemented and
neutral fields answer 200, refused ones a 400 that names the field."""

from __future__ import annotations

import re
import typing
from pathlib import Path

import pytest

from tests.server.common import openai_client, served_tiny

openai = pytest.importorskip("openai")
pytest.importorskip("xgrammar")

from pensieve.server import ServerConfig  # noqa: E402

DOC = Path(__file__).parents[2] / "docs" / "serving.md"
ROW = re.compile(r"^\| (chat|completions|responses) \| `(\w+)` \| (implemented|neutral|refused|missing) \|")


def table() -> dict[tuple[str, str], str]:
    return {(m[1], m[2]): m[3] for line in DOC.read_text().splitlines() if (m := ROW.match(line))}


def request_keys() -> dict[str, set[str]]:
    from openai.types import completion_create_params as legacy
    from openai.types.chat import completion_create_params as chat
    from openai.types.responses import response_create_params as responses

    def keys(*types) -> set[str]:
        return set().union(*(typing.get_type_hints(t) for t in types))

    return {
        "chat": keys(chat.CompletionCreateParamsNonStreaming, chat.CompletionCreateParamsStreaming),
        "completions": keys(legacy.CompletionCreateParamsNonStreaming, legacy.CompletionCreateParamsStreaming),
        "responses": keys(responses.ResponseCreateParamsNonStreaming, responses.ResponseCreateParamsStreaming),
    }


def test_every_request_key_of_the_client_is_in_the_table():
    rows = table()
    for endpoint, keys in request_keys().items():
        listed = {field for (e, field) in rows if e == endpoint}
        assert keys - listed == set(), f"{endpoint}: fields of the openai package missing from docs/serving.md"
        assert listed - keys == set(), f"{endpoint}: rows for fields the openai package does not have"
    assert all(status != "missing" for (e, _), status in rows.items() if e != "completions")


WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}}}
EXAMPLES = {  # one value a client may send for each chat field (the request also has model, messages, max_tokens)
    "messages": None,
    "model": None,
    "max_tokens": None,
    "stream": {"stream": True},
    "stream_options": {"stream": True, "stream_options": {"include_usage": True, "include_obfuscation": False}},
    "temperature": {"temperature": 0.7, "seed": 1},
    "top_p": {"top_p": 0.5},
    "max_completion_tokens": {"max_completion_tokens": 2},
    "stop": {"stop": ["x", "y"]},
    "seed": {"seed": 3, "temperature": 1},
    "n": {"n": 2, "temperature": 1},
    "frequency_penalty": {"frequency_penalty": 0.5},
    "presence_penalty": {"presence_penalty": 0.5},
    "logit_bias": {"logit_bias": {"5": 10}},
    "logprobs": {"logprobs": True},
    "top_logprobs": {"logprobs": True, "top_logprobs": 3},
    "response_format": {"response_format": {"type": "json_object"}},
    "tools": {"tools": [WEATHER]},
    "tool_choice": {"tools": [WEATHER], "tool_choice": "none"},
    "parallel_tool_calls": {"tools": [WEATHER], "parallel_tool_calls": False},
    "user": {"user": "u-1"},
    "metadata": {"metadata": {"k": "v"}},
    "store": {"store": True},
    "service_tier": {"service_tier": "default"},
    "prompt_cache_key": {"prompt_cache_key": "conv-1"},
    "prompt_cache_retention": {"prompt_cache_retention": "24h"},
    "prompt_cache_options": {"prompt_cache_options": {"mode": "implicit"}},
    "safety_identifier": {"safety_identifier": "s-1"},
    "reasoning_effort": {"reasoning_effort": "high"},
    "verbosity": {"verbosity": "high"},
    "prediction": {"prediction": {"type": "content", "content": "Hello"}},
    "modalities": {"modalities": ["text"]},
    "audio": {"audio": {"voice": "alloy", "format": "wav"}},
    "web_search_options": {"web_search_options": {}},
    "functions": {"functions": [WEATHER["function"]]},
    "function_call": {"function_call": "auto"},
    "moderation": {"moderation": {"model": "omni-moderation-latest"}},
}


@pytest.fixture(scope="module")
def client(tokenizer):
    with served_tiny(tokenizer, ServerConfig(model_name="tiny", max_tokens=16), num_device_blocks=512) as (_, server):
        yield openai_client(server)


def send(call, field: str, status: str):
    """One row's request: a refused field is a 400 naming it (-> None); otherwise -> the answer."""
    if status != "refused":
        return call()
    with pytest.raises(openai.BadRequestError) as refused:
        call()
    error = refused.value.body
    assert field in error["message"] and error["param"] == field, (field, error)
    return None


def test_every_chat_row_once(client):
    rows = {field: status for (e, field), status in table().items() if e == "chat"}
    assert set(rows) == set(EXAMPLES)
    messages = [{"role": "user", "content": "Hi"}]
    for field, status in rows.items():
        extra = EXAMPLES[field] or {}
        call = lambda: client.chat.completions.create(model="tiny", messages=messages, max_tokens=2, **extra)  # noqa: B023, E731
        out = send(call, field, status)
        if out is None:
            continue
        if extra.get("stream"):
            chunks = list(out)
            assert chunks and chunks[-1].choices == [] if field == "stream_options" else chunks[-1].choices, field
        else:
            assert out.choices and out.choices[0].finish_reason in ("stop", "length"), field


FLAT = {"type": "function", "name": "get_weather", "parameters": {"type": "object", "properties": {}}, "strict": False}
RESPONSES_EXAMPLES = {  # one value a client may send for each Responses field (the request has model, input too)
    "input": None,
    "model": None,
    "max_output_tokens": None,
    "access_programs": {"access_programs": [{"type": "code"}]},
    "background": {"background": True},
    "context_management": {"context_management": [{"type": "compaction"}]},
    "conversation": "conversation",
    "image": {"image": {"prompt": "a cat"}},
    "include": {"include": ["message.output_text.logprobs"]},
    "instructions": {"instructions": "Be brief."},
    "max_tool_calls": {"max_tool_calls": 3},
    "metadata": {"metadata": {"k": "v"}},
    "moderation": {"moderation": {"model": "omni-moderation-latest"}},
    "parallel_tool_calls": {"tools": [FLAT], "parallel_tool_calls": False},
    "previous_response_id": "previous_response_id",
    "prompt": {"prompt": {"id": "pmpt_1"}},
    "prompt_cache_key": {"prompt_cache_key": "k"},
    "prompt_cache_options": {"prompt_cache_options": {"mode": "implicit"}},
    "prompt_cache_retention": {"prompt_cache_retention": "24h"},
    "reasoning": {"reasoning": {"effort": "low"}},
    "safety_identifier": {"safety_identifier": "s-1"},
    "service_tier": {"service_tier": "auto"},
    "store": {"store": False},
    "stream": {"stream": True},
    "stream_options": {"stream": True, "stream_options": {"include_obfuscation": False}},
    "temperature": {"temperature": 0.7, "extra_body": {"seed": 1}},
    "text": {"text": {"format": {"type": "json_object"}, "verbosity": "low"}},
    "tool_choice": {"tools": [FLAT], "tool_choice": {"type": "function", "name": "get_weather"}},
    "tools": {"tools": [FLAT]},
    "top_logprobs": {"top_logprobs": 2},
    "top_p": {"top_p": 0.5},
    "truncation": {"truncation": "disabled"},
    "user": {"user": "u-1"},
}


def test_every_responses_row_once(client):
    rows = {field: status for (e, field), status in table().items() if e == "responses"}
    assert set(rows) == set(RESPONSES_EXAMPLES)
    anchor = client.responses.create(model="tiny", input="Hi", max_output_tokens=2)
    conversation = client.conversations.create()
    links = {
        "previous_response_id": {"previous_response_id": anchor.id},
        "conversation": {"conversation": conversation.id},
    }
    for field, status in rows.items():
        extra = RESPONSES_EXAMPLES[field] or {}
        extra = links.get(extra, extra) if isinstance(extra, str) else extra
        call = lambda: client.responses.create(model="tiny", input="Hi", max_output_tokens=2, **extra)  # noqa: B023, E731
        out = send(call, field, status)
        if out is None:
            continue
        if extra.get("stream"):
            events = list(out)
            assert events[-1].type in ("response.completed", "response.incomplete"), field
        else:
            assert out.status in ("completed", "incomplete") and out.output, field
