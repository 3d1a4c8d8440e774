"""Sampling seeds, stop strings, EOS, length limits and request validation in the engine."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from workers.generation.engine import (
    EarlyExitEngine,
    FinishEvent,
    GenerationRequest,
    TokenEvent,
    default_eos_ids,
)


def request(prompt, **overrides) -> GenerationRequest:
    values = dict(prompt_ids=prompt, depth=3, max_new_tokens=16, ignore_eos=True)
    values.update(overrides)
    return GenerationRequest(**values)


def streamed_text(engine, requests) -> dict[int, str]:
    """Concatenation of every delta streamed for each request index."""
    text: dict[int, str] = {}
    for event in engine.generate(requests):
        if isinstance(event, TokenEvent | FinishEvent):
            text[event.index] = text.get(event.index, "") + event.delta
    return text


def test_seeded_sampling_is_reproducible_alone_or_batched(engine, prompts):
    sampled = request(prompts[1], temperature=1.0, top_p=0.95, top_k=50, seed=1234)
    alone = engine.run([sampled])[0]
    again = engine.run([sampled])[0]
    others = [request(prompt, temperature=0.7, seed=index) for index, prompt in enumerate(prompts)]
    batched = engine.run([*others, sampled])[-1]
    assert batched.batch_size == len(prompts) + 1
    assert alone.token_ids == again.token_ids == batched.token_ids
    assert alone.seed == 1234


def test_different_seeds_give_different_samples(engine, prompts):
    outputs = {
        tuple(engine.run([request(prompts[0], temperature=1.5, seed=seed)])[0].token_ids) for seed in range(4)
    }
    assert len(outputs) > 1


def test_unseeded_sampling_reports_the_seed_it_drew(engine, prompts):
    first = engine.run([request(prompts[0], temperature=1.0)])[0]
    replay = engine.run([request(prompts[0], temperature=1.0, seed=first.seed)])[0]
    assert first.seed is not None and replay.token_ids == first.token_ids


def test_stop_string_truncates_output_and_is_never_streamed(engine, prompts):
    full = engine.run([request(prompts[2], max_new_tokens=24)])[0]
    stop = full.text[6:8]
    cut = full.text.find(stop)
    stopped = engine.run([request(prompts[2], max_new_tokens=24, stop=["never-produced", stop])])[0]
    assert stopped.finish_reason == "stop"
    assert stopped.text == full.text[:cut]
    assert len(stopped.token_ids) < len(full.token_ids)
    assert streamed_text(engine, [request(prompts[2], max_new_tokens=24, stop=[stop])]) == {
        0: full.text[:cut]
    }


def test_streamed_deltas_add_up_to_the_text(engine, prompts):
    requests = [request(prompt, max_new_tokens=12, stop=["zzz"]) for prompt in prompts]
    results = engine.run(requests)
    assert streamed_text(engine, requests) == {i: result.text for i, result in enumerate(results)}
    assert all(result.text == engine.tokenizer.decode(result.token_ids) for result in results)


def test_max_new_tokens_is_respected(engine, prompts):
    results = engine.run(
        [request(prompt, max_new_tokens=n) for prompt, n in zip(prompts, (1, 2, 7, 3), strict=True)]
    )
    assert [len(result.token_ids) for result in results] == [1, 2, 7, 3]
    assert {result.finish_reason for result in results} == {"length"}


def test_eos_stops_generation_and_is_not_returned(tiny_model, tokenizer, engine, prompts):
    tokens = engine.run([request(prompts[3], max_new_tokens=12)])[0].token_ids
    eos = tokens[4]
    with_eos = EarlyExitEngine(tiny_model, tokenizer, device="cpu", eos_token_ids=[eos])
    result = with_eos.run([request(prompts[3], max_new_tokens=12, ignore_eos=False)])[0]
    assert result.finish_reason == "eos"
    assert result.token_ids == tokens[: tokens.index(eos)]
    ignored = with_eos.run([request(prompts[3], max_new_tokens=12)])[0]
    assert ignored.token_ids == tokens


def test_default_eos_comes_from_model_and_tokenizer(tiny_model, tokenizer):
    assert default_eos_ids(tiny_model, tokenizer) == {2}


@pytest.mark.parametrize(
    "overrides",
    [dict(depth=5), dict(prompt_ids=[4, 200]), dict(max_new_tokens=300)],
)
def test_invalid_requests_are_rejected_before_any_work(engine, prompts, overrides):
    with pytest.raises(ValueError):
        list(engine.generate([request(prompts[0]), request(prompts[0], **overrides)]))


@pytest.mark.parametrize("overrides", [dict(prompt_ids=[]), dict(temperature=-1.0), dict(top_p=0.0)])
def test_malformed_requests_fail_validation(overrides):
    with pytest.raises(ValidationError):
        request([4, 5], **overrides)
