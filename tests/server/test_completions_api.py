"""`POST /v1/completions` through the official `openai` client against a real server on 127.0.0.1 (tiny float64
model, SmolLM2's tokenizer): text and token-id prompts, several prompts with n candidates, logprobs, echo,
streaming, and what is refused — checked against the library's `complete` on the same weights."""

from __future__ import annotations

import pytest

from pensieve import CacheConfig, SamplingParams, StatefulGenerator
from tests.server.common import make_model, openai_client, served_tiny

openai = pytest.importorskip("openai")

from pensieve.server import ServerConfig  # noqa: E402

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def client(tokenizer):
    with served_tiny(tokenizer, ServerConfig(model_name="tiny", max_tokens=32), num_device_blocks=1024) as (_, server):
        yield openai_client(server)


@pytest.fixture(scope="module")
def reference(tokenizer):
    with StatefulGenerator(make_model(tokenizer), tokenizer, CacheConfig(block_size=4, num_device_blocks=1024)) as g:
        yield g


def test_text_and_ids_prompts_n_logprobs_and_echo(client, reference, tokenizer):
    ids = tokenizer(PROMPT)["input_ids"]
    expected = reference.complete(ids, SamplingParams(max_new_tokens=8, temperature=0, logprobs=2))
    out = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=0, logprobs=2)
    (choice,) = out.choices
    assert choice.text == expected.text and out.usage.completion_tokens == len(expected.token_ids)
    assert choice.logprobs.token_logprobs == pytest.approx([t.logprob for t in expected.logprobs])
    assert "".join(choice.logprobs.tokens) == tokenizer.decode(expected.token_ids)
    assert all(len(top) <= 2 for top in choice.logprobs.top_logprobs)
    # the same prompt as ids, twice, with two seeded candidates each: four choices, in order
    sp = SamplingParams(max_new_tokens=6, temperature=1.0, seed=3, n=2)
    seeded = reference.complete(ids, sp)
    out = client.completions.create(model="tiny", prompt=[ids, ids], max_tokens=6, temperature=1.0, seed=3, n=2)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert [c.text for c in out.choices] == [seeded.text, seeded.candidates[0].text] * 2
    echoed = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=0, echo=True)
    assert echoed.choices[0].text == PROMPT + expected.text
    # a prompt that extends the last one (prompt + reply) finds its KV in the prompt tree
    more = client.completions.create(model="tiny", prompt=PROMPT + expected.text + " And", max_tokens=2)
    assert more.usage.prompt_tokens_details.cached_tokens >= len(ids) - 4


def test_streamed_pieces_join_to_the_reply(client):
    whole = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=10, temperature=0)
    chunks = list(client.completions.create(model="tiny", prompt=PROMPT, max_tokens=10, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))  # fmt: skip
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"echo": True, "logprobs": 1}, "echo"),
        ({"suffix": "end"}, "suffix"),
        ({"best_of": 3}, "best_of"),
        ({"prompt": [10**7]}, "token ids"),
        ({"prompt": ""}, "prompt"),
        ({"max_tokens": 999}, "max_tokens 999"),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
def test_refused_with_a_400_naming_the_field(client, extra, field, stream):
    """Streamed too: a turn refused at admission is a 400 before the stream's 200."""
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(model="tiny", **{"prompt": PROMPT, "max_tokens": 4, "stream": stream, **extra})
    assert field in refused.value.body["message"]


def test_one_bad_prompt_refuses_the_request(client, tokenizer):
    ids = tokenizer(PROMPT)["input_ids"]
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model="tiny", prompt=[ids, [10**7]], max_tokens=4, stream=stream)
