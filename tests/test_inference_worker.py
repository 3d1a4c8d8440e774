"""The inference worker on a real Redis: what it leaves behind for requests whose clients gave up."""

from __future__ import annotations

import redis as redis_lib

from tests.tiny_models import make_tiny_chat_llama
from workers.generation.engine import GenerationRequest
from workers.inference.protocol import InferenceJob, cancel_key, events_key
from workers.inference.worker import InferenceWorker


def test_a_request_finished_as_its_client_gave_up_leaves_no_stream(tmp_path, isolated_redis_url):
    make_tiny_chat_llama(tmp_path / "models" / "tiny", seed=5)
    conn = redis_lib.Redis.from_url(isolated_redis_url)
    worker = InferenceWorker(conn, tmp_path / "models", precision="float32")
    request = GenerationRequest(prompt_ids=[5, 6, 7], depth=4, max_new_tokens=4, ignore_eos=True)
    kept = GenerationRequest(prompt_ids=[5, 6, 8], depth=4, max_new_tokens=4, ignore_eos=True)
    # the cancel is set before generation, but the worker asks Redis only every CANCEL_CHECK_S: these four
    # tokens are made before it asks, so the request finishes and its finish is written
    conn.set(cancel_key(request.request_id), 1)
    worker.serve_group(
        "tiny", [InferenceJob(model="tiny", request=request), InferenceJob(model="tiny", request=kept)]
    )
    assert not conn.exists(events_key(request.request_id))
    types = [fields[b"type"] for _, fields in conn.xrange(events_key(kept.request_id))]
    assert types[0] == b"started" and types[-1] == b"finish"
