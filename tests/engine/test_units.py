"""Small exact tests: logits filtering, pool sizing, unsupported models."""

import pytest
import torch
import transformers as tf

from pensieve import StatefulGenerator
from pensieve.engine.runner import default_num_blocks, kv_bytes_per_block
from pensieve.engine.sampler import filter_logits
from pensieve.models.support import SUPPORTED_FAMILIES, ModelShape, model_shape
from tests.tiny import tiny_model

LOGITS = torch.log(torch.tensor([0.05, 0.4, 0.1, 0.3, 0.15]))


def _kept(logits: torch.Tensor) -> list[int]:
    return torch.isfinite(logits).nonzero().flatten().tolist()


def test_top_k_keeps_the_k_largest():
    assert _kept(filter_logits(LOGITS, 1.0, 2, 1.0)) == [1, 3]
    assert _kept(filter_logits(LOGITS, 1.0, 0, 1.0)) == [0, 1, 2, 3, 4]  # 0 = off


@pytest.mark.parametrize(
    "top_p,kept", [(0.4, [1]), (0.41, [1, 3]), (0.7, [1, 3]), (0.71, [1, 3, 4]), (1.0, [0, 1, 2, 3, 4])]
)
def test_top_p_keeps_the_smallest_prefix_reaching_p(top_p, kept):
    assert _kept(filter_logits(LOGITS, 1.0, 0, top_p)) == kept


def test_temperature_scales():
    torch.testing.assert_close(filter_logits(LOGITS, 0.5, 0, 1.0), LOGITS / 0.5)


def test_pool_sized_from_memory():
    shape = ModelShape(num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64, max_positions=8192, vocab_size=49152)
    per_block = kv_bytes_per_block(shape, 16, torch.float32)
    assert per_block == 2 * 30 * 16 * 3 * 64 * 4
    blocks = default_num_blocks(shape, 16, torch.float32, torch.device("cpu"))
    assert 1 <= blocks and blocks * per_block <= 4 << 30  # a quarter of available RAM, at most 4 GiB


def test_unsupported_model_is_a_clear_error():
    config = tf.OPTConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, ffn_dim=64, num_attention_heads=2)
    model = tf.OPTForCausalLM(config)
    with pytest.raises(ValueError, match="'opt' is not supported; supported: " + ", ".join(sorted(SUPPORTED_FAMILIES))):
        StatefulGenerator(model)
    assert model.config._attn_implementation != "pensieve"  # untouched


def test_model_shape_per_family():
    assert model_shape(tiny_model("gpt2")) == ModelShape(2, 4, 4, 16, 512, 120)
    assert model_shape(tiny_model("gemma2")).head_dim == 16
    assert model_shape(tiny_model("llama")).num_kv_heads == 2
