"""The text exit adapters are fitted on: chat or prompt/response records (the `sort` job's forms), rendered
and tokenised as in fine-tuning, concatenated into one token stream.

The bundled default is every JSONL file listed in `BUNDLED` (workers/data/, origins in
workers/data/README.md); it never includes heldout.txt, on which exits are scored.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from importlib.resources import files
from pathlib import Path
from typing import Any

from workers.train.data import IGNORE_INDEX, encode_records, read_jsonl

BUNDLED = ("sft.jsonl", "answers.jsonl", "answers_long.jsonl")


def bundled_paths() -> list[Path]:
    """The bundled fitting files that are present."""
    paths = [Path(str(files("workers").joinpath("data", name))) for name in BUNDLED]
    return [path for path in paths if path.is_file()]


def bundled_records() -> list[dict[str, Any]]:
    return [record for path in bundled_paths() for record in read_jsonl(path)]


def fitting_stream(
    tokenizer, records: Iterable[Mapping[str, Any]], max_tokens: int | None = None
) -> tuple[list[int], list[bool]]:
    """All records as one token stream (prompts, answers and template tokens alike), cut at max_tokens, and
    which of its tokens are response tokens (the ones a model produces)."""
    ids: list[int] = []
    responses: list[bool] = []
    for example in encode_records(tokenizer, records):
        ids.extend(example.input_ids)
        responses.extend(label != IGNORE_INDEX for label in example.labels)
        if max_tokens is not None and len(ids) >= max_tokens:
            return ids[:max_tokens], responses[:max_tokens]
    return ids, responses


def fitting_ids(tokenizer, records: Iterable[Mapping[str, Any]], max_tokens: int | None = None) -> list[int]:
    """The token stream of `fitting_stream` alone."""
    return fitting_stream(tokenizer, records, max_tokens)[0]
