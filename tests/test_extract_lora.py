"""LoRA extraction: the B @ A products of mergekit-extract-lora 0.1.5 on the same pair, an adapter that
peft loads onto the base, the reported reconstruction errors, and the extract_lora job end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from tests.tiny_models import make_tiny_llama, make_variant
from workers.lora.extract import ExtractionError, extract_lora

MERGEKIT_EXTRACT = Path(sys.executable).parent / "mergekit-extract-lora"
peft = pytest.importorskip("peft")


@pytest.fixture(scope="module", params=["untied", "tied"])
def pair(request, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp(f"lora-{request.param}")
    make_tiny_llama(root / "base", seed=0, tie_word_embeddings=request.param == "tied")
    make_variant(root / "base", root / "ft", seed=1, scale=0.01)
    return root


def _extract(root: Path, out: Path, **options):
    out.mkdir()
    options = {"max_rank": 8, **options}
    return extract_lora(root / "ft", root / "base", out, base_name="base", **options)


def _products(directory: Path) -> dict[str, torch.Tensor]:
    """B @ A per adapted module, and every full-rank tensor as it is."""
    weights = load_file(directory / "adapter_model.safetensors")
    out = {}
    for name, tensor in weights.items():
        if ".lora_A." in name:
            out[name.replace(".lora_A.weight", "")] = weights[name.replace("lora_A", "lora_B")] @ tensor
        elif ".lora_" not in name:
            out[name] = tensor
    return out


@pytest.mark.skipif(not MERGEKIT_EXTRACT.exists(), reason="mergekit 0.1.5 (test extra) is not installed")
@pytest.mark.parametrize("options", [{"max_rank": 8}, {"max_rank": 40, "sv_epsilon": 0.09}])
def test_products_equal_mergekit_extract_lora(pair, tmp_path, options):
    args = ["--max-rank", str(options["max_rank"])]
    if "sv_epsilon" in options:
        args += ["--sv-epsilon", str(options["sv_epsilon"])]
    subprocess.run(
        [str(MERGEKIT_EXTRACT), "--model", str(pair / "ft"), "--base-model", str(pair / "base")]
        + ["--out-path", str(tmp_path / "mk"), *args],
        check=True,
        capture_output=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    result = _extract(pair, tmp_path / "ours", **options)
    theirs, ours = _products(tmp_path / "mk"), _products(tmp_path / "ours")
    assert ours.keys() == theirs.keys()
    worst = max((ours[k] - theirs[k]).abs().max().item() for k in ours)
    assert worst <= 1e-4, worst
    mk_config = json.loads((tmp_path / "mk" / "adapter_config.json").read_text())
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    for key in ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "peft_type", "task_type"):
        assert config[key] == mk_config[key], key
    for key in ("target_modules", "modules_to_save"):
        assert sorted(config[key]) == sorted(mk_config[key]), key
    ranks = {m["rank"] for m in result.modules.values()}
    assert max(ranks) == config["r"] and (len(ranks) > 1) == ("sv_epsilon" in options)


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def test_peft_loads_the_adapter_and_full_rank_reproduces_the_fine_tune(pair, tmp_path):
    result = _extract(pair, tmp_path / "full", max_rank=128)  # >= every layer's rank: exact
    assert all(m["relative_error"] < 1e-5 for m in result.modules.values())
    adapted = peft.PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(pair / "base"), tmp_path / "full"
    )
    tuned = AutoModelForCausalLM.from_pretrained(pair / "ft")
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    assert (_logits(adapted, ids) - _logits(tuned, ids)).abs().max().item() < 1e-4
    base = AutoModelForCausalLM.from_pretrained(pair / "base")
    assert (_logits(base, ids) - _logits(tuned, ids)).abs().max().item() > 1e-2  # the adapter did the work


def test_reported_errors_are_the_relative_frobenius_errors_of_the_products(pair, tmp_path):
    result = _extract(pair, tmp_path / "r8", max_rank=8)
    products = _products(tmp_path / "r8")
    tuned, base = load_file(pair / "ft" / "model.safetensors"), load_file(pair / "base" / "model.safetensors")
    for name, report in result.modules.items():
        delta = tuned[f"{name}.weight"] - base[f"{name}.weight"]
        error = (delta - products[f"base_model.model.{name}"]).norm() / delta.norm()
        assert report["rank"] == 8 and report["relative_error"] == pytest.approx(error.item(), abs=1e-5)
        assert 0.05 < report["relative_error"] < 1  # dense random deltas: rank 8 loses a part


def test_sv_epsilon_keeps_the_rank_of_a_low_rank_fine_tune(tmp_path):
    make_tiny_llama(tmp_path / "base", seed=0)
    weights = load_file(tmp_path / "base" / "model.safetensors")
    generator = torch.Generator().manual_seed(3)
    for name, w in weights.items():
        if w.dim() == 2 and "embed" not in name and "lm_head" not in name:
            w += torch.randn(w.shape[0], 3, generator=generator) @ torch.randn(
                3, w.shape[1], generator=generator
            )
    (tmp_path / "ft").mkdir()
    for f in (tmp_path / "base").iterdir():
        if f.name != "model.safetensors":
            (tmp_path / "ft" / f.name).write_bytes(f.read_bytes())
    save_file(weights, tmp_path / "ft" / "model.safetensors", metadata={"format": "pt"})
    result = _extract(tmp_path, tmp_path / "out", max_rank=32, sv_epsilon=1e-3)
    assert {m["rank"] for m in result.modules.values()} == {3}
    assert all(m["relative_error"] < 1e-5 for m in result.modules.values())
    with pytest.raises(ExtractionError, match="no linear layer differs"):
        _extract(tmp_path, tmp_path / "none", max_rank=32, sv_epsilon=1e6)


# --- the job, through the API ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_models(server, tiny_family):
    with server.client() as c:
        for name in ("base", "a"):
            r = c.post("/v1/models/import", json={"id": f"lx-{name}", "path": str(tiny_family[name])})
            assert r.status_code == 201, r.text
    return tiny_family


def test_extract_lora_job_registers_a_downloadable_adapter_of_the_base(server, lora_models, tmp_path):
    spec = {"kind": "extract_lora", "model": "lx-a", "base": "lx-base", "max_rank": 16, "name": "lx-lora"}
    with server.client() as c:
        r = c.post("/v1/jobs", json=spec)
        assert r.status_code == 202, r.text
        final = server.wait_job(r.json()["id"])
        assert final["status"] == "finished", final["error"]
        record = c.get("/v1/models/lx-lora").json()["strata"]
        files = {f["name"]: f["size_bytes"] for f in c.get("/v1/models/lx-lora/files").json()["data"]}
        (tmp_path / "dl").mkdir()
        for name in files:
            got = c.get(f"/v1/models/lx-lora/files/{name}")
            assert got.status_code == 200
            (tmp_path / "dl" / name).write_bytes(got.content)
        missing = c.get("/v1/models/lx-lora/files/..%2Fconfig.json")
        as_model = c.post(
            "/v1/merges",
            json={"merge_method": "linear", "models": [{"model": "lx-lora", "parameters": {"weight": 1}}]},
        )
    result = final["result"]
    assert result["model"] == "lx-lora" and result["base"] == "lx-base" and result["rank"] == 16
    assert len(result["modules"]) == 4 * 7 and all(
        0 < m["relative_error"] < 1 for m in result["modules"].values()
    )
    assert record["type"] == "adapter" and record["base_model"] == "lx-base"
    assert record["parents"] == ["lx-a", "lx-base"] and record["architecture"] == "LlamaForCausalLM"
    # the adapter, and the same factors as a delta the inference workers serve over the base unmerged
    assert set(files) == {
        "adapter_config.json",
        "adapter_model.safetensors",
        "variant_delta.json",
        "variant_delta.safetensors",
    }
    assert record["delta"]["base"] == "lx-base" and record["delta"]["forms"]["low_rank"] == 4 * 7
    assert missing.status_code == 404
    assert as_model.status_code == 422 and "LoRA adapter" in as_model.text
    # The download is the adapter the library writes, and peft applies it to the base
    (tmp_path / "lib").mkdir()
    extract_lora(lora_models["a"], lora_models["base"], tmp_path / "lib", base_name="lx-base", max_rank=16)
    ours, ref = _products(tmp_path / "dl"), _products(tmp_path / "lib")
    assert all(torch.allclose(ours[k], ref[k], atol=1e-6) for k in ref)
    peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(lora_models["base"]), tmp_path / "dl")


@pytest.mark.parametrize(
    "patch,message",
    [
        ({"max_rank": 0}, "greater than or equal to 1"),
        ({"sv_epsilon": -1}, "greater than or equal to 0"),
        ({"base": "no-such-model"}, "not registered"),
        ({"name": "lx-a"}, "already exists"),
    ],
)
def test_bad_extract_lora_requests_are_refused_and_register_nothing(server, lora_models, patch, message):
    spec = {"kind": "extract_lora", "model": "lx-a", "base": "lx-base", "name": "lx-never", **patch}
    with server.client() as c:
        r = c.post("/v1/jobs", json=spec)
        assert r.status_code in (409, 422), r.text
        assert message in r.text
        assert c.get("/v1/models/lx-never").status_code == 404


def test_an_extraction_that_keeps_no_module_fails_and_registers_nothing(server, lora_models):
    spec = {"kind": "extract_lora", "model": "lx-a", "base": "lx-base", "sv_epsilon": 1e6, "name": "lx-empty"}
    with server.client() as c:
        r = c.post("/v1/jobs", json=spec)
        assert r.status_code == 202, r.text
        final = server.wait_job(r.json()["id"])
        assert final["status"] == "failed" and "no linear layer differs" in final["error"]
        assert c.get("/v1/models/lx-empty").status_code == 404
    assert not (server.home / "models" / "lx-empty").exists()
