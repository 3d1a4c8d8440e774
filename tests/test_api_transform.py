"""sparsify, prune and grow jobs through the HTTP API, on tiny models with a tokenizer."""

from __future__ import annotations

import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.tiny_models import make_tiny_chat_llama, make_variant


@pytest.fixture(scope="session")
def talker(server):
    root = server.home.parent / "talker"
    make_tiny_chat_llama(root / "base", seed=21, num_hidden_layers=4, intermediate_size=128)
    make_variant(root / "base", root / "tuned", seed=22, scale=0.001)
    make_variant(root / "base", root / "far", seed=23, scale=0.05)
    for name in ("tuned", "far"):
        for f in (root / "base").glob("tokenizer*"):
            shutil.copy(f, root / name / f.name)
    with server.client() as c:
        for name in ("base", "tuned", "far"):
            r = c.post("/v1/models/import", json={"id": f"talker-{name}", "path": str(root / name)})
            assert r.status_code == 201, r.text
    return root


def run_job(server, body: dict) -> dict:
    return server.run_job(body, timeout=300)


def test_sparsify_with_dare_keeps_about_density_and_reports_deltas_and_perplexity(server, talker):
    result = run_job(
        server,
        {
            "kind": "sparsify",
            "model": "talker-tuned",
            "base": "talker-base",
            "method": "dare",
            "density": 0.3,
            "seed": 1,
            "name": "talker-dare",
        },
    )
    assert abs(result["kept_fraction"] - 0.3) < 0.02
    assert 0 < result["delta_abs"]["median"] <= result["delta_abs"]["p99"] <= result["delta_abs"]["max"]
    assert set(result["perplexity"]) == {"before", "after"} and result["perplexity"]["after"] > 0
    assert "warning" not in result  # |delta| ~ 0.001: DARE's regime
    magnitude = run_job(
        server,
        {
            "kind": "sparsify",
            "model": "talker-tuned",
            "base": "talker-base",
            "method": "magnitude",
            "density": 0.5,
            "evaluate": False,
        },
    )
    assert abs(magnitude["kept_fraction"] - 0.5) < 0.01 and "perplexity" not in magnitude
    far = run_job(
        server, {"kind": "sparsify", "model": "talker-far", "base": "talker-base", "evaluate": False}
    )
    assert "deltas are large for DARE" in far["warning"]
    with server.client() as c:
        record = c.get("/v1/models/talker-dare").json()["strata"]
    assert record["parents"] == ["talker-tuned", "talker-base"] and record["recipe"]["kind"] == "sparsify"


def test_prune_hits_the_target_config_exactly_and_compares_with_random(server, talker):
    result = run_job(
        server,
        {
            "kind": "prune",
            "model": "talker-base",
            "name": "talker-small",
            "target": {"num_hidden_layers": 3, "intermediate_size": 96},
            "calibration_windows": 2,
            "heal": {"steps": 2, "data": "instructions"},
        },
    )
    assert result["config"]["num_hidden_layers"] == 3 and result["config"]["intermediate_size"] == 96
    assert len(result["removed_layers"]) == 1 and 0 < result["removed_fraction"] < 1
    assert set(result["perplexity"]) == {"source", "pruned", "random", "healed"}
    model = AutoModelForCausalLM.from_pretrained(server.home / "models" / "talker-small")
    assert model.config.num_hidden_layers == 3 and model.config.intermediate_size == 96
    assert model.num_parameters() == result["config"]["params"]


def test_prune_by_block_replacement_compares_with_removal_and_random_healed_or_not(server, talker):
    result = run_job(
        server,
        {
            "kind": "prune",
            "model": "talker-base",
            "name": "talker-streamlined",
            "target": {"num_hidden_layers": 2},
            "calibration_windows": 2,
            "replace": {"steps": 4},
            "heal": {"steps": 1},
        },
    )
    keys = {"source", "pruned", "random", "removed", "healed", "removed_healed"}
    assert set(result["perplexity"]) == keys and all(v > 0 for v in result["perplexity"].values())
    replaced = result["replaced"]
    assert len(replaced["block"]) == 3 and replaced["init_layer"] in replaced["block"]
    assert result["removed_layers"] == replaced["block"] and len(result["removed_layers_plain"]) == 2
    assert replaced["steps"] == 4 and replaced["relative_mse_after"] >= 0
    model = AutoModelForCausalLM.from_pretrained(server.home / "models" / "talker-streamlined")
    assert model.config.num_hidden_layers == 2 and model.num_parameters() == result["config"]["params"]
    source = AutoModelForCausalLM.from_pretrained(talker / "base")
    first_two = {n: p.shape for n, p in source.named_parameters() if not any(f".{i}." in n for i in (2, 3))}
    assert {n: p.shape for n, p in model.named_parameters()} == first_two
    # Its exits can be profiled and served like any model's.
    with server.client() as c:
        r = c.post(
            "/v1/jobs", json={"kind": "profile", "model": "talker-streamlined", "grid": [1, 2], "repeats": 1}
        )
        assert r.status_code == 202, r.text
        assert server.wait_job(r.json()["id"])["status"] == "finished"
        body = {"model": "talker-streamlined", "prompt": "ab", "depth": 1, "max_new_tokens": 3}
        served = c.post("/v1/generate", json=body)
    assert served.status_code == 200, served.text
    assert served.json()["strata"]["depth"] == 1 and served.json()["strata"]["num_layers"] == 2


