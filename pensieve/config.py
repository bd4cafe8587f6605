"""User-facing configuration: frozen dataclasses validated at construction (a bad value raises ValueError)."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

POLICIES = ("pensieve", "lru")
MAX_LOGPROBS = 20  # alternatives per token (OpenAI's top_logprobs limit)
MAX_CANDIDATES = 64  # SamplingParams.n


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _require_int(obj, name: str, minimum: int, optional: bool = False) -> None:
    value = getattr(obj, name)
    ok = (optional and value is None) or (_is_int(value) and value >= minimum)
    _require(ok, f"{name} must be {'None or ' if optional else ''}an int >= {minimum}, got {value!r}")


KV_DTYPES = (None, "int8")


@dataclass(frozen=True)
class CacheConfig:
    """Where conversations' KV lives (DESIGN §1, §4).

    block_size: tokens per KV block (one chunk).
    num_device_blocks: None sizes the device tier from free memory; an int caps it.
    num_host_blocks: host tier (pinned on GPU machines); 0 disables it.
    disk_dir: a folder enables the disk tier and persistence.
    policy: which chunks leave a tier first. "pensieve": lowest recompute cost x activity of the conversations
        holding the chunk (cost / idle time for a private chunk), leading chunks first; "lru": whole conversations,
        least recently active first.
    share_prefixes: conversations and `complete()` calls take the longest cached prefix of any other through the
        prompt tree (shared system prompts, resent histories); False keeps every conversation's KV to itself
        (forks still share).
    swap_out_watermark: after each step, idle chunks move down a tier ahead of time while fewer than this
        fraction of device blocks is free (only to a tier with room: never dropped ahead of time).
    decode_reserve: new turns may not take the last fraction of device blocks while other turns are decoding.
    reply_memory_tokens: `complete()` on chat messages remembers the token sequences its replies ended, up to this
        many tokens (least recently used go first; 0 turns it off), so a stateless client's resent history keeps
        the sampled tokens of pensieve's replies, tool calls included, and the KV computed for them
        (engine.replies).
    write_behind_s: with a disk_dir, chunks of a stored conversation idle this many seconds get a clean copy on
        disk in the background (they stay where they are; evicting them later writes nothing). A crash then loses
        the KV of the conversations active within the last write_behind_s seconds (all of it for one that was
        never idle that long) and of any backlog the bandwidth bound left. None turns it off: KV then reaches disk
        only when evicted there, by `end`, or at `close`.
    write_behind_mb_s: the write-behind's bandwidth bound, MiB written per second on average.
    kv_dtype: None keeps KV in the model's dtype; "int8" stores each row (a token's head) as int8 values, an fp32
        scale and an fp32 minimum (pensieve/ops/quant.py): 3.56x the tokens of fp32 and 1.78x of bf16 in the same
        bytes at head_dim 64,
        at the cost of exactness (attention reads the dequantized KV). Its disk files are int8 too: files of
        another kv_dtype count as missing (recomputed), never misread.
    """

    block_size: int = 16
    num_device_blocks: int | None = None
    num_host_blocks: int = 0
    disk_dir: str | os.PathLike | None = None
    policy: str = "pensieve"
    swap_out_watermark: float = 0.25
    decode_reserve: float = 0.10
    share_prefixes: bool = True
    reply_memory_tokens: int = 1 << 22
    write_behind_s: float | None = 5.0
    write_behind_mb_s: float = 64.0
    kv_dtype: str | None = None

    def __post_init__(self) -> None:
        _require(self.kv_dtype in KV_DTYPES, f"kv_dtype must be one of {KV_DTYPES}, got {self.kv_dtype!r}")
        _require_int(self, "block_size", 1)
        _require_int(self, "reply_memory_tokens", 0)
        _require(isinstance(self.share_prefixes, bool), f"share_prefixes must be a bool, got {self.share_prefixes!r}")
        _require_int(self, "num_device_blocks", 1, optional=True)
        _require_int(self, "num_host_blocks", 0)
        _require(
            self.disk_dir is None or isinstance(self.disk_dir, (str, os.PathLike)),
            f"disk_dir must be None or a path, got {self.disk_dir!r}",
        )
        _require(
            self.write_behind_s is None or (_is_number(self.write_behind_s) and self.write_behind_s >= 0),
            f"write_behind_s must be None or a number of seconds >= 0, got {self.write_behind_s!r}",
        )
        _require(
            _is_number(self.write_behind_mb_s) and self.write_behind_mb_s > 0,
            f"write_behind_mb_s must be a number > 0, got {self.write_behind_mb_s!r}",
        )
        _require(self.policy in POLICIES, f"policy must be one of {POLICIES}, got {self.policy!r}")
        for name in ("swap_out_watermark", "decode_reserve"):
            value = getattr(self, name)
            _require(
                isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 1,
                f"{name} must be a number in [0, 1), got {value!r}",
            )


@dataclass(frozen=True)
class StructuredOutput:
    """Constrain a reply to a formal language (exactly one field set), compiled by xgrammar (DESIGN §5,
    pensieve/structured/grammar.py): at every step the tokens that cannot continue a valid reply are masked out,
    and the end-of-sequence token is allowed only where the reply is complete.

    json: a JSON schema (a dict or its JSON text); json_object: any JSON object (OpenAI's "json_object"); regex: a
    regular expression; grammar: an EBNF grammar (xgrammar's dialect, GBNF-like, rule `root`); choice: exactly one
    of these strings. A reply that reaches max_new_tokens first ends with finish_reason "length": its text is not
    complete. Stop strings and stop token ids do not end a constrained reply: it ends when complete ("stop")."""

    json: Mapping | str | None = None
    json_object: bool = False
    regex: str | None = None
    grammar: str | None = None
    choice: Sequence[str] | None = None

    def __post_init__(self) -> None:
        given = [name for name in ("json", "regex", "grammar", "choice") if getattr(self, name) is not None]
        given += ["json_object"] if self.json_object is True else []
        _require(isinstance(self.json_object, bool), f"json_object must be a bool, got {self.json_object!r}")
        _require(
            len(given) == 1,
            f"a StructuredOutput takes exactly one of json, json_object, regex, grammar, choice; got {given or 'none'}",
        )
        _require(
            self.json is None or isinstance(self.json, (Mapping, str)),
            f"json must be a JSON schema (a dict or its JSON text), got {type(self.json).__name__}",
        )
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            _require(
                value is None or (isinstance(value, str) and value),
                f"{name} must be a non-empty str, got {value!r:.80}",
            )
        _require(
            self.choice is None
            or (
                not isinstance(self.choice, str)
                and len(self.choice) > 0
                and all(isinstance(c, str) and c for c in self.choice)
            ),
            f"choice must be a non-empty list of non-empty strings, got {self.choice!r:.80}",
        )


@dataclass(frozen=True)
class SamplingParams:
    """How one turn's reply is generated. None means "the model's generation_config, else the usual default".

    temperature 0 is greedy; top_k 0, top_p 1 and min_p 0 switch those filters off; seed makes a turn's sampling
    reproducible whatever else shares the batch.

    The logits of each step go through, in this order (vLLM's): `logit_bias` (token id -> added to its logit,
    [-100, 100], OpenAI's), `repetition_penalty` (HF's: a logit of a token anywhere in the conversation, its whole
    history included, is divided by it when positive and multiplied when negative; 1 = off), `presence_penalty` and
    `frequency_penalty` (OpenAI's, over the reply's tokens only: logit -= frequency * count + presence * (count >
    0); [-2, 2]). Greedy rows then take the argmax; sampled rows go on through temperature, `min_p` (drop tokens
    whose probability is below min_p times the top one's), top-k and top-p.

    logprobs: None returns none; k >= 0 gives each reply token's log-probability and its k most likely
    alternatives (k <= 20), from the model's raw logits before any of the processing above (vLLM's default).

    n: how many candidate replies. The prompt is prefilled once: when its first token is sampled, the conversation
    is forked (`<conv_id>/1` ... `<conv_id>/<n-1>`, which must not exist; a `complete()` call's candidates are not
    kept) and each fork samples its own reply, candidate i with seed `seed + i` (vLLM's derivation). The original
    conversation continues with candidate 0; `Reply.candidates` holds the others.

    structured_output: constrain the reply to a JSON schema, any JSON object, a regex, a grammar or a choice
    (`StructuredOutput`); compiled once per distinct spec (cached), the mask applied in the batched sampler.
    """

    max_new_tokens: int | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    seed: int | None = None
    stop_token_ids: Sequence[int] = ()
    stop: Sequence[str] = ()
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float | None = None
    logit_bias: Mapping[int, float] | None = None
    logprobs: int | None = None
    n: int = 1
    structured_output: StructuredOutput | None = None

    def __post_init__(self) -> None:
        _require_int(self, "max_new_tokens", 1, optional=True)
        _require(
            _is_int(self.n) and 1 <= self.n <= MAX_CANDIDATES,
            f"n must be an int in [1, {MAX_CANDIDATES}], got {self.n!r}",
        )
        _require(
            self.temperature is None
            or (
                isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature) and self.temperature >= 0
            ),
            f"temperature must be a finite number >= 0, got {self.temperature!r}",
        )
        _require_int(self, "top_k", 0, optional=True)  # 0 = off
        _require(
            self.top_p is None or (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1),
            f"top_p must be in (0, 1], got {self.top_p!r}",
        )
        _require(self.seed is None or _is_int(self.seed), f"seed must be None or an int, got {self.seed!r}")
        _require(
            not isinstance(self.stop_token_ids, (str, bytes))
            and all(_is_int(t) and t >= 0 for t in self.stop_token_ids),
            f"stop_token_ids must be a sequence of ints >= 0, got {self.stop_token_ids!r}",
        )
        _require(
            not isinstance(self.stop, (str, bytes)) and all(isinstance(s, str) and s for s in self.stop),
            f"stop must be a sequence of non-empty strings, got {self.stop!r}",
        )
        _require(isinstance(self.ignore_eos, bool), f"ignore_eos must be a bool, got {self.ignore_eos!r}")
        _require(
            self.min_p is None or (_is_number(self.min_p) and 0 <= self.min_p <= 1),
            f"min_p must be in [0, 1], got {self.min_p!r}",
        )
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _require(_is_number(value) and -2 <= value <= 2, f"{name} must be in [-2, 2], got {value!r}")
        _require(
            self.repetition_penalty is None or (_is_number(self.repetition_penalty) and self.repetition_penalty > 0),
            f"repetition_penalty must be a number > 0, got {self.repetition_penalty!r}",
        )
        bias = self.logit_bias
        _require(
            bias is None
            or (
                isinstance(bias, Mapping)
                and all(_is_int(t) and t >= 0 and _is_number(b) and -100 <= b <= 100 for t, b in bias.items())
            ),
            f"logit_bias must map token ids (ints >= 0) to numbers in [-100, 100], got {bias!r:.200}",
        )
        _require(
            self.logprobs is None or (_is_int(self.logprobs) and 0 <= self.logprobs <= MAX_LOGPROBS),
            f"logprobs must be None or an int in [0, {MAX_LOGPROBS}], got {self.logprobs!r}",
        )
        _require(
            self.structured_output is None or isinstance(self.structured_output, StructuredOutput),
            f"structured_output must be None or a StructuredOutput, got {type(self.structured_output).__name__}",
        )


@dataclass(frozen=True)
class SchedulerConfig:
    """Per-step limits. A step packs at most max_num_batched_tokens tokens (decodes first, then prefill chunks;
    a longer prompt is chunked across steps) from at most max_num_seqs conversations."""

    max_num_batched_tokens: int = 512
    max_num_seqs: int = 64

    def __post_init__(self) -> None:
        _require_int(self, "max_num_batched_tokens", 1)
        _require_int(self, "max_num_seqs", 1)


@dataclass(frozen=True)
class EngineConfig:
    """How a step's forward runs.

    compile: "auto" compiles the decode steps of fp32/bf16/fp16 models on CPU with torch.compile (inductor) when a
        C++ compiler is present (measured faster there; docs/performance-log.md); True always compiles them; False
        runs every step eagerly. The first compile takes tens of seconds; inductor caches it on disk.
    compile_prefill: which steps with prefill or recompute chunks run compiled too. They are padded so that they
        run the graph batched decode steps use (no graph of their own): "auto" runs them compiled once that graph
        exists (compiled for a batched decode step, or a warm-up), eagerly before; True always (compiling that graph
        at the first such step if needed); False never. Compiled, a 1500-token prefill of SmolLM2 takes ~0.55x the
        eager time in bf16, ~0.9x in fp32 (docs/performance-log.md).
    cuda_graphs: on GPU, capture decode steps as CUDA graphs for the batch sizes in cuda_graph_batch_sizes (a step
        is padded to the next one); larger batches, and steps that swap KV in, run eagerly.
    cpu_linear: on CPU, run the model's nn.Linear layers (fp32/bf16) through pensieve's linear kernel, which streams
        each weight once for decode-sized batches, faster than BLAS there (pensieve/models/linear.py); restored by
        close().
    pack_weights: with cpu_linear, also keep each fp32/bf16 linear weight packed in the blocked layout of oneDNN's
        brgemm micro-kernel, used for batches of 2..256 rows (bf16: 1..256; 1..32 of them through pensieve's own AMX
        tiles where the CPU has AMX): 1.2-2.3x faster linears at 8-64 rows (measured), for a second copy of the
        weights in memory. Packed when the generator is made: weights changed later are not seen.
    """

    compile: str | bool = "auto"
    compile_prefill: str | bool = "auto"
    cpu_linear: bool = True
    pack_weights: bool = True
    cuda_graphs: bool = True
    cuda_graph_batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)

    def __post_init__(self) -> None:
        _require(
            self.compile == "auto" or isinstance(self.compile, bool),
            f'compile must be "auto", True or False, got {self.compile!r}',
        )
        _require(isinstance(self.cuda_graphs, bool), f"cuda_graphs must be a bool, got {self.cuda_graphs!r}")
        _require(
            self.compile_prefill == "auto" or isinstance(self.compile_prefill, bool),
            f'compile_prefill must be "auto", True or False, got {self.compile_prefill!r}',
        )
        for name in ("cpu_linear", "pack_weights"):
            _require(isinstance(getattr(self, name), bool), f"{name} must be a bool, got {getattr(self, name)!r}")
        sizes = self.cuda_graph_batch_sizes
        _require(
            isinstance(sizes, tuple)
            and sizes
            and all(_is_int(b) and b >= 1 for b in sizes)
            and list(sizes) == sorted(set(sizes)),
            f"cuda_graph_batch_sizes must be a non-empty increasing tuple of ints >= 1, got {sizes!r}",
        )
