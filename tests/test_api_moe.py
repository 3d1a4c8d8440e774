"""MoE over HTTP: a mergekit-moe YAML at /v1/merges (or a `moe` job) runs on a real worker, registers a
Mixtral model with the experts as parents, and bad recipes get a 422 with nothing registered."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tests.test_moe_vs_mergekit import save_chat_variant
from tests.tiny_models import make_tiny_chat_llama, make_tiny_llama

MOE_YAML = """
base_model: {base}
gate_mode: hidden
dtype: float32
experts_per_token: 2
experts:
  - source_model: moe-a
    positive_prompts: ["the cat sat on the mat"]
  - source_model: moe-b
    positive_prompts: ["numbers 123 456"]
name: {name}
"""


@pytest.fixture(scope="module")
def moe_experts(server):
    root = server.home.parent / "moe-experts"
    make_tiny_chat_llama(root / "base", seed=0)
    save_chat_variant(root / "base", root / "a", seed=1)
    save_chat_variant(root / "base", root / "b", seed=2)
    make_tiny_llama(root / "wide", seed=3, intermediate_size=96)
    with server.client() as c:
        for name in ("a", "b"):
            r = c.post("/v1/models/import", json={"id": f"moe-{name}", "path": str(root / name)})
            assert r.status_code == 201, r.text
    return root


def post_yaml(server, text: str):
    with server.client() as c:
        return c.post("/v1/merges", content=text, headers={"Content-Type": "application/yaml"})


def test_moe_yaml_at_merges_registers_a_mixtral_with_the_experts_as_parents(server, moe_experts):
    r = post_yaml(server, MOE_YAML.format(base=moe_experts / "base", name="moe-mix"))
    assert r.status_code == 202, r.text
    assert r.json()["kind"] == "moe"
    final = server.wait_job(r.json()["id"])
    assert final["status"] == "finished", final["error"]
    assert final["result"]["num_experts"] == 2 and final["result"]["architecture"] == "MixtralForCausalLM"
    with server.client() as c:
        record = c.get("/v1/models/moe-mix").json()["strata"]
    assert record["parents"] == [str(moe_experts / "base"), "moe-a", "moe-b"]
    assert record["architecture"] == "MixtralForCausalLM" and record["recipe"]["gate_mode"] == "hidden"

    stored = server.home / "models" / "moe-mix"
    model = AutoModelForCausalLM.from_pretrained(stored).eval()
    assert model.generate(torch.tensor([[1, 30, 31]]), max_new_tokens=4, do_sample=False).shape == (1, 7)
    weights = load_file(stored / "model.safetensors")
    b = load_file(moe_experts / "b" / "model.safetensors")
    assert torch.equal(
        weights["model.layers.2.mlp.experts.down_proj"][1], b["model.layers.2.mlp.down_proj.weight"]
    )
    assert json.loads((stored / "config.json").read_text())["num_experts_per_tok"] == 2
    with server.client() as c:  # Strata's inference workers serve it too, at any exit depth
        for depth in (2, 4):
            r = c.post(
                "/v1/generate",
                json={"model": "moe-mix", "prompt": "the cat", "max_new_tokens": 4, "depth": depth},
            )
            assert r.status_code == 200, r.text
            assert r.json()["strata"]["depth"] == depth and r.json()["usage"]["completion_tokens"] >= 1


def test_moe_as_a_json_job(server, moe_experts):
    spec = {
        "kind": "moe",
        "base_model": str(moe_experts / "base"),
        "gate_mode": "random",
        "experts_per_token": 1,
        "experts": [{"source_model": "moe-a"}, {"source_model": "moe-b"}],
        "seed": 3,
        "name": "moe-random",
    }
    with server.client() as c:
        r = c.post("/v1/jobs", json=spec)
        assert r.status_code == 202, r.text
        final = server.wait_job(r.json()["id"])
        assert final["status"] == "finished", final["error"]
        assert c.get("/v1/models/moe-random").json()["strata"]["parents"][1:] == ["moe-a", "moe-b"]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.replace("gate_mode: hidden", "gate_mode: telepathy"), "gate_mode"),
        (lambda t: t.replace("source_model: moe-b", "source_model: {wide}"), "not homologous"),
        (lambda t: t.replace("source_model: moe-b", "source_model: moe-missing"), "not registered"),
        (lambda t: t.replace("experts_per_token: 2", "experts_per_token: 3"), "only 2 experts"),
        (lambda t: t + "shared_experts:\n  - source_model: moe-a\n", "no MoE architecture fits"),
    ],
)
def test_bad_moe_recipes_get_422_and_register_nothing(server, moe_experts, edit, message):
    text = edit(MOE_YAML).format(base=moe_experts / "base", name="moe-bad", wide=moe_experts / "wide")
    r = post_yaml(server, text)
    assert r.status_code == 422, r.text
    assert message in r.text
    with server.client() as c:
        assert c.get("/v1/models/moe-bad").status_code == 404


def test_dry_run_of_a_moe_recipe_is_a_short_422(server, moe_experts):
    with server.client() as c:
        r = c.post(
            "/v1/merges/validate",
            content=MOE_YAML.format(base=moe_experts / "base", name="moe-dry"),
            headers={"Content-Type": "application/yaml"},
        )
    assert r.status_code == 422 and "POST /v1/merges" in r.json()["detail"], r.text
