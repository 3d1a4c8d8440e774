"""Redis connections for the API, the workers and the CLI."""

from __future__ import annotations

from redis import Redis
from redis.asyncio import Redis as AsyncRedis


def connect(url: str) -> Redis:
    """A client that fails fast (seconds, not minutes) when the server is gone."""
    return Redis.from_url(url, socket_connect_timeout=3, socket_timeout=30, health_check_interval=30)


def connect_async(url: str) -> AsyncRedis:
    """For streaming reads (XREAD BLOCK) without blocking the event loop; no read timeout."""
    return AsyncRedis.from_url(url, socket_connect_timeout=3, socket_timeout=None, health_check_interval=30)
