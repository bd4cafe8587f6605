"""What every router of the API shares: the server's state (`ServerState`, one per app, reached through the
`state` dependency), OpenAI's error shape, running a turn from async code, streaming, and small formatters."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi import Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict

from pensieve.api import Generator
from pensieve.config import SamplingParams
from pensieve.engine.turn import Delta, Reply, TurnAborted
from pensieve.server.metrics import Metrics
from pensieve.server.store import Store
from pensieve.structured.tools import ToolUse


@dataclass(frozen=True)
class ServerConfig:
    model_name: str = "pensieve"
    api_key: str | None = None  # Bearer key every endpoint but /health needs (None: no key)
    max_body_bytes: int = 4 * 2**20
    max_tokens: int = 4096  # the most a request may ask to generate
    default_max_tokens: int = 256  # when a request names none
    max_messages: int = 1024  # chat messages / input items per request
    max_stop: int = 4  # stop strings per request
    max_stored_responses: int | None = 10_000  # retention (server/retention.py); None: no bound
    records_ttl_s: float | None = 30 * 86_400.0  # a record idle longer is dropped; None: kept until deleted


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type_, param


class ClientGone(Exception):
    """The client disconnected; its turn was aborted."""


def error_response(status: int, message: str, type_: str = "invalid_request_error", param=None) -> JSONResponse:
    """OpenAI's error shape."""
    body = {"error": {"message": message, "type": type_, "param": param, "code": None}}
    return JSONResponse(body, status_code=status)


# ---- request models the APIs share (extra fields are refused: a typo is a 400, not silently ignored) --------------


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ContentPart(Strict):
    type: Literal["text", "input_text", "output_text"]
    text: str
    annotations: list | None = None


# ---- the server's state -------------------------------------------------------------------------------------------


class ServerState:
    """The generator, the record store, the limits and the metrics, with the checks every endpoint makes."""

    def __init__(self, gen: Generator, tokenizer, store: Store, config: ServerConfig) -> None:
        self.gen = gen
        self.tokenizer = tokenizer
        self.store = store
        self.config = config
        self.metrics = Metrics()
        self.turns = Turns(gen)
        # ids of the responses and conversations running turns continue (never swept or deleted: retention.py)
        self.pinned: Counter[str] = Counter()
        # stored responses whose turn runs, by id (what `POST /v1/responses/{id}/cancel` stops)
        self.running: dict[str, RunningTurn] = {}

    def running_turn(self, response_id: str, stored: bool) -> RunningTurn:
        """A response's turn, to be resolved with its response object; a stored one can be cancelled meanwhile.
        Its turn's task pops it from `running` when it ends."""
        finished = asyncio.get_running_loop().create_future()
        finished.add_done_callback(lambda f: f.cancelled() or f.exception())  # (nobody need await it)
        turn = RunningTurn(finished)
        if stored:
            self.running[response_id] = turn
        return turn

    def sampling(
        self, temperature=None, top_p=None, max_tokens=None, stop=None, seed=None, max_field="max_tokens", **more
    ) -> SamplingParams:
        """A request's sampling fields -> SamplingParams (`more`: its other fields, by SamplingParams' names;
        max_field: the request's name for max_tokens). A bad value is a 400 naming it."""
        config = self.config
        if max_tokens is not None and max_tokens > config.max_tokens:
            raise APIError(400, f"{max_field} {max_tokens} is over this server's limit of {config.max_tokens}",
                           param=max_field)  # fmt: skip
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if len(stops) > config.max_stop or any(not s for s in stops):
            raise APIError(400, f"stop: at most {config.max_stop} non-empty strings", param="stop")
        try:
            return SamplingParams(
                max_new_tokens=max_tokens or config.default_max_tokens,
                temperature=temperature,
                top_p=top_p,
                seed=seed,
                stop=tuple(stops),
                **{k: v for k, v in more.items() if v is not None},
            )
        except ValueError as error:
            raise APIError(400, str(error)) from None

    def request_sampling(self, body, max_tokens, **more) -> SamplingParams:
        """The sampling fields chat and legacy completions share, read off the request (`more`: the rest)."""
        shared = ("n", "presence_penalty", "frequency_penalty", "repetition_penalty", "top_k", "min_p", "ignore_eos")
        return self.sampling(
            body.temperature,
            body.top_p,
            max_tokens,
            body.stop,
            body.seed,
            logit_bias=logit_bias(body.logit_bias),
            **{field: getattr(body, field) for field in shared},
            **more,
        )

    def check_count(self, n: int, what: str, param: str) -> None:
        if n == 0:
            raise APIError(400, f"{what} is empty", param=param)
        if n > self.config.max_messages:
            raise APIError(400, f"{n} {what}: over this server's limit of {self.config.max_messages}", param=param)

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.config.model_name:
            name = self.config.model_name
            raise APIError(404, f"model {model!r} is not served here (this server serves {name!r})", param="model")

    def token_text(self, token_id: int) -> str:
        """One token's text (a logprob's `token`)."""
        return self.tokenizer.decode([token_id]) if self.tokenizer is not None else str(token_id)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if self.tokenizer is not None else ""

    async def run_turn(
        self, request: Request, thread_id, prompt, sampling, on_delta=None, tools=None, running: RunningTurn = None
    ) -> Reply:
        """One turn, aborted if the client disconnects (checked while it runs). prompt: token ids (a thread's new
        tokens, or a whole prompt), or chat messages (a completion: rendered with `tools` on a worker thread).
        on_delta(Delta) gets each sampled token's delta on the event loop (their texts join to `Reply.text`);
        running, when given, gets the Future the generator returned (what a cancel stops)."""
        task = asyncio.ensure_future(self.turns.run(thread_id, prompt, sampling, on_delta, tools, running))
        watcher = asyncio.ensure_future(_watch_disconnect(request, task))
        try:
            reply = await task
        except asyncio.CancelledError:
            if not watcher.done() or not task.cancelled():
                raise
            raise ClientGone() from None
        except TurnAborted:
            raise ClientGone() from None
        except ValueError as error:
            raise APIError(400, str(error)) from None
        except KeyError as error:
            raise APIError(404, str(error.args[0] if error.args else error)) from None
        finally:
            watcher.cancel()
        return reply


