"""API keys: with STRATA_API_KEYS set, every endpoint but /health (and the console's own page and static
files, which hold no data) needs `Authorization: Bearer <key>`."""

from __future__ import annotations

import hmac
from pathlib import Path

from starlette.types import ASGIApp, Receive, Scope, Send

from service.errors import send_json_error

OPEN_PATHS = frozenset({"/health", "/"})
OPEN_PREFIXES = ("/console/",)  # the console's static files; everything they show still needs a key


class ApiKeysError(ValueError):
    """STRATA_API_KEYS names a key file that cannot be used: the server must not start."""


def looks_like_path(value: str) -> bool:
    """A single value starting with '/', '~' or '.' is a file path, never a key."""
    return "," not in value and value.strip().startswith(("/", "~", "."))


def load_keys(value: str | None) -> list[str]:
    """Comma-separated keys, or the path of a file with one key per line (# comments allowed).

    A value that looks like a path must name a readable file holding at least one key: the path itself
    never becomes a key, and a missing or empty file never leaves the API open."""
    if not value:
        return []
    path = Path(value.strip()).expanduser()
    if path.is_file():
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise ApiKeysError(f"STRATA_API_KEYS: cannot read the key file {path}") from e
        lines = [line.split("#", 1)[0].strip() for line in text.splitlines()]
        keys = [line for line in lines if line]
        if not keys:
            raise ApiKeysError(f"STRATA_API_KEYS: the key file {path} holds no keys")
        return keys
    if looks_like_path(value):
        raise ApiKeysError(
            f"STRATA_API_KEYS names a key file that does not exist or is not a file: {path} "
            "(give the keys themselves, comma-separated, or an existing file with one key per line)"
        )
    return [k.strip() for k in value.split(",") if k.strip()]


def key_matches(presented: str, keys: list[str]) -> bool:
    """Constant-time comparison against every key (no early exit on the first match)."""
    found = False
    for key in keys:
        found |= hmac.compare_digest(presented.encode(), key.encode())
    return found


class ApiKeyMiddleware:
    def __init__(self, app: ASGIApp, keys: list[str]):
        self.app = app
        self.keys = keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        presented = [value for name, value in scope["headers"] if name == b"authorization"]
        if len(presented) > 1:  # which one counts would depend on the proxy in front: neither does
            await send_json_error(send, 400, "send one Authorization header, not several")
            return
        path = scope["path"]
        if not self.keys or path in OPEN_PATHS or path.startswith(OPEN_PREFIXES):
            await self.app(scope, receive, send)
            return
        header = presented[0].decode("latin-1") if presented else ""
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not key_matches(token.strip(), self.keys):
            await send_json_error(
                send,
                401,
                "missing or invalid API key: send Authorization: Bearer <key>",
                {"WWW-Authenticate": "Bearer"},
            )
            return
        await self.app(scope, receive, send)
