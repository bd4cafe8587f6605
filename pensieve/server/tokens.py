"""`POST /tokenize`, `POST /detokenize` (vLLM's shape): the served tokenizer and chat template, so a client can count a
prompt's tokens before sending it, see what a chat renders to (the tools included), or read ids back."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter

from pensieve.server.chat import ChatMessage, NamedToolChoice, ToolDef
from pensieve.server.common import APIError, State, Strict, chat_message, request_tools
from pensieve.structured.tools import ChatFormat

router = APIRouter()


class TokenizeRequest(Strict):
    model: str | None = None
    prompt: str | None = None  # a raw text
    messages: list[ChatMessage] | None = None  # or a chat, through the chat template
    add_generation_prompt: bool = True
    add_special_tokens: bool | None = None  # raw text only: the tokenizer's BOS etc. (default: yes)
    tools: list[ToolDef] | None = None
    tool_choice: str | NamedToolChoice | None = None  # accepted (does not change the prompt)
    return_token_strs: bool = False


class DetokenizeRequest(Strict):
    model: str | None = None
    tokens: list[int]


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, s: State):
    s.check_model(body.model)
    tokenizer = s.tokenizer
    if (body.prompt is None) == (body.messages is None):
        raise APIError(400, "give prompt (text) or messages (a chat), not both or neither", param="prompt")
    if body.messages is not None:
        if body.add_special_tokens is not None:
            raise APIError(400, "add_special_tokens applies to a prompt; a chat's come from its template",
                           param="add_special_tokens")  # fmt: skip
        s.check_count(len(body.messages), "messages", "messages")
        messages = [chat_message(m) for m in body.messages]
        tools = request_tools([t.model_dump(exclude_none=True) for t in body.tools or []], None, None)

        def render() -> list[int]:
            return ChatFormat.of(tokenizer).render(tokenizer, messages, tools, body.add_generation_prompt)

        try:
            tokens = await asyncio.to_thread(render)
        except ValueError as error:  # the template refused the messages
            raise APIError(400, f"messages: {error}", param="messages") from None
    else:
        special = True if body.add_special_tokens is None else body.add_special_tokens
        tokens = await asyncio.to_thread(lambda: list(tokenizer.encode(body.prompt, add_special_tokens=special)))
    out: dict = {"count": len(tokens), "max_model_len": s.gen.capabilities.max_model_len, "tokens": tokens}
    if body.return_token_strs:
        out["token_strs"] = tokenizer.convert_ids_to_tokens(tokens)
    return out


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, s: State):
    s.check_model(body.model)
    vocab = s.gen.capabilities.vocab_size or len(s.tokenizer)
    bad = [t for t in body.tokens if not 0 <= t < vocab]
    if bad:
        raise APIError(400, f"tokens must be ids in [0, {vocab}): got {bad[:5]}", param="tokens")
    return {"prompt": await asyncio.to_thread(s.tokenizer.decode, body.tokens)}
