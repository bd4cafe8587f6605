"""The tool-call parsers per family, on the outputs the peers' own tests use (each case names its source).

Sources (file, repository, commit of the version read):
  VLLM_HERMES   vllm-project/vllm tests/tool_parsers/test_hermes_tool_parser.py @ 0eb73d6a
  VLLM_QWQ      vllm-project/vllm tests/entrypoints/openai/tool_parsers/test_hermes_tool_parser.py @ 06b888c8
                (the tail of a QwQ-32B output its author recorded)
  LLAMACPP      ggml-org/llama.cpp tests/test-chat.cpp @ e7e21164
  VLLM_LLAMA3   vllm-project/vllm tests/entrypoints/openai/tool_parsers/test_llama3_json_tool_parser.py @ b16e5bcc
  SGLANG        sgl-project/sglang test/srt/test_function_call_parser.py @ 03400a9e
  VLLM_MISTRAL  vllm-project/vllm tests/tool_parsers/test_mistral_tool_parser.py @ ff583b3c
  VLLM_QWEN3    vllm-project/vllm tests/reasoning/test_qwen3_reasoning_parser.py (the cases of PR #34779)
"""

import json

import pytest

from pensieve.structured.reasoning import split_reasoning
from pensieve.structured.tools import (
    FORMATS,
    detect_format,
    parse_hermes,
    parse_llama3_json,
    parse_mistral,
)


def calls(parsed):
    return [(c.name, json.loads(c.arguments)) for c in parsed.tool_calls]


HERMES_CASES = [
    # (source, output, content, calls)
    (
        "VLLM_HERMES",
        '<tool_call>\n{"name": "final_answer", "arguments": {"trigger": true}}\n</tool_call>',
        None,
        [("final_answer", {"trigger": True})],
    ),
    (  # no closing tag: the model stopped at EOS
        "VLLM_HERMES",
        '<tool_call>\n{"name": "final_answer", "arguments": {"trigger": true}}',
        None,
        [("final_answer", {"trigger": True})],
    ),
    (
        "VLLM_HERMES",
        'Sure, let me check the weather.<tool_call>{"name": "get_weather", "arguments": {"city": "NYC"}}</tool_call>',
        "Sure, let me check the weather.",
        [("get_weather", {"city": "NYC"})],
    ),
    (
        "VLLM_HERMES",
        '<tool_call>{"name": "search", "arguments": {"q": "cats"}}</tool_call>'
        '<tool_call>{"name": "search", "arguments": {"q": "dogs"}}</tool_call>',
        None,
        [("search", {"q": "cats"}), ("search", {"q": "dogs"})],
    ),
    (  # arguments written as a JSON string (Granite 4)
        "VLLM_HERMES",
        '<tool_call>\n{"name": "get_db_config", "arguments": "{\\"param\\": \\"max_connections\\"}"}\n</tool_call>',
        None,
        [("get_db_config", {"param": "max_connections"})],
    ),
    ("VLLM_HERMES", "This is not a tool call.", "This is not a tool call.", []),
    (
        "LLAMACPP",
        'Hello, world!\nWhat\'s up?<tool_call>\n{"name": "special_function", "arguments": {"arg1": 1}}\n</tool_call>',
        "Hello, world!\nWhat's up?",
        [("special_function", {"arg1": 1})],
    ),
    (
        "LLAMACPP",
        '<tool_call>\n{"name": "special_function", "arguments": {"arg1": 1}}\n</tool_call>\n<tool_call>\n'
        '{"name": "python", "arguments": {"code":"print(\'hello\')"}}\n</tool_call>',
        None,
        [("special_function", {"arg1": 1}), ("python", {"code": "print('hello')"})],
    ),
]


@pytest.mark.parametrize(("source", "output", "content", "expected"), HERMES_CASES)
def test_hermes(source, output, content, expected):
    parsed = parse_hermes(output)
    assert parsed.content == content, source
    assert calls(parsed) == expected, source


def test_hermes_keeps_the_calls_before_one_cut_off():
    output = '<tool_call>\n{"name": "a", "arguments": {}}\n</tool_call>\n<tool_call>\n{"name": "b", "argu'
    assert calls(parse_hermes(output)) == [("a", {})]
    closed_bad = '<tool_call>\n{"name": "a", "arguments": {}}\n</tool_call><tool_call>{"name": b}</tool_call>'
    assert parse_hermes(closed_bad).tool_calls == () and parse_hermes(closed_bad).content == closed_bad


