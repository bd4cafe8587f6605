"""Cluster on a local Ray runtime: every reply equals HF generate over the full history (float64 tiny models),
for colocated, P/D and mixed roles, after KV transfers and rebalancing, and after an instance is killed."""

import asyncio
import functools
import time

import pytest

from pensieve import CacheConfig, Generator, SamplingParams
from pensieve.models.smollm2 import GGUF_NAME, smollm2_path
from tests.tiny import hf_greedy, oracle_copy, tiny_model

pytestmark = pytest.mark.slow

BS = 4
GREEDY = SamplingParams(max_new_tokens=4, temperature=0, ignore_eos=True)


def _msg(seed: int, n: int = 6) -> list[int]:
    return [3 + (seed * 37 + i * 13) % 110 for i in range(n)]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_path(), gguf_file=GGUF_NAME)


@pytest.fixture(scope="module")
def mixed(ray_runtime, tokenizer):
    """A colocated instance, a prefill instance and a decode instance; a text-capable tiny model. KV moves through
    ray.util.collective (gloo here, NCCL between GPUs); the `pair` cluster below moves it through the object store."""
    from pensieve.cluster import Cluster

    factory = functools.partial(tiny_model, "llama", seed=5, vocab=len(tokenizer))
    cluster = Cluster(
        factory,
        tokenizer,
        roles=["colocated", "prefill", "decode"],
        cache_config=CacheConfig(block_size=BS, num_device_blocks=96),
        num_threads=1,
        transport="collective",
    )
    oracle = oracle_copy(factory())
    oracle.generation_config.eos_token_id = None
    yield cluster, oracle
    cluster.close()


def _turn(cluster, oracle, histories, conv_id, msg):
    reply = cluster.generate(conv_id, msg, GREEDY)
    history = histories.get(conv_id, []) + msg
    assert reply.token_ids == hf_greedy(oracle, history, GREEDY.max_new_tokens), conv_id
    histories[conv_id] = history + reply.token_ids
    return reply


def test_colocated_and_pd_turns_are_exact(mixed):
    cluster, oracle = mixed
    histories: dict = {}
    for turn in range(3):
        for conv in ("a", "b", "c", "d"):
            _turn(cluster, oracle, histories, conv, _msg(turn * 5 + ord(conv), 6 + turn))
        cluster.check_integrity()
    owners = {cluster.owner(c) for c in "abcd"}
    assert owners == {"colocated-0", "decode-2"}  # new conversations spread over both decoding instances
    batch = {c: _msg(ord(c), 5) for c in "abcd"}
    replies = cluster.generate_batch(batch, GREEDY)
    for c, reply in replies.items():
        histories[c] += batch[c]
        assert reply.token_ids == hf_greedy(oracle, histories[c], GREEDY.max_new_tokens)
        histories[c] += reply.token_ids
    cluster.check_integrity()
    stats = cluster.stats()
    assert stats["pd_prefills"] > 0 and stats["sendbacks"] > 0 and stats.get("failovers", 0) == 0
    for name in ("prefill-1", "decode-2"):  # both directions of the collective transport carried KV, none lost
        assert stats["per_instance"][name]["received_chunks"] > 0
        assert stats["per_instance"][name]["transfers_failed"] == 0


def test_pd_with_send_back_prefills_only_the_new_tokens(mixed):
    cluster, oracle = mixed
    histories: dict = {}
    conv = None
    for i in range(4):  # find a new conversation the router puts on the decode instance
        name = f"pd-{i}"
        _turn(cluster, oracle, histories, name, _msg(40 + i, 9))
        if cluster.owner(name) == "decode-2":
            conv = name
            break
    assert conv is not None
    for turn in range(3):
        before = cluster.stats()["tokens_prefilled_remote"]
        reply = _turn(cluster, oracle, histories, conv, _msg(50 + turn, 7))
        remote = cluster.stats()["tokens_prefilled_remote"] - before
        # the prefill instance computed the new tokens only (the reply came back), the decode instance the last one
        assert remote == reply.num_new_tokens, (turn, remote, reply.num_new_tokens)
        assert reply.num_prefilled == reply.num_new_tokens + 1 and reply.num_recomputed == 0  # + the last one
    cluster.check_integrity()


