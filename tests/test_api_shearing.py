"""prune mode learned (LLM-Shearing masks) and healing with dynamic batch loading, through the HTTP API."""

from __future__ import annotations

import shutil

import pytest
from transformers import AutoModelForCausalLM

from tests.tiny_models import make_tiny_chat_llama, make_tiny_qwen2


@pytest.fixture(scope="module")
def shear_models(server):
    root = server.home.parent / "shear"
    make_tiny_chat_llama(root / "source", seed=31)
    make_tiny_chat_llama(
        root / "small",
        seed=32,
        num_hidden_layers=2,
        hidden_size=32,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=64,
    )
    qwen = make_tiny_qwen2(seed=33, num_hidden_layers=2)
    qwen.save_pretrained(root / "qwen")
    for f in (root / "source").glob("tokenizer*"):
        shutil.copy(f, root / "qwen" / f.name)
    with server.client() as c:
        for name in ("source", "small", "qwen"):
            r = c.post("/v1/models/import", json={"id": f"shear-{name}", "path": str(root / name)})
            assert r.status_code == 201, r.text
    return root


def test_learned_masks_with_dbl_give_the_target_model_and_report_weights_and_gaps(server, shear_models):
    result = server.run_job(
        {
            "kind": "prune",
            "model": "shear-source",
            "name": "shear-learned",
            "mode": "learned",
            "target": {"target_model": "shear-small"},
            "masks": {"steps": 3, "mask_lr": 0.5, "multiplier_lr": 0.05, "temperature": 0.5},
            "seq_len": 24,
            "heal": {
                "steps": 4,
                "dynamic_batch_loading": True,
                "update_every": 2,
                "eta": 0.5,
                "heldout_windows": 1,
                "domains": ["prose", {"name": "chat", "weight": 2}],
            },
        },
        timeout=600,
    )
    want = {
        "num_hidden_layers": 2,
        "hidden_size": 32,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "intermediate_size": 64,
    }
    assert {k: result["config"][k] for k in want} == want
    assert result["masks"]["steps"] == 3 and set(result["masks"]["target"]) == {
        "layer",
        "kv",
        "intermediate",
        "hidden",
    }
    heal = result["heal"]
    assert heal["dynamic_batch_loading"] is True and [h["step"] for h in heal["domain_weights"]] == [0, 2, 4]
    assert heal["eta"] == 0.5
    assert heal["domain_weights"][0]["weights"] == pytest.approx({"prose": 1 / 3, "chat": 2 / 3}, abs=1e-5)
    assert set(heal["loss_gap"]) == {"prose", "chat"} and set(heal["domain_weights"][1]["loss_gap"]) == {
        "prose",
        "chat",
    }
    model = AutoModelForCausalLM.from_pretrained(server.home / "models" / "shear-learned")
    assert {k: getattr(model.config, k) for k in want} == want
    assert model.num_parameters() == result["config"]["params"]


BAD = [
    ({"target": {"hidden_size": 128}, "mode": "learned"}, "exceeds"),
    ({"target": {"target_model": "shear-qwen"}, "mode": "learned"}, "family"),
    ({"target": {"num_attention_heads": 3}, "mode": "learned"}, "divisible"),
    ({"target": {"hidden_size": 30}, "mode": "learned"}, "not a multiple of num_attention_heads"),
    ({"target": {"hidden_size": 32}}, "needs mode learned"),
    ({"target": {"num_hidden_layers": 2}, "mode": "learned", "heal": {"eta": 0}}, "greater than 0"),
    ({"target": {"num_hidden_layers": 2}, "mode": "learned", "heal": {"eta": 1000}}, "less than or equal"),
    (
        {"target": {"num_hidden_layers": 2}, "mode": "learned", "heal": {"domains": ["klingon"]}},
        "unknown domain",
    ),
    (
        {
            "target": {"num_hidden_layers": 2},
            "mode": "learned",
            "heal": {"domains": [{"name": "x", "path": "/etc/passwd"}]},
        },
        "outside the import roots",
    ),
]


@pytest.mark.parametrize(("change", "message"), BAD)
def test_bad_shearing_requests_get_422_and_register_nothing(server, shear_models, change, message):
    body = {"kind": "prune", "model": "shear-source", "name": "shear-bad", **change}
    with server.client() as c:
        r = c.post("/v1/jobs", json=body)
        assert r.status_code == 422 and message in r.text, r.text
        assert c.get("/v1/models/shear-bad").status_code == 404


def test_non_finite_domain_weights_get_422(server, shear_models):
    spec = (
        '{"kind": "prune", "model": "shear-source", "mode": "learned", "target": {"num_hidden_layers": 2}, '
        '"heal": {"domains": [{"name": "prose", "weight": %s}]}}'
    )
    with server.client() as c:
        for value in ("NaN", "Infinity", "1e400", "-1"):
            r = c.post("/v1/jobs", content=spec % value, headers={"Content-Type": "application/json"})
            assert r.status_code == 422, r.text
