"""The engine: one model, its KV cache and the turns running on it (DESIGN §2).

`step()` is three calls: the scheduler picks which turns run and how many tokens each (deciding the cache moves),
the runner computes one forward over all of them, the output processor turns the logits into tokens, stop checks
and replies. Turns come in through `admission.prepare` / `prepare_complete` (pensieve/engine/admission.py: checked
before any state changes) and `admit`; the commands (end, fork, truncate, adopt, abort) ask the cache manager.

Single-threaded by design: `StatefulGenerator` runs it on one thread at a time and hands it commands.
"""

from __future__ import annotations

import dataclasses

import torch

from pensieve.cache.disk import DiskStore, model_fingerprint
from pensieve.cache.manager import KVManager
from pensieve.cache.policy import RecomputeCost, make_policy
from pensieve.cache.tiers import KVStorage
from pensieve.cache.types import Tier
from pensieve.config import CacheConfig, EngineConfig, SchedulerConfig
from pensieve.engine.admission import Admission, Admitter, CompletionId, candidate_ids, require_idle
from pensieve.engine.detokenizer import HoldBack, StopStrings, TextStream
from pensieve.engine.graphs import CompiledForward
from pensieve.engine.output import OutputProcessor
from pensieve.engine.replies import ReplyMemory
from pensieve.engine.runner import ModelRunner, default_num_blocks
from pensieve.engine.scheduler import ScheduledChunk, Scheduler
from pensieve.engine.turn import Candidates, ResolvedSampling, Turn, TurnAborted
from pensieve.models.support import model_shape
from pensieve.ops.quant import QPARAM_BYTES
from pensieve.structured.tools import ChatFormat, tools_key


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
        kv_dtype = cache_config.kv_dtype or param.dtype  # "int8": rows of values + an fp32 scale (ops/quant.py)
        num_blocks = cache_config.num_device_blocks or default_num_blocks(shape, bs, kv_dtype, param.device)
        storage = KVStorage(
            shape.num_layers,
            (bs, shape.num_kv_heads, shape.head_dim + (QPARAM_BYTES if kv_dtype == "int8" else 0)),
            torch.int8 if kv_dtype == "int8" else param.dtype,
            param.device,
            num_blocks,
            cache_config.num_host_blocks,
        )
        disk = None
        if cache_config.disk_dir is not None:
            disk = DiskStore(cache_config.disk_dir, model_fingerprint(model), storage.chunk_shape, storage.dtype)
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
            write_behind_s=cache_config.write_behind_s,
            write_behind_bytes_s=cache_config.write_behind_mb_s * 2**20,
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
        self.admission = Admitter(model, tokenizer, shape, self.kv, ReplyMemory(cache_config.reply_memory_tokens))
        self.output = OutputProcessor(self.kv, self.scheduler, shape.max_positions, self._spawn_candidates)
        self.num_steps = 0

    # ---- admission -------------------------------------------------------------------------------------------

    def admit(self, adm: Admission, on_token=None) -> Turn:
        """Start a turn `admission.prepare` / `prepare_complete` made. Cannot fail; call it right after, on the same
        thread."""
        prev = self.kv.conversations.get(adm.conv_id) if adm.stored else None
        # what begin_turn replaces, for an abort to put back
        before = None if prev is None else (prev.tokens, prev.messages, prev.tools, prev.num_computed)
        conv = self.kv.begin_turn(
            adm.conv_id, adm.tokens, adm.common_prefix, adm.messages, adm.stored, tools_key(adm.tools)
        )
        # a constrained reply ends only complete: stop strings do not cut it (output.OutputProcessor._finish_reason)
        hold_backs = _hold_backs(adm.params) if adm.params.grammar is None else []
        tool_text, kept = None, None
        if adm.tools is not None and adm.tools.parses and self.tokenizer is not None:
            chat = ChatFormat.of(self.tokenizer)
            tool_text = chat.hold_back(forced=adm.tools.forced is not None)  # a call's text is never streamed
            hold_backs.append(tool_text)
            kept = chat.kept_tokens
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
            messages_before=len(before[1]) if before is not None and before[1] is not None else 0,
            generator=None if adm.params.seed is None else self._generator(adm.params.seed),
            text=None if self.tokenizer is None else TextStream(self.tokenizer, hold_backs, adm.reasoning, kept),
            tool_text=tool_text,
            tools=adm.tools,
            logprobs=None if adm.params.logprobs is None else [],
            grammar=None if adm.params.grammar is None else self.admission.grammars.state(adm.params.grammar),
        )
        if adm.params.n > 1:
            turn.group = Candidates(turn)
            if adm.stored:
                self.admission.reserved.update(candidate_ids(adm.conv_id, adm.params.n))
        self.scheduler.add(turn)
        return turn

    def _spawn_candidates(self, first: Turn) -> None:
        """first's prompt is computed and its first token about to be sampled: fork its conversation for candidates
        1 .. n-1 (they share the prompt's full chunks and compute only the partial last one, a whole one when the
        prompt fills its last chunk: the fork samples from its last position) and start them, with seeds seed + i.
        Each is its own turn; they finish together (`Candidates`)."""
        conv, params, group = first.conv, first.sampling, first.group
        ids = candidate_ids(conv.conv_id, params.n) if conv.stored else [None] * (params.n - 1)
        for index, conv_id in enumerate(ids, start=1):
            self.admission.reserved.discard(conv_id)
            if conv_id is None:  # a completion's candidates are completions too
                conv_id = CompletionId(next(self.admission.completions))
            fork = self.kv.fork(conv, conv_id, stored=conv.stored)
            seed = None if params.seed is None else params.seed + index
            adm = Admission(
                conv_id,
                fork.tokens,
                fork.messages,
                dataclasses.replace(params, seed=seed, n=1),
                history_len=len(conv.tokens),
                common_prefix=len(conv.tokens) - 1,  # the last position is computed again: the fork samples from it
                stored=conv.stored,
                tools=first.tools,
                reasoning=None if first.text is None else first.text.reasoning,
            )
            turn = self.admit(adm, first.on_token)
            turn.num_new_tokens, turn.history_kv = first.num_new_tokens, first.history_kv
            turn.before = None  # the fork is this turn's: an abort removes it
            turn.messages_before = len(fork.messages or [])  # the fork's record holds them already
            turn.index, turn.group = index, group
            turn.stop_requested = first.stop_requested  # a stop during the prompt stops every candidate
            group.turns.append(turn)
            assert fork is turn.conv

    # ---- stepping -------------------------------------------------------------------------------------------

    def has_work(self) -> bool:
        return bool(self.scheduler.active)

    def check_integrity(self) -> None:
        """The cache's invariants (`KVManager.check_integrity`) and the scheduler's (running turns stay in place)."""
        self.kv.check_integrity()
        self.scheduler.check_integrity()

    def step(self) -> None:
        """One forward: which turns run and how many tokens each -> the model over all of them -> their outputs."""
        chunks = self._schedule()
        logits = self._run(chunks)
        self.output.process(chunks, logits)
        self.kv.mover.swap_out_ahead()
        self.kv.maintain()

    def idle(self) -> None:
        """Nothing to step: background work that is due (the write-behind)."""
        self.kv.maintain()

    def _schedule(self) -> list[ScheduledChunk]:
        chunks = self.scheduler.schedule()
        if not chunks:
            raise RuntimeError("scheduler found no runnable turn although turns are active (a bug)")
        chunks.sort(key=_first_block)
        return chunks

    def _run(self, chunks: list[ScheduledChunk]) -> torch.Tensor:
        logits = self.runner.run(self.runner.build_plan(chunks))  # [rows that sample, vocab]
        self.kv.mover.after_forward()
        self.num_steps += 1
        return logits

    def _generator(self, seed: int) -> torch.Generator:
        """A seeded turn's own generator, on the device that samples."""
        return torch.Generator(device=self.runner.device).manual_seed(seed)

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
        self.admission.check_free(new_id)
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
        tokens = self.admission.check_token_ids(tokens) if tokens else []
        if messages is not None and not (
            isinstance(messages, list)
            and all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages)
        ):
            raise ValueError(f"messages must be None or a list of chat messages, got {messages!r:.80}")
        self.admission.check_free(conv_id)
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
        turn = next((t for t in self.scheduler.active if _targets(t, target)), None)
        if turn is None:
            return False
        for member in _members(turn):  # every candidate of the turn, running or finished and waiting for the rest
            if member in self.scheduler.active:
                self.scheduler.remove(member)
            conv = member.conv
            if member.before is None:  # a completion, a conversation this turn started, or a candidate's fork
                self.kv.remove(conv.conv_id, forget=member.index > 0 and conv.stored)  # a fork's record goes too
            else:
                tokens, messages, tools, computed = member.before
                self.kv.rewind(conv, tokens, messages, tools, min(member.history_kept, computed))
        self._release(turn)
        first = _members(turn)[0]  # its Future is the caller's
        first.future.set_exception(TurnAborted(f"the turn on {first.conv.conv_id!s} was aborted"))
        return True

    def stop(self, target) -> bool:
        """Cut a running turn short, keeping it: target is its conversation id or its Future. It finishes after its
        next sampled token (the first one, when it is still prefilling: the prompt's KV is then whole) with
        finish_reason "cancelled", as if that token had ended it — its reply, tokens and KV kept, its Future
        resolved. Every candidate of an n > 1 turn stops. -> False if no such turn runs (it finished)."""
        turn = next((t for t in self.scheduler.active if _targets(t, target)), None)
        if turn is None:
            return False
        for member in _members(turn):
            member.stop_requested = True
        return True

    def fail_all(self, error: BaseException) -> None:
        self.kv.settle_copies()  # swap-ins / loads queued for a forward that never ran: land them now
        for turn in list(self.scheduler.active):
            for member in _members(turn):
                if member in self.scheduler.active:
                    self.scheduler.remove(member)
                if member.index > 0:  # a candidate's fork goes, its record too
                    self.kv.remove(member.conv.conv_id, forget=member.conv.stored)
                elif member.conv.pinned:
                    self.kv.abort_turn(member.conv)
            self._release(turn)
            future = _members(turn)[0].future  # the caller's
            if not future.done():
                future.set_exception(error)
        self.kv.mover.after_forward()

    def _release(self, turn: Turn) -> None:
        """The ids reserved for a turn's candidates that it has not forked yet are free again."""
        first = _members(turn)[0]
        if first.conv.stored and first.sampling.n > 1:
            self.admission.reserved.difference_update(candidate_ids(first.conv.conv_id, first.sampling.n))

    def stats(self) -> dict:
        kv = self.kv
        chunks = kv.chunks()
        return {
            "conversations": sum(c.stored for c in kv.conversations.values()),
            "stored_conversations": len(kv.stored_ids()),
            "active_turns": len(self.scheduler.active),
            "max_num_seqs": self.scheduler.max_num_seqs,
            "max_num_batched_tokens": self.scheduler.max_num_batched_tokens,
            "turns_completed": self.output.num_turns,
            "steps": self.num_steps,
            "tokens_computed": self.output.num_tokens_computed,
            "tokens_recomputed": self.output.num_recomputed,
            "block_size": kv.block_size,
            "kv_bytes_per_block": kv.storage.bytes_per_block if kv.storage is not None else 0,
            "kv_dtype": str(kv.storage.dtype).removeprefix("torch.") if kv.storage is not None else None,
            "device_blocks_total": kv.device.num_blocks,
            "device_blocks_free": kv.device.num_free,
            "host_blocks_total": kv.host.num_blocks,
            "host_blocks_free": kv.host.num_free,
            "chunks_by_tier": {t.name.lower(): sum(c.tier == t for c in chunks) for t in Tier},
            "tree_chunks": len(kv.tree),
            "tree_tails": len(kv.tree.tails),
            "shared_chunks": sum(c.refs > 1 for c in chunks),
            "clean_chunks": sum(c.copy is not None for c in chunks),
            "preemptions": self.scheduler.num_preemptions,
            **(compiled.stats() if (compiled := self.runner.compiled) is not None else CompiledForward.NO_STATS),
            "cuda_graphs": len(self.runner.graphs.graphs) if self.runner.graphs is not None else 0,
            **kv.disk_stats(),
            **{name: kv.counters[name] for name in COUNTERS},
        }