def test_hermes_invalid_json_is_all_content():  # VLLM_HERMES: "tools_called" is False, the text comes back
    output = '<tool_call>\n{"name": "final_answer", "arguments": {"trigger": true}'
    assert parse_hermes(output).tool_calls == () and parse_hermes(output).content == output


def test_qwq_recorded_reasoning_then_call():  # VLLM_QWQ: the template opened <think> in the prompt
    output = (
        "。\n</think>\n\n<tool_call>"
        '\n{"name": "internet_search", "arguments": {"question": "5MW燃气轮机设计参数 空气流量 压气机'
        '压比 转速 燃烧室出口温度 压气机级数 支点布局"}}\n</tool_call>\n\n '
    )
    reasoning, rest = split_reasoning(output, opened=True)
    assert reasoning == "。\n"
    parsed = parse_hermes(rest)
    assert parsed.content is None
    assert calls(parsed) == [
        (
            "internet_search",
            {"question": "5MW燃气轮机设计参数 空气流量 压气机压比 转速 燃烧室出口温度 压气机级数 支点布局"},
        )
    ]
    assert json.loads(parsed.tool_calls[0].arguments)  # arguments are JSON text, non-ASCII kept as is
    assert "燃气" in parsed.tool_calls[0].arguments


LLAMA3_CASES = [
    (
        "VLLM_LLAMA3",
        '{"name": "searchTool", "parameters": {"query": "test query", "limit": 10}}',
        None,
        [("searchTool", {"query": "test query", "limit": 10})],
    ),
    (
        "VLLM_LLAMA3",
        '{"name": "searchTool", "arguments": {"query": "test"}}',
        None,
        [("searchTool", {"query": "test"})],
    ),
    (
        "VLLM_LLAMA3",
        '{"name": "searchTool", "parameters": {"query": "test1"}}; {"name": "getOpenIncidentsTool", "parameters": {}}; '
        '{"name": "searchTool", "parameters": {"query": "test2"}}',
        None,
        [("searchTool", {"query": "test1"}), ("getOpenIncidentsTool", {}), ("searchTool", {"query": "test2"})],
    ),
    (
        "SGLANG",
        '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}};'
        '{"name": "get_tourist_attractions", "parameters": {"city": "Paris"}}',
        None,
        [("get_weather", {"city": "Paris"}), ("get_tourist_attractions", {"city": "Paris"})],
    ),
    (
        "SGLANG",
        '{"name": "get_weather", "parameters": {}} Some follow-up text',
        "Some follow-up text",
        [("get_weather", {})],
    ),
    (
        "SGLANG",
        'Some intro. <|python_tag|>{"name": "get_weather", "parameters": {}}',
        "Some intro.",
        [("get_weather", {})],
    ),
    ("LLAMACPP", '{"name": "special_function", "parameters": {"arg1": 1}}', None, [("special_function", {"arg1": 1})]),
]


@pytest.mark.parametrize(("source", "output", "content", "expected"), LLAMA3_CASES)
def test_llama3_json(source, output, content, expected):
    parsed = parse_llama3_json(output)
    assert parsed.content == content, source
    assert calls(parsed) == expected, source


@pytest.mark.parametrize(
    "output",
    ['{"name": "invalidTool", "parameters": {invalid json}', '{"parameters": {}}', '{"name": "toolWithoutParams"}'],
)
def test_llama3_json_without_a_valid_call_is_all_content(output):  # VLLM_LLAMA3
    assert parse_llama3_json(output).tool_calls == () and parse_llama3_json(output).content == output


