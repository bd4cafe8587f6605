"""Threads: which pensieve conversation a stored response or a conversation continues (DESIGN §9).

A thread is a conversation of the generator in raw token mode, named by the store (`Thread`). A follow-up runs on
the thread of the response it continues when that response is the thread's last and the new rendering extends it
(in place); otherwise on a fork of it cut back to that response (KV shared, not copied). A conversation (the
Conversations API) has one thread of its own. A turn that does not complete releases what it claimed.
"""

from __future__ import annotations

import asyncio

from pensieve.api import Generator
from pensieve.cache.tree import common_prefix
from pensieve.server.common import APIError
from pensieve.server.store import ConversationRecord, ResponseRecord, Store, Thread, new_id


async def claim(
    store: Store,
    gen: Generator,
    previous: ResponseRecord | None,
    conversation: ConversationRecord | None,
    keep: bool,
    tokens: list[int],
) -> tuple[Thread | None, bool]:
    """-> (the thread the turn runs on or None (not kept), whether it was made for this turn), marked busy."""
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


async def cut_back(store: Store, gen: Generator, thread: Thread, made: bool, tokens: list[int]) -> list[int]:
    """Cut the thread back to what the new rendering `tokens` keeps of it (at least one token is left to feed)
    -> the tokens the turn feeds. Releases the thread if that fails."""
    p = min(common_prefix(thread.tokens, tokens), len(tokens) - 1)
    try:
        if p < len(thread.tokens):  # a conversation whose rendering changed past p, or a fork cut back
            await asyncio.to_thread(gen.truncate, thread.id, p)
            thread.tokens = thread.tokens[:p]
            thread.key = ""  # the messages its tokens end with are no longer known (the turn sets it again)
    except BaseException:
        await release(store, gen, thread, made)
        raise
    return tokens[p:]


async def release(store: Store, gen: Generator, thread: Thread | None, made: bool) -> None:
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


async def forget(store: Store, gen: Generator, thread_id: str | None) -> None:
    """Delete a thread (its KV and stored record) once no live response or conversation continues from it."""
    if thread_id is None or store.thread_in_use(thread_id):
        return
    thread = store.threads.get(thread_id)
    if thread is not None and not thread.busy:
        store.remove(thread)
        await asyncio.to_thread(_end_quietly, gen, thread_id)


def _truncate_quietly(gen: Generator, thread_id: str, num_tokens: int) -> None:
    try:
        gen.truncate(thread_id, num_tokens)
    except (KeyError, ValueError):
        pass  # its first turn was aborted (it is gone), or it never reached that length


def _end_quietly(gen: Generator, thread_id: str) -> None:
    try:
        gen.end(thread_id, forget=True)
    except (KeyError, ValueError):
        pass  # never started, or already gone
