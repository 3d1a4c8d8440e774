"""The shared training loop: data batches, AdamW, warm-up and decay, gradient accumulation, validation,
progress, checkpoints and cancellation, written once. Each feature (fine-tuning, distillation, healing,
mask learning, SoFT) supplies only its loss: `loss_fn(model, batch) -> scalar tensor`.

One optimiser step averages the losses of `grad_accum` micro-batches of `batch_size` rows each:

    theta <- AdamW(theta, grad (1/A) sum_{a=1..A} loss(batch_a)),   lr_t = lr * s(t),

where s(t) = (t + 1) / W during the W warm-up steps, then decays from 1 to 0 at the last step (linear or
cosine) or stays 1 (constant).

A feature may also bring its own batch `stream` (healing cycles fixed windows; dynamic batch loading samples
domains by weights it updates as it goes) and `extra_groups` of parameters outside the model with their own
learning rates (mask learning: the gate logits descend, the Lagrange multipliers ascend, `maximize=True`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from workers.device import default_device, describe_device
from workers.train.data import IGNORE_INDEX, Batch, EncodedExample, batches, collate

LossFn = Callable[[nn.Module, Batch], torch.Tensor]


class TrainingCancelled(RuntimeError):
    """`should_stop` said so; the model is left as it was at the last completed step."""


class TrainConfig(BaseModel):
    """How long and how fast to train. Give `steps` or `epochs` (default: one epoch)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    steps: int | None = Field(default=None, ge=1)
    epochs: float | None = Field(default=None, gt=0)
    lr: float = Field(default=1e-4, gt=0)
    warmup_steps: int = Field(default=0, ge=0)
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    batch_size: int = Field(default=8, ge=1, description="rows per micro-batch")
    grad_accum: int = Field(default=1, ge=1, description="micro-batches per optimiser step")
    weight_decay: float = Field(default=0.0, ge=0)
    max_grad_norm: float | None = Field(default=1.0, gt=0)
    betas: tuple[float, float] = (0.9, 0.999)
    seed: int = Field(default=0, ge=0)
    eval_every: int | None = Field(
        default=None, ge=1, description="validation loss every N steps (always after the last)"
    )
    checkpoint_every: int | None = Field(default=None, ge=1, description="call `checkpoint` every N steps")

    @model_validator(mode="after")
    def _one_length(self) -> TrainConfig:
        if self.steps is not None and self.epochs is not None:
            raise ValueError("give steps or epochs, not both")
        return self

    def total_steps(self, rows: int) -> int:
        """Optimiser steps: `steps`, or epochs x ceil(rows / (batch_size x grad_accum))."""
        if self.steps is not None:
            return self.steps
        per_epoch = math.ceil(rows / (self.batch_size * self.grad_accum))
        return max(1, math.ceil((self.epochs if self.epochs is not None else 1.0) * per_epoch))


