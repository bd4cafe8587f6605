"""The sampling surface: logit_bias, repetition / presence / frequency penalties, min-p and logprobs.

The batched sampler against references over the same logits (HF's own logits processors where HF defines the
control, OpenAI's formula written out row by row where it does not), and whole turns against HF generate over the
full history with the same processors (float64 tiny models).
"""

from types import SimpleNamespace
from unittest import mock

import pytest
import torch
import transformers as tf
from hypothesis import given
from hypothesis import strategies as st

from pensieve import CacheConfig, SamplingParams, StatefulGenerator
from pensieve.engine import sampler
from pensieve.engine.turn import ResolvedSampling
from tests.tiny import VOCAB, oracle_copy, tiny_model

V = 12  # the vocabulary of the sampler-level tests


def resolved(**kw) -> ResolvedSampling:
    base = dict(max_new_tokens=8, temperature=0.0, top_k=0, top_p=1.0, seed=None, stop_token_ids=frozenset(), stop=())
    return ResolvedSampling(**{**base, **kw})


def fake_turn(history: list[int], reply: list[int], params: ResolvedSampling):
    """What the sampler reads of a turn, with its statistics built as the engine builds them: the conversation
    when the turn first samples, then each reply token as it is sampled."""
    turn = SimpleNamespace(sampling=params, conv=SimpleNamespace(tokens=list(history)), penalties=None, grammar=None)
    turn.penalties = sampler.Penalties(turn.conv.tokens, V, torch.device("cpu"))
    for token in reply:
        turn.penalties.add(token)
    return turn


def reference(logits: torch.Tensor, history: list[int], reply: list[int], p: ResolvedSampling) -> torch.Tensor:
    """One row by the definitions: logit_bias added, then HF's RepetitionPenaltyLogitsProcessor over the whole
    conversation (history + reply), then OpenAI's presence / frequency penalties over the reply's tokens."""
    row = logits.clone()
    for token, bias in p.logit_bias:
        row[token] += bias
    ids = torch.tensor([history + reply])
    row = tf.RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(ids, row[None])[0] if ids.numel() else row
    for token in set(reply):
        row[token] -= p.frequency_penalty * reply.count(token) + p.presence_penalty
    return row


TOKENS = st.lists(st.integers(0, V - 1), max_size=10)
PENALTY = st.floats(-2, 2, allow_nan=False)
ROW = st.fixed_dictionaries(
    {
        "history": TOKENS,
        "reply": TOKENS,
        "logit_bias": st.dictionaries(st.integers(0, V - 1), st.floats(-100, 100, allow_nan=False), max_size=3),
        "repetition_penalty": st.sampled_from([1.0]) | st.floats(0.1, 3.0),
        "presence_penalty": PENALTY,
        "frequency_penalty": PENALTY,
    }
)


