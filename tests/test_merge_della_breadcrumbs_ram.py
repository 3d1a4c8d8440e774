"""DELLA's sampling (seeded, kept fraction, per-entry rescale, unbiased), and what mergekit 0.1.5 computes
deterministically around it; breadcrumbs' window, SCE's selection and RAM's overlap rule on hand-made
tensors."""

from __future__ import annotations

import pytest
import torch

from workers.merge import METHODS
from workers.merge.breadcrumbs import outlier_window
from workers.merge.della import keep_probabilities
from workers.merge.registry import TensorGroup
from workers.merge.sparsify import uniform_draws

mergekit_sparsify = pytest.importorskip("mergekit.sparsify")
mergekit_gta = pytest.importorskip("mergekit.merge_methods.generalized_task_arithmetic")
mergekit_base = pytest.importorskip("mergekit.merge_methods.base")
mergekit_registry = pytest.importorskip("mergekit.merge_methods.registry")


def run(method: str, base, tensors, model_params, seeds=None, **params) -> torch.Tensor:
    spec = METHODS[method]
    full = {**spec.global_params, **params}
    per_model = [{**{k: v for k, v in spec.model_params.items() if v is not None}, **p} for p in model_params]
    seeds = seeds if seeds is not None else list(range(len(tensors)))
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    return spec.fn(TensorGroup("w", base, tensors, per_model, full, generators))


def _deltas(seed: int, shape=(24, 40), count: int = 2) -> tuple[torch.Tensor, list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=generator)
    return base, [base + 0.01 * torch.randn(shape, generator=generator) for _ in range(count)]


def _capture_mergekit_probs(monkeypatch, delta, density, epsilon) -> torch.Tensor:
    seen = []

    def fake_bernoulli(probs, *args, **kwargs):
        seen.append(probs.clone())
        return torch.ones_like(probs)

    monkeypatch.setattr(torch, "bernoulli", fake_bernoulli)
    mergekit_sparsify.della_magprune(delta, density=density, epsilon=epsilon)
    monkeypatch.undo()
    return seen[0].reshape(-1)


@pytest.mark.parametrize("shape", [(24, 40), (40,), (7, 1)])
def test_della_keep_probabilities_are_mergekits(monkeypatch, shape):
    base, (tuned,) = _deltas(0, shape, count=1)
    delta = tuned - base
    ours = keep_probabilities(delta, 0.4, 0.15)
    if shape[-1] == 1:  # one-entry rows: mergekit divides 0 by 0; Strata keeps them with p = density
        assert torch.equal(ours, torch.full_like(ours, 0.4))
        return
    theirs = _capture_mergekit_probs(monkeypatch, delta, 0.4, 0.15)
    assert torch.equal(ours, theirs)
    rows = ours.reshape(-1, shape[-1])
    assert rows.min().item() == pytest.approx(0.25) and rows.max().item() == pytest.approx(0.55)
    assert torch.allclose(rows.mean(dim=1), torch.full((rows.shape[0],), 0.4))  # kept fraction = density


def _mergekit_merge(method: str, base, tensors, model_params, **params) -> torch.Tensor:
    entries = [mergekit_base.TensorEntry("base", base, is_base=True)] + [
        mergekit_base.TensorEntry(f"m{i}", t) for i, t in enumerate(tensors)
    ]
    group = mergekit_base.TensorGroup(entries)
    per_model = {
        key: {f"m{i}": p[key] for i, p in enumerate(model_params)} for key in ("weight", "density", "epsilon")
    }
    return mergekit_registry.get(method).merge_group(group, **per_model, **params)


@pytest.mark.parametrize("method,normalize", [("della", True), ("della_linear", False), ("della", False)])
def test_della_equals_mergekit_given_the_same_mask(monkeypatch, method, normalize):
    """With the mask drawn from the same uniforms (and rescale off, where the two rescales differ),
    everything around the sampling (probabilities, weights, sign election, normalization) is mergekit's."""
    base, tensors = _deltas(3)
    params = [
        {"weight": 0.7, "density": 0.5, "epsilon": 0.2},
        {"weight": -0.4, "density": 0.3, "epsilon": 0.1},
    ]
    ours = run(
        method, base, tensors, params, seeds=[11, 12], rescale=False, normalize=normalize, **{"lambda": 0.9}
    )
    generators = iter([torch.Generator().manual_seed(11), torch.Generator().manual_seed(12)])

    def same_draws(probs, *args, **kwargs):
        draws = uniform_draws(next(generators), probs.numel()).reshape(probs.shape)
        return (draws < probs).to(probs.dtype)

    monkeypatch.setattr(torch, "bernoulli", same_draws)
    theirs = _mergekit_merge(
        method, base, tensors, params, rescale=False, normalize=normalize, int8_mask=False, **{"lambda": 0.9}
    )
    monkeypatch.undo()
    assert (ours - theirs).abs().max().item() <= 1e-6
    assert not torch.equal(ours, base)


