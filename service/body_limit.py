"""Refuse request bodies larger than STRATA_MAX_BODY_BYTES with 413, declared or streamed.

The body is read (at most the limit, so at most a few MiB) before the route runs and replayed to it:
a chunked body that grows past the limit gets its 413 here, never a parse error from the route.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import send_json_error


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int, path_limits: dict[str, tuple[int, str]] | None = None):
        """`path_limits`: exact path -> (limit, the setting that sets it), for routes that take more."""
        self.app = app
        self.max_bytes = max_bytes
        self.path_limits = path_limits or {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        max_bytes, setting = self.path_limits.get(
            scope.get("path", ""), (self.max_bytes, "STRATA_MAX_BODY_BYTES")
        )
        message = f"request body exceeds {max_bytes} bytes ({setting})"
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_bytes:
            await send_json_error(send, 413, message)
            return
        chunks: list[bytes] = []
        seen = 0
        while True:
            msg = await receive()
            if msg["type"] != "http.request":  # the client went away before sending it all
                return
            chunk = msg.get("body", b"")
            seen += len(chunk)
            if seen > max_bytes:
                await send_json_error(send, 413, message)
                return
            chunks.append(chunk)
            if not msg.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # after the body: wait for the disconnect, as the server would

        await self.app(scope, replay, send)
