"""fit_exits through the HTTP API on a tiny model: adapters stored with the model and recorded, a fresh
profile with and without them, the quality floor and exit_adapter on requests; background profiles."""

from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from tests.tiny_models import make_tiny_chat_llama
from workers.early_exit.adapters import FILENAME, load_adapters
from workers.settings import Settings

MODEL = "lensed"
EXAMPLES = [
    {"messages": [{"role": "user", "content": f"say {w}"}, {"role": "assistant", "content": f"{w} {w} {w}."}]}
    for w in ("tea", "sun", "rain", "moon", "bread", "stone", "river", "cloud")
] + [{"prompt": "the sky is", "response": " blue today, and the sea is grey."}]


@pytest.fixture(scope="session")
def lensed(server):
    path = server.home.parent / MODEL
    make_tiny_chat_llama(path, seed=41)
    with server.client() as c:
        assert c.post("/v1/models/import", json={"id": MODEL, "path": str(path)}).status_code == 201
    return path


def test_fit_exits_stores_records_and_profiles_the_adapters(server, lensed):
    shallow = {"model": MODEL, "prompt": "the sky", "max_new_tokens": 3, "depth": 2}
    with server.client() as c:  # the inference worker loads the model before it has adapters
        before = c.post("/v1/generate", json=shallow)
        assert before.status_code == 200 and before.json()["strata"]["exit_adapter"] is False
    body = {"kind": "fit_exits", "model": MODEL, "examples": EXAMPLES, "seq_len": 32, "distill_steps": 3}
    result = server.run_job({**body, "distill_exits": [2, 3], "distill_batch_tokens": 16})
    assert result["exits"] == [1, 2, 3] and result["data"]["source"] == "examples"
    assert sorted(result["fit"]["distill_kl"]) == ["2", "3"]  # only the exits asked for are distilled
    assert result["data"]["tokens"] > 32 and result["fit"]["tokens"] > 0
    adapters = load_adapters(server.home / "models" / MODEL, 4, 64)
    assert adapters is not None and adapters.depths == [1, 2, 3]
    assert (server.home / "models" / MODEL / FILENAME).is_file()
    with server.client() as c:
        record = c.get(f"/v1/models/{MODEL}").json()["strata"]
    assert record["exit_adapters"]["exits"] == [1, 2, 3]
    recipe = record["exit_adapters"]["recipe"]
    assert recipe["distill_steps"] == 3 and recipe["distill_exits"] == [2, 3]
    assert recipe["distill_batch_tokens"] == 16
    scales = record["exit_adapters"]["fit"]["scale"]  # fitted by default, stored with the maps
    assert sorted(scales) == ["1", "2", "3"] and [adapters.maps[k].scale for k in (1, 2, 3)] == pytest.approx(
        [scales[str(k)] for k in (1, 2, 3)], abs=1e-5
    )
    assert record["exit_adapters"]["data"]["records"] == len(EXAMPLES)
    assert sorted(record["exit_adapters"]["fit"]["pointer_nll"]) == ["1", "2", "3"]  # pointers by default
    assert all(adapters.pointer(k) is not None for k in (1, 2, 3))
    quality = record["profile"]["quality"]
    assert quality["2"]["adapter_perplexity"] > 0 and quality["2"]["adapter_top1_agreement"] is not None
    assert quality["4"]["adapter_perplexity"] is None and quality["4"]["top1_agreement"] == 1.0
    assert quality["3"]["adapter_perplexity"] > 0  # a distilled exit off the default grid (2, 4) is profiled
    with server.client() as c:  # the loaded engine picks the new adapters up; full depth never uses one
        after = c.post("/v1/generate", json=shallow).json()["strata"]
        full = c.post("/v1/generate", json={**shallow, "depth": 4}).json()["strata"]
    assert after["exit_adapter"] is True and full["exit_adapter"] is False


def test_requests_with_a_quality_floor_get_an_exit_that_meets_it(server, lensed):
    with server.client() as c:
        record = c.get(f"/v1/models/{MODEL}").json()["strata"]
        if record["exit_adapters"] is None:
            pytest.skip("needs the fit_exits test first")
        quality = record["profile"]["quality"]
        full = quality["4"]["perplexity"]
        # floors are >= 1; with its pointer a shallow exit of a random tiny model can beat full depth
        ratio = max(quality["2"]["adapter_perplexity"] / full, 1.0) * 1.0001
        base = {"model": MODEL, "prompt": "the sky", "max_new_tokens": 3, "latency_budget_ms": 0.001}
        floored = c.post("/v1/generate", json={**base, "max_perplexity_ratio": ratio, "exits": [2, 4]})
        assert floored.status_code == 200, floored.text
        info = floored.json()["strata"]
        assert info["depth"] == 2 and info["quality"]["exit_adapter"] is True  # exit 2 meets it, adapted
        assert info["quality"]["perplexity_ratio"] <= ratio
        plain_ratio = quality["2"]["perplexity"] / full
        off = c.post(
            "/v1/generate",
            json={**base, "max_perplexity_ratio": ratio, "exits": [2, 4], "exit_adapter": False},
        ).json()["strata"]
        assert off["depth"] == (2 if plain_ratio <= ratio else 4)
        rejected = c.post(
            "/v1/generate",
            json={**base, "max_perplexity_ratio": 1.0, "exits": [2, 4], "on_infeasible": "reject"},
        )
        assert rejected.status_code == 422 and "max_perplexity_ratio=1" in rejected.json()["detail"]
        chat = c.post(
            "/v1/chat/completions",
            json={
                "model": MODEL,
                "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 2,
                "depth": 2,
                "exit_adapter": False,
            },
        )
        assert chat.status_code == 200 and chat.json()["strata"]["quality"]["exit_adapter"] is False


