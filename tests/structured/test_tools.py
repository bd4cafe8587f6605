"""Tools in text mode: tools rendered through the chat template (or the generic fallback in the system prompt),
calls forced by a grammar and parsed back, the raw call text never streamed, and a tool result that continues the
conversation appended to the sampled tokens (the call is not re-rendered), checked against HF generate over the
same tokens (float64 tiny models over SmolLM2's tokenizer).
"""

import copy
import json

import jsonschema
import pytest
import torch

from pensieve import CacheConfig, SamplingParams, StatefulGenerator, StructuredOutput
from pensieve.engine.detokenizer import TextStream
from pensieve.structured.grammar import tool_call_grammar
from pensieve.structured.tools import ChatFormat, ToolUse
from tests.structured.conftest import WEATHER
from tests.structured.grammar_oracle import hf_constrained
from tests.tiny import oracle_copy

pytest.importorskip("xgrammar")

CLOCK = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {"type": "object", "properties": {"utc": {"type": "boolean"}}, "required": ["utc"]},
    },
}
TOOLS = [WEATHER, CLOCK]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


def hf_reply(oracle, ids: list[int], max_new_tokens: int) -> list[int]:
    with torch.no_grad():
        out = oracle.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, len(ids) :].tolist()


def tokens_of(gen, conv_id) -> list[int]:
    return gen.call(lambda: list(gen.engine.kv.conversations[conv_id].tokens))


def valid(call) -> dict:
    args = json.loads(call.arguments)
    jsonschema.validate(args, SCHEMAS[call.name])
    return args


def test_formats_of_the_templates(smol_tokenizer, hermes_tokenizer):
    assert (ChatFormat(smol_tokenizer).format, ChatFormat(smol_tokenizer).renders_tools) == ("hermes", False)
    assert (ChatFormat(hermes_tokenizer).format, ChatFormat(hermes_tokenizer).renders_tools) == ("hermes", True)


@pytest.mark.parametrize("template", ["hermes", "generic"])
def test_forced_calls_parse_validate_and_the_tool_result_keeps_the_kv(
    model, smol_tokenizer, hermes_tokenizer, template
):
    tokenizer = hermes_tokenizer if template == "hermes" else smol_tokenizer
    oracle = oracle_copy(model)
    sp = SamplingParams(max_new_tokens=80, temperature=0)
    with StatefulGenerator(model, tokenizer, CacheConfig(block_size=8, num_device_blocks=256)) as gen:
        reply = gen.generate("a", "Weather in Paris?", sp, tools=ToolUse(TOOLS, "required", False))
        assert reply.finish_reason == "stop" and reply.text == "" and len(reply.tool_calls) == 1
        for call in reply.tool_calls:
            valid(call)
        history = tokens_of(gen, "a")
        grammar = tool_call_grammar(TOOLS, ["get_weather", "get_time"], False, "hermes")
        assert reply.token_ids == hf_constrained(oracle, tokenizer, history[: -len(reply.token_ids)], grammar, 80)
        rendered = smol_tokenizer.decode(history)
        if template == "generic":  # the tools are described in the system prompt
            assert "<tools>" in rendered and '"get_weather"' in rendered
        # the tool result: only it and the generation prompt are prefilled, the sampled call is kept as sampled
        results = [{"role": "tool", "tool_call_id": c.id, "content": '{"temp": 18}'} for c in reply.tool_calls]
        more = gen.generate("a", results, sp, tools=TOOLS)
        after = tokens_of(gen, "a")
        assert after[: len(history)] == history
        assert more.num_recomputed == 0 and more.num_reused_device == len(history) - 1
        assert more.num_prefilled == more.num_new_tokens + 1
        assert more.token_ids == hf_reply(oracle, after[: -len(more.token_ids)], 80)
        # the record holds the call as OpenAI's message shape
        messages = gen.call(lambda: gen.engine.kv.conversations["a"].messages)
        assert messages[1]["tool_calls"][0]["function"]["name"] == reply.tool_calls[0].name
        assert [m["role"] for m in messages] == ["user", "assistant", *["tool"] * len(results), "assistant"]
        gen.check_integrity()
    if template == "hermes":  # the case this covers: re-rendering the call would have changed its tokens
        rerender = hermes_tokenizer.apply_chat_template(messages[:2], tools=TOOLS, return_dict=False)
        assert list(rerender) != history[: len(rerender)]