def test_della_is_reproducible_for_a_seed_and_changes_with_it():
    base, tensors = _deltas(4)
    params = [{"weight": 0.5, "density": 0.4}, {"weight": 0.5, "density": 0.4}]
    one = run("della", base, tensors, params, seeds=[1, 2])
    again = run("della", base, tensors, params, seeds=[1, 2])
    other = run("della", base, tensors, params, seeds=[3, 4])
    assert torch.equal(one, again) and not torch.equal(one, other)


def test_della_keeps_density_on_average_favours_large_entries_and_rescales_by_one_over_p():
    base = torch.zeros(256, 512)
    delta = torch.randn(256, 512, generator=torch.Generator().manual_seed(5))
    out = run("della_linear", base, [delta], [{"weight": 1.0, "density": 0.3, "epsilon": 0.2}])
    kept = out != 0
    n = kept.numel()
    assert abs(kept.float().mean().item() - 0.3) < 5 * (0.3 * 0.7 / n) ** 0.5
    probs = keep_probabilities(delta, 0.3, 0.2).reshape(delta.shape)
    assert torch.allclose(out[kept], delta[kept] / probs[kept])  # survivors x 1/p_ij, entry by entry
    large = delta.abs() > delta.abs().median(dim=1, keepdim=True).values
    assert kept[large].float().mean() > kept[~large].float().mean() + 0.15  # p grows with the rank
    plain = run(
        "della_linear", base, [delta], [{"weight": 1.0, "density": 0.3, "epsilon": 0.2}], rescale=False
    )
    assert torch.equal(plain[plain != 0], delta[plain != 0])  # rescale off: survivors unchanged


def test_della_is_unbiased_entry_by_entry():
    base = torch.zeros(6, 10)
    delta = torch.randn(6, 10, generator=torch.Generator().manual_seed(6))
    params = [{"weight": 1.0, "density": 0.4, "epsilon": 0.3}]
    draws = 3000
    mean = sum(run("della_linear", base, [delta], params, seeds=[s]) for s in range(draws)) / draws
    p = keep_probabilities(delta, 0.4, 0.3).reshape(delta.shape)
    stderr = delta.abs() * ((1 - p) / (p * draws)).sqrt()
    assert ((mean - delta).abs() / stderr).max().item() < 5


def test_breadcrumbs_keeps_the_window_between_outliers_and_small_entries():
    delta = torch.tensor([3.0, -10.0, 1.0, 7.0, -5.0, 2.0, 9.0, -4.0, 8.0, 6.0])
    keep = outlier_window(delta, density=0.5, gamma=0.2)  # n_bot = 10 - 5 - 2 = 3
    assert delta[keep.bool()].abs().sort().values.tolist() == [4.0, 5.0, 6.0, 7.0, 8.0]
    merged = run("breadcrumbs", torch.zeros(10), [delta], [{"weight": 2.0, "density": 0.5, "gamma": 0.2}])
    assert torch.equal(merged, 2 * delta * keep)
    wide = outlier_window(delta, density=0.9, gamma=0.2)  # density + gamma > 1: fewer outliers dropped
    assert delta[wide.bool()].abs().max().item() == 9.0 and int(wide.sum()) == 9


def test_sce_keeps_the_top_variance_entries_and_weights_by_energy():
    base = torch.zeros(4)
    a, b = torch.tensor([1.0, 0.1, -2.0, 0.5]), torch.tensor([-1.0, 0.1, 2.0, 0.4])
    # variances 1, 0, 4, 0.0025: 3 nonzero, k = int(3 * 0.5) = 1 keeps entry 2, int(3 * 0.7) = 2 also entry 0
    assert torch.equal(
        run("sce", base, [a, b], [{}, {}], select_topk=0.5), torch.tensor([0.0, 0.0, 2.0, 0.0])
    )
    merged = run("sce", base, [a, b], [{}, {}], select_topk=0.7)
    # energies after selection equal (5/4 each): w = 1/2; sums 0 elect +1: entry 0 keeps a, entry 2 keeps b
    assert torch.allclose(merged, torch.tensor([1.0, 0.0, 2.0, 0.0]))
    unselected = run("sce", base, [a, b], [{}, {}])  # no selection: the energies weight the mean
    energy = torch.stack([a.square().mean(), b.square().mean()])
    w = energy / energy.sum()
    assert unselected[1].item() == pytest.approx(0.1) and unselected[3].item() == pytest.approx(
        (w[0] * 0.5 + w[1] * 0.4).item() / w.sum().item()
    )


def test_ram_keeps_unique_changes_and_averages_overlapping_ones():
    base = torch.zeros(4)
    a, b = torch.tensor([0.5, 0.0, 0.3, 1e-6]), torch.tensor([0.0, 0.2, 0.1, 0.0])
    assert torch.allclose(run("ram", base, [a, b], [{}, {}]), torch.tensor([0.5, 0.2, 0.2, 0.0]))
    # ramplus_tl: each model has 1 shared and 1 unique change: rho = 1, lambda = 1 + 0.5 * min(1, 0.3)
    plus = run("ramplus_tl", base, [a, b], [{}, {}], r=0.5, alpha=0.3)
    assert torch.allclose(plus, torch.tensor([0.5 * 1.15, 0.2 * 1.15, 0.2, 0.0]))