def test_text_mode_stream_complete_fork_end(mixed, tokenizer):
    cluster, oracle = mixed
    sp = SamplingParams(max_new_tokens=5, temperature=0, ignore_eos=True)

    def hf(messages):
        ids = list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False))
        return hf_greedy(oracle, ids, sp.max_new_tokens)

    messages = []
    for text in ("Hello there", "Tell me about cats"):
        reply = cluster.generate("text", text, sp)
        messages.append({"role": "user", "content": text})
        assert reply.token_ids == hf(messages)
        messages.append({"role": "assistant", "content": reply.text})
    stream = cluster.stream("text", "And dogs?", sp)
    pieces = list(stream)
    messages.append({"role": "user", "content": "And dogs?"})
    assert stream.reply.token_ids == hf(messages) and "".join(pieces) == stream.reply.text
    messages.append({"role": "assistant", "content": stream.reply.text})
    reply = asyncio.run(cluster.agenerate("text", "Thanks!", sp))
    assert reply.token_ids == hf([*messages, {"role": "user", "content": "Thanks!"}])
    done = cluster.complete([{"role": "user", "content": "Hello there"}], sp)
    assert done.conv_id is None and done.token_ids == hf(messages[:1])
    both = cluster.complete_batch([[{"role": "user", "content": t}] for t in ("Hello there", "Tell me about cats")], sp)
    assert [r.token_ids for r in both] == [hf(messages[:1]), hf([{"role": "user", "content": "Tell me about cats"}])]
    assert isinstance(cluster, Generator) and not cluster.capabilities.streamed_complete
    cluster.fork("text", "text-branch")
    branch = cluster.generate("text-branch", "Bye", sp)
    later = [{"role": "user", "content": "Thanks!"}, {"role": "assistant", "content": reply.text}]
    assert branch.token_ids == hf([*messages, *later, {"role": "user", "content": "Bye"}])
    cluster.end("text-branch")
    assert "text-branch" not in cluster.conversations()
    with pytest.raises(KeyError):
        cluster.end("text-branch")
    cluster.check_integrity()


def test_bad_input_gets_the_single_instance_errors_and_changes_nothing(mixed):
    cluster, oracle = mixed
    histories: dict = {}
    _turn(cluster, oracle, histories, "bad", _msg(1))
    before = cluster.conversations()
    cases = [
        (lambda: cluster.generate(7, _msg(2)), "conv_id must be a non-empty str"),
        (lambda: cluster.generate("bad", "a str in raw mode"), "raw token mode"),
        (lambda: cluster.generate("bad", [10**6]), r"token ids must be ints in \[0, "),
        (lambda: cluster.generate("bad", []), "non-empty str, chat message\\(s\\) or list of token ids"),
        (lambda: cluster.generate("bad", _msg(2), {"max_new_tokens": 3}), "sampling must be a SamplingParams"),
        (lambda: cluster.generate_batch({"bad": _msg(2), "new": [10**6]}), "token ids must be ints"),
        (lambda: cluster.generate("huge", _msg(3, 200), SamplingParams(max_new_tokens=400)), "positions"),
        (lambda: cluster.complete([]), "prompt must be a non-empty list"),
        (lambda: cluster.fork("nobody", "x"), "nobody"),
    ]
    for call, message in cases:
        with pytest.raises((ValueError, KeyError), match=message):
            call()
    assert cluster.conversations() == before
    _turn(cluster, oracle, histories, "bad", _msg(4))  # unchanged: the next turn is exact
    cluster.check_integrity()


@pytest.fixture(scope="module")
def pair(ray_runtime):
    """Two colocated instances; the router moves KV as soon as load is imbalanced (transfer priced cheap)."""
    from pensieve.cluster import Cluster, RouterConfig

    factory = functools.partial(tiny_model, "llama", seed=6)
    router = RouterConfig(balance_abs_threshold=1, balance_rel_threshold=1.0, prefill_tokens_per_s=50.0, queue_s=1.0)
    cluster = Cluster(
        factory,
        roles=["colocated", "colocated"],
        cache_config=CacheConfig(block_size=BS, num_device_blocks=128),
        router_config=router,
        num_threads=1,
    )
    yield cluster, oracle_copy(factory())
    cluster.close()


