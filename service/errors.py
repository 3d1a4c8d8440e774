"""JSON error responses written straight to ASGI `send`, for middleware that answers before routing."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from starlette.types import Send


async def send_json_error(
    send: Send, status: int, detail: str, headers: dict[str, str] | None = None
) -> None:
    body = json.dumps({"detail": detail}).encode()
    raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw_headers += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body})


MAX_ERRORS = 10
MAX_TEXT = 300


def clip(text: str, limit: int = MAX_TEXT) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def short_errors(errors: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Pydantic's field errors without the input, its context or URLs, a few and short: an error body
    never echoes what was sent (which may be megabytes, or NaN that JSON cannot carry)."""
    shown = []
    for error in list(errors)[:MAX_ERRORS]:
        loc = [part if isinstance(part, int) else clip(str(part), 60) for part in error.get("loc", ())]
        shown.append({"loc": loc, "msg": clip(str(error.get("msg", ""))), "type": str(error.get("type", ""))})
    if len(errors) > MAX_ERRORS:
        shown.append(
            {"loc": [], "msg": f"... and {len(errors) - MAX_ERRORS} more errors", "type": "truncated"}
        )
    return shown


def short_detail(detail: object) -> object:
    """An HTTPException's detail, clipped: strings to a few hundred characters, lists as `short_errors`."""
    if isinstance(detail, str):
        return clip(detail, 1000)
    if isinstance(detail, list) and all(isinstance(e, dict) for e in detail):
        return short_errors(detail)
    return clip(str(detail), 1000)
