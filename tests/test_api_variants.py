"""Variants through the service: a `variants` job stores each as its base + a compressed delta (form and
error in its record), and generation for a variant, native and OpenAI, gives its full model's tokens while
the worker holds one copy of the base."""

from __future__ import annotations

import openai
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.tiny_models import make_tiny_chat_llama
from workers.generation.reference import greedy_reference


def test_a_variants_job_stores_deltas_and_variants_generate_their_own_tokens(server):
    path = server.home.parent / "vbase"
    make_tiny_chat_llama(path, seed=21)
    tokenizer = AutoTokenizer.from_pretrained(path)
    with server.client() as c:
        assert c.post("/v1/models/import", json={"id": "vbase", "path": str(path)}).status_code == 201
        spec = {"kind": "variants", "base": "vbase", "count": 2, "scale": 0.05, "prefix": "vv"}
        exact = c.post("/v1/jobs", json={**spec, "delta_error_budget": 0.0}).json()
        assert server.wait_job(exact["id"])["status"] == "finished"
        record = c.get("/v1/models/vv-1").json()["strata"]
        assert record["base_model"] == "vbase"
        assert record["delta"]["forms"] == {"dense": record["delta"]["forms"]["dense"]}
        assert record["delta"]["max_relative_error"] == 0.0
        low = c.post(
            "/v1/jobs", json={**spec, "prefix": "vl", "count": 1, "rank": 2, "delta_error_budget": 0.01}
        ).json()
        assert server.wait_job(low["id"])["status"] == "finished"
        delta = c.get("/v1/models/vl-1").json()["strata"]["delta"]
        assert delta["forms"]["low_rank"] > 0 and delta["bytes_vs_base"] < 0.3
        assert delta["max_relative_error"] <= 0.01

        prompt = "the cat sat"
        ids = tokenizer.encode(prompt)
        for model_id in ("vv-1", "vv-2"):
            full = AutoModelForCausalLM.from_pretrained(server.home / "models" / model_id).eval()
            with torch.no_grad():
                expected = tokenizer.decode(greedy_reference(full, ids, 4, 10), skip_special_tokens=True)
            body = {"model": model_id, "prompt": prompt, "max_new_tokens": 10, "depth": 4}
            r = c.post("/v1/generate", json=body)
            assert r.status_code == 200, r.text
            assert r.json()["text"] == expected
            client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none")
            completion = client.completions.create(
                model=model_id, prompt=prompt, max_tokens=10, temperature=0
            )
            assert completion.choices[0].text == expected
