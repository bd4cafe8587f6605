"""What the server keeps beside the engine's KV: stored responses, conversation objects, and the token sequence of
each pensieve conversation ("thread") they live on. In memory; with a disk_dir also in one SQLite file there
(`server.sqlite`), written through on every change, so a restarted server continues where it stopped. Every key is
an id the server made (never a path): the engine's disk tier holds the KV, this holds the records."""

from __future__ import annotations

import json
import secrets
import sqlite3
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path


def new_id(prefix: str) -> str:
    """An unguessable id: 128 random bits (OpenAI-style prefix)."""
    return f"{prefix}_{secrets.token_hex(16)}"


@dataclass
class Thread:
    """A pensieve conversation (raw token mode) the server continues: its whole token sequence."""

    id: str
    tokens: list[int] = field(default_factory=list)
    busy: bool = False  # a turn runs on it (not persisted)
    key: str = ""  # the history key (engine.replies.history_keys, hex) of the messages its tokens end with


@dataclass
class ResponseRecord:
    id: str
    thread_id: str | None  # None: not stored as a pensieve conversation (store=false)
    num_tokens: int  # the thread's length once this response's reply was appended
    previous_response_id: str | None
    conversation_id: str | None
    input_messages: list[dict]  # the chat messages this response added (instructions excluded: not carried over)
    output_message: dict  # the assistant's reply as a chat message
    body: dict  # the Response object returned to the client
    deleted: bool = False  # deleted by the client; kept (hidden) while later responses build on it
    key: str = ""  # the history key (hex) of the messages its thread's first num_tokens tokens end with
    last_used: float = 0.0  # when it was made or last continued (epoch seconds): its age for retention
    # the response this one follows (its context ends with it): previous_response_id, or in a conversation the
    # response that ended the conversation's branch then; None for a first turn (and records kept before parents)
    parent: str | None = None
    made_at: float = 0.0  # when it was made (epoch seconds): the order of a conversation's responses

    def __post_init__(self) -> None:
        if self.parent is None and self.previous_response_id is not None:  # kept before records had a parent
            self.parent = self.previous_response_id


@dataclass
class ConversationRecord:
    id: str
    created_at: int
    metadata: dict
    items: list[dict]  # conversation items (messages) in order: those of its current branch
    deleted: bool = False
    last_used: float = 0.0  # when it was made or last continued (epoch seconds): its age for retention
    head: str | None = None  # the response that ends the current branch (None before the first)
    head_items: int = 0  # len(items) when head was made: the items after it were added since


_SCHEMA = "CREATE TABLE IF NOT EXISTS records (kind TEXT, id TEXT, body TEXT, PRIMARY KEY (kind, id))"
_KINDS = {"thread": Thread, "response": ResponseRecord, "conversation": ConversationRecord}


class Store:
    def __init__(self, disk_dir: str | Path | None = None, clock=time.time) -> None:
        self.clock = clock
        self.threads: dict[str, Thread] = {}
        self.responses: dict[str, ResponseRecord] = {}
        self.conversations: dict[str, ConversationRecord] = {}
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()
        if disk_dir is not None:
            path = Path(disk_dir) / "server.sqlite"
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(_SCHEMA)
            aged = []
            for kind, _id, body in self._db.execute("SELECT kind, id, body FROM records").fetchall():
                record = _KINDS[kind](**json.loads(body))
                if getattr(record, "last_used", None) == 0.0:  # kept before records had an age: from now on
                    record.last_used = self.clock()
                    aged.append(record)
                self._table(kind)[_id] = record
            for record in aged:
                self.save(record)

    def _table(self, kind: str) -> dict:
        return {"thread": self.threads, "response": self.responses, "conversation": self.conversations}[kind]

    def save(self, record) -> None:
        kind = next(k for k, cls in _KINDS.items() if isinstance(record, cls))
        self._table(kind)[record.id] = record
        if self._db is not None:
            body = asdict(record)
            body.pop("busy", None)
            with self._lock:
                self._db.execute("INSERT OR REPLACE INTO records VALUES (?, ?, ?)", (kind, record.id, json.dumps(body)))

    def touch(self, record) -> None:
        """The record was used (made or continued) now."""
        record.last_used = self.clock()
        self.save(record)

    def remove(self, record) -> None:
        kind = next(k for k, cls in _KINDS.items() if isinstance(record, cls))
        self._table(kind).pop(record.id, None)
        if self._db is not None:
            with self._lock:
                self._db.execute("DELETE FROM records WHERE kind = ? AND id = ?", (kind, record.id))

    def context(self, response: ResponseRecord) -> list[dict]:
        """The chat messages up to and including `response` (its chain of parents, oldest first)."""
        chain = []
        node: ResponseRecord | None = response
        while node is not None:
            chain.append(node)
            node = self.responses.get(node.parent) if node.parent else None
        messages: list[dict] = []
        for node in reversed(chain):
            messages += node.input_messages
            messages.append(node.output_message)
        return messages

    def built_on(self, response_id: str) -> bool:
        """Whether a later response follows this one, or a conversation's branch ends with it."""
        return any(r.parent == response_id for r in self.responses.values()) or any(
            c.head == response_id for c in self.conversations.values()
        )

    def thread_in_use(self, thread_id: str) -> bool:
        """Whether a live response or conversation still continues from this thread."""
        return thread_id in self.conversations or any(
            r.thread_id == thread_id and not r.deleted for r in self.responses.values()
        )

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
