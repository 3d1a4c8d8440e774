"""Truncation to an exit: a standalone model whose logits are the source's exit logits."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.tiny_models import make_tiny_qwen2
from workers.early_exit.forward import exit_logits
from workers.train.truncate import layer_of, truncate_model


def test_layer_of():
    assert layer_of("model.layers.12.mlp.up_proj.weight") == 12
    assert layer_of("model.norm.weight") is None and layer_of("lm_head.weight") is None


@pytest.mark.parametrize("n", [1, 3, 4])
def test_truncated_logits_equal_exit_logits(tiny_dir, chat_tokenizer, tmp_path, n):
    source = tmp_path / "source"
    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    model.save_pretrained(source)
    chat_tokenizer.save_pretrained(source)
    out = truncate_model(source, tmp_path / f"exit{n}", n)
    cut = AutoModelForCausalLM.from_pretrained(out).eval()  # plain transformers
    assert cut.config.num_hidden_layers == n and len(cut.model.layers) == n
    ids = torch.randint(4, 128, (2, 17), generator=torch.Generator().manual_seed(n))
    with torch.no_grad():
        torch.testing.assert_close(cut(input_ids=ids).logits, exit_logits(model, ids, n), rtol=0, atol=1e-5)
    assert AutoTokenizer.from_pretrained(out).encode("hello") == chat_tokenizer.encode("hello")


def test_tied_head_and_layer_types_are_kept(tmp_path):
    model = make_tiny_qwen2(seed=0, tie_word_embeddings=True)
    model.save_pretrained(tmp_path / "qwen")
    out = truncate_model(tmp_path / "qwen", tmp_path / "cut", 2)
    saved = json.loads((out / "config.json").read_text())
    assert saved["num_hidden_layers"] == 2 and saved["layer_types"] == ["full_attention"] * 2
    cut = AutoModelForCausalLM.from_pretrained(out).eval()
    assert cut.lm_head.weight.data_ptr() == cut.model.embed_tokens.weight.data_ptr()
    ids = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(cut(input_ids=ids).logits, exit_logits(model, ids, 2), rtol=0, atol=1e-5)


def test_bad_depth_is_rejected(tiny_dir, tmp_path):
    with pytest.raises(ValueError, match="between 1 and 4"):
        truncate_model(tiny_dir, tmp_path / "x", 5)
