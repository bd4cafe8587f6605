"""`/v1/responses`: stateful. A stored response lives on a pensieve conversation (a thread, pensieve/server/threads.py)
and a follow-up (`previous_response_id`, or a `conversation`) continues that thread's KV: only the new tokens are
prefilled. The tokens pensieve sampled stay as they were — a follow-up renders only its new items after them
(`ChatFormat.append`) when the history it continues is the one the thread's tokens end with (same messages,
instructions and tools: `replies.history_keys`), so a function call is never re-rendered. Function tools, forced or
free, `function_call` output items and `function_call_output` input items, `text.format` (a structured output). A
client that disconnects aborts its turn: none of it is kept, nothing is stored, the thread is as it was;
`POST /v1/responses/{id}/cancel` instead stops it and keeps it (an `incomplete` response, its KV kept).

Every stored response records its parent, the response its context ends with, so a conversation's responses form a
tree. Branches (an extension, docs/serving.md): `conversation` together with `previous_response_id` — one of that
conversation's responses — continues from that response instead of the conversation's last one; the conversation's
items become that branch's. It runs on the conversation's thread, cut back to what the branch shares with it."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import APIRouter, Depends, Request
from pydantic import ConfigDict, Field, TypeAdapter
from pydantic.json_schema import SkipJsonSchema

from pensieve.config import StructuredOutput
from pensieve.engine.admission import check_messages
from pensieve.engine.replies import extend_key, render_continuing, reply_message
from pensieve.engine.turn import Reply
from pensieve.server import threads
from pensieve.server.chat import FunctionDef
from pensieve.server.common import (
    APIError,
    ClientGone,
    ContentPart,
    ServerState,
    State,
    Strict,
    cached_tokens,
    chain,
    chat_message,
    content_text,
    detach,
    drain,
    first,
    list_of,
    live,
    refuse,
    request_tools,
    sse,
    stats,
)
from pensieve.server.retention import swept
from pensieve.server.store import ConversationRecord, ResponseRecord, Thread, new_id
from pensieve.structured.tools import ToolUse

router = APIRouter(dependencies=[Depends(swept)])  # each request first drops what retention says is due


class InputMessage(Strict):
    type: Literal["message"] = "message"
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]
    id: str | None = None
    status: str | None = None


class FunctionCallItem(Strict):
    """A call the model made, sent back as input (a stateless client's history)."""

    type: Literal["function_call"]
    call_id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    arguments: str
    id: str | None = None
    status: str | None = None


class FunctionCallOutputItem(Strict):
    """A tool's result for a call."""

    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1)
    output: str | list[ContentPart]
    id: str | None = None
    status: str | None = None


InputItem = InputMessage | FunctionCallItem | FunctionCallOutputItem


class FunctionTool(FunctionDef):
    """The Responses API's function tool: chat's function definition with its type beside it (not nested)."""

    type: Literal["function"]


class ToolChoiceFunction(Strict):
    type: Literal["function"]
    name: str


class TextFormat(Strict):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    description: str | None = None
    strict: bool | None = None  # the reply always follows the schema (constrained decoding)


class TextConfig(Strict):
    format: TextFormat | None = None
    verbosity: str | None = None  # accepted, not used


class StreamOptions(Strict):
    include_obfuscation: bool | None = None  # no obfuscation padding is sent


class ConversationRef(Strict):
    id: str


