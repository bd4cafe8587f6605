"""The OpenAI-compatible HTTP API (FastAPI) over one StatefulGenerator whose engine runs on a thread of its own.

- `/v1/chat/completions` is stateless: the client sends the whole history each call; it is served through the
  prompt tree (`submit_complete`), so a resent history is a cache hit.
- `/v1/responses` is stateful: a stored response lives on a pensieve conversation (a "thread", raw token mode), and
  a follow-up (`previous_response_id`, or a `conversation`) continues that thread's KV: only the new tokens are
  prefilled. A response continued twice is forked (its KV shared, not copied).
- Chat templating and detokenization run off the engine's thread (a worker thread and the event loop); the engine
  thread only schedules, steps and samples.
- A client that disconnects aborts its turn: none of the turn is kept (`StatefulGenerator.abort`), nothing is
  stored, and the thread is as it was.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from pensieve.cache.tree import common_prefix
from pensieve.config import SamplingParams
from pensieve.engine.detokenizer import IncrementalDetokenizer, find_stop
from pensieve.engine.turn import Reply, TurnAborted
from pensieve.server.metrics import Metrics
from pensieve.server.store import ConversationRecord, ResponseRecord, Store, Thread, new_id


@dataclass(frozen=True)
class ServerConfig:
    model_name: str = "pensieve"
    api_key: str | None = None  # Bearer key every endpoint but /health needs (None: no key)
    max_body_bytes: int = 4 * 2**20
    max_tokens: int = 4096  # the most a request may ask to generate
    default_max_tokens: int = 256  # when a request names none
    max_messages: int = 1024  # chat messages / input items per request
    max_stop: int = 4  # stop strings per request


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type_, param


def _error(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None) -> JSONResponse:
    """OpenAI's error shape."""
    body = {"error": {"message": message, "type": type_, "param": param, "code": None}}
    return JSONResponse(body, status_code=status)


# ---- request models (extra fields are refused: a typo is a 400, not silently ignored) --------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ContentPart(_Strict):
    type: Literal["text", "input_text", "output_text"]
    text: str
    annotations: list | None = None


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]
    name: str | None = None


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatRequest(_Strict):
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


class InputMessage(_Strict):
    type: Literal["message"] = "message"
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]
    id: str | None = None
    status: str | None = None


class ConversationRef(_Strict):
    id: str


class ResponsesRequest(_Strict):
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


class ConversationCreate(_Strict):
    items: list[InputMessage] | None = None
    metadata: dict[str, str] | None = None


class ItemsCreate(_Strict):
    items: list[InputMessage]


# ---- the engine, seen from the event loop -------------------------------------------------------------------


class Turns:
    """Runs turns on the generator from async code: tokens arrive as they are sampled (passed over from the engine
    thread), a cancelled caller (client gone) aborts its turn and waits until the abort is done."""

    def __init__(self, gen) -> None:
        self.gen = gen

    async def run(self, thread_id: str | None, tokens: list[int], sampling: SamplingParams, on_token) -> Reply:
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        done.add_done_callback(lambda f: f.cancelled() or f.exception())  # (also when nobody awaits it any more)

        def pass_token(token: int) -> None:
            if not loop.is_closed():
                loop.call_soon_threadsafe(on_token, token)

        def finish(future) -> None:
            def settle() -> None:
                if not done.done():
                    error = future.exception()
                    done.set_exception(error) if error is not None else done.set_result(future.result())

            if not loop.is_closed():
                loop.call_soon_threadsafe(settle)

        if thread_id is None:
            future = self.gen.submit_complete(tokens, sampling, on_token=pass_token)
        else:
            future = self.gen.submit(thread_id, tokens, sampling, on_token=pass_token)
        future.add_done_callback(finish)
        try:
            return await asyncio.shield(done)
        except asyncio.CancelledError:
            if not await asyncio.to_thread(self.gen.abort, future):
                # not found running: it finished, or (a cluster) has not reached its instance yet: let it end, so
                # that what it leaves is known when the caller releases its thread
                await asyncio.to_thread(_outcome, future)
            raise


