"""The Generator protocol: what `StatefulGenerator` (one engine in this process) and `Cluster` (instances on Ray)
both offer, and what the server is typed against (DESIGN §1, §8, §9).

Where one side lacks something, `capabilities` says so and callers ask it instead of checking the type.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from pensieve.config import SamplingParams
from pensieve.engine.turn import Delta, Reply

OnToken = Callable[[Delta], None] | None


@dataclass(frozen=True)
class Capabilities:
    """What a generator can do beyond the protocol's common ground."""

    disk_tier: bool  # conversations are stored on disk and survive a restart (CacheConfig.disk_dir)
    streamed_complete: bool  # submit_complete's on_token sees deltas as tokens are sampled, and abort stops it
    num_instances: int = 1  # engines serving (a Cluster's live instances)
    max_model_len: int | None = None  # the model's positions (a conversation's tokens + its reply)
    vocab_size: int | None = None  # token ids are in [0, vocab_size)


class Stream(Iterator, Protocol):
    """The pieces of a streamed reply (str pieces that join to `Reply.text`, or token ids); `deltas()` gives each
    token's `Delta` instead; `.reply` waits for the turn and returns its Reply."""

    def deltas(self) -> Iterator[Delta]: ...

    @property
    def reply(self) -> Reply: ...


@runtime_checkable
class Generator(Protocol):
    """Many multi-turn conversations on one model, each keeping its KV between turns."""

    @property
    def capabilities(self) -> Capabilities: ...

    # ---- turns, blocking (keyword tools=: a list of tools or a ToolUse, StatefulGenerator.generate) ----------
    def generate(
        self,
        conv_id: str,
        msg,
        sampling: SamplingParams | None = None,
        *,
        tools=None,
    ) -> Reply: ...

    def generate_batch(
        self,
        messages: dict,
        sampling: SamplingParams | None = None,
        *,
        tools=None,
    ) -> dict[str, Reply]: ...

    def stream(
        self,
        conv_id: str,
        msg,
        sampling: SamplingParams | None = None,
        token_ids: bool = False,
        *,
        tools=None,
    ) -> Stream: ...

    async def agenerate(
        self,
        conv_id: str,
        msg,
        sampling: SamplingParams | None = None,
        *,
        tools=None,
    ) -> Reply:
        """`generate` for asyncio (same keywords): the turn is driven on a worker thread, never on the event loop.
        (Written once here: StatefulGenerator and Cluster subclass this protocol.)"""
        return await asyncio.to_thread(lambda: self.generate(conv_id, msg, sampling, tools=tools))

    def complete(
        self,
        prompt,
        sampling: SamplingParams | None = None,
        *,
        tools=None,
    ) -> Reply:
        """A stateless turn: `prompt` is token ids, or chat messages rendered with the chat template; the longest
        cached prefix of any conversation or earlier completion is reused, no conversation is kept
        (`Reply.conv_id` is None). `complete_batch` of one."""
        (reply,) = self.complete_batch([prompt], sampling, tools=tools)
        return reply

    def complete_batch(
        self,
        prompts: list,
        sampling: SamplingParams | None = None,
        *,
        tools=None,
    ) -> list[Reply]: ...

    # ---- turns, for a server that drives the engine on a thread of its own -------------------------------------------
    # on_token(Delta) is called as each token is sampled, on a thread of the generator's: it must not block
    def submit(
        self,
        conv_id: str,
        msg,
        sampling: SamplingParams | None = None,
        on_token: OnToken = None,
        *,
        tools=None,
    ) -> Future: ...

    def submit_complete(
        self,
        prompt,
        sampling: SamplingParams | None = None,
        on_token: OnToken = None,
        *,
        tools=None,
    ) -> Future: ...

    def abort(self, target) -> bool: ...

    def stop(self, target) -> bool: ...

    def serve(self, stop: threading.Event) -> None: ...

    # ---- conversations ---------------------------------------------------------------------------------------------
    def fork(self, conv_id: str, new_conv_id: str) -> None: ...

    def truncate(self, conv_id: str, num_tokens: int) -> None: ...

    def end(self, conv_id: str, forget: bool = False) -> None: ...

    def conversations(self) -> list[str]: ...

    def stats(self) -> dict: ...

    def close(self) -> None: ...