@dataclass
class RunningTurn:
    """A response's turn while it runs: the Future it resolves with the response object, and the Future the
    generator returned for it once submitted (a cancel stops that turn, never a later one on the same thread)."""

    finished: asyncio.Future
    submitted: Any = None


def text_pieces(on_piece):
    """An on_delta that passes each delta's text on (None: None)."""
    return None if on_piece is None else (lambda delta: delta.text and on_piece(delta.text))


def _state(request: Request) -> ServerState:
    return request.app.state.pensieve


State = Annotated[ServerState, Depends(_state)]  # the dependency every endpoint takes: this app's ServerState


# ---- the engine, seen from the event loop -------------------------------------------------------------------------


class Turns:
    """Runs turns on the generator from async code: the reply's text arrives as it is sampled (passed over from the
    engine's thread), a cancelled caller (client gone) aborts its turn and waits until the abort is done."""

    def __init__(self, gen: Generator) -> None:
        self.gen = gen

    async def run(
        self, thread_id: str | None, prompt, sampling: SamplingParams, on_delta, tools=None, running=None
    ) -> Reply:
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        done.add_done_callback(lambda f: f.cancelled() or f.exception())  # (also when nobody awaits it any more)

        def pass_delta(delta: Delta) -> None:
            if not loop.is_closed():
                loop.call_soon_threadsafe(on_delta, delta)

        def finish(future) -> None:
            def settle() -> None:
                if not done.done():
                    error = future.exception()
                    done.set_exception(error) if error is not None else done.set_result(future.result())

            if not loop.is_closed():
                loop.call_soon_threadsafe(settle)

        on_token = None if on_delta is None else pass_delta
        if thread_id is not None:
            future = self.gen.submit(thread_id, prompt, sampling, on_token=on_token, tools=tools)
            if running is not None:
                running.submitted = future
        else:  # a completion renders its prompt on the thread that submits it: a worker's, not the event loop
            submitting = asyncio.ensure_future(
                asyncio.to_thread(self.gen.submit_complete, prompt, sampling, on_token=on_token, tools=tools)
            )
            try:
                future = await asyncio.shield(submitting)
            except asyncio.CancelledError:
                try:
                    await asyncio.to_thread(self.gen.abort, await submitting)
                except Exception:  # noqa: BLE001, S110  (the submission failed: nothing runs)
                    pass
                raise
        future.add_done_callback(finish)
        try:
            return await asyncio.shield(done)
        except asyncio.CancelledError:
            if not await asyncio.to_thread(self.gen.abort, future):
                # not found running: it finished, or (a cluster) has not reached its instance yet: let it end, so
                # that what it leaves is known when the caller releases its thread
                await asyncio.to_thread(_outcome, future)
            raise


def _outcome(future) -> None:
    try:
        future.result()
    except BaseException:  # noqa: BLE001, S110  (only its end is waited for)
        pass


async def _watch_disconnect(request: Request, task: asyncio.Future) -> None:
    while not task.done():
        if await request.is_disconnected():
            task.cancel()
            return
        await asyncio.sleep(0.05)


# ---- streaming ----------------------------------------------------------------------------------------------------

_DETACHED: set[asyncio.Task] = set()


def detach(coro) -> asyncio.Task:
    """A task of its own (outside the request's cancel scope), referenced until done."""
    task = asyncio.ensure_future(coro)
    _DETACHED.add(task)
    task.add_done_callback(_DETACHED.discard)
    task.add_done_callback(lambda t: t.cancelled() or t.exception())  # its error is the stream's, not unhandled
    return task


