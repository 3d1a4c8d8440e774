"""The cached, batched engine decodes greedily exactly like the cache-free reference and like HF generate."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from workers.generation.engine import FinishEvent, GenerationRequest, TokenEvent, exit_step, left_pad
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


def test_left_padded_logits_match_unpadded_to_float32_precision(tiny_model, prompts):
    ids, mask, positions = left_pad(prompts, 0, torch.device("cpu"))
    with torch.no_grad():
        batched = exit_step(tiny_model, ids, mask, positions, DynamicCache(), 2)
        for row, prompt in enumerate(prompts):
            one, one_mask, one_positions = left_pad([prompt], 0, torch.device("cpu"))
            alone = exit_step(tiny_model, one, one_mask, one_positions, DynamicCache(), 2)
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


def test_depth_k_runs_only_k_layers_and_never_touches_the_config(engine, tiny_model, prompts):
    calls = [0] * 4
    hooks = [
        layer.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
        for i, layer in enumerate(tiny_model.model.layers)
    ]
    before = tiny_model.config.to_dict()
    try:
        engine.run([greedy(prompt, 2, 5) for prompt in prompts])
    finally:
        for hook in hooks:
            hook.remove()
    assert calls == [5, 5, 0, 0]
    assert tiny_model.config.to_dict() == before


def test_events_stream_as_tokens_are_produced(engine, tiny_model, prompts):
    calls = []
    hook = tiny_model.model.layers[0].register_forward_hook(lambda *_: calls.append(1))
    try:
        events = engine.generate([greedy(prompts[0], 2, 4), greedy(prompts[1], 2, 4)])
        first = [next(events), next(events)]
        assert len(calls) == 1
        rest = list(events)
    finally:
        hook.remove()
    assert all(isinstance(event, TokenEvent) for event in first)
    assert {event.index for event in first} == {0, 1}
    assert len(calls) == 4
    for index in (0, 1):
        own = [event for event in first + rest if event.index == index]
        assert [type(event) for event in own] == [TokenEvent] * 4 + [FinishEvent]
