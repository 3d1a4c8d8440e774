"""Supervised fine-tuning, full-parameter or LoRA (peft), on the shared trainer.

The loss is the token-mean next-token cross-entropy on the labelled tokens (workers.train.data: the
assistant turns of chat records, the response of prompt/response records, all of a text record). LoRA
trains W + (alpha / r) B A on the target linear layers with W frozen; the result is merged into the
weights (W <- W + (alpha / r) B A), and the adapter is kept in PEFT's format beside the merged model.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from workers.train.data import EncodedExample, encode_records, prepare_rows
from workers.train.trainer import LossFn, StepInfo, TrainConfig, TrainResult, causal_lm_loss, train

ADAPTER_DIR = "lora_adapter"  # the PEFT adapter of a LoRA run, beside the merged model
REPORT_FILE = "finetune.json"
DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class FinetuneConfig(BaseModel):
    """A fine-tuning run. Give `steps` or `epochs` (default: one epoch)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    method: Literal["full", "lora"] = "full"
    steps: int | None = Field(default=None, ge=1, le=1_000_000)
    epochs: float | None = Field(default=None, gt=0, le=1000)
    lr: float = Field(default=1e-4, gt=0, le=1)
    warmup_steps: int = Field(default=0, ge=0, le=1_000_000)
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    batch_size: int = Field(default=8, ge=1, le=1024)
    grad_accum: int = Field(default=1, ge=1, le=1024)
    max_length: int = Field(default=512, ge=8, le=32_768, description="tokens per record; longer are cut")
    weight_decay: float = Field(default=0.0, ge=0, le=10)
    seed: int = Field(default=0, ge=0)
    eval_every: int | None = Field(default=None, ge=1, le=1_000_000)
    validation_fraction: float = Field(
        default=0.0, ge=0, lt=1, description="held out from the training records when no validation set"
    )
    lora_r: int = Field(default=16, ge=1, le=1024)
    lora_alpha: float = Field(default=32, gt=0, le=10_000)
    lora_dropout: float = Field(default=0.0, ge=0, lt=1)
    lora_targets: list[str] = Field(default_factory=lambda: list(DEFAULT_TARGETS), min_length=1)

    @model_validator(mode="after")
    def _one_length(self) -> FinetuneConfig:
        if self.steps is not None and self.epochs is not None:
            raise ValueError("give steps or epochs, not both")
        return self

    def train_config(self) -> TrainConfig:
        keys = ("steps", "epochs", "lr", "warmup_steps", "schedule", "batch_size", "grad_accum")
        return TrainConfig(
            **{k: getattr(self, k) for k in keys},
            weight_decay=self.weight_decay,
            seed=self.seed,
            eval_every=self.eval_every,
        )


class FinetuneReport(BaseModel):
    method: str
    steps: int
    examples: int
    validation_examples: int
    truncated: int = Field(description="records longer than max_length, cut to it")
    trained_tokens: int = Field(description="labelled tokens seen in training, over all steps")
    first_loss: float
    final_loss: float
    val_losses: dict[int, float]
    seconds: float
    device: str


def encode_split(
    tokenizer, records: Sequence[Mapping[str, Any]], max_length: int
) -> tuple[list[EncodedExample], int]:
    """Rows of at most max_length tokens, and how many records were longer (cut)."""
    encoded = encode_records(tokenizer, records)
    cut = sum(len(example.input_ids) > max_length for example in encoded)
    return prepare_rows(encoded, max_length, packing=False), cut


def split_validation(
    records: Sequence[Mapping[str, Any]], fraction: float, seed: int
) -> tuple[list[Mapping[str, Any]], list[Mapping[str, Any]]]:
    """(train, validation): a seeded random `fraction` of the records held out (at least one if > 0)."""
    if fraction <= 0 or len(records) < 2:
        return list(records), []
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    held = set(order[: max(1, min(len(records) - 1, round(fraction * len(records))))])
    return [r for i, r in enumerate(records) if i not in held], [records[i] for i in sorted(held)]