def test_rebalancing_moves_conversations_with_their_kv_exactly(pair):
    cluster, oracle = pair
    system = _msg(99, 10 * BS)
    histories: dict = {}
    for i in range(6):  # one after another: all on the instance holding the shared system prompt
        _turn(cluster, oracle, histories, f"r{i}", system + _msg(i))
    assert {cluster.owner(f"r{i}") for i in range(6)} == {"colocated-0"}
    batch = {f"r{i}": _msg(10 + i) for i in range(6)}
    replies = cluster.generate_batch(batch, GREEDY)  # dispatched together: the load on colocated-0 piles up
    for conv, reply in replies.items():
        histories[conv] += batch[conv]
        assert reply.token_ids == hf_greedy(oracle, histories[conv], GREEDY.max_new_tokens), conv
        histories[conv] += reply.token_ids
    stats = cluster.stats()
    assert stats["routed_balance"] > 0 and stats["transfers"] > 0 and stats["moved_conversations"] > 0
    moved = [c for c in batch if cluster.owner(c) == "colocated-1"]
    assert moved
    received = stats["per_instance"]["colocated-1"]["received_chunks"]
    assert received > 0
    for conv in moved:  # they go on there, exactly, from the KV that was moved
        reply = _turn(cluster, oracle, histories, conv, _msg(30))
        assert reply.num_recomputed == 0
    cluster.check_integrity()


def test_a_failed_transfer_falls_back_to_recompute(pair, ray_runtime):
    """A turn whose KV transfer failed (the sender raised) is computed where it runs, exactly."""
    cluster, oracle = pair
    histories: dict = {}
    _turn(cluster, oracle, histories, "t0", _msg(61, 10))
    owner = cluster.owner("t0")
    other = next(name for name in ("colocated-0", "colocated-1") if name != owner)
    failed = cluster.handle(owner).read.remote(None, 0, "no-such-conversation")  # raises KeyError there
    before = ray_runtime.get(cluster.handle(other).stats.remote())["transfers_failed"]
    msg = _msg(62)
    history = histories["t0"]
    ref = cluster.handle(other).generate.remote("t0", msg, GREEDY, (list(history), None), [failed])
    result = ray_runtime.get(ref)
    assert result["reply"].token_ids == hf_greedy(oracle, history + msg, GREEDY.max_new_tokens)
    assert result["reply"].num_recomputed == len(history) - 1  # everything it had no KV for
    assert ray_runtime.get(cluster.handle(other).stats.remote())["transfers_failed"] == before + 1
    ray_runtime.get(cluster.handle(other).end.remote("t0"))  # (the driver never saw this turn: put it back)
    cluster.check_integrity()


def test_an_unanswered_ping_stops_routing_until_the_answer_comes(pair):
    cluster, oracle = pair
    before = cluster.stats()
    live = cluster.ping(timeout_s=0)  # nobody answers within no time: not routed to (until they answer)
    stats = cluster.stats()
    lost = stats.get("instances_unresponsive", 0) - before.get("instances_unresponsive", 0)
    assert lost == 2 - len(live) and sorted(live) == stats["alive"]
    time.sleep(0.5)
    histories: dict = {}
    _turn(cluster, oracle, histories, "p0", _msg(77))  # the answers arrived: both are routed to again
    stats = cluster.stats()
    assert stats["alive"] == ["colocated-0", "colocated-1"]
    assert stats.get("instances_back", 0) - before.get("instances_back", 0) == lost


def test_a_killed_instance_loses_no_conversation(pair, ray_runtime):
    cluster, oracle = pair
    histories: dict = {}
    for conv in ("k0", "k1", "k2"):
        _turn(cluster, oracle, histories, conv, _msg(ord(conv[1]), 9))
    victim = cluster.owner("k0")
    ray_runtime.kill(cluster.handle(victim))
    for turn in range(2):
        for conv in ("k0", "k1", "k2"):
            _turn(cluster, oracle, histories, conv, _msg(turn + ord(conv[1]), 5))
    stats = cluster.stats()
    assert victim not in stats["alive"] and stats["failovers"] >= 1 and stats["instances_lost"] == 1
    assert {cluster.owner(c) for c in ("k0", "k1", "k2")} == set(stats["alive"])
    assert cluster.ping() == stats["alive"]
    survivor = stats["alive"][0]
    assert stats["per_instance"][survivor]["tokens_recomputed"] > 0  # the victim's conversations, recomputed
    cluster.check_integrity()
