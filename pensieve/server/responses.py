"""`/v1/responses`: stateful. A stored response lives on a pensieve conversation (a thread, pensieve/server/threads.py)
and a follow-up (`previous_response_id`, or a `conversation`) continues that thread's KV: only the new tokens are
prefilled. A client that disconnects aborts its turn: none of it is kept, nothing is stored, the thread is as it
was."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Literal

from fastapi import APIRouter, Request
from pydantic import Field

from pensieve.engine.turn import Reply
from pensieve.server import threads
from pensieve.server.common import (
    APIError,
    ContentPart,
    ServerState,
    State,
    Strict,
    cached_tokens,
    chat_message,
    detach,
    drain,
    list_of,
    live,
    sse,
    text_pieces,
)
from pensieve.server.store import ConversationRecord, ResponseRecord, Thread, new_id

router = APIRouter()


class InputMessage(Strict):
    type: Literal["message"] = "message"
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]
    id: str | None = None
    status: str | None = None


class ConversationRef(Strict):
    id: str


class ResponsesRequest(Strict):
    model: str | None = None
    input: str | list[InputMessage]
    instructions: str | None = None
    previous_response_id: str | None = None
    conversation: str | ConversationRef | None = None
    store: bool = True
    stream: bool = False
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_output_tokens: int | None = Field(None, ge=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None


@dataclass
class _Turn:
    """One response being made: where it runs and what it records."""

    body: ResponsesRequest
    tokens: list[int]  # the whole rendered prompt
    new_messages: list[dict]
    conversation: ConversationRecord | None
    thread: Thread | None
    keep: bool  # stored (asked for, or in a conversation)
    base: dict  # the response object's fields known before the turn
    message_id: str


@router.post("/v1/responses")
async def create_response(body: ResponsesRequest, request: Request, s: State):
    s.check_model(body.model)
    sampling = s.sampling(body.temperature, body.top_p, body.max_output_tokens, body.stop, body.seed)
    if isinstance(body.input, str) and not body.input:
        raise APIError(400, "input is empty", param="input")
    text_input = isinstance(body.input, str)
    new_messages = [{"role": "user", "content": body.input}] if text_input else [chat_message(m) for m in body.input]
    s.check_count(len(new_messages), "input items")
    previous, conversation, context = _context(s, body)
    s.check_count(len(context) + len(new_messages), "messages in the conversation")
    system = [{"role": "system", "content": body.instructions}] if body.instructions else []
    tokens = await s.render(system + context + new_messages)
    keep = body.store or conversation is not None
    thread, made = await threads.claim(s.store, s.gen, previous, conversation, keep, tokens)
    delta = tokens if thread is None else await threads.cut_back(s.store, s.gen, thread, made, tokens)
    base = _base(s, body, conversation, keep)
    turn = _Turn(body, tokens, new_messages, conversation, thread, keep, base, new_id("msg"))

    async def run(on_piece) -> dict:
        """The turn and its bookkeeping, as one task of its own: a client going away cancels it (its turn is
        aborted, the thread released) but never interrupts the bookkeeping half-way."""
        try:
            thread_id = thread.id if thread is not None else None
            reply = await s.run_turn(request, thread_id, delta, sampling, text_pieces(on_piece))
        except BaseException:
            await threads.release(s.store, s.gen, thread, made)
            raise
        return _finish(s, turn, reply)

    if not body.stream:
        return await run(None)
    return sse(_events(turn, run))


def _context(s: ServerState, body: ResponsesRequest) -> tuple[ResponseRecord | None, ConversationRecord | None, list]:
    """The response continued, the conversation continued, and the messages before this request's."""
    if body.conversation is not None:
        if body.previous_response_id is not None:
            raise APIError(400, "give previous_response_id or conversation, not both", param="conversation")
        conv_id = body.conversation if isinstance(body.conversation, str) else body.conversation.id
        conversation = live(s.store.conversations, conv_id, "conversation")
        return None, conversation, [item_message(item) for item in conversation.items]
    if body.previous_response_id is not None:
        previous = live(s.store.responses, body.previous_response_id, "response")
        return previous, None, s.store.context(previous)
    return None, None, []


def _base(s: ServerState, body: ResponsesRequest, conversation: ConversationRecord | None, keep: bool) -> dict:
    return {
        "id": new_id("resp"),
        "object": "response",
        "created_at": int(time.time()),
        "model": s.config.model_name,
        "instructions": body.instructions,
        "previous_response_id": body.previous_response_id,
        "conversation": {"id": conversation.id} if conversation is not None else None,
        "store": keep,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "max_output_tokens": body.max_output_tokens,
        "metadata": body.metadata or {},
        "parallel_tool_calls": False,
        "tool_choice": "none",
        "tools": [],
        "text": {"format": {"type": "text"}},
        "truncation": "disabled",
        "error": None,
        "incomplete_details": None,
        "user": body.user,
    }


