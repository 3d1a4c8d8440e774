"""The inference worker serves variants stored as deltas over one resident base: requests for different
variants of a base decode in one batch, with each variant's tokens; deltas beyond the memory budget are
dropped least recently used first; a variant whose base is gone is served from its own full weights."""

from __future__ import annotations

import json
import shutil

import pytest
import redis as redis_lib

from tests.tiny_models import make_tiny_chat_llama
from workers.generation.engine import GenerationRequest
from workers.inference.protocol import InferenceJob, events_key
from workers.inference.worker import InferenceWorker
from workers.variants import make_variant
from workers.variants_delta import compress_variant


@pytest.fixture
def models(tmp_path):
    root = tmp_path / "models"
    make_tiny_chat_llama(root / "base", seed=5)
    for i in (1, 2, 3):
        (root / f"v{i}").mkdir()
        make_variant(root / "base", root / f"v{i}", seed=i, scale=0.1, rank=2 if i == 3 else None)
        compress_variant(root / "base", root / f"v{i}", root / f"v{i}", base_id="base", error_budget=0.0)
    return root


def finishes(conn, jobs: list[InferenceJob]) -> dict[str, dict]:
    out = {}
    for job in jobs:
        entries = conn.xrange(events_key(job.request.request_id))
        started = json.loads(entries[0][1][b"data"])
        kind, data = entries[-1][1][b"type"], json.loads(entries[-1][1][b"data"])
        assert kind == b"finish", data
        out[job.model] = {**data, "started": started}
    return out


def job(model: str) -> InferenceJob:
    request = GenerationRequest(prompt_ids=[5, 6, 7, 9], depth=4, max_new_tokens=8, ignore_eos=True)
    return InferenceJob(model=model, request=request)


def test_variants_of_one_base_decode_in_one_batch_with_their_own_tokens(models, isolated_redis_url):
    conn = redis_lib.Redis.from_url(isolated_redis_url)
    worker = InferenceWorker(conn, models, precision="float32")
    jobs = [job("base"), job("v1"), job("v2"), job("v3")]
    worker.serve_batch(jobs)
    got = finishes(conn, jobs)
    assert list(worker.engines) == ["base"]  # one copy of the base's weights
    assert {got[m]["batch_size"] for m in got} == {4}
    assert worker.resident()["base"]["variants"] == ["v1", "v2", "v3"]
    full = InferenceWorker(conn, models, precision="float32", max_models=4)
    for model in ("v1", "v2", "v3"):
        alone = job(model)
        full.serve_group(model, [alone])  # the variant's own full weights, loaded as a model
        assert finishes(conn, [alone])[model]["token_ids"] == got[model]["token_ids"]
    assert len({tuple(got[m]["token_ids"]) for m in got}) == 4


def test_deltas_beyond_the_memory_budget_are_dropped_least_recently_used_first(models, isolated_redis_url):
    conn = redis_lib.Redis.from_url(isolated_redis_url)
    worker = InferenceWorker(conn, models, precision="float32", variant_memory_bytes=1)
    worker.serve_batch([job("v1"), job("v2")])  # both pinned while served together
    assert worker.resident()["base"]["variants"] == ["v1", "v2"]
    worker.serve_batch([job("v3")])
    assert worker.resident()["base"]["variants"] == ["v3"]
    assert set(worker.engines["base"].variants) == {"v3"}


def test_a_variant_whose_base_is_gone_is_served_from_its_full_weights(models, isolated_redis_url):
    conn = redis_lib.Redis.from_url(isolated_redis_url)
    shutil.rmtree(models / "base")
    worker = InferenceWorker(conn, models, precision="float32")
    jobs = [job("v1")]
    worker.serve_batch(jobs)
    assert finishes(conn, jobs)["v1"]["finish_reason"] == "length"
    assert list(worker.engines) == ["v1"]
