"""Dynamic batch loading (LLM-Shearing): the weight update, the sampler, and healing with it."""

import copy
import math

import pytest
import torch

from tests.tiny_models import make_tiny_llama
from workers.prune.depth import drop_layers
from workers.prune.heal import heal
from workers.train.dynamic_batches import (
    DomainSampler,
    domain_losses,
    dynamic_loading,
    split_domain,
    update_weights,
)


def test_update_raises_the_lagging_domain_by_exp_of_its_gap():
    new = update_weights([0.5, 0.5], [3.0, 2.0], [2.0, 2.0], smoothing=0.0)
    assert new == pytest.approx([math.e / (1 + math.e), 1 / (1 + math.e)])
    # a domain below its reference counts as no gap (max(l - r, 0)); smoothing keeps every weight > 0
    assert update_weights([0.2, 0.8], [1.0, 1.0], [5.0, 5.0], smoothing=0.0) == pytest.approx([0.2, 0.8])
    assert min(update_weights([1.0, 0.0], [9.0, 1.0], [1.0, 1.0])) > 0
    # eta scales the gap: half the step, the square root of the ratio
    half = update_weights([0.5, 0.5], [3.0, 2.0], [2.0, 2.0], eta=0.5, smoothing=0.0)
    assert half == pytest.approx([math.sqrt(math.e) / (1 + math.sqrt(math.e)), 1 / (1 + math.sqrt(math.e))])
    for bad in ([float("nan"), 1.0], [float("inf"), 1.0], [-1.0, 1.0]):
        with pytest.raises(ValueError):
            update_weights(bad, [1.0, 1.0], [1.0, 1.0])


def test_split_holds_out_dev_and_test_windows_from_the_end():
    domain = split_domain("d", list(range(100)), 10, 2)
    assert [w[0].item() for w in domain.train] == [0, 10, 20, 30, 40, 50]
    assert [w[0].item() for w in domain.dev] == [60, 70] and [w[0].item() for w in domain.test] == [80, 90]
    with pytest.raises(ValueError, match="needs at least"):
        split_domain("d", list(range(40)), 10, 2)


def test_sampler_draws_domains_by_weight():
    a = split_domain("a", [5] * 200, 10, 1)
    b = split_domain("b", [7] * 200, 10, 1)
    sampler = DomainSampler([a, b], [3.0, 1.0], batch_size=4, seed=0)
    rows = torch.cat([next(sampler).input_ids for _ in range(250)])
    share = (rows[:, 0] == 5).float().mean().item()
    assert share == pytest.approx(0.75, abs=0.04) and sampler.drawn[0] + sampler.drawn[1] == 1000


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "m", seed=0)


def constructed_domains():
    """Two domains: a repeated pattern (easy) and random ids (hard)."""
    generator = torch.Generator().manual_seed(0)
    easy = split_domain("easy", [3, 4, 5, 6] * 200, 16, 2)
    hard = split_domain("hard", torch.randint(3, 128, (800,), generator=generator).tolist(), 16, 2)
    return [easy, hard]


def test_a_lagging_domain_gains_weight_while_healing(tiny):
    """References: the model's own dev losses, except 1 nat lower on 'hard': 'hard' lags, so DBL raises it."""
    domains = constructed_domains()
    student = drop_layers(tiny, [1])
    own = domain_losses(student, {d.name: d.dev for d in domains})
    references = {"easy": own["easy"] + 5.0, "hard": own["hard"] - 1.0}
    loading = dynamic_loading(student, references, domains, None, batch_size=1, update_every=2, seed=0)
    gap_batches = [w.view(1, -1) for d in domains for w in d.dev]
    report = heal(student, tiny, gap_batches, steps=4, lr=1e-4, device="cpu", loading=loading)
    history = loading.history
    assert [h["step"] for h in history] == [0, 2, 4] and len(report.losses) == 4
    assert history[0]["weights"] == {"easy": 0.5, "hard": 0.5}
    assert (
        history[1]["weights"]["hard"] > 0.7 and history[2]["weights"]["hard"] > history[1]["weights"]["hard"]
    )
    assert history[1]["loss_gap"]["hard"] > 0 > history[1]["loss_gap"]["easy"]
    assert sum(loading.sampler.drawn) == 4


def test_a_smaller_eta_moves_the_weights_less(tiny):
    """The same lagging domain with eta 0.1: its weight rises at the first update, by less than with 1."""
    domains = constructed_domains()
    student = drop_layers(tiny, [1])
    own = domain_losses(student, {d.name: d.dev for d in domains})
    references = {"easy": own["easy"] + 5.0, "hard": own["hard"] - 1.0}
    first = {}
    for eta in (1.0, 0.1):
        loading = dynamic_loading(
            copy.deepcopy(student), references, domains, None, batch_size=1, update_every=1, eta=eta
        )
        loading.step(1)
        first[eta] = loading.history[1]["weights"]["hard"]
    assert 0.5 < first[0.1] < first[1.0]


def test_fixed_mix_never_changes_weights(tiny):
    domains = constructed_domains()
    student = copy.deepcopy(tiny)
    loading = dynamic_loading(student, tiny, domains, [1.0, 3.0], batch_size=1, update_every=None)
    heal(student, tiny, [domains[0].dev[0].view(1, -1)], steps=2, device="cpu", loading=loading)
    assert loading.sampler.weights == pytest.approx([0.25, 0.75]) and len(loading.history) == 1
