"""`POST /v1/completions` (OpenAI's legacy text completions): a raw prompt — text, token ids, or a list of either —
continued as it is (no chat template), served through the prompt tree (`submit_complete`), so a prompt that extends
an earlier one reuses its KV. `n` candidates share the prompt's KV; `logprobs` gives each token's log-probability
and its most likely alternatives. `echo` returns the prompt's text before the reply; with `logprobs` it would need
the prompt's log-probabilities, which a cached prefix does not have (its logits were never kept): refused."""

from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter, Request
from pydantic import ConfigDict, Field

from pensieve.engine.turn import Reply
from pensieve.server.common import (
    APIError,
    ServerState,
    State,
    Strict,
    cached_tokens,
    chain,
    detach,
    drain,
    first,
    sse,
    sse_data,
)
from pensieve.server.store import new_id

router = APIRouter()

MAX_N = 16
MAX_LOGPROBS = 20


class StreamOptions(Strict):
    include_usage: bool = False
    include_obfuscation: bool | None = None


class CompletionRequest(Strict):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"prompt": ["Once upon", [1, 2, 3]], "max_tokens": 4, "n": 2, "logprobs": 2, "stream": True},
    ]})  # fmt: skip
    model: str | None = None
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = Field(1, ge=1, le=MAX_N)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool | None = False
    stop: str | list[str] | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    seed: int | None = None
    user: str | None = None  # accepted, not used
    best_of: int | None = Field(None, ge=1)
    suffix: str | None = None
    # vLLM's extras
    top_k: int | None = None
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)
    ignore_eos: bool | None = None


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request, s: State):
    s.check_model(body.model)
    if body.suffix:
        raise APIError(400, "suffix: insertion (text after the completion) is not supported", param="suffix")
    if body.best_of is not None and body.best_of != (body.n or 1):
        raise APIError(400, "best_of: only best_of == n (candidates are returned, not ranked)", param="best_of")
    if body.echo and body.logprobs is not None:
        raise APIError(400, "echo with logprobs needs the prompt's log-probabilities, which a cached prefix does "
                       "not have: ask for one of them", param="echo")  # fmt: skip
    sampling = s.request_sampling(body, body.max_tokens, logprobs=body.logprobs)
    prompts = _prompts(body.prompt)
    s.check_count(len(prompts), "prompts", "prompt")
    tokens = await asyncio.to_thread(lambda: [_tokens(s, p) for p in prompts])
    echoes = [s.decode(t) if body.echo else "" for t in tokens]
    head = {"id": new_id("cmpl"), "created": int(time.time()), "model": s.config.model_name}
    n = sampling.n
    queue: asyncio.Queue = asyncio.Queue()
    on_delta = (lambda p: lambda d: queue.put_nowait((p, d))) if body.stream else (lambda p: None)
    tasks = [detach(s.run_turn(request, None, t, sampling, on_delta(p))) for p, t in enumerate(tokens)]
    everything = asyncio.gather(*tasks)
    everything.add_done_callback(lambda f: f.cancelled() or f.exception())
    try:  # one prompt refused (or the client gone): every prompt's turn is aborted, and the error is the answer
        early = await first(queue, everything) if body.stream else await asyncio.shield(everything)
    except BaseException:
        for task in tasks:
            task.cancel()
        raise
    if not body.stream:
        choices = []
        for p, reply in enumerate(early):
            s.metrics.turn(reply, len(tokens[p]))
            for i, r in enumerate((reply, *reply.candidates)):
                lp = _token_logprobs(s, r.logprobs or [], len(echoes[p])) if body.logprobs is not None else None
                text = echoes[p] + (r.text or "")
                choices.append({"text": text, "index": p * n + i, "logprobs": lp, "finish_reason": r.finish_reason})
        return {**head, "object": "text_completion", "choices": choices, "usage": _usage(tokens, early)}
    include_usage = body.stream_options is not None and body.stream_options.include_usage
    return sse(_events(s, queue, tasks, everything, early, tokens, echoes, n, head, include_usage, body.logprobs))


async def _events(s: ServerState, queue, tasks, everything, early, tokens, echoes, n, head, include_usage, logprobs):
    def chunk(index: int, text: str, finish: str | None = None, lp: dict | None = None) -> str:
        choice = {"text": text, "index": index, "logprobs": lp, "finish_reason": finish}
        data = {**head, "object": "text_completion", "choices": [choice]}
        if include_usage:
            data["usage"] = None
        return sse_data(data)

    offsets = {(p, i): len(echo) for p, echo in enumerate(echoes) for i in range(n)}  # each choice's text so far
    try:
        for p, echo in enumerate(echoes):
            for i in range(n):
                if echo:
                    yield chunk(p * n + i, echo)
        async for p, delta in chain(early, drain(queue, everything)):
            lp = None
            if logprobs is not None and delta.logprob is not None:
                lp = _token_logprobs(s, [delta.logprob], offsets[p, delta.index])
            offsets[p, delta.index] += len(delta.text)
            if delta.text or lp:
                yield chunk(p * n + delta.index, delta.text, lp=lp)
        replies = everything.result()
    except BaseException:  # the client went away, or a turn failed: every prompt's turn is aborted
        for task in tasks:
            task.cancel()
        raise
    for p, reply in enumerate(replies):
        s.metrics.turn(reply, len(tokens[p]))
        for i, r in enumerate((reply, *reply.candidates)):
            yield chunk(p * n + i, "", r.finish_reason)
    if include_usage:
        yield sse_data({**head, "object": "text_completion", "choices": [], "usage": _usage(tokens, replies)})
    yield "data: [DONE]\n\n"


def _prompts(prompt) -> list:
    """str | list[str] | list[int] | list[list[int]] -> the prompts (each a str or a list of ids)."""
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        return [prompt]
    return list(prompt)


def _tokens(s: ServerState, prompt) -> list[int]:
    if isinstance(prompt, list):
        return prompt  # ids: checked against the vocabulary when the turn is admitted (a 400)
    if not prompt:
        raise APIError(400, "prompt is empty", param="prompt")
    if s.tokenizer is None:
        raise APIError(400, "this server has no tokenizer: send the prompt as token ids", param="prompt")
    return list(s.tokenizer(prompt)["input_ids"])


def _token_logprobs(s: ServerState, logprobs, offset: int = 0) -> dict:
    """The legacy shape: tokens, token_logprobs, top_logprobs (token -> logprob), text_offset."""
    out: dict = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for t in logprobs:
        text = s.token_text(t.token_id)
        out["tokens"].append(text)
        out["token_logprobs"].append(t.logprob)
        out["top_logprobs"].append({s.token_text(i): lp for i, lp in t.top})
        out["text_offset"].append(offset)
        offset += len(text)
    return out


def _usage(tokens: list[list[int]], replies: list[Reply]) -> dict:
    prompt = sum(len(t) for t in tokens)
    completion = sum(len(r.token_ids) for reply in replies for r in (reply, *reply.candidates))
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": sum(cached_tokens(r) for r in replies)},
    }
