"""bf16 end to end (bf16 weights, bf16 KV pool): eager and compiled against HF generate in bf16, and the real model.

bf16 rounds differently under a different summation order, so exactness is not the criterion here: replies must
agree with HF's bf16 greedy tokens for (nearly) every conversation, and SmolLM2 must still know its capitals.
"""

import pytest
import torch

from pensieve import CacheConfig, EngineConfig, SamplingParams, StatefulGenerator
from tests.tiny import hf_greedy, oracle_copy, tiny_model

GREEDY = SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_bfloat16_model_agrees_with_hf_bfloat16(compiled):
    model = tiny_model("llama").to(torch.bfloat16)
    oracle = oracle_copy(model)
    config = CacheConfig(block_size=4, num_device_blocks=64)
    msgs = {f"c{s}": [3 + (s * 17 + i * 5) % 110 for i in range(6 + s)] for s in range(6)}
    with StatefulGenerator(model, None, config, engine_config=EngineConfig(compile=compiled)) as gen:
        assert gen.engine.runner.storage.device_kv[0].dtype == torch.bfloat16
        replies = gen.generate_batch(msgs, GREEDY)
        assert (gen.stats()["compiled_graphs"] > 0) == compiled
    same = sum(replies[c].token_ids == hf_greedy(oracle, m, 8) for c, m in msgs.items())
    assert same >= 5, f"only {same}/6 conversations equal HF bf16"


@pytest.mark.slow
def test_smollm2_in_bfloat16_answers():
    from pensieve.models.smollm2 import load_smollm2

    model, tokenizer = load_smollm2(torch.bfloat16)
    sp = SamplingParams(max_new_tokens=16, temperature=0)
    with StatefulGenerator(
        model, tokenizer, CacheConfig(num_device_blocks=64), engine_config=EngineConfig(compile=False)
    ) as gen:
        first = gen.generate("c", "What is the capital of France?", sp)
        second = gen.generate("c", "And of Germany?", sp)
    assert "Paris" in first.text and "Berlin" in second.text
    assert second.num_reused_device > 0 and second.num_recomputed == 0