class TextStream:
    """Reply text as it grows, never emitting what may turn out to be part of a stop string: pieces are prefixes
    of the final `Reply.text` (the engine cuts it at the first stop string)."""

    def __init__(self, tokenizer, stops: tuple[str, ...]) -> None:
        self.detok = IncrementalDetokenizer(tokenizer)
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.sent = 0
        self.stopped = False

    def add(self, token: int) -> str:
        if self.stopped:
            return ""
        self.detok.add(token)
        text = self.detok.text
        cut = find_stop(text, self.stops) if self.stops else None
        if cut is not None:
            self.stopped = True
            safe = cut
        else:
            safe = len(text) - self.hold
        if safe <= self.sent:
            return ""
        piece, self.sent = text[self.sent : safe], safe
        return piece

    def rest(self, final: str) -> str:
        piece, self.sent = final[self.sent :], len(final)
        return piece


# ---- the app -------------------------------------------------------------------------------------------------


def create_app(gen, tokenizer, store: Store | None = None, config: ServerConfig | None = None) -> FastAPI:
    """The API over `gen` (a StatefulGenerator whose engine a thread drives: `gen.serve`)."""
    config = config or ServerConfig()
    store = store or Store()
    turns = Turns(gen)
    metrics = Metrics()
    app = FastAPI(title="pensieve", docs_url=None, redoc_url=None, openapi_url=None)

    # ---- middleware: key, body size, metrics -------------------------------------------------------------------

    expected = f"Bearer {config.api_key}".encode() if config.api_key else None

    @app.middleware("http")
    async def guard(request: Request, call_next):
        path = request.url.path
        endpoint = _endpoint(path)
        if expected is not None and path != "/health":
            given = request.headers.get("authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                metrics.request(endpoint, 401)
                return _error(401, "missing or wrong API key (Authorization: Bearer ...)", "authentication_error")
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > config.max_body_bytes):
            metrics.request(endpoint, 413)
            return _error(413, f"request body over {config.max_body_bytes} bytes")
        if request.method == "POST":
            body = await request.body()  # read once, bounded (chunked bodies have no content-length)
            if len(body) > config.max_body_bytes:
                metrics.request(endpoint, 413)
                return _error(413, f"request body over {config.max_body_bytes} bytes")
        response = await call_next(request)
        metrics.request(endpoint, response.status_code)
        return response

    @app.exception_handler(APIError)
    async def api_error(_request: Request, error: APIError):
        return _error(error.status, error.message, error.type, error.param)

    @app.exception_handler(ClientGone)
    async def client_gone(_request: Request, _gone: ClientGone):
        return _error(499, "the client closed the request; its turn was aborted")

    @app.exception_handler(RequestValidationError)
    async def bad_request(_request: Request, error: RequestValidationError):
        first = error.errors()[0] if error.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:])
        return _error(400, f"{where}: {first.get('msg', 'invalid request')}" if where else "invalid request body")

    # ---- helpers -----------------------------------------------------------------------------------------------

    def sampling_for(temperature, top_p, max_tokens, stop, seed) -> SamplingParams:
        if max_tokens is not None and max_tokens > config.max_tokens:
            raise APIError(400, f"max tokens {max_tokens} is over this server's limit of {config.max_tokens}")
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
            )
        except ValueError as error:
            raise APIError(400, str(error)) from None

    def check_count(n: int, what: str) -> None:
        if n == 0:
            raise APIError(400, f"{what} is empty")
        if n > config.max_messages:
            raise APIError(400, f"{n} {what}: over this server's limit of {config.max_messages}")

    async def render(messages: list[dict]) -> list[int]:
        """The chat template over messages (on a worker thread: templating stays off the engine's thread)."""

        def work() -> list[int]:
            return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False))

        return await asyncio.to_thread(work)

    def check_model(model: str | None) -> None:
        if model is not None and model != config.model_name:
            raise APIError(404, f"model {model!r} is not served here (this server serves {config.model_name!r})",
                           param="model")  # fmt: skip

    async def run_turn(request: Request, thread_id, tokens, sampling, on_piece) -> Reply:
        """One turn, aborted if the client disconnects (checked while it runs)."""
        text = TextStream(tokenizer, sampling.stop)

        def on_token(token: int) -> None:
            if on_piece is not None and (piece := text.add(token)):
                on_piece(piece)

        task = asyncio.ensure_future(turns.run(thread_id, tokens, sampling, on_token))
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
        if on_piece is not None and (rest := text.rest(reply.text or "")):
            on_piece(rest)
        return reply

    # ---- endpoints ---------------------------------------------------------------------------------------------

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        stats = await asyncio.to_thread(gen.stats)
        return Response(metrics.render(stats), media_type=metrics.content_type)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_model_card(config.model_name)]}

    @app.get("/v1/models/{model}")
    async def model_card(model: str):
        check_model(model)
        return _model_card(config.model_name)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        check_model(body.model)
        if body.n != 1:
            raise APIError(400, "n: only 1 choice per request is supported", param="n")
        check_count(len(body.messages), "messages")
        sampling = sampling_for(
            body.temperature, body.top_p, body.max_completion_tokens or body.max_tokens, body.stop, body.seed
        )
        tokens = await render([_message(m) for m in body.messages])
        completion_id, created = new_id("chatcmpl"), int(time.time())
        head = {"id": completion_id, "created": created, "model": config.model_name}

        def usage(reply: Reply) -> dict:
            prompt, cached, completion = len(tokens), _cached(reply), len(reply.token_ids)
            return {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": cached},
            }

        if not body.stream:
            reply = await run_turn(request, None, tokens, sampling, None)
            metrics.turn(reply, len(tokens))
            message = {"role": "assistant", "content": reply.text}
            choice = {"index": 0, "message": message, "finish_reason": reply.finish_reason, "logprobs": None}
            return {**head, "object": "chat.completion", "choices": [choice], "usage": usage(reply)}

        include_usage = body.stream_options is not None and body.stream_options.include_usage

        def chunk(delta: dict, finish: str | None = None) -> str:
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            data = {**head, "object": "chat.completion.chunk", "choices": [choice]}
            if include_usage:
                data["usage"] = None
            return f"data: {json.dumps(data)}\n\n"

        async def events() -> AsyncIterator[str]:
            queue: asyncio.Queue = asyncio.Queue()
            yield chunk({"role": "assistant", "content": ""})
            task = _detach(run_turn(request, None, tokens, sampling, queue.put_nowait))
            try:
                async for piece in _drain(queue, task):
                    yield chunk({"content": piece})
                reply = task.result()
            except BaseException:  # the client went away (this generator was cancelled or closed), or the turn failed
                task.cancel()  # its turn is aborted by the task itself
                raise
            metrics.turn(reply, len(tokens))
            yield chunk({}, reply.finish_reason)
            if include_usage:
                data = {**head, "object": "chat.completion.chunk", "choices": [], "usage": usage(reply)}
                yield f"data: {json.dumps(data)}\n\n"
            yield "data: [DONE]\n\n"

        return _sse(events())

    # ---- responses ---------------------------------------------------------------------------------------------

    @app.post("/v1/responses")
    async def create_response(body: ResponsesRequest, request: Request):
        check_model(body.model)
        sampling = sampling_for(body.temperature, body.top_p, body.max_output_tokens, body.stop, body.seed)
        text_input = isinstance(body.input, str)
        new_messages = [{"role": "user", "content": body.input}] if text_input else [_message(m) for m in body.input]
        check_count(len(new_messages), "input items")
        if isinstance(body.input, str) and not body.input:
            raise APIError(400, "input is empty", param="input")
        conversation = None
        if body.conversation is not None:
            if body.previous_response_id is not None:
                raise APIError(400, "give previous_response_id or conversation, not both", param="conversation")
            conv_id = body.conversation if isinstance(body.conversation, str) else body.conversation.id
            conversation = _live(store.conversations, conv_id, "conversation")
        previous = None
        if body.previous_response_id is not None:
            previous = _live(store.responses, body.previous_response_id, "response")
        context = store.context(previous) if previous is not None else []
        if conversation is not None:
            context = [_item_message(item) for item in conversation.items]
        check_count(len(context) + len(new_messages), "messages in the conversation")
        system = [{"role": "system", "content": body.instructions}] if body.instructions else []
        tokens = await render(system + context + new_messages)

        keep = body.store or conversation is not None
        thread, made = await _claim_thread(store, gen, previous, conversation, keep, tokens)
        response_id, created = new_id("resp"), int(time.time())
        message_id = new_id("msg")
        delta = tokens
        if thread is not None:
            # what the thread holds that the rendering keeps (at least one token is left to feed)
            p = min(common_prefix(thread.tokens, tokens), len(tokens) - 1)
            try:
                if p < len(thread.tokens):  # a conversation whose rendering changed past p, or a fork cut back
                    await asyncio.to_thread(gen.truncate, thread.id, p)
                    thread.tokens = thread.tokens[:p]
            except BaseException:
                await _release_thread(store, gen, thread, made)
                raise
            delta = tokens[p:]

        base = {
            "id": response_id,
            "object": "response",
            "created_at": created,
            "model": config.model_name,
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

        async def finish(reply: Reply) -> dict:
            metrics.turn(reply, len(tokens))
            prompt, cached, completion = len(tokens), _cached(reply), len(reply.token_ids)
            text = reply.text or ""
            output_item = _output_message(message_id, text)
            response = {
                **base,
                "status": "completed" if reply.finish_reason == "stop" else "incomplete",
                "incomplete_details": None if reply.finish_reason == "stop" else {"reason": "max_output_tokens"},
                "output": [output_item],
                "usage": {
                    "input_tokens": prompt,
                    "input_tokens_details": {"cached_tokens": cached},
                    "output_tokens": completion,
                    "output_tokens_details": {"reasoning_tokens": 0},
                    "total_tokens": prompt + completion,
                },
            }
            if thread is not None:
                thread.tokens = tokens + reply.token_ids
                thread.busy = False
                store.save(thread)
            if keep:
                store.save(
                    ResponseRecord(
                        id=response_id,
                        # a response in a conversation is continued through the conversation (the thread moves on)
                        thread_id=thread.id if thread is not None and conversation is None else None,
                        num_tokens=len(thread.tokens) if thread is not None else 0,
                        previous_response_id=body.previous_response_id,
                        conversation_id=conversation.id if conversation is not None else None,
                        input_messages=new_messages,
                        output_message={"role": "assistant", "content": text},
                        body=response,
                    )
                )
            if conversation is not None:
                conversation.items += [_input_item(m) for m in new_messages] + [output_item]
                store.save(conversation)
            return response

        thread_id = thread.id if thread is not None else None

        async def turn(on_piece) -> dict:
            """The turn and its bookkeeping, as one task of its own: a client going away cancels it (its turn is
            aborted, the thread released) but never interrupts the bookkeeping half-way."""
            try:
                reply = await run_turn(request, thread_id, delta, sampling, on_piece)
            except BaseException:
                await _release_thread(store, gen, thread, made)
                raise
            return await finish(reply)

        if not body.stream:
            return await turn(None)

        async def events() -> AsyncIterator[str]:
            seq = iter(range(1 << 62))

            def event(kind: str, **data) -> str:
                return f"event: {kind}\ndata: {json.dumps({'type': kind, 'sequence_number': next(seq), **data})}\n\n"

            started = {**base, "status": "in_progress", "output": [], "usage": None}
            item = {"type": "message", "id": message_id, "status": "in_progress", "role": "assistant", "content": []}
            where = {"item_id": message_id, "output_index": 0, "content_index": 0}
            queue: asyncio.Queue = asyncio.Queue()
            task = _detach(turn(queue.put_nowait))
            try:
                yield event("response.created", response=started)
                yield event("response.in_progress", response=started)
                yield event("response.output_item.added", output_index=0, item=item)
                part = {"type": "output_text", "text": "", "annotations": []}
                yield event("response.content_part.added", **where, part=part)
                async for piece in _drain(queue, task):
                    yield event("response.output_text.delta", **where, delta=piece, logprobs=[])
                response = task.result()
            except BaseException:  # the client went away (this generator was cancelled or closed), or the turn failed
                task.cancel()  # (not awaited: a cancelled scope would cancel the wait; the task cleans up by itself)
                raise
            text = response["output"][0]["content"][0]["text"]
            yield event("response.output_text.done", **where, text=text, logprobs=[])
            yield event("response.content_part.done", **where, part=response["output"][0]["content"][0])
            yield event("response.output_item.done", output_index=0, item=response["output"][0])
            done = "response.completed" if response["status"] == "completed" else "response.incomplete"
            yield event(done, response=response)

        return _sse(events())

    @app.get("/v1/responses/{response_id}")
    async def get_response(response_id: str):
        return _live(store.responses, response_id, "response").body

    @app.delete("/v1/responses/{response_id}")
    async def delete_response(response_id: str):
        record = _live(store.responses, response_id, "response")
        record.deleted = True
        if any(r.previous_response_id == response_id for r in store.responses.values()):
            store.save(record)  # later responses build on its messages: kept, hidden
        else:
            store.remove(record)
        await _forget_thread(store, gen, record.thread_id)
        return {"id": response_id, "object": "response.deleted", "deleted": True}

    @app.get("/v1/responses/{response_id}/input_items")
    async def response_input_items(response_id: str):
        record = _live(store.responses, response_id, "response")
        return _list([_input_item(m) for m in record.input_messages])

    # ---- conversations -----------------------------------------------------------------------------------------

    @app.post("/v1/conversations")
    async def create_conversation(body: ConversationCreate | None = None):
        body = body or ConversationCreate()
        items = [_input_item(_message(m)) for m in body.items or []]
        check_count(len(items) or 1, "items")
        record = ConversationRecord(new_id("conv"), int(time.time()), body.metadata or {}, items)
        store.save(record)
        store.save(Thread(record.id))
        return _conversation(record)

    @app.get("/v1/conversations/{conversation_id}")
    async def get_conversation(conversation_id: str):
        return _conversation(_live(store.conversations, conversation_id, "conversation"))

    @app.post("/v1/conversations/{conversation_id}")
    async def update_conversation(conversation_id: str, body: ConversationCreate):
        record = _live(store.conversations, conversation_id, "conversation")
        if body.items:
            raise APIError(400, "items are added with POST /v1/conversations/{id}/items", param="items")
        record.metadata = body.metadata or {}
        store.save(record)
        return _conversation(record)

    @app.delete("/v1/conversations/{conversation_id}")
    async def delete_conversation(conversation_id: str):
        record = _live(store.conversations, conversation_id, "conversation")
        thread = store.threads.get(record.id)
        if thread is not None and thread.busy:
            raise APIError(409, f"conversation {conversation_id!r} has a response in progress", "conflict_error")
        store.remove(record)
        await _forget_thread(store, gen, record.id)
        return {"id": conversation_id, "object": "conversation.deleted", "deleted": True}

    @app.get("/v1/conversations/{conversation_id}/items")
    async def conversation_items(conversation_id: str):
        return _list(_live(store.conversations, conversation_id, "conversation").items)

    @app.post("/v1/conversations/{conversation_id}/items")
    async def add_items(conversation_id: str, body: ItemsCreate):
        record = _live(store.conversations, conversation_id, "conversation")
        thread = store.threads.get(record.id)
        if thread is not None and thread.busy:
            raise APIError(409, f"conversation {conversation_id!r} has a response in progress", "conflict_error")
        items = [_input_item(_message(m)) for m in body.items]
        check_count(len(items), "items")
        check_count(len(record.items) + len(items), "items in the conversation")
        record.items += items
        store.save(record)
        return _list(items)

    @app.get("/v1/conversations/{conversation_id}/items/{item_id}")
    async def conversation_item(conversation_id: str, item_id: str):
        record = _live(store.conversations, conversation_id, "conversation")
        for item in record.items:
            if item["id"] == item_id:
                return item
        raise APIError(404, f"no item {item_id!r} in conversation {conversation_id!r}", "not_found_error")

    return app


class ClientGone(Exception):
    """The client disconnected; its turn was aborted."""


# ---- threads: which pensieve conversation a response continues -----------------------------------------------


async def _claim_thread(store: Store, gen, previous, conversation, keep: bool, tokens: list[int]):
    """-> (the thread the turn runs on or None (not kept), whether it was made for this turn). A conversation's own
    thread; the thread of the response continued when that response is its last and its rendering extends it (in
    place); else a fork of it cut back to that response (KV shared, not copied); a new thread for a new chain."""
    if conversation is not None:
        thread = store.threads.setdefault(conversation.id, Thread(conversation.id))
        if thread.busy:
            raise APIError(409, f"conversation {conversation.id!r} has a response in progress", "conflict_error")
        thread.busy = True
        return thread, False
    if not keep:
        return None, False
    base = store.threads.get(previous.thread_id) if previous is not None and previous.thread_id else None
    if base is None:
        thread = Thread(new_id("thread"), busy=True)
        store.threads[thread.id] = thread
        return thread, True
    if base.busy:
        raise APIError(409, f"response {previous.id!r} has a follow-up in progress", "conflict_error")
    n = previous.num_tokens
    if len(base.tokens) == n and min(common_prefix(base.tokens, tokens), len(tokens) - 1) == n:
        base.busy = True
        return base, False
    thread = Thread(new_id("thread"), tokens=base.tokens[:n], busy=True)
    store.threads[thread.id] = thread
    base.busy = True  # no turn starts on the base while it is forked
    try:
        await asyncio.to_thread(gen.fork, base.id, thread.id)
        await asyncio.to_thread(gen.truncate, thread.id, n)
    except BaseException:
        store.threads.pop(thread.id, None)
        await asyncio.to_thread(_end_quietly, gen, thread.id)
        raise
    finally:
        base.busy = False
    return thread, True


def _outcome(future) -> None:
    try:
        future.result()
    except BaseException:  # noqa: BLE001, S110  (only its end is waited for)
        pass


_DETACHED: set[asyncio.Task] = set()


def _detach(coro) -> asyncio.Task:
    """A task of its own (outside the request's cancel scope), referenced until done."""
    task = asyncio.ensure_future(coro)
    _DETACHED.add(task)
    task.add_done_callback(_DETACHED.discard)
    task.add_done_callback(lambda t: t.cancelled() or t.exception())  # its error is the stream's, not unhandled
    return task


async def _release_thread(store: Store, gen, thread: Thread | None, made: bool) -> None:
    """The turn did not complete: a thread made for it goes; a shared one is free again (the engine restored it)."""
    if thread is None:
        return
    try:
        if made:
            store.threads.pop(thread.id, None)
            await asyncio.to_thread(_end_quietly, gen, thread.id)
        else:  # an abort that came too late (the turn had finished) left its reply: cut back to what the store holds
            await asyncio.to_thread(_truncate_quietly, gen, thread.id, len(thread.tokens))
    finally:
        thread.busy = False


async def _forget_thread(store: Store, gen, thread_id: str | None) -> None:
    """Delete a thread (its KV and stored record) once no live response or conversation continues from it."""
    if thread_id is None or store.thread_in_use(thread_id):
        return
    thread = store.threads.get(thread_id)
    if thread is not None and not thread.busy:
        store.remove(thread)
        await asyncio.to_thread(_end_quietly, gen, thread_id)


def _truncate_quietly(gen, thread_id: str, num_tokens: int) -> None:
    try:
        gen.truncate(thread_id, num_tokens)
    except (KeyError, ValueError):
        pass  # its first turn was aborted (it is gone), or it never reached that length


def _end_quietly(gen, thread_id: str) -> None:
    try:
        gen.end(thread_id, forget=True)
    except (KeyError, ValueError):
        pass  # never started, or already gone


async def _watch_disconnect(request: Request, task: asyncio.Future) -> None:
    while not task.done():
        if await request.is_disconnected():
            task.cancel()
            return
        await asyncio.sleep(0.05)


async def _drain(queue: asyncio.Queue, task: asyncio.Future) -> AsyncIterator[str]:
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


def _sse(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _endpoint(path: str) -> str:
    """A bounded label for metrics: the route, ids replaced."""
    parts = path.strip("/").split("/")
    if len(parts) >= 3 and parts[1] in ("responses", "conversations", "models"):
        parts[2] = "{id}"
        if len(parts) >= 5:
            parts[4] = "{id}"
    label = "/" + "/".join(parts[:5])
    known = ("/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/responses", "/v1/conversations")
    return label if label.startswith(known) else "other"


def _cached(reply: Reply) -> int:
    """Prompt tokens whose KV was found (any tier): OpenAI's cached_tokens."""
    return reply.num_reused_device + reply.num_reused_host + reply.num_reused_disk


def _text(content: Any) -> str:
    return content if isinstance(content, str) else "".join(part.text for part in content)


def _message(m) -> dict:
    role = "system" if m.role == "developer" else m.role
    return {"role": role, "content": _text(m.content)}


def _input_item(message: dict) -> dict:
    kind = "output_text" if message["role"] == "assistant" else "input_text"
    return {
        "type": "message",
        "id": new_id("msg"),
        "status": "completed",
        "role": message["role"],
        "content": [{"type": kind, "text": message["content"]}],
    }


def _item_message(item: dict) -> dict:
    return {"role": item["role"], "content": "".join(part["text"] for part in item["content"])}


def _output_message(message_id: str, text: str) -> dict:
    return {
        "type": "message",
        "id": message_id,
        "status": "completed",
        "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": []}],
    }


def _conversation(record: ConversationRecord) -> dict:
    return {"id": record.id, "object": "conversation", "created_at": record.created_at, "metadata": record.metadata}


def _list(items: list[dict]) -> dict:
    return {
        "object": "list",
        "data": items,
        "first_id": items[0]["id"] if items else None,
        "last_id": items[-1]["id"] if items else None,
        "has_more": False,
    }


def _model_card(name: str) -> dict:
    return {"id": name, "object": "model", "created": 0, "owned_by": "pensieve"}


def _live(table: dict, record_id: str, what: str):
    record = table.get(record_id)
    if record is None or getattr(record, "deleted", False):
        raise APIError(404, f"no {what} {record_id!r}", "not_found_error")
    return record
