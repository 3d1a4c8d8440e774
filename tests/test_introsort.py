"""introsort.settle_first_k picks the same first k as torch's CPU argsort, ties and NaNs included."""

import pytest
import torch

from workers.merge.introsort import settle_first_k


def tie_heavy(n: int, levels: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    values = torch.randint(0, levels, (n,), generator=generator).float() / levels
    if seed % 3 == 0:
        values[torch.rand(n, generator=generator) < 0.05] = float("nan")
    if seed % 5 == 0:
        values[torch.rand(n, generator=generator) < 0.05] = float("inf")
    return values


@pytest.mark.parametrize("n", [1, 2, 16, 17, 33, 1000, 70_000, 300_000])
@pytest.mark.parametrize("levels", [2, 7, 1000])
def test_first_k_match_torch_argsort(n, levels):
    for seed in range(3):
        values = tie_heavy(n, levels, seed + 7 * n + levels)
        for k in {0, 1, n // 3, n // 2, n - 1, n}:
            settled = values.numpy().copy()
            ours = torch.from_numpy(settle_first_k(settled, k)).long()
            theirs = torch.argsort(values, descending=True)[:k]
            assert torch.equal(ours.sort().values, theirs.sort().values), (n, levels, seed, k)
            assert torch.allclose(torch.from_numpy(settled[:k]), values[ours], rtol=0, atol=0, equal_nan=True)


def test_heapsort_fallback_gives_the_real_sort(monkeypatch):
    from workers.merge import introsort

    monkeypatch.setattr(introsort, "_settle", lambda a, index, k: _shuffled(a, index))
    values = tie_heavy(5000, 3, 1)
    settled = values.numpy().copy()
    ours = torch.from_numpy(settle_first_k(settled, 2500)).long()
    assert torch.equal(ours, torch.argsort(values, descending=True)[:2500])
    assert torch.allclose(torch.from_numpy(settled[:2500]), values[ours], rtol=0, atol=0, equal_nan=True)


def _shuffled(a, index) -> bool:
    """What an abandoned introsort leaves: `a` permuted, `index` saying where each entry came from."""
    order = torch.randperm(a.size, generator=torch.Generator().manual_seed(0)).numpy()
    index[:] = order
    a[:] = a[order]
    return False
