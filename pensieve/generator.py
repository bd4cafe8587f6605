"""StatefulGenerator: the public API (DESIGN §1). Thin over the engine.

There is no engine thread: callers drive it. A caller waiting for its turn takes the driver lock if it is free and
steps the shared engine (applying every command queued by any thread first), else waits for the current driver.
So concurrent callers on different conversations share forwards, and a single-threaded caller runs every step
on its own thread. Measured on CPU: torch ops on a second thread, after the main thread has run parallel ops,
are 25-45% slower (a second OpenMP team), and the model is always loaded on the main thread.

A server instead dedicates one thread to the engine (`serve`, on the main thread): it holds the driver lock, steps
while there is work and sleeps on the command queue when there is none; callers on other threads then only wait
(`submit` / `submit_complete` return at once with a Future, `on_token` is called on the engine's thread).
"""

from __future__ import annotations

import queue
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import Future

from pensieve.api import Capabilities, Generator
from pensieve.config import CacheConfig, EngineConfig, SamplingParams, SchedulerConfig
from pensieve.engine.admission import candidate_ids
from pensieve.engine.engine import Engine
from pensieve.engine.turn import Delta, Reply, next_piece
from pensieve.models.attention import ATTN_IMPLEMENTATION, register
from pensieve.models.linear import use_fast_linears
from pensieve.structured.tools import ToolUse, tool_use

_DONE = object()
_WAIT_S = 0.002  # how often a waiting caller checks whether it can take over driving
_IDLE_S = 0.05  # how long an idle `serve` loop sleeps on the command queue before checking its stop event
_BACKGROUND_S = 0.25  # how often the idle loop runs background work while nobody drives the engine


def _idle_loop(ref: weakref.ref) -> None:
    """While nobody drives the generator (no `serve` loop, no call waiting on a turn), run its engine's background
    work now and then (a `serve` loop and a driving caller run it themselves). Ends when it is closed or collected."""
    while True:
        time.sleep(_BACKGROUND_S)
        gen = ref()
        if gen is None or not gen._background():
            return
        del gen


class ReplyStream(Iterator):
    """The pieces of a streamed reply: str pieces that join to `Reply.text` (with a tokenizer), else token ids (or
    with `token_ids`). `deltas()` gives each token's `Delta` instead; `.reply` waits for the turn's Reply."""

    def __init__(self, deltas: Iterator[Delta], future: Future, token_ids: bool) -> None:
        self._deltas = deltas
        self._future = future
        self._token_ids = token_ids

    def __next__(self):
        return next_piece(self._deltas, self._token_ids)

    def deltas(self) -> Iterator[Delta]:
        """Each token as it is sampled, with the text it makes safe to show (see `Delta`)."""
        return self._deltas

    @property
    def reply(self) -> Reply:
        return self._future.result()


