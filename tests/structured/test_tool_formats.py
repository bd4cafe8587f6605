"""Forced tool calls in every call format (structured.grammar.tool_call_grammar): Llama 3 JSON, Mistral's v3 list
and v11 `name[ARGS]` calls, on minimal templates of those families over SmolLM2's tokens (float64 tiny models). The
calls parse and validate, their text is never streamed, and the reply's tokens equal HF generate's under the same
grammar. Mistral's markers as special tokens: the grammar may write them as the one token, and the reply's text
keeps them for the parser."""

import copy
import json

import jsonschema
import pytest

from pensieve import CacheConfig, SamplingParams, StatefulGenerator, ToolUse
from pensieve.structured.grammar import tool_call_grammar
from pensieve.structured.tools import ChatFormat
from tests.structured.grammar_oracle import hf_constrained
from tests.tiny import drive, oracle_copy, tiny_model

pytest.importorskip("xgrammar")

LLAMA3 = (
    "{% if tools %}<|start_header_id|>system<|end_header_id|>\n"
    'Answer with a JSON function call {"name": function name, "parameters": its arguments}. Functions:\n'
    "{% for t in tools %}{{ t | tojson }}\n{% endfor %}<|eot_id|>{% endif %}"
    "{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n"
    "{% if m.tool_calls %}{% for c in m.tool_calls %}"
    '{"name": "{{ c.function.name }}", "parameters": {{ c.function.arguments }}}{% endfor %}'
    "{% else %}{{ m.content }}{% endif %}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n{% endif %}"
)
MISTRAL = (
    "{% if tools %}[AVAILABLE_TOOLS]{{ tools | tojson }}[/AVAILABLE_TOOLS]{% endif %}"
    "{% for m in messages %}{% if m.role == 'user' %}[INST]{{ m.content }}[/INST]"
    "{% elif m.tool_calls %}[TOOL_CALLS]{{ m.tool_calls | tojson }}</s>"
    "{% elif m.role == 'tool' %}[TOOL_RESULTS]{{ m.content }}[/TOOL_RESULTS]"
    "{% else %}{{ m.content }}</s>{% endif %}{% endfor %}"
)
MISTRAL_ARGS = MISTRAL.replace(
    "[TOOL_CALLS]{{ m.tool_calls | tojson }}",
    "{% for c in m.tool_calls %}[TOOL_CALLS]{{ c.function.name }}[ARGS]{{ c.function.arguments }}{% endfor %}",
)
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"enum": ["Paris", "Oslo"]}, "days": {"type": "integer"}},
            "required": ["city", "days"],
        },
    },
}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
TOOLS = [WEATHER, CLOCK]


def family(smol_tokenizer, template, specials=()):
    tok = copy.deepcopy(smol_tokenizer)
    tok.chat_template = template
    if specials:
        tok.add_special_tokens({"additional_special_tokens": list(specials)})
    model = tiny_model("llama", vocab=len(tok), seed=5)
    model.generation_config.eos_token_id = tok.convert_tokens_to_ids("<|im_end|>")
    return tok, model


CASES = {  # name: (template, special tokens added, the format ChatFormat should read, the forced calls' format)
    "llama3_json": (LLAMA3, (), "llama3_json", "llama3_json"),
    "mistral": (MISTRAL, (), "mistral", "mistral"),
    "mistral_special": (MISTRAL, ("[TOOL_CALLS]",), "mistral", "mistral"),
    "mistral_args_special": (MISTRAL_ARGS, ("[TOOL_CALLS]", "[ARGS]"), "mistral", "mistral_args"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_forced_calls_in_each_format(smol_tokenizer, case):
    template, specials, tool_format, call_format = CASES[case]
    tok, model = family(smol_tokenizer, template, specials)
    chat = ChatFormat(tok)
    assert (chat.format, chat.call_format) == (tool_format, call_format)
    kept = sorted(chat.kept_tokens)
    assert [chat.kept_tokens[i] for i in kept] == list(specials)
    # a bias towards the marker tokens: the grammar allows them where the marker goes, and the reply writes them
    bias = {i: 30.0 for i in kept}
    oracle = oracle_copy(model)
    with StatefulGenerator(model, tok, CacheConfig(block_size=8, num_device_blocks=256)) as gen:
        for i, (choice, parallel) in enumerate(
            [({"type": "function", "function": {"name": "get_weather"}}, True), ("required", False), ("required", True)]
        ):
            sp = SamplingParams(max_new_tokens=120, temperature=0, logit_bias=bias)
            deltas = []
            use = ToolUse(TOOLS, choice, parallel)
            future = gen.submit(f"c{i}", "Weather in Oslo?", sp, deltas.append, tools=use)
            reply = drive(gen, future)
            assert reply.finish_reason == "stop" and reply.text == "" and reply.tool_calls
            assert "".join(d.text for d in deltas) == ""
            assert parallel or len(reply.tool_calls) == 1
            for call in reply.tool_calls:
                assert choice == "required" or call.name == "get_weather"
                schema = next(t for t in TOOLS if t["function"]["name"] == call.name)["function"]["parameters"]
                jsonschema.validate(json.loads(call.arguments), schema)
            assert all(k in reply.token_ids for k in kept[:1])  # the marker is its special token
            tokens = gen.call(lambda c=f"c{i}": list(gen.engine.kv.conversations[c].tokens))
            prompt = tokens[: -len(reply.token_ids)]
            names = ["get_weather"] if isinstance(choice, dict) else ["get_weather", "get_time"]
            grammar = tool_call_grammar(TOOLS, names, parallel and len(names) > 1, call_format)
            bias_hf = {(k,): v for k, v in bias.items()} or None
            assert reply.token_ids == hf_constrained(oracle, tok, prompt, grammar, 120, kept, sequence_bias=bias_hf)
        gen.check_integrity()
