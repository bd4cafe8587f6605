"""The engine: admits turns (validating everything before touching any state), steps, postprocesses.

Single-threaded by design: `StatefulGenerator` runs it on one loop thread and hands it commands.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

import torch

from pensieve.cache.disk import DiskStore, model_fingerprint
from pensieve.cache.manager import KVManager
from pensieve.cache.policy import RecomputeCost, make_policy
from pensieve.cache.tiers import KVStorage
from pensieve.cache.tree import common_prefix
from pensieve.cache.types import Tier
from pensieve.config import CacheConfig, EngineConfig, SamplingParams, SchedulerConfig
from pensieve.engine.detokenizer import IncrementalDetokenizer, find_stop
from pensieve.engine.graphs import CompiledForward
from pensieve.engine.runner import ModelRunner, default_num_blocks
from pensieve.engine.sampler import sample
from pensieve.engine.scheduler import ScheduledChunk, Scheduler
from pensieve.engine.turn import Reply, ResolvedSampling, Turn, TurnAborted
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
    stored: bool = True  # False: a `complete()` call: no conversation is kept


@dataclass(frozen=True)
class CompletionId:
    """The id of a `complete()` call's conversation: never a str, so never a caller's conversation id."""

    number: int

    def __str__(self) -> str:
        return f"<completion {self.number}>"


class Engine:
    def __init__(
        self,
        model,
        tokenizer,
        cache_config: CacheConfig,
        scheduler_config: SchedulerConfig,
        engine_config: EngineConfig | None = None,
    ) -> None:
        engine_config = engine_config or EngineConfig()
        self.model = model
        self.tokenizer = tokenizer
        self.shape = shape = model_shape(model)
        param = next(model.parameters())
        bs = cache_config.block_size
        num_blocks = cache_config.num_device_blocks or default_num_blocks(shape, bs, param.dtype, param.device)
        storage = KVStorage(
            shape.num_layers,
            (bs, shape.num_kv_heads, shape.head_dim),
            param.dtype,
            param.device,
            num_blocks,
            cache_config.num_host_blocks,
        )
        disk = None
        if cache_config.disk_dir is not None:
            disk = DiskStore(cache_config.disk_dir, model_fingerprint(model), storage.chunk_shape, param.dtype)
        cost = RecomputeCost.for_model(model, shape.num_layers, shape.num_heads, shape.head_dim)
        self.kv = KVManager(
            num_blocks,
            bs,
            num_host_blocks=cache_config.num_host_blocks,
            policy=make_policy(cache_config.policy, cost, bs),
            storage=storage,
            disk=disk,
            swap_out_watermark=cache_config.swap_out_watermark,
            decode_reserve=cache_config.decode_reserve,
            share_prefixes=cache_config.share_prefixes,
        )
        self.scheduler = Scheduler(self.kv, scheduler_config.max_num_batched_tokens, scheduler_config.max_num_seqs)
        self.runner = ModelRunner(
            model,
            self.kv,
            storage,
            max_tokens=scheduler_config.max_num_batched_tokens,
            max_seqs=scheduler_config.max_num_seqs,
            max_positions=shape.max_positions,
            engine_config=engine_config,
        )
        self.num_steps = 0
        self.num_tokens_computed = 0
        self.num_turns = 0
        self.num_recomputed = 0
        self._completions = itertools.count()

    # ---- admission -------------------------------------------------------------------------------------------

    def prepare(self, conv_id, msg, sampling: SamplingParams | None) -> Admission:
        """Validate a turn and work out everything about it without changing any conversation (ValueError if bad).
        A stored conversation may be loaded from disk into memory on the way: the same state, cached."""
        if not isinstance(conv_id, str) or not conv_id:
            raise ValueError(f"conv_id must be a non-empty str, got {conv_id!r}")
        if sampling is not None and not isinstance(sampling, SamplingParams):
            raise ValueError(f"sampling must be a SamplingParams, got {type(sampling).__name__}")
        params = self._resolve(sampling or SamplingParams())
        loading = conv_id not in self.kv.conversations
        conv = self.kv.lookup(conv_id)
        if conv is not None and conv.pinned:
            raise ValueError(f"conversation {conv_id!r} already has a turn running")
        if loading and conv is not None and conv.tokens and max(conv.tokens) >= self.shape.vocab_size:
            self.kv.remove(conv_id)  # back to stored-only, as before the call
            raise ValueError(
                f"stored conversation {conv_id!r} has token ids outside this model's vocabulary "
                f"({max(conv.tokens)} >= {self.shape.vocab_size}): it was stored by another model"
            )
        tokens, messages = self._render(conv, msg)
        history = conv.tokens if conv is not None else []
        self._check_fits(f"conversation {conv_id!r}", len(tokens), params.max_new_tokens)
        return Admission(conv_id, tokens, messages, params, len(history), common_prefix(history, tokens))

    def prepare_complete(self, prompt, sampling: SamplingParams | None) -> Admission:
        """Validate a stateless completion: `prompt` is token ids, or chat messages rendered with the chat template."""
        if sampling is not None and not isinstance(sampling, SamplingParams):
            raise ValueError(f"sampling must be a SamplingParams, got {type(sampling).__name__}")
        params = self._resolve(sampling or SamplingParams())
        if not isinstance(prompt, (list, tuple)) or not prompt:
            raise ValueError(f"prompt must be a non-empty list of token ids or of chat messages, got {prompt!r:.80}")
        if all(isinstance(m, dict) for m in prompt):
            if self.tokenizer is None:
                raise ValueError("chat messages need a tokenizer: pass tokenizer= or send token ids")
            bad = [m for m in prompt if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str)]
            if bad:
                raise ValueError(f"each chat message needs a str 'role' and 'content', got {bad[0]!r:.80}")
            rendered = self.tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True, return_dict=False)
            tokens = list(rendered)
        else:
            tokens = self._check_token_ids(prompt)
        conv_id = CompletionId(next(self._completions))
        self._check_fits("a completion", len(tokens), params.max_new_tokens)
        return Admission(conv_id, tokens, None, params, 0, 0, stored=False)

    def admit(self, adm: Admission, on_token=None) -> Turn:
        """Start a prepared turn. Cannot fail; call it right after prepare, on the same thread."""
        prev = self.kv.conversations.get(adm.conv_id) if adm.stored else None
        before = None if prev is None else (prev.tokens, prev.messages, prev.num_computed)  # begin_turn replaces them
        conv = self.kv.begin_turn(adm.conv_id, adm.tokens, adm.common_prefix, adm.messages, adm.stored)
        turn = Turn(
            conv=conv,
            sampling=adm.params,
            prompt_len=len(adm.tokens),
            num_new_tokens=max(len(adm.tokens) - adm.history_len, 0),
            history_kept=adm.common_prefix,
            # Earlier turns computed every history position but the last reply token's; those whose KV is gone
            # (dropped) or invalid (the template rewrote them) are recomputed now.
            history_kv=min(max(adm.history_len - 1, 0), len(adm.tokens)),
            on_token=on_token,
            before=before,
            generator=None if adm.params.seed is None else self._generator(adm.params.seed),
            detokenizer=IncrementalDetokenizer(self.tokenizer) if adm.params.stop else None,
        )
        self.scheduler.add(turn)
        return turn

    def _render(self, conv, msg) -> tuple[list[int], list[dict] | None]:
        """The conversation's full token sequence with msg appended, and (text mode) its chat messages."""
        if conv is None:
            return render_turn(self.tokenizer, None, [], None, msg, self._check_token_ids)
        return render_turn(self.tokenizer, conv.conv_id, conv.tokens, conv.messages, msg, self._check_token_ids)

    def _check_token_ids(self, ids) -> list[int]:
        return check_token_ids(ids, self.shape.vocab_size)

    def _check_fits(self, what: str, num_tokens: int, max_new_tokens: int) -> None:
        total = num_tokens + max_new_tokens
        if total > self.shape.max_positions:
            raise ValueError(
                f"{what} would reach {total} tokens ({num_tokens} + max_new_tokens "
                f"{max_new_tokens}), over the model's {self.shape.max_positions} positions"
            )
        if self.kv.blocks_for(total) > self.kv.device.num_blocks:
            raise ValueError(
                f"{what} would need {self.kv.blocks_for(total)} KV blocks for {total} tokens; "
                f"the device pool has {self.kv.device.num_blocks} (CacheConfig.num_device_blocks)"
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

    def check_integrity(self) -> None:
        """The cache's invariants (`KVManager.check_integrity`) and the scheduler's (running turns stay in place)."""
        self.kv.check_integrity()
        self.scheduler.check_integrity()

    def step(self) -> None:
        chunks = self.scheduler.schedule()
        if not chunks:
            raise RuntimeError("scheduler found no runnable turn although turns are active (a bug)")
        chunks.sort(key=_first_block)
        logits = self.runner.run(self.runner.build_plan(chunks))
        self.kv.mover.after_forward()
        self.num_steps += 1
        for chunk in chunks:
            turn = chunk.turn
            self.kv.advance(turn.conv, chunk.num_tokens, recompute=chunk.recompute)
            turn.num_computed += chunk.num_tokens
            if turn.first_token_at is None:
                turn.num_prefilled += chunk.num_tokens
            self.num_tokens_computed += chunk.num_tokens
        sampling_chunks = [c for c in chunks if c.samples]
        tokens = sample(logits, [c.turn for c in sampling_chunks])
        for chunk, token in zip(sampling_chunks, tokens, strict=True):
            self._append(chunk, token)
        self.kv.mover.swap_out_ahead()

    def _append(self, chunk: ScheduledChunk, token: int) -> None:
        turn = chunk.turn
        if turn.first_token_at is None:
            turn.first_token_at = time.perf_counter()
        turn.output.append(token)
        self.kv.append_token(turn.conv, token)
        if turn.on_token is not None:
            turn.on_token(token)
        reason = self._finish_reason(turn, token)
        if reason is not None:
            self._finish(turn, reason)

    def _finish_reason(self, turn: Turn, token: int) -> str | None:
        if token in turn.sampling.stop_token_ids:
            return "stop"
        if turn.detokenizer is not None:  # stop strings: only the new text, and the stops that can end in it
            start = len(turn.detokenizer.text)
            turn.detokenizer.add(token)
            if find_stop(turn.detokenizer.text, turn.sampling.stop, start) is not None:
                return "stop"
        if len(turn.output) >= turn.sampling.max_new_tokens or len(turn.conv.tokens) >= self.shape.max_positions:
            return "length"
        return None

    def _finish(self, turn: Turn, reason: str) -> None:
        self.scheduler.remove(turn)
        conv = turn.conv
        self.num_turns += 1
        self.num_recomputed += turn.num_recomputed
        text = None
        if self.tokenizer is not None:
            text = self._decode(turn.output)
            cut = find_stop(text, turn.sampling.stop)
            text = text if cut is None else text[:cut]
        new_messages = None
        if conv.messages is not None:
            new_messages = [conv.messages[-1], {"role": "assistant", "content": text}]
        self.kv.end_turn(conv, None if new_messages is None else new_messages[-1])
        self.kv.log_turn(conv, turn.history_kept, new_messages)
        restored = turn.restored
        now = time.perf_counter()
        reply = Reply(
            conv_id=conv.conv_id if conv.stored else None,
            token_ids=list(turn.output),
            text=text,
            finish_reason=reason,
            num_new_tokens=turn.num_new_tokens,
            num_reused_device=restored.tokens[Tier.DEVICE],
            num_reused_host=restored.tokens[Tier.HOST],
            num_reused_disk=restored.tokens[Tier.DISK],
            num_recomputed=turn.num_recomputed,
            num_prefilled=turn.num_prefilled,
            ttft_s=(turn.first_token_at or now) - turn.submitted_at,
            latency_s=now - turn.submitted_at,
            num_chunks_device=restored.chunks[Tier.DEVICE],
            num_chunks_host=restored.chunks[Tier.HOST],
            num_chunks_disk=restored.chunks[Tier.DISK],
            num_chunks_dropped=restored.chunks[Tier.DROPPED],
            bytes_swapped_in=restored.bytes_in,
            num_reused_shared=restored.shared,
        )
        if not conv.stored:  # a completion: its full chunks stay in the prompt tree, the conversation goes
            self.kv.remove(conv.conv_id)
        turn.future.set_result(reply)

    def _generator(self, seed: int) -> torch.Generator:
        """A seeded turn's own generator, on the device that samples."""
        return torch.Generator(device=self.runner.device).manual_seed(seed)

    def _decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    # ---- other commands ----------------------------------------------------------------------------------------

    def end(self, conv_id: str, forget: bool = False) -> None:
        """Release a conversation's memory. With a disk tier it stays stored (its KV written to disk) unless forget;
        without one it is gone."""
        if not isinstance(conv_id, str):
            raise ValueError(f"conv_id must be a str, got {conv_id!r}")
        conv = self.kv.conversations.get(conv_id)
        stored = self.kv.is_stored(conv_id)
        if conv is None and not stored:
            raise KeyError(f"no conversation {conv_id!r}")
        if conv is not None and conv.pinned:
            raise ValueError(f"conversation {conv_id!r} has a turn running")
        if conv is not None and not forget:
            self.kv.persist(conv)
        self.kv.remove(conv_id, forget=forget)

    def fork(self, conv_id: str, new_id: str) -> None:
        """Start conversation new_id as a copy of conv_id that shares all of its KV (a branch)."""
        for name, value in (("conv_id", conv_id), ("new_conv_id", new_id)):
            if not isinstance(value, str) or not value:
                raise ValueError(f"{name} must be a non-empty str, got {value!r}")
        if new_id in self.kv.conversations or self.kv.is_stored(new_id):
            raise ValueError(f"conversation {new_id!r} already exists")
        self.kv.fork(self._idle_conversation(conv_id), new_id)

    def truncate(self, conv_id: str, num_tokens: int) -> None:
        """Keep the first num_tokens tokens of a raw-mode conversation (and their KV); the rest is forgotten."""
        if not isinstance(conv_id, str):
            raise ValueError(f"conv_id must be a str, got {conv_id!r}")
        conv = self._idle_conversation(conv_id)
        if conv.messages is not None:
            raise ValueError(f"conversation {conv_id!r} is in text mode: its tokens follow its messages")
        if not isinstance(num_tokens, int) or isinstance(num_tokens, bool) or not 0 <= num_tokens <= len(conv.tokens):
            raise ValueError(f"num_tokens must be an int in [0, {len(conv.tokens)}], got {num_tokens!r}")
        self.kv.cut(conv, num_tokens)

    def adopt(self, conv_id: str, tokens, messages: list[dict] | None) -> None:
        """Make conv_id's history `tokens` (text mode: rendered from chat `messages`), as another instance had it: KV
        for the common prefix with what is here is kept, the rest is found in the prompt tree or computed next turn."""
        if not isinstance(conv_id, str) or not conv_id:
            raise ValueError(f"conv_id must be a non-empty str, got {conv_id!r}")
        tokens = self._check_token_ids(tokens) if tokens else []
        if messages is not None and not (
            isinstance(messages, list)
            and all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages)
        ):
            raise ValueError(f"messages must be None or a list of chat messages, got {messages!r:.80}")
        conv = self.kv.lookup(conv_id)
        if conv is not None and conv.pinned:
            raise ValueError(f"conversation {conv_id!r} has a turn running")
        self.kv.adopt(conv_id, tokens, messages)

    def _idle_conversation(self, conv_id: str):
        """The conversation (loaded from disk if stored there); KeyError if none, ValueError if a turn runs on it."""
        conv = self.kv.lookup(conv_id)
        return require_idle(conv_id, conv, conv is not None and conv.pinned)

    def conversations(self) -> list[str]:
        return sorted({c for c in self.kv.conversations if isinstance(c, str)} | self.kv.stored_ids())

    def close(self) -> None:
        """Write every stored conversation's device and host KV to disk and release the disk_dir."""
        self.kv.close()

    def abort(self, target) -> bool:
        """Stop a turn that has not finished: target is its conversation id or the Future its caller holds. None of
        the turn is kept: the conversation is as it was before it (tokens, messages, and the KV of the history the
        turn kept; what the turn computed past that is released), a conversation the turn started is removed, and
        the turn's Future raises TurnAborted. -> False if no such turn runs (it finished, or never started)."""
        turn = next((t for t in self.scheduler.active if t.future is target or t.conv.conv_id == target), None)
        if turn is None:
            return False
        self.scheduler.remove(turn)
        conv = turn.conv
        if turn.before is None:  # a completion, or a conversation this turn started
            self.kv.remove(conv.conv_id)
        else:
            tokens, messages, computed = turn.before
            self.kv.rewind(conv, tokens, messages, min(turn.history_kept, computed))
        turn.future.set_exception(TurnAborted(f"the turn on {conv.conv_id!s} was aborted"))
        return True

    def fail_all(self, error: BaseException) -> None:
        self.runner.storage.cancel_queued()
        for turn in list(self.scheduler.active):
            self.scheduler.remove(turn)
            self.kv.abort_turn(turn.conv)
            if not turn.future.done():
                turn.future.set_exception(error)
        self.kv.mover.after_forward()

    def stats(self) -> dict:
        kv = self.kv
        chunks = kv.chunks()
        return {
            "conversations": sum(c.stored for c in kv.conversations.values()),
            "stored_conversations": len(kv.stored_ids()),
            "active_turns": len(self.scheduler.active),
            "turns_completed": self.num_turns,
            "steps": self.num_steps,
            "tokens_computed": self.num_tokens_computed,
            "tokens_recomputed": self.num_recomputed,
            "block_size": kv.block_size,
            "device_blocks_total": kv.device.num_blocks,
            "device_blocks_free": kv.device.num_free,
            "host_blocks_total": kv.host.num_blocks,
            "host_blocks_free": kv.host.num_free,
            "chunks_by_tier": {t.name.lower(): sum(c.tier == t for c in chunks) for t in Tier},
            "tree_chunks": len(kv.tree),
            "tree_tails": len(kv.tree.tails),
            "shared_chunks": sum(c.refs > 1 for c in chunks),
            "preemptions": self.scheduler.num_preemptions,
            **(compiled.stats() if (compiled := self.runner.compiled) is not None else CompiledForward.NO_STATS),
            "cuda_graphs": len(self.runner.graphs.graphs) if self.runner.graphs is not None else 0,
            **kv.disk_errors(),
            **{name: kv.counters[name] for name in COUNTERS},
        }