def test_a_named_tool_and_no_parallel_calls(model, hermes_tokenizer):
    sp = SamplingParams(max_new_tokens=60, temperature=1.0, seed=4)
    named = {"type": "function", "function": {"name": "get_time"}}
    with StatefulGenerator(model, hermes_tokenizer, CacheConfig(block_size=8, num_device_blocks=256)) as gen:
        for i in range(3):
            reply = gen.generate(f"n{i}", "What time is it?", sp, tools=ToolUse(TOOLS, named))
            assert [c.name for c in reply.tool_calls] == ["get_time"]
            valid(reply.tool_calls[0])
        one = gen.generate("p", "Both?", sp, tools=ToolUse(TOOLS, "required", False))
        assert len(one.tool_calls) == 1
        budget = SamplingParams(max_new_tokens=300, temperature=1.0, seed=2)
        several = [gen.generate(f"m{i}", "Both?", budget, tools=ToolUse(TOOLS, "required")) for i in range(4)]
        assert all(r.finish_reason == "stop" and r.tool_calls for r in several)
        assert max(len(r.tool_calls) for r in several) > 1  # parallel calls: one reply, several calls
        for call in [c for r in several for c in r.tool_calls]:
            valid(call)
        gen.check_integrity()


def test_a_calls_text_is_never_streamed(model, hermes_tokenizer):
    with StatefulGenerator(model, hermes_tokenizer, CacheConfig(block_size=8, num_device_blocks=256)) as gen:
        for name, budget in (("s", 60), ("cut", 30)):  # complete, and cut off in a later parallel call
            stream = gen.stream(
                name,
                "Weather?",
                SamplingParams(max_new_tokens=budget, temperature=0),
                tools=ToolUse(TOOLS, "required"),
            )
            pieces = list(stream)
            assert pieces == [] and stream.reply.text == "", pieces
        assert stream.reply.finish_reason == "length"


def test_the_hold_back_shows_content_and_keeps_calls(smol_tokenizer):
    """Token by token through the detokenizer: content before a call streams, the call's text is held and parsed;
    text that only looked like a call (invalid JSON) is released at the end as content (vLLM's rule)."""
    fmt = ChatFormat(smol_tokenizer)
    for text, shown, calls in [
        (
            'Let me check.<tool_call>\n{"name": "get_time", "arguments": {"utc": true}}\n</tool_call>',
            "Let me check.",
            1,
        ),
        ("No call here, <tool but text.", "No call here, <tool but text.", 0),
        ('Oops <tool_call>{"name": broken}</tool_call>', 'Oops <tool_call>{"name": broken}</tool_call>', 0),
    ]:
        hold = fmt.hold_back()
        stream = TextStream(smol_tokenizer, [hold])
        pieces = [stream.add(t) for t in smol_tokenizer.encode(text, add_special_tokens=False)]
        pieces.append(stream.finish())
        assert "".join(pieces) == stream.reply_text == shown
        assert len(hold.parsed.tool_calls) == calls
        assert all("<tool_call>" not in p for p in pieces) or not calls


def test_tool_choice_none_renders_tools_and_parses_nothing(model, hermes_tokenizer):
    with StatefulGenerator(model, hermes_tokenizer, CacheConfig(block_size=8, num_device_blocks=256)) as gen:
        reply = gen.generate("x", "hi", SamplingParams(max_new_tokens=5), tools=ToolUse(TOOLS, "none"))
        assert reply.tool_calls == ()
        assert "<tools>" in hermes_tokenizer.decode(tokens_of(gen, "x"))


def test_completions_take_tools_too(model, hermes_tokenizer):
    with StatefulGenerator(model, hermes_tokenizer, CacheConfig(block_size=8, num_device_blocks=256)) as gen:
        reply = gen.complete([{"role": "user", "content": "Weather?"}], SamplingParams(max_new_tokens=60),
                             tools=ToolUse(TOOLS, "required"))  # fmt: skip
        assert reply.tool_calls and valid(reply.tool_calls[0]) is not None
        assert gen.conversations() == []


