"""Compiled decode steps (torch.compile, inductor) against HF generate and against eager; the compile bound; the
fallback when a model cannot compile; padded steps (what CUDA-graph buckets replay) on CPU.

Tiny float64 models compile for every supported family (checked: all seven), so the oracle stays exact.
"""

import random
import warnings

import pytest
import torch
from torch._dynamo.utils import counters

from pensieve import CacheConfig, EngineConfig, SamplingParams, StatefulGenerator
from pensieve.forward import AttentionBatch
from tests.tiny import FAMILIES, VOCAB, hf_greedy, oracle_copy, tiny_model

GREEDY = SamplingParams(max_new_tokens=5, temperature=0, ignore_eos=True)
COMPILED = EngineConfig(compile=True)


def _msg(rng: random.Random, lo: int = 2, hi: int = 9) -> list[int]:
    return [rng.randrange(3, VOCAB) for _ in range(rng.randint(lo, hi))]


def _turns(gen, oracle, histories: dict, batch: dict, sampling=GREEDY) -> dict:
    replies = gen.generate_batch(batch, sampling)
    for conv_id, msg in batch.items():
        history = histories.get(conv_id, []) + msg
        assert replies[conv_id].token_ids == hf_greedy(oracle, history, sampling.max_new_tokens), conv_id
        histories[conv_id] = history + replies[conv_id].token_ids
    gen.engine.kv.check_integrity()
    return replies


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_compiled_decode_matches_hf_for_every_family(family):
    """Batches of 3 growing over several turns: block tables grow (block size 4), every decode step compiled."""
    model = tiny_model(family)
    oracle = oracle_copy(model)
    rng = random.Random(1)
    histories: dict = {}
    with StatefulGenerator(model, None, CacheConfig(block_size=4, num_device_blocks=96), engine_config=COMPILED) as gen:
        for _ in range(3):
            _turns(gen, oracle, histories, {f"c{i}": _msg(rng) for i in range(3)})
        compiled = gen.engine.runner.compiled
        assert compiled.num_graphs >= 1 and not compiled._failed


@pytest.mark.slow
def test_compiled_across_batch_sizes_recompute_and_swap_in_and_bounded_compiles():
    """Batch 1 -> 3 -> 9 -> 2, a device pool too small for everyone (dropped chunks recomputed, host swap-ins)
    with decodes of other turns in the same steps; over 50+ steps of changing composition it compiles at most two
    graphs (batch 1 specializes; every other size shares one)."""
    model = tiny_model("llama")
    oracle = oracle_copy(model)
    rng = random.Random(2)
    histories: dict = {}
    config = CacheConfig(block_size=4, num_device_blocks=40, num_host_blocks=6)
    with StatefulGenerator(model, None, config, engine_config=COMPILED) as gen:
        graphs_before = counters["stats"]["unique_graphs"]
        for size in (1, 3, 9, 2, 9, 1, 5, 4, 7):
            names = rng.sample(range(10), size)
            _turns(gen, oracle, histories, {f"c{i}": _msg(rng) for i in names})
        stats = gen.stats()
        assert stats["steps"] >= 50
        assert stats["recompute_chunks"] > 0 and stats["swap_in_chunks"] > 0
        assert counters["stats"]["unique_graphs"] - graphs_before == stats["compiled_graphs"] <= 2


def test_compiled_prefill_steps_match_hf():
    """EngineConfig.compile_prefill=True: steps with prefill chunks (and the decodes batched with them) compiled too,
    one conversation alone (padded to two sub-sequences and two sampled rows) and three together, with no graph
    beyond the two that decode steps need (batch 1, and every other batch)."""
    model = tiny_model("mistral")  # a sliding window: prefill chunks mask inside the window
    oracle = oracle_copy(model)
    rng = random.Random(5)
    engine = EngineConfig(compile=True, compile_prefill=True)
    histories: dict = {}
    with StatefulGenerator(model, None, CacheConfig(block_size=4, num_device_blocks=96), engine_config=engine) as gen:
        graphs_before = counters["stats"]["unique_graphs"]
        _turns(gen, oracle, histories, {"solo": _msg(rng, 6, 20)})
        for _ in range(2):
            _turns(gen, oracle, histories, {f"c{i}": _msg(rng, 6, 20) for i in range(3)})
        _turns(gen, oracle, histories, {"solo": _msg(rng, 6, 20)})
        stats = gen.stats()
        assert stats["compiled_steps"] == stats["steps"]  # prefill steps included
        assert counters["stats"]["unique_graphs"] - graphs_before == stats["compiled_graphs"] <= 2