# Cumulative cache counters reported by stats() (KVManager.counters).
COUNTERS = (
    "swap_out_chunks",  # device -> host
    "ahead_swap_out_chunks",  # of the moves out of the device, those made ahead of time (watermark)
    "swap_in_chunks",  # host -> device
    "disk_write_chunks",  # device/host -> disk, evicted
    "persisted_chunks",  # device/host chunks also written to disk by end()/close()
    "disk_read_chunks",  # disk -> device
    "disk_chunks_bad",  # disk chunks that failed to load (recomputed)
    "dropped_chunks",  # moved to "dropped"
    "recompute_chunks",  # dropped chunks recomputed by a turn
    "preempted_conversations",
    "bytes_swapped_out",
    "bytes_swapped_in",
    "bytes_written_disk",
    "shared_tokens_reused",  # history positions turns found in chunks another conversation computed or holds
    "received_chunks",  # chunks written by a transfer from another instance (MemPool.receive)
    "inserted_chunks",  # chunks indexed by MemPool.insert (received ones included)
)


def require_idle(conv_id: str, conv, running: bool):
    """conv, unless there is none (KeyError) or a turn runs on it (ValueError): the errors every API gives."""
    if conv is None:
        raise KeyError(f"no conversation {conv_id!r}")
    if running:
        raise ValueError(f"conversation {conv_id!r} has a turn running")
    return conv


