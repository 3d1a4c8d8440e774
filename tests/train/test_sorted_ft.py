"""Sorted Fine-Tuning: the loss, default exits, training progress and determinism."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from transformers import AutoModelForCausalLM

from workers.early_exit.forward import exit_logits
from workers.train.data import collate, encode_records
from workers.train.sorted_ft import (
    REPORT_FILE,
    SortConfig,
    default_exits,
    exit_losses,
    sort_model,
    sorted_loss,
    train_sorted,
)

EXITS = [2, 3, 4]


def test_default_exits():
    assert default_exits(40, start_fraction=0.3) == list(range(12, 41, 4))  # the paper's 13B grid
    assert default_exits(30) == [12, 15, 18, 21, 24, 27, 30]
    assert default_exits(4) == [2, 3, 4]
    assert default_exits(30, count=4) == [12, 18, 24, 30]


def test_config_validation():
    with pytest.raises(ValidationError):
        SortConfig(steps=3, epochs=1)
    with pytest.raises(ValidationError):
        SortConfig(exits=[])
    with pytest.raises(ValueError, match="deeper"):
        SortConfig(exits=[2, 9]).resolved_exits(4)
    assert SortConfig(batch_size=3).total_steps(8) == 3
    assert SortConfig(epochs=2, batch_size=3).total_steps(8) == 6


def test_loss_is_the_mean_of_per_exit_cross_entropies(fresh_model, chat_tokenizer, records):
    batch = collate(encode_records(chat_tokenizer, records[:3]))
    with torch.no_grad():
        loss, per_exit = sorted_loss(fresh_model, batch.input_ids, batch.labels, EXITS, batch.attention_mask)
        by_hand = {}
        for depth in EXITS:
            total, count = 0.0, 0
            for row in range(batch.input_ids.shape[0]):
                n = int(batch.attention_mask[row].sum())
                logits = exit_logits(fresh_model, batch.input_ids[row : row + 1, :n], depth)[0, :-1]
                targets = batch.labels[row, 1:n]
                keep = targets != -100
                total += F.cross_entropy(logits[keep], targets[keep], reduction="sum").item()
                count += int(keep.sum())
            by_hand[depth] = total / count
    assert set(per_exit) == set(EXITS)
    for depth in EXITS:
        assert per_exit[depth].item() == pytest.approx(by_hand[depth], rel=1e-5)
    assert loss.item() == pytest.approx(sum(by_hand.values()) / len(EXITS), rel=1e-5)


def test_only_response_positions_count(fresh_model, chat_tokenizer, records):
    batch = collate(encode_records(chat_tokenizer, records[:2]))
    everything = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    nothing = torch.full_like(batch.labels, -100)
    with torch.no_grad():
        response = exit_losses(fresh_model, batch.input_ids, batch.labels, [4], batch.attention_mask)[4]
        all_tokens = exit_losses(fresh_model, batch.input_ids, everything, [4], batch.attention_mask)[4]
        with pytest.raises(ValueError, match="no response tokens"):
            exit_losses(fresh_model, batch.input_ids, nothing, [4], batch.attention_mask)
    assert response.item() != pytest.approx(all_tokens.item(), rel=1e-3)


def per_exit_loss(model, tokenizer, records) -> dict[int, float]:
    batch = collate(encode_records(tokenizer, records))
    with torch.no_grad():
        losses = exit_losses(model, batch.input_ids, batch.labels, EXITS, batch.attention_mask)
    return {depth: value.item() for depth, value in losses.items()}


def test_a_few_steps_reduce_the_loss_at_every_exit(fresh_model, chat_tokenizer, records):
    before = per_exit_loss(fresh_model, chat_tokenizer, records)
    seen = []
    config = SortConfig(steps=12, lr=3e-3, batch_size=4, warmup_steps=2, seed=0)
    report = train_sorted(
        fresh_model, chat_tokenizer, records, config, progress=lambda *args: seen.append(args), device="cpu"
    )
    after = per_exit_loss(fresh_model, chat_tokenizer, records)
    assert all(after[depth] < before[depth] - 0.3 for depth in EXITS), (before, after)
    assert report.exits == EXITS and report.steps == 12 and len(report.loss_curve) == 12
    assert [step for step, _, _ in seen] == list(range(1, 13)) and {total for _, total, _ in seen} == {12}
    assert set(seen[-1][2]) == set(EXITS)
    assert report.final_losses[4] < report.first_losses[4]
    assert not fresh_model.training


def test_same_seed_same_result(tiny_dir, chat_tokenizer, records):
    def run(seed):
        model = AutoModelForCausalLM.from_pretrained(tiny_dir)
        config = SortConfig(steps=3, lr=1e-3, batch_size=3, seed=seed)
        report = train_sorted(model, chat_tokenizer, records, config, device="cpu")
        return report.loss_curve, model.state_dict()

    curve_a, weights_a = run(1)
    curve_b, weights_b = run(1)
    curve_c, _ = run(2)
    assert curve_a == curve_b
    assert all(torch.equal(weights_a[name], weights_b[name]) for name in weights_a)
    assert curve_a != curve_c


def test_sort_model_saves_a_loadable_model_and_report(tiny_dir, chat_tokenizer, records, tmp_path):
    source = tmp_path / "source"
    AutoModelForCausalLM.from_pretrained(tiny_dir).save_pretrained(source)
    chat_tokenizer.save_pretrained(source)
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "sorted"
    config = SortConfig(steps=2, lr=1e-3, batch_size=4, gradient_checkpointing=True, bf16_on_cpu=True)
    report = sort_model(source, out, data, config, device="cpu")
    assert json.loads((out / REPORT_FILE).read_text())["steps"] == report.steps == 2
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.config.num_hidden_layers == 4


def test_distill_targets_are_the_source_full_depth_distribution(fresh_model, chat_tokenizer, records):
    batch = collate(encode_records(chat_tokenizer, records[:3]))
    teacher = copy.deepcopy(fresh_model).eval()
    with torch.no_grad():
        losses = exit_losses(fresh_model, batch.input_ids, batch.labels, EXITS, batch.attention_mask, teacher)
        keep = batch.labels[:, 1:] != -100
        full = exit_logits(fresh_model, batch.input_ids, 4, batch.attention_mask)[:, :-1][keep].float()
        entropy = -(F.softmax(full, -1) * F.log_softmax(full, -1)).sum(-1).mean()
        shallow = exit_logits(fresh_model, batch.input_ids, 2, batch.attention_mask)[:, :-1][keep].float()
        cross = -(F.softmax(full, -1) * F.log_softmax(shallow, -1)).sum(-1).mean()
    assert losses[4].item() == pytest.approx(entropy.item(), rel=1e-5)  # CE(q, q) = H(q): the minimum
    assert losses[2].item() == pytest.approx(cross.item(), rel=1e-5)


def test_distill_with_frozen_embeddings_trains_exits_keeps_head(fresh_model, chat_tokenizer, records):
    head = fresh_model.get_output_embeddings().weight.detach().clone()
    config = SortConfig(steps=6, lr=3e-3, batch_size=4, distill=True, freeze_embeddings=True)
    report = train_sorted(fresh_model, chat_tokenizer, records, config, device="cpu")
    assert report.final_losses[2] < report.first_losses[2]
    assert torch.equal(fresh_model.get_output_embeddings().weight, head)
    assert all(param.requires_grad for param in fresh_model.parameters())


def adapted_loss(model, tokenizer, records, adapters) -> dict[int, float]:
    batch = collate(encode_records(tokenizer, records))
    with torch.no_grad():
        losses = exit_losses(
            model, batch.input_ids, batch.labels, EXITS, batch.attention_mask, adapters=adapters
        )
    return {depth: value.item() for depth, value in losses.items()}


def test_exit_adapters_train_jointly_below_full_depth(fresh_model, chat_tokenizer, records):
    config = SortConfig(steps=8, lr=3e-3, batch_size=4, exit_adapters=True, adapter_lr=3e-3)
    report = train_sorted(fresh_model, chat_tokenizer, records, config, device="cpu")
    adapters = report.adapters
    assert adapters is not None and adapters.depths == [2, 3]  # every trained exit but full depth
    assert "adapters" not in report.model_dump()
    with_adapters = adapted_loss(fresh_model, chat_tokenizer, records, adapters)
    without = per_exit_loss(fresh_model, chat_tokenizer, records)
    assert with_adapters[4] == pytest.approx(without[4])  # full depth is never adapted
    assert with_adapters[2] < without[2] and with_adapters[3] < without[3], (with_adapters, without)
    assert not any(a.weight.requires_grad for a in adapters.maps.values())
    assert all(a.scale != 1.0 for a in adapters.maps.values())  # fitted to the trained model afterwards


def test_ridge_initialised_adapters_start_the_exits_closer_to_full_depth(tiny_dir, chat_tokenizer, records):
    def first_losses(init: str) -> dict[int, float]:  # distill: CE against the full-depth distribution
        model = AutoModelForCausalLM.from_pretrained(tiny_dir)
        config = SortConfig(
            steps=1, lr=1e-9, batch_size=8, distill=True, exit_adapters=True, adapter_init=init
        )
        return train_sorted(model, chat_tokenizer, records, config, device="cpu").first_losses

    ridge, identity = first_losses("ridge"), first_losses("identity")
    assert ridge[2] < identity[2] and ridge[3] < identity[3], (ridge, identity)
    assert ridge[4] == pytest.approx(identity[4])
