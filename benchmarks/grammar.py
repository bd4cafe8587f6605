"""Grammar-constrained decoding on CPU: xgrammar vs llguidance with SmolLM2-Instruct's tokenizer (49,152 tokens).

For three JSON schemas (json_object: any object; nested: an object with arrays, enums, a pattern and nested
objects; tool_call: a forced get_weather call) and each library, this measures:
  compile   cold: schema -> a grammar ready for matchers, on a fresh compiler (xgrammar: a new GrammarCompiler,
            its cache empty; llguidance: grammar_from_json_schema + a new LLMatcher). first mask: the first
            bitmask of a new matcher on that grammar (llguidance builds its lexer lazily, there). warm: what a
            request with a schema seen before costs: xgrammar compiles it again (a hit in the compiler's cache)
            and makes a GrammarMatcher; llguidance has no compile cache: the engine keeps the first LLMatcher as
            a prototype and deep_copy()s it.
  per step  the work between two forwards for a batch of B matchers (B independent matchers fed the same
            document): fill every row's next-token bitmask, apply it to the [B, vocab] fp32 logits, advance every
            matcher by the token. The matchers follow a hand-written valid document of the schema (tokenized by
            SmolLM2's tokenizer) and then EOS; µs per step averaged over its tokens, median over --reps passes,
            each with new matchers from the reused grammar. At B = 1 the single-matcher calls; at B > 1 each
            library's batch calls (xgrammar BatchGrammarMatcher, llguidance LLExecutor's
            fill_next_token_bitmask_par / consume_token_par) with each of --threads threads. apply: xgrammar's
            CPU kernel (apply_token_bitmask_inplace) for both libraries (llguidance's torch apply is
            torch.compile'd); "unpacked": numpy's unpackbits + torch.where, timed on the same masks, for
            comparison. "fresh": the first pass at B = 1 on a grammar just compiled.
  step      one unconstrained decode step of SmolLM2 fp32 on pensieve's StatefulGenerator (decode.py's
            bench_pensieve, --context tokens per conversation; compiled, the CPU default, and eager): the
            per-step mask work as % of the compiled step of the same batch.
Before timing, both libraries step through each document side by side and the benchmark asserts: every token is
allowed by its mask and accepted, no special token of SmolLM2 (<|endoftext|>, <|im_start|>, <repo_name>...) is
ever allowed, the matcher can end before EOS and has ended after it, both applies keep exactly the mask's tokens.
It records how many tokens the two libraries' masks disagree on. xgrammar compiles with strict_mode=False, JSON
Schema's meaning as in llguidance (--xgrammar-strict: its default, no properties beyond the schema's). JSON + PNG.

Usage: python benchmarks/grammar.py [--batches 1,16] [--threads 1,2] [--reps 5] [--compile-reps 5] [--no-step]
                                    [--xgrammar-strict] [--out results/grammar.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from importlib.metadata import version
from pathlib import Path
from types import SimpleNamespace

import llguidance
import llguidance.hf
import llguidance.torch as llgt
import numpy as np
import torch
import xgrammar as xgr
from plotting import cpu_name, pyplot, save, write_results
from tqdm import tqdm

from pensieve.config import StructuredOutput
from pensieve.models.smollm2 import load_smollm2
from pensieve.structured.grammar import Grammars, special_ids, tokenizer_info

ROOT = Path(__file__).resolve().parents[1]
NEG_INF = torch.tensor(float("-inf"))

# Anchored: JSON Schema's "pattern" is a search (llguidance compiles "[0-9]{5}" as any string holding five digits,
# xgrammar as exactly five digits); "^...$" means the same to both.
NESTED = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b", "c"]}},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"],
        },
        "items": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"id": {"type": "integer"}, "qty": {"type": "number"}},
                "required": ["id", "qty"],
            },
        },
    },
    "required": ["name", "tags", "address", "items"],
    "additionalProperties": False,
}
TOOL_CALL = {
    "type": "object",
    "properties": {
        "name": {"const": "get_weather"},
        "arguments": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "arguments"],
    "additionalProperties": False,
}
# name -> (schema, a valid document as a model would write it: properties in the schema's order, ", " and ": ")
SCHEMAS = {
    "json_object": (
        {"type": "object"},
        '{"id": 48213, "title": "Quarterly report", "draft": false, "score": 0.87, "owner": null, '
        '"labels": ["finance", "q3", "internal"], "meta": {"created": "2024-09-30T12:00:00Z", "pages": 14, '
        '"reviewers": [{"name": "Ana", "approved": true}, {"name": "Ben", "approved": false}]}, '
        '"summary": "Revenue grew 12% year over year; costs were flat."}',
    ),
    "nested": (
        NESTED,
        '{"name": "Acme Widgets", "tags": ["a", "c", "b", "a"], "address": {"city": "Springfield", '
        '"zip": "49007"}, "items": [{"id": 1, "qty": 2.5}, {"id": 17, "qty": 10}, {"id": 302, "qty": 0.75}, '
        '{"id": 4096, "qty": 1e3}]}',
    ),
    "tool_call": (TOOL_CALL, '{"name": "get_weather", "arguments": {"city": "San Francisco", "unit": "celsius"}}'),
}
PARTS = ("fill", "apply", "accept", "apply_unpacked")


class XGrammar:
    name = "xgrammar"

    def __init__(self, tokenizer, vocab: int, threads: list[int], strict: bool) -> None:
        t0 = time.perf_counter()
        self.info = tokenizer_info(tokenizer, vocab, [tokenizer.eos_token_id])  # pensieve's: specials blanked
        self.setup_s = time.perf_counter() - t0
        self.compile_threads = max(threads)
        self.strict = strict
        self.batchers = {t: xgr.BatchGrammarMatcher(max_threads=t) for t in threads}
        self.compiler = self.new_compiler()

    def new_compiler(self) -> xgr.GrammarCompiler:
        return xgr.GrammarCompiler(self.info, max_threads=self.compile_threads)

    def compile(self, compiler: xgr.GrammarCompiler, schema: str) -> xgr.CompiledGrammar:
        # any_whitespace=True (like llguidance's default); strict_mode=False: JSON Schema's meaning, as llguidance
        return compiler.compile_json_schema(schema, strict_mode=self.strict)

    def cold(self, schema: str):
        """-> (seconds to compile on a fresh compiler, the grammar)."""
        compiler = self.new_compiler()
        t0 = time.perf_counter()
        grammar = self.compile(compiler, schema)
        return time.perf_counter() - t0, grammar

    def warm(self, schema: str) -> tuple[float, float]:
        """-> (seconds to compile again, a hit in the compiler's cache; seconds to make a matcher)."""
        self.compile(self.compiler, schema)  # the first time: fills the cache
        t0 = time.perf_counter()
        grammar = self.compile(self.compiler, schema)
        t1 = time.perf_counter()
        xgr.GrammarMatcher(grammar)
        return t1 - t0, time.perf_counter() - t1

    @staticmethod
    def matchers(grammar: xgr.CompiledGrammar, n: int) -> list:
        return [xgr.GrammarMatcher(grammar) for _ in range(n)]

    def fill(self, matchers: list, bitmask: torch.Tensor, threads: int = 1) -> None:
        if len(matchers) == 1:
            matchers[0].fill_next_token_bitmask(bitmask, 0)
        else:
            self.batchers[threads].batch_fill_next_token_bitmask(matchers, bitmask)

    @staticmethod
    def accept(matchers: list, token: int, threads: int = 1) -> bool:
        if len(matchers) == 1:
            return matchers[0].accept_token(token)
        return all(xgr.BatchGrammarMatcher.batch_accept_token(matchers, [token] * len(matchers)))

    @staticmethod
    def can_end(m) -> bool:
        return m.is_completed()

    @staticmethod
    def ended(m) -> bool:
        return m.is_terminated()


class LLGuidance:
    name = "llguidance"

    def __init__(self, tokenizer, vocab: int, threads: list[int]) -> None:
        t0 = time.perf_counter()
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab)
        self.setup_s = time.perf_counter() - t0
        self.executors = {t: llguidance.LLExecutor(num_threads=t) for t in threads}
        self.prototypes: dict[str, llguidance.LLMatcher] = {}

    def compile(self, schema: str) -> llguidance.LLMatcher:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema)  # whitespace_flexible by default
        matcher = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)
        assert not matcher.is_error(), matcher.get_error()
        return matcher

    def cold(self, schema: str):
        t0 = time.perf_counter()
        grammar = self.compile(schema)
        return time.perf_counter() - t0, grammar

    def warm(self, schema: str) -> tuple[None, float]:
        """No compile cache: (None, seconds to deep-copy the kept prototype)."""
        if schema not in self.prototypes:
            self.prototypes[schema] = self.compile(schema)
        t0 = time.perf_counter()
        self.prototypes[schema].deep_copy()
        return None, time.perf_counter() - t0

    @staticmethod
    def matchers(proto: llguidance.LLMatcher, n: int) -> list:
        return [proto.deep_copy() for _ in range(n)]

    def fill(self, matchers: list, bitmask: torch.Tensor, threads: int = 1) -> None:
        if len(matchers) == 1:
            llgt.fill_next_token_bitmask(matchers[0], bitmask, 0)
        else:
            rows = [(m, i) for i, m in enumerate(matchers)]
            llgt.fill_next_token_bitmask_par(self.executors[threads], rows, bitmask)

    def accept(self, matchers: list, token: int, threads: int = 1) -> bool:
        if len(matchers) == 1:
            return matchers[0].consume_token(token)
        return all(llgt.consume_token_par(self.executors[threads], [(m, token) for m in matchers]))

    @staticmethod
    def can_end(m) -> bool:
        return m.is_accepting()

    @staticmethod
    def ended(m) -> bool:
        return m.is_stopped() and not m.is_error()


