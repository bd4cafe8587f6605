"""Structured outputs: replies constrained by a grammar (xgrammar) parse and validate, and greedy ones equal HF
generate over the full history with the same grammar's mask as a logits processor (an independent matcher: the
reference over the same numbers), under batching, forks (n > 1), eviction with recompute and a restart.

Tiny float64 models over SmolLM2's tokenizer: random weights write random JSON, so the schemas here are bounded
(enums, booleans, consts, small arrays): a valid reply must close within the token budget.
"""

import json

import jsonschema
import pytest
import torch
import transformers as tf
from hypothesis import given, settings
from hypothesis import strategies as st

from pensieve import CacheConfig, SamplingParams, StatefulGenerator, StructuredOutput
from pensieve.models.smollm2 import GGUF_NAME, smollm2_path
from tests.structured.grammar_oracle import hf_constrained
from tests.tiny import drive, oracle_copy, tiny_model

xg = pytest.importorskip("xgrammar")


@pytest.fixture(scope="module")
def tokenizer():
    return tf.AutoTokenizer.from_pretrained(smollm2_path(), gguf_file=GGUF_NAME)


@pytest.fixture(scope="module")
def model(tokenizer):
    model = tiny_model("llama", vocab=len(tokenizer), seed=5)
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    return model


@pytest.fixture(scope="module")
def oracle(model):
    return oracle_copy(model)


PERSON = {
    "type": "object",
    "properties": {
        "kind": {"enum": ["cat", "dog", "bird"]},
        "ok": {"type": "boolean"},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
        "inner": {
            "type": "object",
            "properties": {"v": {"const": 7}},
            "required": ["v"],
            "additionalProperties": False,
        },
    },
    "required": ["kind", "ok", "tags", "inner"],
    "additionalProperties": False,
}
BUDGET = SamplingParams(max_new_tokens=120, temperature=0)


def conversation_tokens(gen, conv_id) -> list[int]:
    return gen.call(lambda: list(gen.engine.kv.conversations[conv_id].tokens))


def test_greedy_json_replies_validate_and_equal_hf_with_the_same_mask(model, oracle, tokenizer):
    spec = StructuredOutput(json=PERSON)
    sp = SamplingParams(max_new_tokens=120, temperature=0, structured_output=spec)
    with StatefulGenerator(model, tokenizer, CacheConfig(block_size=8, num_device_blocks=256)) as gen:
        for message in ["Describe a pet.", "Another one.", "And a third."]:
            reply = gen.generate("c", message, sp)
            gen.check_integrity()
            assert reply.finish_reason == "stop"
            jsonschema.validate(json.loads(reply.text), PERSON)
            prompt = conversation_tokens(gen, "c")[: -len(reply.token_ids)]
            assert reply.token_ids == hf_constrained(oracle, tokenizer, prompt, spec, 120)


def test_regex_choice_and_a_batch_of_different_grammars(model, tokenizer):
    specs = {
        "re": StructuredOutput(regex=r"(yes|no), [0-9]{2}"),
        "choice": StructuredOutput(choice=["alpha", "beta gamma"]),
        "obj": StructuredOutput(json=PERSON),
        "free": None,
    }
    with StatefulGenerator(model, tokenizer, CacheConfig(block_size=8, num_device_blocks=256)) as gen:
        futures = {
            name: gen.submit(
                name, "Answer.", SamplingParams(max_new_tokens=120, temperature=0.9, seed=3, structured_output=s)
            )
            for name, s in specs.items()
        }
        replies = {name: drive(gen, f) for name, f in futures.items()}
        alone = gen.generate(
            "alone",
            "Answer.",
            SamplingParams(max_new_tokens=120, temperature=0.9, seed=3, structured_output=specs["obj"]),
        )
        gen.check_integrity()
    import re

    assert re.fullmatch(r"(yes|no), [0-9]{2}", replies["re"].text)
    assert replies["choice"].text in ("alpha", "beta gamma")
    jsonschema.validate(json.loads(replies["obj"].text), PERSON)
    assert replies["obj"].token_ids == alone.token_ids  # a seeded constrained row does not depend on its batch
    assert all(r.finish_reason == "stop" for name, r in replies.items() if name != "free")


def test_candidates_each_follow_the_grammar(model, tokenizer):
    sp = SamplingParams(
        max_new_tokens=120, temperature=1.0, seed=9, n=3, structured_output=StructuredOutput(json=PERSON)
    )
    with StatefulGenerator(model, tokenizer, CacheConfig(block_size=8, num_device_blocks=256)) as gen:
        reply = gen.generate("c", "Three pets.", sp)
        for r in [reply, *reply.candidates]:
            assert r.finish_reason == "stop"
            jsonschema.validate(json.loads(r.text), PERSON)
        gen.check_integrity()


def test_eviction_and_recompute_keep_the_grammar(model, oracle, tokenizer):
    """A device pool too small for all turns: conversations are preempted and recomputed mid-reply; each reply is
    still the HF-with-mask reply (greedy)."""
    spec = StructuredOutput(json=PERSON)
    sp = SamplingParams(max_new_tokens=120, temperature=0, structured_output=spec)
    cache = CacheConfig(block_size=4, num_device_blocks=40, num_host_blocks=8)
    with StatefulGenerator(model, tokenizer, cache) as gen:
        replies = gen.generate_batch({f"c{i}": f"Pet number {i}." for i in range(4)}, sp)
        stats = gen.stats()
        for conv_id, reply in replies.items():
            prompt = conversation_tokens(gen, conv_id)[: -len(reply.token_ids)]
            assert reply.token_ids == hf_constrained(oracle, tokenizer, prompt, spec, 120)
        gen.check_integrity()
    assert stats["preemptions"] + stats["swap_out_chunks"] + stats["dropped_chunks"] > 0


