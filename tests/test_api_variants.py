"""Variants through the service: a `variants` job stores each as its base + a compressed delta (form and
error in its record), and generation for a variant, native and OpenAI, gives its full model's tokens while
the worker holds one copy of the base."""

from __future__ import annotations

import time

import openai
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.tiny_models import make_tiny_chat_llama
from workers.generation.reference import greedy_reference
from workers.store.delta_only import full_model_dir


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
            stored = full_model_dir(server.home / "models", model_id)  # the delta alone: base + delta
            full = AutoModelForCausalLM.from_pretrained(stored).eval()
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

        # a per-request merge of the two: the tokens of the model a merge job registers for the same recipe
        recipe = {
            "merge_method": "linear",
            "models": [
                {"model": "vv-1", "parameters": {"weight": 0.3}},
                {"model": "vv-2", "parameters": {"weight": 0.7}},
            ],
        }
        r = c.post("/v1/merges", json={**recipe, "dtype": "float32", "name": "vv-mix"})
        assert server.wait_job(r.json()["id"])["status"] == "finished"
        body = {"prompt": prompt, "max_new_tokens": 10, "depth": 4}
        merged = c.post("/v1/generate", json={**body, "model": "vv-mix"}).json()["text"]
        r = c.post("/v1/generate", json={**body, "merge": recipe})
        assert r.status_code == 200, r.text
        assert r.json()["text"] == merged and r.json()["model"] == "vbase"
        completion = client.completions.create(
            model="vbase", prompt=prompt, max_tokens=10, temperature=0, extra_body={"merge": recipe}
        )
        assert completion.choices[0].text == merged
        mixed = {**recipe, "models": [*recipe["models"], {"model": "vl-1", "parameters": {"weight": 1}}]}
        assert c.post("/v1/generate", json={**body, "merge": mixed}).status_code == 200  # same base: fine
        # ties and dare per request: computed once per recipe, the tokens of the merge job's model
        for method, seed in (("ties", 0), ("dare_ties", 3)):
            computed = {
                "merge_method": method,
                "base_model": "vbase",
                "models": [
                    {"model": "vv-1", "parameters": {"weight": 0.6, "density": 0.5}},
                    {"model": "vv-2", "parameters": {"weight": 0.4, "density": 0.7}},
                ],
                "parameters": {"normalize": True},
                "seed": seed,
            }
            r = c.post("/v1/merges", json={**computed, "name": f"vv-{method}", "delta_error_budget": 0.0})
            assert server.wait_job(r.json()["id"])["status"] == "finished"
            record = c.get(f"/v1/models/vv-{method}").json()["strata"]  # a merge naming its base: a delta
            assert record["base_model"] == "vbase" and record["delta"]["max_relative_error"] == 0.0
            merged = c.post("/v1/generate", json={**body, "model": f"vv-{method}"}).json()["text"]
            for _ in range(2):  # the second from the worker's cache
                r = c.post("/v1/generate", json={**body, "merge": computed})
                assert r.status_code == 200, r.text
                assert r.json()["text"] == merged, method
        for bad, message in [
            ({**recipe, "merge_method": "slerp", "base_model": "vbase"}, "needs a merge job"),
            ({**recipe, "merge_method": "ties"}, "needs base_model"),
            (
                {**recipe, "models": [*recipe["models"], {"model": "vv-mix", "parameters": {"weight": 1}}]},
                "mixes",
            ),
            ({**recipe, "models": recipe["models"] * 5}, "at most"),
            ({**recipe, "models": [{"model": "nobody", "parameters": {"weight": 1}}]}, "not registered"),
        ]:
            r = c.post("/v1/generate", json={**body, "merge": bad})
            assert r.status_code in (404, 422) and message in r.json()["detail"], r.text

        # one copy of the base, both variants held over it: in /health (the heartbeat's report) and /metrics
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            held = [b.get("vbase") for b in c.get("/health").json()["resident"].values()]
            if any(h and {"vv-1", "vv-2"} <= set(h["variants"]) for h in held):
                break
            time.sleep(0.5)
        else:
            raise AssertionError(f"/health does not show the variants over vbase: {held}")
        assert not any("vv-1" in b for b in c.get("/health").json()["resident"].values())
        resident = c.get("/health").json()["resident"]
        counts = {len(b["vbase"]["variants"]) for b in resident.values() if "vbase" in b}
        text = c.get("/metrics").text
        shown = [
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("strata_resident_variants{") and 'base="vbase"' in line
        ]
        assert shown and {int(v) for v in shown} == counts and min(counts) >= 2, (shown, counts)


def test_imports_over_a_base_serve_adapters_and_fine_tunes_and_refuse_what_does_not_fit(server, tmp_path):
    from peft import LoraConfig, get_peft_model

    from tests.tiny_models import make_tiny_llama

    root = server.home.parent
    base_model = make_tiny_chat_llama(root / "abase", seed=31)
    tokenizer = AutoTokenizer.from_pretrained(root / "abase")
    peft_model = get_peft_model(
        base_model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "up_proj"])
    )
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(0.3 * torch.randn(param.shape, generator=generator))
    peft_model.save_pretrained(root / "an-adapter")
    merged = peft_model.merge_and_unload().eval()
    make_tiny_llama(root / "wide", seed=3, intermediate_size=96)
    with server.client() as c:
        assert (
            c.post("/v1/models/import", json={"id": "abase", "path": str(root / "abase")}).status_code == 201
        )
        r = c.post("/v1/models/import", json={"id": "ad", "path": str(root / "an-adapter"), "base": "abase"})
        assert r.status_code == 201, r.text
        record = r.json()["strata"]
        assert record["type"] == "adapter" and record["base_model"] == "abase"
        assert record["delta"]["forms"] == {"low_rank": 8}
        ids = tokenizer.encode("a dog")
        with torch.no_grad():
            expected = tokenizer.decode(greedy_reference(merged, ids, 4, 8), skip_special_tokens=True)
        r = c.post("/v1/generate", json={"model": "ad", "prompt": "a dog", "max_new_tokens": 8, "depth": 4})
        assert r.status_code == 200, r.text
        assert r.json()["text"] == expected

        bad = [
            ({"id": "x1", "path": str(root / "an-adapter"), "base": "nobody"}, "not registered"),
            ({"id": "x2", "path": str(root / "wide"), "base": "abase"}, "does not match the base"),
            ({"id": "x3", "path": str(root / "an-adapter"), "base": "ad"}, "is a LoRA adapter"),
        ]
        for body, message in bad:
            r = c.post("/v1/models/import", json=body)
            assert r.status_code == 422 and message in r.json()["detail"], r.text
            assert c.get(f"/v1/models/{body['id']}").status_code == 404