class ResponsesRequest(Strict):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{
        "input": [{"type": "message", "role": "user", "content": "Weather in Oslo?"},
                  {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{}"},
                  {"type": "function_call_output", "call_id": "c1", "output": "-3"}],
        "instructions": "Be terse.", "max_output_tokens": 4, "temperature": 0, "stream": True,
        "tools": [{"type": "function", "name": "get_weather", "parameters": {"type": "object", "properties": {}}}],
        "text": {"format": {"type": "json_object"}},
    }]})  # fmt: skip
    model: str | None = None
    input: str | list[InputItem]
    instructions: str | None = None
    previous_response_id: str | None = None
    conversation: str | ConversationRef | None = None
    store: bool = True
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_output_tokens: int | None = Field(None, ge=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | ToolChoiceFunction | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    truncation: Literal["disabled"] | None = None  # "auto" (drop the oldest items) is not done: a 400
    include: list[str] | None = None
    # accepted, no effect (docs/serving.md says why)
    reasoning: dict[str, Any] | None = None
    service_tier: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    prompt_cache_options: dict[str, Any] | None = None
    # refused unless null (REFUSED says why)
    background: bool | None = None
    max_tool_calls: SkipJsonSchema[Any] = None
    top_logprobs: SkipJsonSchema[Any] = None
    prompt: SkipJsonSchema[Any] = None
    context_management: SkipJsonSchema[Any] = None
    moderation: SkipJsonSchema[Any] = None
    access_programs: SkipJsonSchema[Any] = None
    image: SkipJsonSchema[Any] = None


REFUSED = {
    "max_tool_calls": "a limit on calls across a response's built-in tool loop does not apply: this server runs no "
    "tools itself (each response makes at most one round of function calls)",
    "top_logprobs": "log-probabilities are not returned on /v1/responses: use /v1/chat/completions (logprobs)",
    "prompt": "stored prompt templates are not supported: send input and instructions",
    "context_management": "server-side context compaction is not supported",
    "moderation": "moderation is not supported by this server",
    "access_programs": "programmatic tool calling is not supported: function tools only",
    "image": "image generation is not supported: this server generates text",
}


@dataclass
class _Turn:
    """One response being made: where it runs and what it records."""

    body: ResponsesRequest
    tokens: list[int]  # the whole prompt
    key: bytes  # the history key of the prompt's messages (system, context, new) and tools
    new_messages: list[dict]
    conversation: ConversationRecord | None
    thread: Thread | None
    keep: bool  # stored (asked for, or in a conversation)
    base: dict  # the response object's fields known before the turn
    message_id: str
    parent: str | None  # the response its context ends with
    recorded: list[dict]  # the messages its record adds to its parent's context (in a conversation: the items
    # added since the parent, then new_messages)
    branch: list[dict] | None  # a branch in a conversation: the messages of the context it continues


@router.post("/v1/responses")
async def create_response(body: ResponsesRequest, request: Request, s: State):
    s.check_model(body.model)
    refuse(body, REFUSED)
    if body.background:
        raise APIError(400, "background responses are not supported: stream instead", param="background")
    if body.include:
        raise APIError(400, f"include: nothing more can be included here (got {body.include})", param="include")
    tools = _tools(body)
    sampling = s.sampling(
        body.temperature, body.top_p, body.max_output_tokens, body.stop, body.seed,
        structured_output=_structured_output(body.text), max_field="max_output_tokens",
    )  # fmt: skip
    if isinstance(body.input, str) and not body.input:
        raise APIError(400, "input is empty", param="input")
    new_messages = [{"role": "user", "content": body.input}] if isinstance(body.input, str) else messages_of(body.input)
    if not new_messages:
        raise APIError(400, "input has no items", param="input")
    s.check_count(len(new_messages), "input items", "input")
    previous, conversation, context = _context(s, body)
    s.check_count(len(context) + len(new_messages), "messages in the conversation", "input")
    parent, recorded = _lineage(s, previous, conversation, context, new_messages)
    # from here to the end of the turn, what it continues is pinned: no sweep or delete takes it (no await before)
    pins = [r.id for r in (previous, conversation) if r is not None]
    s.pinned.update(pins)
    try:
        for record in (previous, conversation):
            if record is not None:
                s.store.touch(record)  # continued: its age starts again
        system = [{"role": "system", "content": body.instructions}] if body.instructions else []
        after = _continued(s, previous, conversation)
        tokens, key = await asyncio.to_thread(_render, s, system + context, new_messages, tools, after)
        keep = body.store or conversation is not None
        thread, made = await threads.claim(s.store, s.gen, previous, conversation, keep, tokens)
        delta = tokens if thread is None else await threads.cut_back(s.store, s.gen, thread, made, tokens)
    except BaseException:
        s.pinned.subtract(pins)
        raise
    base = _base(s, body, conversation, keep)
    branch = context if conversation is not None and previous is not None else None
    turn = _Turn(body, tokens, key, new_messages, conversation, thread, keep, base, new_id("msg"), parent, recorded,
                 branch)  # fmt: skip
    running = s.running_turn(base["id"], stored=thread is not None and keep)

    async def run(on_delta) -> dict:
        """The turn and its bookkeeping, as one task of its own: a client going away cancels it (its turn is
        aborted, the thread released) but never interrupts the bookkeeping half-way."""
        try:
            try:
                thread_id = thread.id if thread is not None else None
                reply = await s.run_turn(request, thread_id, delta, sampling, on_delta, tools, running)
            except BaseException:
                await threads.release(s.store, s.gen, thread, made)
                raise
            response = _finish(s, turn, reply)
            running.finished.set_result(response)
            return response
        except BaseException as error:
            if not running.finished.done():  # a cancel waiting on it learns the turn was aborted, or failed
                gone = isinstance(error, asyncio.CancelledError)
                running.finished.set_exception(ClientGone() if gone else error)
            raise
        finally:
            s.running.pop(base["id"], None)
            s.pinned.subtract(pins)

    if not body.stream:
        return await run(None)
    queue: asyncio.Queue = asyncio.Queue()
    task = detach(run(queue.put_nowait))
    early = await first(queue, task)  # a turn refused at admission is a 400 here, not a broken stream
    return sse(_events(turn, queue, task, early))


def _tools(body: ResponsesRequest) -> ToolUse | None:
    tools = [
        {"type": "function", "function": t.model_dump(exclude={"type"}, exclude_none=True)} for t in body.tools or []
    ]
    choice = body.tool_choice
    if isinstance(choice, ToolChoiceFunction):
        choice = {"type": "function", "function": {"name": choice.name}}
    return request_tools(tools, choice, body.parallel_tool_calls)


def _structured_output(text: TextConfig | None) -> StructuredOutput | None:
    fmt = text.format if text is not None else None
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return StructuredOutput(json_object=True)
    if fmt.schema_ is None:
        raise APIError(400, "text.format json_schema needs a schema", param="text")
    return StructuredOutput(json=fmt.schema_)


def _context(s: ServerState, body: ResponsesRequest) -> tuple[ResponseRecord | None, ConversationRecord | None, list]:
    """The response continued, the conversation continued, and the messages before this request's."""
    if body.conversation is not None:
        conv_id = body.conversation if isinstance(body.conversation, str) else body.conversation.id
        conversation = live(s.store.conversations, conv_id, "conversation")
        if body.previous_response_id is not None:  # a branch: from one of the conversation's own responses
            previous = live(s.store.responses, body.previous_response_id, "response")
            if previous.conversation_id != conversation.id:
                raise APIError(400, f"response {previous.id!r} is not in conversation {conv_id!r}: a branch in a "
                               "conversation continues one of its responses", param="previous_response_id")  # fmt: skip
            if not previous.made_at:  # kept before responses recorded their parents: its context is unknown
                raise APIError(400, f"response {previous.id!r} was stored before this server recorded parents: "
                               "branch from a later response", param="previous_response_id")  # fmt: skip
            return previous, conversation, s.store.context(previous)
        return None, conversation, items_messages(conversation.items)
    if body.previous_response_id is not None:
        previous = live(s.store.responses, body.previous_response_id, "response")
        return previous, None, s.store.context(previous)
    return None, None, []


def _lineage(
    s: ServerState,
    previous: ResponseRecord | None,
    conversation: ConversationRecord | None,
    context: list[dict],
    new_messages: list[dict],
) -> tuple[str | None, list[dict]]:
    """-> (the response the turn's context ends with, the messages its record adds after that one's context)."""
    if previous is not None or conversation is None:
        return (previous.id if previous is not None else None), new_messages
    head = s.store.responses.get(conversation.head) if conversation.head else None
    if head is None:  # the first response in it: its items so far come first
        return None, context + new_messages
    return head.id, items_messages(conversation.items[conversation.head_items :]) + new_messages


def _continued(
    s: ServerState, previous: ResponseRecord | None, conversation: ConversationRecord | None
) -> tuple[list[int], str] | None:
    """The tokens the turn may continue and the history key of the messages they end with (None: nothing to
    continue): the previous response's point of its thread, or the conversation's thread."""
    if conversation is not None:
        thread = s.store.threads.get(conversation.id)
        return (list(thread.tokens), thread.key) if thread is not None and thread.key else None
    if previous is None or previous.thread_id is None or not previous.key:
        return None
    thread = s.store.threads.get(previous.thread_id)
    if thread is None or len(thread.tokens) < previous.num_tokens:
        return None
    return thread.tokens[: previous.num_tokens], previous.key


def _render(
    s: ServerState, before: list[dict], new: list[dict], tools: ToolUse | None, after: tuple[list[int], str] | None
) -> tuple[list[int], bytes]:
    """-> (the prompt's tokens, its history key). When `after`'s tokens end with the first j messages (their key:
    a response and its follow-up, or a conversation with items added since), they are kept and only the messages
    after those are rendered after them; else the whole conversation is rendered."""
    messages = before + new

    def find(key: bytes) -> list[int] | None:
        return after[0] if after is not None and key.hex() == after[1] else None

    try:
        tokens, key, _ = render_continuing(s.tokenizer, check_messages(messages), tools, find, limit=len(before))
    except ValueError as error:  # a bad message, or the template refused the messages
        raise APIError(400, f"input: {error}", param="input") from None
    return tokens, key


def _base(s: ServerState, body: ResponsesRequest, conversation: ConversationRecord | None, keep: bool) -> dict:
    choice = body.tool_choice
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
        "parallel_tool_calls": True if body.parallel_tool_calls is None else body.parallel_tool_calls,
        "tool_choice": choice.model_dump() if isinstance(choice, ToolChoiceFunction) else choice or "auto",
        "tools": [t.model_dump() for t in body.tools or []],
        "text": {
            "format": (
                body.text.format.model_dump(by_alias=True, exclude_none=True)
                if body.text and body.text.format
                else {"type": "text"}
            )
        },  # fmt: skip
        "truncation": "disabled",
        "error": None,
        "incomplete_details": None,
        "user": body.user,
    }


