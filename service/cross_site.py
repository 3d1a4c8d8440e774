"""Without API keys (the default `strata serve` on loopback), nothing but the network guards the API, so
a web page the user visits must not be able to use it. Two rules, enforced before routing:

1. **Cross-site requests.** A state-changing request (POST, PUT, PATCH, DELETE) that a browser sends for
   another site is refused with 403, whatever its content type. Every current browser marks such a
   request: `Origin` (sent with every non-GET request, `null` from sandboxed or privacy-stripped pages),
   `Sec-Fetch-Site` (`cross-site`, `same-site`), and `Referer` where `Origin` is absent. That covers what a
   browser can send without a CORS preflight — no content type, `text/plain`, form posts
   (`application/x-www-form-urlencoded`) and multipart uploads (`multipart/form-data`, file routes
   included) — and what it would send after one (this server answers no preflight anyway). A request
   with a same-origin `Origin` (the console's own `fetch`), `Sec-Fetch-Site: same-origin` or `none` (typed
   by the user), or none of these marks (curl, the OpenAI client, scripts) goes on.
2. **DNS rebinding.** When the server knows what it is bound to (`strata serve`), the `Host` of every
   request must name this machine: an IP address, `localhost` (or `*.localhost`), the bound host, or a
   name listed in STRATA_ALLOWED_HOSTS (comma-separated; `*` allows any). A page whose own domain was
   re-pointed at 127.0.0.1 sends its domain as `Host` and gets 400. A name listed there is also accepted
   as an `Origin`, for a console reached through a proxy that rewrites `Host`.

With API keys set neither rule applies: every request must carry `Authorization: Bearer`, which a
browser never attaches to a request of another site's page on its own.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

from starlette.types import ASGIApp, Receive, Scope, Send

from service.errors import send_json_error

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
CROSS_SITE_FETCH = frozenset({b"cross-site", b"same-site"})
DEFAULT_PORTS = {"http": 80, "https": 443}


def split_host(value: str, default_port: int | None = None) -> tuple[str, int | None]:
    """`host[:port]` (IPv6 in brackets) as (lower-case host without brackets, port or the default)."""
    try:
        parts = urlsplit(f"//{value}")
        return (parts.hostname or "").lower(), parts.port or default_port
    except ValueError:  # a malformed port or bracket: matches nothing
        return "", None


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class CrossSiteMiddleware:
    def __init__(self, app: ASGIApp, bound_host: str | None, allowed_hosts: list[str], enabled: bool):
        """`bound_host`: what the server listens on, or None when it cannot know (the Host rule is then
        off: an app embedded in tests or another server); `enabled`: False when API keys are set."""
        self.app = app
        self.enabled = enabled
        self.check_host = bound_host is not None and "*" not in allowed_hosts
        self.named = {
            h.strip().lower() for h in [*allowed_hosts, bound_host or ""] if h.strip() not in ("", "*")
        }

    def host_allowed(self, host: str) -> bool:
        return is_ip(host) or host == "localhost" or host.endswith(".localhost") or host in self.named

    def same_origin(self, url: bytes, host_header: str, scheme: str) -> bool:
        """Whether `url` (an Origin or a Referer) is this server as the request addressed it, or a name
        the operator listed."""
        try:
            parts = urlsplit(url.decode("latin-1"))
            host, port = (parts.hostname or "").lower(), parts.port or DEFAULT_PORTS.get(parts.scheme)
        except ValueError:
            return False
        if not host:  # "null", or not a URL
            return False
        if host in self.named:
            return True
        return (host, port) == split_host(host_header, DEFAULT_PORTS.get(scheme))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.enabled:
            await self.app(scope, receive, send)
            return
        headers: dict[bytes, bytes] = {}
        for name, value in scope["headers"]:
            headers.setdefault(name, value)
        host_header = headers.get(b"host", b"").decode("latin-1")
        if self.check_host and host_header:
            host, _ = split_host(host_header)
            if not self.host_allowed(host):
                await send_json_error(
                    send,
                    400,
                    f"Host {host_header[:100]!r} does not name this server; add it to STRATA_ALLOWED_HOSTS "
                    "if it does (a page whose domain points at this machine must not use the API)",
                )
                return
        if scope["method"] not in SAFE_METHODS:
            origin, referer = headers.get(b"origin"), headers.get(b"referer")
            if (
                (origin is not None and not self.same_origin(origin, host_header, scope["scheme"]))
                or headers.get(b"sec-fetch-site", b"").lower() in CROSS_SITE_FETCH
                or (
                    origin is None
                    and referer is not None
                    and not self.same_origin(referer, host_header, scope["scheme"])
                )
            ):
                await send_json_error(
                    send,
                    403,
                    "cross-site request refused: without API keys only this server's own pages and "
                    "non-browser clients may change state (set STRATA_API_KEYS to serve other sites)",
                )
                return
        await self.app(scope, receive, send)
