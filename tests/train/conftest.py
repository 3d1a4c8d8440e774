"""Training-test fixtures: a tiny random LLaMA on disk, a character tokenizer with a chat template."""

from __future__ import annotations

import pytest
from transformers import LlamaForCausalLM

from tests.generation.conftest import character_tokenizer
from tests.tiny_models import make_tiny_llama

# "role: content; " per turn (the character tokenizer drops newlines); assistant turns end with EOS.
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}; {% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


@pytest.fixture(scope="session")
def chat_tokenizer():
    tokenizer = character_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny random LLaMA (4 layers, hidden 64, vocab 128) saved as a Hugging Face directory."""
    path = tmp_path_factory.mktemp("train") / "tiny"
    make_tiny_llama(path, seed=0)
    return path


@pytest.fixture
def fresh_model(tiny_dir):
    """A new copy of the tiny model for each test that trains (training changes the weights in place)."""
    return LlamaForCausalLM.from_pretrained(tiny_dir).eval()


@pytest.fixture(scope="session")
def records() -> list[dict]:
    """Eight short chat examples over the character vocabulary."""
    pairs = [
        ("name a colour", "blue is a colour."),
        ("say hello", "hello there!"),
        ("count to three", "one, two, three."),
        ("what is ice", "ice is frozen water."),
        ("name a fruit", "an apple is a fruit."),
        ("greet me", "good morning to you."),
        ("spell cat", "c, a, t."),
        ("what is rain", "rain is water that falls."),
    ]
    return [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in pairs
    ]
