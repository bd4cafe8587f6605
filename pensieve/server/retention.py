"""Bounded records: stored responses and conversations do not grow without end (vLLM turned its Responses store off
by default because it did). Two limits (`ServerConfig`): `max_stored_responses` and `records_ttl_s`.

A record's age is its idle time: since it was made, or last continued (a follow-up through previous_response_id, a
response or items added in a conversation). A response another response builds on (its parent: previous_response_id,
or the response before it in a conversation) is kept while that one is, and so is the response that ends a kept
conversation's branch: a chain goes from its tip back, so a follow-up always has its whole history. Each request
to the Responses or Conversations API first sweeps (`sweep`): a conversation idle past the TTL goes; a response that
nothing builds on goes when it was deleted by its client, is idle past the TTL, or — while more than
`max_stored_responses` are kept — is the least recently used such one. Responses whose turn is in flight and
threads with a running turn are never swept. When no kept response or conversation continues from a thread any
more, its KV goes with it (memory and disk). An id swept is answered 404, like one never made.
"""

from __future__ import annotations

import heapq
from collections import Counter

from pensieve.server import threads
from pensieve.server.common import State
from pensieve.server.store import Store


def expired(store: Store, now: float, max_responses: int | None, ttl_s: float | None, pinned: Counter) -> tuple:
    """-> (the responses, the conversations) to drop now."""

    def idle(record) -> bool:
        return ttl_s is not None and now - record.last_used > ttl_s

    def busy(thread_id: str | None) -> bool:
        thread = store.threads.get(thread_id) if thread_id else None
        return thread is not None and thread.busy

    conversations = [c for c in store.conversations.values() if idle(c) and not busy(c.id) and not pinned[c.id]]
    children = Counter(r.parent for r in store.responses.values() if r.parent)
    going = {c.id for c in conversations}
    children.update(c.head for c in store.conversations.values() if c.head and c.id not in going)

    def free(r) -> bool:  # nothing builds on it, and no turn uses it
        return children[r.id] == 0 and not pinned[r.id] and not busy(r.thread_id)

    leaves = [(r.last_used, r.id) for r in store.responses.values() if free(r)]
    heapq.heapify(leaves)
    dropped: list = []
    kept = len(store.responses)
    while leaves:
        _, rid = heapq.heappop(leaves)
        r = store.responses[rid]
        over = max_responses is not None and kept > max_responses
        if not (r.deleted or idle(r) or over):
            continue  # not due (a later one may be: deleted)
        dropped.append(r)
        kept -= 1
        parent = store.responses.get(r.parent) if r.parent else None
        if parent is not None:
            children[parent.id] -= 1
            if free(parent):
                heapq.heappush(leaves, (parent.last_used, parent.id))
    return dropped, conversations


async def sweep(s) -> None:
    """Drop what is due (see the module's docstring), and the KV of threads nothing continues from any more."""
    config = s.config
    if config.max_stored_responses is None and config.records_ttl_s is None and not _deleted(s.store):
        return
    responses, conversations = expired(
        s.store, s.store.clock(), config.max_stored_responses, config.records_ttl_s, s.pinned
    )
    if not responses and not conversations:
        return
    gone = set()
    for record in responses:
        s.store.remove(record)
        gone.add(record.thread_id)
    for conversation in conversations:
        s.store.remove(conversation)
        gone.add(conversation.id)
    for thread_id in gone:
        await threads.forget(s.store, s.gen, thread_id)


def _deleted(store: Store) -> bool:
    return any(r.deleted for r in store.responses.values())


async def swept(s: State) -> None:
    """The routers' dependency: a sweep before each request."""
    await sweep(s)
