"""`POST /v1/chat/completions`: stateless — the client sends the whole history each call; it is served through the
prompt tree (`submit_complete`), so a resent history is a cache hit.

Every field of OpenAI's request is implemented, accepted as a neutral value, or refused with a 400 that names it
(docs/serving.md has the table; tests/server/test_compat.py walks the installed `openai` package's request types
against it). The library does the work: sampling controls, `n` candidates, `response_format` as a structured
output, tools (rendered by the chat template or the generic fallback, calls parsed per family, forced by a
grammar), reasoning split off (`reasoning_content`, as vLLM names it).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import APIRouter, Request
from pydantic import ConfigDict, Field
from pydantic.json_schema import SkipJsonSchema

from pensieve.config import StructuredOutput
from pensieve.engine.turn import Delta, Reply, TokenLogprob
from pensieve.server.common import (
    APIError,
    ContentPart,
    ServerState,
    State,
    Strict,
    cached_tokens,
    chain,
    chat_message,
    detach,
    drain,
    first,
    refuse,
    request_tools,
    sse,
    sse_data,
    stats,
)
from pensieve.server.store import new_id
from pensieve.structured.tools import ToolUse

router = APIRouter()

MAX_N = 16  # candidates per request
MAX_TOP_LOGPROBS = 20  # OpenAI's limit


class FunctionCall(Strict):
    name: str
    arguments: str


class ToolCallIn(Strict):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None  # an assistant's calls
    tool_call_id: str | None = None  # a tool result's call
    refusal: str | None = None
    reasoning_content: str | None = None  # an assistant's reasoning, sent back (templates that think may show it)


class FunctionDef(Strict):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None  # forced calls follow the schema whatever it says; free calls are parsed, not forced


class ToolDef(Strict):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(Strict):
    name: str


class NamedToolChoice(Strict):
    type: Literal["function"]
    function: NamedFunction


class JSONSchemaFormat(Strict):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None  # the reply always follows the schema (constrained decoding)


class ResponseFormat(Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class StreamOptions(Strict):
    include_usage: bool = False
    include_obfuscation: bool | None = None  # no obfuscation padding is sent (127.0.0.1 / your own network)


class ChatRequest(Strict):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{
        "messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Weather in Paris?"}],
        "max_tokens": 4, "temperature": 0, "n": 2, "logprobs": True, "top_logprobs": 2, "stream": True,
        "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object",
                   "properties": {"city": {"type": "string"}}, "required": ["city"]}}}],
        "tool_choice": "required", "stream_options": {"include_usage": True},
    }]})  # fmt: skip
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int | None = Field(1, ge=1, le=MAX_N)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: ResponseFormat | None = None
    tools: list[ToolDef] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    # vLLM's extras
    top_k: int | None = None
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)
    ignore_eos: bool | None = None
    # accepted, no effect (docs/serving.md says why)
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    prompt_cache_options: dict[str, Any] | None = None
    safety_identifier: str | None = None
    reasoning_effort: str | None = None
    verbosity: str | None = None
    prediction: dict[str, Any] | None = None
    modalities: list[Literal["text"]] | None = None
    # refused unless null (REFUSED says why)
    audio: SkipJsonSchema[Any] = None
    web_search_options: SkipJsonSchema[Any] = None
    functions: SkipJsonSchema[Any] = None
    function_call: SkipJsonSchema[Any] = None
    moderation: SkipJsonSchema[Any] = None


REFUSED = {
    "audio": "audio output is not supported: this server generates text",
    "web_search_options": "web search is not supported: give the model a search tool (tools) instead",
    "functions": "the deprecated functions field is not supported: send tools",
    "function_call": "the deprecated function_call field is not supported: send tool_choice",
    "moderation": "moderation is not supported by this server",
}


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatRequest, request: Request, s: State):
    s.check_model(body.model)
    refuse(body, REFUSED)
    s.check_count(len(body.messages), "messages", "messages")
    sampling = s.request_sampling(
        body,
        body.max_completion_tokens or body.max_tokens,
        logprobs=_logprobs(body),
        structured_output=_structured_output(body.response_format),
    )
    tools = _tools(body)
    messages = [chat_message(m) for m in body.messages]
    head = {"id": new_id("chatcmpl"), "created": int(time.time()), "model": s.config.model_name}
    if not body.stream:
        reply = await s.run_turn(request, None, messages, sampling, None, tools)
        s.metrics.turn(reply, reply.num_new_tokens)
        choices = [_choice(s, r, i, body.logprobs) for i, r in enumerate((reply, *reply.candidates))]
        usage = _usage(reply)
        return {**head, "object": "chat.completion", "choices": choices, "usage": usage, "stats": stats(reply)}
    include_usage = body.stream_options is not None and body.stream_options.include_usage
    queue: asyncio.Queue = asyncio.Queue()
    task = detach(s.run_turn(request, None, messages, sampling, queue.put_nowait, tools))
    early = await first(queue, task)  # a turn refused at admission is a 400 here, not a broken stream
    return sse(_events(s, queue, task, early, sampling.n, head, include_usage, bool(body.logprobs)))


async def _events(
    s: ServerState, queue, task, early: list, n: int, head: dict, include_usage: bool, logprobs: bool
) -> AsyncIterator:
    def chunk(index: int, delta: dict, finish: str | None = None, lp: list | None = None) -> str:
        choice = {"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}
        if lp is not None:
            choice["logprobs"] = {"content": lp}
        data = {**head, "object": "chat.completion.chunk", "choices": [choice]}
        if include_usage:
            data["usage"] = None
        return sse_data(data)

    try:
        for index in range(n):
            yield chunk(index, {"role": "assistant", "content": ""})
        async for delta in chain(early, drain(queue, task)):
            piece = _delta(delta)
            lp = [_logprob(s, delta.logprob)] if logprobs and delta.logprob is not None else None
            if piece or lp:
                yield chunk(delta.index, piece, lp=lp)
        reply = task.result()
    except BaseException:  # the client went away (this generator was cancelled or closed), or the turn failed
        task.cancel()  # its turn is aborted by the task itself
        raise
    s.metrics.turn(reply, reply.num_new_tokens)
    for index, r in enumerate((reply, *reply.candidates)):
        if r.tool_calls:  # a call's text is never streamed: each call comes whole, once the reply is parsed
            calls = [{"index": k, **c.message_form()} for k, c in enumerate(r.tool_calls)]
            yield chunk(index, {"tool_calls": calls})
        yield chunk(index, {}, _finish_reason(r))
    if include_usage:
        yield sse_data(
            {**head, "object": "chat.completion.chunk", "choices": [], "usage": _usage(reply), "stats": stats(reply)}
        )
    yield "data: [DONE]\n\n"


def _delta(delta: Delta) -> dict:
    out = {}
    if delta.reasoning:
        out["reasoning_content"] = delta.reasoning
    if delta.text:
        out["content"] = delta.text
    return out


def _choice(s: ServerState, reply: Reply, index: int, logprobs: bool | None) -> dict:
    message: dict = {"role": "assistant", "content": reply.text if reply.text or not reply.tool_calls else None}
    if reply.reasoning is not None:
        message["reasoning_content"] = reply.reasoning
    if reply.tool_calls:
        message["tool_calls"] = [c.message_form() for c in reply.tool_calls]
    lp = {"content": [_logprob(s, t) for t in reply.logprobs or []]} if logprobs else None
    return {"index": index, "message": message, "finish_reason": _finish_reason(reply), "logprobs": lp}


def _finish_reason(reply: Reply) -> str:
    return "tool_calls" if reply.tool_calls else reply.finish_reason


def _logprob(s: ServerState, t: TokenLogprob) -> dict:
    """A token's logprob in OpenAI's shape (token: its text; bytes: its UTF-8)."""

    def entry(token_id: int, logprob: float) -> dict:
        text = s.token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8", "surrogatepass"))}

    return {**entry(t.token_id, t.logprob), "top_logprobs": [entry(i, lp) for i, lp in t.top]}


def _logprobs(body: ChatRequest) -> int | None:
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    return (body.top_logprobs or 0) if body.logprobs else None


def _structured_output(fmt: ResponseFormat | None) -> StructuredOutput | None:
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return StructuredOutput(json_object=True)
    if fmt.json_schema is None or fmt.json_schema.schema_ is None:
        raise APIError(400, "response_format json_schema needs json_schema.schema", param="response_format")
    return StructuredOutput(json=fmt.json_schema.schema_)


def _tools(body: ChatRequest) -> ToolUse | None:
    choice = body.tool_choice
    named = choice.model_dump() if isinstance(choice, NamedToolChoice) else choice
    return request_tools([t.model_dump(exclude_none=True) for t in body.tools or []], named, body.parallel_tool_calls)


def _usage(reply: Reply) -> dict:
    prompt = reply.num_new_tokens
    completion = sum(len(r.token_ids) for r in (reply, *reply.candidates))
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached_tokens(reply)},
    }
