"""`POST /v1/chat/completions`: stateless — the client sends the whole history each call; it is served through the
prompt tree (`submit_complete`), so a resent history is a cache hit."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Literal

from fastapi import APIRouter, Request
from pydantic import Field

from pensieve.engine.turn import Reply
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
    sse,
    sse_data,
)
from pensieve.server.store import new_id

router = APIRouter()


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]
    name: str | None = None


class StreamOptions(Strict):
    include_usage: bool = False


class ChatRequest(Strict):
    model: str | None = None
    messages: list[ChatMessage]
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = 1
    user: str | None = None


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatRequest, request: Request, s: State):
    s.check_model(body.model)
    if body.n != 1:
        raise APIError(400, "n: only 1 choice per request is supported", param="n")
    s.check_count(len(body.messages), "messages")
    max_tokens = body.max_completion_tokens or body.max_tokens
    sampling = s.sampling(body.temperature, body.top_p, max_tokens, body.stop, body.seed)
    tokens = await s.render([chat_message(m) for m in body.messages])
    head = {"id": new_id("chatcmpl"), "created": int(time.time()), "model": s.config.model_name}
    if not body.stream:
        reply = await s.run_turn(request, None, tokens, sampling, None)
        s.metrics.turn(reply, len(tokens))
        message = {"role": "assistant", "content": reply.text}
        choice = {"index": 0, "message": message, "finish_reason": reply.finish_reason, "logprobs": None}
        return {**head, "object": "chat.completion", "choices": [choice], "usage": _usage(tokens, reply)}
    include_usage = body.stream_options is not None and body.stream_options.include_usage
    return sse(_events(s, request, tokens, sampling, head, include_usage))


async def _events(s: ServerState, request: Request, tokens, sampling, head: dict, include_usage: bool) -> AsyncIterator:
    def chunk(delta: dict, finish: str | None = None) -> str:
        choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        data = {**head, "object": "chat.completion.chunk", "choices": [choice]}
        if include_usage:
            data["usage"] = None
        return sse_data(data)

    queue: asyncio.Queue = asyncio.Queue()
    yield chunk({"role": "assistant", "content": ""})
    task = detach(s.run_turn(request, None, tokens, sampling, queue.put_nowait))
    try:
        async for piece in drain(queue, task):
            yield chunk({"content": piece})
        reply = task.result()
    except BaseException:  # the client went away (this generator was cancelled or closed), or the turn failed
        task.cancel()  # its turn is aborted by the task itself
        raise
    s.metrics.turn(reply, len(tokens))
    yield chunk({}, reply.finish_reason)
    if include_usage:
        yield sse_data({**head, "object": "chat.completion.chunk", "choices": [], "usage": _usage(tokens, reply)})
    yield "data: [DONE]\n\n"


def _usage(tokens: list[int], reply: Reply) -> dict:
    prompt, completion = len(tokens), len(reply.token_ids)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached_tokens(reply)},
    }