@given(rows=st.lists(ROW, min_size=1, max_size=5), seed=st.integers(0, 2**31))
def test_penalties_and_bias_equal_the_references_row_by_row(rows, seed):
    logits = torch.randn(len(rows), V, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 3
    params = [
        resolved(
            logit_bias=tuple(sorted(r["logit_bias"].items())),
            repetition_penalty=r["repetition_penalty"],
            presence_penalty=r["presence_penalty"],
            frequency_penalty=r["frequency_penalty"],
        )
        for r in rows
    ]
    turns = [fake_turn(r["history"], r["reply"], p) for r, p in zip(rows, params, strict=True)]
    batched = sampler.penalize(logits.clone(), turns)
    for i, (r, p) in enumerate(zip(rows, params, strict=True)):
        torch.testing.assert_close(batched[i], reference(logits[i], r["history"], r["reply"], p))


@given(
    min_p=st.lists(st.floats(0, 1), min_size=1, max_size=4),
    temperature=st.floats(0.1, 3),
    seed=st.integers(0, 2**31),
)
def test_min_p_keeps_what_hf_min_p_keeps(min_p, temperature, seed):
    logits = torch.randn(len(min_p), V, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 4
    n = len(min_p)
    ours = sampler.filter_logits(
        logits, torch.full((n,), temperature, dtype=torch.float64), torch.zeros(n, dtype=torch.long),
        torch.ones(n, dtype=torch.float64), torch.tensor(min_p, dtype=torch.float64),
    )  # fmt: skip
    for i, p in enumerate(min_p):
        scaled = logits[i : i + 1] / temperature
        theirs = tf.MinPLogitsWarper(p)(None, scaled)[0] if p > 0 else scaled[0]
        assert torch.equal(ours[i].isinf(), theirs.isinf())
        torch.testing.assert_close(ours[i][~ours[i].isinf()], theirs[~theirs.isinf()])


class OpenAIPenalties(tf.LogitsProcessor):
    """The reference presence / frequency penalties for HF generate: over the tokens generated after the prompt."""

    def __init__(self, prompt_len: int, presence: float, frequency: float) -> None:
        self.prompt_len, self.presence, self.frequency = prompt_len, presence, frequency

    def __call__(self, input_ids, scores):
        reply = input_ids[0, self.prompt_len :].tolist()
        for token in set(reply):
            scores[0, token] -= self.frequency * reply.count(token) + self.presence
        return scores


def hf_turn(oracle, history: list[int], n: int, **kwargs) -> list[int]:
    ids = torch.tensor([history])
    with torch.no_grad():
        out = oracle.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=None,
                              attention_mask=torch.ones_like(ids), **kwargs)  # fmt: skip
    return out[0, len(history) :].tolist()


def test_greedy_turns_with_penalties_and_bias_equal_hf_generate_over_the_history():
    """Two turns per conversation; the second's repetition penalty counts the first turn's tokens (the whole
    conversation is its prompt) exactly as HF generate over the full history does."""
    model = tiny_model("llama")
    oracle = oracle_copy(model)
    msg1, msg2 = [5, 9, 14, 5, 22, 31, 9], [40, 5, 41]
    cases = {
        "rep": (dict(repetition_penalty=1.8), lambda h: dict(repetition_penalty=1.8)),
        "bias": (dict(logit_bias={7: 6.0, 11: -100.0, 30: 2.5}),
                 lambda h: dict(sequence_bias={(7,): 6.0, (11,): -100.0, (30,): 2.5})),
        "openai": (dict(presence_penalty=1.5, frequency_penalty=0.7),
                   lambda h: dict(logits_processor=tf.LogitsProcessorList([OpenAIPenalties(len(h), 1.5, 0.7)]))),
    }  # fmt: skip
    greedy = SamplingParams(max_new_tokens=10, temperature=0, ignore_eos=True)
    with StatefulGenerator(model, cache_config=CacheConfig(block_size=4, num_device_blocks=64)) as gen:
        for name, (ours, theirs) in cases.items():
            sp = SamplingParams(max_new_tokens=10, temperature=0, ignore_eos=True, **ours)
            history, changed = [], False
            for msg in (msg1, msg2):
                history += msg
                reply = gen.generate(name, msg, sp)
                assert reply.token_ids == hf_turn(oracle, history, 10, **theirs(history)), name
                changed |= reply.token_ids != hf_turn(oracle, history, 10)
                history += reply.token_ids
            assert changed, f"{name} never changed a greedy reply: the test would not see it missing"
            gen.check_integrity()
        assert gen.generate("plain", msg1, greedy).token_ids == hf_turn(oracle, msg1, 10)


def test_logprobs_are_hf_log_softmax_of_the_raw_logits():
    model = tiny_model("llama")
    oracle = oracle_copy(model)
    msg = [5, 9, 14, 5, 22, 31, 9]
    sp = SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True, logprobs=4, repetition_penalty=1.5)
    with StatefulGenerator(model, cache_config=CacheConfig(block_size=4, num_device_blocks=64)) as gen:
        deltas = []
        future = gen.submit("a", msg, sp, on_token=deltas.append)
        reply = gen.generate("b", msg, sp)  # drives the engine; the same turn on another conversation
        first = future.result()
        no_logprobs = gen.generate("c", msg, SamplingParams(max_new_tokens=2, temperature=0, ignore_eos=True))
    assert reply.token_ids == hf_turn(oracle, msg, 6, repetition_penalty=1.5) == first.token_ids
    with torch.no_grad():  # HF's float64 logits at each position that chose a reply token
        logits = oracle(torch.tensor([msg + reply.token_ids])).logits[0, len(msg) - 1 : -1]
    assert len(reply.logprobs) == 6 and [lp.token_id for lp in reply.logprobs] == reply.token_ids
    for lp, row in zip(reply.logprobs, logits, strict=True):
        expected = row.log_softmax(-1)  # raw: before the repetition penalty
        assert lp.logprob == pytest.approx(float(expected[lp.token_id]), abs=1e-9)
        top = expected.topk(4)
        assert [t for t, _ in lp.top] == top.indices.tolist()
        assert [v for _, v in lp.top] == pytest.approx(top.values.tolist(), abs=1e-9)
    assert [d.logprob for d in deltas] == first.logprobs == reply.logprobs
    assert no_logprobs.logprobs is None


