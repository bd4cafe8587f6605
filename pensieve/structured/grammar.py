"""Grammar-constrained decoding through xgrammar (DESIGN §5): compile a `StructuredOutput` once, keep one matcher a
turn, mask each step's logits in the batched sampler.

Why xgrammar (benchmarks/grammar.py measured it beside llguidance on this CPU; docs/performance.md): a compile cache
keyed by the spec, a native CPU kernel that applies a bitmask to a logits row, a batched mask fill over threads, and
grammars composed as objects (`Grammar.concat` / `union`), which tool calls are built from.

- `Grammars` (one per engine): the tokenizer's vocabulary as xgrammar sees it (stop tokens: the model's EOS ids) and
  a compiler with its cache. `compile` is thread-safe and releases the GIL: `StatefulGenerator` compiles on the
  caller's thread before a turn is queued, so a slow first compile never stalls the engine's steps.
- `GrammarState` (one per turn): a matcher that has accepted the reply so far. A fork of the conversation in the
  middle of a turn (n > 1 candidates) starts its own from the same compiled grammar; nothing of it is stored on disk:
  a turn does not outlive the process, and a conversation continued after a restart compiles its spec again.
- `mask(logits, states)`: the rows' bitmasks filled (in parallel for several rows) and applied in place: a token
  that cannot continue the reply gets -inf, and the stop tokens are allowed only where the reply may end.

JSON schemas compile with compact separators (", " and ": ") and no free whitespace: a small model cannot wander
into endless whitespace, and the text is what `json.dumps` writes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

import torch

from pensieve.config import StructuredOutput

try:
    import numpy as np  # xgrammar depends on it
    import xgrammar as xg
except ImportError:  # pragma: no cover - an install without the structured extra
    xg = None

CACHE_LIMIT_BYTES = 256 * 2**20  # compiled grammars kept (xgrammar evicts the least recently used past it)
JSON_FORMAT = {"any_whitespace": False, "separators": (", ", ": ")}


class Grammars:
    """Compiles `StructuredOutput`s (and tool-call grammars) for one tokenizer and vocabulary; caches them."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: Sequence[int], kept: Sequence[int] = ()) -> None:
        if xg is None:
            raise ValueError("structured outputs need xgrammar: pip install 'pensieve[structured]'")
        self.vocab_size = vocab_size
        self.info = tokenizer_info(tokenizer, vocab_size, stop_token_ids, kept)
        self.compiler = xg.GrammarCompiler(self.info, max_threads=2, cache_limit_bytes=CACHE_LIMIT_BYTES)

    def compile(self, spec: StructuredOutput | xg.Grammar):
        """-> an xgrammar CompiledGrammar (cached by the spec); ValueError naming what is wrong with a bad one."""
        try:
            if isinstance(spec, xg.Grammar):
                return self.compiler.compile_grammar(spec)
            if spec.json is not None:
                schema = spec.json if isinstance(spec.json, str) else json.dumps(dict(spec.json))
                return self.compiler.compile_json_schema(schema, **JSON_FORMAT)
            if spec.json_object:
                return self.compiler.compile_json_schema('{"type": "object"}', **JSON_FORMAT)
            if spec.regex is not None:
                return self.compiler.compile_regex(spec.regex)
            if spec.grammar is not None:
                return self.compiler.compile_grammar(spec.grammar)
            return self.compiler.compile_grammar(choice_grammar(spec.choice))
        except (RuntimeError, ValueError, TypeError) as error:
            if isinstance(spec, xg.Grammar):
                raise ValueError(f"the forced tool-call grammar does not compile: {_first_line(error)}") from None
            what = "json" if spec.json is not None or spec.json_object else _field(spec)
            raise ValueError(f"structured_output.{what} does not compile: {_first_line(error)}") from None

    def mask(self, logits: torch.Tensor, rows: list[int], states: list[GrammarState]) -> None:
        """Mask logits[rows[j]] in place with states[j]'s next-token bitmask (logits: float32, [S, V])."""
        bitmask = xg.allocate_token_bitmask(len(rows), self.vocab_size)
        for j, state in enumerate(states):  # one thread: BatchGrammarMatcher's hand-off cost ~1 ms a step on 2 cores
            state.matcher.fill_next_token_bitmask(bitmask, j)
        # unpacked to bools (numpy) and applied with one where: ~7x faster than xgrammar's CPU kernel on a 49k
        # vocabulary (benchmarks/grammar.py)
        bits = np.unpackbits(bitmask.numpy().view(np.uint8), axis=1, count=self.vocab_size, bitorder="little")
        allowed = torch.from_numpy(bits.view(np.bool_)).to(logits.device, non_blocking=True)
        index = torch.tensor(rows, device=logits.device)
        masked = logits[index, : self.vocab_size].masked_fill(~allowed, float("-inf"))
        logits[index, : self.vocab_size] = masked
        logits[index, self.vocab_size :] = float("-inf")

    def state(self, compiled) -> GrammarState:
        return GrammarState(self, xg.GrammarMatcher(compiled))


