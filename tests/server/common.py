"""Shared by the server tests: the tiny float64 model behind SmolLM2's tokenizer, and the HF oracle on a chat."""

from __future__ import annotations

import contextlib
import json
import threading
import time

import torch

from tests.tiny import tiny_model

MAX_OUT = 6
SEED = 11


def make_model(tokenizer):
    return tiny_chat_model(len(tokenizer), tokenizer.convert_tokens_to_ids("<|im_end|>"))


def tiny_chat_model(vocab: int, eos: int):
    """The model factory (picklable: cluster instances build it): seeded weights, ChatML's end of turn as EOS."""
    model = tiny_model("llama", seed=SEED, vocab=vocab)
    model.generation_config.eos_token_id = eos
    return model


@contextlib.contextmanager
def served_tiny(tokenizer, config, num_device_blocks: int = 1024, disk_dir=None, step_delay: float = 0.0, wrap=None):
    """A real server on 127.0.0.1 over a fresh generator of the tiny model (engine on its own thread). disk_dir: the
    KV's disk tier and the server's records; step_delay: seconds each engine step waits first (a slow engine, so a
    client acting mid-stream finds the turn running); wrap: Generator -> the Generator the server takes."""
    from pensieve import CacheConfig, StatefulGenerator
    from pensieve.server import Server

    cache = CacheConfig(block_size=4, num_device_blocks=num_device_blocks, disk_dir=disk_dir)
    gen = StatefulGenerator(make_model(tokenizer), tokenizer, cache)
    if step_delay:
        step = gen.engine.step

        def slow_step():
            time.sleep(step_delay)
            step()

        gen.engine.step = slow_step
    served = wrap(gen) if wrap is not None else gen
    server = Server(served, tokenizer, config=config, disk_dir=disk_dir).start(engine_thread=True)
    try:
        yield gen, server
    finally:
        server.stop()
        gen.close()


def openai_client(server):
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)


def hf_reply(oracle, tokenizer, messages, max_new_tokens=MAX_OUT) -> str:
    """The truth: HF generate over the chat template's rendering of every message, decoded."""
    ids = torch.tensor([tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)])
    with torch.no_grad():
        out = oracle.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1] :].tolist(), skip_special_tokens=True)


def hf_chain(oracle, tokenizer, turns, max_new_tokens=MAX_OUT, cut: dict[int, int] | None = None) -> list[str]:
    """The truth for a chain of stateful turns (a response and its follow-ups, a conversation's responses): each
    turn's new messages (a str: one user message) rendered alone after the tokens sampled so far, as pensieve keeps
    them (`ChatFormat.append`; the first turn through the whole template), HF generate over that. cut: turn index ->
    the number of reply tokens that turn kept (a stopped one). -> the replies."""
    from pensieve.structured.tools import ChatFormat

    chat = ChatFormat.of(tokenizer)
    tokens, messages, replies = [], [], []
    for i, turn in enumerate(turns):
        new = [{"role": "user", "content": turn}] if isinstance(turn, str) else list(turn)
        appended = chat.append(tokenizer, tokens, messages, new, None) if messages else None
        tokens = tokens + appended if appended is not None else chat.render(tokenizer, messages + new, None, True)
        ids = torch.tensor([tokens])
        with torch.no_grad():
            limit = (cut or {}).get(i, max_new_tokens)
            out = oracle.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=limit,
                                  do_sample=False)[0, len(tokens):].tolist()  # fmt: skip
        replies.append(tokenizer.decode(out, skip_special_tokens=True))
        tokens = tokens + out
        messages += [*new, {"role": "assistant", "content": replies[-1]}]
    return replies


def abort_mid_stream(server, key: str | None, previous_id: str) -> str:
    """Start a long streamed follow-up of previous_id and go away after two text deltas; wait until the server has
    released the thread. -> the aborted response's id."""
    import httpx2

    thread = server.store.responses[previous_id].thread_id
    body = {"model": "tiny", "input": "Write a long story", "previous_response_id": previous_id, "stream": True,
            "temperature": 0, "max_output_tokens": 60}  # fmt: skip
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    aborted_id, deltas = None, 0
    with httpx2.Client(base_url=server.url, headers=headers) as http:
        with http.stream("POST", "/v1/responses", json=body) as stream:
            for line in stream.iter_lines():
                if line.startswith("data: "):
                    event = json.loads(line[6:])
                    if event["type"] == "response.created":
                        aborted_id = event["response"]["id"]
                    deltas += event["type"] == "response.output_text.delta"
                    if deltas == 2:
                        break  # the client goes away mid-stream
    deadline = time.monotonic() + 60
    while server.store.threads[thread].busy:
        assert time.monotonic() < deadline, "the aborted turn never released its thread"
        time.sleep(0.02)
    return aborted_id


def follow_up_history(first_input: str, first_output: str, follow: str) -> list[dict]:
    return [
        {"role": "user", "content": first_input},
        {"role": "assistant", "content": first_output},
        {"role": "user", "content": follow},
    ]


def stream_and_cancel(server, http, body: dict, after_deltas: int = 2) -> tuple[dict, dict, list[str]]:
    """Stream a response; after `after_deltas` text deltas cancel it from a second connection (the stream is read
    on). -> (the cancel's answer, the stream's last event, the text deltas)."""
    import httpx2

    cancelled: dict = {}
    deltas: list[str] = []
    last = None

    with httpx2.Client(base_url=server.url, headers=http.headers, timeout=60) as streaming:
        with streaming.stream("POST", "/v1/responses", json={**body, "stream": True}) as stream:
            for line in stream.iter_lines():
                if not line.startswith("data: "):
                    continue
                event = json.loads(line[6:])
                if event["type"] == "response.created":
                    rid = event["response"]["id"]
                elif event["type"] == "response.output_text.delta":
                    deltas.append(event["delta"])
                    if len(deltas) == after_deltas:
                        path = f"/v1/responses/{rid}/cancel"
                        canceller = threading.Thread(target=lambda p=path: cancelled.update(http.post(p).json()))
                        canceller.start()
                last = event
    canceller.join()
    return cancelled, last, deltas