async def first(queue: asyncio.Queue, task: asyncio.Future) -> list:
    """Wait for a turn's first delta, or its end: a turn refused at admission raises its error here, before a stream
    sends its 200. -> [the first delta] ([] if it ended with none; drain the queue for the rest)."""
    getter = asyncio.ensure_future(queue.get())
    await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
    if getter.done():
        return [getter.result()]
    getter.cancel()
    if task.exception() is not None:
        task.cancel()
        task.result()
    return []


async def chain(early: list, rest: AsyncIterator) -> AsyncIterator:
    """The items of `early`, then those of `rest`."""
    for item in early:
        yield item
    async for item in rest:
        yield item


async def drain(queue: asyncio.Queue, task: asyncio.Future) -> AsyncIterator[str]:
    """Pieces from queue until task is done (then whatever is left); task's error is raised by task.result()."""
    while True:
        getter = asyncio.ensure_future(queue.get())
        await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
        if getter.done():
            yield getter.result()
            continue
        getter.cancel()
        while not queue.empty():
            yield queue.get_nowait()
        task.result()
        return


def sse(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def sse_data(data: dict) -> str:
    return f"data: {json.dumps(data)}\n\n"


# ---- formatting ---------------------------------------------------------------------------------------------------


def cached_tokens(reply: Reply) -> int:
    """Prompt tokens whose KV was found (any tier): OpenAI's cached_tokens."""
    return reply.num_reused_device + reply.num_reused_host + reply.num_reused_disk


def stats(reply: Reply) -> dict:
    """What the turn cost and what the cache gave it (pensieve's own field on a response or completion)."""
    decode_s = reply.latency_s - reply.ttft_s
    produced = sum(len(r.token_ids) for r in (reply, *reply.candidates))
    return {
        "cached_tokens": {
            "device": reply.num_reused_device,
            "host": reply.num_reused_host,
            "disk": reply.num_reused_disk,
        },  # fmt: skip
        "prefilled_tokens": reply.num_prefilled,
        "recomputed_tokens": reply.num_recomputed,
        "new_tokens": reply.num_new_tokens,
        "ttft_s": round(reply.ttft_s, 6),
        "latency_s": round(reply.latency_s, 6),
        "output_tokens_per_s": round((produced - 1) / decode_s, 3) if produced > 1 and decode_s > 0 else None,
    }


def request_tools(tools: list[dict], choice, parallel: bool | None) -> ToolUse | None:
    """A request's tools (OpenAI's chat shape) and tool_choice (None, a str, or {"type": "function", "function":
    {"name": ...}}) -> the library's ToolUse; a bad one is a 400 naming tools."""
    if not tools:
        if choice not in (None, "none", "auto"):
            raise APIError(400, "tool_choice needs tools", param="tool_choice")
        return None
    try:
        return ToolUse(tuple(tools), choice or "auto", True if parallel is None else parallel)
    except ValueError as error:
        raise APIError(400, str(error), param="tools") from None


def content_text(content: Any) -> str:
    return content if isinstance(content, str) else "".join(part.text for part in content)


def chat_message(m) -> dict:
    """A request's message model -> a chat-template message ("developer" is the template's "system"): an assistant's
    tool calls and reasoning, a tool result's call id and a name, where given."""
    role = "system" if m.role == "developer" else m.role
    content = None if m.content is None else content_text(m.content)
    if content is None and not getattr(m, "tool_calls", None):
        raise APIError(400, f"a {m.role} message needs content", param="messages")
    message = {"role": role, "content": content}
    for key in ("name", "tool_call_id", "reasoning_content"):
        if getattr(m, key, None) is not None:
            message[key] = getattr(m, key)
    if getattr(m, "tool_calls", None):
        message["tool_calls"] = [c.model_dump() for c in m.tool_calls]
    return message


def logit_bias(bias: dict[str, float] | None) -> dict[int, float] | None:
    """A request's logit_bias (token ids as strings, biases in [-100, 100]) -> SamplingParams'; a bad one is a 400.
    Ids outside the vocabulary are refused by admission."""
    if not bias:
        return None
    out = {}
    for key, value in bias.items():
        if not key.isdigit() or not -100 <= value <= 100:
            raise APIError(400, f"logit_bias: keys are token ids, values in [-100, 100]; got {key!r}: {value}",
                           param="logit_bias")  # fmt: skip
        out[int(key)] = value
    return out


def refuse(body: BaseModel, refused: dict[str, str]) -> None:
    """A 400 naming the first field of `refused` the request gives a value (why: refused[field])."""
    for field, why in refused.items():
        if getattr(body, field, None) is not None:
            raise APIError(400, f"{field}: {why}", param=field)


def list_of(items: list[dict]) -> dict:
    return {
        "object": "list",
        "data": items,
        "first_id": items[0]["id"] if items else None,
        "last_id": items[-1]["id"] if items else None,
        "has_more": False,
    }


def live(table: dict, record_id: str, what: str):
    """The record, unless there is none or it was deleted (404)."""
    record = table.get(record_id)
    if record is None or getattr(record, "deleted", False):
        raise APIError(404, f"no {what} {record_id!r}", "not_found_error")
    return record
