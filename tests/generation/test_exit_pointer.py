"""The exit pointer (workers/early_exit/pointer.py): its distribution, its posterior over mixture weights, the
engine serving exactly what the teacher-forced scoring measures, storage, and fitting."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from workers.early_exit.adapters import Affine, ExitAdapters, load_adapters
from workers.early_exit.fit import FitConfig, fit_exit_adapters
from workers.early_exit.pointer import (
    LAMBDAS,
    ExitPointer,
    PointerState,
    mixture_weights,
    pointer_keys,
    score_targets,
    score_window,
)
from workers.generation.compact import CompactLlama
from workers.generation.engine import EarlyExitEngine, GenerationRequest
from workers.generation.profiler import measure_quality

UNIFORM = tuple([1.0 / len(LAMBDAS)] * len(LAMBDAS))
NEVER = (1.0, *([0.0] * (len(LAMBDAS) - 1)))  # all prior mass on lambda = 0


def _adapters(hidden: int, pointer: ExitPointer | None, depths=(1, 2, 3)) -> ExitAdapters:
    generator = torch.Generator().manual_seed(3)
    maps = {
        k: Affine(
            torch.eye(hidden) + 0.2 * torch.randn(hidden, hidden, generator=generator) / hidden**0.5,
            0.1 * torch.randn(hidden, generator=generator),
            0.8,
            pointer,
        )
        for k in depths
    }
    return ExitAdapters(maps, 4, hidden)


def _repetitive(length: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    motif = torch.randint(4, 128, (7,), generator=generator).tolist()
    return (motif * (length // 7 + 1))[:length]


def test_posterior_moves_to_copying_where_copying_predicts_and_away_where_it_does_not():
    exit_probs = torch.full((40,), 0.01)
    _, copying = mixture_weights(exit_probs, torch.full((40,), 0.9), UNIFORM)
    _, nothing = mixture_weights(exit_probs, torch.zeros(40), UNIFORM)
    lambdas = torch.tensor(LAMBDAS, dtype=torch.float64)
    assert float(copying @ lambdas) > 0.55 and float(nothing @ lambdas) < 0.01
    mix, _ = mixture_weights(exit_probs, torch.full((40,), 0.9), UNIFORM)
    assert float(mix[0]) == 0.0  # nothing earlier to point at
    assert math.isclose(float(mix[1]), sum(LAMBDAS) / len(LAMBDAS))  # the first pointer prediction: the prior
    assert all(float(b) >= float(a) for a, b in zip(mix[1:], mix[2:], strict=False))


def test_scored_distribution_sums_to_one_and_a_zero_prior_weight_leaves_the_exit_as_it_was():
    generator = torch.Generator().manual_seed(0)
    keys = pointer_keys(torch.randn(30, 16, generator=generator))
    log_probs = torch.log_softmax(torch.randn(30, 50, generator=generator), -1)
    next_ids = torch.randint(0, 50, (30,), generator=generator)
    mixed = score_window(keys, log_probs, next_ids, ExitPointer(20.0, UNIFORM))
    torch.testing.assert_close(mixed.exp().sum(-1), torch.ones(30))
    assert (mixed - log_probs).abs().max() > 1e-3
    torch.testing.assert_close(score_window(keys, log_probs, next_ids, ExitPointer(20.0, NEVER)), log_probs)


@pytest.mark.parametrize("theta, vocab", [(20.0, 130), (30.0, 400)])
def test_scoring_the_next_tokens_alone_gives_what_the_full_mixture_gives(theta, vocab):
    """`score_targets` reads the mixture at the window's tokens and the exit's argmax only: the same
    next-token log-probabilities and the same most probable tokens as the (T, V) mixture."""
    generator = torch.Generator().manual_seed(2)
    logits = 3 * torch.randn(40, vocab, generator=generator)
    next_ids = torch.tensor(_repetitive(40, 7))  # copy-heavy: the pointer wins some argmaxes
    keys = pointer_keys(torch.randn(40, 16, generator=generator))
    pointer = ExitPointer(theta, UNIFORM)
    mixed = score_window(keys, torch.log_softmax(logits, -1), next_ids, pointer)
    target, top = score_targets(keys, logits, next_ids, pointer)
    torch.testing.assert_close(target, mixed.gather(1, next_ids[:, None])[:, 0], rtol=1e-5, atol=1e-5)
    assert torch.equal(top, mixed.argmax(-1))
    assert not torch.equal(top, logits.argmax(-1))  # the case that matters was exercised


def test_pointer_copies_what_followed_the_most_similar_earlier_state():
    keys = pointer_keys(torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 0], [0.99, 0.1, 0, 0]]))
    state = PointerState.from_prompt(
        ExitPointer(30.0, UNIFORM), keys, torch.tensor([5, 6, 7, 8]), torch.full((3,), 0.1)
    )
    mixed = state.mix(torch.zeros(10), keys[-1]).exp()  # a flat exit: only the pointer prefers a token
    assert int(mixed.argmax()) == 6  # the state most like the query (position 0) was followed by 6
    assert math.isclose(float(mixed.sum()), 1.0, rel_tol=1e-5)
    state.observe(9)
    assert state.values.tolist() == [6, 7, 8, 9] and state.keys.shape == (4, 4)


def test_the_exit_probabilities_the_posterior_skips_are_those_that_cancel():
    generator = torch.Generator().manual_seed(1)
    prompt = torch.tensor(_repetitive(60, 6))
    prompt[::5] = torch.randint(200, 300, (12,), generator=generator)  # tokens never seen before
    keys = pointer_keys(torch.randn(60, 16, generator=generator))
    pointer = ExitPointer(15.0, UNIFORM)
    needed = PointerState.evidence(pointer, keys, prompt)
    assert needed.numel() == 59 and 0 < int(needed.sum()) < 59
    seen = torch.rand(59, generator=generator)
    exact = PointerState.from_prompt(pointer, keys, prompt, seen).posterior
    skipped = PointerState.from_prompt(pointer, keys, prompt, torch.where(needed, seen, 0.5)).posterior
    torch.testing.assert_close(exact, skipped)
    with pytest.raises(ValueError):
        PointerState.from_prompt(pointer, keys, prompt, seen[:10])


def test_engine_greedy_tokens_are_what_the_teacher_forced_scoring_ranks_first(tiny_model, tokenizer):
    """Prompts of different lengths in one batch (left padding): each generated token is the argmax of the
    scoring `measure_quality` uses, over prompt + generated text as one window."""
    hidden = tiny_model.config.hidden_size
    adapters = _adapters(hidden, ExitPointer(20.0, UNIFORM))
    engine = EarlyExitEngine(tiny_model, tokenizer, device="cpu", adapters=adapters)
    prompts = [_repetitive(n, seed) for n, seed in ((30, 1), (17, 2), (41, 3))]
    depth = 2
    requests = [
        GenerationRequest(prompt_ids=p, depth=depth, max_new_tokens=10, ignore_eos=True) for p in prompts
    ]
    results = engine.run(requests)
    assert [r.batch_size for r in results] == [3, 3, 3]
    compact = engine.compact
    plain = EarlyExitEngine(tiny_model, tokenizer, device="cpu", adapters=adapters.without_pointers())
    differs = False
    for prompt, result in zip(prompts, results, strict=True):
        text = prompt + result.token_ids
        ids = torch.tensor([text])
        residual = compact.residuals(ids, [depth])[depth][0, :-1]
        log_probs = torch.log_softmax(compact.logits(residual, depth, True), -1)
        scored = score_window(pointer_keys(residual), log_probs, ids[0, 1:], adapters.pointer(depth))
        assert scored[len(prompt) - 1 :].argmax(-1).tolist() == result.token_ids
        request = GenerationRequest(prompt_ids=prompt, depth=depth, max_new_tokens=10, ignore_eos=True)
        differs |= plain.run([request])[0].token_ids != result.token_ids
    assert differs  # the pointer changed what was generated


def test_full_depth_is_untouched_and_quality_measures_the_exit_with_its_pointer(tiny_model, tokenizer):
    hidden = tiny_model.config.hidden_size
    with_pointer = _adapters(hidden, ExitPointer(20.0, UNIFORM))
    without = with_pointer.without_pointers()
    text = _repetitive(120, 4)
    ours = measure_quality(CompactLlama(tiny_model, "float32", with_pointer), text, [2, 4], 64)
    theirs = measure_quality(CompactLlama(tiny_model, "float32", without), text, [2, 4], 64)
    assert ours[4] == theirs[4]
    assert ours[2].perplexity == theirs[2].perplexity  # the plain exit has no pointer either
    assert ours[2].adapter_perplexity < 0.5 * theirs[2].adapter_perplexity  # it copies the repeated motif
    prompt = _repetitive(20, 5)
    request = GenerationRequest(prompt_ids=prompt, depth=4, max_new_tokens=6, ignore_eos=True)
    a = EarlyExitEngine(tiny_model, tokenizer, device="cpu", adapters=with_pointer).run([request])
    b = EarlyExitEngine(tiny_model, tokenizer, device="cpu").run([request])
    assert a[0].token_ids == b[0].token_ids


def test_adapter_file_keeps_the_pointer_and_refuses_a_bad_one(tiny_model, tmp_path):
    hidden = tiny_model.config.hidden_size
    adapters = _adapters(hidden, ExitPointer(15.0, UNIFORM), depths=(2,))
    adapters.save(tmp_path)
    loaded = load_adapters(tmp_path, 4, hidden)
    assert loaded is not None and loaded.pointer(2) == ExitPointer(15.0, UNIFORM)
    for theta, prior in ((float("nan"), UNIFORM), (0.0, UNIFORM), (1e9, UNIFORM), (10.0, (0.5,) * 7)):
        with pytest.raises(ValueError):
            ExitPointer(theta, prior)
    from safetensors.torch import load_file, save_file

    path = tmp_path / "exit_adapters.safetensors"
    tensors = load_file(path)
    tensors["exit.2.pointer"] = torch.tensor([float("inf"), *UNIFORM])
    save_file(tensors, str(path), metadata={"format": "strata-exit-adapters-v1"})
    with pytest.raises(ValueError):
        load_adapters(tmp_path, 4, hidden)


def test_fitting_chooses_a_pointer_that_lowers_the_loss_on_repetitive_text_and_can_be_turned_off(tiny_model):
    windows = [torch.tensor(_repetitive(64, seed)) for seed in range(6)]
    fitted = fit_exit_adapters(tiny_model, windows, [2], FitConfig(pointer_tokens=128))
    pointer = fitted.adapters.pointer(2)
    assert pointer is not None and fitted.ridge.pointer(2) == pointer
    before, after = fitted.report.pointer_nll[2]
    assert after < before - 0.5
    assert pointer.prior != NEVER
    off = fit_exit_adapters(tiny_model, windows, [2], FitConfig(pointer=False))
    assert off.adapters.pointer(2) is None and not off.report.pointer_nll
    assert replace(off.adapters.maps[2], pointer=pointer).pointer == pointer
