"""Shared prefixes: conversations, forks and stateless completions share KV chunks through the prompt tree.

Every reply is checked against the oracle (HF generate over the full token sequence, float64 tiny model); the
sharing itself is checked by exact block ids and chunk identity.
"""

import copy
from pathlib import Path

import pytest

from pensieve import CacheConfig, SamplingParams, StatefulGenerator
from pensieve.cache.disk import referenced_keys
from pensieve.cache.tree import prefix_keys
from pensieve.cache.types import Chunk, Tier
from tests.tiny import VOCAB, check_every_step, hf_greedy, oracle_copy, oracle_turn, tiny_model

BS = 4
GREEDY = SamplingParams(max_new_tokens=4, temperature=0, ignore_eos=True)


def _open(model, device=64, host=0, disk_dir=None) -> StatefulGenerator:
    config = CacheConfig(block_size=BS, num_device_blocks=device, num_host_blocks=host, disk_dir=disk_dir)
    return check_every_step(StatefulGenerator(model, None, config))


def _msg(seed: int, n: int = 5) -> list[int]:
    return [3 + (seed * 37 + i * 13) % (VOCAB - 3) for i in range(n)]


def _system(length: int, seed: int) -> list[int]:
    return [3 + (seed * 53 + i * 29) % (VOCAB - 3) for i in range(length)]


def _turn(gen, oracle, histories, conv_id, msg):
    return oracle_turn(gen, oracle, histories, conv_id, msg, GREEDY)


def _chunks(gen, conv_id):
    return gen.engine.kv.conversations[conv_id].chunks


@pytest.mark.parametrize("length", [3, 8, 11])  # inside the first block, on a block boundary, across blocks
def test_conversations_behind_shared_system_prompts_hold_them_once(model, oracle, length):
    systems = [_system(length, 0), _system(length, 1)]
    convs = {f"c{i}": systems[i % 2] for i in range(6)}
    histories: dict[str, list[int]] = {}
    with _open(model) as gen:
        first = {c: s + _msg(i) for i, (c, s) in enumerate(convs.items())}
        replies = gen.generate_batch(first, GREEDY)  # all at once: computed in the same steps, then deduplicated
        for conv_id, msg in first.items():
            assert replies[conv_id].token_ids == hf_greedy(oracle, msg, GREEDY.max_new_tokens), conv_id
            histories[conv_id] = msg + replies[conv_id].token_ids
        for r in range(2):  # then interleaved single turns
            for i, conv_id in enumerate(convs):
                reply = _turn(gen, oracle, histories, conv_id, _msg(10 * r + i + 7))
                assert reply.num_reused_shared >= length // BS * BS
        full = length // BS  # the system prompt's full blocks
        for s in range(2):
            holders = [c for c, system in convs.items() if system == systems[s]]
            tables = [[ch.block for ch in _chunks(gen, c)[:full]] for c in holders]
            assert all(t == tables[0] for t in tables), tables  # the same device blocks
            assert all(_chunks(gen, c)[i] is _chunks(gen, holders[0])[i] for c in holders for i in range(full))
            assert all(_chunks(gen, holders[0])[i].refs == 3 for i in range(full))
        private = {id(ch) for c in convs for ch in _chunks(gen, c)[full:]}
        assert len(private) == sum(len(_chunks(gen, c)) - full for c in convs)  # nothing else is shared
        stats = gen.stats()
        used = stats["device_blocks_total"] - stats["device_blocks_free"]
        # the bound: (unique tokens / block size) + 1 per conversation
        unique = 2 * length + sum(len(h) - length for h in histories.values())
        assert used == 2 * full + len(private) <= unique // BS + len(convs)


def test_a_second_conversation_finds_a_system_prompt_computed_earlier(model, oracle):
    system = _system(16, 2)
    histories: dict[str, list[int]] = {}
    with _open(model) as gen:
        first = _turn(gen, oracle, histories, "a", system + _msg(1))
        second = _turn(gen, oracle, histories, "b", system + _msg(2))
        assert first.num_reused_shared == 0 and first.num_prefilled == 16 + 5
        assert second.num_reused_shared == second.num_reused_device == 16 and second.num_prefilled == 5
        kv = gen.engine.kv
        assert [c.block for c in kv.conversations["a"].chunks[:4]] == [
            c.block for c in kv.conversations["b"].chunks[:4]
        ]


