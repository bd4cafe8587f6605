"""Text of a growing token sequence in O(new tokens) per token.

`decode(ids[prefix:])` minus `decode(ids[prefix:read])`, where `read` is where the text emitted so far ends and
`prefix` a few tokens before it (the offsets of HF's TextStreamer and vLLM's incremental detokenizer): decoding a
short window keeps tokenizers' context-dependent spacing right without re-decoding the whole reply every token. A
window that ends in an incomplete UTF-8 sequence ("\\ufffd") emits nothing until the next token completes it.
"""

from __future__ import annotations


class IncrementalDetokenizer:
    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""
        self._prefix = 0  # ids[_prefix:_read] decode to the end of `text`
        self._read = 0

    def add(self, token_id: int) -> str:
        """Append one token; -> the text it completes ("" while a character is still incomplete)."""
        self.ids.append(token_id)
        done = self._decode(self.ids[self._prefix : self._read])
        now = self._decode(self.ids[self._prefix :])
        if now.endswith("\ufffd") or len(now) <= len(done):
            return ""
        delta = now[len(done) :]
        self._prefix, self._read = self._read, len(self.ids)
        self.text += delta
        return delta

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if ids else ""


def find_stop(text: str, stops: tuple[str, ...], start: int = 0) -> int | None:
    """Index of the earliest stop string in text that ends at or after `start` (earlier text was checked already)."""
    hits = [i for i in (text.find(s, max(0, start - len(s) + 1)) for s in stops) if i >= 0]
    return min(hits) if hits else None
