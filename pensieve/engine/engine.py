"""The engine: admits turns (validating everything before touching any state), steps, postprocesses.

Single-threaded by design: `StatefulGenerator` runs it on one loop thread and hands it commands.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from pensieve.cache.manager import KVManager
from pensieve.config import CacheConfig, SamplingParams, SchedulerConfig
from pensieve.engine.runner import ModelRunner, default_num_blocks
from pensieve.engine.sampler import sample
from pensieve.engine.scheduler import ScheduledChunk, Scheduler
from pensieve.engine.turn import Reply, ResolvedSampling, Turn
from pensieve.models.support import model_shape

DEFAULT_MAX_NEW_TOKENS = 256


@dataclass(frozen=True)
class Admission:
    """A validated turn, not yet started."""

    conv_id: str
    tokens: list[int]  # the conversation's whole token sequence once the message is appended
    messages: list[dict] | None  # text mode: the chat messages that rendered `tokens`
    params: ResolvedSampling
    history_len: int
    common_prefix: int  # tokens shared by the stored history and `tokens`


class Engine:
    def __init__(self, model, tokenizer, cache_config: CacheConfig, scheduler_config: SchedulerConfig) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.shape = model_shape(model)
        param = next(model.parameters())
        num_blocks = cache_config.num_device_blocks or default_num_blocks(
            self.shape, cache_config.block_size, param.dtype, param.device
        )
        self.kv = KVManager(num_blocks, cache_config.block_size)
        self.scheduler = Scheduler(self.kv, scheduler_config.max_num_batched_tokens, scheduler_config.max_num_seqs)
        self.runner = ModelRunner(model, self.shape, self.kv, param.dtype)
        self.text_history: dict[str, list[dict]] = {}  # conv_id -> chat messages, text-mode conversations only
        self.num_steps = 0
        self.num_tokens_computed = 0
        self.num_turns = 0

    # ---- admission -------------------------------------------------------------------------------------------

    def prepare(self, conv_id, msg, sampling: SamplingParams | None) -> Admission:
        """Validate a turn and work out everything about it without changing any state (ValueError if bad)."""
        if not isinstance(conv_id, str) or not conv_id:
            raise ValueError(f"conv_id must be a non-empty str, got {conv_id!r}")
        if sampling is not None and not isinstance(sampling, SamplingParams):
            raise ValueError(f"sampling must be a SamplingParams, got {type(sampling).__name__}")
        params = self._resolve(sampling or SamplingParams())
        conv = self.kv.conversations.get(conv_id)
        if conv is not None and conv.pinned:
            raise ValueError(f"conversation {conv_id!r} already has a turn running")
        history = conv.tokens if conv is not None else []
        tokens, messages = self._render(conv_id, history, msg)
        self._check_fits(conv_id, len(tokens), params.max_new_tokens)
        return Admission(conv_id, tokens, messages, params, len(history), _common_prefix(history, tokens))

    def admit(self, adm: Admission, on_token=None) -> Turn:
        """Start a prepared turn. Cannot fail; call it right after prepare, on the same thread."""
        conv = self.kv.conversation(adm.conv_id)
        self.kv.truncate_kv(conv, adm.common_prefix)  # never reuse KV of tokens that differ
        conv.tokens = adm.tokens
        conv.pinned = True
        if adm.messages is not None:
            self.text_history[adm.conv_id] = adm.messages
        # Earlier turns computed every history position but the last reply token's. Positions among those whose KV
        # is gone (evicted) or invalid (the template rewrote them) are recomputed now.
        history_kv = min(max(adm.history_len - 1, 0), len(adm.tokens))
        turn = Turn(
            conv=conv,
            sampling=adm.params,
            prompt_len=len(adm.tokens),
            num_new_tokens=max(len(adm.tokens) - adm.history_len, 0),
            num_reused=conv.num_computed,
            num_missing_history=history_kv - conv.num_computed,
            on_token=on_token,
            generator=None if adm.params.seed is None else torch.Generator().manual_seed(adm.params.seed),
        )
        self.scheduler.add(turn)
        return turn

    def _render(self, conv_id: str, history: list[int], msg) -> tuple[list[int], list[dict] | None]:
        """The conversation's full token sequence with msg appended, and (text mode) its chat messages."""
        if isinstance(msg, str):
            if self.tokenizer is None:
                raise ValueError("a str message needs a tokenizer: pass tokenizer= or send token ids")
            if not msg:
                raise ValueError("message is empty")
            if history and conv_id not in self.text_history:
                raise ValueError(f"conversation {conv_id!r} is in raw token mode; send token ids")
            messages = [*self.text_history.get(conv_id, []), {"role": "user", "content": msg}]
            rendered = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
            return list(rendered), messages
        if not isinstance(msg, (list, tuple)) or not msg:
            raise ValueError(f"message must be a non-empty str or list of token ids, got {msg!r:.80}")
        if conv_id in self.text_history:
            raise ValueError(f"conversation {conv_id!r} is in text mode; send a str")
        vocab = self.shape.vocab_size
        bad = [t for t in msg if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab]
        if bad:
            raise ValueError(f"token ids must be ints in [0, {vocab}): got {bad[:5]}")
        return [*history, *msg], None

    def _check_fits(self, conv_id: str, num_tokens: int, max_new_tokens: int) -> None:
        total = num_tokens + max_new_tokens
        if total > self.shape.max_positions:
            raise ValueError(
                f"conversation {conv_id!r} would reach {total} tokens ({num_tokens} + max_new_tokens "
                f"{max_new_tokens}), over the model's {self.shape.max_positions} positions"
            )
        if self.kv.blocks_for(total) > self.kv.pool.num_blocks:
            raise ValueError(
                f"conversation {conv_id!r} would need {self.kv.blocks_for(total)} KV blocks for {total} tokens; "
                f"the device pool has {self.kv.pool.num_blocks} (CacheConfig.num_device_blocks)"
            )

    def _resolve(self, sp: SamplingParams) -> ResolvedSampling:
        gc = getattr(self.model, "generation_config", None)
        do_sample = bool(getattr(gc, "do_sample", False))

        def default(value, name, fallback):
            if value is not None:
                return value
            from_model = getattr(gc, name, None)
            return fallback if from_model is None else from_model

        temperature = (
            sp.temperature if sp.temperature is not None else (default(None, "temperature", 1.0) if do_sample else 0.0)
        )
        stop_ids = set(sp.stop_token_ids)
        if not sp.ignore_eos:
            stop_ids |= self._eos_ids()
        if sp.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer")
        return ResolvedSampling(
            max_new_tokens=default(sp.max_new_tokens, "max_new_tokens", DEFAULT_MAX_NEW_TOKENS),
            temperature=float(temperature),
            top_k=int(default(sp.top_k, "top_k", 0)),
            top_p=float(default(sp.top_p, "top_p", 1.0)),
            seed=sp.seed,
            stop_token_ids=frozenset(stop_ids),
            stop=tuple(sp.stop),
        )

    def _eos_ids(self) -> set[int]:
        gc = getattr(self.model, "generation_config", None)
        eos = getattr(gc, "eos_token_id", None)
        if eos is None and self.tokenizer is not None:
            eos = self.tokenizer.eos_token_id
        if eos is None:
            return set()
        return {eos} if isinstance(eos, int) else set(eos)

    # ---- stepping -------------------------------------------------------------------------------------------

    def has_work(self) -> bool:
        return bool(self.scheduler.active)

    def step(self) -> None:
        chunks = self.scheduler.schedule()
        if not chunks:
            raise RuntimeError("scheduler found no runnable turn although turns are active (a bug)")
        logits = self.runner.run(self.runner.build_plan(chunks))
        self.num_steps += 1
        for chunk in chunks:
            turn = chunk.turn
            turn.conv.num_computed += chunk.num_tokens
            turn.num_computed += chunk.num_tokens
            if turn.first_token_at is None:
                turn.num_prefilled += chunk.num_tokens
            self.num_tokens_computed += chunk.num_tokens
        sampling_chunks = [c for c in chunks if c.samples]
        tokens = sample(logits, [c.turn for c in sampling_chunks])
        for chunk, token in zip(sampling_chunks, tokens, strict=True):
            self._append(chunk, token)

    def _append(self, chunk: ScheduledChunk, token: int) -> None:
        turn = chunk.turn
        if turn.first_token_at is None:
            turn.first_token_at = time.perf_counter()
        turn.output.append(token)
        turn.conv.tokens.append(token)
        if turn.on_token is not None:
            turn.on_token(token)
        reason = self._finish_reason(turn, token)
        if reason is not None:
            self._finish(turn, reason)

    def _finish_reason(self, turn: Turn, token: int) -> str | None:
        if token in turn.sampling.stop_token_ids:
            return "stop"
        if turn.sampling.stop and _find_stop(self._decode(turn.output), turn.sampling.stop) is not None:
            return "stop"
        if len(turn.output) >= turn.sampling.max_new_tokens or len(turn.conv.tokens) >= self.shape.max_positions:
            return "length"
        return None

    def _finish(self, turn: Turn, reason: str) -> None:
        self.scheduler.remove(turn)
        conv = turn.conv
        conv.pinned = False
        conv.last_active = time.monotonic()
        self.num_turns += 1
        text = None
        if self.tokenizer is not None:
            text = self._decode(turn.output)
            cut = _find_stop(text, turn.sampling.stop)
            text = text if cut is None else text[:cut]
        if conv.conv_id in self.text_history:
            self.text_history[conv.conv_id].append({"role": "assistant", "content": text})
        now = time.perf_counter()
        reply = Reply(
            conv_id=conv.conv_id,
            token_ids=list(turn.output),
            text=text,
            finish_reason=reason,
            num_new_tokens=turn.num_new_tokens,
            num_reused_device=turn.num_reused,
            num_reused_host=0,
            num_reused_disk=0,
            num_recomputed=turn.num_recomputed,
            num_prefilled=turn.num_prefilled,
            ttft_s=(turn.first_token_at or now) - turn.submitted_at,
            latency_s=now - turn.submitted_at,
        )
        turn.future.set_result(reply)

    def _decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    # ---- other commands ----------------------------------------------------------------------------------------

    def end(self, conv_id: str) -> None:
        conv = self.kv.conversations.get(conv_id)
        if conv is None:
            raise KeyError(f"no conversation {conv_id!r}")
        if conv.pinned:
            raise ValueError(f"conversation {conv_id!r} has a turn running")
        self.kv.remove(conv_id)
        self.text_history.pop(conv_id, None)

    def fail_all(self, error: BaseException) -> None:
        for turn in list(self.scheduler.active):
            self.scheduler.remove(turn)
            turn.conv.pinned = False
            self.kv.drop_kv(turn.conv)
            if not turn.future.done():
                turn.future.set_exception(error)

    def stats(self) -> dict:
        return {
            "conversations": len(self.kv.conversations),
            "active_turns": len(self.scheduler.active),
            "turns_completed": self.num_turns,
            "steps": self.num_steps,
            "tokens_computed": self.num_tokens_computed,
            "device_blocks_total": self.kv.pool.num_blocks,
            "device_blocks_free": self.kv.pool.num_free,
            "block_size": self.kv.block_size,
            "evictions": self.kv.num_evictions,
            "evicted_tokens": self.kv.num_evicted_tokens,
            "preemptions": self.scheduler.num_preemptions,
        }


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _find_stop(text: str, stops: tuple[str, ...]) -> int | None:
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None