def apply_unpacked(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """The bitmask applied another way: numpy unpacks the bits to bools, torch.where keeps the allowed logits."""
    bits = np.unpackbits(bitmask.numpy().view(np.uint8), axis=1, count=logits.shape[1], bitorder="little")
    torch.where(torch.from_numpy(bits.view(np.bool_)), logits, NEG_INF, out=logits)


def allowed(bitmask: torch.Tensor, row: int, vocab: int) -> np.ndarray:
    return np.unpackbits(bitmask[row].numpy().view(np.uint8), count=vocab, bitorder="little").astype(bool)


def verify(libs: list, grammars: dict, tokens: list[int], eos: int, specials: list[int], vocab: int) -> dict:
    """Step both libraries through the document (then EOS) side by side, asserting what the docstring says.
    -> how many tokens their masks disagree on (max and mean over the steps) and how many each allows."""
    matchers = {lib.name: lib.matchers(grammars[lib.name], 1)[0] for lib in libs}
    bitmask = xgr.allocate_token_bitmask(1, vocab)
    logits, other = torch.zeros(1, vocab), torch.zeros(1, vocab)
    forbidden = [s for s in specials if s != eos]
    diffs, counts = [], {lib.name: [] for lib in libs}
    for step, token in enumerate(tokens + [eos]):
        masks = {}
        for lib in libs:
            m = matchers[lib.name]
            lib.fill([m], bitmask)
            mask = masks[lib.name] = allowed(bitmask, 0, vocab)
            where = f"{lib.name}, step {step}, token {token}"
            assert mask[token], f"{where}: not allowed by the mask"
            assert not mask[forbidden].any(), f"{where}: special tokens allowed: {np.flatnonzero(mask[forbidden])}"
            logits.zero_()
            other.zero_()
            xgr.apply_token_bitmask_inplace(logits, bitmask)
            apply_unpacked(other, bitmask)
            assert torch.equal(torch.isfinite(logits[0]), torch.from_numpy(mask)), f"{where}: apply != mask"
            assert torch.equal(logits, other), f"{where}: the two applies differ"
            if token == eos:
                assert lib.can_end(m), f"{where}: cannot end at EOS"
            assert lib.accept([m], token), f"{where}: not accepted"
            counts[lib.name].append(int(mask.sum()))
        a, b = masks.values()
        diffs.append(int((a != b).sum()))
    for lib in libs:
        assert lib.ended(matchers[lib.name]), f"{lib.name}: not ended after EOS"
    return {
        "mask_diff_max": max(diffs),
        "mask_diff_mean": statistics.fmean(diffs),
        "mask_diff_steps": sum(d > 0 for d in diffs),
        **{f"allowed_mean_{name}": statistics.fmean(c) for name, c in counts.items()},
    }


def run_pass(lib, grammar, tokens: list[int], batch: int, threads: int, vocab: int, base: torch.Tensor) -> dict:
    """One pass of `batch` new matchers through the tokens: µs per step of fill, apply, accept, apply_unpacked."""
    matchers = lib.matchers(grammar, batch)
    bitmask = xgr.allocate_token_bitmask(batch, vocab)
    logits, other = torch.empty(batch, vocab), torch.empty(batch, vocab)
    fill = apply = accept = unpacked = 0.0
    for token in tokens:
        other.copy_(base[:batch])  # the forward's fresh logits: not timed
        logits.copy_(base[:batch])
        t0 = time.perf_counter()
        lib.fill(matchers, bitmask, threads)
        t1 = time.perf_counter()
        xgr.apply_token_bitmask_inplace(logits, bitmask)
        t2 = time.perf_counter()
        ok = lib.accept(matchers, token, threads)
        t3 = time.perf_counter()
        apply_unpacked(other, bitmask)
        t4 = time.perf_counter()
        assert ok, f"{lib.name}: token {token} not accepted"
        fill, apply, accept, unpacked = fill + t1 - t0, apply + t2 - t1, accept + t3 - t2, unpacked + t4 - t3
    n = len(tokens) / 1e6
    return {"fill": fill / n, "apply": apply / n, "accept": accept / n, "apply_unpacked": unpacked / n}


def pensieve_pass(grammars, compiled, tokens: list[int], batch: int, base: torch.Tensor) -> float:
    """pensieve's own per-step work (what its sampler runs: `Grammars.mask` over the batch's rows, then each
    state's accept), one document through `batch` fresh states -> µs per step, averaged over the tokens."""
    states = [grammars.state(compiled) for _ in range(batch)]
    rows = list(range(batch))
    total = 0.0
    for token in tokens:
        logits = base[:batch].clone()
        t0 = time.perf_counter()
        grammars.mask(logits, rows, states)
        for state in states:
            state.accept(token)
        total += time.perf_counter() - t0
    return total / len(tokens) * 1e6


def decode_steps(model, batches: list[int], args) -> dict[int, dict]:
    """ms per unconstrained decode step by batch: decode.py's bench_pensieve ({"compiled": ms, "eager": ms})."""
    from decode import bench_pensieve

    from pensieve import CacheConfig, EngineConfig, SchedulerConfig, StatefulGenerator

    most = max(batches) * (args.context + (args.step_reps + 1) * 2 * (args.step_steps + 1) + 16)
    cache = CacheConfig(block_size=16, num_device_blocks=most // 16 + 64)
    sched = SchedulerConfig(max_num_batched_tokens=2048, max_num_seqs=max(64, max(batches)))
    ns = SimpleNamespace(steps=args.step_steps, reps=args.step_reps, device="cpu")
    engine = EngineConfig(compile=True)
    with StatefulGenerator(model, cache_config=cache, scheduler_config=sched, engine_config=engine) as gen:
        return {b: bench_pensieve(gen, b, args.context, ns) for b in tqdm(batches, desc="decode step")}


def config_key(batch: int, threads: int) -> str:
    return f"b{batch}" if batch == 1 else f"b{batch}t{threads}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--threads", default=",".join(str(t) for t in sorted({1, os.cpu_count() or 1})),
                        help="the libraries' batch threads at batch > 1 (each measured)")  # fmt: skip
    parser.add_argument("--reps", type=int, default=5, help="passes through each document (median)")
    parser.add_argument("--compile-reps", type=int, default=5, help="cold and warm compiles per schema (median)")
    parser.add_argument("--xgrammar-strict", action="store_true",
                        help="xgrammar's default strict_mode (no properties beyond the schema's, as if every object "
                             "had additionalProperties: false); off: JSON Schema's meaning, as llguidance")  # fmt: skip
    parser.add_argument("--context", type=int, default=256, help="decode step: tokens in each conversation")
    parser.add_argument("--step-steps", type=int, default=16, help="decode step: steps per measured turn")
    parser.add_argument("--step-reps", type=int, default=3, help="decode step: measured turns (median)")
    parser.add_argument("--no-step", action="store_true", help="skip the decode step (no %% of a step)")
    parser.add_argument("--out", default=str(ROOT / "results" / "grammar.json"))
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    threads = [int(t) for t in args.threads.split(",")]
    configs = [(b, t) for b in batches for t in (threads if b > 1 else [1])]

    load = os.getloadavg()[0]  # before this process's work: other work on the machine skews every number
    model, tokenizer = load_smollm2(torch.float32)
    vocab = model.config.vocab_size
    eos = tokenizer.eos_token_id
    libs = [XGrammar(tokenizer, vocab, threads, args.xgrammar_strict), LLGuidance(tokenizer, vocab, threads)]
    docs = {name: tokenizer.encode(doc, add_special_tokens=False) + [eos] for name, (_, doc) in SCHEMAS.items()}
    schemas = {name: json.dumps(schema) for name, (schema, _) in SCHEMAS.items()}
    base = torch.randn(max(batches), vocab, generator=torch.Generator().manual_seed(0))

    rows = {(lib.name, name): {"library": lib.name, "schema": name, "tokens": len(docs[name])}
            for lib in libs for name in SCHEMAS}  # fmt: skip
    grammars: dict[str, dict] = {name: {} for name in SCHEMAS}
    checks = {}
    for name, schema in tqdm(schemas.items(), desc="compile + verify"):
        for lib in libs:
            row = rows[lib.name, name]
            colds, firsts, hits, makes = [], [], [], []
            for _ in range(args.compile_reps):
                seconds, grammar = lib.cold(schema)
                colds.append(seconds)
                matchers = lib.matchers(grammar, 1)
                bitmask = xgr.allocate_token_bitmask(1, vocab)
                t0 = time.perf_counter()
                lib.fill(matchers, bitmask)
                firsts.append(time.perf_counter() - t0)
                hit, make = lib.warm(schema)
                hits.append(hit)
                makes.append(make)
            row["compile_cold_ms"] = statistics.median(colds) * 1e3
            row["compile_cold_first_ms"] = colds[0] * 1e3  # the process's first compile of this schema
            row["first_mask_first_ms"] = firsts[0] * 1e3
            row["first_mask_ms"] = statistics.median(firsts) * 1e3
            row["compile_hit_ms"] = None if hits[0] is None else statistics.median(hits) * 1e3
            row["matcher_ms"] = statistics.median(makes) * 1e3
            row["warm_ms"] = (row["compile_hit_ms"] or 0.0) + row["matcher_ms"]
            _, fresh = lib.cold(schema)  # a grammar no matcher has used yet
            times = run_pass(lib, fresh, docs[name], 1, 1, vocab, base)
            row["fresh_b1_us"] = times["fill"] + times["apply"] + times["accept"]
            grammars[name][lib.name] = fresh
        checks[name] = verify(libs, grammars[name], docs[name][:-1], eos, special_ids(tokenizer, vocab), vocab)

    samples: dict[tuple, list[dict]] = {}
    for _ in tqdm(range(args.reps), desc="mask passes"):
        for batch, t in configs:
            for name in SCHEMAS:
                for lib in libs:  # alternating, so that drift of the machine hits both alike
                    times = run_pass(lib, grammars[name][lib.name], docs[name], batch, t, vocab, base)
                    samples.setdefault((lib.name, name, batch, t), []).append(times)
    for (lib_name, name, batch, t), passes in samples.items():
        row, key = rows[lib_name, name], config_key(batch, t)
        for part in PARTS:
            row[f"{part}_{key}_us"] = statistics.median(p[part] for p in passes)
        row[f"mask_{key}_us"] = statistics.median(p["fill"] + p["apply"] + p["accept"] for p in passes)
        unpacked = (p["fill"] + p["apply_unpacked"] + p["accept"] for p in passes)
        row[f"mask_unpacked_{key}_us"] = statistics.median(unpacked)

    # pensieve's integration (xgrammar, special tokens blanked, strict JSON, its own bit unpack and one where)
    ours = Grammars(tokenizer, vocab, [eos])
    compiled = {name: ours.compile(StructuredOutput(json=json.loads(schema))) for name, schema in schemas.items()}
    pensieve_us: dict[tuple[str, int], list[float]] = {}
    for _ in tqdm(range(args.reps), desc="pensieve passes"):
        for batch in batches:
            for name in SCHEMAS:
                pensieve_us.setdefault((name, batch), []).append(
                    pensieve_pass(ours, compiled[name], docs[name], batch, base)
                )
    pensieve_rows = [
        {"schema": name, "batch": batch, "mask_us": statistics.median(times)}
        for (name, batch), times in pensieve_us.items()
    ]

    steps = {} if args.no_step else decode_steps(model, batches, args)
    for row in pensieve_rows:
        if row["batch"] in steps:
            row["mask_pct"] = row["mask_us"] / 1e3 / steps[row["batch"]]["compiled"] * 100
    for row in rows.values():
        for batch, t in configs:
            key = config_key(batch, t)
            if batch in steps:
                row[f"mask_{key}_pct"] = row[f"mask_{key}_us"] / 1e3 / steps[batch]["compiled"] * 100
                row[f"mask_unpacked_{key}_pct"] = row[f"mask_unpacked_{key}_us"] / 1e3 / steps[batch]["compiled"] * 100

    cpu = cpu_name()
    print(f"\nload average at the start {load:.2f}")
    print(f"{cpu}; torch {torch.__version__}, {torch.get_num_threads()} torch threads; vocab {vocab}")
    xgr_ms, llg_ms = (lib.setup_s * 1e3 for lib in libs)
    print(f"xgrammar {version('xgrammar')} (TokenizerInfo {xgr_ms:.0f} ms; strict_mode {args.xgrammar_strict}), "
          f"llguidance {llguidance.__version__} (LLTokenizer {llg_ms:.0f} ms)")  # fmt: skip
    for batch, ms in steps.items():
        print(f"decode step, batch {batch}: {ms['compiled']:.1f} ms compiled, {ms['eager']:.1f} ms eager")
    print(f"\n{'library':11}{'schema':12}{'tokens':>7}{'cold ms':>9}{'1st mask ms':>12}{'warm ms':>9}{'fresh µs':>9}"
          f"   (the process's first: cold ms, 1st mask ms)")  # fmt: skip
    for r in rows.values():
        print(f"{r['library']:11}{r['schema']:12}{r['tokens']:>7}{r['compile_cold_ms']:>9.2f}"
              f"{r['first_mask_ms']:>12.3f}{r['warm_ms']:>9.3f}{r['fresh_b1_us']:>9.1f}"
              f"   ({r['compile_cold_first_ms']:.2f}, {r['first_mask_first_ms']:.3f})")  # fmt: skip
    print("warm: xgrammar compile (cache hit) + GrammarMatcher; llguidance prototype.deep_copy()")
    print(f"\nµs per step, whole batch{'':14}{'fill':>8}{'apply':>8}{'accept':>8}{'total':>8}{'% step':>7}"
          f"{'unpacked':>9}{'total':>8}{'% step':>7}")  # fmt: skip
    for r in rows.values():
        for batch, t in configs:
            key = config_key(batch, t)
            label = f"batch {batch}" + (f", {t} thr" if batch > 1 else "")
            pct = f"{r[f'mask_{key}_pct']:.2f}" if batch in steps else "-"
            pct_u = f"{r[f'mask_unpacked_{key}_pct']:.2f}" if batch in steps else "-"
            print(f"{r['library']:11}{r['schema']:12}{label:15}{r[f'fill_{key}_us']:>8.1f}{r[f'apply_{key}_us']:>8.1f}"
                  f"{r[f'accept_{key}_us']:>8.1f}{r[f'mask_{key}_us']:>8.1f}{pct:>7}"
                  f"{r[f'apply_unpacked_{key}_us']:>9.1f}{r[f'mask_unpacked_{key}_us']:>8.1f}{pct_u:>7}")  # fmt: skip
    print("apply: xgrammar's CPU kernel; unpacked: np.unpackbits + torch.where (total with it)")
    print("\npensieve's sampler path (Grammars.mask + accept), µs per step for the whole batch, % of a decode step")
    for row in pensieve_rows:
        pct = f"{row['mask_pct']:.2f}%" if "mask_pct" in row else "-"
        print(f"  {row['schema']:12} batch {row['batch']:>3}: {row['mask_us']:8.1f} µs  {pct}")
    for name, c in checks.items():
        means = ", ".join(f"{k[len('allowed_mean_') :]} {v:.0f}" for k, v in c.items() if k.startswith("allowed"))
        print(f"{name}: masks disagree at {c['mask_diff_steps']} of {len(docs[name])} steps, "
              f"on {c['mask_diff_max']} tokens at most; mean allowed: {means}")  # fmt: skip
    meta = {
        "cpu": cpu,
        "loadavg_at_start": load,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "threads": threads,
        "vocab": vocab,
        "xgrammar": version("xgrammar"),
        "xgrammar_strict_mode": args.xgrammar_strict,
        "llguidance": llguidance.__version__,
        "tokenizer_setup_ms": {lib.name: lib.setup_s * 1e3 for lib in libs},
        "reps": args.reps,
        "compile_reps": args.compile_reps,
        "decode_step_ms": {str(b): ms for b, ms in steps.items()},
        "decode_step": f"pensieve StatefulGenerator, SmolLM2 fp32, {args.context}-token context (decode.py)",
        "checks": checks,
        "schemas": {name: {"schema": schema, "document": doc} for name, (schema, doc) in SCHEMAS.items()},
        "warm_means": {"xgrammar": "compile again (cache hit) + GrammarMatcher", "llguidance": "prototype.deep_copy()"},
        "pensieve": pensieve_rows,
    }
    keys = [config_key(b, t) for b, t in configs]
    write_results(args.out, meta, list(rows.values()), lambda rows, path: _plot(rows, path, meta, keys))


def _plot(rows: list[dict], path: Path, meta: dict, keys: list[str]) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.2))
    libs = list(dict.fromkeys(r["library"] for r in rows))
    groups = [(s, k) for s in SCHEMAS for k in keys]
    width = 0.8 / len(libs)

    def value(lib: str, schema: str, field: str) -> float:
        return next(r[field] for r in rows if r["library"] == lib and r["schema"] == schema)

    for j, lib in enumerate(libs):
        own = [value(lib, s, f"fill_{k}_us") + value(lib, s, f"accept_{k}_us") for s, k in groups]
        apply = [value(lib, s, f"apply_{k}_us") for s, k in groups]
        xs = [i + j * width for i in range(len(groups))]
        bar = ax.bar(xs, own, width, label=f"{lib}: fill + accept")
        ax.bar(xs, apply, width, bottom=own, color=bar.patches[0].get_facecolor(), alpha=0.35,
               label=f"{lib}: + apply (xgrammar's kernel)")  # fmt: skip
        xs = [i * 2 + j * width for i in range(len(SCHEMAS))]
        bx.bar(xs, [value(lib, s, "compile_cold_ms") for s in SCHEMAS], width, label=f"{lib} cold")
        bx.bar([x + 1 for x in xs], [value(lib, s, "warm_ms") for s in SCHEMAS], width, label=f"{lib} warm")
    ax.set_xticks([i + width * (len(libs) - 1) / 2 for i in range(len(groups))],
                  [f"{s}\n{k}" for s, k in groups], fontsize=6)  # fmt: skip
    ax.set_yscale("log")
    ax.set_ylim(bottom=1)
    ax.set_ylabel("µs per step, whole batch")
    ax.set_title(f"mask per step (bB: batch, tT: threads): {meta['cpu'][:50]}", fontsize=8)
    ax.legend(fontsize=6, loc="upper left")
    ticks = [(i * 2 + k + width * (len(libs) - 1) / 2, f"{s}\n{kind}") for i, s in enumerate(SCHEMAS)
             for k, kind in enumerate(("cold", "warm"))]  # fmt: skip
    bx.set_xticks([t for t, _ in ticks], [label for _, label in ticks], fontsize=7)
    bx.set_yscale("log")
    bx.set_ylabel("ms")
    bx.set_title("compile (cold) / a request with a schema seen before (warm)", fontsize=8)
    bx.legend(fontsize=7)
    save(fig, path)


if __name__ == "__main__":
    main()
