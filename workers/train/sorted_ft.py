"""Sorted Fine-Tuning (SoFT, Sorted LLaMA, arXiv 2309.08968): train every chosen exit at once.

For a batch with response tokens R (positions whose next token is a target) and exits E, the loss is

    loss = (1/|E|) sum_{n in E} CE_n,
    CE_n = (1/|R|) sum_{t in R} -log softmax(LMHead(FinalNorm(h_n(t))))[y_t],

where h_n is the hidden state after decoder layer n, and FinalNorm and LMHead are the model's own, shared by
all exits (no new parameters). With `distill`, the one-hot target y_t is replaced by the source model's own
full-depth distribution q_t (a frozen copy taken before training), CE_n = -(1/|R|) sum_t sum_v q_t(v) log
p_n(v | t): every exit learns the whole distribution of the original model, and the full-depth term starts
at its minimum instead of pulling the model towards the data's tokens.

With `exit_adapters`, every exit n < L gets its own affine adapter (A_n, b_n) trained jointly with the model,
CE_n then scoring LMHead(FinalNorm(A_n h_n + b_n)) (the exit adapters of workers.early_exit.adapters; full
depth never has one). The adapters start from the closed-form ridge fit on the training rows
(`adapter_init="ridge"`, workers.early_exit.fit) or from the identity, and train at their own learning rate
`adapter_lr`; after training each exit's scale (an inverse temperature on its normed state) is fitted to
the trained model on the training rows (`fit_scales`), then its pointer (`fit_pointers`). The trained
adapters come back in the report (`TrainReport.adapters`, not serialised).

All exits come from one pass through max(E) layers (`hidden_at_exits`), and the head runs only on the
positions in R. The optimiser is AdamW with linear warmup, then linear decay to 0. On CUDA the forward
pass runs under bfloat16 autocast (the weights and optimiser state stay float32); on CPU only when asked
(`bf16_on_cpu`).
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from workers.device import default_device, describe_device
from workers.early_exit.adapters import Affine, ExitAdapters
from workers.early_exit.fit import FitConfig, fit_exit_adapters, fit_pointers, fit_scales
from workers.early_exit.forward import check_depth, decoder_stack, hidden_at_exits, num_layers
from workers.train.data import IGNORE_INDEX, Batch, EncodedExample, batches, encode_records, prepare_rows

Progress = Callable[[int, int, dict[int, float]], None]
REPORT_FILE = "sorted_ft.json"


def default_exits(num_layers: int, start_fraction: float = 0.4, count: int | None = None) -> list[int]:
    """Evenly spaced exits from ceil(start_fraction * L) to L.

    `count` exits when given; otherwise the spacing is max(1, round(L / 10)) layers, so for L = 40 and
    start_fraction = 0.3 this is the paper's grid 12, 16, ..., 40, and for L = 30 (SmolLM2-135M) with the
    default 0.4 it is 12, 15, ..., 30.
    """
    if num_layers < 1:
        raise ValueError("num_layers must be at least 1")
    if not 0 < start_fraction <= 1:
        raise ValueError("start_fraction must lie in (0, 1]")
    start = min(max(1, math.ceil(start_fraction * num_layers - 1e-9)), num_layers)
    if count is None:
        step = max(1, round(num_layers / 10))
        return list(range(num_layers, start - 1, -step))[::-1]
    if count < 1:
        raise ValueError("count must be at least 1")
    count = min(count, num_layers - start + 1)
    if count == 1:
        return [num_layers]
    return sorted({round(start + i * (num_layers - start) / (count - 1)) for i in range(count)})


class SortConfig(BaseModel):
    """Hyper-parameters of one Sorted Fine-Tuning run. Give `steps` or `epochs` (default: one epoch)."""

    model_config = ConfigDict(extra="forbid")

    exits: list[int] | None = Field(default=None, description="exit depths; None: default_exits(L)")
    steps: int | None = Field(default=None, ge=1)
    epochs: float | None = Field(default=None, gt=0)
    lr: float = Field(default=5e-5, gt=0)
    seq_len: int = Field(default=512, ge=2)
    batch_size: int = Field(default=8, ge=1)
    warmup_steps: int = Field(default=0, ge=0)
    weight_decay: float = Field(default=0.0, ge=0)
    max_grad_norm: float | None = Field(default=1.0, gt=0)
    betas: tuple[float, float] = (0.9, 0.999)
    seed: int = Field(default=0, ge=0)
    bf16: bool = Field(default=True, description="bfloat16 autocast on CUDA")
    bf16_on_cpu: bool = Field(
        default=False, description="bfloat16 autocast on CPU too (faster on CPUs with AVX512-BF16 or AMX)"
    )
    gradient_checkpointing: bool = False
    packing: bool = False
    distill: bool = Field(
        default=False,
        description="targets: the source model's full-depth distribution instead of the data's next tokens",
    )
    freeze_embeddings: bool = Field(
        default=False,
        description="keep the token embeddings and the LM head (shared by every exit) fixed; trains faster "
        "and moves the full-depth model less",
    )
    exit_adapters: bool = Field(
        default=False, description="train an affine exit adapter per exit below full depth, jointly"
    )
    adapter_init: Literal["ridge", "identity"] = Field(
        default="ridge", description="start the adapters from the ridge fit on the training rows, or at I"
    )
    adapter_lr: float = Field(default=1e-4, gt=0, description="learning rate of the exit adapters")

    @model_validator(mode="after")
    def _one_length(self) -> SortConfig:
        if self.steps is not None and self.epochs is not None:
            raise ValueError("give steps or epochs, not both")
        if self.exits is not None and (not self.exits or min(self.exits) < 1):
            raise ValueError("exits must be a non-empty list of depths >= 1")
        return self

    def resolved_exits(self, layers: int) -> list[int]:
        exits = sorted(set(self.exits)) if self.exits is not None else default_exits(layers)
        if exits[-1] > layers:
            raise ValueError(f"exit {exits[-1]} is deeper than the model's {layers} layers")
        return exits

    def total_steps(self, rows: int) -> int:
        per_epoch = math.ceil(rows / self.batch_size)
        if self.steps is not None:
            return self.steps
        return max(1, math.ceil((self.epochs if self.epochs is not None else 1.0) * per_epoch))


class TrainReport(BaseModel):
    """What a run did: per-exit losses at the first and last steps, the loss curve, throughput."""

    exits: list[int]
    steps: int
    rows: int
    examples: int
    trained_tokens: int
    first_losses: dict[int, float]
    final_losses: dict[int, float] = Field(description="per-exit mean over the last max(1, steps//10) steps")
    loss_curve: list[float] = Field(description="mean-over-exits loss of every step")
    seconds: float
    device: str
    config: SortConfig
    adapters: ExitAdapters | None = Field(default=None, exclude=True, description="trained exit adapters")

    model_config = ConfigDict(arbitrary_types_allowed=True)


def exit_losses(
    model: nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    exits: Sequence[int],
    attention_mask: torch.Tensor | None = None,
    teacher: nn.Module | None = None,
    adapters: ExitAdapters | None = None,
) -> dict[int, torch.Tensor]:
    """CE_n for each exit n: token-mean next-token cross-entropy over positions with a label (not -100);
    against the teacher's full-depth distribution at those positions when a teacher is given; through the
    exit's adapter where `adapters` has one."""
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    if not bool(keep.any()):
        raise ValueError("the batch has no response tokens to train on")
    wanted: torch.Tensor = targets[keep]
    if teacher is not None:
        with torch.no_grad():
            depth = num_layers(teacher)
            last = hidden_at_exits(teacher, input_ids, [depth], attention_mask)[depth]
            wanted = F.softmax(teacher.lm_head(last[:, :-1][keep]).float(), dim=-1)
    hidden = hidden_at_exits(model, input_ids, exits, attention_mask, adapters)
    out = {}
    for depth in sorted(hidden):
        logits = model.lm_head(hidden[depth][:, :-1][keep])
        out[depth] = F.cross_entropy(logits.float(), wanted)
    return out


