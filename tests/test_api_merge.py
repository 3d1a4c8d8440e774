"""A full HTTP round trip through a real Redis and a real worker: import, merge, poll, load."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tests.tiny_models import make_tiny_llama
from workers.merge.config import load_merge_config
from workers.merge.executor import merge_models

TIES_YAML = """
merge_method: ties
base_model: fam-base
models:
  - model: fam-a
    parameters: {weight: 0.6, density: 0.5}
  - model: fam-b
    parameters: {weight: 0.4, density: [0.3, 0.9]}
dtype: float32
name: fam-ties
"""


@pytest.fixture(scope="session")
def imported(server, tiny_family):
    with server.client() as c:
        for name, path in tiny_family.items():
            r = c.post("/v1/models/import", json={"id": f"fam-{name}", "path": str(path)})
            assert r.status_code == 201, r.text
    return {f"fam-{k}": v for k, v in tiny_family.items()}


def test_import_lists_models_in_openai_shape_with_strata_metadata(server, imported):
    with server.client() as c:
        listing = c.get("/v1/models").json()
        one = c.get("/v1/models/fam-a").json()
    assert listing["object"] == "list"
    ids = [m["id"] for m in listing["data"]]
    assert {"fam-base", "fam-a", "fam-b"} <= set(ids)
    assert one["object"] == "model" and one["owned_by"] == "strata"
    meta = one["strata"]
    assert meta["architecture"] == "LlamaForCausalLM" and meta["num_layers"] == 4
    assert meta["dtype"] == "float32" and meta["num_parameters"] > 0 and meta["size_bytes"] > 0


def test_yaml_ties_merge_round_trip_registers_a_loadable_model(server, imported, tmp_path):
    with server.client() as c:
        r = c.post("/v1/merges", content=TIES_YAML, headers={"Content-Type": "application/yaml"})
        assert r.status_code == 202, r.text
        job = r.json()
        assert job["status"] in ("queued", "started") and job["kind"] == "merge"
        final = server.wait_job(job["id"])
        assert final["status"] == "finished", final["error"]
        assert final["progress"] == 1.0 and final["result"]["model"] == "fam-ties"
        assert final["elapsed_s"] is not None and final["result"]["tensors"] > 0
        record = c.get("/v1/models/fam-ties").json()["strata"]
        assert record["parents"] == ["fam-base", "fam-a", "fam-b"]
        assert record["recipe"]["merge_method"] == "ties"
        listed = [j["id"] for j in c.get("/v1/jobs").json()["data"]]
        assert job["id"] in listed

    stored = server.home / "models" / "fam-ties"
    model = AutoModelForCausalLM.from_pretrained(stored)  # plain transformers loads it
    assert model.config.num_hidden_layers == 4

    # The worker's output equals the library's output for the same recipe.
    config = load_merge_config(TIES_YAML)
    (tmp_path / "ref").mkdir()
    merge_models(config, imported, tmp_path / "ref", device=torch.device("cpu"))
    ours, ref = load_file(stored / "model.safetensors"), load_file(tmp_path / "ref" / "model.safetensors")
    assert all(torch.equal(ours[k], ref[k]) for k in ref)


def _dare_job(c, name: str, seed: int) -> dict:
    body = {
        "kind": "merge",
        "merge_method": "dare_ties",
        "base_model": "fam-base",
        "models": [
            {"model": "fam-a", "parameters": {"weight": 0.5, "density": 0.4}},
            {"model": "fam-b", "parameters": {"weight": 0.5, "density": 0.4}},
        ],
        "name": name,
        "seed": seed,
    }
    r = c.post("/v1/jobs", json=body)
    assert r.status_code == 202, r.text
    return r.json()


def test_dare_json_job_is_reproducible_for_a_seed(server, imported):
    with server.client() as c:
        jobs = [_dare_job(c, "fam-dare-1", 7), _dare_job(c, "fam-dare-2", 7), _dare_job(c, "fam-dare-3", 8)]
    for job in jobs:
        assert server.wait_job(job["id"])["status"] == "finished"
    t = [load_file(server.home / "models" / f"fam-dare-{i}" / "model.safetensors") for i in (1, 2, 3)]
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(t[0][name], t[1][name])
    assert not torch.equal(t[0][name], t[2][name])


BAD = [
    (
        {"merge_method": "nope", "base_model": "fam-base", "models": [{"model": "fam-a"}]},
        "unknown merge_method",
    ),
    (
        {
            "merge_method": "ties",
            "base_model": "fam-base",
            "models": [{"model": "fam-a", "parameters": {"weight": 1, "density": 0}}],
        },
        "density must be in (0, 1]",
    ),
    (
        {
            "merge_method": "ties",
            "base_model": "fam-base",
            "models": [{"model": "fam-a", "parameters": {"weight": 1, "density": 1.5}}],
        },
        "density must be in (0, 1]",
    ),
    (
        {"merge_method": "ties", "models": [{"model": "fam-a", "parameters": {"weight": 1}}]},
        "needs a base_model",
    ),
    (
        {"merge_method": "task_arithmetic", "base_model": "fam-base", "models": [{"model": "fam-a"}]},
        "needs parameter 'weight'",
    ),
    (
        {"merge_method": "linear", "models": [{"model": "no-such-model", "parameters": {"weight": 1}}]},
        "not registered",
    ),
    (
        {"merge_method": "linear", "models": [{"model": "fam-a", "parameters": {"weight": 1, "bogus": 2}}]},
        "unknown parameter 'bogus'",
    ),
    (
        {"merge_method": "linear", "models": [{"model": "/etc", "parameters": {"weight": 1}}]},
        "outside the import roots",
    ),
]


@pytest.mark.parametrize("body,message", BAD)
def test_bad_merge_configs_get_422_with_a_clear_message(server, imported, body, message):
    with server.client() as c:
        r = c.post("/v1/jobs", json={"kind": "merge", **body})
    assert r.status_code == 422, r.text
    assert message in json.dumps(r.json()), r.text


def test_non_homologous_models_get_422_naming_the_tensor(server, imported, tmp_path_factory):
    other = server.home.parent / "other"
    make_tiny_llama(other, seed=3, intermediate_size=96)
    yaml_text = (
        f"merge_method: linear\nmodels:\n  - model: fam-a\n    parameters: {{weight: 1}}\n"
        f"  - model: {other}\n    parameters: {{weight: 1}}\n"
    )
    with server.client() as c:
        r = c.post("/v1/merges", content=yaml_text, headers={"Content-Type": "application/yaml"})
    assert r.status_code == 422
    assert "not homologous" in r.text and "mlp" in r.text and "shape" in r.text


def test_yaml_endpoint_rejects_garbage_and_modules(server, imported):
    with server.client() as c:
        garbage = c.post(
            "/v1/merges", content="merge_method: [unclosed", headers={"Content-Type": "application/yaml"}
        )
        modules = c.post(
            "/v1/merges",
            content="modules: {}\nmerge_method: linear\n",
            headers={"Content-Type": "application/yaml"},
        )
        taken = c.post(
            "/v1/merges",
            content=TIES_YAML.replace("fam-ties", "fam-a"),
            headers={"Content-Type": "application/yaml"},
        )
    assert garbage.status_code == 422 and "not valid YAML" in garbage.text
    assert modules.status_code == 422 and "modules" in modules.text
    assert taken.status_code == 409 and "already exists" in taken.text


def test_a_truncated_input_is_refused_at_submission_naming_the_tensor(server, imported):
    broken = server.home.parent / "broken"
    shutil.copytree(imported["fam-b"], broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # header intact, data cut
    yaml_text = TIES_YAML.replace("model: fam-b\n", f"model: {broken}\n").replace("fam-ties", "fam-broken")
    with server.client() as c:
        r = c.post("/v1/merges", content=yaml_text, headers={"Content-Type": "application/yaml"})
        assert r.status_code == 422, r.text
        assert "tensor 'model." in r.json()["detail"] and "outside the file's data" in r.json()["detail"]
        assert c.get("/v1/models/fam-broken").status_code == 404
    assert not (server.home / "models" / "fam-broken").exists()


def test_delete_model_and_unknown_ids_404(server, imported):
    with server.client() as c:
        r = c.post(
            "/v1/jobs", json={"kind": "variants", "base": "fam-base", "count": 1, "prefix": "fam-doomed"}
        )
        assert server.wait_job(r.json()["id"])["status"] == "finished"
        assert c.delete("/v1/models/fam-doomed-1").json()["deleted"] is True
        assert c.get("/v1/models/fam-doomed-1").status_code == 404
        assert c.delete("/v1/models/fam-doomed-1").status_code == 404
        assert c.get("/v1/jobs/not-a-job").status_code == 404
    assert not (server.home / "models" / "fam-doomed-1").exists()


def test_cancel_a_running_job_stops_it_and_registers_nothing_unfinished(server, imported):
    job_id = server.start_slow_job(server.home.parent / "big", "big-v")
    with server.client() as c:
        canceled = c.delete(f"/v1/jobs/{job_id}").json()
        assert canceled["status"] == "canceled"
        registered = {m["id"] for m in c.get("/v1/models").json()["data"]}
    made = sorted(m for m in registered if m.startswith("big-v-"))
    assert len(made) < 16
    for model_id in made:  # whatever was registered is complete
        AutoModelForCausalLM.from_pretrained(server.home / "models" / model_id)
    on_disk = {p.name for p in (server.home / "models").iterdir() if p.name.startswith("big-v-")}
    assert on_disk == set(made)
