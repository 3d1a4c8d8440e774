"""The inference worker's event writer on a real Redis: one write per step that waits for no reply, EXPIRE
once per stream, token entries merged per request interval (streamed chunks, or a few a second when not
streamed), what is pending riding on the finish."""

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
    """A real client that counts the round trips it makes through its own API (commands, or pipelines)."""

    round_trips = 0

    def execute_command(self, *args, **options):
        type(self).round_trips += 1
        return super().execute_command(*args, **options)

    def pipeline(self, transaction=True, shard_hint=None):
        type(self).round_trips += 1
        return super().pipeline(transaction, shard_hint)


def entries(conn, request_id: str) -> list[tuple[str, dict]]:
    return [
        (fields[b"type"].decode(), json.loads(fields[b"data"]))
        for _, fields in conn.xrange(events_key(request_id))
    ]


def count_writes(writer: EventWriter) -> list[int]:
    """Count the writes on the writer's own connection (opened by its first flush)."""
    writes = [0]
    send = writer._conn.send_packed_command

    def counted(*args, **kwargs):
        writes[0] += 1
        return send(*args, **kwargs)

    writer._conn.send_packed_command = counted
    return writes


def test_a_step_of_a_batch_is_one_write_waiting_for_no_reply_and_expire_is_set_once(isolated_redis_url):
    conn = redis_lib.Redis.from_url(isolated_redis_url)
    writer = EventWriter(CountingRedis.from_url(isolated_redis_url), {})
    CountingRedis.round_trips = 0
    for request_id in ("a", "b"):
        writer.add(request_id, "started", {"batch_size": 2})
    writer.flush()
    writes = count_writes(writer)
    writer.sync()
    assert 0 < conn.ttl(events_key("a")) <= EVENTS_TTL_S and 0 < conn.ttl(events_key("b")) <= EVENTS_TTL_S
    conn.persist(events_key("a"))  # a later step must not set it again
    for step in range(3):
        writer.token("a", 10 + step, f"x{step}")
        writer.token("b", 20 + step, f"y{step}")
        writer.flush()
    writer.flush()  # nothing queued: no write
    assert writes[0] == 3
    writer.add("a", "finish", {"text": "x0x1x2"})
    writer.close()
    assert CountingRedis.round_trips == 0  # all of it on the writer's own connection, replies read later
    assert writer._conn is None  # given back to the pool
    assert conn.ttl(events_key("a")) == -1  # no EXPIRE after the first entry
    assert [kind for kind, _ in entries(conn, "a")] == ["started", "token", "token", "token", "finish"]
    tokens = [data for kind, data in entries(conn, "b") if kind == "token"]
    assert tokens == [{"token_id": 20 + i, "delta": f"y{i}"} for i in range(3)]


def test_expire_is_renewed_for_a_long_generation(isolated_redis_url):
    conn = redis_lib.Redis.from_url(isolated_redis_url)
    clock = Clock()
    writer = EventWriter(conn, {}, clock=clock)
    writer.add("a", "started", {})
    writer.flush()
    writer.sync()
    conn.persist(events_key("a"))
    clock.now += EVENTS_TTL_S / 2
    writer.token("a", 1, "x")
    writer.close()
    assert 0 < conn.ttl(events_key("a")) <= EVENTS_TTL_S


def test_tokens_are_merged_per_interval_and_what_is_pending_rides_on_the_finish(isolated_redis_url):
    conn = redis_lib.Redis.from_url(isolated_redis_url)
    clock = Clock()
    # s: every token; c: streamed in chunks at most 0.25 s apart; w: not streamed (a few entries a second)
    writer = EventWriter(conn, {"s": 0.0, "c": 0.25, "w": 0.5}, clock=clock)
    for i in range(10):  # 10 steps of 0.125 s
        for request_id in ("s", "c", "w"):
            writer.token(request_id, i, str(i))
        writer.flush()
        clock.now += 0.125
    for request_id in ("s", "c", "w"):
        writer.add(request_id, "finish", {"delta": "!", "text": "0123456789!", "token_ids": list(range(10))})
    writer.close()
    streamed = entries(conn, "s")
    assert [data["token_id"] for _, data in streamed[:-1]] == list(range(10))
    assert streamed[-1] == ("finish", {"delta": "!", "text": "0123456789!", "token_ids": list(range(10))})
    # the first token at once, then one entry per interval with the tokens since; the rest rides the finish
    chunked = entries(conn, "c")
    assert chunked[:-1] == [
        ("token", {"token_id": 0, "delta": "0", "count": 1}),
        ("token", {"token_id": 2, "delta": "12", "count": 2}),
        ("token", {"token_id": 4, "delta": "34", "count": 2}),
        ("token", {"token_id": 6, "delta": "56", "count": 2}),
        ("token", {"token_id": 8, "delta": "78", "count": 2}),
    ]
    assert chunked[-1][1]["delta"] == "9!"  # every token's text reaches a streamed client, once
    assert "".join(data["delta"] for _, data in chunked) == "0123456789!"
    waiting = entries(conn, "w")
    assert waiting[:-1] == [
        ("token", {"token_id": 0, "delta": "0", "count": 1}),
        ("token", {"token_id": 4, "delta": "1234", "count": 4}),
        ("token", {"token_id": 8, "delta": "5678", "count": 4}),
    ]
    assert waiting[-1][0] == "finish" and waiting[-1][1]["token_ids"] == list(range(10))


def test_a_forgotten_request_writes_nothing_more(isolated_redis_url):
    conn = redis_lib.Redis.from_url(isolated_redis_url)
    writer = EventWriter(conn, {})
    writer.add("a", "started", {})
    writer.add("b", "started", {})
    writer.flush()
    writer.sync()
    writer.token("a", 1, "x")
    writer.token("b", 2, "y")
    conn.delete(events_key("a"))
    writer.forget("a")
    writer.close()
    assert not conn.exists(events_key("a"))
    assert [kind for kind, _ in entries(conn, "b")] == ["started", "token"]


def test_an_error_reply_is_raised_by_the_next_flush(isolated_redis_url):
    conn = redis_lib.Redis.from_url(isolated_redis_url)
    conn.set(events_key("a"), "not a stream")  # XADD on it answers WRONGTYPE
    writer = EventWriter(conn, {})
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
    writer = EventWriter(conn, {})
    writer.add("a", "started", {})
    writer.add("b", "started", {})
    writer.flush()
    writer.token("a", 1, "x")
    writer.drop("a")
    writer.token("b", 2, "y")
    writer.close()
    assert not conn.exists(events_key("a"))
    assert [kind for kind, _ in entries(conn, "b")] == ["started", "token"]
