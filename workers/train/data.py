"""Supervised fine-tuning data: JSONL records to token ids with response-only labels, then batches.

Each line of the JSONL file is one JSON object, one of

    {"prompt": "...", "response": "..."}                       plain text, no chat template ("completion"
                                                               is accepted for "response", OpenAI's legacy
                                                               form),
    {"messages": [{"role": "user", "content": "..."}, ...]}     rendered with tokenizer.apply_chat_template,
    {"text": "..."}                                            plain text, every token trained on.

Labels are -100 (ignored by the loss) on every token except the response: for prompt/response records the
response tokens plus the EOS token; for chat records each assistant turn as the template renders it after
the generation prompt (its content and end-of-turn marker). Chat records are tokenised segment by segment,
the non-assistant segments being the differences between successive renderings of the conversation, so the
labelled tokens are exactly the tokens a model produces after the generation prompt. Text records are BOS +
text + EOS, all labelled.

Rows longer than `seq_len` are truncated (the right end is dropped), or, with packing, examples are
concatenated and cut into rows of exactly `seq_len` tokens.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

import torch

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant", "tool")


class DataError(ValueError):
    """A training record is malformed; the message names the file line (1-based) when there is one."""


@dataclass(frozen=True)
class EncodedExample:
    """Token ids and labels of one example; labels[i] is input_ids[i] or -100 (not trained on)."""

    input_ids: list[int]
    labels: list[int]

    def __post_init__(self) -> None:
        if len(self.input_ids) != len(self.labels):
            raise ValueError("input_ids and labels must have the same length")

    @property
    def trained_tokens(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


def _where(line: int | None) -> str:
    return f"line {line}: " if line is not None else ""


def validate_record(record: Any, line: int | None = None) -> dict[str, Any]:
    """The record if it is a well-formed prompt/response or messages record, else DataError (with line)."""
    where = _where(line)
    if not isinstance(record, Mapping):
        raise DataError(f"{where}expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}'messages' must be a non-empty list")
        for i, message in enumerate(messages):
            if not isinstance(message, Mapping):
                raise DataError(f"{where}messages[{i}] must be an object with 'role' and 'content'")
            if message.get("role") not in ROLES:
                raise DataError(f"{where}messages[{i}].role must be one of {', '.join(ROLES)}")
            if not isinstance(message.get("content"), str):
                raise DataError(f"{where}messages[{i}].content must be a string")
        if not any(message["role"] == "assistant" for message in messages):
            raise DataError(f"{where}'messages' has no assistant message to train on")
        return dict(record)
    if "completion" in record and "response" not in record:
        record = {**{k: v for k, v in record.items() if k != "completion"}, "response": record["completion"]}
    if "prompt" in record or "response" in record:
        for key in ("prompt", "response"):
            if not isinstance(record.get(key), str):
                raise DataError(f"{where}'{key}' must be a string")
        if not record["response"]:
            raise DataError(f"{where}'response' is empty")
        return dict(record)
    if "text" in record:
        if not isinstance(record["text"], str) or not record["text"].strip():
            raise DataError(f"{where}'text' must be a non-empty string")
        return dict(record)
    raise DataError(f"{where}expected 'messages', 'prompt' and 'response' (or 'completion'), or 'text'")


def shipped_data_path() -> Path:
    """The bundled instruction set, workers/data/sft.jsonl (its origin: workers/data/SFT_DATA.md)."""
    return Path(str(files("workers").joinpath("data", "sft.jsonl")))


def iter_jsonl(path: str | Path) -> Iterator[dict[str, Any]]:
    """The records of a JSONL file one by one (blank lines skipped); DataError names the first bad line."""
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise DataError(f"line {number}: not UTF-8 text") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                message = f"line {number}: invalid JSON ({error.msg} at column {error.colno})"
                raise DataError(message) from None
            yield validate_record(record, number)


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """All records of a JSONL file (blank lines skipped); DataError names the first bad line."""
    records = list(iter_jsonl(path))
    if not records:
        raise DataError(f"{Path(path).name} holds no records")
    return records


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False)) if text else []


def _render(tokenizer, messages: Sequence[Mapping[str, str]], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        [dict(message) for message in messages], tokenize=False, add_generation_prompt=generation_prompt
    )


def encode_chat(tokenizer, messages: Sequence[Mapping[str, str]]) -> EncodedExample:
    """Chat-template the conversation; label only the assistant turns (content and end-of-turn marker)."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError("the tokenizer has no chat template, so 'messages' records cannot be rendered")
    ids: list[int] = []
    labels: list[int] = []
    rendered = ""
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = _render(tokenizer, messages[:index], generation_prompt=True)
        full = _render(tokenizer, messages[: index + 1], generation_prompt=False)
        if not prefix.startswith(rendered) or not full.startswith(prefix):
            raise DataError("the chat template does not render conversations incrementally")
        context = _encode(tokenizer, prefix[len(rendered) :])
        answer = _encode(tokenizer, full[len(prefix) :])
        ids += context + answer
        labels += [IGNORE_INDEX] * len(context) + answer
        rendered = full
    tail = _render(tokenizer, messages, generation_prompt=False)
    if tail.startswith(rendered) and len(tail) > len(rendered):
        context = _encode(tokenizer, tail[len(rendered) :])
        ids += context
        labels += [IGNORE_INDEX] * len(context)
    return EncodedExample(ids, labels)


