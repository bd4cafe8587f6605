"""An agent's tool loop through the official `openai` client against `pensieve serve`: the whole history is resent
on every call (as agent frameworks do), and pensieve prefills only what is new — its own earlier tool calls keep
the tokens it sampled, so the cache still matches past every call.

python examples/agent.py                         # starts a server on the bundled SmolLM2-135M-Instruct
python examples/agent.py --api responses         # the same loop through /v1/responses (previous_response_id)
python examples/agent.py --base-url http://127.0.0.1:8000/v1   # against a running `pensieve serve`

The script picks the tool each step (a forced tool_choice), so a 135M model's choices do not decide the trace; the
arguments are the model's, constrained to the tool's schema. Per call it prints the prompt, the tokens reused from
the cache, and those prefilled, beside what the history grew by since the previous call.
"""

from __future__ import annotations

import argparse
import json
import sys

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Today's weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo", "Rome"]}},
                       "required": ["city"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "pack", "description": "Add an item to the picnic basket",
        "parameters": {"type": "object", "properties": {"item": {"type": "string", "maxLength": 24}},
                       "required": ["item"], "additionalProperties": False}}},
]  # fmt: skip
PLAN = ["get_weather", "get_weather", "pack", "pack"]  # the tool forced at each step
WEATHER = {"Paris": "sunny, 24 C", "Oslo": "rain, 9 C", "Rome": "clear, 28 C"}


def run_tool(name: str, arguments: str) -> str:
    args = json.loads(arguments)
    if name == "get_weather":
        return json.dumps({"city": args["city"], "forecast": WEATHER[args["city"]]})
    return json.dumps({"packed": args["item"], "basket_size": 1})


def start_server():
    """`pensieve serve` in this process on the bundled model (engine on a thread of its own)."""
    import torch

    from pensieve import StatefulGenerator
    from pensieve.config import EngineConfig
    from pensieve.models.smollm2 import load_smollm2
    from pensieve.server import Server, ServerConfig

    model, tokenizer = load_smollm2(torch.float32)
    gen = StatefulGenerator(model, tokenizer, engine_config=EngineConfig(compile=False))
    server = Server(gen, tokenizer, config=ServerConfig(model_name="smollm2")).start(engine_thread=True)
    return server, gen


def report(step: int, what: str, usage_in: int, cached: int, stats: dict, grew: int | None) -> None:
    new = "" if grew is None else f"  (history grew by {grew})"
    print(
        f"[{step}] {what:<44} prompt {usage_in:5d}  reused {cached:5d}  prefilled {stats['prefilled_tokens']:4d}{new}"
    )


def chat_loop(client, model: str) -> None:
    messages = [
        {"role": "system", "content": "You plan picnics. Use the tools."},
        {"role": "user", "content": "Plan a picnic: check the weather in two cities, then pack two things."},
    ]
    before = None  # the previous call's prompt + reply tokens
    for step, tool in enumerate([*PLAN, None]):
        choice = {"type": "function", "function": {"name": tool}} if tool else "none"
        out = client.chat.completions.create(model=model, messages=messages, tools=TOOLS, tool_choice=choice,
                                             temperature=0, max_tokens=48)  # fmt: skip
        message = out.choices[0].message
        usage = out.usage
        grew = None if before is None else usage.prompt_tokens - before
        what = (f"{message.tool_calls[0].function.name}({message.tool_calls[0].function.arguments})"
                if message.tool_calls else f"answer: {(message.content or '')[:34]!r}")  # fmt: skip
        report(step, what[:44], usage.prompt_tokens, usage.prompt_tokens_details.cached_tokens,
               out.model_extra["stats"], grew)  # fmt: skip
        before = usage.prompt_tokens + usage.completion_tokens
        if not message.tool_calls:
            break
        messages.append(message.model_dump(exclude_none=True))  # the call, resent as parsed JSON
        for call in message.tool_calls:
            messages.append({"role": "tool", "tool_call_id": call.id,
                             "content": run_tool(call.function.name, call.function.arguments)})  # fmt: skip


def responses_loop(client, model: str) -> None:
    flat = [{"type": "function", **t["function"]} for t in TOOLS]
    items: list = ["Plan a picnic: check the weather in two cities, then pack two things."]
    previous, before = None, None
    for step, tool in enumerate([*PLAN, None]):
        choice = {"type": "function", "name": tool} if tool else "none"
        out = client.responses.create(model=model, input=items[-1], previous_response_id=previous, tools=flat,
                                      tool_choice=choice, instructions="You plan picnics. Use the tools.",
                                      temperature=0, max_output_tokens=48)  # fmt: skip
        calls = [item for item in out.output if item.type == "function_call"]
        grew = None if before is None else out.usage.input_tokens - before
        what = f"{calls[0].name}({calls[0].arguments})" if calls else f"answer: {out.output_text[:34]!r}"
        report(step, what[:44], out.usage.input_tokens, out.usage.input_tokens_details.cached_tokens,
               out.model_extra["stats"], grew)  # fmt: skip
        before = out.usage.input_tokens + out.usage.output_tokens
        if not calls:
            break
        items.append([{"type": "function_call_output", "call_id": c.call_id, "output": run_tool(c.name, c.arguments)}
                      for c in calls])  # fmt: skip
        previous = out.id


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base-url", help="a running server's /v1 URL (default: start one here)")
    parser.add_argument("--api-key", default="none")
    parser.add_argument("--model", default=None, help="the served model's name (default: the server's first)")
    parser.add_argument("--api", choices=["chat", "responses"], default="chat")
    args = parser.parse_args(argv)
    import openai

    server = gen = None
    if args.base_url is None:
        server, gen = start_server()
        args.base_url = server.url + "/v1"
    try:
        client = openai.OpenAI(base_url=args.base_url, api_key=args.api_key, max_retries=0)
        model = args.model or client.models.list().data[0].id
        print(f"{args.api} tool loop against {args.base_url} ({model})")
        (chat_loop if args.api == "chat" else responses_loop)(client, model)
    finally:
        if server is not None:
            server.stop()
            gen.close()


if __name__ == "__main__":
    sys.exit(main())
