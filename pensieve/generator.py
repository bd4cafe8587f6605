"""StatefulGenerator: the public API (DESIGN §1). Thin over the engine.

One loop thread owns the engine and all conversation state. Callers hand it commands through a queue and wait on
futures; every command queued before a step is applied before that step, so concurrent callers on different
conversations share forwards.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Iterator
from concurrent.futures import Future

from pensieve.config import CacheConfig, SamplingParams, SchedulerConfig
from pensieve.engine.engine import Engine
from pensieve.engine.turn import Reply
from pensieve.models.attention import ATTN_IMPLEMENTATION, register

_CLOSE = object()


class ReplyStream(Iterator):
    """The pieces of a streamed reply; `.reply` waits for the turn and returns its Reply."""

    def __init__(self, pieces: Iterator, future: Future) -> None:
        self._pieces = pieces
        self._future = future

    def __next__(self):
        return next(self._pieces)

    @property
    def reply(self) -> Reply:
        return self._future.result()


def _pieces(tokens_in: queue.SimpleQueue, tokenizer) -> Iterator:
    """Token ids as they arrive -> token ids (no tokenizer) or str deltas that never split a UTF-8 character."""
    tokens: list[int] = []
    emitted = ""
    while (item := tokens_in.get()) is not _CLOSE:
        if tokenizer is None:
            yield item
            continue
        tokens.append(item)
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            continue
        if len(text) > len(emitted):
            yield text[len(emitted) :]
            emitted = text


class StatefulGenerator:
    """Serve many multi-turn conversations on one HF causal LM, keeping each conversation's KV between turns.

    >>> gen = StatefulGenerator(model, tokenizer)
    >>> reply = gen.generate("conv-42", "And in French?")
    """

    def __init__(
        self,
        model,
        tokenizer=None,
        cache_config: CacheConfig | None = None,
        *,
        scheduler_config: SchedulerConfig | None = None,
    ) -> None:
        register()
        self._model = model
        self._engine = Engine(model, tokenizer, cache_config or CacheConfig(), scheduler_config or SchedulerConfig())
        self._original_attn = model.config._attn_implementation
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._closed = False
        self._close_lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="pensieve-engine", daemon=True)
        self._thread.start()

    # ---- public API ------------------------------------------------------------------------------------------

    def generate(self, conv_id: str, msg, sampling: SamplingParams | None = None) -> Reply:
        """One turn: append msg (str: a user turn through the chat template; list[int]: raw tokens) and reply."""
        return self._submit([(conv_id, msg)], sampling)[0].result()

    def generate_batch(self, messages: dict, sampling: SamplingParams | None = None) -> dict[str, Reply]:
        """One turn on each of several conversations, batched together. All are validated before any starts."""
        futures = self._submit(list(messages.items()), sampling)
        return {conv_id: f.result() for conv_id, f in zip(messages, futures, strict=True)}

    def stream(self, conv_id: str, msg, sampling: SamplingParams | None = None) -> ReplyStream:
        """Iterate over the reply as it is generated: str pieces with a tokenizer, token ids without one.
        The returned stream's `.reply` is the whole Reply (with its stats) once the turn is done."""
        pieces: queue.SimpleQueue = queue.SimpleQueue()
        (future,) = self._submit([(conv_id, msg)], sampling, on_token=pieces.put)
        future.add_done_callback(lambda _: pieces.put(_CLOSE))
        return ReplyStream(_pieces(pieces, self._engine.tokenizer), future)

    async def agenerate(self, conv_id: str, msg, sampling: SamplingParams | None = None) -> Reply:
        future = await asyncio.wrap_future(self._call(lambda: self._admit([(conv_id, msg)], sampling, None)))
        return await asyncio.wrap_future(future[0])

    def end(self, conv_id: str) -> None:
        """Forget a conversation: its tokens and KV."""
        self._call(lambda: self._engine.end(conv_id)).result()

    def stats(self) -> dict:
        return self._call(self._engine.stats).result()

    def close(self) -> None:
        """Stop the loop (failing turns still running) and restore the model's attention implementation."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        self._commands.put(_CLOSE)
        self._thread.join()
        self._model.set_attn_implementation(self._original_attn)

    def __enter__(self) -> StatefulGenerator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- plumbing ----------------------------------------------------------------------------------------------

    def _submit(self, items, sampling, on_token=None) -> list[Future]:
        return self._call(lambda: self._admit(items, sampling, on_token)).result()

    def _admit(self, items, sampling, on_token) -> list[Future]:
        """Engine thread. All-or-nothing: a bad item rejects the whole call before any turn is admitted."""
        conv_ids = [conv_id for conv_id, _ in items]
        if len(set(conv_ids)) != len(conv_ids):
            raise ValueError("two messages for the same conversation in one call")
        admissions = [self._engine.prepare(conv_id, msg, sampling) for conv_id, msg in items]
        turns = [self._engine.admit(adm, on_token) for adm in admissions]
        return [turn.future for turn in turns]

    def _call(self, fn) -> Future:
        if self._closed:
            raise RuntimeError("this StatefulGenerator is closed")
        future: Future = Future()
        self._commands.put((fn, future))
        return future

    def _loop(self) -> None:
        engine = self._engine
        while True:
            try:
                command = self._commands.get(block=not engine.has_work())
            except queue.Empty:
                command = None
            while command is not None:
                if command is _CLOSE:
                    engine.fail_all(RuntimeError("the StatefulGenerator was closed during this turn"))
                    self._drain_after_close()
                    return
                fn, future = command
                try:
                    future.set_result(fn())
                except BaseException as error:  # noqa: BLE001  (handed to the caller)
                    future.set_exception(error)
                try:
                    command = self._commands.get_nowait()
                except queue.Empty:
                    command = None
            if engine.has_work():
                try:
                    engine.step()
                except BaseException as error:  # noqa: BLE001
                    engine.fail_all(error)

    def _drain_after_close(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if command is not _CLOSE:
                command[1].set_exception(RuntimeError("this StatefulGenerator is closed"))
