"""Every job option is bounded by what the model allows before the job is queued (a 422 naming the bound),
and an option at its edge runs instead of crashing with an internal error."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from service import prechecks
from tests.local_api import local_api
from tests.tiny_models import make_tiny_chat_llama


@pytest.fixture
def client(tmp_path, isolated_redis_url):
    make_tiny_chat_llama(tmp_path / "roots" / "m")
    with local_api(tmp_path, isolated_redis_url) as c:
        assert (
            c.post("/v1/models/import", json={"id": "m", "path": str(tmp_path / "roots" / "m")}).status_code
            == 201
        )
        yield c


def refused(c: TestClient, body: dict, *needles: str) -> None:
    r = c.post("/v1/jobs", json=body)
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    text = detail if isinstance(detail, str) else str(detail)
    assert len(text) < 500
    for needle in needles:
        assert needle in text, text


def test_a_variants_rank_beyond_the_models_full_rank_is_refused(client):
    # the tiny model's matrices are at most rank 64: rank 1e9 would allocate terabytes
    refused(client, {"kind": "variants", "base": "m", "rank": 1_000_000_000, "prefix": "v"}, "rank", "1..64")
    assert (
        client.post("/v1/jobs", json={"kind": "variants", "base": "m", "rank": 64, "prefix": "v"}).status_code
        == 202
    )


@pytest.mark.parametrize(
    "body",
    [
        {"kind": "variants", "base": "m", "seed": 2**70},
        {"kind": "sparsify", "model": "m", "base": "m", "seed": -1},
        {"kind": "prune", "model": "m", "target": {"num_hidden_layers": 2}, "seed": 2**64},
        {"kind": "grow", "model": "m", "insert_after": [0], "seed": 2**63},
        {"kind": "sort", "model": "m", "seed": 2**100},
        {"kind": "fit_exits", "model": "m", "seed": 2**64},
    ],
)
def test_seeds_beyond_64_bits_are_refused(client, body):
    refused(client, body, "seed")


def test_lists_of_depths_name_each_depth_once(client):
    refused(client, {"kind": "profile", "model": "m", "grid": [1] * 1000}, "grid", "more than once")
    refused(client, {"kind": "fit_exits", "model": "m", "exits": [1, 1]}, "exits")
    refused(client, {"kind": "sort", "model": "m", "exits": [2, 2, 4]}, "exits")


def test_a_parameter_budget_no_model_meets_is_refused(client):
    body = {"kind": "prune", "model": "m", "target": {"param_budget": 10}}
    refused(client, body, "fits in 10 parameters")


def test_sizes_whose_memory_cannot_fit_are_refused(client, monkeypatch):
    refused(client, {"kind": "grow", "model": "m", "intermediate_size": 2**40}, "intermediate_size")
    page, pages = 4096, (64 << 20) // 4096  # a machine of 64 MiB
    monkeypatch.setattr(prechecks.os, "sysconf", lambda name: page if name == "SC_PAGE_SIZE" else pages)
    body = {"kind": "fit_exits", "model": "m", "distill_steps": 1, "distill_tokens": 1_000_000}
    refused(client, body, "memory", "distill_tokens")
    refused(client, {"kind": "grow", "model": "m", "intermediate_size": 2**20}, "memory")
    refused(
        client, {"kind": "sort", "model": "m", "batch_size": 1024, "seq_len": 8192}, "memory", "batch_size"
    )


def test_prune_by_replacement_with_no_fitting_steps_runs(server):
    path = server.home.parent / "replace0"
    make_tiny_chat_llama(path, seed=11)
    with server.client() as c:
        assert c.post("/v1/models/import", json={"id": "replace0", "path": str(path)}).status_code == 201
        body = {
            "kind": "prune",
            "model": "replace0",
            "target": {"num_hidden_layers": 3},
            "replace": {
                "steps": 0,
                "criterion": "influence",
                "compare_removal": False,
                "data": "calibration",
            },
            "compare_random": False,
            "seq_len": 32,
            "calibration_windows": 1,
            "name": "replace0-pruned",
        }
        r = c.post("/v1/jobs", json=body)
        assert r.status_code == 202, r.text
    final = server.wait_job(r.json()["id"], timeout=600)
    assert final["status"] == "finished", final["error"]  # was ZeroDivisionError