def test_compile_prefill_auto_waits_for_the_batched_graph():
    """compile_prefill="auto" (the default): a prefill step runs eagerly until a batched step has compiled the graph
    it would use, then compiled; every reply equals HF's."""
    model = tiny_model("llama")
    oracle = oracle_copy(model)
    rng = random.Random(6)
    histories: dict = {}
    one_token = SamplingParams(max_new_tokens=1, temperature=0, ignore_eos=True)
    with StatefulGenerator(model, None, CacheConfig(block_size=4, num_device_blocks=96), engine_config=COMPILED) as gen:
        compiled = gen.engine.runner.compiled
        assert compiled.prefill == "auto"
        _turns(gen, oracle, histories, {"solo": _msg(rng, 6, 12)}, one_token)  # one prefill step: eager
        assert gen.stats()["compiled_steps"] == 0 and not compiled.batched
        _turns(gen, oracle, histories, {"a": [7, 8, 9], "b": [8, 9]}, one_token)  # a batched prefill: still eager
        assert gen.stats()["compiled_steps"] == 0
        _turns(gen, oracle, histories, {"a": [9, 10], "b": [10, 11]})  # prefill eager, then batched decodes compile
        assert compiled.batched
        steps, compiled_steps = gen.stats()["steps"], gen.stats()["compiled_steps"]
        _turns(gen, oracle, histories, {"solo": _msg(rng, 6, 12)}, one_token)  # now compiled
        assert gen.stats()["steps"] - steps == gen.stats()["compiled_steps"] - compiled_steps == 1


def test_compiled_equals_eager_bit_for_bit_on_float64():
    """The same generator's steps with the compiled forward on and off: same tokens, and both equal HF."""
    model = tiny_model("qwen2")
    oracle = oracle_copy(model)
    rng = random.Random(3)
    msgs = {f"c{i}": _msg(rng) for i in range(3)}
    replies = {}
    for mode in (True, False):
        with StatefulGenerator(model, None, CacheConfig(block_size=4), engine_config=EngineConfig(compile=mode)) as gen:
            replies[mode] = {c: r.token_ids for c, r in gen.generate_batch(msgs, GREEDY).items()}
            assert (gen.stats()["compiled_graphs"] > 0) == mode
    assert replies[True] == replies[False] == {c: hf_greedy(oracle, m, 5) for c, m in msgs.items()}


def test_a_model_that_cannot_compile_runs_eagerly_with_one_warning(monkeypatch):
    import pensieve.engine.graphs as graphs

    def broken(fn, **kwargs):
        def compiled(*args, **kw):
            raise RuntimeError("inductor says no")

        return compiled

    monkeypatch.setattr(graphs.torch, "compile", broken)
    model = tiny_model("llama")
    oracle = oracle_copy(model)
    rng = random.Random(4)
    with StatefulGenerator(model, None, CacheConfig(block_size=4), engine_config=COMPILED) as gen:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _turns(gen, oracle, {}, {"a": _msg(rng), "b": _msg(rng)})
            _turns(gen, oracle, {}, {"c": _msg(rng)})
    messages = [str(w.message) for w in caught if "torch.compile failed" in str(w.message)]
    assert len(messages) == 1 and "LlamaForCausalLM" in messages[0]