@pytest.mark.parametrize(
    "extra,message",
    [
        ({"exits": [4]}, "1..3"),
        ({"examples": [{"nope": 1}]}, "examples[0]"),
        ({"ridge": -1}, "ridge"),
        ({"lr": 0}, "lr"),
        ({"data": "/etc/passwd"}, ""),
        ({"bundled": "poems"}, "bundled"),
        ({"scale_tokens": 0}, "scale_tokens"),
        ({"exits": [1, 2], "distill_exits": [3]}, "distill_exits"),
        ({"distill_batch_tokens": 0}, "distill_batch_tokens"),
    ],
)
def test_bad_fit_exits_requests_are_422(server, lensed, extra, message):
    with server.client() as c:
        r = c.post("/v1/jobs", json={"kind": "fit_exits", "model": MODEL, **extra})
    assert r.status_code == 422 and message in r.text
    assert "root:" not in r.text


def test_a_registered_model_is_profiled_in_the_background(tmp_path, isolated_redis_url):
    make_tiny_chat_llama(tmp_path / "m")
    settings = Settings(
        home=tmp_path / "home", redis_url=isolated_redis_url, default_model=False, import_roots=[tmp_path]
    )
    assert settings.profile_on_register
    with TestClient(create_app(settings)) as c:
        assert c.post("/v1/models/import", json={"id": "m", "path": str(tmp_path / "m")}).status_code == 201
        deadline = time.monotonic() + 20
        profiles: list = []
        while not profiles and time.monotonic() < deadline:
            profiles = [j for j in c.get("/v1/jobs").json()["data"] if j["kind"] == "profile"]
            time.sleep(0.2)
        assert len(profiles) == 1 and profiles[0]["spec"] == {
            "kind": "profile",
            "model": "m",
            "repeats": 2,
            "if_unprofiled": True,
        }
        time.sleep(1.5)  # a second sweep queues nothing more while that one is pending
        assert len([j for j in c.get("/v1/jobs").json()["data"] if j["kind"] == "profile"]) == 1


def test_fit_exits_on_the_bundled_general_text_records_which_text(server, lensed):
    body = {"kind": "fit_exits", "model": MODEL, "bundled": "general", "max_tokens": 512, "seq_len": 64}
    result = server.run_job(body)
    assert result["data"]["source"] == "bundled" and result["data"]["text"] == "general"
    assert result["data"]["files"] == ["general.jsonl"] and result["data"]["tokens"] == 512
    with server.client() as c:
        record = c.get(f"/v1/models/{MODEL}").json()["strata"]
    assert record["exit_adapters"]["recipe"]["bundled"] == "general"
    generalisation = result["generalisation"]  # no held-out text shares a source with the general text
    assert generalisation["in_domain"] == {}
    assert set(generalisation["out_of_domain"]) == {"heldout", "dpkg-spec"}


def test_fit_exits_on_the_default_text_reports_in_and_out_of_domain_ratios_apart(server, lensed):
    result = server.run_job({"kind": "fit_exits", "model": MODEL, "max_tokens": 512, "seq_len": 64})
    assert result["data"]["text"] == "broad+prose+chat" and result["data"]["files"][:2] == [
        "broad.jsonl",
        "prose.jsonl",
    ]
    generalisation = result["generalisation"]
    assert list(generalisation["in_domain"]) == ["heldout"]  # prose was fitted, heldout.txt is prose
    assert list(generalisation["out_of_domain"]) == ["dpkg-spec"]  # never fitted
    ratios = generalisation["out_of_domain"]["dpkg-spec"]
    assert list(ratios) == ["2"] and ratios["2"] > 0  # the profiled exits below full depth (grid 2, 4)
    with server.client() as c:
        profile = c.get(f"/v1/models/{MODEL}").json()["strata"]["profile"]
    assert profile["eval_text"] == result["eval_text"] == "broad"
    assert set(profile["quality_by_text"]) == {"broad", "heldout", "dpkg-spec"}
    full = profile["quality_by_text"]["dpkg-spec"]["quality"]["4"]["perplexity"]
    served = profile["quality_by_text"]["dpkg-spec"]["quality"]["2"]["adapter_perplexity"]
    assert ratios["2"] == pytest.approx(served / full, abs=1e-4)
