"""Bad input raises ValueError naming the problem, before any kernel runs (caches untouched)."""

import os

import pytest
import torch

from pensieve.ops import paged_attention, triton_paged_attention, triton_write_kv, trusted_inputs, write_kv


def _good():
    torch.manual_seed(0)
    return {
        "q": torch.randn(4, 4, 32),
        "k_cache": torch.randn(6, 4, 2, 32),
        "v_cache": torch.randn(6, 4, 2, 32),
        "block_tables": torch.tensor([[1, 3], [0, 5]], dtype=torch.int32),
        "cu_seqlens_q": torch.tensor([0, 1, 4], dtype=torch.int32),
        "seq_lens_k": torch.tensor([6, 8], dtype=torch.int32),
        "scale": 0.2,
    }


def _set(name, value):
    return lambda p: p.update({name: value(p) if callable(value) else value})


ATTENTION_CASES = {
    "dtype mismatch": (_set("q", lambda p: p["q"].double()), "q dtype"),
    "v_cache dtype": (_set("v_cache", lambda p: p["v_cache"].half()), "v_cache dtype"),
    "q rank": (_set("q", lambda p: p["q"][None]), "q must be"),
    "cache rank": (_set("k_cache", lambda p: p["k_cache"][0]), "k_cache must be"),
    "cache shapes": (_set("v_cache", lambda p: p["v_cache"][:5]), "v_cache shape"),
    "table dtype": (_set("block_tables", lambda p: p["block_tables"].long()), "block_tables must be int32"),
    "table rank": (_set("block_tables", lambda p: p["block_tables"].flatten()), "block_tables must have rank 2"),
    "cu length": (_set("cu_seqlens_q", torch.tensor([0, 4], dtype=torch.int32)), "cu_seqlens_q has 2 entries"),
    "seq_lens length": (_set("seq_lens_k", torch.tensor([6], dtype=torch.int32)), "seq_lens_k has 1 entries"),
    "head_dim": (_set("q", lambda p: p["q"][..., :16]), "head_dim"),
    "gqa ratio": (_set("q", lambda p: torch.randn(4, 3, 32)), "not a multiple of Hkv"),
    "seq_len < q_len": (_set("seq_lens_k", torch.tensor([6, 2], dtype=torch.int32)), "seq_lens_k < q_len"),
    "table too short": (_set("seq_lens_k", torch.tensor([9, 8], dtype=torch.int32)), "block table too short"),
    "block id high": (_set("block_tables", torch.tensor([[1, 6], [0, 5]], dtype=torch.int32)), "out of range"),
    "block id negative": (_set("block_tables", torch.tensor([[1, 3], [-1, 5]], dtype=torch.int32)), "out of range"),
    "cu decreasing": (_set("cu_seqlens_q", torch.tensor([0, 3, 2], dtype=torch.int32)), "non-decreasing"),
    "cu start": (_set("cu_seqlens_q", torch.tensor([1, 2, 4], dtype=torch.int32)), "start at 0"),
    "cu end": (_set("cu_seqlens_q", torch.tensor([0, 1, 3], dtype=torch.int32)), "q has 4 tokens"),
    "scale": (_set("scale", float("nan")), "scale"),
    "device": (_set("block_tables", lambda p: p["block_tables"].to("meta")), "one device"),
}


def _launchers():
    yield "op", lambda p, **kw: paged_attention(*p.values(), **kw)
    if os.environ.get("TRITON_INTERPRET") == "1":
        yield "triton", lambda p, **kw: triton_paged_attention(*p.values(), **kw)


@pytest.mark.parametrize("launcher", [f for _, f in _launchers()], ids=[n for n, _ in _launchers()])
@pytest.mark.parametrize("case", ATTENTION_CASES.values(), ids=ATTENTION_CASES.keys())
def test_attention_rejects(launcher, case):
    mutate, message = case
    params = _good()
    mutate(params)
    with pytest.raises(ValueError, match=message):
        launcher(params)


@pytest.mark.parametrize("launcher", [f for _, f in _launchers()], ids=[n for n, _ in _launchers()])
@pytest.mark.parametrize("kwargs,message", [({"sliding_window": 0}, "sliding_window"), ({"softcap": -1.0}, "softcap")])
def test_attention_rejects_options(launcher, kwargs, message):
    with pytest.raises(ValueError, match=message):
        launcher(_good(), **kwargs)


def test_good_input_passes_and_trusted_mode_skips_value_checks():
    params = _good()
    paged_attention(*params.values())
    params["seq_lens_k"] = torch.tensor([6, 2], dtype=torch.int32)  # invalid values...
    with pytest.raises(ValueError):
        paged_attention(*params.values())
    with trusted_inputs():  # ...are not looked at in trusted mode; shapes still are
        params["q"] = params["q"].double()
        with pytest.raises(ValueError, match="q dtype"):
            paged_attention(*params.values())


WRITE_CASES = {
    "slot too high": (lambda a: a.update(slots=torch.tensor([0, 24])), "out of range"),
    "slot below -1": (lambda a: a.update(slots=torch.tensor([0, -2])), "out of range"),
    "duplicate slot": (lambda a: a.update(slots=torch.tensor([3, 3])), "same slot twice"),
    "slot dtype": (lambda a: a.update(slots=torch.tensor([0, 1], dtype=torch.int32)), "int64"),
    "slot count": (lambda a: a.update(slots=torch.tensor([0, 1, 2])), "slot_mapping must be"),
    "k dtype": (lambda a: a.update(k=a["k"].double()), "dtypes"),
    "k heads": (lambda a: a.update(k=torch.randn(2, 3, 32), v=torch.randn(2, 3, 32)), "the cache holds"),
    "v shape": (lambda a: a.update(v=torch.randn(2, 2, 16)), "v shape"),
}


def _writers():
    yield "op", write_kv
    if os.environ.get("TRITON_INTERPRET") == "1":
        yield "triton", triton_write_kv


@pytest.mark.parametrize("writer", [f for _, f in _writers()], ids=[n for n, _ in _writers()])
@pytest.mark.parametrize("case", WRITE_CASES.values(), ids=WRITE_CASES.keys())
def test_write_kv_rejects_and_leaves_cache_untouched(writer, case):
    mutate, message = case
    args = {"k": torch.randn(2, 2, 32), "v": torch.randn(2, 2, 32), "slots": torch.tensor([0, 1])}
    mutate(args)
    k_cache, v_cache = torch.zeros(6, 4, 2, 32), torch.zeros(6, 4, 2, 32)
    with pytest.raises(ValueError, match=message):
        writer(args["k"], args["v"], k_cache, v_cache, args["slots"])
    assert k_cache.abs().sum() == 0 and v_cache.abs().sum() == 0
