"""The shared trainer: schedule, accumulation, validation, progress, checkpoints, cancellation, seeds."""

from __future__ import annotations

import math

import pytest
import torch

from workers.train.data import encode_records, prepare_rows
from workers.train.trainer import (
    StepInfo,
    TrainConfig,
    TrainingCancelled,
    causal_lm_loss,
    lr_factor,
    train,
)


@pytest.fixture
def rows(chat_tokenizer, records):
    return prepare_rows(encode_records(chat_tokenizer, records), 128, packing=False)


def test_lr_warms_up_linearly_then_decays_to_zero():
    assert [lr_factor(s, 2, 6) for s in range(6)] == [0.5, 1.0, 1.0, 0.75, 0.5, 0.25]
    assert lr_factor(6, 2, 6) == 0.0
    assert lr_factor(2, 2, 6, "cosine") == 1.0 and math.isclose(lr_factor(4, 2, 6, "cosine"), 0.5)
    assert lr_factor(5, 2, 6, "constant") == 1.0


def test_steps_from_epochs_count_accumulated_batches():
    assert TrainConfig(epochs=2, batch_size=2, grad_accum=2).total_steps(8) == 4
    assert TrainConfig(steps=3).total_steps(8) == 3
    with pytest.raises(ValueError):
        TrainConfig(steps=3, epochs=1)


def test_training_lowers_the_loss_and_reports_every_step(fresh_model, rows):
    seen: list[StepInfo] = []
    config = TrainConfig(steps=12, lr=3e-3, batch_size=4, eval_every=4)
    result = train(fresh_model, rows, causal_lm_loss, config, val_rows=rows[:2], progress=seen.append)
    assert [s.step for s in seen] == list(range(1, 13))
    assert result.final_loss < 0.8 * result.first_loss
    assert sorted(result.val_losses) == [4, 8, 12]
    assert result.val_losses[12] < result.val_losses[4]
    assert seen[-1].trained_tokens == result.trained_tokens > 0
    assert seen[0].lr == pytest.approx(3e-3)  # no warm-up
    assert not fresh_model.training


def test_the_same_seed_gives_the_same_weights(tiny_dir, rows):
    from transformers import LlamaForCausalLM

    weights = []
    for _ in range(2):
        model = LlamaForCausalLM.from_pretrained(tiny_dir)
        train(model, rows, causal_lm_loss, TrainConfig(steps=3, lr=1e-3, batch_size=3, seed=7))
        weights.append(model.model.layers[0].mlp.down_proj.weight.detach().clone())
    assert torch.equal(weights[0], weights[1])


def test_gradient_accumulation_matches_one_big_batch(tiny_dir, rows):
    """Two micro-batches of 4 with accumulation = one batch of 8, when every row has as many labels."""
    from transformers import LlamaForCausalLM

    from workers.train.data import EncodedExample

    even = [EncodedExample(r.input_ids[:20], r.labels[:10] + r.input_ids[10:20]) for r in rows]
    out = []
    for batch_size, accum in ((8, 1), (4, 2)):
        model = LlamaForCausalLM.from_pretrained(tiny_dir)
        config = TrainConfig(steps=1, lr=1e-3, batch_size=batch_size, grad_accum=accum, max_grad_norm=None)
        train(model, even, causal_lm_loss, config)
        out.append(model.model.layers[0].self_attn.q_proj.weight.detach().clone())
    assert torch.allclose(out[0], out[1], atol=1e-6)


def test_checkpoints_are_called_every_n_steps(fresh_model, rows):
    calls: list[int] = []
    train(
        fresh_model, rows, causal_lm_loss, TrainConfig(steps=5, checkpoint_every=2), checkpoint=calls.append
    )
    assert calls == [2, 4]


def test_should_stop_cancels_before_the_next_step(fresh_model, rows):
    seen: list[StepInfo] = []
    with pytest.raises(TrainingCancelled, match="step 2/6"):
        train(
            fresh_model,
            rows,
            causal_lm_loss,
            TrainConfig(steps=6),
            progress=seen.append,
            should_stop=lambda: len(seen) >= 2,
        )
    assert len(seen) == 2 and not fresh_model.training


def test_any_loss_function_can_be_trained(fresh_model, rows):
    """The loop knows nothing of the loss: here, pull the final norm's weight towards zero."""

    def loss_fn(model, batch):
        return model.model.norm.weight.pow(2).mean()

    before = float(loss_fn(fresh_model, None).detach())
    train(fresh_model, rows, loss_fn, TrainConfig(steps=5, lr=1e-2, batch_size=2))
    assert float(loss_fn(fresh_model, None).detach()) < before
