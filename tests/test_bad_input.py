"""Input that must be refused with a clean, short 4xx, and job outputs that must not be registered."""

from __future__ import annotations

import resource
import time

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load_file, save_file

from service.app import create_app
from tests.tiny_models import make_slow_llama, make_tiny_chat_llama, make_tiny_llama, make_variant
from workers.merge.config import MergeConfig
from workers.merge.executor import merge_models
from workers.settings import Settings

YAML = {"Content-Type": "application/yaml"}


def api(tmp_path, redis_url: str, **overrides) -> TestClient:
    values = dict(home=tmp_path / "home", redis_url=redis_url, default_model=False, import_roots=[tmp_path])
    return TestClient(create_app(Settings(**{**values, **overrides})))


@pytest.fixture
def family(tmp_path):
    make_tiny_llama(tmp_path / "base", seed=0)
    make_variant(tmp_path / "base", tmp_path / "a", seed=1)
    return tmp_path


def ties_yaml(root, weight: str) -> str:
    return (
        f"merge_method: ties\nbase_model: {root / 'base'}\n"
        f"models:\n  - model: {root / 'a'}\n    parameters: {{weight: {weight}, density: 0.5}}\n"
    )


@pytest.mark.parametrize(
    "weight", [".nan", ".inf", "-.inf", "1e400", "NaN", "1e999", "1" + "0" * 400, "[0.5, .nan]"]
)
def test_non_finite_or_overflowing_merge_weights_get_422_before_queueing(
    tmp_path, isolated_redis_url, family, weight
):
    with api(tmp_path, isolated_redis_url) as c:
        r = c.post("/v1/merges", content=ties_yaml(family, weight), headers=YAML)
        assert r.status_code == 422, r.text
        assert "finite" in r.text or "within" in r.text
        assert c.get("/v1/jobs").json()["data"] == []  # nothing queued
        as_json = '{"merge_method": "linear", "models": [{"model": "%s", "parameters": {"weight": NaN}}]}'
        r = c.post(
            "/v1/merges", content=as_json % (family / "a"), headers={"Content-Type": "application/json"}
        )
        assert r.status_code == 422 and "finite" in r.text


@pytest.mark.parametrize(
    "body",
    [
        '{"model": "m", "prompt": "x", "latency_budget_ms": NaN}',
        '{"model": "m", "prompt": "x", "latency_budget_ms": Infinity}',
        '{"model": "m", "prompt": "x", "max_new_tokens": 1e400}',
        '{"model": "m", "prompt": "x", "temperature": 1e-300}',
        '{"model": "m", "prompt": "x", "seed": 1%s}' % ("0" * 30),
    ],
)
@pytest.mark.parametrize("path", ["/v1/generate", "/v1/completions"])
def test_non_finite_numbers_on_generation_endpoints_get_a_clean_422(tmp_path, isolated_redis_url, body, path):
    body = body.replace("max_new_tokens", "max_tokens") if path == "/v1/completions" else body
    with api(tmp_path, isolated_redis_url) as c:
        r = c.post(path, content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 422, r.text
    assert all("input" not in error for error in r.json()["detail"])


def test_non_finite_numbers_in_job_specs_get_422(tmp_path, isolated_redis_url):
    with api(tmp_path, isolated_redis_url) as c:
        spec = (
            '{"kind": "prune", "model": "m", "target": {"num_hidden_layers": 2}, "heal": {"temperature": %s}}'
        )
        for value in ("NaN", "Infinity", "1e400"):
            r = c.post("/v1/jobs", content=spec % value, headers={"Content-Type": "application/json"})
            assert r.status_code == 422, r.text


def test_error_bodies_stay_short_whatever_was_sent(tmp_path, isolated_redis_url):
    with api(tmp_path, isolated_redis_url) as c:
        r = c.post("/v1/generate", json={"model": "m", "prompt": "x", "stop": ["s" * 10] * 10_000})
        assert r.status_code == 422 and len(r.content) < 2000
        r = c.post("/v1/generate", json={"model": "m" * 500_000, "prompt": "x"})
        assert r.status_code == 404 and len(r.content) < 2000
        bad = {"merge_method": "linear", "models": [{"model": "x", "parameters": {"w" * 10_000: 1}}] * 50}
        r = c.post("/v1/merges", json=bad)
        assert r.status_code == 422 and len(r.content) < 4000


def test_chunked_bodies_over_the_limit_get_413_on_every_endpoint(tmp_path, isolated_redis_url):
    def chunks():  # no Content-Length: counted as it streams
        for _ in range(10):
            yield b'{"padding": "' + b"x" * 50 + b'"}'

    with api(tmp_path, isolated_redis_url, max_body_bytes=64) as c:
        for path in ("/v1/jobs", "/v1/generate", "/v1/models/import", "/v1/chat/completions", "/v1/merges"):
            r = c.post(path, content=chunks(), headers={"Content-Type": "application/json"})
            assert r.status_code == 413, (path, r.status_code)


def test_yaml_sent_as_text_plain_gets_415_even_when_invalid(tmp_path, isolated_redis_url):
    with api(tmp_path, isolated_redis_url) as c:
        for text in ("merge_method: [unclosed", "merge_method: linear\n"):
            r = c.post("/v1/merges", content=text, headers={"Content-Type": "text/plain"})
            assert r.status_code == 415, r.text


def test_a_yaml_bomb_is_refused_quickly(tmp_path, isolated_redis_url):
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    bomb = "\n".join(lines) + "\nmerge_method: linear\nmodels: [{model: x, parameters: {weight: *a8}}]\n"
    with api(tmp_path, isolated_redis_url) as c:
        start = time.monotonic()
        r = c.post("/v1/merges", content=bomb, headers=YAML)
    assert r.status_code == 422 and "expands" in r.text
    assert time.monotonic() - start < 30  # unbounded expansion takes minutes


def test_a_recipe_listing_too_many_models_gets_422(tmp_path, isolated_redis_url, family):
    entries = "".join(f"  - model: m{i}\n    parameters: {{weight: 1}}\n" for i in range(10_000))
    with api(tmp_path, isolated_redis_url, max_body_bytes=10 << 20) as c:
        r = c.post("/v1/merges", content=f"merge_method: linear\nmodels:\n{entries}", headers=YAML)
    assert r.status_code == 422 and "STRATA_MAX_MERGE_MODELS" in r.text


def test_a_model_listed_many_times_is_opened_once(tmp_path, family):
    # a model may appear once per slice, so a recipe lists it many times through many slices
    config = MergeConfig.model_validate(
        {
            "merge_method": "passthrough",
            "slices": [{"sources": [{"model": "a", "layer_range": [0, 1]}]}] * 199
            + [{"sources": [{"model": "base", "layer_range": [1, 2]}]}],
        }
    )
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (128, hard))
    try:
        (tmp_path / "out").mkdir()
        merge_models(
            config, {"a": family / "a", "base": family / "base"}, tmp_path / "out", device=torch.device("cpu")
        )
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    merged, a, base = (
        load_file(p / "model.safetensors") for p in (tmp_path / "out", family / "a", family / "base")
    )
    for layer in (0, 100, 198):
        name = f"model.layers.{layer}.mlp.up_proj.weight"
        assert torch.equal(merged[name], a["model.layers.0.mlp.up_proj.weight"])
    last = "model.layers.199.mlp.up_proj.weight"
    assert torch.equal(merged[last], base["model.layers.1.mlp.up_proj.weight"])


