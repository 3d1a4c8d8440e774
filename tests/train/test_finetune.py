"""Fine-tuning, full and LoRA: learns, cuts long records and says how many, keeps a LoRA adapter."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaForCausalLM

from workers.train.data import DataError, encode_record
from workers.train.finetune import ADAPTER_DIR, FinetuneConfig, finetune, finetune_model, split_validation


def test_full_finetune_learns_and_reports_validation_loss(fresh_model, chat_tokenizer, records):
    config = FinetuneConfig(steps=10, lr=3e-3, batch_size=4, eval_every=5)
    model, report = finetune(fresh_model, chat_tokenizer, records, config, validation=records[:2])
    assert report.final_loss < report.first_loss
    assert sorted(report.val_losses) == [5, 10] and report.val_losses[10] < report.val_losses[5]
    assert report.truncated == 0 and report.examples == 8 and report.validation_examples == 2
    assert report.trained_tokens > 0


def test_records_longer_than_max_length_are_cut_and_counted(fresh_model, chat_tokenizer, records):
    long = {"prompt": "x" * 50, "response": "y" * 50}
    config = FinetuneConfig(steps=1, max_length=64, batch_size=2)
    _, report = finetune(fresh_model, chat_tokenizer, [*records, long, long], config)
    assert report.truncated == 2


def test_lora_trains_only_the_adapter_merges_it_and_keeps_it(tiny_dir, chat_tokenizer, records, tmp_path):
    base = LlamaForCausalLM.from_pretrained(tiny_dir)
    model = LlamaForCausalLM.from_pretrained(tiny_dir)
    config = FinetuneConfig(
        method="lora", steps=8, lr=1e-2, batch_size=4, lora_r=4, lora_targets=["q_proj", "v_proj"]
    )
    report = finetune_model(model, chat_tokenizer, tmp_path / "out", records, config)
    assert report.final_loss < report.first_loss
    adapter = json.loads((tmp_path / "out" / ADAPTER_DIR / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and set(adapter["target_modules"]) == {"q_proj", "v_proj"}
    merged = LlamaForCausalLM.from_pretrained(tmp_path / "out")
    assert not any("lora" in name for name in merged.state_dict())
    layer, old = merged.model.layers[0], base.model.layers[0]
    assert not torch.equal(layer.self_attn.q_proj.weight, old.self_attn.q_proj.weight)
    assert torch.equal(layer.self_attn.k_proj.weight, old.self_attn.k_proj.weight)  # not a target
    assert torch.equal(layer.mlp.up_proj.weight, old.mlp.up_proj.weight)
    assert json.loads((tmp_path / "out" / "finetune.json").read_text())["method"] == "lora"


def test_lora_targets_must_name_a_linear_layer(fresh_model, chat_tokenizer, records):
    with pytest.raises(ValueError, match="lora_targets"):
        finetune(fresh_model, chat_tokenizer, records, FinetuneConfig(method="lora", lora_targets=["nope"]))


def test_validation_fraction_holds_records_out_by_seed(records):
    train, held = split_validation(records, 0.25, seed=3)
    assert len(held) == 2 and len(train) == 6 and all(r not in train for r in held)
    assert split_validation(records, 0.25, seed=3) == (train, held)


def test_completion_and_text_records_are_accepted(chat_tokenizer):
    legacy = encode_record(chat_tokenizer, {"prompt": "a: ", "completion": "bc"})
    assert legacy.trained_tokens == 3  # b, c, EOS
    text = encode_record(chat_tokenizer, {"text": "hello"})
    assert text.labels == text.input_ids and text.trained_tokens == 7  # BOS + 5 + EOS
    with pytest.raises(DataError, match="'text'"):
        encode_record(chat_tokenizer, {"text": "  "})
