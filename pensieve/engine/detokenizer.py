"""Reply text as tokens arrive: one incremental detokenizer per turn, with pluggable hold-back (DESIGN §2).

`TextStream.add(token)` decodes the new token and returns the text it makes safe to show. Hold-backs
(`HoldBack.scan`) decide how much of the text's end to keep back for now and where the reply ends: `StopStrings`
holds back any tail that may still grow into a stop string and ends the reply at the first stop string; a tool
call's text plugs in the same way. A reply's `<think>` block is split off first (`reasoning`): hold-backs see only
the content, and the reasoning is handed out on its own (`take_reasoning`). The pieces `add` and `finish` return
join to `TextStream.reply_text`, the turn's `Reply.text`. The engine keeps one per turn (with a tokenizer), on its
own thread; the generator's stream and the server pass its pieces on and decode nothing themselves.

Decoding is O(new tokens) per token: `tokenizers`' `DecodeStream` (Rust) where the tokenizer has a fast backend,
else the same scheme in Python, `decode(ids[prefix:]) - decode(ids[prefix:read])` where `read` is where the text
so far ends and `prefix` the piece before it (HF's TextStreamer and vLLM's offsets): a short window keeps the
tokenizer's context-dependent spacing right. A window that ends in an incomplete UTF-8 sequence emits nothing until
a later token completes it; at the end of the turn it decodes as a full decode does (U+FFFD). At batch 64 on
SmolLM2's tokenizer (Sapphire Rapids): DecodeStream 0.61 µs a token, the Python window 4.2 µs (docs/performance-log.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import tokenizers
from tokenizers.decoders import DecodeStream


class HoldBack(Protocol):
    def scan(self, text: str, start: int, final: bool) -> tuple[int, int | None]:
        """The reply's text so far, new from `start` on (`final`: the turn is over) -> (held, end): how many
        characters at the end of text may not be shown (yet; held at the end: never, as a tool call's text), and
        where the reply's text ends (None while it goes on)."""


class StopStrings:
    """The reply ends before the first stop string; a tail that is the start of a stop string is held back."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(stops)

    def scan(self, text: str, start: int, final: bool = False) -> tuple[int, int | None]:
        end = find_stop(text, self.stops, start)
        if end is not None:
            return 0, end
        if final:
            return 0, None
        held = 0
        for stop in self.stops:
            held = max(held, partial_match(text, stop))
        return held, None


class TextStream:
    """One reply's text as tokens arrive. hold_backs: what may hold back its end or end it (they see the content
    only: a reply's reasoning is neither cut by a stop string nor parsed for calls); reasoning: where a reply's
    `<think>` block is (pensieve/structured/reasoning.py), None: no split; kept: special tokens whose text is kept
    (tool-call markers), id -> text."""

    def __init__(self, tokenizer, hold_backs: Sequence[HoldBack] = (), reasoning=None, kept=None) -> None:
        self._decoder = _Decoder(tokenizer, kept or {})
        self.hold_backs = tuple(hold_backs)
        self.reasoning = reasoning
        self.text = ""  # everything decoded so far (past the end too, if a hold-back ended the reply)
        self.end: int | None = None  # where the reply's text ends, once a hold-back says so
        self._content: int | None = 0 if reasoning is None else None  # where the content starts, once known
        self._sent = 0  # text[_content:_sent] has been handed out
        self._reasoning: tuple[int, int] | None = None  # text[start:end] is the reasoning handed out so far
        self._new_reasoning = ""

    @property
    def stopped(self) -> bool:
        return self.end is not None

    @property
    def reply_text(self) -> str:
        """The reply's text: what was handed out (once the turn is over: all of it, but a tool call's text)."""
        return "" if self._content is None else self.text[self._content : self._sent]

    @property
    def reasoning_text(self) -> str | None:
        """The reply's reasoning handed out so far (None: it has none, or none yet)."""
        return None if self._reasoning is None else self.text[self._reasoning[0] : self._reasoning[1]]

    def take_reasoning(self) -> str:
        """The reasoning released since the last call ("" none)."""
        piece, self._new_reasoning = self._new_reasoning, ""
        return piece

    def add(self, token_id: int) -> str:
        """Append one sampled token -> the text now safe to show ("" while held back or incomplete, or ended); the
        reasoning it released waits in `take_reasoning`."""
        if self.end is not None:
            return ""
        start = len(self.text)
        self.text += self._decoder.add(token_id)
        return self._release(start, final=False) if len(self.text) > start else ""

    def finish(self) -> str:
        """The turn is over -> the rest of the reply's text: what was held back, and an incomplete character's
        U+FFFD (as decoding the whole reply gives)."""
        if self.end is None:
            start = len(self.text)
            self.text += self._decoder.flush()
            return self._release(start, final=True)
        content = self.text[self._content : self.end]
        for hold_back in self.hold_backs:  # the final scans still run over the reply's text (a tool call's parse)
            hold_back.scan(content, len(content), True)
        return ""

    def _release(self, start: int, final: bool) -> str:
        if self._content is None:
            begin, safe, content = self.reasoning.split(self.text, final)
            if begin is not None:
                shown = self._reasoning[1] if self._reasoning is not None else begin
                self._new_reasoning += self.text[shown:safe] if safe > shown else ""
                self._reasoning = (begin, max(safe, shown))
            if content is None:
                return ""
            self._content = self._sent = start = content
        base = self._content
        held = 0
        for hold_back in self.hold_backs:
            h, end = hold_back.scan(self.text[base:], max(start - base, 0), final)
            held = max(held, h)
            if end is not None and (self.end is None or base + end < self.end):
                self.end = base + end
        safe = min(self.end, len(self.text) - held) if self.end is not None else len(self.text) - held
        if safe <= self._sent:
            return ""
        piece, self._sent = self.text[self._sent : safe], safe
        return piece