def _finish(s: ServerState, turn: _Turn, reply: Reply) -> dict:
    """The response object; the thread, the stored response and the conversation move on."""
    s.metrics.turn(reply, len(turn.tokens))
    prompt, completion = len(turn.tokens), len(reply.token_ids)
    message = reply_message(reply)
    output = output_items(message, turn.message_id)
    key = extend_key(turn.key, message)
    stopped = reply.finish_reason == "stop"
    cut = "cancelled" if reply.finish_reason == "cancelled" else "max_output_tokens"
    response = {
        **turn.base,
        "status": "completed" if stopped else "incomplete",
        "incomplete_details": None if stopped else {"reason": cut},
        "output": output,
        "usage": {
            "input_tokens": prompt,
            "input_tokens_details": {"cached_tokens": cached_tokens(reply)},
            "output_tokens": completion,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt + completion,
        },
        "stats": stats(reply),
    }
    thread, conversation = turn.thread, turn.conversation
    if thread is not None:
        thread.tokens = turn.tokens + reply.token_ids
        thread.key = key.hex()
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
            input_messages=turn.recorded,
            output_message=message,
            body=response,
            key=key.hex() if thread is not None else "",
            last_used=s.store.clock(),
            parent=turn.parent,
            made_at=s.store.clock(),
        )
        s.store.save(record)
    if conversation is not None:
        if turn.branch is not None:  # the conversation's items become the branch's
            conversation.items = [item for m in turn.branch for item in input_items(m)]
        conversation.items += [item for m in turn.new_messages for item in input_items(m)] + output
        conversation.head, conversation.head_items = response["id"], len(conversation.items)
        s.store.touch(conversation)
    return response


