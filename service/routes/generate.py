"""/v1/generate: text plus the exit depth it was computed at; server-sent events with stream=true."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from service.generation.runner import Generation, Prepared, new_id
from service.generation.schemas import GenerateRequest, GenerateResponse
from service.schemas import ERROR_RESPONSES

router = APIRouter(tags=["generation"], responses=ERROR_RESPONSES)
log = logging.getLogger("strata")


def generation(request: Request) -> Generation:
    state = request.app.state
    return Generation(state.redis, state.aredis, state.settings)


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


async def ended(chunks: AsyncIterator[str], error: Callable[[str], dict]) -> AsyncIterator[str]:
    """`chunks` then `data: [DONE]`, whatever happens: once the response has started no status can tell of
    a failure, so an exception on the way becomes an error event (`error(message)`) before the [DONE]."""
    try:
        async with contextlib.aclosing(chunks):  # closed with this one: its cleanup cancels the request
            async for chunk in chunks:
                yield chunk
    except Exception:
        log.exception("a streamed generation failed")
        yield sse(error("the server failed while streaming; the generation was stopped"))
    yield sse("[DONE]")


def stream_error(message: str) -> dict:
    return {"type": "error", "error": message}


def respond(prepared: Prepared, response_id: str, model: str) -> GenerateResponse:
    return GenerateResponse(
        id=response_id,
        model=model,
        text=prepared.finish["text"],
        finish_reason=prepared.finish_reason,
        usage=prepared.usage(),
        strata=prepared.info(),
    )


@router.post(
    "/v1/generate",
    response_model=GenerateResponse,
    responses={200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE with stream=true"}},
)
async def generate(body: GenerateRequest, request: Request):
    """Generate at the deepest exit whose predicted latency fits `latency_budget_ms` (full depth without)."""
    gen = generation(request)
    model, merge = gen.composition(body.model, body.merge)
    prompt_ids = await gen.encode_async(model, body.prompt, body.messages)
    prepared = await gen.prepare(
        model, prompt_ids, body.max_new_tokens, body, body, body.speculative, body, merge
    )
    response_id = new_id("gen")
    if not body.stream:
        await gen.complete(prepared, request.is_disconnected)
        return respond(prepared, response_id, model)

    async def stream() -> AsyncIterator[str]:  # [DONE] by `ended`
        async with contextlib.aclosing(gen.events(prepared)) as events:  # its cleanup runs now
            async for kind, data in events:
                if kind == "token" and data["delta"]:
                    yield sse({"type": "token", "text": data["delta"]})
                elif kind == "finish":
                    if data["delta"]:
                        yield sse({"type": "token", "text": data["delta"]})
                    yield sse(
                        {"type": "done", **respond(prepared, response_id, model).model_dump(mode="json")}
                    )
                elif kind == "error":
                    yield sse(stream_error(data["error"]))

    return StreamingResponse(ended(stream(), stream_error), media_type="text/event-stream")
