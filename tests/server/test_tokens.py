"""`/tokenize`, `/detokenize` and `/openapi.json` against a real server on 127.0.0.1 (tiny model, SmolLM2's
tokenizer): counts and ids equal the tokenizer's and the chat template's, what the server would prefill for the same
chat (with tools), and bad input is a 400 naming the field."""

from __future__ import annotations

import pytest

from pensieve import CacheConfig, StatefulGenerator
from pensieve.structured.tools import ChatFormat, ToolUse
from tests.server.common import make_model

httpx = pytest.importorskip("httpx2")

from pensieve.server import Server, ServerConfig  # noqa: E402

TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}


@pytest.fixture(scope="module")
def http(tokenizer):
    gen = StatefulGenerator(make_model(tokenizer), tokenizer, CacheConfig(block_size=4, num_device_blocks=256))
    server = Server(gen, tokenizer, config=ServerConfig(model_name="tiny", max_tokens=8)).start(engine_thread=True)
    with httpx.Client(base_url=server.url) as client:
        yield client, gen
    server.stop()
    gen.close()


def test_tokenize_a_prompt_and_a_chat(http, tokenizer):
    client, gen = http
    out = client.post("/tokenize", json={"prompt": "Hello world", "return_token_strs": True}).json()
    ids = tokenizer.encode("Hello world")
    assert out == {"count": len(ids), "max_model_len": gen.engine.admission.shape.max_positions, "tokens": ids,
                   "token_strs": tokenizer.convert_ids_to_tokens(ids)}  # fmt: skip
    messages = [{"role": "user", "content": "Hi"}]
    chat = client.post("/tokenize", json={"model": "tiny", "messages": messages, "tools": [TOOL]}).json()
    expected = ChatFormat.of(tokenizer).render(tokenizer, messages, ToolUse((TOOL,)), True)
    assert chat["tokens"] == expected and chat["count"] == len(expected)
    # the same chat through chat completions prefills exactly these tokens
    done = client.post("/v1/chat/completions", json={"model": "tiny", "messages": messages, "tools": [TOOL],
                                                     "max_tokens": 1}).json()  # fmt: skip
    assert done["usage"]["prompt_tokens"] == chat["count"]
    bare = client.post("/tokenize", json={"messages": messages, "add_generation_prompt": False}).json()
    assert bare["tokens"] == list(tokenizer.apply_chat_template(messages, return_dict=False))


def test_detokenize_round_trips(http, tokenizer):
    client, _ = http
    ids = tokenizer.encode("Round trip, ünïcode.")
    assert client.post("/detokenize", json={"tokens": ids}).json() == {"prompt": tokenizer.decode(ids)}


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/tokenize", {}, "prompt"),
        ("/tokenize", {"prompt": "x", "messages": [{"role": "user", "content": "x"}]}, "prompt"),
        (
            "/tokenize",
            {"messages": [{"role": "user", "content": "x"}], "add_special_tokens": 1},
            "add_special_tokens",
        ),
        ("/tokenize", {"prompt": "x", "model": "other"}, "model"),
        ("/tokenize", {"prompt": "x", "bogus": 1}, "bogus"),
        ("/detokenize", {"tokens": [-1]}, "tokens"),
        ("/detokenize", {"tokens": [10**9]}, "tokens"),
        ("/detokenize", {"tokens": "abc"}, "tokens"),
    ],
)
def test_bad_input_is_a_400_naming_the_field(http, path, body, param):
    response = http[0].post(path, json=body)
    assert response.status_code in (400, 404), response.text
    error = response.json()["error"]
    assert error["message"] and (error["param"] == param or param == "model")


def test_openapi_json_lists_every_endpoint(http):
    schema = http[0].get("/openapi.json").json()
    paths = set(schema["paths"])
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/conversations", "/tokenize",
                 "/detokenize", "/v1/models"):  # fmt: skip
        assert path in paths, path
    assert http[0].get("/docs").status_code == 404  # Swagger UI loads its assets from a CDN: not served
