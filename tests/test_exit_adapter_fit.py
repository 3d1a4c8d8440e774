"""Exit adapters: the closed-form streamed ridge fit, distillation, and full depth left untouched."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.tiny_models import make_tiny_llama
from workers.early_exit.adapters import FILENAME, Affine, ExitAdapters, load_adapters
from workers.early_exit.fit import (
    FitConfig,
    RidgeAccumulator,
    fit_exit_adapters,
    fit_scale,
    learning_rate_factor,
    token_windows,
)
from workers.early_exit.forward import exit_logits, residual_at_exits
from workers.generation.profiler import measure_quality


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("fit") / "tiny", seed=3)


def random_windows(count: int, length: int, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 128, (length,), generator=generator) for _ in range(count)]


def test_streamed_ridge_recovers_a_known_affine_map_exactly_without_penalty():
    generator = torch.Generator().manual_seed(0)
    d = 16
    weight = torch.randn(d, d, generator=generator, dtype=torch.float64)
    bias = torch.randn(d, generator=generator, dtype=torch.float64)
    accumulator = RidgeAccumulator(d)
    for _ in range(5):  # streamed in chunks: only the Gram matrices are kept
        x = 3 * torch.randn(200, d, generator=generator, dtype=torch.float64) + 1
        accumulator.add(x, x @ weight.T + bias)
    fitted, mse = accumulator.solve(ridge=0.0)
    torch.testing.assert_close(fitted.weight.double(), weight, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(fitted.bias.double(), bias, atol=1e-4, rtol=1e-4)
    assert accumulator.tokens == 1000 and mse < 1e-8


def test_a_token_weighted_w_counts_as_w_copies_of_it():
    generator = torch.Generator().manual_seed(2)
    d = 6
    x, y = torch.randn(40, d, generator=generator), torch.randn(40, d, generator=generator)
    weighted, copied = RidgeAccumulator(d), RidgeAccumulator(d)
    weighted.add(x, y, torch.tensor([3.0] * 10 + [1.0] * 30))
    copied.add(torch.cat([x[:10]] * 3 + [x[10:]]), torch.cat([y[:10]] * 3 + [y[10:]]))
    for ridge in (0.0, 0.1):
        (a, mse_a), (b, mse_b) = weighted.solve(ridge), copied.solve(ridge)
        torch.testing.assert_close(a.weight, b.weight)
        torch.testing.assert_close(a.bias, b.bias)
        assert mse_a * 40 == pytest.approx(mse_b * 60)  # the same squared error over 40 pairs, not 60
    assert weighted.identity_mse() * 40 == pytest.approx(copied.identity_mse() * 60)
    with pytest.raises(ValueError, match="one weight per token pair"):
        weighted.add(x, y, torch.ones(3))


def test_window_weights_must_be_positive_and_one_per_window(tiny):
    windows = random_windows(2, 16)
    for bad in ([1.0], [1.0, 0.0], [1.0, float("nan")]):
        with pytest.raises(ValueError, match="one finite value > 0 per window"):
            fit_exit_adapters(tiny, windows, [1], FitConfig(fit_scale=False), weights=bad)


def test_ridge_shrinks_towards_the_identity_not_towards_zero():
    generator = torch.Generator().manual_seed(1)
    d = 8
    x = torch.randn(500, d, generator=generator)
    y = x @ (2 * torch.eye(d)).T + 0.5
    accumulator = RidgeAccumulator(d)
    accumulator.add(x, y)
    heavy, _ = accumulator.solve(ridge=1e6)
    torch.testing.assert_close(heavy.weight, torch.eye(d), atol=1e-3, rtol=0)
    assert heavy.bias.mean().item() == pytest.approx(float((y - x).mean()), abs=0.05)
    light, _ = accumulator.solve(ridge=1e-8)
    torch.testing.assert_close(light.weight, 2 * torch.eye(d), atol=1e-3, rtol=0)


def test_model_fit_equals_a_dense_least_squares_on_the_collected_hidden_states(tiny):
    windows = random_windows(6, 24)
    config = FitConfig(ridge=0.0, batch_windows=4, skip_first=1)
    result = fit_exit_adapters(tiny, windows, [1, 2], config)
    assert result.report.tokens == 6 * 23 and result.adapters.depths == [1, 2]
    with torch.no_grad():
        states = residual_at_exits(tiny, torch.stack(windows), [2, 4])
    x = states[2][:, 1:].reshape(-1, 64).double()
    y = states[4][:, 1:].reshape(-1, 64).double()
    z = torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], dim=1)
    dense = torch.linalg.lstsq(z, y).solution
    torch.testing.assert_close(result.adapters.maps[2].weight.double(), dense[:64].T, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(result.adapters.maps[2].bias.double(), dense[64], atol=2e-3, rtol=2e-3)
    assert result.report.ridge_mse[2] < result.report.identity_mse[2]


def test_distillation_lowers_the_kl_to_full_depth_and_leaves_other_exits_at_the_ridge_fit(tiny):
    windows = random_windows(8, 32, seed=4)
    config = FitConfig(ridge=1e-2, distill_steps=40, lr=3e-3, distill_batch_tokens=64, distill_exits=(1,))
    result = fit_exit_adapters(tiny, windows, [1, 2], config)
    first, last = result.report.distill_kl[1]
    assert last < first
    assert 2 not in result.report.distill_kl
    assert torch.equal(result.adapters.maps[2].weight, result.ridge.maps[2].weight)
    assert not torch.equal(result.adapters.maps[1].weight, result.ridge.maps[1].weight)
    assert all(p.requires_grad for p in tiny.parameters())  # the model is handed back as it came


def test_an_exit_distilled_with_others_ends_where_it_would_alone(tiny):
    windows = random_windows(8, 32, seed=4)
    config = FitConfig(ridge=1e-2, distill_steps=12, lr=3e-3, distill_batch_tokens=64, distill_exits=(1,))
    alone = fit_exit_adapters(tiny, windows, [1, 2, 3], config)
    together = fit_exit_adapters(tiny, windows, [1, 2, 3], replace(config, distill_exits=(1, 3)))
    assert sorted(together.report.distill_kl) == [1, 3]
    assert torch.equal(alone.adapters.maps[1].weight, together.adapters.maps[1].weight)
    assert alone.adapters.maps[1].scale == together.adapters.maps[1].scale


def test_the_distillation_learning_rate_warms_up_then_decays_along_a_cosine():
    factors = [learning_rate_factor(step, 100) for step in range(100)]
    assert factors[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert factors[5] == 1.0 and all(a > b for a, b in zip(factors[5:], factors[6:], strict=False))
    assert 0 < factors[-1] < 1e-3 and factors[52] == pytest.approx(0.5, abs=0.02)
    assert learning_rate_factor(0, 1) == 1.0


def test_full_depth_is_bit_identical_with_adapters_present(tiny, tmp_path):
    result = fit_exit_adapters(tiny, random_windows(4, 16), [1, 2, 3], FitConfig())
    result.adapters.save(tmp_path)
    adapters = load_adapters(tmp_path, 4, 64)
    ids = torch.randint(3, 128, (2, 10))
    with torch.no_grad():
        assert torch.equal(exit_logits(tiny, ids, 4, adapters=adapters), exit_logits(tiny, ids, 4))
        assert not torch.equal(exit_logits(tiny, ids, 2, adapters=adapters), exit_logits(tiny, ids, 2))
    with pytest.raises(ValueError):
        ExitAdapters({4: Affine(torch.eye(64), torch.zeros(64))}, 4, 64)


def test_profile_quality_reports_each_exit_with_and_without_its_adapter(tiny):
    windows = random_windows(8, 32, seed=5)
    adapters = fit_exit_adapters(tiny, windows, [1, 2, 3], FitConfig()).adapters
    text = torch.cat(random_windows(2, 40, seed=6)).tolist()
    quality = measure_quality(tiny, text, [2, 3, 4], window=32, adapters=adapters.subset([2]))
    assert quality[2].adapter_perplexity is not None and quality[2].adapter_top1_agreement is not None
    assert quality[3].adapter_perplexity is None  # no adapter there
    assert quality[4].adapter_perplexity is None and quality[4].top1_agreement == 1.0
    plain = measure_quality(tiny, text, [2, 4], window=32)
    assert plain[2].perplexity == pytest.approx(quality[2].perplexity)


def test_token_windows_are_full_length_and_bounded_by_max_tokens():
    windows = token_windows(list(range(1000)), 64, max_tokens=300)
    assert [w.numel() for w in windows] == [64] * 4 and windows[1][0].item() == 64
    assert [w.numel() for w in token_windows([5, 6, 7], 64)] == [3]
    with pytest.raises(ValueError):
        token_windows([5], 64)


def test_masks_restrict_the_fit_to_the_marked_positions(tiny):
    windows = random_windows(4, 24, seed=7)
    masks = [torch.arange(24) % 3 == 0 for _ in windows]  # 0, 3, 6, ...; position 0 is skipped anyway
    result = fit_exit_adapters(tiny, windows, [2], FitConfig(ridge=0.0), masks=masks)
    assert result.report.tokens == 4 * 7
    with torch.no_grad():
        states = residual_at_exits(tiny, torch.stack(windows), [2, 4])
    keep = torch.stack(masks)
    keep[:, 0] = False
    x, y = states[2][keep].double(), states[4][keep].double()
    z = torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], dim=1)
    dense = torch.linalg.lstsq(z, y).solution  # 28 tokens < 65 unknowns: least-norm solutions differ, so
    residual = z @ dense - y  # compare the fit residuals (both interpolate the 28 marked tokens)
    fitted = x @ result.adapters.maps[2].weight.double().T + result.adapters.maps[2].bias.double()
    assert float(residual.abs().max()) < 1e-6 and float((fitted - y).abs().max()) < 1e-3


def test_fit_scale_recovers_a_known_inverse_temperature():
    generator = torch.Generator().manual_seed(8)
    student = 4 * torch.randn(300, 50, generator=generator)
    for true_scale in (0.3, 1.0, 2.5):
        teacher = torch.log_softmax(true_scale * student, dim=-1)
        scale, before, after = fit_scale(student, teacher, chunk=64)
        assert scale == pytest.approx(true_scale, rel=1e-4)
        assert after == pytest.approx(0.0, abs=1e-6) and after <= before


def test_the_scale_multiplies_an_exits_logits_and_keeps_every_argmax(tiny):
    generator = torch.Generator().manual_seed(9)
    weight, bias = torch.eye(64) + 0.1 * torch.randn(64, 64, generator=generator), torch.zeros(64)
    ids = torch.randint(3, 128, (2, 12), generator=generator)
    with torch.no_grad():
        one = exit_logits(tiny, ids, 2, adapters=ExitAdapters({2: Affine(weight, bias)}, 4, 64))
        cooled = exit_logits(tiny, ids, 2, adapters=ExitAdapters({2: Affine(weight, bias, 0.4)}, 4, 64))
    torch.testing.assert_close(cooled, 0.4 * one)
    assert torch.equal(cooled.argmax(-1), one.argmax(-1))


def test_fitted_scales_lower_the_kl_to_full_depth_on_the_fitting_tokens(tiny):
    windows = random_windows(8, 32, seed=10)
    config = FitConfig(ridge=1e-2, distill_steps=10, lr=3e-3, distill_batch_tokens=64, distill_exits=(1,))
    result = fit_exit_adapters(tiny, windows, [1, 2], config)
    for k in (1, 2):
        before, after = result.report.scale_kl[k]
        assert after <= before + 1e-9 and result.adapters.maps[k].scale == result.report.scale[k]
    assert result.ridge.maps[2].scale == result.adapters.maps[2].scale  # not distilled: one fit
    unscaled = fit_exit_adapters(tiny, windows, [1, 2], FitConfig(ridge=1e-2, fit_scale=False))
    assert {a.scale for a in unscaled.adapters.maps.values()} == {1.0} and not unscaled.report.scale
    assert torch.equal(unscaled.adapters.maps[2].weight, result.adapters.maps[2].weight)


def test_the_adapter_file_keeps_each_scale_and_reads_files_without_one_as_one(tmp_path):
    maps = {1: Affine(torch.eye(8), torch.zeros(8), 0.75), 2: Affine(2 * torch.eye(8), torch.ones(8))}
    ExitAdapters(maps, 3, 8).save(tmp_path)
    loaded = load_adapters(tmp_path, 3, 8)
    assert loaded is not None and [loaded.maps[k].scale for k in (1, 2)] == [0.75, 1.0]
    path = tmp_path / FILENAME
    tensors = load_file(path)
    metadata = {"format": "strata-exit-adapters-v1", "num_layers": "3", "hidden_size": "8"}
    save_file({k: v for k, v in tensors.items() if not k.endswith(".scale")}, path, metadata=metadata)
    older = load_adapters(tmp_path, 3, 8)
    assert older is not None and {a.scale for a in older.maps.values()} == {1.0}
    for bad in (float("nan"), 0.0, -1.0, 1e6):
        save_file(tensors | {"exit.1.scale": torch.tensor([bad])}, path, metadata=metadata)
        with pytest.raises(ValueError, match="scale"):
            load_adapters(tmp_path, 3, 8)
