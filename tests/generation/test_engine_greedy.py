"""The cached, batched engine decodes greedily exactly like the cache-free reference and like HF generate."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

from workers.generation.engine import FinishEvent, GenerationRequest, TokenEvent, left_pad
from workers.generation.reference import greedy_reference

NEW = 10


def greedy(prompt: list[int], depth: int, max_new_tokens: int = NEW) -> GenerationRequest:
    return GenerationRequest(prompt_ids=prompt, depth=depth, max_new_tokens=max_new_tokens, ignore_eos=True)


@pytest.mark.parametrize("depth", [1, 2, 3, 4])
def test_greedy_equals_cache_free_reference_at_every_depth(engine, tiny_model, prompts, depth):
    results = engine.run([greedy(prompt, depth) for prompt in prompts])
    for prompt, result in zip(prompts, results, strict=True):
        assert result.token_ids == greedy_reference(tiny_model, prompt, depth, NEW)
        assert result.finish_reason == "length" and len(result.token_ids) == NEW


def test_full_depth_equals_transformers_generate(engine, tiny_model, prompts):
    for prompt in prompts:
        ours = engine.run([greedy(prompt, 4, 12)])[0].token_ids
        theirs = tiny_model.generate(
            torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0
        )
        assert ours == theirs[0, len(prompt) :].tolist()


def test_batched_equals_alone(engine, prompts):
    batched = engine.run([greedy(prompt, 3) for prompt in prompts])
    assert {result.batch_size for result in batched} == {len(prompts)}
    for prompt, result in zip(prompts, batched, strict=True):
        alone = engine.run([greedy(prompt, 3)])[0]
        assert alone.batch_size == 1
        assert result.token_ids == alone.token_ids


def test_left_padded_logits_match_unpadded_to_float32_precision(engine, prompts):
    compact = engine.compact
    ids, mask, positions = left_pad(prompts, 0, torch.device("cpu"))
    batched = compact.forward(ids, positions, compact.new_cache(2, len(prompts), 16), 2, mask)
    for row, prompt in enumerate(prompts):
        one, _, one_positions = left_pad([prompt], 0, torch.device("cpu"))
        alone = compact.forward(one, one_positions, compact.new_cache(2, 1, 16), 2)
        torch.testing.assert_close(batched[row], alone[0], rtol=1e-5, atol=1e-5)


def test_mixed_depths_in_one_call_keep_separate_caches(engine, tiny_model, prompts):
    requests = [greedy(prompts[0], 2), greedy(prompts[1], 4), greedy(prompts[2], 2), greedy(prompts[3], 1)]
    results = engine.run(requests)
    assert [result.depth for result in results] == [2, 4, 2, 1]
    assert [result.batch_size for result in results] == [2, 1, 2, 1]
    for request, result in zip(requests, results, strict=True):
        assert result.token_ids == greedy_reference(tiny_model, request.prompt_ids, request.depth, NEW)


def test_rows_finishing_early_leave_the_batch_without_disturbing_the_rest(engine, tiny_model, prompts):
    requests = [
        greedy(prompt, 3, max_new_tokens)
        for prompt, max_new_tokens in zip(prompts, (2, 9, 1, 5), strict=True)
    ]
    for request, result in zip(requests, engine.run(requests), strict=True):
        assert result.token_ids == greedy_reference(tiny_model, request.prompt_ids, 3, request.max_new_tokens)


@contextmanager
def counting_layer_calls(engine) -> Iterator[list[int]]:
    """Count the forward passes of each decoder layer of the engine's compact model (one per step)."""
    calls = [0] * len(engine.compact.layers)
    originals = [layer.qkv for layer in engine.compact.layers]

    def counted(i: int, linear):
        def call(x):
            calls[i] += 1
            return linear(x)

        return call

    for i, layer in enumerate(engine.compact.layers):
        layer.qkv = counted(i, originals[i])
    compiled = engine.compact._stack, engine.compact._stack_made
    engine.compact._stack, engine.compact._stack_made = None, True  # the Python layers, whose calls count
    try:
        yield calls
    finally:
        for layer, original in zip(engine.compact.layers, originals, strict=True):
            layer.qkv = original
        engine.compact._stack, engine.compact._stack_made = compiled


def test_depth_k_runs_only_k_layers_and_never_touches_the_config(engine, tiny_model, prompts):
    before = tiny_model.config.to_dict()
    with counting_layer_calls(engine) as calls:
        engine.run([greedy(prompt, 2, 5) for prompt in prompts])
    assert calls == [5, 5, 0, 0]
    assert tiny_model.config.to_dict() == before


def test_events_stream_as_tokens_are_produced(engine, prompts):
    with counting_layer_calls(engine) as calls:
        events = engine.generate([greedy(prompts[0], 2, 4), greedy(prompts[1], 2, 4)])
        first = [next(events), next(events)]
        assert calls[0] == 1
        rest = list(events)
    assert all(isinstance(event, TokenEvent) for event in first)
    assert {event.index for event in first} == {0, 1}
    assert calls[0] == 4
    for index in (0, 1):
        own = [event for event in first + rest if event.index == index]
        assert [type(event) for event in own] == [TokenEvent] * 4 + [FinishEvent]
