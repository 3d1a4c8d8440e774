"""Fixtures for the generation tests: one tiny random LLaMA and a character-level tokenizer over its vocab."""

from __future__ import annotations

import pytest
import torch

from tests.tiny_models import character_tokenizer, make_tiny_llama
from workers.generation.engine import EarlyExitEngine


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("generation") / "tiny")


@pytest.fixture(scope="session")
def tokenizer():
    return character_tokenizer()


@pytest.fixture(scope="session")
def engine(tiny_model, tokenizer):
    return EarlyExitEngine(tiny_model, tokenizer, device="cpu")


@pytest.fixture(scope="session")
def prompts() -> list[list[int]]:
    """Prompts of different lengths (3..12 tokens), avoiding the special ids 0-3."""
    generator = torch.Generator().manual_seed(7)
    return [torch.randint(4, 128, (length,), generator=generator).tolist() for length in (3, 9, 5, 12)]
