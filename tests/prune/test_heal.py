import copy

import pytest
import torch

from workers.prune.depth import drop_layers
from workers.prune.heal import alpha_at, distillation_gap, heal, heal_loss, kd_kl


def test_alpha_decays_linearly_to_zero():
    assert [alpha_at(s, 4, 0.8) for s in range(4)] == pytest.approx([0.8, 0.6, 0.4, 0.2])


def test_loss_mixes_ce_and_scaled_kl():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    ids = torch.randint(0, 11, (2, 5))
    ce = torch.nn.functional.cross_entropy(student[:, :-1].reshape(-1, 11), ids[:, 1:].reshape(-1))
    kl = kd_kl(student[:, :-1], teacher[:, :-1], 2.0)
    assert heal_loss(student, teacher, ids, 0.0, 2.0).item() == pytest.approx(ce.item())
    assert heal_loss(student, teacher, ids, 1.0, 2.0).item() == pytest.approx(kl.item())
    p = torch.softmax(teacher[:, :-1] / 2, -1)
    manual = 4 * (p * (p.log() - torch.log_softmax(student[:, :-1] / 2, -1))).sum(-1).mean()
    assert kl.item() == pytest.approx(manual.item(), rel=1e-5)
    assert kd_kl(teacher, teacher, 2.0).item() == pytest.approx(0.0, abs=1e-6)


def test_heal_brings_a_pruned_model_back_toward_its_source(tiny):
    # A confident teacher (logits x200) and its own greedy text: next-token CE and distillation agree.
    teacher = copy.deepcopy(tiny)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(200)
        text = teacher.generate(
            torch.arange(3, 7)[:, None], do_sample=False, max_new_tokens=31, min_new_tokens=31, pad_token_id=0
        )
    batches = list(text.split(1))
    reference = copy.deepcopy(teacher)
    student = drop_layers(teacher, [1])
    before = distillation_gap(student, teacher, batches)
    report = heal(student, teacher, batches, steps=12, lr=1e-4, alpha0=0.5, device="cpu")
    assert report.kd_before == pytest.approx(before)
    assert report.kd_after < 0.5 * report.kd_before
    assert distillation_gap(student, teacher, batches) == pytest.approx(report.kd_after)
    assert len(report.losses) == 12 and not student.training
    assert all(torch.equal(a, b) for a, b in zip(teacher.parameters(), reference.parameters(), strict=True))