def test_a_restarted_generator_constrains_the_next_turn(model, tokenizer, tmp_path):
    spec = StructuredOutput(json=PERSON)
    sp = SamplingParams(max_new_tokens=120, temperature=0, structured_output=spec)
    with StatefulGenerator(
        model, tokenizer, CacheConfig(block_size=8, num_device_blocks=128, disk_dir=tmp_path)
    ) as gen:
        first = gen.generate("c", "A pet.", sp)
    with StatefulGenerator(
        model, tokenizer, CacheConfig(block_size=8, num_device_blocks=128, disk_dir=tmp_path)
    ) as gen:
        second = gen.generate("c", "Another.", sp)
        assert second.num_reused_disk > 0
        gen.check_integrity()
    for reply in (first, second):
        jsonschema.validate(json.loads(reply.text), PERSON)


def test_length_says_the_reply_is_cut(model, tokenizer):
    sp = SamplingParams(max_new_tokens=4, temperature=0, structured_output=StructuredOutput(json=PERSON))
    with StatefulGenerator(model, tokenizer, CacheConfig(block_size=8, num_device_blocks=64)) as gen:
        reply = gen.generate("c", "A pet.", sp)
    assert reply.finish_reason == "length"
    with pytest.raises(json.JSONDecodeError):
        json.loads(reply.text)


def test_bad_grammars_are_named_and_change_nothing(model, tokenizer):
    with StatefulGenerator(model, tokenizer, CacheConfig(block_size=8, num_device_blocks=64)) as gen:
        gen.generate("c", "hi", SamplingParams(max_new_tokens=2))
        before = conversation_tokens(gen, "c")
        for spec, message in [
            (StructuredOutput(json={"type": "objec"}), "structured_output.json does not compile"),
            (StructuredOutput(regex="(("), "structured_output.regex does not compile"),
            (StructuredOutput(grammar="root ::= undefined_rule"), "structured_output.grammar does not compile"),
        ]:
            with pytest.raises(ValueError, match=message):
                gen.generate("c", "again", SamplingParams(structured_output=spec))
        assert conversation_tokens(gen, "c") == before
        gen.check_integrity()
    for kwargs in ({}, {"json": PERSON, "regex": "a"}, {"choice": []}, {"json": 3}):
        with pytest.raises(ValueError):
            StructuredOutput(**kwargs)
    with StatefulGenerator(tiny_model("llama"), cache_config=CacheConfig(num_device_blocks=16)) as gen:
        with pytest.raises(ValueError, match="need a tokenizer"):
            gen.generate("raw", [1, 2], SamplingParams(structured_output=StructuredOutput(regex="a")))


ENUM = st.lists(st.text("abcxyz", min_size=1, max_size=4), min_size=1, max_size=3, unique=True)
LEAF = st.one_of(
    st.just({"type": "boolean"}),
    ENUM.map(lambda values: {"enum": values}),
    st.integers(0, 99).map(lambda v: {"const": v}),
)
SCHEMA = st.recursive(
    LEAF,
    lambda inner: st.one_of(
        st.dictionaries(st.text("pqrs", min_size=1, max_size=3), inner, min_size=1, max_size=3).map(
            lambda props: {
                "type": "object",
                "properties": props,
                "required": sorted(props),
                "additionalProperties": False,
            }
        ),
        inner.map(lambda items: {"type": "array", "items": items, "maxItems": 2}),
    ),
    max_leaves=5,
)


@settings(max_examples=8)
@given(schema=SCHEMA, seed=st.integers(0, 2**16))
def test_generated_schemas_validate(model, tokenizer, schema, seed):
    sp = SamplingParams(max_new_tokens=150, temperature=1.0, seed=seed, structured_output=StructuredOutput(json=schema))
    with StatefulGenerator(model, tokenizer, CacheConfig(block_size=8, num_device_blocks=64)) as gen:
        reply = gen.complete([{"role": "user", "content": "JSON please."}], sp)
    assert reply.finish_reason == "stop", reply.text
    jsonschema.validate(json.loads(reply.text), schema)


def test_special_tokens_are_never_text_inside_a_grammar(tokenizer):
    """xgrammar reads added special tokens (<|im_start|>, <repo_name>...) as text unless blanked: inside a JSON
    string its mask would allow them. pensieve's masks never do; the stop token only where the reply may end."""
    from pensieve.structured.grammar import Grammars, special_ids

    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    grammars = Grammars(tokenizer, len(tokenizer), [eos])
    schema = {"type": "object", "properties": {"s": {"type": "string"}}, "required": ["s"]}
    state = grammars.state(grammars.compile(StructuredOutput(json=schema)))
    specials = special_ids(tokenizer, len(tokenizer))
    assert eos in specials and len(specials) > 3
    for text, may_end in (('{"s": "ab', False), ('"}', True)):
        for token in tokenizer.encode(text, add_special_tokens=False):
            state.accept(token)
        logits = torch.zeros(2, len(tokenizer), dtype=torch.float64)
        grammars.mask(logits, [1], [state])
        allowed = set((logits[1] > float("-inf")).nonzero()[:, 0].tolist())
        assert allowed & set(specials) == ({eos} if may_end else set())
        assert bool((logits[0] == 0).all())  # rows without a grammar are untouched