def encode_prompt_response(tokenizer, prompt: str, response: str) -> EncodedExample:
    """BOS (when the tokenizer has one) + prompt + response + EOS; labels on response and EOS only."""
    bos = [tokenizer.bos_token_id] if getattr(tokenizer, "bos_token_id", None) is not None else []
    context = bos + _encode(tokenizer, prompt)
    eos = [tokenizer.eos_token_id] if getattr(tokenizer, "eos_token_id", None) is not None else []
    answer = _encode(tokenizer, response) + eos
    return EncodedExample(context + answer, [IGNORE_INDEX] * len(context) + answer)


def encode_text(tokenizer, text: str) -> EncodedExample:
    """BOS (when the tokenizer has one) + text + EOS, every token labelled."""
    bos = [tokenizer.bos_token_id] if getattr(tokenizer, "bos_token_id", None) is not None else []
    eos = [tokenizer.eos_token_id] if getattr(tokenizer, "eos_token_id", None) is not None else []
    ids = bos + _encode(tokenizer, text) + eos
    return EncodedExample(ids, list(ids))


def encode_record(tokenizer, record: Mapping[str, Any], line: int | None = None) -> EncodedExample:
    """One validated record as token ids and labels (response-only except for text records)."""
    record = validate_record(record, line)
    try:
        if "messages" in record:
            return encode_chat(tokenizer, record["messages"])
        if "text" in record:
            return encode_text(tokenizer, record["text"])
        return encode_prompt_response(tokenizer, record["prompt"], record["response"])
    except DataError as error:
        raise DataError(f"{_where(line)}{error}") from None


def encode_records(tokenizer, records: Iterable[Mapping[str, Any] | EncodedExample]) -> list[EncodedExample]:
    """Encode records (encoded examples pass through); an example without trained tokens is an error."""
    out = []
    for number, record in enumerate(records, start=1):
        example = record if isinstance(record, EncodedExample) else encode_record(tokenizer, record, number)
        if example.trained_tokens == 0:
            raise DataError(f"record {number}: no response tokens to train on")
        out.append(example)
    if not out:
        raise DataError("no training examples")
    return out


def load_examples(path: str | Path, tokenizer) -> list[EncodedExample]:
    """Read and encode a JSONL file; errors name the line."""
    records = read_jsonl(path)
    return [encode_record(tokenizer, record, i) for i, record in enumerate(records, start=1)]


def truncate(example: EncodedExample, seq_len: int) -> EncodedExample:
    return EncodedExample(example.input_ids[:seq_len], example.labels[:seq_len])


def pack(examples: Sequence[EncodedExample], seq_len: int) -> list[EncodedExample]:
    """Concatenate the examples in order and cut the stream into rows of seq_len (the last may be shorter).

    Rows whose labels are all -100 are dropped. Attention is causal across example boundaries within a row.
    """
    ids = [token for example in examples for token in example.input_ids]
    labels = [label for example in examples for label in example.labels]
    rows = [
        EncodedExample(ids[i : i + seq_len], labels[i : i + seq_len]) for i in range(0, len(ids), seq_len)
    ]
    return [row for row in rows if len(row.input_ids) >= 2 and row.trained_tokens > 0]


def prepare_rows(examples: Sequence[EncodedExample], seq_len: int, packing: bool) -> list[EncodedExample]:
    """Training rows of at most seq_len tokens; truncated rows left with no trained token are dropped."""
    if seq_len < 2:
        raise ValueError("seq_len must be at least 2")
    if packing:
        return pack(examples, seq_len)
    rows = [truncate(example, seq_len) for example in examples]
    return [row for row in rows if any(label != IGNORE_INDEX for label in row.labels[1:])]


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor  # (B, T) long, right-padded with pad_id
    labels: torch.Tensor  # (B, T) long, -100 on padding and on untrained tokens
    attention_mask: torch.Tensor  # (B, T) long, 0 on padding

    def to(self, device: torch.device | str) -> Batch:
        return Batch(self.input_ids.to(device), self.labels.to(device), self.attention_mask.to(device))


def collate(rows: Sequence[EncodedExample], pad_id: int = 0) -> Batch:
    """Right-pad rows to the longest; padding is masked out and never a target."""
    width = max(len(row.input_ids) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row.input_ids)
        ids[i, :n] = torch.tensor(row.input_ids, dtype=torch.long)
        labels[i, :n] = torch.tensor(row.labels, dtype=torch.long)
        mask[i, :n] = 1
    return Batch(ids, labels, mask)


def batches(
    rows: Sequence[EncodedExample], batch_size: int, seed: int, pad_id: int = 0, shuffle: bool = True
) -> Iterator[Batch]:
    """Endless batches: each epoch is one pass over the rows in seeded shuffled order (last batch partial)."""
    if not rows:
        raise DataError("no training rows")
    order = list(range(len(rows)))
    rng = random.Random(seed)
    while True:
        if shuffle:
            rng.shuffle(order)
        for start in range(0, len(order), batch_size):
            yield collate([rows[i] for i in order[start : start + batch_size]], pad_id)