def lr_factor(step: int, warmup: int, total: int, schedule: str = "linear") -> float:
    """s(step): linear warm-up over `warmup` steps, then linear or cosine decay to 0 at `total` (or 1)."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    done = (step - warmup) / max(1, total - warmup)
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(1.0, done)))
    return max(0.0, 1.0 - done)


def causal_lm_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Token-mean next-token cross-entropy over the positions whose label is not -100."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    targets = batch.labels[:, 1:]
    keep = targets != IGNORE_INDEX
    if not bool(keep.any()):
        raise ValueError("the batch has no labelled tokens")
    return F.cross_entropy(logits[:, :-1][keep].float(), targets[keep])


@dataclass
class StepInfo:
    """What the progress callback sees after each optimiser step."""

    step: int
    total: int
    loss: float
    lr: float
    trained_tokens: int
    val_loss: float | None = None


@dataclass
class TrainResult:
    steps: int
    rows: int
    trained_tokens: int = 0
    loss_curve: list[float] = field(default_factory=list)
    val_losses: dict[int, float] = field(default_factory=dict)
    seconds: float = 0.0
    device: str = "cpu"

    @property
    def first_loss(self) -> float:
        return self.loss_curve[0]

    @property
    def final_loss(self) -> float:
        """Mean over the last max(1, steps // 10) steps."""
        tail = self.loss_curve[-max(1, len(self.loss_curve) // 10) :]
        return sum(tail) / len(tail)


def _optimizer(
    params: Iterable[tuple[str, nn.Parameter]], config: TrainConfig, extra_groups: Sequence[dict] = ()
) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, param in params:
        if param.requires_grad:
            (no_decay if param.ndim < 2 or "norm" in name else decay).append(param)
    if not decay and not no_decay and not any(group["params"] for group in extra_groups):
        raise ValueError("nothing to train: no parameter requires a gradient")
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
        *({"weight_decay": 0.0, **group} for group in extra_groups),
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr, betas=config.betas)


@torch.no_grad()
def evaluate(
    model: nn.Module, rows: Sequence[EncodedExample], loss_fn: LossFn, batch_size: int, pad_id: int, device
) -> float:
    """Mean loss over `rows` (each batch weighted by its labelled tokens), in eval mode."""
    was_training = model.training
    model.eval()
    total, weight = 0.0, 0
    try:
        for start in range(0, len(rows), batch_size):
            batch = collate(rows[start : start + batch_size], pad_id).to(device)
            tokens = int((batch.labels[:, 1:] != IGNORE_INDEX).sum())
            if tokens:
                total += float(loss_fn(model, batch)) * tokens
                weight += tokens
    finally:
        model.train(was_training)
    return total / max(1, weight)


def train(
    model: nn.Module,
    rows: Sequence[EncodedExample],
    loss_fn: LossFn = causal_lm_loss,
    config: TrainConfig | None = None,
    *,
    val_rows: Sequence[EncodedExample] = (),
    pad_id: int = 0,
    progress: Callable[[StepInfo], None] | None = None,
    checkpoint: Callable[[int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    device: str | torch.device | None = None,
    stream: Iterator[Batch] | None = None,
    extra_groups: Sequence[dict] = (),
) -> TrainResult:
    """Train the parameters of `model` that require gradients, in place; the model ends in eval mode.

    `should_stop()` is asked before every optimiser step: True raises TrainingCancelled.
    `stream`: the batches to train on (default: `rows` in seeded shuffled epochs); `rows` then only sizes
    an epoch. `extra_groups`: AdamW parameter groups (dicts with "params" and e.g. "lr", "maximize") trained
    beside the model's parameters, under the same schedule.
    """
    config = config or TrainConfig()
    if not rows and stream is None:
        raise ValueError("no training rows")
    device = torch.device(device) if device is not None else default_device()
    total = config.total_steps(max(1, len(rows)))
    torch.manual_seed(config.seed)
    model.to(device).train()
    optimizer = _optimizer(model.named_parameters(), config, extra_groups)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, config.warmup_steps, total, config.schedule)
    )
    stream = stream if stream is not None else batches(rows, config.batch_size, config.seed, pad_id)
    trainable = [p for p in model.parameters() if p.requires_grad]
    result = TrainResult(steps=total, rows=len(rows), device=describe_device(device))
    start = time.perf_counter()
    try:
        for step in range(total):
            if should_stop is not None and should_stop():
                raise TrainingCancelled(f"cancelled at step {step}/{total}")
            optimizer.zero_grad(set_to_none=True)
            step_loss = 0.0
            for _ in range(config.grad_accum):
                batch = next(stream).to(device)
                loss = loss_fn(model, batch)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"the loss became {float(loss)} at step {step + 1}; lower lr")
                (loss / config.grad_accum).backward()
                step_loss += float(loss.detach()) / config.grad_accum
                result.trained_tokens += int((batch.labels[:, 1:] != IGNORE_INDEX).sum())
            if config.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            schedule.step()
            result.loss_curve.append(step_loss)
            done = step + 1
            val = None
            if val_rows and (done == total or (config.eval_every and done % config.eval_every == 0)):
                val = evaluate(model, val_rows, loss_fn, config.batch_size, pad_id, device)
                result.val_losses[done] = val
            if progress is not None:
                progress(StepInfo(done, total, step_loss, lr, result.trained_tokens, val))
            if checkpoint is not None and config.checkpoint_every and done % config.checkpoint_every == 0:
                checkpoint(done)
    finally:
        model.eval()
        optimizer.zero_grad(set_to_none=True)
        result.seconds = time.perf_counter() - start
    return result