def test_every_generator_compiles_with_the_guard_filter(monkeypatch):
    """torch.compile pops guard_filter_fn out of the options dict it is given: the second generator in a process
    must still ask for it (every generator after the first once compiled with Dynamo's guards on all parameters)."""
    import pensieve.engine.graphs as graphs

    real_compile, seen = torch.compile, []

    def spy(fn, **kwargs):
        seen.append(dict(kwargs["options"]))
        real_compile(fn, **kwargs)  # lazy: handles (and pops from) the options, compiles nothing yet
        return fn  # run eagerly: this test is about the options

    monkeypatch.setattr(graphs.torch, "compile", spy)
    model = tiny_model("llama")
    oracle = oracle_copy(model)
    rng = random.Random(5)
    for _ in range(2):
        with StatefulGenerator(model, None, CacheConfig(block_size=4), engine_config=COMPILED) as gen:
            _turns(gen, oracle, {}, {"a": _msg(rng), "b": _msg(rng)})
    assert len(seen) == 2
    assert all(options.get("guard_filter_fn") is torch.compiler.skip_guard_on_all_nn_modules_unsafe for options in seen)


def test_auto_compiles_float32_models_and_not_float64():
    from pensieve.engine.graphs import compile_supported, resolve_compile

    assert resolve_compile("auto", tiny_model("llama")) is False  # float64: test models only
    assert resolve_compile("auto", tiny_model("llama").float()) is compile_supported()
    assert resolve_compile(False, tiny_model("llama").float()) is False


def test_padded_decode_rows_write_only_the_padding_block():
    """A decode step of 2 sequences padded to 6 rows (a CUDA-graph bucket), run eagerly on CPU over a NaN-poisoned
    pool: the real rows' logits equal the unpadded step's, and nothing outside the real slots and the padding block
    is written."""
    model = tiny_model("llama")
    with StatefulGenerator(model, None, CacheConfig(block_size=4, num_device_blocks=32)) as gen:
        engine = gen.engine
        gen.generate_batch({"a": [5, 6, 7, 8, 9], "b": [10, 11]}, SamplingParams(max_new_tokens=1, ignore_eos=True))
        for conv_id in ("a", "b"):
            engine.admit(engine.admission.prepare(conv_id, [12], SamplingParams(max_new_tokens=3, ignore_eos=True)))
        engine.step()  # the message (and the last reply token); the next step decodes one token per turn
        chunks = engine.scheduler.schedule()
        runner, storage = engine.runner, engine.runner.storage
        plan = runner.build_plan(chunks)
        assert plan.decode_only and plan.num_seqs == 2
        real_slots = runner.buffers.host["slot_mapping"][:2].clone()
        pool = [t.clone() for t in storage.device_kv]
        unpadded = _eager_logits(runner, plan.num_tokens, plan.num_seqs, plan.num_logits)
        for t, saved in zip(storage.device_kv, pool, strict=True):
            t.copy_(saved)
        poisoned = [t.clone() for t in storage.device_kv]
        block, bs = storage.padding_block, engine.kv.block_size
        for t in poisoned:
            t[:, block].fill_(float("nan"))
        runner.buffers.pad(plan, 6, block, bs)  # 4 padded rows: slots 0..3 of the padding block
        for t, p in zip(storage.device_kv, poisoned, strict=True):
            t.copy_(p)
        padded = _eager_logits(runner, 6, 6, 6)
        torch.testing.assert_close(padded[:2], unpadded, rtol=0, atol=0)
        touched = torch.zeros(storage.device_kv[0].shape[1] * bs, dtype=torch.bool)
        touched[real_slots] = True
        touched[block * bs : (block + 1) * bs] = True
        for t, p in zip(storage.device_kv, poisoned, strict=True):
            flat_t, flat_p = t.flatten(1, 2), p.flatten(1, 2)  # [L, slots, Hkv, D]
            same = (flat_t == flat_p) | (flat_t.isnan() & flat_p.isnan())
            assert same[:, ~touched].all(), "a padded row wrote outside the padding block"
        engine.fail_all(RuntimeError("test over"))


def _eager_logits(runner, num_tokens, num_seqs, num_rows):
    from pensieve.engine.graphs import forward

    runner.buffers.np["logits_rows"][:num_rows] = range(num_rows)  # decode-only: row i is sequence i's token
    views = runner.buffers.upload(num_tokens, num_seqs, num_rows)
    batch = AttentionBatch(views["slot_mapping"], views["block_tables"], views["cu_seqlens_q"], views["seq_lens_k"],
                           *runner.storage.device_kv)  # fmt: skip
    with torch.inference_mode():
        return forward(runner.model, views["input_ids"][None], views["position_ids"][None], views["logits_rows"], batch)
