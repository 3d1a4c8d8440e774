"""Tokenizer sources over HTTP: a merge of models with different vocabularies runs with a tokenizer_source
and is refused (422, nothing registered) without one."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from tests.test_merge_tokenizers import IM_TOKENS, OTHER_TEMPLATE, make_expert
from tests.tiny_models import CHAT_TEMPLATE, make_tiny_chat_llama

YAML = """
merge_method: task_arithmetic
base_model: tok-base
models:
  - model: tok-a
    parameters: {weight: 0.5}
dtype: float32
"""


@pytest.fixture(scope="module")
def vocab_family(server):
    root = server.home.parent / "tok-family"
    make_tiny_chat_llama(root / "base", seed=0)
    make_expert(root / "base", root / "a", seed=1, added=IM_TOKENS, special=True, template=OTHER_TEMPLATE)
    with server.client() as c:
        for name in ("base", "a"):
            r = c.post("/v1/models/import", json={"id": f"tok-{name}", "path": str(root / name)})
            assert r.status_code == 201, r.text
    return root


def post(server, text: str):
    with server.client() as c:
        return c.post("/v1/merges", content=text, headers={"Content-Type": "application/yaml"})


def test_merge_with_a_models_tokenizer_registers_its_larger_vocabulary(server, vocab_family):
    r = post(server, YAML + "tokenizer_source: model:tok-a\nchat_template: auto\nname: tok-merged\n")
    assert r.status_code == 202, r.text
    final = server.wait_job(r.json()["id"])
    assert final["status"] == "finished", final["error"]
    stored = server.home / "models" / "tok-merged"
    assert json.loads((stored / "config.json").read_text())["vocab_size"] == 130
    tokenizer = AutoTokenizer.from_pretrained(stored)
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") == 129
    assert tokenizer.chat_template == CHAT_TEMPLATE  # auto: one each, so the first seen (the base's) wins


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("", "set tokenizer_source"),
        ("tokenizer_source: model:tok-nowhere\n", "not one of the input models"),
        ("chat_template: vicuna\n", "chat_template"),
    ],
)
def test_bad_tokenizer_recipes_get_422_and_register_nothing(server, vocab_family, extra, message):
    r = post(server, YAML + extra + "name: tok-bad\n")
    assert r.status_code == 422, r.text
    assert message in r.text
    with server.client() as c:
        assert c.get("/v1/models/tok-bad").status_code == 404