MISTRAL_CASES = [
    (
        "VLLM_MISTRAL",
        '[TOOL_CALLS][{"name": "add", "arguments":{"a": 3.5, "b": 4}}]',
        None,
        [("add", {"a": 3.5, "b": 4})],
    ),
    (
        "VLLM_MISTRAL",
        '[TOOL_CALLS] [{"arguments":{"city": "San Francisco", "state": "CA", "unit": "celsius"}, '
        '"name": "get_current_weather"}]',
        None,
        [("get_current_weather", {"city": "San Francisco", "state": "CA", "unit": "celsius"})],
    ),
    (
        "VLLM_MISTRAL",
        '[TOOL_CALLS] [{"name": "add", "arguments": {"a": 3.5, "b": 4}}, {"name": "get_current_weather", '
        '"arguments":{"city": "San Francisco", "state": "CA", "unit": "celsius"}}]',
        None,
        [
            ("add", {"a": 3.5, "b": 4}),
            ("get_current_weather", {"city": "San Francisco", "state": "CA", "unit": "celsius"}),
        ],
    ),
    (
        "VLLM_MISTRAL",
        '[TOOL_CALLS]  [ {"name":"add" , "arguments" : {"a": 3, "b": 4} } ]',
        None,
        [("add", {"a": 3, "b": 4})],
    ),
    (  # v11+ as vLLM's test feeds it (no [ARGS])
        "VLLM_MISTRAL",
        '[TOOL_CALLS]add{"a": 3.5, "b": 4}[TOOL_CALLS]multiply{"a": 3, "b": 6}',
        None,
        [("add", {"a": 3.5, "b": 4}), ("multiply", {"a": 3, "b": 6})],
    ),
    (
        "VLLM_MISTRAL",
        'bla[TOOL_CALLS]add_this_and_that{"a": 3.5, "b": 4}',
        "bla",
        [("add_this_and_that", {"a": 3.5, "b": 4})],
    ),
    (  # v11+ with [ARGS] as HF tokenizers decode it (llama.cpp's Ministral-3 template test)
        "LLAMACPP",
        '[TOOL_CALLS]special_function[ARGS]{"arg1": 1}'
        '[TOOL_CALLS]special_function_with_opt[ARGS]{"arg1": 1, "arg2": 2}',
        None,
        [("special_function", {"arg1": 1}), ("special_function_with_opt", {"arg1": 1, "arg2": 2})],
    ),
    (
        "LLAMACPP",
        '[TOOL_CALLS][{"name": "special_function", "arguments": {"arg1": 1}, "id": "123456789"}]',
        None,
        [("special_function", {"arg1": 1})],
    ),
    (
        "SGLANG",
        'Here is some text before the tool call: [TOOL_CALLS] [{"name":"make_next_step_decision", '
        '"arguments":{"decision":"ANSWER", "content":"The answer is 42"}}]',
        "Here is some text before the tool call:",
        [("make_next_step_decision", {"decision": "ANSWER", "content": "The answer is 42"})],
    ),
]


@pytest.mark.parametrize(("source", "output", "content", "expected"), MISTRAL_CASES)
def test_mistral(source, output, content, expected):
    parsed = parse_mistral(output)
    assert parsed.content == content, source
    assert calls(parsed) == expected, source


QWEN3_CASES = [  # VLLM_QWEN3: (output, reasoning, rest); opened: the prompt ends in an open <think> block
    ("<think>This is a reasoning section</think>This is the rest", "This is a reasoning section", "This is the rest"),
    ("This is a reasoning section</think>This is the rest", "This is a reasoning section", "This is the rest"),
    ("This is a reasoning section</think>", "This is a reasoning section", ""),
    ("<think>This is a reasoning section", "This is a reasoning section", ""),
]


@pytest.mark.parametrize(("output", "reasoning", "rest"), QWEN3_CASES)
def test_qwen3_reasoning(output, reasoning, rest):
    opened = not output.startswith("<think>")  # vLLM's cases with no <think>: the template opened it in the prompt
    assert split_reasoning(output, opened=opened) == (reasoning, rest)


def test_reasoning_is_where_the_prompt_or_the_reply_opened_it():
    # vLLM's current parser calls text before a </think> reasoning (and a reply with no </think> truncated
    # reasoning) even without <think>; pensieve asks the prompt: with no open block, only a reply that opens <think>
    # reasons, so a reply streams as content from its first token.
    assert split_reasoning("This is the rest") == (None, "This is the rest")
    assert split_reasoning("Not reasoning</think>rest") == (None, "Not reasoning</think>rest")
    assert split_reasoning("  \n<think>\nhm\n</think>\n\nHi") == ("\nhm\n", "Hi")
    assert split_reasoning("<think></think>Hi") == ("", "Hi")
    assert split_reasoning("<thin") == (None, "<thin")
    assert split_reasoning("", opened=True) == ("", "")


def test_formats_by_template():
    assert detect_format("{% for m in messages %}<|im_start|>{{ m.content }}{% endfor %}") == ("hermes", False)
    assert detect_format("{% if tools %}<tools>{{ tools }}</tools>{% endif %}<tool_call>") == ("hermes", True)
    assert detect_format("{% if tools %}[AVAILABLE_TOOLS]{% endif %}[TOOL_CALLS]") == ("mistral", True)
    assert detect_format("<|start_header_id|>{% if tools %}parameters{% endif %}<|python_tag|>")[0] == "llama3_json"
    assert set(FORMATS) == {"hermes", "llama3_json", "mistral"}
