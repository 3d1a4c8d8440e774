"""POST /v1/merges for sce, breadcrumbs, della and ram: the worker registers what the library computes for
the same recipe (della: the same seed gives the same model); bad parameters get a 422 and register nothing."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from workers.merge.config import load_merge_config
from workers.merge.executor import merge_models

RECIPES = {
    "sce": """
merge_method: sce
base_model: f14-base
models:
  - model: f14-a
  - model: f14-b
parameters: {select_topk: 0.5}
dtype: float32
name: f14-sce
""",
    "breadcrumbs_ties": """
merge_method: breadcrumbs_ties
base_model: f14-base
models:
  - model: f14-a
    parameters: {weight: 0.6, density: 0.8, gamma: 0.05}
  - model: f14-b
    parameters: {weight: 0.4, density: [0.5, 0.9]}
parameters: {rescale: true}
dtype: float32
name: f14-breadcrumbs-ties
""",
    "della": """
merge_method: della
base_model: f14-base
models:
  - model: f14-a
    parameters: {weight: 0.5, density: 0.5, epsilon: 0.1}
  - model: f14-b
    parameters: {weight: 0.5, density: 0.4}
seed: 3
dtype: float32
name: f14-della
""",
    "ramplus_tl": """
merge_method: ramplus_tl
base_model: f14-base
models:
  - model: f14-a
  - model: f14-b
parameters: {epsilon: 0.01, r: 0.3}
dtype: float32
name: f14-ramplus
""",
}


@pytest.fixture(scope="module")
def f14(server, tiny_family):
    with server.client() as c:
        for name, path in tiny_family.items():
            r = c.post("/v1/models/import", json={"id": f"f14-{name}", "path": str(path)})
            assert r.status_code == 201, r.text
    return {f"f14-{k}": v for k, v in tiny_family.items()}


@pytest.mark.parametrize("method", sorted(RECIPES))
def test_merge_endpoint_registers_the_librarys_merge(server, f14, tmp_path, method):
    text = RECIPES[method]
    with server.client() as c:
        r = c.post("/v1/merges", content=text, headers={"Content-Type": "application/yaml"})
        assert r.status_code == 202, r.text
        final = server.wait_job(r.json()["id"])
        assert final["status"] == "finished", final["error"]
        config = load_merge_config(text)
        record = c.get(f"/v1/models/{config.name}").json()["strata"]
    assert record["parents"] == ["f14-base", "f14-a", "f14-b"]
    assert record["recipe"]["merge_method"] == method
    (tmp_path / "ref").mkdir()
    merge_models(config, f14, tmp_path / "ref", device=torch.device("cpu"))
    ours = load_file(server.home / "models" / config.name / "model.safetensors")
    ref = load_file(tmp_path / "ref" / "model.safetensors")
    base = load_file(f14["f14-base"] / "model.safetensors")
    assert ours.keys() == ref.keys() and all(torch.equal(ours[k], ref[k]) for k in ref)
    assert any(not torch.equal(ours[k], base[k]) for k in ref)


def _body(method: str, models: list[dict], **extra) -> dict:
    return {"kind": "merge", "merge_method": method, "base_model": "f14-base", "models": models, **extra}


BAD = [
    (
        _body("breadcrumbs", [{"model": "f14-a", "parameters": {"weight": 1, "gamma": 1.5}}]),
        "gamma must be in [0, 1]",
    ),
    (
        _body("della", [{"model": "f14-a", "parameters": {"weight": 1, "density": 0.1}}]),
        "epsilon 0.15 puts density +/- epsilon outside (0, 1)",
    ),
    (
        _body(
            "della_linear", [{"model": "f14-a", "parameters": {"weight": 1, "density": 0.7, "epsilon": 0.4}}]
        ),
        "puts density +/- epsilon outside (0, 1)",
    ),
    (
        _body("della", [{"model": "f14-a", "parameters": {"weight": 1, "epsilon": -0.1}}]),
        "epsilon must be in [0, 0.5]",
    ),
    (_body("sce", [{"model": "f14-a"}], parameters={"select_topk": 2}), "select_topk must be in [0, 1]"),
    (_body("sce", [{"model": "f14-a", "parameters": {"weight": 1}}]), "unknown parameter 'weight'"),
    (_body("ram", [{"model": "f14-a"}], parameters={"epsilon": 1e6}), "epsilon must be in"),
    (_body("ramplus_tl", [{"model": "f14-a"}], parameters={"alpha": -1}), "alpha must be in"),
    ({"kind": "merge", "merge_method": "ram", "models": [{"model": "f14-a"}]}, "needs a base_model"),
]


@pytest.mark.parametrize("body,message", BAD)
def test_bad_parameters_get_422_and_register_nothing(server, f14, body, message):
    with server.client() as c:
        before = {m["id"] for m in c.get("/v1/models").json()["data"]}
        r = c.post("/v1/jobs", json={**body, "name": "f14-never"})
        after = {m["id"] for m in c.get("/v1/models").json()["data"]}
    assert r.status_code == 422, r.text
    assert message in json.dumps(r.json()), r.text
    assert after == before


def test_non_finite_yaml_parameters_get_422(server, f14):
    text = "merge_method: ram\nbase_model: f14-base\nmodels:\n  - model: f14-a\nparameters: {epsilon: .nan}\n"
    with server.client() as c:
        r = c.post("/v1/merges", content=text, headers={"Content-Type": "application/yaml"})
    assert r.status_code == 422 and "epsilon" in r.text and "must be finite" in r.text, r.text
