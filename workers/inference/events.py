"""Writing a batch's events to the per-request Redis streams without making the decode loop wait for Redis.

- One write per engine step for all rows of a batch (`flush`): the step's commands go out on a connection
  of the writer's own and their replies are read at the next flush (they are there by then: a decode step
  takes far longer than a round trip), or at `sync()`/`close()`. The decode loop never stops for a round
  trip, which on a loaded machine was a wait for redis-server and for the worker to be scheduled again. An
  error reply is raised at the next flush instead of this one. Since everything goes over one connection,
  a stream deleted with `drop()` is deleted after every entry written to it before.
- A stream's EXPIRE goes with its first entry and is renewed every EVENTS_TTL_S / 2, not with every entry.
- Each request has an interval between its token entries. At 0 every token is an entry of its own. Above
  0, its first token is written at once (time to first token, and the proof that generation started) and
  later ones are merged into one entry per interval: a streamed request's client gets its tokens in chunks
  at most that far apart (plus one engine step), and the API, Redis and the client wake once per chunk
  instead of once per token. A request whose client waits for the whole answer (not streamed) gets
  PROGRESS_S, enough for the API's stall watch. Tokens still pending at the finish ride on it: their text
  goes before the finish's `delta`, and its `text` and `token_ids` hold everything anyway.

A merged token entry has the fields of one (`token_id`: the last token, `delta`: the text of all of them)
plus `count`, the number of tokens it stands for.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import chain

from redis import Redis
from redis.connection import Connection

from workers.inference.protocol import EVENTS_TTL_S, events_key

PROGRESS_S = 0.5  # a non-streamed request: at most one token entry this often


@dataclass
class _Merged:
    """Tokens of a request not written yet."""

    count: int = 0
    token_id: int = 0
    deltas: list[str] = field(default_factory=list)
    written_at: float | None = None  # when its last token entry was queued (None: no token yet)


class EventWriter:
    """Queues the events of a batch's requests and sends them in one write per `flush()`."""

    def __init__(
        self, redis: Redis, intervals: dict[str, float], clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.redis = redis
        self.intervals = intervals  # request id -> seconds between its token entries (0: every token)
        self.clock = clock
        self.queued: list[tuple[str, dict[str, str]]] = []
        self.deletes: list[str] = []  # streams to delete with the next flush
        self.expired_at: dict[str, float] = {}  # stream key -> when its EXPIRE was last sent
        self.merged: dict[str, _Merged] = {}
        self._conn: Connection | None = None  # the writer's own connection
        self._unread = 0  # replies sent for and not read yet

    def add(self, request_id: str, kind: str, data: dict) -> None:
        """Queue an entry (`started`, `finish`, `error`, or a `token` as it is)."""
        if kind == "finish":
            pending = self.merged.pop(request_id, None)
            if pending is not None and pending.deltas:
                data = {**data, "delta": "".join(pending.deltas) + data.get("delta", "")}
        self.queued.append((events_key(request_id), {"type": kind, "data": json.dumps(data)}))

    def token(self, request_id: str, token_id: int, delta: str) -> None:
        """Queue a token: an entry of its own, or merged with the next ones (see the module's docstring)."""
        interval = self.intervals.get(request_id, 0.0)
        if interval <= 0:
            self.add(request_id, "token", {"token_id": token_id, "delta": delta})
            return
        merged = self.merged.setdefault(request_id, _Merged())
        merged.count += 1
        merged.token_id = token_id
        merged.deltas.append(delta)
        now = self.clock()
        if merged.written_at is None or now - merged.written_at >= interval:
            data = {"token_id": token_id, "delta": "".join(merged.deltas), "count": merged.count}
            self.add(request_id, "token", data)
            merged.count, merged.deltas, merged.written_at = 0, [], now

    def flush(self) -> None:
        """Send what is queued in one write, with an EXPIRE for streams that need one; the previous flush's
        replies are read first (an error among them is raised here)."""
        if not (self.queued or self.deletes):
            return
        now = self.clock()
        renew = []
        for key, _ in self.queued:
            at = self.expired_at.get(key)
            if at is None or now - at >= EVENTS_TTL_S / 2:
                self.expired_at[key] = now
                renew.append(key)
        queued, self.queued = self.queued, []
        deletes, self.deletes = self.deletes, []
        commands = [("XADD", key, "*", *chain.from_iterable(fields.items())) for key, fields in queued]
        commands += [("EXPIRE", key, EVENTS_TTL_S) for key in renew]
        commands += [("DEL", key) for key in deletes]
        self.sync()
        if self._conn is None:
            self._conn = self.redis.connection_pool.get_connection()
        try:
            self._conn.send_packed_command(self._conn.pack_commands(commands), check_health=False)
        except BaseException:
            self._discard_connection()
            raise
        self._unread = len(commands)

    def sync(self) -> None:
        """Wait for the replies of what was sent; raise the first error among them."""
        if not self._unread:
            return
        try:
            for _ in range(self._unread):
                self._conn.read_response()
        except BaseException:
            self._discard_connection()  # replies left unread: the connection cannot be reused
            raise
        self._unread = 0

    def close(self) -> None:
        """Send what is queued, wait for every reply, and give the connection back."""
        try:
            self.flush()
            self.sync()
        finally:
            if self._conn is not None:
                self.redis.connection_pool.release(self._conn)
                self._conn = None

    def _discard_connection(self) -> None:
        conn, self._conn, self._unread = self._conn, None, 0
        if conn is not None:
            conn.disconnect()
            self.redis.connection_pool.release(conn)

    def forget(self, request_id: str) -> None:
        """Drop what is queued for a request abandoned by its client (its stream is deleted)."""
        key = events_key(request_id)
        self.queued = [(k, fields) for k, fields in self.queued if k != key]
        self.merged.pop(request_id, None)
        self.expired_at.pop(key, None)

    def drop(self, request_id: str) -> None:
        """`forget` the request and delete its stream with the next flush, after what was written to it."""
        self.forget(request_id)
        self.deletes.append(events_key(request_id))
