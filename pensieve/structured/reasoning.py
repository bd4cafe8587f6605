"""Reasoning in `<think>` tags (Qwen3, QwQ, DeepSeek-R1 distills, SmolLM3): kept out of a reply's text and returned
as its reasoning, streamed as it grows (DESIGN §9).

A template that mentions `<think>` (`thinks`) gets a `Reasoning` splitter on every turn whose prompt it rendered.
Where the reasoning is:

- The generation prompt may open the block itself (QwQ, DeepSeek-R1 distills, Qwen3-Thinking-2507 end it with
  `<think>\n`): then the reply starts in reasoning (`opened`, read off the prompt's tail: its last `<think>` comes
  after its last `</think>`).
  Under a grammar (a structured output, a forced call) such a reply is reasoning only if it closes the block:
  until `</think>` nothing is shown, and without one the whole reply is content.
- Else the reply opens it: reasoning iff its text starts (after whitespace) with `<think>`. Qwen3 with
  `enable_thinking=False` closes an empty block in the prompt, so its reply is content.

Reasoning ends at the first `</think>`; the newlines after it are dropped; the rest is content. A reply that never
closes its block is all reasoning (cut off), with empty content. The rule decides from what has arrived: while the
reply is only whitespace or a start of `<think>`, nothing is shown; a tail that may grow into `</think>` is held.
vLLM's qwen3 parser calls text before a `</think>` with no `<think>` reasoning whatever the prompt said; pensieve
asks the prompt, so a reply streams as content from its first token when no block is open.
"""

from __future__ import annotations

from dataclasses import dataclass

from pensieve.engine.detokenizer import partial_match

THINK, END_THINK = "<think>", "</think>"


def thinks(chat_template: str | None) -> bool:
    """Whether replies under this template may reason in `<think>` tags."""
    return THINK in (chat_template or "") or END_THINK in (chat_template or "")


def opens_reasoning(tokenizer, prompt: list[int]) -> bool:
    """Whether a rendered prompt's generation prompt opened a `<think>` block: the prompt ends with it."""
    return tokenizer.decode(prompt[-4:], skip_special_tokens=False).rstrip().endswith(THINK)


@dataclass(frozen=True)
class Reasoning:
    """Where a reply's reasoning and content are, as its text grows. opened: the prompt opened the block."""

    opened: bool = False
    # a grammar constrains the reply: a block the prompt opened is reasoning only if the reply closes it (held until
    # then); else the whole reply is content (a forced call, a JSON document)
    constrained: bool = False

    def split(self, text: str, final: bool) -> tuple[int | None, int, int | None]:
        """The reply's text so far (`final`: all of it) -> (start, safe, content): its reasoning starts at `start`
        (None: it has none), text[start:safe] of it can be shown now; its content starts at `content` (None: not
        known yet)."""
        start = 0
        if not self.opened:
            head = text.lstrip()
            if head.startswith(THINK):
                start = len(text) - len(head) + len(THINK)
            elif not final and THINK.startswith(head):  # only whitespace or a start of "<think>": wait
                return None, 0, None
            else:
                return None, 0, 0
        end = text.find(END_THINK, start)
        if end < 0 and self.opened and self.constrained:
            return (None, 0, 0) if final else (None, 0, None)
        if end < 0:
            if final:
                return start, len(text), len(text)
            return start, max(start, len(text) - partial_match(text, END_THINK)), None
        content = end + len(END_THINK)
        while content < len(text) and text[content] == "\n":
            content += 1
        if content == len(text) and not final:  # more newlines may follow
            return start, end, None
        return start, end, content


def split_reasoning(text: str, opened: bool = False) -> tuple[str | None, str]:
    """A whole reply -> (reasoning or None, content), by `Reasoning`'s rule."""
    start, end, content = Reasoning(opened).split(text, final=True)
    return (None if start is None else text[start:end]), text[content:]
