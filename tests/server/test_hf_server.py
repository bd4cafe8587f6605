"""The HF stateless peer of benchmarks/scale.py (benchmarks/hf_server.py): its replies are HF generate's over the
whole history, streamed or not, and it honours ignore_eos and the usage chunk, as the benchmark's client needs."""

import json
import sys

import pytest

from tests.server.common import hf_reply, make_model
from tests.tiny import hf_greedy, oracle_copy

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2] / "benchmarks"))


@pytest.fixture(scope="module")
def client(tokenizer):
    from fastapi.testclient import TestClient
    from hf_server import create_app

    model = make_model(tokenizer)
    with TestClient(create_app(model, tokenizer, "bench")) as client:
        yield client, oracle_copy(model)


MESSAGES = [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "Hi! How can I help?"},
            {"role": "user", "content": "Tell me about caches."}]  # fmt: skip


def test_a_reply_is_hf_generate_over_the_whole_history(client, tokenizer):
    client, oracle = client
    body = client.post("/v1/chat/completions", json={"model": "bench", "messages": MESSAGES, "max_tokens": 12}).json()
    assert body["choices"][0]["message"]["content"] == hf_reply(oracle, tokenizer, MESSAGES, max_new_tokens=12)
    prompt = len(tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, return_dict=False))
    assert body["usage"]["prompt_tokens"] == prompt and body["usage"]["prompt_tokens_details"]["cached_tokens"] == 0


def test_streamed_with_ignore_eos_it_runs_to_max_tokens_and_ends_with_usage(client, tokenizer):
    client, oracle = client
    request = {"model": "bench", "messages": MESSAGES, "max_tokens": 20, "stream": True, "ignore_eos": True,
               "stream_options": {"include_usage": True}}  # fmt: skip
    with client.stream("POST", "/v1/chat/completions", json=request) as response:
        events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
    assert events[-1]["usage"]["completion_tokens"] == 20  # past any end-of-turn token the tiny model draws
    ids = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, return_dict=False)
    assert text == tokenizer.decode(hf_greedy(oracle, ids, 20, ignore_eos=True), skip_special_tokens=True)