async def _events(turn: _Turn, queue: asyncio.Queue, task, early: list) -> AsyncIterator[str]:
    seq = iter(range(1 << 62))

    def event(kind: str, **data) -> str:
        return f"event: {kind}\ndata: {json.dumps({'type': kind, 'sequence_number': next(seq), **data})}\n\n"

    started = {**turn.base, "status": "in_progress", "output": [], "usage": None}
    where = {"item_id": turn.message_id, "output_index": 0, "content_index": 0}
    empty = {"type": "output_text", "text": "", "annotations": []}

    def opening() -> list[str]:
        item = {"type": "message", "id": turn.message_id, "status": "in_progress", "role": "assistant", "content": []}
        return [
            event("response.output_item.added", output_index=0, item=item),
            event("response.content_part.added", **where, part=empty),
        ]

    opened = False
    try:
        yield event("response.created", response=started)
        yield event("response.in_progress", response=started)
        async for delta in chain(early, drain(queue, task)):
            piece = delta.text
            if not piece:  # a token whose text is held back (a call's), or not yet complete
                continue
            if not opened:  # the message item opens with its first text (a reply that only calls has none)
                opened = True
                for e in opening():
                    yield e
            yield event("response.output_text.delta", **where, delta=piece, logprobs=[])
        response = task.result()
    except BaseException:  # the client went away (this generator was cancelled or closed), or the turn failed
        task.cancel()  # (not awaited: a cancelled scope would cancel the wait; the task cleans up by itself)
        raise
    for index, item in enumerate(response["output"]):
        if item["type"] == "message":
            if not opened:
                for e in opening():
                    yield e
            content = item["content"][0]
            yield event("response.output_text.done", **where, text=content["text"], logprobs=[])
            yield event("response.content_part.done", **where, part=content)
        else:  # a function call: whole, once the reply is parsed (its text is never streamed)
            at = {"item_id": item["id"], "output_index": index}
            yield event("response.output_item.added", output_index=index,
                        item={**item, "arguments": "", "status": "in_progress"})  # fmt: skip
            yield event("response.function_call_arguments.delta", **at, delta=item["arguments"])
            yield event("response.function_call_arguments.done", **at, name=item["name"], arguments=item["arguments"])
        yield event("response.output_item.done", output_index=index, item=item)
    done = "response.completed" if response["status"] == "completed" else "response.incomplete"
    yield event(done, response=response)


