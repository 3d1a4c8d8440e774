"""Tiny random LLaMA models on disk, for fast tests."""

from __future__ import annotations

import string
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

TINY_SHAPE = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)


def tiny_llama_config(**overrides) -> LlamaConfig:
    values = dict(
        **TINY_SHAPE,
        tie_word_embeddings=False,
        rms_norm_eps=1e-6,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    values.update(overrides)
    return LlamaConfig(**values)


def make_tiny_qwen2(seed: int = 0, **config_overrides) -> Qwen2ForCausalLM:
    """A tiny random Qwen2 (q/k/v biases, config.layer_types present) of the same shape, in memory."""
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(Qwen2Config(**{**TINY_SHAPE, **config_overrides})).eval()


def make_tiny_llama(
    path: Path, seed: int = 0, dtype: torch.dtype = torch.float32, **config_overrides
) -> LlamaForCausalLM:
    """Write a tiny random LlamaForCausalLM as a Hugging Face directory (safetensors) and return it."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(**config_overrides)).to(dtype).eval()
    # Random init leaves norms at exactly one; perturb them so merges of norms are non-trivial.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(path)
    return model


def make_slow_llama(path: Path) -> LlamaForCausalLM:
    """A random LLaMA big enough (about 60 M parameters) that jobs on it run for seconds, to catch mid-job."""
    return make_tiny_llama(
        path,
        seed=5,
        hidden_size=512,
        intermediate_size=2048,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=8000,
    )


def make_variant(base_dir: Path, path: Path, seed: int, scale: float = 0.01) -> None:
    """A fine-tune-like variant of a model on disk: the base plus small dense random deltas."""
    model = LlamaForCausalLM.from_pretrained(base_dir)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(scale * torch.randn(param.shape, generator=generator).to(param.dtype))
    model.save_pretrained(path)


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


CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def make_tiny_chat_llama(path: Path, seed: int = 0, **config_overrides) -> LlamaForCausalLM:
    """A tiny random LLaMA with the character tokenizer (and a chat template) saved beside it."""
    model = make_tiny_llama(path, seed=seed, **config_overrides)
    tokenizer = character_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(path)
    return model


def distill_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character like `character_tokenizer`, with the brackets and arithmetic signs that
    distillation records need ("[label]", "3 * 4 = 12"); its vocab has DISTILL_VOCAB_SIZE entries."""
    tokens = list(dict.fromkeys(SPECIALS + CHARACTERS + list("[]*+=()")))
    backend = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


DISTILL_VOCAB_SIZE = len(dict.fromkeys(SPECIALS + CHARACTERS + list("[]*+=()")))