def test_a_tokenizer_whose_ids_exceed_the_vocabulary_gets_422(tmp_path, isolated_redis_url):
    make_tiny_chat_llama(tmp_path / "small-vocab", vocab_size=40)  # the character tokenizer has 128 ids
    with api(tmp_path, isolated_redis_url) as c:
        r = c.post("/v1/models/import", json={"id": "mismatch", "path": str(tmp_path / "small-vocab")})
        assert r.status_code == 201, r.text
        r = c.post("/v1/generate", json={"model": "mismatch", "prompt": "999", "max_new_tokens": 2})
    assert r.status_code == 422 and "40 embeddings" in r.json()["detail"]


def test_a_job_whose_output_is_not_finite_fails_and_registers_nothing(server, tmp_path):
    path = server.home.parent / "has-inf"
    make_tiny_llama(path, seed=3)
    tensors = load_file(path / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"][0, 0] = float("inf")
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with server.client() as c:
        assert c.post("/v1/models/import", json={"id": "has-inf", "path": str(path)}).status_code == 201
        recipe = {
            "merge_method": "linear",
            "models": [{"model": "has-inf", "parameters": {"weight": 1.0}}],
            "name": "inf-merge",
        }
        job = c.post("/v1/merges", json=recipe).json()
        final = server.wait_job(job["id"])
        assert final["status"] == "failed"
        assert "model.layers.1.mlp.up_proj.weight" in final["error"] and "NaN or infinite" in final["error"]
        assert c.get("/v1/models/inf-merge").status_code == 404
    assert not (server.home / "models" / "inf-merge").exists()
    assert not any((server.home / "models" / ".staging").iterdir())


def test_an_input_model_deleted_mid_merge_fails_the_job_and_registers_nothing(server):
    path = server.home.parent / "slow-parent"
    make_slow_llama(path)
    with server.client() as c:
        assert c.post("/v1/models/import", json={"id": "slow-parent", "path": str(path)}).status_code == 201
        recipe = {
            "merge_method": "linear",
            "models": [{"model": "slow-parent", "parameters": {"weight": 0.5}}],
            "name": "orphan",
        }
        job = c.post("/v1/merges", json=recipe).json()
        for _ in range(600):
            view = c.get(f"/v1/jobs/{job['id']}").json()
            if view["status"] == "started" and view["progress"] > 0:
                break
            time.sleep(0.05)
        assert c.delete("/v1/models/slow-parent").status_code == 200
        final = server.wait_job(job["id"])
        assert final["status"] == "failed", final
        assert "slow-parent" in final["error"] and "Traceback" not in final["error"]
        models = c.get("/v1/models").json()["data"]
    assert all("slow-parent" not in m["strata"]["parents"] for m in models)
    assert "orphan" not in {m["id"] for m in models}