def _with_lora(model: nn.Module, config: FinetuneConfig) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    present = {
        name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, nn.Linear)
    }
    targets = [t for t in config.lora_targets if t in present]
    if not targets:
        raise ValueError(f"none of lora_targets {config.lora_targets} is a linear layer of the model")
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def train_and_merge(
    model: nn.Module,
    tokenizer,
    rows: Sequence[EncodedExample],
    loss_fn: LossFn,
    config: FinetuneConfig,
    *,
    train_config: TrainConfig | None = None,
    val_rows: Sequence[EncodedExample] = (),
    adapter_dir: Path | None = None,
    progress: Callable[[StepInfo], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    device: str | torch.device | None = None,
) -> tuple[nn.Module, TrainResult]:
    """Train `model` on encoded rows with `loss_fn` (through a LoRA wrapper when config.method is "lora");
    returns the trained model on the CPU (LoRA merged into it, the PEFT adapter saved to `adapter_dir`
    when given) and the trainer's result. `train_config` overrides config.train_config()."""
    pad_id = getattr(tokenizer, "pad_token_id", None)
    trained = _with_lora(model, config) if config.method == "lora" else model
    result = train(
        trained,
        rows,
        loss_fn,
        train_config or config.train_config(),
        val_rows=val_rows,
        pad_id=pad_id if pad_id is not None else 0,
        progress=progress,
        should_stop=should_stop,
        device=device,
    )
    trained.to("cpu")
    if config.method == "lora":
        if adapter_dir is not None:
            trained.save_pretrained(adapter_dir)
        trained = trained.merge_and_unload()
    return trained, result


def finetune(
    model: nn.Module,
    tokenizer,
    records: Sequence[Mapping[str, Any]],
    config: FinetuneConfig,
    *,
    validation: Sequence[Mapping[str, Any]] | None = None,
    progress: Callable[[StepInfo], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    adapter_dir: Path | None = None,
    device: str | torch.device | None = None,
) -> tuple[nn.Module, FinetuneReport]:
    """Fine-tune `model` (float32); returns the trained model (LoRA merged into it, the PEFT adapter saved
    to `adapter_dir` when given) on the CPU in eval mode, and the report."""
    if validation is None:
        records, validation = split_validation(records, config.validation_fraction, config.seed)
    rows, cut = encode_split(tokenizer, records, config.max_length)
    val_rows, _ = encode_split(tokenizer, validation, config.max_length) if validation else ([], 0)
    if not rows:
        raise ValueError("no training rows left after cutting records to max_length")
    trained, result = train_and_merge(
        model,
        tokenizer,
        rows,
        causal_lm_loss,
        config,
        val_rows=val_rows,
        adapter_dir=adapter_dir,
        progress=progress,
        should_stop=should_stop,
        device=device,
    )
    report = FinetuneReport(
        method=config.method,
        steps=result.steps,
        examples=len(rows),
        validation_examples=len(val_rows),
        truncated=cut,
        trained_tokens=result.trained_tokens,
        first_loss=round(result.first_loss, 5),
        final_loss=round(result.final_loss, 5),
        val_losses={k: round(v, 5) for k, v in result.val_losses.items()},
        seconds=round(result.seconds, 3),
        device=result.device,
    )
    return trained.eval(), report


def finetune_model(
    model: nn.Module,
    tokenizer,
    out_dir: Path,
    records: Sequence[Mapping[str, Any]],
    config: FinetuneConfig,
    **kwargs: Any,
) -> FinetuneReport:
    """Fine-tune and save: model + tokenizer + report (finetune.json) in out_dir, a LoRA run's adapter
    in out_dir/lora_adapter."""
    out_dir = Path(out_dir)
    adapter_dir = out_dir / ADAPTER_DIR if config.method == "lora" else None
    trained, report = finetune(model, tokenizer, records, config, adapter_dir=adapter_dir, **kwargs)
    trained.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / REPORT_FILE).write_text(json.dumps(report.model_dump(mode="json"), indent=2))
    return report