def test_fork_then_diverge(model, oracle):
    histories: dict[str, list[int]] = {}
    with _open(model) as gen:
        _turn(gen, oracle, histories, "a", _msg(1, 9))
        _turn(gen, oracle, histories, "a", _msg(2, 6))
        gen.fork("a", "b")
        histories["b"] = list(histories["a"])
        assert gen.conversations() == ["a", "b"]
        shared = len(histories["a"]) - 1  # every computed position of a ...
        shared -= shared % BS  # ... in full chunks: a's partial last chunk is its own
        kv = gen.engine.kv
        a, b = kv.conversations["a"].chunks, kv.conversations["b"].chunks
        assert len(b) == shared // BS and all(x is y for x, y in zip(a[: len(b)], b, strict=True))
        rb = _turn(gen, oracle, histories, "b", _msg(3))
        ra = _turn(gen, oracle, histories, "a", _msg(4))
        assert rb.num_reused_shared == rb.num_reused_device == shared
        assert ra.num_reused_device == len(histories["a"]) - 5 - 4 - 1
        for _ in range(2):
            _turn(gen, oracle, histories, "b", _msg(5))
            _turn(gen, oracle, histories, "a", _msg(6))


def test_fork_then_truncate_and_regenerate(model, oracle):
    histories: dict[str, list[int]] = {}
    with _open(model) as gen:
        _turn(gen, oracle, histories, "a", _msg(1, 10))
        cut = len(histories["a"])
        _turn(gen, oracle, histories, "a", _msg(2, 7))
        gen.fork("a", "edit")
        gen.truncate("edit", cut)  # regenerate the second turn with another message
        histories["edit"] = histories["a"][:cut]
        reply = _turn(gen, oracle, histories, "edit", _msg(3, 7))
        assert reply.num_reused_device == (cut - cut % BS) and reply.num_reused_shared == reply.num_reused_device
        _turn(gen, oracle, histories, "a", _msg(4))  # the original is untouched
        with pytest.raises(ValueError, match="num_tokens"):
            gen.truncate("a", len(histories["a"]) + 1)
        with pytest.raises(ValueError, match="already exists"):
            gen.fork("a", "edit")
        with pytest.raises(KeyError):
            gen.fork("nobody", "x")
        with pytest.raises(ValueError, match="non-empty str"):
            gen.fork("a", "")
        gen.engine.kv.check_integrity()


def test_complete_reuses_a_conversations_history_and_keeps_no_conversation(model, oracle):
    histories: dict[str, list[int]] = {}
    with _open(model) as gen:
        _turn(gen, oracle, histories, "a", _msg(1, 9))
        _turn(gen, oracle, histories, "a", _msg(2, 6))
        prompt = histories["a"] + _msg(3)
        reply = gen.complete(prompt, GREEDY)
        assert reply.conv_id is None and reply.token_ids == hf_greedy(oracle, prompt, 4)
        reusable = len(histories["a"]) - 1
        assert reply.num_reused_shared == reply.num_reused_device == reusable - reusable % BS
        assert gen.conversations() == ["a"] and gen.stats()["conversations"] == 1
        # a stateless client resends the whole history with one more message: the completion's chunks are found
        again = prompt + reply.token_ids + _msg(4)
        second = gen.complete(again, GREEDY)
        assert second.token_ids == hf_greedy(oracle, again, 4)
        computed = len(prompt) + 4 - 1  # every position the first completion computed, its partial tail included
        assert second.num_reused_device == second.num_reused_shared == computed
        assert second.num_prefilled == len(again) - computed == 1 + 5  # its last reply token + the new message
        with pytest.raises(ValueError, match="prompt"):
            gen.complete([], GREEDY)
        with pytest.raises(ValueError, match="token ids"):
            gen.complete([1, VOCAB + 5], GREEDY)
        with pytest.raises(ValueError, match="tokenizer"):
            gen.complete([{"role": "user", "content": "hi"}], GREEDY)
        gen.engine.kv.check_integrity()


def test_complete_with_chat_messages_matches_the_oracle_and_reuses_a_text_conversation():
    from tests.engine.test_text_mode import _hf_reply, _render, tokenizer

    tok = tokenizer.__wrapped__()
    model = tiny_model("llama", seed=5, vocab=len(tok))
    oracle = oracle_copy(model)
    sp = SamplingParams(max_new_tokens=5, temperature=0, ignore_eos=True)
    with StatefulGenerator(model, tok, CacheConfig(block_size=BS, num_device_blocks=128)) as gen:
        first = gen.generate("t", "Tell me about cats", sp)
        messages = [
            {"role": "user", "content": "Tell me about cats"},
            {"role": "assistant", "content": first.text},
            {"role": "user", "content": "And dogs?"},
        ]
        reply = gen.complete(messages, sp)
        assert reply.token_ids == _hf_reply(oracle, _render(tok, messages), 5)
        assert reply.num_reused_shared > 0
        with pytest.raises(ValueError, match="a str 'content'"):
            gen.complete([{"role": "user"}], sp)