@pytest.mark.parametrize(
    ("tools", "message"),
    [  # a list is passed as it is; a tuple is ToolUse's arguments (tools, tool_choice, parallel_tool_calls)
        ([{"type": "function"}], "tools must be a list"),
        ((TOOLS, "sometimes"), "tool_choice must be one of"),
        ((TOOLS, {"type": "function", "function": {"name": "nope"}}), "names no tool"),
        ([WEATHER, WEATHER], "unique"),
        (((), "required"), "needs tools"),
        ((TOOLS, "auto", "yes"), "parallel_tool_calls must be a bool"),
    ],
)
def test_bad_tools_are_named_and_change_nothing(model, hermes_tokenizer, tools, message):
    with StatefulGenerator(model, hermes_tokenizer, CacheConfig(block_size=8, num_device_blocks=64)) as gen:
        gen.generate("c", "hi", SamplingParams(max_new_tokens=2))
        before = tokens_of(gen, "c")
        with pytest.raises(ValueError, match=message):
            use = tools if isinstance(tools, list) else ToolUse(*tools)
            gen.generate("c", "again", SamplingParams(max_new_tokens=2), tools=use)
        with pytest.raises(ValueError, match="a str 'role' and a str 'content'"):
            gen.generate("c", {"role": "tool", "content": 3})
        assert tokens_of(gen, "c") == before
        gen.check_integrity()
    with StatefulGenerator(model, None, CacheConfig(block_size=8, num_device_blocks=64)) as gen:
        with pytest.raises(ValueError, match="tools need a tokenizer"):
            gen.generate("raw", [1, 2, 3], tools=TOOLS)
        assert gen.conversations() == []
    assert ToolUse(tuple(TOOLS)).forced is None and ToolUse(tuple(TOOLS), "required").forced == [
        "get_weather",
        "get_time",
    ]


