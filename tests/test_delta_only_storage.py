"""Variants kept in the store as their delta alone: the full weights go once the delta is stored (unless
kept), headers still answer shape checks, jobs read the model materialised as base + delta (what is
served), a `materialise` job writes it out as a full model, and the base cannot be deleted under them."""

from __future__ import annotations

import shutil

import pytest
import torch
from redis import Redis
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.tiny_models import make_tiny_chat_llama
from workers.generation.reference import greedy_reference
from workers.store.delta_only import describe_stored, drop_full_weights, full_model_dir
from workers.store.model_store import MATERIALISED, ModelStore
from workers.store.registry import BaseInUseError, ModelRecord, Registry
from workers.tensors.safetensors_io import SafetensorsError, TensorReader, has_weights, stored_delta_base
from workers.variants import make_variant
from workers.variants_delta import compress_variant, decoded_delta, read_parts


def _store_with_variant(tmp_path, rank: int | None = 2):
    store = tmp_path / "models"
    make_tiny_chat_llama(store / "base", seed=3)
    (store / "v").mkdir()
    make_variant(store / "base", store / "v", seed=5, scale=0.05, rank=rank)
    shutil.copy(store / "base" / "tokenizer.json", store / "v" / "tokenizer.json")
    compress_variant(store / "base", store / "v", store / "v", base_id="base", error_budget=0.01)
    return store


def test_dropping_the_full_weights_keeps_the_delta_and_the_base_layout(tmp_path):
    store = _store_with_variant(tmp_path)
    with TensorReader(store / "v") as full:
        layout = {n: (e.dtype, e.shape) for n, e in full.entries.items()}
    fields = describe_stored(store / "v", store / "base", keep_full_weights=False)
    assert fields["delta"]["full_weights"] is False
    assert not has_weights(store / "v") and stored_delta_base(store / "v") == "base"
    assert "model.safetensors" not in fields["files"] and "variant_delta.safetensors" in fields["files"]
    assert fields["size_bytes"] < 0.5 * sum(p.stat().st_size for p in (store / "base").glob("*.safetensors"))
    assert fields["num_parameters"] == sum(e.numel for e in TensorReader(store / "base").entries.values())
    reader = TensorReader(store / "v")  # headers: the base's, which are the variant's
    assert {n: (e.dtype, e.shape) for n, e in reader.entries.items()} == layout
    with pytest.raises(SafetensorsError, match="stored as a delta of 'base'"):
        reader.load("model.embed_tokens.weight")


def test_kept_full_weights_and_another_dtype_keep_the_weights(tmp_path):
    store = _store_with_variant(tmp_path)
    assert describe_stored(store / "v", store / "base", keep_full_weights=True)["delta"]["full_weights"]
    assert has_weights(store / "v")
    weights = load_file(store / "v" / "model.safetensors")
    save_file({n: t.to(torch.bfloat16) for n, t in weights.items()}, store / "v" / "model.safetensors")
    assert not drop_full_weights(store / "v", store / "base")  # its layout is not its base's
    assert has_weights(store / "v")


def test_a_materialised_copy_is_base_plus_the_stored_delta(tmp_path):
    store = _store_with_variant(tmp_path)
    drop_full_weights(store / "v", store / "base")
    copy = full_model_dir(store, "v")
    assert copy.parent.name == ".materialised" and full_model_dir(store, "v") == copy  # once per process
    assert not (copy / "variant_delta.json").exists() and (copy / "tokenizer.json").is_file()
    base, got, parts = (
        load_file(store / "base" / "model.safetensors"),
        load_file(copy / "model.safetensors"),
        read_parts(store / "v"),
    )
    for name, tensor in base.items():
        expected = tensor if name not in parts else tensor + decoded_delta(parts[name], tuple(tensor.shape))
        assert torch.equal(got[name], expected.to(tensor.dtype)), name
    assert full_model_dir(store, "base") == store / "base"
    shutil.rmtree(store / "base")
    with pytest.raises(SafetensorsError, match="which is missing"):
        TensorReader(store / "v")


def test_a_base_cannot_be_unregistered_while_a_variant_is_stored_as_its_delta(isolated_redis_url):
    registry = Registry(Redis.from_url(isolated_redis_url))
    common = {"architecture": "LlamaForCausalLM", "num_layers": 2, "num_parameters": 1, "dtype": "float32"}
    registry.add(ModelRecord(id="b", size_bytes=10, **common))
    registry.add(
        ModelRecord(id="kept", size_bytes=10, base_model="b", delta={"full_weights": True}, **common)
    )
    registry.add(ModelRecord(id="d", size_bytes=1, base_model="b", delta={"full_weights": False}, **common))
    assert registry.variants_of("b") == ["d"]
    with pytest.raises(BaseInUseError, match="'d'"):
        registry.remove("b")
    assert registry.exists("b")
    assert registry.remove("d") and registry.remove("b") and not registry.remove("b")


def _greedy(model_dir, prompt: str, depth: int, n: int) -> str:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        ids = greedy_reference(model, tokenizer.encode(prompt), depth, n)
    return tokenizer.decode(ids, skip_special_tokens=True)


