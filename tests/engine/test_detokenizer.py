"""The turn's detokenizer (`TextStream`) against full decodes of the same tokens: its pieces join to the decode of
the whole reply, and with stop strings to the decode of the reply up to the token that completes a stop string, cut
before it, while what it holds back is exactly the tail that may still grow into a stop string. Both decoders:
tokenizers' DecodeStream, and the Python window for a tokenizer without a Rust backend."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pensieve import SamplingParams, StatefulGenerator
from pensieve.config import CacheConfig
from pensieve.engine.detokenizer import StopStrings, TextStream, find_stop
from pensieve.models.smollm2 import GGUF_NAME, smollm2_path
from pensieve.structured.reasoning import Reasoning, split_reasoning
from tests.tiny import tiny_model


@pytest.fixture(scope="module")
def fast_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_path(), gguf_file=GGUF_NAME)


class PythonOnlyTokenizer:
    """Only `decode`, as a tokenizer without a Rust backend has: TextStream decodes with its Python window."""

    def __init__(self, tokenizer) -> None:
        self._tokenizer = tokenizer

    def decode(self, ids, skip_special_tokens=False) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


@pytest.fixture(scope="module", params=["rust", "python"])
def tokenizer(request, fast_tokenizer):
    return fast_tokenizer if request.param == "rust" else PythonOnlyTokenizer(fast_tokenizer)


TEXT = st.text(st.characters(codec="utf-8"), max_size=40) | st.sampled_from(
    ["Héllo wörld! 漢字 🎉🎉 tabs\tand  double  spaces.\n✓", "<|im_start|>user\nhi<|im_end|>", " a  b   c"]
)


def token_ids(data, tokenizer) -> list[int]:
    """Real text's tokens, or any ids at all (split characters, special tokens, bytes that are no UTF-8)."""
    vocab = len(tokenizer)
    if data.draw(st.booleans(), label="from text"):
        ids = tokenizer.encode(data.draw(TEXT, label="text"), add_special_tokens=False)
        cut = data.draw(st.integers(0, len(ids)), label="cut")  # may end inside a character
        return ids[:cut] + data.draw(st.lists(st.integers(0, vocab - 1), max_size=3), label="more")
    return data.draw(st.lists(st.integers(0, vocab - 1), max_size=30), label="ids")


@given(data=st.data())
def test_pieces_join_to_the_full_decode(tokenizer, fast_tokenizer, data):
    ids = token_ids(data, fast_tokenizer)
    stream = TextStream(tokenizer)
    pieces = [stream.add(i) for i in ids] + [stream.finish()]
    full = fast_tokenizer.decode(ids, skip_special_tokens=True)
    assert "".join(pieces) == stream.reply_text == full
    assert not stream.stopped


@given(data=st.data())
def test_stop_strings_hold_back_and_cut_as_the_full_decode(tokenizer, fast_tokenizer, data):
    ids = token_ids(data, fast_tokenizer)
    full = fast_tokenizer.decode(ids, skip_special_tokens=True)  # stop strings from it, so that they occur
    inner = st.integers(0, len(full)).flatmap(lambda i: st.integers(i + 1, i + 4).map(lambda j: full[i:j]))
    stops = data.draw(st.lists((inner if full else st.nothing()) | st.text(min_size=1, max_size=4), min_size=1,
                               max_size=3).filter(lambda s: all(s)), label="stops")  # fmt: skip
    stream = TextStream(tokenizer, [StopStrings(stops)])
    shown = ""
    for i in ids:
        shown += stream.add(i)
        held = stream.text[len(shown) :]
        if not stream.stopped:  # exactly the tail that may become a stop string is held
            longest = max((n for s in stops for n in range(len(s)) if stream.text.endswith(s[:n])), default=0)
            assert len(held) == longest
        assert find_stop(shown, tuple(stops)) is None
    shown += stream.finish()
    text, stopped = generated_text(fast_tokenizer, ids, tuple(stops))
    assert shown == stream.reply_text == text and stream.stopped == stopped


def generated_text(tokenizer, ids: list[int], stops: tuple[str, ...]) -> tuple[str, bool]:
    """The oracle: full decodes of ever longer prefixes of the reply. The reply ends at the first token after which
    the text contains a stop string (a prefix ending in an incomplete character is not text yet), cut before the
    earliest stop string in it; -> (text, whether a stop string ended it)."""
    for k in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[:k], skip_special_tokens=True)
        if k < len(ids) and text.endswith("\ufffd"):
            continue
        if (cut := find_stop(text, stops)) is not None:
            return text[:cut], True
    return tokenizer.decode(ids, skip_special_tokens=True), False


THINKING = st.lists(
    st.sampled_from(["<think>", "</think>", "\n", "  ", "hm", "Hi", "<", "think", "/", ">", "é", "🎉", "ok."]),
    max_size=12,
).map("".join)


@given(data=st.data())
def test_reasoning_streams_apart_and_joins_to_the_split_of_the_whole_reply(tokenizer, fast_tokenizer, data):
    """A reply's <think> block streams as reasoning, never as text, and what streams joins to the split of the
    whole reply (split_reasoning); stop strings cut the content only."""
    text, opened = data.draw(THINKING, label="text"), data.draw(st.booleans(), label="opened")
    stops = data.draw(st.lists(st.sampled_from(["Hi", "</think>", "ok"]), max_size=1), label="stops")
    ids = fast_tokenizer.encode(text, add_special_tokens=False)
    stream = TextStream(tokenizer, [StopStrings(stops)] if stops else [], Reasoning(opened))
    shown = thought = ""
    for i in ids:
        shown += stream.add(i)
        thought += stream.take_reasoning()
    shown += stream.finish()
    thought += stream.take_reasoning()
    reasoning, content = split_reasoning(fast_tokenizer.decode(ids, skip_special_tokens=True), opened)
    cut = find_stop(content, tuple(stops))
    assert shown == stream.reply_text == (content if cut is None else content[:cut])
    assert thought == (reasoning or "") and stream.reasoning_text == reasoning


def test_streams_join_to_the_reply_text_with_stop_strings(fast_tokenizer):
    """The engine's one detokenizer seen from both ends: `stream` pieces and `submit` deltas join to Reply.text,
    which ends before the first stop string (the text past it is never shown)."""
    model = tiny_model("llama", vocab=len(fast_tokenizer))
    free_sp = SamplingParams(max_new_tokens=16, temperature=0, ignore_eos=True)
    with StatefulGenerator(model, fast_tokenizer, CacheConfig(num_device_blocks=64)) as gen:
        free = gen.generate("free", "hi", free_sp)
        stop = free.text[len(free.text) // 2 :][:2]
        assert stop
        sp = SamplingParams(max_new_tokens=16, temperature=0, ignore_eos=True, stop=[stop])
        stream = gen.stream("streamed", "hi", sp)
        pieces = list(stream)
        deltas = []
        submitted = gen.submit("submitted", "hi", sp, on_token=deltas.append)
        while not submitted.done():  # nobody serves: a blocking call drives the engine, the submitted turn too
            gen.complete([1, 2, 3], SamplingParams(max_new_tokens=2))
        reply = submitted.result()
    expected = free.text[: free.text.index(stop)]
    assert "".join(pieces) == stream.reply.text == expected and stream.reply.finish_reason == "stop"
    assert "".join(d.text for d in deltas) == reply.text == expected
    assert [d.token_id for d in deltas] == reply.token_ids == stream.reply.token_ids
