"""sort and truncate jobs, and self-speculative generation, through the HTTP API on a tiny model."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.tiny_models import make_tiny_chat_llama
from workers.early_exit.adapters import load_adapters
from workers.early_exit.forward import exit_logits

EXAMPLES = [
    {"messages": [{"role": "user", "content": f"say {w}"}, {"role": "assistant", "content": f"{w} {w} {w}."}]}
    for w in ("tea", "sun", "rain", "moon", "bread", "stone")
] + [{"prompt": "the sky is", "response": " blue today."}]


@pytest.fixture(scope="session")
def sorter(server):
    path = server.home.parent / "sorter"
    make_tiny_chat_llama(path, seed=31)
    with server.client() as c:
        assert c.post("/v1/models/import", json={"id": "sorter", "path": str(path)}).status_code == 201
    return path


def test_truncate_exports_an_exit_that_plain_transformers_loads(server, sorter):
    result = server.run_job({"kind": "truncate", "model": "sorter", "num_layers": 2, "name": "sorter-exit2"})
    assert result["num_layers"] == 2
    source = AutoModelForCausalLM.from_pretrained(sorter)
    cut = AutoModelForCausalLM.from_pretrained(server.home / "models" / "sorter-exit2")
    ids = torch.randint(4, 128, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(cut(ids).logits, exit_logits(source, ids, 2), atol=1e-5, rtol=1e-5)


def test_sort_trains_every_exit_and_profiles_the_result(server, sorter):
    result = server.run_job(
        {
            "kind": "sort",
            "model": "sorter",
            "examples": EXAMPLES,
            "exits": [2, 4],
            "steps": 4,
            "batch_size": 2,
            "seq_len": 64,
            "lr": 1e-3,
            "name": "sorter-soft",
        },
    )
    training = result["training"]
    assert training["exits"] == [2, 4] and training["steps"] == 4
    assert set(training["final_losses"]) == {"2", "4"}
    assert set(result["quality"]) == {"2", "4"} and result["quality"]["4"]["top1_agreement"] == 1.0
    with server.client() as c:
        record = c.get("/v1/models/sorter-soft").json()["strata"]
    assert record["parents"] == ["sorter"] and record["profile"]["grid"] == [2, 4]


def test_sort_with_exit_adapters_stores_records_and_serves_them(server, sorter):
    body = {"kind": "sort", "model": "sorter", "examples": EXAMPLES, "exits": [2, 4], "steps": 3}
    result = server.run_job(
        {**body, "batch_size": 2, "seq_len": 64, "exit_adapters": True, "name": "sorted-lens"}
    )
    assert result["exit_adapters"] == [2]
    adapters = load_adapters(server.home / "models" / "sorted-lens", 4, 64)
    assert adapters is not None and adapters.depths == [2]
    with server.client() as c:
        record = c.get("/v1/models/sorted-lens").json()["strata"]
        shallow = c.post("/v1/generate", json={"model": "sorted-lens", "prompt": "the sky", "depth": 2})
    assert record["exit_adapters"]["exits"] == [2]
    assert record["exit_adapters"]["recipe"]["trained_with"] == "sort"
    assert record["profile"]["quality"]["2"]["adapter_perplexity"] > 0
    assert shallow.status_code == 200 and shallow.json()["strata"]["exit_adapter"] is True


def test_self_speculative_generation_equals_full_depth_greedy(server, sorter):
    base = {"model": "sorter", "prompt": "the moon and the sun", "max_new_tokens": 16}
    with server.client() as c:
        full = c.post("/v1/generate", json={**base, "depth": 4}).json()
        fast = c.post("/v1/generate", json={**base, "speculative": {"draft_depth": 2, "num_draft_tokens": 3}})
        sampled = c.post("/v1/generate", json={**base, "temperature": 0.5, "speculative": {"draft_depth": 2}})
    assert fast.status_code == 200, fast.text
    assert fast.json()["text"] == full["text"] and fast.json()["strata"]["depth"] == 4
    stats = fast.json()["strata"]["speculative"]
    assert stats["draft_depth"] == 2 and stats["num_draft_tokens"] == 3 and stats["iterations"] >= 1
    assert 0 <= stats["accepted"] <= stats["drafted"] and stats["acceptance_rate"] == pytest.approx(
        stats["accepted"] / max(1, stats["drafted"])
    )
    assert full["strata"]["speculative"] is None
    assert sampled.status_code == 422 and "greedy" in sampled.text