def tokenizer_info(tokenizer, vocab_size: int, stop_token_ids: Sequence[int], kept: Sequence[int] = ()):
    """The vocabulary as xgrammar reads it, with the tokenizer's special tokens blanked but `kept` (the tool-call
    markers a forced call writes, as Mistral's [TOOL_CALLS]). xgrammar takes a token for special only when its text
    is empty; from_huggingface keeps the text of added special tokens (SmolLM2's <|im_start|>, <|endoftext|>,
    <repo_name>...), so its masks would allow them as literal text inside JSON strings. Blanked, they are never
    allowed; the stop tokens stay allowed where the reply may end."""
    stock = xg.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
    encoded = [""] * vocab_size  # the vocabulary's own strings (byte-level: "Ġthe"), as from_huggingface reads it
    for text, i in tokenizer.get_vocab().items():
        if i < vocab_size:
            encoded[i] = text
    for i in set(special_ids(tokenizer, vocab_size)) - set(kept):
        encoded[i] = ""
    return xg.TokenizerInfo(
        encoded,
        stock.vocab_type,
        vocab_size=vocab_size,
        stop_token_ids=list(stop_token_ids),
        add_prefix_space=stock.add_prefix_space,
    )


def special_ids(tokenizer, vocab_size: int) -> list[int]:
    """Ids of the tokenizer's special tokens (its added tokens marked special, and the named ones)."""
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    for i, token in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if getattr(token, "special", False):
            ids.add(int(i))
    return sorted(i for i in ids if 0 <= i < vocab_size)


class GrammarState:
    """One turn's place in its grammar: the reply's tokens accepted so far."""

    def __init__(self, grammars: Grammars, matcher) -> None:
        self.grammars = grammars  # what masks its rows
        self.matcher = matcher

    def accept(self, token: int) -> None:
        if not self.matcher.accept_token(token):
            raise RuntimeError(f"the grammar rejected token {token}, which its own mask allowed (a bug)")

    @property
    def terminated(self) -> bool:
        """The reply is complete (the grammar accepted a stop token, or can take nothing more)."""
        return self.matcher.is_terminated()


def choice_grammar(choices: Sequence[str]) -> str:
    """EBNF for exactly one of `choices`."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


def tool_call_grammar(tools: Sequence[Mapping], names: Sequence[str] | None, parallel: bool, call_format: str):
    """The grammar of a reply that is only tool calls, one of `names` (None: any tool) each, several only when
    `parallel`, in `call_format` (`ChatFormat.call_format`):

    - "hermes": `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>` a call, "\n" between calls
    - "llama3_json": `{"name": ..., "parameters": {...}}` a call, "; " between calls
    - "mistral": `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]` (v3 tokenizers)
    - "mistral_args": `[TOOL_CALLS]name[ARGS]{...}` a call (v11+)

    -> an xgrammar Grammar."""
    chosen = [t for t in tools if names is None or t["function"]["name"] in names]
    try:
        if call_format == "mistral_args":
            call = xg.Grammar.union(
                *[xg.Grammar.concat(_literal(f"[TOOL_CALLS]{t['function']['name']}[ARGS]"), _json(parameters(t)))
                  for t in chosen]
            )  # fmt: skip
            return _repeated(call, "", parallel)
        key = "parameters" if call_format == "llama3_json" else "arguments"
        body = xg.Grammar.union(*[_json(call_schema(t, key)) for t in chosen])
    except (RuntimeError, ValueError, TypeError) as error:
        raise ValueError(f"a tool's parameters are not a JSON schema xgrammar takes: {_first_line(error)}") from None
    if call_format == "hermes":
        return _repeated(xg.Grammar.concat(_literal("<tool_call>\n"), body, _literal("\n</tool_call>")), "\n", parallel)
    if call_format == "llama3_json":
        return _repeated(body, "; ", parallel)
    if call_format == "mistral":
        return xg.Grammar.concat(_literal("[TOOL_CALLS]["), _repeated(body, ", ", parallel), _literal("]"))
    raise ValueError(f"no forced tool calls for the {call_format!r} format")


MAX_PARALLEL_CALLS = 8


def _repeated(call, separator: str, parallel: bool):
    """One call, then (parallel) up to MAX_PARALLEL_CALLS - 1 more after separator: xgrammar composes grammars, it
    has no repetition of a grammar."""
    if not parallel:
        return call
    more = xg.Grammar.concat(_literal(separator), call) if separator else call
    return xg.Grammar.concat(call, *[xg.Grammar.union(_literal(""), more) for _ in range(MAX_PARALLEL_CALLS - 1)])


def parameters(tool: Mapping) -> dict:
    """A tool's parameters schema (an object with no properties when it has none)."""
    return tool["function"].get("parameters") or {"type": "object", "properties": {}}


def call_schema(tool: Mapping, arguments_key: str = "arguments") -> dict:
    """The JSON schema of one call to `tool` (an OpenAI tool: {"type": "function", "function": {...}}), its arguments
    under arguments_key."""
    return {
        "type": "object",
        "properties": {"name": {"const": tool["function"]["name"]}, arguments_key: parameters(tool)},
        "required": ["name", arguments_key],
        "additionalProperties": False,
    }


def _json(schema: Mapping):
    return xg.Grammar.from_json_schema(json.dumps(schema), **JSON_FORMAT)


def _literal(text: str):
    return xg.Grammar.from_ebnf(f"root ::= {json.dumps(text, ensure_ascii=False)}")


def _field(spec: StructuredOutput) -> str:
    return next(n for n in ("regex", "grammar", "choice") if getattr(spec, n) is not None)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else type(error).__name__