def _finish(s: ServerState, turn: _Turn, reply: Reply) -> dict:
    """The response object; the thread, the stored response and the conversation move on."""
    s.metrics.turn(reply, len(turn.tokens))
    prompt, completion = len(turn.tokens), len(reply.token_ids)
    text = reply.text or ""
    output_item = output_message(turn.message_id, text)
    stopped = reply.finish_reason == "stop"
    response = {
        **turn.base,
        "status": "completed" if stopped else "incomplete",
        "incomplete_details": None if stopped else {"reason": "max_output_tokens"},
        "output": [output_item],
        "usage": {
            "input_tokens": prompt,
            "input_tokens_details": {"cached_tokens": cached_tokens(reply)},
            "output_tokens": completion,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt + completion,
        },
    }
    thread, conversation = turn.thread, turn.conversation
    if thread is not None:
        thread.tokens = turn.tokens + reply.token_ids
        thread.busy = False
        s.store.save(thread)
    if turn.keep:
        record = ResponseRecord(
            id=response["id"],
            # a response in a conversation is continued through the conversation (the thread moves on)
            thread_id=thread.id if thread is not None and conversation is None else None,
            num_tokens=len(thread.tokens) if thread is not None else 0,
            previous_response_id=turn.body.previous_response_id,
            conversation_id=conversation.id if conversation is not None else None,
            input_messages=turn.new_messages,
            output_message={"role": "assistant", "content": text},
            body=response,
        )
        s.store.save(record)
    if conversation is not None:
        conversation.items += [input_item(m) for m in turn.new_messages] + [output_item]
        s.store.save(conversation)
    return response


async def _events(turn: _Turn, run) -> AsyncIterator[str]:
    seq = iter(range(1 << 62))

    def event(kind: str, **data) -> str:
        return f"event: {kind}\ndata: {json.dumps({'type': kind, 'sequence_number': next(seq), **data})}\n\n"

    started = {**turn.base, "status": "in_progress", "output": [], "usage": None}
    item = {"type": "message", "id": turn.message_id, "status": "in_progress", "role": "assistant", "content": []}
    where = {"item_id": turn.message_id, "output_index": 0, "content_index": 0}
    queue: asyncio.Queue = asyncio.Queue()
    task = detach(run(queue.put_nowait))
    try:
        yield event("response.created", response=started)
        yield event("response.in_progress", response=started)
        yield event("response.output_item.added", output_index=0, item=item)
        part = {"type": "output_text", "text": "", "annotations": []}
        yield event("response.content_part.added", **where, part=part)
        async for piece in drain(queue, task):
            yield event("response.output_text.delta", **where, delta=piece, logprobs=[])
        response = task.result()
    except BaseException:  # the client went away (this generator was cancelled or closed), or the turn failed
        task.cancel()  # (not awaited: a cancelled scope would cancel the wait; the task cleans up by itself)
        raise
    content = response["output"][0]["content"][0]
    yield event("response.output_text.done", **where, text=content["text"], logprobs=[])
    yield event("response.content_part.done", **where, part=content)
    yield event("response.output_item.done", output_index=0, item=response["output"][0])
    done = "response.completed" if response["status"] == "completed" else "response.incomplete"
    yield event(done, response=response)


@router.get("/v1/responses/{response_id}")
async def get_response(response_id: str, s: State):
    return live(s.store.responses, response_id, "response").body


@router.delete("/v1/responses/{response_id}")
async def delete_response(response_id: str, s: State):
    record = live(s.store.responses, response_id, "response")
    record.deleted = True
    if any(r.previous_response_id == response_id for r in s.store.responses.values()):
        s.store.save(record)  # later responses build on its messages: kept, hidden
    else:
        s.store.remove(record)
    await threads.forget(s.store, s.gen, record.thread_id)
    return {"id": response_id, "object": "response.deleted", "deleted": True}


@router.get("/v1/responses/{response_id}/input_items")
async def response_input_items(response_id: str, s: State):
    record = live(s.store.responses, response_id, "response")
    return list_of([input_item(m) for m in record.input_messages])


# ---- items (shared with the Conversations API) ----------------------------------------------------------------------


def input_item(message: dict) -> dict:
    kind = "output_text" if message["role"] == "assistant" else "input_text"
    return {
        "type": "message",
        "id": new_id("msg"),
        "status": "completed",
        "role": message["role"],
        "content": [{"type": kind, "text": message["content"]}],
    }


def item_message(item: dict) -> dict:
    return {"role": item["role"], "content": "".join(part["text"] for part in item["content"])}


def output_message(message_id: str, text: str) -> dict:
    return {
        "type": "message",
        "id": message_id,
        "status": "completed",
        "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": []}],
    }