def test_candidates_carry_their_own_calls_and_bad_grammars_are_value_errors(model, hermes_tokenizer):
    sp = SamplingParams(max_new_tokens=60, temperature=1.0, seed=1, n=3)
    with StatefulGenerator(model, hermes_tokenizer, CacheConfig(block_size=8, num_device_blocks=256)) as gen:
        reply = gen.generate("c", "Weather?", sp, tools=ToolUse(TOOLS, "required", False))
        for r in (reply, *reply.candidates):
            assert r.text == "" and len(r.tool_calls) == 1
            valid(r.tool_calls[0])
        bad = {"type": "function", "function": {"name": "f", "parameters": {"type": "strin"}}}
        with pytest.raises(ValueError, match="not a JSON schema"):
            gen.generate("d", "x", SamplingParams(max_new_tokens=4), tools=ToolUse([bad], "required"))
        with pytest.raises(ValueError, match="names no tool"):
            gen.generate("d", "x", tools=ToolUse(TOOLS, {"type": "function", "function": "get_time"}))
        call = {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": {}}}]}
        with pytest.raises(ValueError, match="a str 'role' and a str 'content'"):
            gen.generate("d", [call, {"role": "tool", "content": "1"}], tools=TOOLS)
        emoji = gen.generate(
            "e", "Mood?", SamplingParams(max_new_tokens=8, structured_output=StructuredOutput(choice=["😀", "é"]))
        )
        assert emoji.text in ("😀", "é") and emoji.finish_reason == "stop"
        gen.check_integrity()


def test_tools_given_or_changed_on_a_later_turn_reach_the_prompt(model, smol_tokenizer, tmp_path):
    """The tools are part of the prompt: a turn whose tools differ from those its history was rendered with renders
    the conversation whole (with the new tools); with the same tools only the new message is appended. The tools'
    key survives an abort (put back) and a restart (in the disk record)."""
    sp = SamplingParams(max_new_tokens=5, temperature=0, ignore_eos=True)
    chat = ChatFormat.of(smol_tokenizer)
    cfg = CacheConfig(block_size=8, num_device_blocks=256, disk_dir=str(tmp_path))

    def prompt_of(gen, reply):
        return tokens_of(gen, "a")[: -len(reply.token_ids)]

    def rendered(gen, tools):
        messages = gen.call(lambda: gen.engine.kv.conversations["a"].messages)
        return chat.render(smol_tokenizer, messages[:-1], tools, add_generation_prompt=True)

    with StatefulGenerator(model, smol_tokenizer, cfg) as gen:
        gen.generate("a", "Hi", sp)
        reply = gen.generate("a", "Weather?", sp, tools=[WEATHER])  # tools given: the system prompt describes them
        assert prompt_of(gen, reply) == rendered(gen, ToolUse((WEATHER,)))
        text = smol_tokenizer.decode(prompt_of(gen, reply))
        assert '"get_weather"' in text and '"get_time"' not in text
        history = tokens_of(gen, "a")
        reply = gen.generate("a", "And Oslo?", sp, tools=ToolUse([WEATHER], "none"))  # same tools: appended
        assert prompt_of(gen, reply)[: len(history)] == history and reply.num_recomputed == 0
        history = tokens_of(gen, "a")
        future = gen.submit("a", "What time is it?", sp, tools=TOOLS)  # changed, then aborted: put back
        gen.call(gen.engine.step)
        assert gen.abort(future)
        assert tokens_of(gen, "a") == history
        reply = gen.generate("a", "What time is it?", sp, tools=[WEATHER])
        assert prompt_of(gen, reply)[: len(history)] == history
        reply = gen.generate("a", "What time is it now?", sp, tools=TOOLS)  # changed: rendered whole
        assert prompt_of(gen, reply) == rendered(gen, ToolUse(tuple(TOOLS)))
        assert '"get_time"' in smol_tokenizer.decode(prompt_of(gen, reply))
        history = tokens_of(gen, "a")
    with StatefulGenerator(model, smol_tokenizer, cfg) as gen:  # a restart: the record knows the tools
        reply = gen.generate("a", "Thanks", sp, tools=TOOLS)
        assert prompt_of(gen, reply)[: len(history)] == history
        history = tokens_of(gen, "a")
        reply = gen.generate("a", "Bye", sp)  # tools gone: rendered whole, without them
        assert prompt_of(gen, reply) == rendered(gen, None)
        assert "<tools>" not in smol_tokenizer.decode(prompt_of(gen, reply))
        gen.check_integrity()


def test_token_id_turns_force_and_parse_calls_the_caller_rendered(model, hermes_tokenizer):
    """A raw token turn with tools (the caller rendered them into the prompt, as the server's Responses threads do):
    the same forced call, parsed, and the same tokens as the text-mode turn."""
    sp = SamplingParams(max_new_tokens=80, temperature=0)
    msgs = [{"role": "user", "content": "Weather in Paris?"}]
    with StatefulGenerator(model, hermes_tokenizer, CacheConfig(block_size=8, num_device_blocks=256)) as gen:
        text = gen.generate("text", msgs, sp, tools=ToolUse(TOOLS, "required"))
        ids = ChatFormat.of(hermes_tokenizer).render(hermes_tokenizer, msgs, ToolUse(tuple(TOOLS)), True)
        raw = gen.generate("raw", ids, sp, tools=ToolUse(TOOLS, "required"))
        assert raw.token_ids == text.token_ids and raw.text == ""
        assert [(c.name, c.arguments) for c in raw.tool_calls] == [(c.name, c.arguments) for c in text.tool_calls]
        assert tokens_of(gen, "raw") == tokens_of(gen, "text")
        gen.check_integrity()


def test_a_template_that_refuses_the_messages_is_a_value_error(model, smol_tokenizer):
    tok = copy.deepcopy(smol_tokenizer)
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system messages') }}{% endif %}"
        "{{ m['content'] }}{% endfor %}"
    )
    with StatefulGenerator(model, tok, CacheConfig(block_size=8, num_device_blocks=64)) as gen:
        with pytest.raises(ValueError, match="the chat template refused the messages: no system messages"):
            gen.complete([{"role": "system", "content": "x"}, {"role": "user", "content": "y"}])
        with pytest.raises(ValueError, match="no system messages"):
            gen.generate("c", [{"role": "system", "content": "x"}])
        assert gen.conversations() == []
