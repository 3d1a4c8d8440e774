"""Loading and saving whole models for the jobs that transform them (prune, grow, sort, ...)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from workers.eval.perplexity import perplexity
from workers.eval.texts import heldout_text
from workers.store.model_store import verify_model
from workers.tensors.safetensors_io import TensorReader


def load_model(path: Path) -> tuple[nn.Module, object]:
    """A float32 model on the CPU, in eval mode, and its tokenizer (safetensors only, no remote code)."""
    verify_model(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, use_safetensors=True).eval()
    return model, AutoTokenizer.from_pretrained(path)


def save_model(model: nn.Module, tokenizer, out_dir: Path) -> None:
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


@torch.inference_mode()
def heldout_perplexity(model: nn.Module, tokenizer, depth: int | None = None) -> float:
    """Perplexity on the project's held-out text (never used for calibration or training)."""
    return round(perplexity(model, tokenizer, heldout_text(), seq_len=256, depth=depth), 4)


class LazyTensors(Mapping[str, torch.Tensor]):
    """A model directory's tensors as a read-on-access mapping."""

    def __init__(self, reader: TensorReader):
        self.reader = reader

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.reader.entries:
            raise KeyError(name)
        return self.reader.load(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.reader.names)

    def __len__(self) -> int:
        return len(self.reader.entries)
