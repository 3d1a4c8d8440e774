"""Token choice (greedy, top-k, top-p, seeded draws) and stop-string-aware incremental text."""

from __future__ import annotations

import math

import torch

from tests.generation.conftest import character_tokenizer
from workers.generation.sampling import filtered_distribution, sample_token, seeded_generator
from workers.generation.streaming import TextStream, earliest_stop, unsafe_tail


def test_greedy_and_degenerate_filters_pick_the_argmax():
    logits = torch.tensor([0.1, 2.0, 1.9, -3.0])
    generator = seeded_generator(0)
    assert sample_token(logits, 0.0, 0, 1.0, None) == 1
    assert {sample_token(logits, 1.0, 1, 1.0, generator) for _ in range(20)} == {1}
    assert {sample_token(logits, 1.0, 0, 1e-6, generator) for _ in range(20)} == {1}


def test_top_k_and_top_p_keep_the_expected_tokens():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    probs, ids = filtered_distribution(logits, 1.0, 2, 1.0)
    assert ids.tolist() == [0, 1] and torch.allclose(probs, torch.tensor([0.625, 0.375]))
    _, ids = filtered_distribution(logits, 1.0, 0, 0.8)
    assert ids.tolist() == [0, 1]
    _, ids = filtered_distribution(logits, 1.0, 0, 0.81)
    assert ids.tolist() == [0, 1, 2]


def test_draws_follow_the_distribution():
    probs = torch.tensor([0.5, 0.3, 0.2])
    generator = seeded_generator(3)
    draws = [sample_token(torch.log(probs), 1.0, 0, 1.0, generator) for _ in range(4000)]
    frequencies = torch.bincount(torch.tensor(draws), minlength=3).float() / len(draws)
    assert torch.allclose(frequencies, probs, atol=0.03)


def test_temperature_sharpens():
    logits = torch.tensor([1.0, 0.0])
    cold, _ = filtered_distribution(logits, 0.5, 0, 1.0)
    assert math.isclose(cold[0].item(), 1 / (1 + math.exp(-2)), rel_tol=1e-6)


def test_stop_helpers():
    assert earliest_stop("abcabc", ["ca", "b"]) == 1
    assert earliest_stop("abc", ["x", ""]) is None
    assert unsafe_tail("hello wo", ["world", "xyz"]) == 2
    assert unsafe_tail("hello", ["world"]) == 0
    assert unsafe_tail("ab\ufffd", []) == 1


def test_text_stream_holds_back_a_possible_stop_prefix():
    tokenizer = character_tokenizer()
    stream = TextStream(tokenizer, ["END"])
    deltas = [stream.push(tokenizer.convert_tokens_to_ids(c)) for c in "okE"]
    assert deltas == [("o", False), ("k", False), ("", False)]
    assert stream.push(tokenizer.convert_tokens_to_ids("x")) == ("Ex", False)
    deltas = [stream.push(tokenizer.convert_tokens_to_ids(c)) for c in "EN"]
    assert deltas == [("", False), ("", False)]
    assert stream.push(tokenizer.convert_tokens_to_ids("D")) == ("", True)
    assert stream.text == "okEx" and stream.finish() == ""


def test_text_stream_releases_held_text_at_the_end():
    tokenizer = character_tokenizer()
    stream = TextStream(tokenizer, ["END"])
    assert [stream.push(tokenizer.convert_tokens_to_ids(c)) for c in "aE"] == [("a", False), ("", False)]
    assert stream.finish() == "E" and stream.text == "aE"
