"""The stateless baseline of benchmarks/scale.py: HF transformers behind the same OpenAI chat endpoint.

What a plain HF deployment does with a chat: every request re-encodes the whole history (the chat template over all
messages) and runs it through the model from scratch, then decodes greedily with HF's own KV cache for that request
only, which is dropped when the reply ends. One request runs at a time (HF's `generate` has no continuous batching;
the others queue in arrival order), on every core (torch threads). Greedy, `ignore_eos` honoured (the reply runs to
max_tokens, as the other servers do for the benchmark), streamed as chat.completion.chunk events with a usage chunk
at the end (cached_tokens 0: nothing is kept).

Usage: python benchmarks/hf_server.py --model FOLDER [--port 8331] [--dtype float32]
Serves /health, /v1/models, /metrics (empty) and POST /v1/chat/completions (streamed or not).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time
import uuid

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from transformers import AutoModelForCausalLM, AutoTokenizer


def create_app(model, tokenizer, served_name: str) -> FastAPI:
    app = FastAPI()
    one_at_a_time = asyncio.Lock()

    @app.get("/health")
    async def health():
        return PlainTextResponse("ok")

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse("")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": served_name, "object": "model", "owned_by": "hf"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        ids = tokenizer.apply_chat_template(body["messages"], add_generation_prompt=True, return_dict=False)
        max_tokens = int(body.get("max_tokens") or 256)
        stop_ids = set() if body.get("ignore_eos") else {tokenizer.eos_token_id}
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(delta: dict, finish=None, usage=None) -> str:
            event = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": served_name,
                     "choices": [{"index": 0, "delta": delta, "finish_reason": finish}] if usage is None else [],
                     "usage": usage}  # fmt: skip
            return f"data: {json.dumps(event)}\n\n"

        async def pieces():
            """(text delta, done) from a generation on a worker thread; it stops when the client goes away."""
            loop, queue, cancel = asyncio.get_running_loop(), asyncio.Queue(), threading.Event()

            def work() -> None:
                try:
                    for item in greedy(model, tokenizer, ids, max_tokens, stop_ids, cancel):
                        loop.call_soon_threadsafe(queue.put_nowait, item)
                except Exception as error:  # (the stream breaks off: the client sees a failed request)
                    loop.call_soon_threadsafe(queue.put_nowait, error)
                finally:
                    loop.call_soon_threadsafe(queue.put_nowait, None)

            async with one_at_a_time:
                thread = threading.Thread(target=work, daemon=True)
                thread.start()
                try:
                    while (item := await queue.get()) is not None:
                        if isinstance(item, Exception):
                            raise item
                        yield item
                finally:
                    cancel.set()
                    await asyncio.to_thread(thread.join)

        if not body.get("stream"):
            out = [text async for text, _ in pieces()]
            n = len(out)
            return JSONResponse({
                "id": cid, "object": "chat.completion", "created": created, "model": served_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(out)},
                             "finish_reason": "length" if n >= max_tokens else "stop"}],
                "usage": _usage(len(ids), n),
            })  # fmt: skip

        async def events():
            n = 0
            yield chunk({"role": "assistant", "content": ""})
            async for text, _ in pieces():
                n += 1
                yield chunk({"content": text})
            yield chunk({}, finish="length" if n >= max_tokens else "stop")
            if (body.get("stream_options") or {}).get("include_usage"):
                yield chunk({}, usage=_usage(len(ids), n))
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": 0}}  # fmt: skip


@torch.inference_mode()
def greedy(model, tokenizer, ids: list[int], max_tokens: int, stop_ids: set[int], cancel: threading.Event):
    """Yields (text delta, token id) per generated token: the whole prompt prefilled, then one token per forward."""
    out = model(torch.tensor([ids]), use_cache=True)
    past, generated, text = out.past_key_values, [], ""
    for i in range(max_tokens):
        token = int(out.logits[0, -1].argmax())
        generated.append(token)
        last = i == max_tokens - 1 or token in stop_ids or cancel.is_set()
        full = tokenizer.decode(generated, skip_special_tokens=True)
        if full.endswith("\ufffd") and not last:  # an incomplete UTF-8 sequence: its text comes with a later token
            yield "", token
        else:
            yield full[len(text) :], token
            text = full
        if last:
            return
        out = model(torch.tensor([[token]]), past_key_values=past, use_cache=True)
        past = out.past_key_values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--served-model-name", default="bench")
    parser.add_argument("--port", type=int, default=8331)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype)).eval()
    print(f"hf stateless: {args.model} in {args.dtype}, {torch.get_num_threads()} threads, no KV kept between "
          "requests", flush=True)  # fmt: skip
    uvicorn.run(create_app(model, tokenizer, args.served_model_name), host="127.0.0.1", port=args.port,
                log_level="warning")  # fmt: skip


if __name__ == "__main__":
    main()
