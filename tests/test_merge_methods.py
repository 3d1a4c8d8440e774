"""Each merge method's equation, pinned on hand-made tensors."""

import pytest
import torch

from workers.merge import METHODS
from workers.merge.registry import TensorGroup
from workers.merge.sparsify import bernoulli_mask, dare, magnitude_mask


def group(base, tensors, model_params, **params):
    method_name = params.pop("method")
    method = METHODS[method_name]
    full = {**method.global_params, **params}
    gens = [torch.Generator().manual_seed(i) for i in range(len(tensors))]
    return method.fn(TensorGroup("w", base, tensors, model_params, full, gens))


def test_linear_is_normalized_weighted_sum():
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([3.0, -2.0])
    out = group(None, [a, b], [{"weight": 1.0}, {"weight": 3.0}], method="linear")
    torch.testing.assert_close(out, (1 * a + 3 * b) / 4)
    raw = group(None, [a, b], [{"weight": 1.0}, {"weight": 3.0}], method="linear", normalize=False)
    torch.testing.assert_close(raw, a + 3 * b)


def test_linear_accumulates_half_precision_in_float32():
    a = torch.full((4,), 1000.0, dtype=torch.float16)
    b = torch.full((4,), 1.0, dtype=torch.float16)
    out = group(None, [a, a, b], [{"weight": 1.0}] * 3, method="linear", normalize=False)
    assert out.dtype == torch.float16 and out[0].item() == 2001.0


def test_task_arithmetic_adds_weighted_deltas_times_lambda():
    base = torch.tensor([1.0, 1.0, 1.0])
    t1, t2 = torch.tensor([2.0, 1.0, 0.0]), torch.tensor([1.0, 3.0, 1.0])
    out = group(
        base, [t1, t2], [{"weight": 0.5}, {"weight": 1.0}], method="task_arithmetic", **{"lambda": 2.0}
    )
    expected = base + 2.0 * (0.5 * (t1 - base) + 1.0 * (t2 - base))
    torch.testing.assert_close(out, expected)


def test_magnitude_mask_keeps_the_k_largest():
    d = torch.tensor([0.1, -5.0, 0.3, 2.0, -0.2, 0.0])
    assert magnitude_mask(d, 0.5).tolist() == [False, True, True, True, False, False]
    assert magnitude_mask(d, 0.01).sum() == 1  # at least one entry survives
    assert magnitude_mask(d, 1.0).all()


def test_ties_trims_elects_sign_and_averages_agreeing_deltas():
    base = torch.zeros(4)
    t1 = torch.tensor([1.0, -2.0, 0.1, 3.0])
    t2 = torch.tensor([-3.0, -1.0, 0.2, 1.0])
    params = [{"weight": 1.0, "density": 0.75}, {"weight": 1.0, "density": 0.75}]
    out = group(base, [t1, t2], params, method="ties")
    # trim: t1 drops 0.1, t2 drops 0.2; signs: [-2 -> -, -3 -> -, 0 -> +, 4 -> +]
    # pos 0: sum 1-3 = -2 -> '-' keeps t2 only: -3;  pos 1: both negative: (-2-1)/2
    # pos 2: nothing left -> 0; pos 3: both positive: (3+1)/2
    torch.testing.assert_close(out, torch.tensor([-3.0, -1.5, 0.0, 2.0]))


def test_ties_negative_weight_flips_the_vote_and_normalize_divides_by_agreeing_weights():
    base = torch.zeros(2)
    t1, t2 = torch.tensor([1.0, 1.0]), torch.tensor([1.0, 1.0])
    params = [{"weight": 2.0, "density": 1.0}, {"weight": -1.0, "density": 1.0}]
    out = group(base, [t1, t2], params, method="ties")
    # weighted: +2, -1 -> sign +, only model 1 agrees: 2 / 2 = 1
    torch.testing.assert_close(out, torch.tensor([1.0, 1.0]))
    raw = group(base, [t1, t2], params, method="ties", normalize=False)
    torch.testing.assert_close(raw, torch.tensor([2.0, 2.0]))


def test_dare_keeps_with_probability_density_and_rescales_by_inverse_density():
    d = torch.ones(200_000)
    gen = torch.Generator().manual_seed(0)
    out = dare(d, 0.3, gen, rescale=True)
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.3) < 0.01
    torch.testing.assert_close(out[kept], torch.full_like(out[kept], 1 / 0.3))
    assert abs(out.mean().item() - 1.0) < 0.02  # unbiased: E[d~] = d


def test_bernoulli_mask_is_reproducible_for_a_seed():
    d = torch.ones(1000)
    m1 = bernoulli_mask(d, 0.5, torch.Generator().manual_seed(7))
    m2 = bernoulli_mask(d, 0.5, torch.Generator().manual_seed(7))
    m3 = bernoulli_mask(d, 0.5, torch.Generator().manual_seed(8))
    assert torch.equal(m1, m2) and not torch.equal(m1, m3)


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_with_density_one_equals_the_deterministic_method(method):
    base = torch.randn(50)
    tensors = [base + 0.01 * torch.randn(50) for _ in range(2)]
    params = [{"weight": 0.5, "density": 1.0}] * 2
    out = group(base, tensors, params, method=method)
    twin = "task_arithmetic" if method == "dare_linear" else "ties"
    ref = group(
        base, tensors, params if twin == "ties" else [{"weight": 0.5}] * 2, method=twin, normalize=False
    )
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("k", [1, 17, 300_000, 524_288, 1_048_575, 1_048_576])
def test_kth_largest_is_exact_on_large_tensors(k):
    from workers.merge.sparsify import kth_largest

    values = torch.randn(1 << 20).abs()
    values[:1000] = values[1000]  # ties
    assert kth_largest(values, k).item() == values.sort(descending=True).values[k - 1].item()


@pytest.mark.parametrize("n", [1000, 1 << 20])  # the direct selection, and the sample-bracketed one
def test_top_k_counts_the_tied_entries_it_drops(n):
    from workers.merge.sparsify import top_k

    values = torch.randn(n).abs()
    values[: n // 10] = values.median()  # a tenth of the entries tie at the threshold of k = n / 2
    top = top_k(values, n // 2)
    above = int((values > top.threshold).sum())
    tied = int((values == top.threshold).sum())
    assert top.threshold == values.median()
    assert top.dropped == tied - (n // 2 - above) > 0
