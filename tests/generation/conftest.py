"""Fixtures for the generation tests: one tiny random LLaMA and a character-level tokenizer over its vocab."""

from __future__ import annotations

import string

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from tests.tiny_models import make_tiny_llama
from workers.generation.engine import EarlyExitEngine

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
CHARACTERS = list(string.ascii_lowercase + string.ascii_uppercase + string.digits + " .,;:!?'-\n")
PIECES = [
    " the",
    " and",
    "ing",
    " of",
    " to",
    "er",
    "ed",
    " a",
    " in",
    "ou",
    "th",
    "st",
    "ll",
    "ee",
    "oo",
    "an",
]


def character_vocab(size: int = 128) -> dict[str, int]:
    """Specials (pad 0, bos 1, eos 2, unk 3), single characters, then multi-character pieces up to `size`."""
    tokens = list(
        dict.fromkeys(SPECIALS + CHARACTERS + PIECES + [a + b for a in "aeiouy" for b in "rstnlmd"])
    )
    tokens = tokens[:size]
    assert len(tokens) == size
    return {token: index for index, token in enumerate(tokens)}


def character_tokenizer() -> PreTrainedTokenizerFast:
    """Encodes one token per character; decodes every id of the 128-token vocab to its text, concatenated."""
    backend = Tokenizer(models.WordLevel(character_vocab(), unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


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
