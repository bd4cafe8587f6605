"""Reasoning in <think> tags through the engine: kept out of Reply.text, returned as Reply.reasoning, streamed as
Delta.reasoning, recorded as the assistant message's reasoning_content; the prompt or the reply opens the block. A
regex structured output makes a tiny random model write a block (float64, SmolLM2's tokenizer), and the reply's
tokens are checked against HF generate under the same grammar."""

import copy
from pathlib import Path

import pytest

from pensieve import CacheConfig, SamplingParams, StatefulGenerator, StructuredOutput, ToolUse
from tests.structured.conftest import chat_model
from tests.structured.grammar_oracle import hf_constrained
from tests.tiny import drive, oracle_copy

pytest.importorskip("xgrammar")

HERMES = (Path(__file__).parents[1] / "fixtures" / "hermes_tools.jinja").read_text()
# the template thinks: past replies' reasoning is rendered (in <think> tags); the generation prompt may open a block
THINKING = HERMES.replace(
    "{{ m.content }}<|im_end|>",
    "{% if m.reasoning_content %}<think>{{ m.reasoning_content }}</think>\n{% endif %}{{ m.content }}<|im_end|>",
)
OPENS = THINKING.replace(
    "{%- if add_generation_prompt %}<|im_start|>assistant\n",
    "{%- if add_generation_prompt %}<|im_start|>assistant\n<think>\n",
)
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}


def with_template(tokenizer, template):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = template
    return tok


@pytest.fixture(scope="module")
def model(smol_tokenizer):
    return chat_model(smol_tokenizer, seed=3)


@pytest.mark.parametrize("opens", ["prompt", "reply"])
def test_reasoning_is_kept_out_of_the_text_and_streamed_apart(model, smol_tokenizer, opens):
    tokenizer = with_template(smol_tokenizer, OPENS if opens == "prompt" else THINKING)
    assert THINKING != HERMES and OPENS != THINKING
    head = "" if opens == "prompt" else "<think>"
    regex = head + r"[a-z]{2,10}</think>\n\n[A-Z][a-z]{1,6}"
    sp = SamplingParams(max_new_tokens=40, temperature=0, structured_output=StructuredOutput(regex=regex))
    oracle = oracle_copy(model)
    with StatefulGenerator(model, tokenizer, CacheConfig(block_size=8, num_device_blocks=128)) as gen:
        deltas = []
        reply = drive(gen, gen.submit("a", "Think first.", sp, on_token=deltas.append))
        tokens = gen.call(lambda: list(gen.engine.kv.conversations["a"].tokens))
        prompt = tokens[: -len(reply.token_ids)]
        assert smol_tokenizer.decode(prompt).endswith("assistant\n<think>\n") == (opens == "prompt")
        assert reply.token_ids == hf_constrained(oracle, tokenizer, prompt, StructuredOutput(regex=regex), 40)
        whole = smol_tokenizer.decode(reply.token_ids, skip_special_tokens=True)
        thought = whole[len(head) : whole.index("</think>")]
        assert reply.reasoning == thought and thought.isalpha() and thought.islower()
        assert reply.text == whole[whole.index("</think>") + len("</think>\n\n") :] and reply.text[0].isupper()
        assert "".join(d.reasoning for d in deltas) == reply.reasoning
        assert "".join(d.text for d in deltas) == reply.text
        message = gen.call(lambda: gen.engine.kv.conversations["a"].messages[-1])
        assert message == {"role": "assistant", "content": reply.text, "reasoning_content": reply.reasoning}
        # the next turn appends to the sampled tokens: the block stays in the KV as sampled
        more = gen.generate("a", "And then?", SamplingParams(max_new_tokens=4, temperature=0))
        assert more.num_recomputed == 0 and more.num_prefilled == more.num_new_tokens + 1
        gen.check_integrity()


def test_no_block_is_content_and_a_tool_call_follows_reasoning(model, smol_tokenizer):
    tokenizer = with_template(smol_tokenizer, THINKING)
    sp = SamplingParams(max_new_tokens=30, temperature=0, structured_output=StructuredOutput(regex=r"[A-Z][a-z]{1,8}"))
    call = '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
    forced = StructuredOutput(regex=r"<think>[a-z]{2,8}</think>\n" + call.replace("{", r"\{").replace("}", r"\}"))
    with StatefulGenerator(model, tokenizer, CacheConfig(block_size=8, num_device_blocks=128)) as gen:
        reply = gen.generate("a", "Hi", sp)
        assert reply.reasoning is None and reply.text and reply.text[0].isupper()
        reply = gen.generate("b", "Time?", SamplingParams(max_new_tokens=60, temperature=0, structured_output=forced),
                             tools=[TIME])  # fmt: skip
        assert reply.reasoning and reply.reasoning.isalpha()
        assert [(c.name, c.arguments) for c in reply.tool_calls] == [("get_time", "{}")] and reply.text == ""
        gen.check_integrity()


def test_a_forced_call_under_a_prompt_that_opened_a_block_is_a_call(model, smol_tokenizer):
    """A grammar that never writes </think> (a forced call) under a generation prompt that opened a block: the
    reply is content, and its call is parsed."""
    tokenizer = with_template(smol_tokenizer, OPENS)
    named = {"type": "function", "function": {"name": "get_time"}}
    with StatefulGenerator(model, tokenizer, CacheConfig(block_size=8, num_device_blocks=128)) as gen:
        sp = SamplingParams(max_new_tokens=60, temperature=0)
        reply = gen.generate("a", "Time?", sp, tools=ToolUse([TIME], named))
        assert reply.reasoning is None and reply.text == ""
        assert [c.name for c in reply.tool_calls] == ["get_time"] and reply.finish_reason == "stop"
        done = gen.complete([{"role": "user", "content": "Time?"}], sp, tools=ToolUse([TIME], named))
        assert [c.name for c in done.tool_calls] == ["get_time"]