def sorted_loss(
    model: nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    exits: Sequence[int],
    attention_mask: torch.Tensor | None = None,
    teacher: nn.Module | None = None,
    adapters: ExitAdapters | None = None,
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """(mean over exits of CE_n, {n: CE_n})."""
    losses = exit_losses(model, input_ids, labels, exits, attention_mask, teacher, adapters)
    return torch.stack(list(losses.values())).mean(), losses


def linear_schedule(step: int, warmup: int, total: int) -> float:
    """LR multiplier: (step + 1) / warmup during warmup, then linear decay to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def _checkpointing(model: nn.Module, enable: bool) -> None:
    """Activation checkpointing of every decoder layer (transformers renamed the methods in 5.x)."""
    if enable:
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        if hasattr(model, "activation_checkpointing_disable"):
            model.activation_checkpointing_disable()
        else:
            model.gradient_checkpointing_disable()


def _frozen_copy(model: nn.Module) -> nn.Module:
    """The model as it is now, in eval mode and without gradients: the distillation teacher."""
    teacher = copy.deepcopy(model).eval()
    for param in teacher.parameters():
        param.requires_grad_(False)
    return teacher


def _freeze_embeddings(model: nn.Module) -> list[nn.Parameter]:
    """Stop gradients to the input embeddings and the LM head; returns the parameters it froze."""
    frozen = []
    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        for param in module.parameters() if module is not None else ():
            if param.requires_grad:
                param.requires_grad_(False)
                frozen.append(param)
    return frozen


def _optimizer(
    model: nn.Module, config: SortConfig, adapter_params: Sequence[torch.Tensor] = ()
) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 or "norm" in name else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if adapter_params:
        groups.append({"params": list(adapter_params), "weight_decay": 0.0, "lr": config.adapter_lr})
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas)


def _initial_adapters(
    model: nn.Module, rows: Sequence[EncodedExample], exits: Sequence[int], config: SortConfig
) -> ExitAdapters:
    """Starting adapters for exits below full depth: the ridge fit on the training rows' trained positions
    (every position is context), or the identity."""
    layers = num_layers(model)
    hidden_size = decoder_stack(model).norm.weight.shape[0]
    if config.adapter_init == "identity":
        eye = torch.eye(hidden_size)
        maps = {k: Affine(eye.clone(), torch.zeros(hidden_size)) for k in exits}
        return ExitAdapters(maps, layers, hidden_size)
    windows, masks = _row_windows(rows)
    was_training = model.training
    model.eval()
    try:
        config = FitConfig(batch_windows=1, fit_scale=False, pointer=False)  # scales: after training
        fitted = fit_exit_adapters(model, windows, exits, config, masks=masks)
    finally:
        model.train(was_training)
    return fitted.adapters


def _row_windows(rows: Sequence[EncodedExample]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The rows as token windows, and masks of their trained positions (every position is context)."""
    windows = [torch.tensor(row.input_ids, dtype=torch.long) for row in rows]
    masks = [torch.tensor(row.labels, dtype=torch.long) != IGNORE_INDEX for row in rows]
    return windows, masks


def _trainable_adapters(
    adapters: ExitAdapters, device: torch.device
) -> tuple[ExitAdapters, list[torch.Tensor]]:
    """Copies of the adapters as float32 leaf tensors on `device` that require gradients."""
    maps, params = {}, []
    for depth, affine in adapters.maps.items():
        weight = affine.weight.detach().to(device, torch.float32).clone().requires_grad_(True)
        bias = affine.bias.detach().to(device, torch.float32).clone().requires_grad_(True)
        maps[depth] = Affine(weight, bias)
        params += [weight, bias]
    return ExitAdapters(maps, adapters.num_layers, adapters.hidden_size), params


def train_sorted(
    model: nn.Module,
    tokenizer,
    examples: Sequence[Mapping[str, Any] | EncodedExample],
    config: SortConfig | None = None,
    progress: Progress | None = None,
    device: str | torch.device | None = None,
) -> TrainReport:
    """Sorted Fine-Tuning of `model` in place (left in eval mode on `device`); returns the report.

    `examples`: prompt/response or messages records (see workers.train.data) or encoded examples.
    `progress(step, total, {exit: loss})` is called after every optimiser step.
    """
    config = config or SortConfig()
    device = torch.device(device) if device is not None else default_device()
    layers = num_layers(model)
    exits = config.resolved_exits(layers)
    for depth in exits:
        check_depth(model, depth)
    encoded = encode_records(tokenizer, examples)
    rows = prepare_rows(encoded, config.seq_len, config.packing)
    if not rows:
        raise ValueError("no training rows left after truncation to seq_len")
    total = config.total_steps(len(rows))
    pad_id = getattr(tokenizer, "pad_token_id", None)
    pad_id = pad_id if pad_id is not None else 0

    torch.manual_seed(config.seed)
    model.to(device).train()
    frozen = _freeze_embeddings(model) if config.freeze_embeddings else []
    teacher = _frozen_copy(model) if config.distill else None
    adapters, adapter_params = None, []
    below = [depth for depth in exits if depth < layers]
    if config.exit_adapters and below:
        adapters, adapter_params = _trainable_adapters(_initial_adapters(model, rows, below, config), device)
    if config.gradient_checkpointing:
        _checkpointing(model, True)
    optimizer = _optimizer(model, config, adapter_params)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: linear_schedule(step, config.warmup_steps, total)
    )
    autocast = config.bf16 and (device.type == "cuda" or (device.type == "cpu" and config.bf16_on_cpu))
    stream = batches(rows, config.batch_size, config.seed, pad_id)
    curve: list[float] = []
    history: list[dict[int, float]] = []
    start = time.perf_counter()
    try:
        for step in range(total):
            batch: Batch = next(stream).to(device)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=autocast):
                loss, per_exit = sorted_loss(
                    model, batch.input_ids, batch.labels, exits, batch.attention_mask, teacher, adapters
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                if adapter_params:
                    torch.nn.utils.clip_grad_norm_(adapter_params, config.max_grad_norm)
            optimizer.step()
            schedule.step()
            losses = {depth: float(value.detach()) for depth, value in per_exit.items()}
            curve.append(float(loss.detach()))
            history.append(losses)
            if progress is not None:
                progress(step + 1, total, losses)
    finally:
        if config.gradient_checkpointing:
            _checkpointing(model, False)
        model.eval()
        optimizer.zero_grad(set_to_none=True)
        for param in frozen:
            param.requires_grad_(True)
    tail = history[-max(1, total // 10) :]
    return TrainReport(
        exits=exits,
        steps=total,
        rows=len(rows),
        examples=len(encoded),
        trained_tokens=sum(row.trained_tokens for row in rows),
        first_losses=history[0],
        final_losses={depth: sum(h[depth] for h in tail) / len(tail) for depth in exits},
        loss_curve=curve,
        seconds=time.perf_counter() - start,
        device=describe_device(device),
        config=config,
        adapters=_finished(model, adapters, rows),
    )


def _finished(
    model: nn.Module, adapters: ExitAdapters | None, rows: Sequence[EncodedExample]
) -> ExitAdapters | None:
    """The trained adapters as plain float32 CPU tensors (checked finite), with each exit's scale fitted
    to the trained model on the training rows' trained positions, then its pointer on the rows."""
    if adapters is None:
        return None
    maps = {k: Affine(a.weight.detach().cpu(), a.bias.detach().cpu()) for k, a in adapters.maps.items()}
    windows, masks = _row_windows(rows)
    scaled = fit_scales(model, ExitAdapters(maps, adapters.num_layers, adapters.hidden_size), windows, masks)
    return fit_pointers(model, scaled, windows, FitConfig.pointer_tokens)


def sort_model(
    source_dir: str | Path,
    out_dir: str | Path,
    data_path: str | Path,
    config: SortConfig | None = None,
    progress: Progress | None = None,
    device: str | torch.device | None = None,
) -> TrainReport:
    """The `sort` job: load a model directory, fine-tune it on a JSONL file, save model + tokenizer + report.

    The weights are saved in the source's dtype; the report goes to out_dir/sorted_ft.json.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from workers.train.data import load_examples

    tokenizer = AutoTokenizer.from_pretrained(source_dir)
    examples = load_examples(data_path, tokenizer)
    model = AutoModelForCausalLM.from_pretrained(source_dir)
    dtype = next(model.parameters()).dtype
    model.float()
    report = train_sorted(model, tokenizer, examples, config, progress, device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.to("cpu", dtype=dtype).save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / REPORT_FILE).write_text(json.dumps(report.model_dump(mode="json"), indent=2))
    return report
