"""OpenAI-compatible /v1/completions and /v1/chat/completions (Strata's fields under `strata`)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from service.generation.runner import Prepared, new_id
from service.generation.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionChoice,
    CompletionRequest,
    OpenAIRequest,
)
from service.routes.generate import ended, generation, sse
from service.schemas import ERROR_RESPONSES

router = APIRouter(tags=["openai"], responses=ERROR_RESPONSES)
STREAM_DOC = {200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE with stream=true"}}


async def _stream(gen, prepared: Prepared, body: OpenAIRequest, chunk) -> AsyncIterator[str]:
    """OpenAI chunks: deltas, a last chunk with finish_reason (and `strata`), usage if asked."""
    async with contextlib.aclosing(gen.events(prepared)) as events:  # its cleanup runs now
        async for kind, data in events:
            if kind == "token" and data["delta"]:
                yield sse(chunk(data["delta"], None))
            elif kind == "finish":
                last = chunk(data["delta"], prepared.finish_reason)
                last["strata"] = prepared.info().model_dump(mode="json")
                yield sse(last)
                if body.stream_options and body.stream_options.include_usage:
                    yield sse({**chunk("", None), "choices": [], "usage": prepared.usage().model_dump()})
            elif kind == "error":
                yield sse(server_error(data["error"]))


def server_error(message: str) -> dict:
    return {"error": {"message": message, "type": "server_error"}}


def streamed(gen, prepared: Prepared, body: OpenAIRequest, chunk) -> StreamingResponse:
    """The SSE response, ending with [DONE] (after an error event if it failed on the way)."""
    return StreamingResponse(
        ended(_stream(gen, prepared, body, chunk), server_error), media_type="text/event-stream"
    )


@router.post("/v1/completions", response_model=Completion, responses=STREAM_DOC)
async def completions(body: CompletionRequest, request: Request):
    gen = generation(request)
    model, merge = gen.composition(body.model, body.merge)
    prompt_ids = await gen.encode_async(model, body.prompt_text(), None)
    prepared = await gen.prepare(
        model, prompt_ids, body.new_tokens(), body, body, streaming=body, merge=merge
    )
    response_id, created = new_id("cmpl"), int(time.time())
    if not body.stream:
        text = await gen.complete(prepared, request.is_disconnected)
        return Completion(
            id=response_id,
            created=created,
            model=body.model,
            choices=[CompletionChoice(text=text, finish_reason=prepared.finish_reason)],
            usage=prepared.usage(),
            strata=prepared.info(),
        )

    def chunk(delta: str, finish: str | None) -> dict:
        choice = {"index": 0, "text": delta, "finish_reason": finish, "logprobs": None}
        return {
            "id": response_id,
            "object": "text_completion",
            "created": created,
            "model": body.model,
            "choices": [choice],
        }

    return streamed(gen, prepared, body, chunk)


@router.post("/v1/chat/completions", response_model=ChatCompletion, responses=STREAM_DOC)
async def chat_completions(body: ChatCompletionRequest, request: Request):
    gen = generation(request)
    model, merge = gen.composition(body.model, body.merge)
    prompt_ids = await gen.encode_async(model, None, body.messages)
    prepared = await gen.prepare(
        model, prompt_ids, body.new_tokens(), body, body, streaming=body, merge=merge
    )
    response_id, created = new_id("chatcmpl"), int(time.time())
    if not body.stream:
        text = await gen.complete(prepared, request.is_disconnected)
        return ChatCompletion(
            id=response_id,
            created=created,
            model=body.model,
            choices=[
                ChatChoice(message=AssistantMessage(content=text), finish_reason=prepared.finish_reason)
            ],
            usage=prepared.usage(),
            strata=prepared.info(),
        )
    first = True

    def chunk(delta: str, finish: str | None) -> dict:
        nonlocal first
        content = {"role": "assistant", "content": delta} if first else {"content": delta}
        first = False
        choice = {
            "index": 0,
            "delta": content if (delta or finish is None) else {},
            "finish_reason": finish,
            "logprobs": None,
        }
        return {
            "id": response_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": body.model,
            "choices": [choice],
        }

    return streamed(gen, prepared, body, chunk)