def check_token_ids(ids, vocab: int) -> list[int]:
    if not isinstance(ids, (list, tuple)):
        raise ValueError(f"token ids must be a list of ints, got {type(ids).__name__}")
    bad = [t for t in ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab]
    if bad:
        raise ValueError(f"token ids must be ints in [0, {vocab}): got {bad[:5]}")
    return list(ids)


def render_turn(tokenizer, conv_id, history: list[int], messages, msg, check_ids) -> tuple[list[int], list | None]:
    """A conversation's token sequence (`history`; text mode: rendered from chat `messages`) with msg appended: a
    str is a user turn through the chat template, a list of ids is appended raw. -> (tokens, messages or None).
    ValueError names what is wrong; the cluster's driver renders with it too, so both reject alike."""
    text_mode = messages is not None
    if isinstance(msg, str):
        if tokenizer is None:
            raise ValueError("a str message needs a tokenizer: pass tokenizer= or send token ids")
        if not msg:
            raise ValueError("message is empty")
        if history and not text_mode:
            raise ValueError(f"conversation {conv_id!r} is in raw token mode; send token ids")
        new_messages = [*(messages if text_mode else []), {"role": "user", "content": msg}]
        rendered = tokenizer.apply_chat_template(new_messages, add_generation_prompt=True, return_dict=False)
        return list(rendered), new_messages
    if not isinstance(msg, (list, tuple)) or not msg:
        raise ValueError(f"message must be a non-empty str or list of token ids, got {msg!r:.80}")
    if text_mode:
        raise ValueError(f"conversation {conv_id!r} is in text mode; send a str")
    return [*history, *check_ids(msg)], None


def _first_block(chunk: ScheduledChunk) -> int:
    conv = chunk.turn.conv
    return conv.chunks[0].block if conv.chunks else -1
