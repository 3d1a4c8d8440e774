"""Dynamic-depth generation through the service: a real Redis, a real inference worker, tiny models."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
import torch
from fastapi.testclient import TestClient
from transformers import AutoTokenizer

from service.app import create_app
from tests.tiny_models import make_tiny_chat_llama
from workers.generation.reference import greedy_reference
from workers.inference.protocol import QUEUE_KEY, WORKERS_KEY
from workers.settings import Settings

MODEL = "chatty"


@pytest.fixture(scope="session")
def chatty(server):
    path = server.home.parent / "chatty"
    model = make_tiny_chat_llama(path, seed=11)
    with server.client() as c:
        assert c.post("/v1/models/import", json={"id": MODEL, "path": str(path)}).status_code == 201
    return model, AutoTokenizer.from_pretrained(path)


def test_greedy_output_at_each_depth_equals_the_uncached_reference(server, chatty):
    model, tokenizer = chatty
    prompt = "the cat sat on the mat"
    ids = tokenizer.encode(prompt)
    with server.client() as c:
        for depth in (1, 2, 4):
            r = c.post(
                "/v1/generate", json={"model": MODEL, "prompt": prompt, "depth": depth, "max_new_tokens": 12}
            )
            assert r.status_code == 200, r.text
            body = r.json()
            with torch.no_grad():
                expected = greedy_reference(model, ids, depth, 12)
            assert body["text"] == tokenizer.decode(expected, skip_special_tokens=True)
            assert body["strata"]["depth"] == depth and body["strata"]["num_layers"] == 4
            assert body["usage"]["prompt_tokens"] == len(ids)
            assert body["usage"]["completion_tokens"] == len(expected)
            assert body["strata"]["budget_met"] is None and body["strata"]["elapsed_ms"] > 0


def test_streamed_tokens_add_up_to_the_final_text(server, chatty):
    payload = {
        "model": MODEL,
        "prompt": "hello there",
        "max_new_tokens": 10,
        "stream": True,
        "temperature": 0.8,
        "seed": 3,
    }
    with server.client() as c, c.stream("POST", "/v1/generate", json=payload) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    parsed = [json.loads(e) for e in events[:-1]]
    done = parsed[-1]
    assert done["type"] == "done"
    assert "".join(e["text"] for e in parsed if e["type"] == "token") == done["text"]
    with server.client() as c:  # same seed, same sample
        again = c.post("/v1/generate", json={**payload, "stream": False}).json()
    assert again["text"] == done["text"]


def test_a_stream_interval_sends_tokens_in_fewer_chunks_and_0_sends_each_alone(server, chatty):
    payload = {"model": MODEL, "prompt": "the cat sat", "max_new_tokens": 12, "depth": 4, "stream": True}

    def chunks(interval_ms: float) -> tuple[list[str], dict]:
        with server.client() as c:
            body = {**payload, "stream_interval_ms": interval_ms}
            with c.stream("POST", "/v1/generate", json=body) as r:
                events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
        return [e["text"] for e in events if e["type"] == "token"], events[-1]

    each, done = chunks(0)
    together, again = chunks(1000)  # the tiny model makes all its tokens well within a second
    assert "".join(each) == done["text"] == "".join(together) == again["text"]
    tokens = done["usage"]["completion_tokens"]
    assert tokens >= 4 and len(each) >= tokens - 1  # a token with no text of its own yet is not sent
    assert together[0] == each[0]  # the first token comes at once, alone
    assert len(together) < len(each) and len(together) <= 3  # the rest with the finish (or one chunk more)


def test_first_budgeted_request_uses_a_default_while_the_model_is_profiled_then_budgets_choose_depths(
    server,
):
    # a model of its own, imported here: the shared one may have been profiled by the time this test runs
    fresh = "chatty-unprofiled"
    path = server.home.parent / fresh
    make_tiny_chat_llama(path, seed=11)
    with server.client() as c:
        assert c.post("/v1/models/import", json={"id": fresh, "path": str(path)}).status_code == 201
        assert c.get(f"/v1/models/{fresh}").json()["strata"]["profile"] is None
        first = c.post(
            "/v1/generate",
            json={"model": fresh, "prompt": "a", "max_new_tokens": 2, "latency_budget_ms": 60_000},
        )
        assert first.status_code == 200, first.text
        assert first.json()["strata"]["latency_model"] == "default"  # it did not wait for the profile
        jobs = c.get("/v1/jobs").json()["data"]  # the session's server ran other tests' profiles too
        profiles = [j for j in jobs if j["kind"] == "profile" and j["spec"]["model"] == fresh]
        assert len(profiles) == 1
        assert server.wait_job(profiles[0]["id"])["status"] == "finished"
        profile = c.get(f"/v1/models/{fresh}").json()["strata"]["profile"]
        assert profile["grid"] == [2, 4] and profile["num_layers"] == 4
        assert profile["quality"]["4"]["top1_agreement"] == 1.0
        assert set(profile["latency"]["depths"]) == {"2", "4"}

        base = {"model": fresh, "prompt": "a b c", "max_new_tokens": 4}
        loose = c.post("/v1/generate", json={**base, "latency_budget_ms": 60_000}).json()
        assert loose["strata"]["depth"] == 4 and loose["strata"]["budget_met"] is True
        assert loose["strata"]["latency_model"] == "profile"
        assert loose["strata"]["predicted_ms"] > 0
        tight = c.post("/v1/generate", json={**base, "latency_budget_ms": 0.001}).json()
        assert tight["strata"]["depth"] == 1 and tight["strata"]["budget_met"] is False
        floor = c.post("/v1/generate", json={**base, "latency_budget_ms": 0.001, "min_depth": 3}).json()
        assert floor["strata"]["depth"] == 3
        exits = c.post("/v1/generate", json={**base, "latency_budget_ms": 0.001, "exits": [2, 4]}).json()
        assert exits["strata"]["depth"] == 2
        rejected = c.post(
            "/v1/generate", json={**base, "latency_budget_ms": 0.001, "on_infeasible": "reject"}
        )
        assert rejected.status_code == 422 and "smallest achievable" in rejected.json()["detail"]
        explicit = c.post("/v1/generate", json={**base, "latency_budget_ms": 0.001, "depth": 4}).json()
        assert explicit["strata"]["depth"] == 4
        metrics = c.get("/metrics").text
    assert "strata_time_to_first_token_seconds_count" in metrics
    assert f'strata_budget_total{{model="{fresh}",outcome="missed"}}' in metrics
    assert "strata_chosen_depth_bucket" in metrics


def test_profile_job_on_a_chosen_grid(server, chatty):
    with server.client() as c:
        r = c.post("/v1/jobs", json={"kind": "profile", "model": MODEL, "grid": [1, 4], "repeats": 1})
        assert r.status_code == 202, r.text
        assert server.wait_job(r.json()["id"])["status"] == "finished"
        profile = c.get(f"/v1/models/{MODEL}").json()["strata"]["profile"]
        bad = c.post("/v1/jobs", json={"kind": "profile", "model": MODEL, "grid": [9]})
    assert profile["grid"] == [1, 4] and set(profile["quality"]) == {"1", "4"}
    assert bad.status_code == 422 and "1..4" in bad.text


@pytest.mark.parametrize(
    "body,status,message",
    [
        ({"prompt": "x", "depth": 9}, 422, "exceeds the model's 4 layers"),
        ({"prompt": "x", "min_depth": 5}, 422, "min_depth 5"),
        ({"prompt": "x", "exits": [2, 8]}, 422, "exits must lie in 1..4"),
        (
            {"prompt": "x", "messages": [{"role": "user", "content": "y"}]},
            422,
            "exactly one of prompt or messages",
        ),
        ({"prompt": "x", "max_new_tokens": 10**6}, 422, "exceeds the limit"),
        ({"prompt": "x" * 200, "max_new_tokens": 100}, 422, "exceed the model's context of 256 tokens"),
        ({"prompt": "x", "model": "nope"}, 404, "not registered"),
        ({"prompt": "x", "stream": True, "stream_interval_ms": 5000}, 422, "stream_interval_ms"),
        ({"prompt": "x", "stream": True, "stream_interval_ms": -1}, 422, "stream_interval_ms"),
    ],
)
def test_bad_generate_requests_are_4xx_with_a_reason(server, chatty, body, status, message):
    with server.client() as c:
        r = c.post("/v1/generate", json={"model": MODEL, **body})
    assert r.status_code == status and message in r.text


def test_the_official_openai_client_works_unmodified(server, chatty):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=8, extra_body={"depth": 2}
    )
    assert chat.choices[0].message.role == "assistant"
    assert chat.model_extra["strata"]["depth"] == 2 and chat.usage.completion_tokens <= 8
    done = client.completions.create(model=MODEL, prompt="the dog", max_tokens=6, seed=1, temperature=0)
    assert done.choices[0].finish_reason in ("stop", "length") and done.model_extra["strata"]["depth"] == 4
    pieces, usage, strata = [], None, None
    for chunk in client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=8,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"depth": 2},
    ):
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            strata = (chunk.model_extra or {}).get("strata") or strata
        if chunk.usage:
            usage = chunk.usage
    assert "".join(pieces) == chat.choices[0].message.content  # same greedy answer, streamed
    assert usage is not None and usage.completion_tokens == chat.usage.completion_tokens
    assert strata["depth"] == 2
    stream = client.completions.create(
        model=MODEL, prompt="the dog", max_tokens=6, stream=True, temperature=0
    )
    assert "".join(c.choices[0].text for c in stream if c.choices) == done.choices[0].text
    with pytest.raises(openai.UnprocessableEntityError):
        client.completions.create(model=MODEL, prompt="x", n=2)


def test_no_inference_worker_gives_503_and_a_full_queue_429(tmp_path, isolated_redis_url):
    make_tiny_chat_llama(tmp_path / "m")
    settings = Settings(
        home=tmp_path / "home",
        redis_url=isolated_redis_url,
        default_model=False,
        import_roots=[tmp_path],
        max_waiting=1,
    )
    with TestClient(create_app(settings)) as c:
        assert c.post("/v1/models/import", json={"id": "m", "path": str(tmp_path / "m")}).status_code == 201
        r = c.post("/v1/generate", json={"model": "m", "prompt": "hi"})
        assert r.status_code == 503 and "no live inference worker" in r.json()["detail"]
        redis = c.app.state.redis
        import time

        redis.zadd(WORKERS_KEY, {"pretend": time.time()})
        redis.rpush(QUEUE_KEY, "occupied")
        r = c.post("/v1/generate", json={"model": "m", "prompt": "hi"})
        assert r.status_code == 429 and r.headers["retry-after"]
    httpx.Client  # noqa: B018  (httpx is the transport under TestClient)
