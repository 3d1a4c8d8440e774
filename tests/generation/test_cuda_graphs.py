"""The fixed-size decode step captured in CUDA graphs: exact on the CPU against the eager step, and on CUDA
(when the machine has a GPU) the graphed engine gives the eager engine's tokens with batching and adapters."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.generation.test_compact_engine import greedy, random_adapters
from workers.generation.engine import EarlyExitEngine, left_pad
from workers.generation.reference import greedy_reference

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("padded", [False, True])
def test_static_step_equals_the_eager_decode_step(tiny_model, tokenizer, prompts, padded):
    adapters = random_adapters(tiny_model.config.hidden_size, 4, [2])
    compact = EarlyExitEngine(tiny_model, tokenizer, device="cpu", adapters=adapters).compact
    rows = [prompts[0], prompts[1]] if padded else [prompts[1], prompts[1][::-1]]
    for depth in (2, 4):
        ids, mask, positions = left_pad(rows, 0, torch.device("cpu"))
        eager, static = compact.new_cache(depth, 2, 32), compact.new_cache(depth, 2, 32)
        pad = mask if padded else None
        for cache in (eager, static):
            compact.forward(ids, positions, cache, depth, pad)
        new = torch.tensor([[5], [9]])
        step_positions = positions[:, -1:] + 1
        step_mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], dim=1)
        expected = compact.forward(new, step_positions, eager, depth, step_mask if padded else None)
        valid = torch.zeros(2, 1, 1, 32, dtype=torch.bool)
        valid[:, 0, 0, : step_mask.shape[1]] = step_mask.bool()
        column = torch.tensor([static.length])
        got = compact.static_step(new, step_positions, column, valid, static, depth, True)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        filled = step_mask.shape[1]
        torch.testing.assert_close(static.keys[:, :, :, :filled], eager.keys[:, :, :, :filled])


def test_models_with_sliding_window_layers_are_not_graphable(tiny_model, tokenizer):
    compact = EarlyExitEngine(tiny_model, tokenizer, device="cpu").compact
    assert compact.graphable
    compact.window, compact.sliding = 4, [True] * compact.num_layers
    assert not compact.graphable


def test_engine_on_cpu_runs_without_graphs(engine):
    assert engine.graphs is None


@cuda
def test_graphed_engine_gives_the_eager_engines_tokens_with_batching_and_adapters(
    tiny_model, tokenizer, prompts
):
    adapters = random_adapters(tiny_model.config.hidden_size, 4, [2])
    model = copy.deepcopy(tiny_model)  # the engine moves its model to the GPU
    graphed = EarlyExitEngine(model, tokenizer, device="cuda", adapters=adapters)
    eager = EarlyExitEngine(model, tokenizer, device="cuda", adapters=adapters, cuda_graphs=False)
    assert graphed.graphs is not None and eager.graphs is None
    requests = [
        greedy(prompts[0], 2, new=6),
        greedy(prompts[1], 2, new=12),  # rows leave the batch at different steps
        greedy(prompts[2], 4),
        greedy(prompts[3], 2, exit_adapter=False),
    ]
    for _ in range(2):  # the second run replays the graphs captured by the first
        ours = [r.token_ids for r in graphed.run(requests)]
        theirs = [r.token_ids for r in eager.run(requests)]
        assert ours == theirs
    assert graphed.graphs.captures > 0


@cuda
def test_graphed_engine_at_float32_equals_the_uncached_reference(tiny_model, tokenizer, prompts):
    model = copy.deepcopy(tiny_model)
    engine = EarlyExitEngine(model, tokenizer, device="cuda")
    for depth in (1, 3, 4):
        got = engine.run([greedy(prompts[3], depth)])[0].token_ids
        assert got == greedy_reference(model, prompts[3], depth, 8)


@cuda
def test_batches_at_one_depth_in_turn_each_replay_their_own_graphs(tiny_model, tokenizer, prompts):
    model = copy.deepcopy(tiny_model)
    graphed = EarlyExitEngine(model, tokenizer, device="cuda", max_batch_size=2)
    eager = EarlyExitEngine(model, tokenizer, device="cuda", max_batch_size=2, cuda_graphs=False)
    requests = [greedy(prompt, 3, new=10) for prompt in prompts]  # two batches of two, stepped in turn
    assert [r.token_ids for r in graphed.run(requests)] == [r.token_ids for r in eager.run(requests)]
    captured = graphed.graphs.captures
    graphed.run(requests)
    assert graphed.graphs.captures - captured <= 2  # the kept cache's graphs are replayed, not recaptured
