"""The text exit adapters are fitted on: chat or prompt/response records (the `sort` job's forms), rendered
and tokenised as in fine-tuning, concatenated into one token stream.

Bundled texts (workers/data/, origins in workers/data/README.md), by name in `BUNDLED`: "chat", the default
model's own chat answers, "general", its own samples without a chat template (general text), "everyday", its
own samples opened with a line on an everyday topic, "prose", original prose written for this project
(essays, stories, explainers, advice, local news and letters, diaries), "broad", human-written English shipped
by Debian and Python (technical manuals, a tutorial, reference prose, docstrings, licences;
`bench/build_corpus.py`), and the mixes "mixed" (a chat record and a general one in turn), "prose+chat" (a
prose record and a chat record in turn) and "broad+prose+chat" (a broad, a prose and a chat record in turn;
the default, `DEFAULT_TEXT`).
None includes heldout.txt, heldout_prose.txt or broad_heldout.jsonl, on which exits are scored.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib.resources import files
from itertools import chain, zip_longest
from pathlib import Path
from typing import Any, Literal

import torch

from workers.early_exit.fit import token_windows
from workers.train.data import IGNORE_INDEX, encode_records, read_jsonl

BundledText = Literal[
    "chat", "general", "everyday", "prose", "broad", "mixed", "prose+chat", "broad+prose+chat"
]
BUNDLED: dict[str, tuple[str, ...]] = {
    "chat": ("sft.jsonl", "answers.jsonl", "answers_long.jsonl"),
    "general": ("general.jsonl",),
    "everyday": ("everyday.jsonl",),
    "prose": ("prose.jsonl",),
    "broad": ("broad.jsonl",),
}
MIXES: dict[str, tuple[BundledText, ...]] = {
    "mixed": ("chat", "general"),
    "prose+chat": ("prose", "chat"),
    "broad+prose+chat": ("broad", "prose", "chat"),
}
DEFAULT_TEXT: BundledText = "broad+prose+chat"
DEFAULT_MAX_TOKENS = 98_304  # of the default text: about 34,000 broad, all 44,314 prose, 20,000 chat tokens


def bundled_paths(text: BundledText = DEFAULT_TEXT) -> list[Path]:
    """The bundled fitting files of `text` that are present (a mix: its texts' files, in its order)."""
    if text in MIXES:
        return [path for part in MIXES[text] for path in bundled_paths(part)]
    paths = [Path(str(files("workers").joinpath("data", name))) for name in BUNDLED[text]]
    return [path for path in paths if path.is_file()]


def bundled_records(text: BundledText = DEFAULT_TEXT) -> list[dict[str, Any]]:
    """The records of a bundled text; a mix takes a record of each of its texts in turn (when one runs out,
    the others go on in turn)."""
    if text not in MIXES:
        return [record for path in bundled_paths(text) for record in read_jsonl(path)]
    pairs = zip_longest(*(bundled_records(part) for part in MIXES[text]))
    return [record for record in chain.from_iterable(pairs) if record is not None]


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


def enough_tokens(tokenizer, records: Iterable[Mapping[str, Any]], needed: int) -> int:
    """Tokens of the records' stream, counted record by record and stopping once `needed` are reached (a
    check of a large file encodes only its first records)."""
    count = 0
    for record in records:
        count += len(encode_records(tokenizer, [record])[0].input_ids)
        if count >= needed:
            break
    return count


def fitting_ids(tokenizer, records: Iterable[Mapping[str, Any]], max_tokens: int | None = None) -> list[int]:
    """The token stream of `fitting_stream` alone."""
    return fitting_stream(tokenizer, records, max_tokens)[0]


@dataclass
class FittingWindows:
    """The fitting text as windows, with (fit_on responses) their masks and (texts mixed) their weights."""

    windows: list[torch.Tensor]
    masks: list[torch.Tensor] | None
    weights: list[float] | None  # None: every window counts once
    tokens: list[int]  # of each text, in the order given


def fitting_windows(
    tokenizer,
    texts: Sequence[tuple[Iterable[Mapping[str, Any]], float]],
    max_tokens: int | None,
    seq_len: int,
    responses_only: bool = False,
) -> FittingWindows:
    """Each (records, weight) text as its own token stream of at most max_tokens, cut into seq_len windows
    whose tokens count `weight` times in the ridge fit (a user's text mixed with the bundled one)."""
    windows: list[torch.Tensor] = []
    masks: list[torch.Tensor] | None = [] if responses_only else None
    weights: list[float] = []
    tokens: list[int] = []
    for records, weight in texts:
        ids, responses = fitting_stream(tokenizer, records, max_tokens)
        part = token_windows(ids, seq_len)
        windows += part
        weights += [float(weight)] * len(part)
        tokens.append(len(ids))
        if masks is not None:
            masks += token_windows(responses, seq_len, dtype=torch.bool)
    mixed = len({*weights}) > 1
    return FittingWindows(windows, masks, weights if mixed else None, tokens)
