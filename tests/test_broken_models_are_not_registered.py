"""An import registers only a model Strata can load and serve: weights that fit the config (every tensor
it implies, with its shape, nothing else), num_hidden_layers, a loadable architecture, and a tokenizer that
loads, encodes and decodes. Every output id a job derives passes the model-id check before it is queued."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.local_api import local_api
from tests.tiny_models import make_tiny_chat_llama


@pytest.fixture
def client(tmp_path, isolated_redis_url):
    with local_api(tmp_path, isolated_redis_url) as c:
        yield c


def edit_weights(path, edit) -> None:
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def edit_config(path, edit) -> None:
    config = json.loads((path / "config.json").read_text())
    edit(config)
    (path / "config.json").write_text(json.dumps(config))


BREAKAGES = {
    "one tensor named foo": (
        lambda p: save_file({"foo": torch.zeros(4)}, p / "model.safetensors"),
        "lack",
    ),
    "a missing layer": (
        lambda p: edit_weights(p, lambda t: t.pop("model.layers.3.mlp.down_proj.weight")),
        "'model.layers.3.mlp.down_proj.weight'",
    ),
    "an unexpected tensor": (
        lambda p: edit_weights(p, lambda t: t.update(extra=torch.zeros(2))),
        "'extra'",
    ),
    "a wrong shape": (
        lambda p: edit_weights(p, lambda t: t.update({"model.norm.weight": torch.ones(32)})),
        "'model.norm.weight' has shape [32]",
    ),
    "no num_hidden_layers": (
        lambda p: edit_config(p, lambda c: c.pop("num_hidden_layers")),
        "num_hidden_layers",
    ),
    "an unknown architecture": (
        lambda p: edit_config(p, lambda c: c.update(model_type="not-a-model")),
        "not a causal LM",
    ),
    "an architecture without a decoder stack": (
        lambda p: edit_config(p, lambda c: c.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])),
        "gpt2",
    ),
    "a tokenizer that does not load": (
        lambda p: (p / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "Nope"}}'),
        "tokenizer",
    ),
}


@pytest.mark.parametrize("breakage", list(BREAKAGES))
def test_an_import_of_a_model_strata_cannot_load_is_refused(client, tmp_path, breakage):
    path = tmp_path / "roots" / "broken"
    make_tiny_chat_llama(path)
    breakage_fn, needle = BREAKAGES[breakage]
    breakage_fn(path)
    r = client.post("/v1/models/import", json={"id": "broken", "path": str(path)})
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert needle in detail and "\n" not in detail and len(detail) < 500, detail
    assert client.get("/v1/models").json()["data"] == []
    assert not (tmp_path / "home" / "models" / "broken").exists()


def test_a_sound_model_with_tied_embeddings_imports(client, tmp_path):
    path = tmp_path / "roots" / "tied"
    make_tiny_chat_llama(path, tie_word_embeddings=True)
    assert client.post("/v1/models/import", json={"id": "tied", "path": str(path)}).status_code == 201


@pytest.mark.parametrize(
    "body",
    [
        {"kind": "variants", "base": "DIR"},
        {"kind": "truncate", "model": "DIR", "num_layers": 2},
        {"kind": "sparsify", "model": "DIR", "base": "DIR"},
        {"kind": "grow", "model": "DIR", "insert_after": [0]},
    ],
)
def test_output_ids_derived_from_a_directory_name_are_checked_before_queueing(client, tmp_path, body):
    path = tmp_path / "roots" / "a model with spaces"
    make_tiny_chat_llama(path)
    body = {k: (str(path) if v == "DIR" else v) for k, v in body.items()}
    r = client.post("/v1/jobs", json=body)
    assert r.status_code == 422, r.text
    assert "not a valid model id" in r.json()["detail"]
    long = tmp_path / "roots" / ("x" * 125)  # valid as an id itself; too long once a suffix is added
    make_tiny_chat_llama(long)
    r = client.post("/v1/jobs", json={k: (str(long) if v == str(path) else v) for k, v in body.items()})
    assert r.status_code == 422 and "not a valid model id" in r.json()["detail"], r.text
