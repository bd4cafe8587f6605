"""State written by an earlier release restores and continues exactly: a `disk_dir` (KV chunk files, conversation
records) and its `server.sqlite`, written by commit d031b5c (the base of the architecture redesign) with
tests/fixtures/make_base_state.py. Every reply is checked against HF generate over the whole history, and the
restored KV must be used (cached tokens from the disk tier), not recomputed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pensieve import CacheConfig, SamplingParams, StatefulGenerator
from tests.server.common import follow_up_history, hf_reply, make_model
from tests.tiny import hf_greedy, oracle_copy

openai = pytest.importorskip("openai")

from pensieve.server import Server, ServerConfig  # noqa: E402

FIXTURE = Path(__file__).parent.parent / "fixtures" / "base_state"
GREEDY = {"temperature": 0, "max_output_tokens": 8}  # as the fixture's turns were made


def test_a_disk_dir_and_server_sqlite_from_the_base_commit_continue_exactly(tokenizer, tmp_path):
    facts = json.loads((FIXTURE / "facts.json").read_text())
    shutil.copytree(FIXTURE, tmp_path, dirs_exist_ok=True)
    oracle = oracle_copy(make_model(tokenizer))
    first_input = "Remember the word apple"
    assert facts["first"]["text"] == hf_reply(oracle, tokenizer, [{"role": "user", "content": first_input}], 8)
    cache = CacheConfig(block_size=4, num_device_blocks=1024, disk_dir=str(tmp_path))
    gen = StatefulGenerator(make_model(tokenizer), tokenizer, cache)
    server = Server(gen, tokenizer, config=ServerConfig(model_name="tiny", api_key="k", max_tokens=64),
                    disk_dir=str(tmp_path)).start(engine_thread=True)  # fmt: skip
    try:
        c = openai.OpenAI(base_url=server.url + "/v1", api_key="k", max_retries=0)
        assert c.responses.retrieve(facts["first"]["id"]).output_text == facts["first"]["text"]
        after = c.responses.create(
            model="tiny", input="Which word?", previous_response_id=facts["first"]["id"], **GREEDY
        )
        history = follow_up_history(first_input, facts["first"]["text"], "Which word?")
        assert after.output_text == hf_reply(oracle, tokenizer, history, 8)
        assert after.usage.input_tokens_details.cached_tokens >= facts["first"]["input_tokens"]
        more = c.responses.create(model="tiny", input="And now?", conversation=facts["conversation"], **GREEDY)
        history = [
            {"role": "user", "content": "Hello"},
            {"role": "user", "content": "Hi again"},
            {"role": "assistant", "content": facts["in_conversation"]["text"]},
            {"role": "user", "content": "And now?"},
        ]
        assert more.output_text == hf_reply(oracle, tokenizer, history, 8)
        assert more.usage.input_tokens_details.cached_tokens >= facts["in_conversation"]["input_tokens"]
    finally:
        server.stop()
    try:  # a library conversation in raw token mode, stored in the same disk_dir
        raw = facts["raw"]
        sampling = SamplingParams(max_new_tokens=5, temperature=0, ignore_eos=True)
        reply = gen.generate(raw["conv_id"], [4, 6], sampling)
        assert reply.token_ids == hf_greedy(oracle, raw["tokens"] + [4, 6], 5)
        assert reply.num_reused_disk == len(raw["tokens"]) - 1 and reply.num_recomputed == 0
        gen.check_integrity()
    finally:
        gen.close()
