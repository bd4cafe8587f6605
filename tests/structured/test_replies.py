"""A stateless client's resent history keeps pensieve's sampled replies (engine.replies): the history comes back as
the client parsed it (a call's arguments re-serialized, its id kept or not), and the prompt is the remembered
sampled sequence with only the later messages rendered after it, checked against HF generate over that sequence;
the follow-up prefills only its new tokens + 1. Without the memory the call is re-rendered and the KV is lost."""

import json

import pytest

from pensieve import CacheConfig, SamplingParams, StatefulGenerator
from pensieve.engine.replies import ReplyMemory, history_keys, message_key
from pensieve.structured.tools import ChatFormat, ToolUse
from tests.structured.test_tools import TOOLS, hf_reply
from tests.tiny import oracle_copy

pytest.importorskip("xgrammar")

MSGS = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Weather in Paris?"}]
FORCED = {"type": "function", "function": {"name": "get_weather"}}


def resent(reply, spaced: bool) -> dict:
    """The assistant message as a client sends it back: arguments parsed and dumped again (other spacing, keys in
    reverse order) and a fresh call id."""
    calls = []
    for k, call in enumerate(reply.tool_calls):
        args = json.loads(call.arguments)
        text = json.dumps(dict(reversed(list(args.items()))), indent=1 if spaced else None)
        calls.append({"id": f"client-{k}", "type": "function", "function": {"name": call.name, "arguments": text}})
    return {"role": "assistant", "content": None, "tool_calls": calls}


@pytest.mark.parametrize("template", ["hermes", "generic"])
def test_a_resent_tool_call_keeps_its_sampled_tokens_and_kv(model, smol_tokenizer, hermes_tokenizer, template):
    tokenizer = hermes_tokenizer if template == "hermes" else smol_tokenizer
    oracle = oracle_copy(model)
    chat = ChatFormat.of(tokenizer)
    use = ToolUse(tuple(TOOLS))
    sp = SamplingParams(max_new_tokens=80, temperature=0)
    prefilled = {}
    for memory in (1 << 16, 0):
        cache = CacheConfig(block_size=8, num_device_blocks=512, reply_memory_tokens=memory)
        with StatefulGenerator(model, tokenizer, cache) as gen:
            first = gen.complete(MSGS, sp, tools=ToolUse(TOOLS, FORCED))
            (call,) = first.tool_calls
            sampled = chat.render(tokenizer, MSGS, use, add_generation_prompt=True) + first.token_ids
            history = [*MSGS, resent(first, spaced=memory == 0)]
            results = [{"role": "tool", "tool_call_id": "client-0", "content": '{"temp": 18}'}]
            second = gen.complete(history + results, sp, tools=TOOLS)
            if memory:
                # the prompt: the sampled sequence, then the tool result and the generation prompt rendered alone
                prompt = sampled + chat.append(tokenizer, sampled, history, results, use)
                assert second.num_new_tokens == len(prompt)
                assert second.num_reused_device == len(sampled) - 1 and second.num_recomputed == 0
                new = len(prompt) - len(sampled)
                assert second.num_prefilled <= new + 1
                assert second.token_ids == hf_reply(oracle, prompt, 80)
                # a third call through the second reply: its history is remembered too (chained)
                third_msgs = [*history, *results, {"role": "assistant", "content": second.text}]
                third_msgs.append({"role": "user", "content": "Thanks."})
                third = gen.complete(third_msgs, SamplingParams(max_new_tokens=4, temperature=0), tools=TOOLS)
                assert third.num_reused_device >= len(prompt) + len(second.token_ids) - 1
                assert gen.engine.admission.replies.hits == 2
            prefilled[memory] = second.num_prefilled
            gen.check_integrity()
    if template == "hermes":  # without the memory the call is re-rendered: the KV past it is lost
        assert prefilled[0] > prefilled[1 << 16] + len(first.token_ids) // 2


def test_message_keys_ignore_what_clients_change():
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1, "b": [2]}'}}
    other = {"id": "x", "type": "function", "function": {"name": "f", "arguments": '{"b":[2],"a":1}'}}
    base = {"role": "assistant", "content": None, "tool_calls": [call]}
    same = {"role": "assistant", "content": "", "tool_calls": [other], "reasoning_content": "hmm"}
    assert message_key(base) == message_key(same)
    other_args = {**call, "function": {"name": "f", "arguments": '{"a": 2}'}}
    changed = {"role": "assistant", "content": None, "tool_calls": [other_args]}
    assert message_key(base) != message_key(changed)
    tool = {"role": "tool", "tool_call_id": "call_1", "content": "1"}
    assert message_key(tool) != message_key({**tool, "tool_call_id": "call_2"})
    # a history key covers every message before it and the tools it was rendered with
    msgs = [{"role": "user", "content": "hi"}, base]
    assert history_keys(msgs, None)[2] != history_keys(msgs, ToolUse(tuple(TOOLS)))[2]
    assert history_keys(msgs, None)[2] != history_keys([{"role": "user", "content": "ho"}, base], None)[2]


def test_the_memory_is_bounded_least_recently_used_first():
    memory = ReplyMemory(max_tokens=10)
    memory.put(b"a", [1, 2, 3, 4])
    memory.put(b"b", [5, 6, 7, 8])
    assert memory.get(b"a") == [1, 2, 3, 4]  # a is now the most recent
    memory.put(b"c", [9, 10, 11])
    assert memory.get(b"b") is None and memory.get(b"a") == [1, 2, 3, 4] and memory.get(b"c") == [9, 10, 11]
    assert memory.num_tokens == 7
    memory.put(b"d", list(range(11)))  # longer than the whole budget: not kept, nothing else dropped
    assert memory.get(b"d") is None and len(memory) == 2
    with pytest.raises(ValueError, match="max_tokens"):
        ReplyMemory(-1)


def test_a_reply_a_stop_string_cut_is_not_remembered(model, smol_tokenizer):
    with StatefulGenerator(model, smol_tokenizer, CacheConfig(block_size=8, num_device_blocks=256)) as gen:
        free = gen.complete(MSGS, SamplingParams(max_new_tokens=12, temperature=0))
        assert len(gen.engine.admission.replies) == 1
        stop = free.text[3:6]
        assert stop and stop not in free.text[:3]
        cut = gen.complete(MSGS, SamplingParams(max_new_tokens=12, temperature=0, stop=[stop]))
        assert cut.finish_reason == "stop" and cut.text == free.text[: free.text.index(stop)]
        assert len(gen.engine.admission.replies) == 1  # only the first
