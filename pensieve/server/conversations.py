"""`/v1/conversations`: OpenAI's Conversations API. A conversation's items are its messages; its thread (one
pensieve conversation, pensieve/server/threads.py) holds their KV, and `/v1/responses` with `conversation` continues
it.

Two documented extensions (OpenAI has neither): `GET /v1/conversations` lists the conversations, the most recently
used first; `GET /v1/conversations/{id}/responses` lists a conversation's stored responses in the order they were
made, each with its parent (`parent_response_id`) and its input items: the tree its branches form (a branch:
`/v1/responses` with `conversation` and `previous_response_id`), and which response ends the current one
(`head_response_id`). A chat page rebuilds a conversation, branches included, from these two."""

from __future__ import annotations

import time
from typing import Literal

from fastapi import APIRouter, Depends, Query

from pensieve.engine.admission import check_messages
from pensieve.server import threads
from pensieve.server.common import APIError, ServerState, State, Strict, list_of, live
from pensieve.server.responses import InputItem, input_items, messages_of
from pensieve.server.retention import swept
from pensieve.server.store import ConversationRecord, Thread, new_id

router = APIRouter(dependencies=[Depends(swept)])  # each request first drops what retention says is due


class ConversationCreate(Strict):
    items: list[InputItem] | None = None
    metadata: dict[str, str] | None = None


class ItemsCreate(Strict):
    items: list[InputItem]


@router.post("/v1/conversations")
async def create_conversation(s: State, body: ConversationCreate | None = None):
    body = body or ConversationCreate()
    items = _items(body.items or [])
    s.check_count(len(items) or 1, "items", "items")
    record = ConversationRecord(new_id("conv"), int(time.time()), body.metadata or {}, items)
    s.store.touch(record)
    s.store.save(Thread(record.id))
    return _conversation(record)


@router.get("/v1/conversations")
async def list_conversations(
    s: State,
    limit: int = Query(20, ge=1, le=100),
    after: str | None = None,
    order: Literal["asc", "desc"] = "desc",
):
    """The conversations by when they were last used (desc: the most recent first), `limit` at a time after the
    conversation `after` (the last id of the page before)."""
    records = sorted((c for c in s.store.conversations.values() if not c.deleted), key=lambda c: (c.last_used, c.id),
                     reverse=order == "desc")  # fmt: skip
    if after is not None:
        at = next((i for i, c in enumerate(records) if c.id == after), None)
        if at is None:
            raise APIError(400, f"after: no conversation {after!r} in this list", param="after")
        records = records[at + 1 :]
    page = records[:limit]
    return {**list_of([_conversation(c) for c in page]), "has_more": len(records) > limit}


@router.get("/v1/conversations/{conversation_id}/responses")
async def conversation_responses(conversation_id: str, s: State):
    """The conversation's stored responses (oldest first) with their parents and input items, and the response
    that ends its current branch. A response's input items are what it added to its parent's context: its input,
    after the conversation items added since its parent."""
    record = live(s.store.conversations, conversation_id, "conversation")
    # deleted ones that are kept (later ones build on them) are listed too, marked: they are part of the tree
    mine = sorted((r for r in s.store.responses.values() if r.conversation_id == record.id),
                  key=lambda r: (r.made_at, r.id))  # fmt: skip
    data = [
        {**r.body, "parent_response_id": r.parent, "deleted": r.deleted,
         "input_items": [i for m in r.input_messages for i in input_items(m)]}
        for r in mine
    ]  # fmt: skip
    return {**list_of(data), "head_response_id": record.head}


@router.get("/v1/conversations/{conversation_id}")
async def get_conversation(conversation_id: str, s: State):
    return _conversation(live(s.store.conversations, conversation_id, "conversation"))


@router.post("/v1/conversations/{conversation_id}")
async def update_conversation(conversation_id: str, body: ConversationCreate, s: State):
    record = live(s.store.conversations, conversation_id, "conversation")
    if body.items:
        raise APIError(400, "items are added with POST /v1/conversations/{id}/items", param="items")
    record.metadata = body.metadata or {}
    s.store.save(record)
    return _conversation(record)


@router.delete("/v1/conversations/{conversation_id}")
async def delete_conversation(conversation_id: str, s: State):
    record = _idle(s, conversation_id)
    s.store.remove(record)
    await threads.forget(s.store, s.gen, record.id)
    return {"id": conversation_id, "object": "conversation.deleted", "deleted": True}


@router.get("/v1/conversations/{conversation_id}/items")
async def conversation_items(conversation_id: str, s: State):
    return list_of(live(s.store.conversations, conversation_id, "conversation").items)


@router.post("/v1/conversations/{conversation_id}/items")
async def add_items(conversation_id: str, body: ItemsCreate, s: State):
    record = _idle(s, conversation_id)
    items = _items(body.items)
    s.check_count(len(items), "items", "items")
    s.check_count(len(record.items) + len(items), "items in the conversation", "items")
    record.items += items
    s.store.touch(record)
    return list_of(items)


@router.get("/v1/conversations/{conversation_id}/items/{item_id}")
async def conversation_item(conversation_id: str, item_id: str, s: State):
    record = live(s.store.conversations, conversation_id, "conversation")
    for item in record.items:
        if item["id"] == item_id:
            return item
    raise APIError(404, f"no item {item_id!r} in conversation {conversation_id!r}", "not_found_error")


@router.delete("/v1/conversations/{conversation_id}/items/{item_id}")
async def delete_item(conversation_id: str, item_id: str, s: State):
    """Remove an item -> the conversation. Its items then no longer follow its last response: the next response's
    context is the items as they are (recorded whole, with no parent)."""
    record = _idle(s, conversation_id)
    kept = [item for item in record.items if item["id"] != item_id]
    if len(kept) == len(record.items):
        raise APIError(404, f"no item {item_id!r} in conversation {conversation_id!r}", "not_found_error")
    record.items, record.head, record.head_items = kept, None, 0
    s.store.touch(record)
    return _conversation(record)


def _items(items: list) -> list[dict]:
    """Request items -> stored items, checked as a later response will render them (a bad one is a 400 now, not a
    conversation no response can continue)."""
    messages = messages_of(items)
    try:
        check_messages(messages)
    except ValueError as error:
        raise APIError(400, f"items: {error}", param="items") from None
    return [item for m in messages for item in input_items(m)]


def _idle(s: ServerState, conversation_id: str) -> ConversationRecord:
    """The conversation, unless a response is in progress on it (409)."""
    record = live(s.store.conversations, conversation_id, "conversation")
    thread = s.store.threads.get(record.id)
    if thread is not None and thread.busy:
        raise APIError(409, f"conversation {conversation_id!r} has a response in progress", "conflict_error")
    return record


def _conversation(record: ConversationRecord) -> dict:
    return {"id": record.id, "object": "conversation", "created_at": record.created_at, "metadata": record.metadata}