# Cumulative cache counters reported by stats() (KVManager.counters).
COUNTERS = (
    "swap_out_chunks",  # device -> host
    "ahead_swap_out_chunks",  # of the moves out of the device, those made ahead of time (watermark)
    "swap_in_chunks",  # host -> device
    "disk_write_chunks",  # device/host -> disk, evicted
    "persisted_chunks",  # device/host chunks also written to disk by end()/close()
    "write_behind_chunks",  # clean disk copies written in the background (CacheConfig.write_behind_s)
    "bytes_written_behind",
    "disk_clean_evictions",  # of disk_write_chunks, those that wrote nothing (the chunk had a clean copy)
    "background_errors",  # background work (the write-behind) that failed and was warned about
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


def _targets(turn: Turn, target) -> bool:
    """Whether abort(target) means turn: target is its Future or conversation id, or one of its candidates'."""
    return any(t.future is target or t.conv.conv_id == target for t in _members(turn))


def _members(turn: Turn) -> list[Turn]:
    """The turns that stand and fall with turn: its candidates when it has several, else itself."""
    return list(turn.group.turns) if turn.group is not None else [turn]


def _first_block(chunk: ScheduledChunk) -> int:
    conv = chunk.turn.conv
    return conv.chunks[0].block if conv.chunks else -1


def _hold_backs(params: ResolvedSampling) -> list[HoldBack]:
    """What may hold back a turn's text: stop strings (tool calls' text: `admit`)."""
    return [StopStrings(params.stop)] if params.stop else []
