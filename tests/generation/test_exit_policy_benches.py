"""The two exit-policy benches compute what they claim: the confidence policy reduces to full depth or to a
fixed exit at its extreme thresholds, and an exit through the model's last layers with an identity map is
full depth."""

from __future__ import annotations

import math

import torch

from bench.confidence_exits import run_policy
from bench.tail_exits import Layers, ratios
from workers.early_exit.adapters import Affine, ExitAdapters
from workers.generation.compact import CompactLlama
from workers.generation.profiler import measure_quality


def _adapters(hidden: int, layers: int, exits: list[int]) -> ExitAdapters:
    generator = torch.Generator().manual_seed(3)
    maps = {
        k: Affine(
            torch.eye(hidden) + 0.05 * torch.randn(hidden, hidden, generator=generator),
            0.01 * torch.randn(hidden, generator=generator),
            1.3,
        )
        for k in exits
    }
    return ExitAdapters(maps, layers, hidden)


def _text() -> list[int]:
    return torch.randint(4, 128, (100,), generator=torch.Generator().manual_seed(5)).tolist()


def test_confidence_policy_never_confident_is_full_depth(tiny_model):
    adapters = _adapters(tiny_model.config.hidden_size, 4, [1, 2])
    compact = CompactLlama(tiny_model, "float32", adapters)
    ids = _text()
    run = run_policy(compact, ids, [1, 2], threshold=2.0, propagate=True)
    full = measure_quality(compact, ids, [4], 256)[4]
    assert run.tokens == full.tokens and run.stops == {1: 0, 2: 0, 4: run.tokens}
    assert math.isclose(math.exp(run.nll / run.tokens), full.perplexity, rel_tol=1e-5)
    assert run.checks == 2 * run.tokens and run.filled == 0


def test_confidence_policy_always_confident_is_the_first_exit(tiny_model):
    adapters = _adapters(tiny_model.config.hidden_size, 4, [1, 2])
    compact = CompactLlama(tiny_model, "float32", adapters)
    ids = _text()
    fixed = measure_quality(compact, ids, [1, 4], 256)[1]
    for propagate in (True, False):  # layer 1 never reads the skipped layers' keys and values
        run = run_policy(compact, ids, [1, 2], threshold=-1.0, propagate=propagate)
        assert run.stops[1] == run.tokens and run.checks == run.tokens
        assert math.isclose(math.exp(run.nll / run.tokens), fixed.adapter_perplexity, rel_tol=1e-5)
        assert run.filled == (3 * run.tokens if propagate else 0)


def test_confidence_policy_propagation_changes_what_deeper_tokens_read(tiny_model):
    adapters = _adapters(tiny_model.config.hidden_size, 4, [1, 2])
    compact = CompactLlama(tiny_model, "float32", adapters)
    ids = _text()
    # the median margin at exit 1 stops about half the tokens there and sends the rest deeper
    logits = compact.logits(compact.residuals(torch.tensor([ids]), [1])[1][0], 1)
    threshold = float(torch.softmax(logits, -1).topk(2).values.diff().neg().median())
    propagated = run_policy(compact, ids, [1, 2], threshold=threshold, propagate=True)
    exact = run_policy(compact, ids, [1, 2], threshold=threshold, propagate=False)
    assert 0 < propagated.stops[1] < propagated.tokens and propagated.stops[4] > 0
    assert propagated.filled > 0 and exact.filled == 0
    assert propagated.nll != exact.nll  # deeper tokens read keys and values made from h_1


def test_an_exit_through_the_last_layers_with_an_identity_map_is_full_depth(tiny_model):
    layers = Layers(tiny_model)
    hidden = tiny_model.config.hidden_size
    identity = Affine(torch.eye(hidden), torch.zeros(hidden))
    maps = {(4, 4): identity, (2, 2): identity}
    table, full, count = ratios(layers, _text(), maps, budgets=[4], tails=[0, 2])
    assert count == 99 and math.isfinite(full)
    assert math.isclose(table[(4, 0)], table[(4, 2)], rel_tol=1e-5)