class StatefulGenerator(Generator):
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
        engine_config: EngineConfig | None = None,
    ) -> None:
        register()
        engine_config = engine_config or EngineConfig()
        self._model = model
        self._engine = Engine(
            model,
            tokenizer,
            cache_config or CacheConfig(),
            scheduler_config or SchedulerConfig(),
            engine_config,
        )
        self._original_attn = model.config._attn_implementation
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
        self._restore_linears = (
            use_fast_linears(model, pack=engine_config.pack_weights) if engine_config.cpu_linear else (lambda: None)
        )
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._driver = threading.Lock()  # held by the thread stepping the engine
        self._server_thread: threading.Thread | None = None  # the thread in `serve`, if one is
        self._closed = False
        if self._engine.kv.write_behind is not None:  # its background work, while no thread drives the engine
            # (a weak reference: a generator that is never closed is still collected, and the thread ends)
            threading.Thread(target=_idle_loop, args=(weakref.ref(self),), name="pensieve-idle", daemon=True).start()

    # ---- public API ------------------------------------------------------------------------------------------

    @property
    def capabilities(self) -> Capabilities:
        shape = self._engine.admission.shape
        return Capabilities(disk_tier=self._engine.kv.disk is not None, streamed_complete=True,
                            max_model_len=shape.max_positions, vocab_size=shape.vocab_size)  # fmt: skip

    @property
    def engine(self):
        """The engine this generator drives (pensieve/engine/engine.py), for extensions (a cluster instance's
        MemPool) and tests. Touch it through `call`, or from the thread that drives while no turn runs."""
        return self._engine

    def call(self, fn: Callable):
        """fn() on the engine's thread, between steps (a command): -> its result, or raises its error."""
        return self._result(self._call(fn))

    def check_integrity(self) -> None:
        """Assert every invariant of the cache and the scheduler (tests call it after each operation)."""
        self.call(self._engine.check_integrity)

    def generate(
        self,
        conv_id: str,
        msg,
        sampling: SamplingParams | None = None,
        *,
        tools=None,
    ) -> Reply:
        """One turn: append msg (str: a user turn through the chat template; a dict or list of dicts: chat messages,
        e.g. tool results {"role": "tool", "tool_call_id": ..., "content": ...}; list[int]: raw tokens) and reply.
        tools: the functions the reply may call (OpenAI's shape), rendered through the chat template (or, for a
        template without tool support, described in the system prompt); the calls come back in `Reply.tool_calls`.
        A list is tool_choice "auto"; a `ToolUse(tools, choice, parallel)` says more: choice "auto", "none",
        "required" or {"type": "function", "function": {"name": ...}} (the last two forced by a grammar), parallel
        whether one reply may make several (OpenAI's tool_choice and parallel_tool_calls)."""
        (future,) = self._submit([(conv_id, msg)], sampling, tools=tool_use(tools))
        return self._result(future)

    def generate_batch(
        self,
        messages: dict,
        sampling: SamplingParams | None = None,
        *,
        tools=None,
    ) -> dict[str, Reply]:
        """One turn on each of several conversations, batched together. All are validated before any starts."""
        futures = self._submit(list(messages.items()), sampling, tools=tool_use(tools))
        return {conv_id: self._result(f) for conv_id, f in zip(messages, futures, strict=True)}

    def stream(
        self,
        conv_id: str,
        msg,
        sampling: SamplingParams | None = None,
        token_ids: bool = False,
        *,
        tools=None,
    ) -> ReplyStream:
        """Iterate over the reply as it is generated: str pieces with a tokenizer (held back where they may be part
        of a stop string; they join to the reply's text), token ids without one (or with `token_ids`). The returned
        stream's `.reply` is the whole Reply (with its stats) once the turn is done."""
        deltas: queue.SimpleQueue = queue.SimpleQueue()
        (future,) = self._submit([(conv_id, msg)], sampling, on_token=deltas.put, tools=tool_use(tools))
        future.add_done_callback(lambda _: deltas.put(_DONE))
        token_ids = token_ids or self._engine.tokenizer is None
        return ReplyStream(self._deltas(deltas, future), future, token_ids)

    def complete_batch(
        self,
        prompts: list,
        sampling: SamplingParams | None = None,
        *,
        tools=None,
    ) -> list[Reply]:
        """`complete` on several prompts at once, batched together. All are validated before any starts."""
        if not isinstance(prompts, (list, tuple)):
            raise ValueError(f"prompts must be a list of prompts, got {type(prompts).__name__}")

        use = tool_use(tools)
        self._precompile(sampling, use)
        rendered = [self._engine.admission.render_complete(prompt, use) for prompt in prompts]  # here, not the engine's

        def admit() -> list[Future]:
            admissions = [self._engine.admission.prepare_complete(prompt, sampling, use) for prompt in rendered]
            return [self._admit_complete(r, adm) for r, adm in zip(rendered, admissions, strict=True)]

        return [self._result(f) for f in self.call(admit)]

    def submit(
        self,
        conv_id: str,
        msg,
        sampling: SamplingParams | None = None,
        on_token=None,
        *,
        tools=None,
    ) -> Future:
        """Start a turn without waiting: -> a Future of its Reply (bad input: the Future raises ValueError / KeyError
        and nothing changed). on_token(delta) is called on the engine's thread as each token is sampled (`Delta`: the
        token and the text it makes safe to show). The turn runs while some thread drives: `serve` on a thread of its
        own, or any blocking call."""
        use = tool_use(tools)
        self._precompile(sampling, use)
        return self._submit_async(lambda on: self._admit([(conv_id, msg)], sampling, on, use)[0], on_token)

    def submit_complete(
        self,
        prompt,
        sampling: SamplingParams | None = None,
        on_token=None,
        *,
        tools=None,
    ) -> Future:
        """`complete` without waiting, as `submit`: -> a Future of its Reply (`abort` takes that Future). The prompt
        is rendered (chat template) on the calling thread."""
        admission = self._engine.admission
        use = tool_use(tools)
        self._precompile(sampling, use)
        try:
            prompt = admission.render_complete(prompt, use)
        except ValueError as error:
            failed: Future = Future()
            failed.set_exception(error)
            return failed
        return self._submit_async(
            lambda on: self._admit_complete(prompt, admission.prepare_complete(prompt, sampling, use), on), on_token
        )

    def _admit_complete(self, rendered, adm, on_token=None) -> Future:
        """Start a prepared completion (engine thread); its replies are remembered for a resent history."""
        future = self._engine.admit(adm, on_token).future
        self._engine.admission.remember(rendered, adm, future)
        return future

    def abort(self, target) -> bool:
        """Stop a turn that has not finished: target is its conversation id, or the Future `submit` /
        `submit_complete` returned. None of the turn is kept: the conversation is exactly as before it (its KV
        included; what the turn computed beyond its history is released), one the turn started is gone, and the
        turn's caller gets `TurnAborted`. -> whether a running turn was found (False: it had finished)."""
        # a Future from submit* stands for its turn's own Future, known once the submission ran (commands run in order)
        return self.call(lambda: self._engine.abort(getattr(target, "turn_future", target)))

    def stop(self, target) -> bool:
        """Cut a running turn short and keep it (target: its conversation id, or the Future `submit` returned): it
        finishes after its next sampled token with finish_reason "cancelled" — its reply so far, its tokens and
        their KV stay, as after any finished turn (unlike `abort`, which keeps none of it). -> whether a running
        turn was found (False: it had finished)."""
        return self.call(lambda: self._engine.stop(getattr(target, "turn_future", target)))

    def serve(self, stop: threading.Event) -> None:
        """Drive the engine on this thread until `stop` is set (a server's engine loop: run it on the main thread,
        where the model was loaded). Meanwhile other threads' calls only wait for it."""
        with self._driver:
            self._server_thread = threading.current_thread()
            try:
                while not stop.is_set() and not self._closed:
                    self._apply_commands()
                    if self._engine.has_work():
                        self._step()
                        continue
                    self._engine.idle()  # background work that is due (the write-behind; it keeps its own pace)
                    try:  # idle: sleep until a command comes (bounded, so `stop` is seen)
                        fn, future = self._commands.get(timeout=_IDLE_S)
                    except queue.Empty:
                        continue
                    self._run_command(fn, future)
            finally:
                self._server_thread = None

    def fork(self, conv_id: str, new_conv_id: str) -> None:
        """Start `new_conv_id` as a branch of `conv_id`: the same history, sharing all of its KV (no copy). Continue
        either independently; with `truncate` first, the branch regenerates from an earlier point."""
        self.call(lambda: self._engine.fork(conv_id, new_conv_id))

    def truncate(self, conv_id: str, num_tokens: int) -> None:
        """Keep only the first `num_tokens` tokens of a raw-mode conversation (and their KV): the next turn continues
        from there (edit and regenerate)."""
        self.call(lambda: self._engine.truncate(conv_id, num_tokens))

    def adopt(self, conv_id: str, tokens: list[int], messages: list[dict] | None = None) -> None:
        """Make conv_id's history `tokens` (text mode: rendered from chat `messages`), as another engine had it: the
        KV of the common prefix with what is here is kept, the rest found in the prompt tree or computed next turn.
        Creates the conversation if there is none; it must be idle."""
        self.call(lambda: self._engine.adopt(conv_id, tokens, messages))

    def end(self, conv_id: str, forget: bool = False) -> None:
        """Release a conversation's memory. With `CacheConfig.disk_dir` it stays stored (its KV written to disk) and
        a later turn continues it; `forget=True` deletes it from disk too. Without a disk tier it is gone."""
        self.call(lambda: self._engine.end(conv_id, forget))

    def conversations(self) -> list[str]:
        """Ids of the conversations in memory and, with a disk tier, stored on disk."""
        return self.call(self._engine.conversations)

    def stats(self) -> dict:
        return self.call(self._engine.stats)

    def close(self) -> None:
        """Fail turns still running, write every stored conversation's KV to disk (with a disk tier), reject further
        calls, restore the model's attention implementation and linear layers."""
        with self._driver:
            if self._closed:
                return
            self._closed = True
            self._apply_commands()
            self._engine.fail_all(RuntimeError("the StatefulGenerator was closed during this turn"))
            self._engine.close()
        self._model.set_attn_implementation(self._original_attn)
        self._restore_linears()

    def __enter__(self) -> StatefulGenerator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- driving -----------------------------------------------------------------------------------------------

    def _submit(self, items, sampling, on_token=None, tools=None) -> list[Future]:
        self._precompile(sampling, tools)
        return self.call(lambda: self._admit(items, sampling, on_token, tools))

    def _precompile(self, sampling, tools: ToolUse | None = None) -> None:
        """Compile a structured output's grammar, or a forced tool choice's, here, on the caller's thread (xgrammar
        releases the GIL), so that admission finds it cached and the engine's steps never wait on a compile. Errors
        are raised by admission."""
        admission = self._engine.admission
        try:
            if isinstance(sampling, SamplingParams) and sampling.structured_output is not None:
                admission.grammars.compile(sampling.structured_output)
            if tools is not None and tools.forced is not None:
                admission.tool_grammar(tools)
        except ValueError:
            pass

    def _admit(self, items, sampling, on_token, tools=None) -> list[Future]:
        """All-or-nothing: a bad item rejects the whole call before any turn is admitted."""
        conv_ids = [conv_id for conv_id, _ in items]
        if len(set(conv_ids)) != len(conv_ids):
            raise ValueError("two messages for the same conversation in one call")
        n = sampling.n if isinstance(sampling, SamplingParams) else 1
        forks = {fork for conv_id in conv_ids if isinstance(conv_id, str) for fork in candidate_ids(conv_id, n)}
        if forks & set(conv_ids):
            raise ValueError(
                f"n={n} forks a conversation into {sorted(forks & set(conv_ids))[0]!r}, which this call also runs"
            )
        admissions = [self._engine.admission.prepare(conv_id, msg, sampling, tools) for conv_id, msg in items]
        return [self._engine.admit(adm, on_token).future for adm in admissions]

    def _call(self, fn: Callable) -> Future:
        """Queue fn for the engine; whoever drives next runs it before stepping."""
        if self._closed:
            raise RuntimeError("this StatefulGenerator is closed")
        future: Future = Future()
        self._commands.put((fn, future))
        return future

    def _submit_async(self, start: Callable, on_token) -> Future:
        """Queue start(on_token) -> the turn's Future; -> a Future that follows it (or raises start's error)."""
        outer: Future = Future()

        def chain(turn_future: Future) -> None:
            error = turn_future.exception()
            outer.set_exception(error) if error is not None else outer.set_result(turn_future.result())

        def command() -> None:
            try:
                turn_future = start(on_token)
            except BaseException as error:  # noqa: BLE001  (handed to the caller)
                outer.set_exception(error)
                return
            outer.turn_future = turn_future  # what `abort` is given this Future for
            turn_future.add_done_callback(chain)

        self._call(command)
        return outer

    def _result(self, future: Future):
        if self._served_elsewhere():
            return future.result()
        self._drive_until(future.done)
        return future.result()

    def _served_elsewhere(self) -> bool:
        server = self._server_thread
        return server is not None and server is not threading.current_thread()

    def _drive_until(self, done: Callable[[], bool]) -> None:
        while not done():
            if self._driver.acquire(blocking=False):
                try:
                    if self._closed:
                        self._fail_commands()
                    else:
                        self._apply_commands()
                        if not done() and self._engine.has_work():
                            self._step()
                finally:
                    self._driver.release()
            elif not done():
                self._wait_briefly()

    def _background(self) -> bool:
        """The idle loop's turn: background work if nobody drives. -> False once closed."""
        if self._closed:
            return False
        if self._server_thread is None and self._driver.acquire(blocking=False):
            try:
                if not self._closed and not self._engine.has_work():
                    self._engine.idle()  # (warns, never raises)
            finally:
                self._driver.release()
        return True

    def _step(self) -> None:
        try:
            self._engine.step()
        except BaseException as error:  # noqa: BLE001  (handed to every running turn's caller)
            self._engine.fail_all(error)

    def _queued_commands(self) -> Iterator[tuple[Callable, Future]]:
        while True:
            try:
                yield self._commands.get_nowait()
            except queue.Empty:
                return

    def _apply_commands(self) -> None:
        for fn, future in self._queued_commands():
            self._run_command(fn, future)

    @staticmethod
    def _run_command(fn: Callable, future: Future) -> None:
        try:
            future.set_result(fn())
        except BaseException as error:  # noqa: BLE001  (handed to the caller)
            future.set_exception(error)

    def _fail_commands(self) -> None:
        for _, future in self._queued_commands():
            future.set_exception(RuntimeError("this StatefulGenerator is closed"))

    def _wait_briefly(self) -> None:
        """Another thread drives: wait until the driver lock frees up (bounded, so our own turn's end is seen)."""
        if self._driver.acquire(timeout=_WAIT_S):
            self._driver.release()

    def _deltas(self, deltas: queue.SimpleQueue, future: Future) -> Iterator[Delta]:
        """The turn's deltas as the engine produces them (driving it while none is waiting, unless `serve` does)."""
        while True:
            if not self._served_elsewhere():
                self._drive_until(lambda: not deltas.empty())
            item = deltas.get()
            if item is _DONE:
                future.result()  # re-raise an engine error
                return
            yield item
