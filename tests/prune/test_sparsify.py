import pytest
import torch
from transformers import LlamaForCausalLM

from tests.tiny_models import make_tiny_llama, make_variant
from workers.sparsify.delta import DARE_SAFE_DELTA, sparsify


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("sparsify")
    make_tiny_llama(root / "base", seed=0)
    make_variant(root / "base", root / "small", seed=1, scale=0.001)
    make_variant(root / "base", root / "large", seed=2, scale=0.01)
    load = lambda name: LlamaForCausalLM.from_pretrained(root / name).state_dict()  # noqa: E731
    return load("base"), load("small"), load("large")


def test_dare_keeps_about_density_and_rescales_survivors(pair):
    base, small, _ = pair
    result = sparsify(base, small, method="dare", density=0.3, seed=0)
    assert result.stats.kept_fraction == pytest.approx(0.3, abs=0.01)
    name = "model.layers.0.mlp.up_proj.weight"
    delta, out = small[name] - base[name], result.tensors[name] - base[name]
    kept = out != 0
    assert kept.float().mean().item() == pytest.approx(0.3, abs=0.03)
    torch.testing.assert_close(out[kept], delta[kept] / 0.3, rtol=1e-4, atol=1e-6)


def test_dare_is_deterministic_per_seed_and_independent_of_tensor_order(pair):
    base, small, _ = pair
    first = sparsify(base, small, "dare", 0.5, seed=7).tensors
    reordered = sparsify(base, dict(reversed(list(small.items()))), "dare", 0.5, seed=7).tensors
    other = sparsify(base, small, "dare", 0.5, seed=8).tensors
    assert all(torch.equal(first[k], reordered[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_magnitude_keeps_the_largest_deltas(pair):
    base, small, _ = pair
    result = sparsify(base, small, method="magnitude", density=0.2)
    assert result.stats.kept_fraction == pytest.approx(0.2, abs=0.005)
    name = "model.layers.1.self_attn.q_proj.weight"
    delta = (small[name] - base[name]).abs()
    kept = result.tensors[name] != base[name]
    assert delta[kept].min() >= delta[~kept].max()
    assert torch.equal(result.tensors[name][kept], small[name][kept])


def test_delta_statistics_and_the_dare_warning(pair):
    base, small, large = pair
    calm = sparsify(base, small, "dare", 0.5).stats
    loud = sparsify(base, large, "dare", 0.5).stats
    # deltas are N(0, scale^2): mean |d| = 0.798 scale, median 0.674 scale, p99 2.576 scale
    assert calm.abs_mean == pytest.approx(0.798e-3, rel=0.02)
    assert calm.abs_median == pytest.approx(0.674e-3, rel=0.05)
    assert calm.abs_p99 == pytest.approx(2.576e-3, rel=0.05)
    assert calm.abs_max > calm.abs_p99
    assert calm.abs_p99 < DARE_SAFE_DELTA < loud.abs_p99
    assert (calm.large_deltas, loud.large_deltas) == (False, True)


def test_unmatched_tensors_pass_through(pair):
    base, small, _ = pair
    tuned = dict(small, extra=torch.ones(3), **{"model.norm.weight": torch.ones(7)})
    result = sparsify(base, tuned, "dare", 0.5)
    assert sorted(result.stats.skipped) == ["extra", "model.norm.weight"]
    assert torch.equal(result.tensors["extra"], torch.ones(3))
    with pytest.raises(ValueError):
        sparsify(base, small, "dare", 0.0)
