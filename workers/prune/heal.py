"""Short healing of a pruned (or grown) model by distillation from its source (Knowledge Inheritance,
arXiv 2105.13880): the teacher's guidance fades out linearly while the language-modelling loss takes over.

    L_s = (1 - a_s) * CE(z_student, x_next) + a_s * t^2 * KL(softmax(z_teacher/t) || softmax(z_student/t))
    a_s = a_0 * (1 - s / S)          for step s = 0 .. S-1

The t^2 factor keeps the KL gradient on the scale of the CE gradient (Hinton et al., 2015).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from workers.device import default_device
from workers.prune.layers import Progress

GAP_WINDOWS = 8  # kd_before / kd_after are measured on the first this-many batches


@dataclass
class HealReport:
    steps: int
    losses: list[float] = field(default_factory=list)
    kd_before: float = 0.0
    kd_after: float = 0.0
    device: str = "cpu"


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
) -> HealReport:
    """Train `student` in place for `steps` AdamW steps on the batches (cycled), guided by `teacher`.

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
    optimizer = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0)
    student.train()
    try:
        for step in range(steps):
            ids = batches[step % len(batches)].to(device)
            with torch.no_grad():
                teacher_logits = teacher(input_ids=ids, use_cache=False).logits
            logits = student(input_ids=ids, use_cache=False).logits
            loss = heal_loss(logits, teacher_logits, ids, alpha_at(step, steps, alpha0), temperature)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            optimizer.step()
            report.losses.append(loss.item())
            if progress is not None:
                progress(step + 1, steps, f"heal loss {loss.item():.4f}")
    finally:
        student.eval()
    report.kd_after = distillation_gap(student, teacher, batches[:GAP_WINDOWS], temperature)
    student.to(homes[0])
    teacher.to(homes[1])
    return report