def test_variants_are_stored_as_deltas_alone_and_served_read_materialised_and_guarded(server):
    path = server.home.parent / "dobase"
    make_tiny_chat_llama(path, seed=31)
    models = server.home / "models"
    with server.client() as c:
        assert c.post("/v1/models/import", json={"id": "dobase", "path": str(path)}).status_code == 201
        spec = {"kind": "variants", "base": "dobase", "count": 2, "scale": 0.05, "rank": 2, "prefix": "dov"}
        server.run_job(spec)
        kept = {**spec, "count": 1, "prefix": "dok", "keep_full_weights": True}
        server.run_job(kept)
        record = c.get("/v1/models/dov-1").json()["strata"]
        assert record["delta"]["full_weights"] is False and record["num_parameters"] > 0
        assert record["size_bytes"] < 0.2 * c.get("/v1/models/dobase").json()["strata"]["size_bytes"]
        names = [f["name"] for f in c.get("/v1/models/dov-1/files").json()["data"]]
        assert "model.safetensors" not in names and "variant_delta.safetensors" in names
        assert c.get("/v1/models/dok-1").json()["strata"]["delta"]["full_weights"] is True
        assert (models / "dok-1" / "model.safetensors").is_file()

        # served over the base; a job that reads tensors gets the materialised model
        prompt, body = "the cat", {"prompt": "the cat", "max_new_tokens": 8, "depth": 4}
        served = c.post("/v1/generate", json={**body, "model": "dov-1"})
        assert served.status_code == 200, served.text
        job = {"kind": "materialise", "model": "dov-1", "name": "dov-1-full"}
        assert server.run_job(job)["model"] == "dov-1-full"
        full = c.get("/v1/models/dov-1-full").json()["strata"]
        assert full["delta"] is None and full["parents"] == ["dov-1"]
        assert _greedy(models / "dov-1-full", prompt, 4, 8) == served.json()["text"]
        merge = {"merge_method": "linear", "dtype": "float32", "name": "do-mix", "delta_error_budget": None}
        merge["models"] = [{"model": m, "parameters": {"weight": 0.5}} for m in ("dov-1", "dov-2")]
        r = c.post("/v1/merges", json=merge)
        assert r.status_code in (200, 201, 202), r.text
        assert server.wait_job(r.json()["id"])["status"] == "finished"
        assert (
            c.post("/v1/jobs", json={"kind": "truncate", "model": "dov-2", "num_layers": 1}).status_code < 300
        )

        # exits fitted on a delta-only variant: stored beside its delta, profiled with them, served with them
        examples = [
            {"prompt": f"say {w}", "response": f" {w} {w} {w}."} for w in ("tea", "sun", "rain", "moon")
        ]
        fit = {"kind": "fit_exits", "model": "dov-2", "examples": examples, "seq_len": 16, "distill_steps": 2}
        assert server.run_job(fit)["exits"] == [1, 2, 3]
        assert (models / "dov-2" / "exit_adapters.safetensors").is_file()
        quality = c.get("/v1/models/dov-2").json()["strata"]["profile"]["quality"]
        assert quality["2"]["adapter_perplexity"] is not None
        shallow = c.post("/v1/generate", json={**body, "model": "dov-2", "depth": 2})
        assert shallow.status_code == 200 and shallow.json()["strata"]["exit_adapter"] is True

        # what cannot be done says so
        r = c.post("/v1/jobs", json={"kind": "materialise", "model": "dok-1"})
        assert r.status_code == 422 and "full weights" in r.json()["detail"]
        r = c.post("/v1/models/import", json={"id": "do-x", "path": str(path), "base": "dov-1"})
        assert r.status_code == 422 and "itself stored as a delta" in r.json()["detail"]
        forged = server.home.parent / "do-forged"  # a delta of Strata's own naming is never taken in
        shutil.copytree(path, forged)
        shutil.copy(models / "dov-2" / "variant_delta.json", forged / "variant_delta.json")
        assert c.post("/v1/models/import", json={"id": "do-forged", "path": str(forged)}).status_code == 201
        assert not (models / "do-forged" / "variant_delta.json").exists()
        r = c.delete("/v1/models/dobase")
        assert r.status_code == 409 and "dov-" in r.json()["detail"]
        assert c.get("/v1/models/dobase").status_code == 200 and (models / "dobase").is_dir()
        for model_id in ("dov-1", "dov-2"):
            assert c.delete(f"/v1/models/{model_id}").status_code == 200
        assert c.delete("/v1/models/dobase").status_code == 200  # dok-1 keeps its own weights
        assert c.post("/v1/generate", json={**body, "model": "dok-1"}).status_code == 200


def test_a_copy_follows_the_variants_side_files(tmp_path):
    store = _store_with_variant(tmp_path)
    drop_full_weights(store / "v", store / "base")
    copy = full_model_dir(store, "v")
    (store / "v" / "exit_adapters.safetensors").write_bytes(b"fitted since")  # e.g. by fit_exits
    assert (
        full_model_dir(store, "v") == copy
        and (copy / "exit_adapters.safetensors").read_bytes() == b"fitted since"
    )
    (store / "v" / "exit_adapters.safetensors").unlink()
    assert full_model_dir(store, "v") == copy and not (copy / "exit_adapters.safetensors").exists()
    assert (copy / "model.safetensors").is_file()


def test_copies_of_dead_processes_go_whatever_dots_the_host_name_holds(tmp_path, monkeypatch):
    monkeypatch.setattr("socket.gethostname", lambda: "node.example.com")
    store = ModelStore(tmp_path / "models")
    mine = store.scratch("v.1", MATERIALISED)
    dead = tmp_path / "models" / MATERIALISED / "v.1.node.example.com.999999999.ab12cd34"
    other_host = tmp_path / "models" / MATERIALISED / "v.1.elsewhere.999999999.ab12cd34"
    dead.mkdir()
    other_host.mkdir()
    assert store.clean_stale_staging() == [dead.name]
    assert mine.is_dir() and other_host.is_dir() and not dead.exists()
