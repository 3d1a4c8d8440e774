"""The profiler measures latency coefficients and per-exit quality of the tiny model."""

from __future__ import annotations

import math

import torch

from workers.eval.eval_text import EvalText
from workers.generation.engine import EarlyExitEngine
from workers.generation.profiler import (
    HELDOUT_PATH,
    ModelProfile,
    default_grid,
    measure_quality,
    profile_model,
)


def test_default_grid_is_every_two_layers_plus_full_depth():
    assert default_grid(30) == list(range(2, 31, 2))
    assert default_grid(5) == [2, 4, 5]


def test_heldout_text_is_shipped():
    text = HELDOUT_PATH.read_text(encoding="utf-8")
    assert 3000 <= len(text.encode()) <= 6500


def test_profile_of_the_tiny_model(engine):
    seen: list[float] = []
    profile = profile_model(
        engine,
        prompt_lengths=(4, 16, 32),
        decode_tokens=4,
        repeats=1,
        max_quality_tokens=1024,
        progress=lambda message, fraction: seen.append(fraction),
    )
    assert profile.grid == [2, 4] and profile.num_layers == 4
    assert sorted(profile.latency.depths) == [2, 4] and sorted(profile.quality) == [2, 4]
    assert profile.latency.predict(4, 32, 8) > 0
    assert profile.quality[4].top1_agreement == 1.0
    assert 0.0 <= profile.quality[2].top1_agreement < 1.0
    assert all(math.isfinite(q.perplexity) and q.perplexity > 1 for q in profile.quality.values())
    assert profile.quality[4].tokens == 1023
    assert seen == sorted(seen) and seen[-1] == 1.0
    assert profile.device.startswith("cpu") and profile.dtype == "float32"
    assert ModelProfile.model_validate_json(profile.model_dump_json()) == profile


def test_quality_matches_a_direct_perplexity(tiny_model):
    ids = torch.randint(4, 128, (40,), generator=torch.Generator().manual_seed(0)).tolist()
    quality = measure_quality(tiny_model, ids, [1, 4], window=16)
    with torch.no_grad():
        nll = 0.0
        for start in range(0, 39, 15):
            chunk = torch.tensor([ids[start : start + 16]])
            logits = tiny_model(chunk).logits[0, :-1]
            nll += torch.nn.functional.cross_entropy(logits, chunk[0, 1:], reduction="sum").item()
    assert quality[4].tokens == 39
    assert math.isclose(quality[4].perplexity, math.exp(nll / 39), rel_tol=1e-5)
    assert sorted(quality) == [1, 4]


def test_profile_of_an_int8_engine_shows_what_the_precision_costs(tiny_model, tokenizer):
    engine = EarlyExitEngine(tiny_model, tokenizer, device="cpu", precision="int8")
    profile = profile_model(
        engine, prompt_lengths=(4, 16), decode_tokens=4, repeats=1, max_quality_tokens=256
    )
    assert profile.precision == "int8"
    assert sorted(profile.quality_by_precision) == ["float32", "int8"]
    assert profile.quality_by_precision["int8"] == profile.quality
    full, quantised = profile.quality_by_precision["float32"][4], profile.quality[4]
    assert quantised.perplexity != full.perplexity
    assert abs(quantised.perplexity / full.perplexity - 1) < 0.1


def test_a_tokenizer_too_coarse_for_the_heldout_text_costs_the_quality_table_not_the_profile(engine):
    seen: list[str] = []
    profile = profile_model(
        engine,
        eval_texts=[EvalText("tiny", "x", "inline")],  # one token
        prompt_lengths=(4,),
        decode_tokens=2,
        repeats=1,
        progress=lambda message, fraction: seen.append(message),
    )
    assert sorted(profile.latency.depths) == [2, 4] and profile.latency.predict(4, 8, 4) > 0
    assert profile.quality == {} and profile.quality_by_precision == {}
    assert profile.quality_error == (
        "quality not measured: the model's tokenizer makes 1 token(s) of the held-out text, and at least 2 "
        "are needed"
    )
    assert seen[-1].endswith(profile.quality_error)
    assert ModelProfile.model_validate_json(profile.model_dump_json()) == profile