def test_grow_is_function_preserving(server, talker):
    result = run_job(
        server,
        {
            "kind": "grow",
            "model": "talker-base",
            "name": "talker-big",
            "insert_after": [0, 3],
            "intermediate_size": 200,
        },
    )
    assert result["num_hidden_layers"] == 6 and result["intermediate_size"] == 200
    assert result["max_logit_diff"] <= 1e-4
    source = AutoModelForCausalLM.from_pretrained(talker / "base")
    grown = AutoModelForCausalLM.from_pretrained(server.home / "models" / "talker-big")
    ids = torch.randint(4, 128, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(grown(ids).logits, source(ids).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "body,message",
    [
        ({"kind": "prune", "model": "talker-base", "target": {"num_hidden_layers": 9}}, "exceeds the source"),
        ({"kind": "prune", "model": "talker-base", "target": {}}, "give one of"),
        (
            {"kind": "prune", "model": "talker-base", "target": {"num_hidden_layers": 0}, "replace": {}},
            "greater than or equal to 1",
        ),
        (
            {"kind": "prune", "model": "talker-base", "target": {"num_hidden_layers": 4}, "replace": {}},
            "replace needs a depth cut",
        ),
        (
            {"kind": "prune", "model": "talker-base", "target": {"param_budget": 10**6}, "replace": {}},
            "replace needs a depth cut",
        ),
        (
            {
                "kind": "prune",
                "model": "talker-base",
                "target": {"num_hidden_layers": 2},
                "replace": {"block_start": 2},
            },
            "crosses the end of the 4-layer stack",
        ),
        (
            {
                "kind": "prune",
                "model": "talker-base",
                "target": {"param_budget": 10**6, "axes": ["depth"]},
                "replace": {"block_start": 3},
            },
            "crosses the end",
        ),
        ({"kind": "grow", "model": "talker-base", "insert_after": [7]}, "insert_after indices"),
        ({"kind": "grow", "model": "talker-base", "intermediate_size": 8}, "below the current"),
        (
            {"kind": "sparsify", "model": "talker-tuned", "base": "talker-base", "density": 0},
            "greater than 0",
        ),
    ],
)
def test_bad_transform_jobs_are_422(server, talker, body, message):
    with server.client() as c:
        r = c.post("/v1/jobs", json=body)
    assert r.status_code == 422 and message in r.text, r.text


@pytest.mark.parametrize(
    "spec",
    [
        "kind: sparsify\nmodel: talker-tuned\nbase: talker-base\nmethod: magnitude\ndensity: 0.5\n"
        "name: talker-cli-sparse\n",
        "kind: prune\nmodel: talker-base\ntarget: {num_hidden_layers: 3}\ncalibration_windows: 2\n"
        "name: talker-cli-pruned\n",
        "kind: grow\nmodel: talker-base\ninsert_after: [1]\nname: talker-cli-grown\n",
    ],
)
def test_transform_jobs_run_through_strata_submit(server, talker, tmp_path, spec):
    from typer.testing import CliRunner

    from service.cli import app

    path = tmp_path / "job.yml"
    path.write_text(spec)
    outcome = CliRunner().invoke(app, ["submit", str(path), "--wait", "--server", server.url])
    assert outcome.exit_code == 0, outcome.output
    name = spec.split("name: ")[1].strip()
    with server.client() as c:
        record = c.get(f"/v1/models/{name}").json()["strata"]
    assert record["recipe"]["kind"] == spec.split("\n")[0].split(": ")[1]
