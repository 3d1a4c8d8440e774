"""Side files of a model directory (exit adapters, a LoRA adapter) are never read as its weights: after
fit_exits a model still merges with its own variants, and extract_lora and sparsify still work on it."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from tests.tiny_models import make_tiny_chat_llama, make_tiny_llama
from workers.early_exit.adapters import FILENAME
from workers.tensors.safetensors_io import SafetensorsError, TensorReader

EXAMPLES = [{"prompt": f"say {w}", "response": f" {w} {w} {w}."} for w in ("tea", "sun", "rain", "moon")]


def test_after_fit_exits_a_model_merges_with_its_variants_and_extracts_and_sparsifies(server):
    path = server.home.parent / "sidecar"
    make_tiny_chat_llama(path, seed=7)
    with server.client() as c:
        assert c.post("/v1/models/import", json={"id": "sidecar", "path": str(path)}).status_code == 201
    server.run_job({"kind": "variants", "base": "sidecar", "count": 1, "prefix": "sidecar-v"})
    server.run_job({"kind": "fit_exits", "model": "sidecar", "examples": EXAMPLES, "seq_len": 16})
    assert (server.home / "models" / "sidecar" / FILENAME).is_file()
    merge = {
        "kind": "merge",
        "merge_method": "linear",
        "name": "sidecar-merged",
        "models": [
            {"model": "sidecar", "parameters": {"weight": 0.5}},
            {"model": "sidecar-v-1", "parameters": {"weight": 0.5}},
        ],
    }
    server.run_job(merge)
    lora = server.run_job({"kind": "extract_lora", "model": "sidecar-v-1", "base": "sidecar", "max_rank": 4})
    assert lora["modules"]
    sparse = {"kind": "sparsify", "model": "sidecar", "base": "sidecar-v-1", "evaluate": False}
    server.run_job({**sparse, "name": "sidecar-sparse"})
    with server.client() as c:
        record = c.get("/v1/models/sidecar").json()["strata"]
        merged = c.get("/v1/models/sidecar-merged").json()["strata"]
    assert merged["num_parameters"] == record["num_parameters"]  # exit adapters not counted as weights


def test_only_standard_weight_names_are_weights(tmp_path):
    make_tiny_llama(tmp_path / "m")
    save_file({"exit.1.weight": torch.eye(4)}, tmp_path / "m" / FILENAME)
    save_file({"stray": torch.zeros(2)}, tmp_path / "m" / "notes.safetensors")
    assert not any(n.startswith("exit.") or n == "stray" for n in TensorReader(tmp_path / "m").names)
    (tmp_path / "m" / "model.safetensors").unlink()
    with pytest.raises(SafetensorsError, match="no model weights"):
        TensorReader(tmp_path / "m")