def find_stop(text: str, stops: tuple[str, ...], start: int = 0) -> int | None:
    """Index of the earliest stop string in text that ends at or after `start` (earlier text was checked already)."""
    first = None
    for stop in stops:
        i = text.find(stop, max(0, start - len(stop) + 1))
        if i >= 0 and (first is None or i < first):
            first = i
    return first


def partial_match(text: str, stop: str) -> int:
    """Length of the longest end of text that is a proper start of stop (only starts that end in text's last
    character are tried: usually none)."""
    n = min(len(stop) - 1, len(text))
    while n > 0:
        n = stop.rfind(text[-1], 0, n) + 1  # the longest start up to n that ends in text's last character
        if n and text.endswith(stop[:n]):
            return n
        n -= 1
    return 0


class _Decoder:
    """Text of a growing token sequence, one token at a time, skipping special tokens (as `Reply.text` does) but
    those in `kept` (id -> text)."""

    def __init__(self, tokenizer, kept: dict[int, str]) -> None:
        self.tokenizer = tokenizer
        self.kept = kept
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._backend = backend if isinstance(backend, tokenizers.Tokenizer) else None
        self._stream = DecodeStream(skip_special_tokens=True) if self._backend is not None else None
        self.ids: list[int] = []
        self._prefix = 0  # ids[_prefix:_read] decode to the last piece returned
        self._read = 0

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        piece = None
        if self._stream is not None:
            try:
                piece = self._stream.step(self._backend, token_id) or ""
            except Exception:  # noqa: BLE001  DecodeStream's state can break on invalid UTF-8 (tokenizers: "Invalid
                self._stream = None  # prefix encountered"); the window below carries on from the same offsets
        if piece is None:
            done = self._decode(self.ids[self._prefix : self._read])
            now = self._decode(self.ids[self._prefix :])
            piece = "" if now.endswith("\ufffd") or len(now) <= len(done) else now[len(done) :]
        if piece:
            self._prefix, self._read = self._read, len(self.ids)
        return piece + self.kept[token_id] if token_id in self.kept else piece

    def flush(self) -> str:
        """What the tokens after the last piece decode to, incomplete characters included."""
        if self._read == len(self.ids):
            return ""
        done = self._decode(self.ids[self._prefix : self._read])
        now = self._decode(self.ids[self._prefix :])
        return now[len(done) :]

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if ids else ""
