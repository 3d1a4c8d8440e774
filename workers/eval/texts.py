"""The bundled texts (workers/data/) and their cutting into token windows.

calibration.txt feeds pruning statistics (activations, block influence); heldout.txt is never used for
calibration, only for measuring perplexity, so a pruned model is not scored on the text it was fitted to.
"""

from __future__ import annotations

from importlib.resources import files
from typing import Protocol

import torch


class Encoder(Protocol):
    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...


def bundled_text(name: str) -> str:
    """A text file from the package's data folder, read as UTF-8."""
    return files("workers").joinpath("data", name).read_text(encoding="utf-8")


def calibration_text() -> str:
    return bundled_text("calibration.txt")


def heldout_text() -> str:
    return bundled_text("heldout.txt")


def encode(tokenizer: Encoder, text: str) -> torch.Tensor:
    """The text as one 1-D LongTensor of token ids, without special tokens."""
    return torch.tensor(tokenizer.encode(text, add_special_tokens=False), dtype=torch.long)


def windows(ids: torch.Tensor, seq_len: int, max_windows: int | None = None) -> list[torch.Tensor]:
    """Non-overlapping (1, L) windows of a 1-D id sequence, L = seq_len except a shorter last one.

    A last window of a single token is dropped: it has no next token to predict.
    """
    if seq_len < 2:
        raise ValueError("seq_len must be at least 2")
    chunks = [ids[i : i + seq_len].unsqueeze(0) for i in range(0, ids.numel(), seq_len)]
    chunks = [c for c in chunks if c.shape[1] >= 2]
    return chunks[:max_windows] if max_windows is not None else chunks


def calibration_windows(
    tokenizer: Encoder, seq_len: int = 256, max_windows: int | None = None, text: str | None = None
) -> list[torch.Tensor]:
    """Token windows of the calibration text (or of `text`), ready to feed the model one at a time."""
    return windows(encode(tokenizer, calibration_text() if text is None else text), seq_len, max_windows)


def instruction_windows(tokenizer, seq_len: int = 256, max_windows: int | None = None) -> list[torch.Tensor]:
    """Token windows of the bundled instruction set (workers/data/sft.jsonl): every conversation rendered
    with the tokenizer's chat template, the conversations concatenated, then cut like calibration text."""
    from workers.train.data import encode_records, read_jsonl, shipped_data_path

    records = read_jsonl(shipped_data_path())
    ids = [token for example in encode_records(tokenizer, records) for token in example.input_ids]
    return windows(torch.tensor(ids, dtype=torch.long), seq_len, max_windows)


def answer_windows(
    tokenizer, seq_len: int = 256, max_windows: int | None = None
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Token windows of the full model's own answers to instruction prompts (workers/data/answers.jsonl,
    chat template applied, conversations concatenated), and for each window a (1, L) bool mask of the
    response tokens (the assistant turns, the tokens the model produces)."""
    from workers.early_exit.fit_data import fitting_stream
    from workers.train.data import read_jsonl

    path = files("workers").joinpath("data", "answers.jsonl")
    ids, responses = fitting_stream(tokenizer, read_jsonl(str(path)))
    cut = windows(torch.tensor(ids, dtype=torch.long), seq_len, max_windows)
    masks = windows(torch.tensor(responses, dtype=torch.bool), seq_len, max_windows)
    return cut, masks
