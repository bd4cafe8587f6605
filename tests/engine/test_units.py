"""Small exact tests: logits filtering and sampling, incremental detokenization, pool sizing, unsupported models."""

import pytest
import torch
import transformers as tf

from pensieve import StatefulGenerator
from pensieve.engine import sampler
from pensieve.engine.detokenizer import TextStream, find_stop
from pensieve.engine.runner import default_num_blocks, kv_bytes_per_block
from pensieve.engine.turn import ResolvedSampling
from pensieve.models.support import SUPPORTED_FAMILIES, ModelShape, model_shape
from tests.tiny import tiny_model

LOGITS = torch.log(torch.tensor([0.05, 0.4, 0.1, 0.3, 0.15]))


def filter_logits(logits, temperature, top_k, top_p):
    """One row through the batched filter."""
    t, k, p = torch.tensor([temperature]), torch.tensor([top_k]), torch.tensor([top_p])
    return sampler.filter_logits(logits[None], t, k, p)[0]


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


def test_batched_filter_equals_row_by_row():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 50, generator=gen)
    temps = torch.tensor([0.5, 1.0, 2.0, 0.7, 1.3, 1.0])
    ks = torch.tensor([0, 3, 50, 1, 10, 60])  # 0 and >= V mean off
    ps = torch.tensor([1.0, 0.9, 0.3, 1.0, 0.05, 0.5])
    batched = sampler.filter_logits(logits, temps, ks, ps)
    for i in range(6):
        row = filter_logits(logits[i], float(temps[i]), int(ks[i]), float(ps[i]))
        torch.testing.assert_close(batched[i], row, rtol=0, atol=0)


class _Turn:
    def __init__(self, temperature, seed=None, top_k=0):
        self.sampling = ResolvedSampling(max_new_tokens=8, temperature=temperature, top_k=top_k, top_p=1.0, seed=seed,
                                         stop_token_ids=frozenset(), stop=())  # fmt: skip
        self.generator = None if seed is None else torch.Generator().manual_seed(seed)
        self.grammar = None


def sample(logits, turns) -> list[int]:
    return sampler.sample(logits, turns)[0]  # the tokens (no turn asks for logprobs)


def test_sample_greedy_rows_argmax_and_seeded_rows_ignore_their_neighbours():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 100, generator=gen)
    alone = sample(logits[2:3], [_Turn(0.8, seed=7)])
    mixed = sample(logits, [_Turn(0), _Turn(1.0), _Turn(0.8, seed=7), _Turn(0, top_k=3)])
    assert mixed[2] == alone[0]
    assert mixed[0] == int(logits[0].argmax()) and mixed[3] == int(logits[3].argmax())
    assert sample(logits[1:2], [_Turn(5.0, top_k=1)]) == [int(logits[1].argmax())]  # top-1 is greedy


def test_sampled_frequencies_follow_the_distribution():
    probs = torch.tensor([0.1, 0.2, 0.7])
    turn = _Turn(1.0, seed=3)
    draws = [sample(probs.log()[None], [turn])[0] for _ in range(3000)]
    freq = torch.bincount(torch.tensor(draws), minlength=3) / len(draws)
    torch.testing.assert_close(freq, probs, atol=0.03, rtol=0)


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from pensieve.models.smollm2 import load_smollm2

    return load_smollm2()[1]


def test_incremental_detokenizer_pieces_make_the_full_text(smollm2_tokenizer):
    tok = smollm2_tokenizer
    text = "Héllo wörld! 漢字 and an emoji 🎉🎉, tabs\tand  double  spaces.\nNew line: ✓"
    ids = tok.encode(text, add_special_tokens=False)
    detok = TextStream(tok)
    pieces = [detok.add(i) for i in ids]
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True) == detok.text
    assert all("\ufffd" not in p for p in pieces)  # a piece never splits a character
    assert "" in pieces  # some tokens complete no character (the emoji spans several)


def test_find_stop_sees_strings_split_across_tokens():
    assert find_stop("abc STO", ("STOP",), start=4) is None
    assert find_stop("abc STOP", ("STOP",), start=7) == 4  # only the last character is new
    assert find_stop("STOP abc", ("STOP",), start=7) is None  # checked before: not looked at again
    assert find_stop("xxENDyyHALT", ("HALT", "END"), start=0) == 2  # the earliest


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
