"""Short healing of a pruned (or grown) model by distillation from its source (Knowledge Inheritance,
arXiv 2105.13880): the teacher's guidance fades out linearly while the language-modelling loss takes over.

    L_s = (1 - a_s) * CE(z_student, x_next) + a_s * t^2 * KL(softmax(z_teacher/t) || softmax(z_student/t))
    a_s = a_0 * (1 - s / S)          for step s = 0 .. S-1

The t^2 factor keeps the KL gradient on the scale of the CE gradient (Hinton et al., 2015).
The loop is the shared trainer's (`workers.train.trainer.train`, constant lr, clipping at norm 1); healing
supplies the loss and the batches: the windows cycled in order, or, with dynamic batch loading, batches drawn
from several domains by weights updated from their loss gaps (`workers.train.dynamic_batches`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from itertools import cycle

import torch
import torch.nn.functional as F
from torch import nn

from workers.device import default_device
from workers.prune.layers import Progress
from workers.train.data import Batch
from workers.train.dynamic_batches import DynamicLoading
from workers.train.trainer import StepInfo, TrainConfig, train

GAP_WINDOWS = 8  # kd_before / kd_after are measured on the first this-many batches


@dataclass
class HealReport:
    steps: int
    losses: list[float] = field(default_factory=list)
    kd_before: float = 0.0
    kd_after: float = 0.0
    device: str = "cpu"
    seconds: float = 0.0


def alpha_at(step: int, steps: int, alpha0: float) -> float:
    """a_s = a_0 * (1 - s / S): the teacher's weight, decaying linearly to zero."""
    return alpha0 * (1 - step / steps)


def kd_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """t^2 * KL(softmax(z_t / t) || softmax(z_s / t)), averaged over positions."""
    s = F.log_softmax(student_logits.float() / temperature, dim=-1).flatten(0, -2)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1).flatten(0, -2)
    return temperature**2 * F.kl_div(s, t, log_target=True, reduction="batchmean")


def heal_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    ids: torch.Tensor,
    alpha: float,
    temperature: float,
) -> torch.Tensor:
    """(1 - a) * next-token CE + a * t^2 * KL(teacher || student), over positions 0 .. L-2."""
    s, t = student_logits[:, :-1], teacher_logits[:, :-1]
    ce = F.cross_entropy(s.float().reshape(-1, s.shape[-1]), ids[:, 1:].reshape(-1))
    return (1 - alpha) * ce + alpha * kd_kl(s, t, temperature)


@torch.inference_mode()
def distillation_gap(
    student: nn.Module, teacher: nn.Module, batches: Sequence[torch.Tensor], temperature: float = 2.0
) -> float:
    """Mean t^2 * KL(teacher || student) over the batches: how far the student is from its source."""
    device = next(student.parameters()).device
    total = 0.0
    for ids in batches:
        ids = ids.to(device)
        s, t = student(input_ids=ids, use_cache=False), teacher(input_ids=ids, use_cache=False)
        total += kd_kl(s.logits, t.logits, temperature).item()
    return total / len(batches)


def cycled(batches: Sequence[torch.Tensor]) -> Iterator[Batch]:
    """The windows in order, over and over, as trainer batches (every token a target)."""
    for ids in cycle(batches):
        yield Batch(ids, ids, torch.ones_like(ids))


def heal(
    student: nn.Module,
    teacher: nn.Module,
    batches: Sequence[torch.Tensor],
    steps: int = 30,
    lr: float = 3e-5,
    alpha0: float = 1.0,
    temperature: float = 2.0,
    device: torch.device | str | None = None,
    progress: Progress | None = None,
    loading: DynamicLoading | None = None,
) -> HealReport:
    """Train `student` in place for `steps` AdamW steps on the batches (cycled), guided by `teacher`.

    With `loading`, the batches come from its domain sampler instead, its weights updated after every step
    (`batches` then only serve the kd_before / kd_after measure).
    Runs on CUDA when available (or on `device`), then returns both models to where they were.
    The defaults are the best of those tried on SmolLM2-135M with the 1.7K-token calibration text
    (docs/prune-grow.md): a larger lr, or a0 below 1, let the CE term overfit so little text.
    """
    if steps < 1 or not batches:
        raise ValueError("need at least one step and one batch")
    device = torch.device(device) if device is not None else default_device()
    homes = [next(m.parameters()).device for m in (student, teacher)]
    student.to(device)
    teacher.to(device).eval()
    report = HealReport(steps=steps, device=str(device))
    report.kd_before = distillation_gap(student, teacher, batches[:GAP_WINDOWS], temperature)
    done = [0]

    def loss_fn(model: nn.Module, batch: Batch) -> torch.Tensor:
        ids = batch.input_ids
        with torch.no_grad():
            teacher_logits = teacher(input_ids=ids, use_cache=False).logits
        logits = model(input_ids=ids, use_cache=False).logits
        return heal_loss(logits, teacher_logits, ids, alpha_at(done[0], steps, alpha0), temperature)

    def on_step(info: StepInfo) -> None:
        done[0] = info.step
        report.losses.append(info.loss)
        if loading is not None:
            loading.step(info.step)
        if progress is not None:
            progress(info.step, steps, f"heal loss {info.loss:.4f}")

    config = TrainConfig(steps=steps, lr=lr, schedule="constant", batch_size=1, max_grad_norm=1.0)
    stream = loading.sampler if loading is not None else cycled(batches)
    result = train(student, [], loss_fn, config, progress=on_step, device=device, stream=stream)
    report.seconds = result.seconds
    report.kd_after = distillation_gap(student, teacher, batches[:GAP_WINDOWS], temperature)
    student.to(homes[0])
    teacher.to(homes[1])
    return report