def test_seeded_penalized_rows_do_not_depend_on_the_batch():
    model = tiny_model("llama")
    penalties = dict(presence_penalty=0.5, frequency_penalty=0.3, repetition_penalty=1.2, logit_bias={3: 2.0})
    sp = SamplingParams(max_new_tokens=10, temperature=0.8, seed=7, ignore_eos=True, min_p=0.05, **penalties)
    msg = list(range(10, 30))
    with StatefulGenerator(model, cache_config=CacheConfig(block_size=4, num_device_blocks=128)) as gen:
        alone = gen.generate("alone", msg, sp).token_ids
        crowd = {"x": msg, "y": [4, 5, 6], "z": list(range(50, 90))}
        others = SamplingParams(max_new_tokens=10, temperature=1.0, ignore_eos=True)
        futures = {c: gen.submit(c, m, others) for c, m in crowd.items() if c != "x"}
        batched = gen.generate("x", msg, sp).token_ids
        for f in futures.values():
            f.result()
        gen.check_integrity()
    assert batched == alone


@pytest.mark.parametrize(
    ("sampling", "message"),
    [
        (dict(presence_penalty=2.5), "presence_penalty"),
        (dict(frequency_penalty=float("nan")), "frequency_penalty"),
        (dict(repetition_penalty=0), "repetition_penalty"),
        (dict(min_p=1.5), "min_p"),
        (dict(logit_bias={-1: 1.0}), "logit_bias"),
        (dict(logit_bias={3: 101}), "logit_bias"),
        (dict(logprobs=21), "logprobs"),
    ],
)
def test_bad_sampling_values_are_named(sampling, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**sampling)


def test_logit_bias_outside_the_vocabulary_changes_nothing():
    with StatefulGenerator(tiny_model("llama"), cache_config=CacheConfig(block_size=4, num_device_blocks=32)) as gen:
        gen.generate("a", [5, 6, 7], SamplingParams(max_new_tokens=2, temperature=0))
        before = gen.conversations()
        with pytest.raises(ValueError, match="logit_bias token ids must be < 120"):
            gen.generate("a", [8], SamplingParams(max_new_tokens=2, logit_bias={VOCAB: 1.0}))
        assert gen.conversations() == before
        gen.check_integrity()


def full_sort_top_p_drop(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """The definition: sort the whole row; drop what comes after the mass reaches p."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    drop = probs.cumsum(-1) - probs >= top_p[:, None]
    return drop.scatter(1, order, drop)


@given(
    top_p=st.lists(st.floats(0.01, 1.0), min_size=1, max_size=5),
    candidates=st.integers(1, V + 2),
    scale=st.floats(0.1, 8),
    seed=st.integers(0, 2**31),
)
def test_top_p_from_candidates_equals_the_full_sort(top_p, candidates, scale, seed):
    """Rows whose candidates hold p and rows that need the whole sort, side by side."""
    logits = torch.randn(len(top_p), V, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale
    p = torch.tensor(top_p, dtype=torch.float64)
    with mock.patch.object(sampler, "TOP_P_CANDIDATES", candidates):
        assert torch.equal(sampler._top_p_drop(logits, p), full_sort_top_p_drop(logits, p))


def test_rows_with_top_p_off_keep_everything_beside_top_p_rows():
    """Rounding can sum a row's mass to >= 1 before its tail: a row with top-p off must not drop that tail."""
    logits = torch.randn(3, 49152, generator=torch.Generator().manual_seed(0)) * 3
    drop = sampler._top_p_drop(logits, torch.tensor([0.9, 1.0, 1.0]))
    assert drop[0].any() and not drop[1:].any()


def test_draw_never_returns_a_zero_probability_token():
    probs = torch.zeros(4, 50, dtype=torch.float32)
    probs[:, [0, 7, 49]] = torch.tensor([0.0, 0.5, 0.5])  # leading, inner and trailing zeros around the support
    probs[:, 7], probs[:, 49] = 0.25, 0.75
    generators = [None, torch.Generator().manual_seed(1), None, torch.Generator().manual_seed(2)]
    drawn = torch.cat([sampler.draw(probs, generators) for _ in range(500)])
    assert set(drawn.tolist()) == {7, 49}
    assert 0.2 < (drawn == 7).float().mean() < 0.3
