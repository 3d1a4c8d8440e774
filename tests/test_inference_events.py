"""The inference worker's event writer on a real Redis: one round trip per step, EXPIRE once per stream,
merged token entries for requests that are not streamed."""

from __future__ import annotations

import json

import pytest
import redis as redis_lib

from workers.inference.events import EventWriter
from workers.inference.protocol import EVENTS_TTL_S, events_key


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class CountingRedis(redis_lib.Redis):
    """A real client that counts the round trips it makes (commands, or pipelines)."""

    round_trips = 0

    def execute_command(self, *args, **options):
        type(self).round_trips += 1
        return super().execute_command(*args, **options)

    def pipeline(self, transaction=True, shard_hint=None):
        pipe = super().pipeline(transaction, shard_hint)
        execute = pipe.execute

        def counted(*args, **kwargs):
            type(self).round_trips += 1
            return execute(*args, **kwargs)

        pipe.execute = counted
        return pipe


def entries(conn, request_id: str) -> list[tuple[str, dict]]:
    return [
        (fields[b"type"].decode(), json.loads(fields[b"data"]))
        for _, fields in conn.xrange(events_key(request_id))
    ]


def test_a_step_of_a_batch_is_one_round_trip_and_expire_is_set_once(isolated_redis_url):
    conn = CountingRedis.from_url(isolated_redis_url)
    writer = EventWriter(conn, {"a": True, "b": True})
    for request_id in ("a", "b"):
        writer.add(request_id, "started", {"batch_size": 2})
    CountingRedis.round_trips = 0
    writer.flush()
    assert CountingRedis.round_trips == 1
    assert 0 < conn.ttl(events_key("a")) <= EVENTS_TTL_S and 0 < conn.ttl(events_key("b")) <= EVENTS_TTL_S
    conn.persist(events_key("a"))  # a later step must not set it again
    CountingRedis.round_trips = 0
    for step in range(3):
        writer.token("a", 10 + step, f"x{step}")
        writer.token("b", 20 + step, f"y{step}")
        writer.flush()
    writer.flush()  # nothing queued: no round trip
    assert CountingRedis.round_trips == 3
    assert conn.ttl(events_key("a")) == -1  # no EXPIRE after the first entry
    tokens = [data for kind, data in entries(conn, "b") if kind == "token"]
    assert tokens == [{"token_id": 20 + i, "delta": f"y{i}"} for i in range(3)]


def test_expire_is_renewed_for_a_long_generation(isolated_redis_url):
    conn = redis_lib.Redis.from_url(isolated_redis_url)
    clock = Clock()
    writer = EventWriter(conn, {"a": True}, clock=clock)
    writer.add("a", "started", {})
    writer.flush()
    conn.persist(events_key("a"))
    clock.now += EVENTS_TTL_S / 2
    writer.token("a", 1, "x")
    writer.flush()
    assert 0 < conn.ttl(events_key("a")) <= EVENTS_TTL_S


def test_tokens_of_a_request_that_is_not_streamed_are_merged(isolated_redis_url):
    conn = redis_lib.Redis.from_url(isolated_redis_url)
    clock = Clock()
    writer = EventWriter(conn, {"s": True, "w": False}, progress_s=0.5, clock=clock)
    for i in range(10):  # 10 steps of 0.125 s
        writer.token("s", i, str(i))
        writer.token("w", i, str(i))
        writer.flush()
        clock.now += 0.125
    writer.add("w", "finish", {"text": "0123456789", "token_ids": list(range(10))})
    writer.flush()
    streamed = [data for kind, data in entries(conn, "s") if kind == "token"]
    assert [data["token_id"] for data in streamed] == list(range(10))
    waiting = entries(conn, "w")
    # the first token at once, then one entry per 0.5 s with the tokens since; the rest rides the finish
    assert waiting[:-1] == [
        ("token", {"token_id": 0, "delta": "0", "count": 1}),
        ("token", {"token_id": 4, "delta": "1234", "count": 4}),
        ("token", {"token_id": 8, "delta": "5678", "count": 4}),
    ]
    assert waiting[-1][0] == "finish" and waiting[-1][1]["token_ids"] == list(range(10))


def test_a_forgotten_request_writes_nothing_more(isolated_redis_url):
    conn = redis_lib.Redis.from_url(isolated_redis_url)
    writer = EventWriter(conn, {"a": True, "b": True})
    writer.add("a", "started", {})
    writer.add("b", "started", {})
    writer.flush()
    writer.token("a", 1, "x")
    writer.token("b", 2, "y")
    conn.delete(events_key("a"))
    writer.forget("a")
    writer.flush()
    assert not conn.exists(events_key("a"))
    assert [kind for kind, _ in entries(conn, "b")] == ["started", "token"]


def test_deferred_writes_wait_for_no_reply_and_land_in_order(isolated_redis_url):
    conn = CountingRedis.from_url(isolated_redis_url)
    writer = EventWriter(conn, {"a": True}, deferred=True)
    CountingRedis.round_trips = 0
    writer.add("a", "started", {})
    writer.flush()
    for step in range(3):
        writer.token("a", step, f"x{step}")
        writer.flush()
    assert CountingRedis.round_trips == 0  # sent on the writer's own connection, replies read later
    writer.add("a", "finish", {"text": "x0x1x2"})
    writer.close()
    kinds = [kind for kind, _ in entries(conn, "a")]
    assert kinds == ["started", "token", "token", "token", "finish"]
    assert 0 < conn.ttl(events_key("a")) <= EVENTS_TTL_S
    assert writer._conn is None  # given back to the pool


def test_a_deferred_error_reply_is_raised_by_the_next_flush(isolated_redis_url):
    conn = redis_lib.Redis.from_url(isolated_redis_url)
    conn.set(events_key("a"), "not a stream")  # XADD on it answers WRONGTYPE
    writer = EventWriter(conn, {"a": True, "b": True}, deferred=True)
    writer.add("a", "started", {})
    writer.flush()  # does not wait: no error yet
    writer.add("b", "started", {})
    with pytest.raises(redis_lib.ResponseError):
        writer.flush()
    writer.add("b", "token", {"token_id": 1, "delta": "x"})
    writer.close()  # a fresh connection: later writes still land
    assert [kind for kind, _ in entries(conn, "b")] == ["token"]


def test_a_dropped_request_stream_is_deleted_after_what_was_written_to_it(isolated_redis_url):
    conn = redis_lib.Redis.from_url(isolated_redis_url)
    for deferred in (False, True):
        writer = EventWriter(conn, {"a": True, "b": True}, deferred=deferred)
        writer.add("a", "started", {})
        writer.add("b", "started", {})
        writer.flush()
        writer.token("a", 1, "x")
        writer.drop("a")
        writer.token("b", 2, "y")
        writer.close()
        assert not conn.exists(events_key("a"))
        assert [kind for kind, _ in entries(conn, "b")] == ["started", "token"]
        conn.delete(events_key("b"))