@router.get("/v1/responses/{response_id}")
async def get_response(response_id: str, s: State):
    return live(s.store.responses, response_id, "response").body


@router.post("/v1/responses/{response_id}/cancel")
async def cancel_response(response_id: str, s: State):
    """Stop a stored response whose turn is running and keep it: the reply so far, `incomplete` (reason
    "cancelled"), its KV kept — a follow-up continues from it. A finished response is returned as it is."""
    running = s.running.get(response_id)
    if running is None:
        return live(s.store.responses, response_id, "response").body
    while running.submitted is None and not running.finished.done():  # (its prompt is still being rendered)
        await asyncio.sleep(0.005)
    if running.submitted is not None:
        await asyncio.to_thread(s.gen.stop, running.submitted)  # False: it finished meanwhile (finished has it)
    try:
        return await asyncio.shield(running.finished)
    except ClientGone:
        raise APIError(409, f"response {response_id!r} was aborted (its client went away): nothing was kept",
                       "conflict_error") from None  # fmt: skip


@router.delete("/v1/responses/{response_id}")
async def delete_response(response_id: str, s: State):
    record = live(s.store.responses, response_id, "response")
    record.deleted = True
    if s.store.built_on(response_id) or s.pinned[response_id] > 0:
        s.store.save(record)  # later responses (or one running) build on its messages: kept, hidden
    else:
        s.store.remove(record)
    await threads.forget(s.store, s.gen, record.thread_id)
    return {"id": response_id, "object": "response.deleted", "deleted": True}


@router.get("/v1/responses/{response_id}/input_items")
async def response_input_items(response_id: str, s: State):
    record = live(s.store.responses, response_id, "response")
    return list_of([item for m in record.input_messages for item in input_items(m)])


# ---- items (shared with the Conversations API) ----------------------------------------------------------------------

_ITEMS = TypeAdapter(list[InputItem])


def messages_of(items: list[InputItem]) -> list[dict]:
    """Input items -> chat messages: a function_call joins the assistant message right before it (the same reply)
    or starts one; a function_call_output is a tool message."""
    out: list[dict] = []
    for item in items:
        if isinstance(item, FunctionCallItem):
            function = {"name": item.name, "arguments": item.arguments}
            call = {"id": item.call_id, "type": "function", "function": function}
            last = out[-1] if out else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif isinstance(item, FunctionCallOutputItem):
            out.append({"role": "tool", "tool_call_id": item.call_id, "content": content_text(item.output)})
        else:
            out.append(chat_message(item))
    return out


def items_messages(items: list[dict]) -> list[dict]:
    """Stored items (a conversation's) -> chat messages."""
    return messages_of(_ITEMS.validate_python(items))


def input_items(message: dict) -> list[dict]:
    """A chat message -> the items that stand for it (an assistant's calls: function_call items)."""
    if message["role"] == "assistant":
        return output_items(message, new_id("msg"))
    if message["role"] == "tool":
        return [{"type": "function_call_output", "id": new_id("fco"), "call_id": message.get("tool_call_id", ""),
                 "output": message["content"], "status": "completed"}]  # fmt: skip
    content = [{"type": "input_text", "text": message["content"]}]
    item_id = new_id("msg")
    return [{"type": "message", "id": item_id, "status": "completed", "role": message["role"], "content": content}]


def output_items(message: dict, message_id: str) -> list[dict]:
    """An assistant message -> its output items: the text (unless it only calls), then one function_call a call."""
    calls = message.get("tool_calls") or []
    items = []
    if message.get("content") or not calls:
        content = [{"type": "output_text", "text": message.get("content") or "", "annotations": []}]
        items.append({"type": "message", "id": message_id, "status": "completed", "role": "assistant",
                      "content": content})  # fmt: skip
    for call in calls:
        items.append({"type": "function_call", "id": new_id("fc"), "call_id": call["id"],
                      "name": call["function"]["name"], "arguments": call["function"]["arguments"],
                      "status": "completed"})  # fmt: skip
    return items
