"""What a chat page needs from `pensieve serve` (issue 36), over real HTTP against the HF oracle: the list of
conversations, branches in a conversation (`conversation` + `previous_response_id`) whose tree — every stored
response's parent — survives a restart, and `POST /v1/responses/{id}/cancel`, which stops a streaming response and
keeps it (`incomplete`, its KV kept: the next turn continues from the partial reply)."""

from __future__ import annotations

import pytest

from tests.server.common import MAX_OUT, hf_chain, hf_reply, make_model, served_tiny, stream_and_cancel
from tests.tiny import oracle_copy

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx2")

from pensieve.server import ServerConfig  # noqa: E402

KEY = "sk-branches"
CONFIG = ServerConfig(model_name="tiny", api_key=KEY, max_tokens=64)
GREEDY = dict(temperature=0, max_output_tokens=MAX_OUT)


def _clients(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
    http = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    return client, http


def _msg(role: str, text: str) -> dict:
    return {"role": role, "content": text}


def test_branches_in_a_conversation_and_the_list_survive_a_restart(tokenizer, tmp_path):
    oracle = oracle_copy(make_model(tokenizer))
    with served_tiny(tokenizer, CONFIG, disk_dir=tmp_path) as (gen, server):
        client, http = _clients(server)
        other = client.conversations.create(metadata={"title": "other"})
        conv = client.conversations.create(metadata={"title": "names"})
        r1 = client.responses.create(model="tiny", input="Hi, I am Ann.", conversation=conv.id, **GREEDY)
        r2 = client.responses.create(model="tiny", input="What is my name?", conversation=conv.id, **GREEDY)
        assert [r1.output_text, r2.output_text] == hf_chain(oracle, tokenizer, ["Hi, I am Ann.", "What is my name?"])
        # edit the second message: a branch from r1, rendered whole; what it shares with the thread is cached
        b2 = client.responses.create(model="tiny", input="Who am I?", conversation=conv.id,
                                     previous_response_id=r1.id, **GREEDY)  # fmt: skip
        branch = [_msg("user", "Hi, I am Ann."), _msg("assistant", r1.output_text), _msg("user", "Who am I?")]
        assert b2.output_text == hf_reply(oracle, tokenizer, branch)
        assert b2.usage.input_tokens_details.cached_tokens > 0
        # the branch goes on in the conversation (it is the conversation's branch now): appended after its tokens
        b3 = client.responses.create(model="tiny", input="Spell it.", conversation=conv.id, **GREEDY)
        assert [b2.output_text, b3.output_text] == hf_chain(oracle, tokenizer, [branch, "Spell it."])
        assert b3.usage.input_tokens_details.cached_tokens == b2.usage.input_tokens + b2.usage.output_tokens - 1
        # back to the first branch: regenerate r2's reply (a branch from r1 with r2's input), then continue r2
        r2b = client.responses.create(model="tiny", input="What is my name?", conversation=conv.id,
                                      previous_response_id=r1.id, **GREEDY)  # fmt: skip
        regenerated = hf_reply(oracle, tokenizer, [*branch[:2], _msg("user", "What is my name?")])
        assert r2b.output_text == regenerated and r2b.usage.input_tokens_details.cached_tokens > 0
        r3 = client.responses.create(model="tiny", input="Thanks.", conversation=conv.id,
                                     previous_response_id=r2.id, **GREEDY)  # fmt: skip
        first = [*branch[:2], _msg("user", "What is my name?"), _msg("assistant", r2.output_text)]
        assert r3.output_text == hf_reply(oracle, tokenizer, [*first, _msg("user", "Thanks.")])
        gen.check_integrity()

        def tree() -> dict:
            listing = http.get(f"/v1/conversations/{conv.id}/responses").json()
            return {
                "ids": [r["id"] for r in listing["data"]],
                "parents": [r["parent_response_id"] for r in listing["data"]],
                "inputs": [[i["content"][0]["text"] for i in r["input_items"]] for r in listing["data"]],
                "head": listing["head_response_id"],
            }

        want = {
            "ids": [r1.id, r2.id, b2.id, b3.id, r2b.id, r3.id],
            "parents": [None, r1.id, r1.id, b2.id, r1.id, r2.id],
            "inputs": [
                ["Hi, I am Ann."],
                ["What is my name?"],
                ["Who am I?"],
                ["Spell it."],
                ["What is my name?"],
                ["Thanks."],
            ],  # fmt: skip
            "head": r3.id,
        }
        assert tree() == want
        items = client.conversations.items.list(conv.id).data  # the current branch's
        assert [(i.role, i.content[0].text) for i in items] == [
            ("user", "Hi, I am Ann."), ("assistant", r1.output_text), ("user", "What is my name?"),
            ("assistant", r2.output_text), ("user", "Thanks."), ("assistant", r3.output_text),
        ]  # fmt: skip
        listed = http.get("/v1/conversations").json()
        assert [c["id"] for c in listed["data"]] == [conv.id, other.id] and not listed["has_more"]
        page = http.get("/v1/conversations", params={"limit": 1}).json()
        assert [c["id"] for c in page["data"]] == [conv.id] and page["has_more"]
        rest = http.get("/v1/conversations", params={"limit": 1, "after": conv.id}).json()
        assert [c["id"] for c in rest["data"]] == [other.id] and not rest["has_more"]
        assert http.get("/v1/conversations", params={"order": "asc"}).json()["data"][0]["id"] == other.id
        assert http.get("/v1/conversations", params={"after": "conv_nope"}).status_code == 400
        assert http.get("/v1/conversations", params={"limit": 0}).status_code == 400
        # a branch from a response outside the conversation is refused, and changes nothing
        lone = client.responses.create(model="tiny", input="Alone.", **GREEDY)
        with pytest.raises(openai.BadRequestError, match="not in conversation"):
            client.responses.create(model="tiny", input="x", conversation=conv.id, previous_response_id=lone.id)
        assert tree() == want
    # a restart: the list, the tree and the KV are all still there
    with served_tiny(tokenizer, CONFIG, disk_dir=tmp_path) as (gen, server):
        client, http = _clients(server)
        assert tree() == want and [c["id"] for c in http.get("/v1/conversations").json()["data"]] == [
            conv.id, other.id,
        ]  # fmt: skip
        r4 = client.responses.create(model="tiny", input="Bye.", conversation=conv.id, **GREEDY)
        assert r4.usage.input_tokens_details.cached_tokens > 0
        gen.check_integrity()


def test_cancel_keeps_the_partial_reply_and_the_next_turn_continues_it(tokenizer):
    oracle = oracle_copy(make_model(tokenizer))
    with served_tiny(tokenizer, CONFIG, step_delay=0.02) as (gen, server):
        client, http = _clients(server)
        r1 = client.responses.create(model="tiny", input="Hello there", **GREEDY)
        body = {"model": "tiny", "input": "Write a long story", "previous_response_id": r1.id, "temperature": 0,
                "max_output_tokens": 60}  # fmt: skip
        cancelled, last, deltas = stream_and_cancel(server, http, body)
        assert cancelled["status"] == "incomplete" and cancelled["incomplete_details"] == {"reason": "cancelled"}
        assert last["type"] == "response.incomplete" and last["response"] == cancelled
        kept = cancelled["usage"]["output_tokens"]
        assert 2 <= kept < 60 and cancelled["output"][0]["content"][0]["text"] == "".join(deltas)
        assert client.responses.retrieve(cancelled["id"]).status == "incomplete"
        # the next turn continues the partial reply: its KV kept, the reply equal to HF over that history
        r3 = client.responses.create(model="tiny", input="Go on.", previous_response_id=cancelled["id"], **GREEDY)
        turns = ["Hello there", "Write a long story", "Go on."]
        replies = hf_chain(oracle, tokenizer, turns, cut={1: kept})
        assert [r1.output_text, cancelled["output"][0]["content"][0]["text"], r3.output_text] == replies
        assert r3.usage.input_tokens_details.cached_tokens == cancelled["usage"]["total_tokens"] - 1
        # a finished response is answered as it is; an unknown one is a 404
        assert http.post(f"/v1/responses/{r3.id}/cancel").json()["status"] == r3.status
        assert http.post("/v1/responses/resp_nope/cancel").status_code == 404
        gen.check_integrity()
