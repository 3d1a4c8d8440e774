"""A streamed generation always ends with an error event or [DONE], whatever fails once it has started."""

from __future__ import annotations

import json
import threading
import time

import pytest

from service.embedded_redis import EmbeddedRedis
from tests.test_bad_requests import api
from tests.tiny_models import make_tiny_chat_llama
from workers.inference.protocol import QUEUE_KEY, WORKERS_KEY, InferenceJob, events_key

REQUESTS = {
    "/v1/generate": {"model": "m", "prompt": "hi", "stream": True},
    "/v1/completions": {"model": "m", "prompt": "hi", "stream": True},
    "/v1/chat/completions": {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True},
}


def pretend_worker_then_kill_redis(redis, server: EmbeddedRedis) -> None:
    """Take the request from the queue as an inference worker would, send two tokens, then stop Redis."""
    _, raw = redis.blpop(QUEUE_KEY, timeout=30)
    job = InferenceJob.model_validate_json(raw)
    key = events_key(job.request.request_id)
    started = {"worker": "elsewhere:1:x", "queue_ms": 1.0, "batch_size": 1}
    redis.xadd(key, {"type": "started", "data": json.dumps(started)})
    for delta in ("a", "b"):
        redis.xadd(key, {"type": "token", "data": json.dumps({"token_id": 1, "delta": delta})})
    time.sleep(0.5)  # the tokens reach the client
    server.stop()


@pytest.mark.parametrize("path", list(REQUESTS))
def test_redis_dying_mid_stream_ends_it_with_an_error_event_and_done(tmp_path, path):
    make_tiny_chat_llama(tmp_path / "m")
    server = EmbeddedRedis(tmp_path / "r")
    url = server.start()
    try:
        with api(tmp_path, url) as c:
            assert (
                c.post("/v1/models/import", json={"id": "m", "path": str(tmp_path / "m")}).status_code == 201
            )
            redis = c.app.state.redis
            redis.zadd(WORKERS_KEY, {"elsewhere:1:x": time.time() + 3600})  # a live worker on another host
            worker = threading.Thread(target=pretend_worker_then_kill_redis, args=(redis, server))
            worker.start()
            r = c.post(path, json=REQUESTS[path])
            worker.join()
        assert r.status_code == 200
        events = [line.removeprefix("data: ") for line in r.text.split("\n\n") if line]
        assert events[-1] == "[DONE]", events
        error = json.loads(events[-2])
        message = error["error"] if path == "/v1/generate" else error["error"]["message"]
        assert "Redis became unavailable" in (message if isinstance(message, str) else str(message)), events
        assert "ab" in "".join(events[:-2]) or '"a"' in "".join(events[:-2])
    finally:
        server.stop()