def test_a_template_rewrite_inside_a_shared_block_gives_the_rewriter_a_private_copy():
    from tests.engine.test_text_mode import REWRITING_TEMPLATE, _hf_reply, _render, tokenizer

    tok = copy.deepcopy(tokenizer.__wrapped__())
    tok.chat_template = REWRITING_TEMPLATE
    model = tiny_model("qwen2", seed=2, vocab=len(tok))
    oracle = oracle_copy(model)
    sp = SamplingParams(max_new_tokens=4, temperature=0, ignore_eos=True)
    with StatefulGenerator(model, tok, CacheConfig(block_size=BS, num_device_blocks=128)) as gen:
        kv = gen.engine.kv
        texts = {}
        for conv_id in ("x", "y"):  # the same first message: the same tokens, shared chunks
            reply = gen.generate(conv_id, "Hello there", sp)
            texts[conv_id] = reply.text
        shared_before = [c for c in kv.conversations["y"].chunks if c.refs == 2]
        assert shared_before
        y_blocks = [c.block for c in kv.conversations["y"].chunks]
        messages = [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": texts["x"]}]
        messages.append({"role": "user", "content": "And more?"})
        reply = gen.generate("x", "And more?", sp)  # the header's turn count changes: rewritten inside block 2
        assert reply.token_ids == _hf_reply(oracle, _render(tok, messages), 4)
        assert [c.block for c in kv.conversations["y"].chunks] == y_blocks  # y untouched
        assert all(c.tier == Tier.DEVICE for c in kv.conversations["y"].chunks)
        messages_y = [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": texts["y"]}]
        messages_y.append({"role": "user", "content": "Something else"})
        reply_y = gen.generate("y", "Something else", sp)
        assert reply_y.token_ids == _hf_reply(oracle, _render(tok, messages_y), 4)
        kv.check_integrity()


def test_shared_chunks_are_one_file_on_disk_and_outlive_one_forget(model, oracle, tmp_path):
    system = _system(12, 4)
    histories: dict[str, list[int]] = {}
    with _open(model, disk_dir=tmp_path) as gen:
        _turn(gen, oracle, histories, "a", system + _msg(1))
        _turn(gen, oracle, histories, "b", system + _msg(2))
    files = {p.name for p in (tmp_path / "kv").iterdir()}
    shared = {f"{k.hex()}.safetensors" for k in prefix_keys(system, BS)}
    assert shared <= files  # written once, by whichever conversation went first
    per_conv = {c: {f"{k.hex()}.safetensors" for k in prefix_keys(histories[c], BS)} & files for c in "ab"}
    assert per_conv["a"] & per_conv["b"] == shared
    with _open(model, disk_dir=tmp_path) as gen:
        gen.end("a", forget=True)
        left = {p.name for p in (tmp_path / "kv").iterdir()}
        assert shared <= left and not (per_conv["a"] - shared) & left  # a's own files are gone, the shared stay
        reply = _turn(gen, oracle, histories, "b", _msg(3))
        assert reply.num_reused_disk == len(histories["b"]) - 5 - 4 - 1 and reply.num_recomputed == 0
        gen.end("b", forget=True)
    assert not list((tmp_path / "kv").iterdir())  # nothing references anything: every file is removed


def test_files_nothing_references_are_removed_when_the_disk_dir_opens(model, oracle, tmp_path):
    with _open(model, disk_dir=tmp_path, device=16) as gen:
        for i in range(6):  # completions leave chunks only the tree holds; a small device pushes them to disk
            gen.complete(_system(10, i) + _msg(i), GREEDY)
        _turn(gen, oracle, {}, "kept", _msg(9, 9))
        assert gen.stats()["disk_write_chunks"] > 0
    stray = Path(tmp_path) / "kv" / f"{'ab' * 16}.safetensors"
    stray.write_bytes(b"not referenced")
    with _open(model, disk_dir=tmp_path) as gen:
        keys = {p.name for p in (tmp_path / "kv").iterdir()}
        assert not stray.exists() and gen.engine.kv.disk.num_removed_files > 0
        history = gen.engine.kv.lookup("kept").tokens
        assert keys and keys <= {f"{k.hex()}.safetensors" for k in referenced_keys(history, BS)}


def test_a_failed_step_leaves_shared_chunks_intact_and_completions_gone(model, oracle, monkeypatch):
    system = _system(12, 6)
    histories: dict[str, list[int]] = {}
    with _open(model) as gen:
        _turn(gen, oracle, histories, "a", system + _msg(1))
        runner = gen.engine.runner
        real_run = runner.run

        def failing(plan):
            raise RuntimeError("device lost")

        monkeypatch.setattr(runner, "run", failing)
        with pytest.raises(RuntimeError, match="device lost"):
            gen.complete(system + _msg(2), GREEDY)
        monkeypatch.setattr(runner, "run", real_run)
        kv = gen.engine.kv
        kv.check_integrity()
        assert gen.conversations() == ["a"] and all(c.refs == 1 for c in kv.conversations["a"].chunks)
        prompt = system + _msg(3)
        reply = gen.complete(prompt, GREEDY)  # the shared prefix is still there, and still right
        assert reply.token_ids == hf_greedy(oracle, prompt, 4) and reply.num_reused_shared == 12
        _turn(gen, oracle, histories, "a", _msg(4))


def test_match_sparse_looks_past_blocks_the_tree_lacks_and_stops_at_its_last_node():
    from pensieve.cache.tree import PromptTree

    tree = PromptTree(BS)
    tokens = _system(6 * BS + 2, 5)
    keys = prefix_keys(tokens, BS)
    assert tree.match_sparse(tokens) == []
    held = {1: Chunk(Tier.DEVICE, 7, index=1, key=keys[1]), 3: Chunk(Tier.HOST, 2, index=3, key=keys[3])}
    for chunk in held.values():
        tree.insert(chunk)
    found = tree.match_sparse(tokens)
    assert [k for k, _ in found] == keys[:4]  # through the last node held; blocks 4 and 5 not
    assert [c for _, c in found] == [None, held[1], None, held[3]]
    assert tree.match(tokens) == []  # the prefix lookup stops at block 0
    assert tree.match_sparse(tokens, 2, keys[1]) == [(keys[2], None), (keys[3], held[3])]
    assert tree.match_sparse(tokens, limit=3 * BS + 3) == found[:2]  # the full blocks of tokens[:limit] only
    other = tokens[:BS] + [t + 1 for t in tokens[BS : 2 * BS]] + tokens[2 * BS :]
    assert tree.match_sparse(other) == []  # a key names its whole path: other tokens before a node miss it


def test_a_stateless_client_reuses_the_chunks_after_evicted_leading_ones_and_recomputes_those(model, oracle):
    """Pensieve's policy drops a finished history's leading chunks first (the cheapest to recompute). A stateless
    client resending that history still finds the chunks after them: only the holes are recomputed."""
    with _open(model, device=16) as gen:
        kv = gen.engine.kv
        prompt = _system(30, 2)
        first = gen.complete(prompt, GREEDY)
        assert first.token_ids == hf_greedy(oracle, prompt, 4)
        other = _system(26, 3)  # unrelated: its blocks push the first history's out, leading chunks first
        assert gen.complete(other, GREEDY).token_ids == hf_greedy(oracle, other, 4)
        again = prompt + first.token_ids + _msg(4)
        keys = prefix_keys(again, BS, (len(again) - 1) // BS)
        held = [kv.tree.get(k) is not None and kv.tree.get(k).tier == Tier.DEVICE for k in keys]
        last = max(i for i, h in enumerate(held) if h)
        holes = held[: last + 1].count(False)
        assert not held[0] and holes > 0 and last > holes, f"expected leading holes, then kept chunks: {held}"
        second = gen.complete(again, GREEDY)
        assert second.token_ids == hf_greedy(oracle, again, 4)
        computed = len(prompt) + 4 - 1  # the positions the first completion computed (its partial tail included)
        assert last == computed // BS - 1  # its last full chunk was kept, so its tail continues it
        assert second.num_reused_device == BS * (last + 1 - holes) + computed % BS
        # a completion has no history of its own: the holes it recomputes count as prefill, with the new tokens
        assert second.num_prefilled == BS * holes + len(again) - computed and second.num_recomputed == 0
        kv.check_integrity()
