"""Refuse JSON bodies holding a string that is not valid Unicode: a lone surrogate (`"\\ud800"`) is legal
JSON but no UTF-8 text, so it would fail wherever the string meets Redis, a tokenizer or a file name —
as a 500. Every JSON body gets its 422 here instead, before routing (YAML bodies are checked where they
are parsed, `service.routes.jobs`).

Cheap for everything else: a body is parsed here only if it has a `\\uD800`-`\\uDFFF` escape at all."""

from __future__ import annotations

import json
import re
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import send_json_error

SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
MESSAGE = "the request holds a string that is not valid Unicode (a lone UTF-16 surrogate such as \\ud800)"


def has_lone_surrogate(value: Any) -> bool:
    """Whether a parsed body (JSON or YAML: dicts, lists, scalars) holds a string UTF-8 cannot encode."""
    try:
        json.dumps(value, ensure_ascii=False, default=str).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def json_type(scope: Scope) -> bool:
    for name, value in scope["headers"]:
        if name == b"content-type":
            media = value.split(b";")[0].strip().lower()
            return media == b"application/json" or media.endswith(b"+json")
    return True  # no content type: FastAPI parses the body as JSON


class UnicodeGuardMiddleware:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS") or not json_type(scope):
            await self.app(scope, receive, send)
            return
        messages: list[Message] = []
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request" or not message.get("more_body", False):
                break
        body = b"".join(m.get("body", b"") for m in messages)
        if SURROGATE_ESCAPE.search(body):
            try:
                parsed = json.loads(body)
            except ValueError:  # not JSON at all: the route's own 422
                parsed = None
            if has_lone_surrogate(parsed):
                await send_json_error(send, 422, MESSAGE)
                return

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)
