"""Distillation data: JSONL records `{"input", "label"?, "rationale"?}`, the task they pose, and its scorer.

Task types:
- `short_answer`: free-form; a reply is right when it equals the gold label after normalisation (case,
  surrounding space and a final full stop ignored), or, when both parse as numbers, when they are equal
  as numbers ("14", "14.0").
- `classification`: the label is one of `labels`; matched case-insensitively.
- `multiple_choice`: the label is one of `labels` (default A, B, C, D), the options being written in the
  input; matched case-insensitively, "(B)" and "B)" read as "B".
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from workers.train.data import DataError

TaskType = Literal["short_answer", "classification", "multiple_choice"]
DEFAULT_CHOICES = ["A", "B", "C", "D"]
MAX_TEXT = 20_000  # characters of one input, label or rationale


class TaskSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    type: TaskType = "short_answer"
    labels: list[str] | None = Field(
        default=None,
        min_length=2,
        max_length=1000,
        description="classification: the label set (required); multiple_choice: the option names "
        "(default A, B, C, D)",
    )

    @model_validator(mode="after")
    def _labels(self) -> TaskSpec:
        if self.type == "classification" and not self.labels:
            raise ValueError("a classification task needs labels (at least two)")
        if self.type == "short_answer" and self.labels:
            raise ValueError("a short_answer task takes no labels")
        for label in self.labels or []:
            if not label.strip() or len(label) > 200 or "\n" in label:
                raise ValueError("each label must be a non-empty single line of at most 200 characters")
        if self.labels and len({normalise(label) for label in self.labels}) != len(self.labels):
            raise ValueError("labels must differ (case and surrounding space ignored)")
        return self

    @property
    def label_set(self) -> list[str] | None:
        if self.type == "multiple_choice":
            return self.labels or list(DEFAULT_CHOICES)
        return self.labels


def normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().rstrip(".").strip().lower()


def _number(text: str) -> float | None:
    try:
        value = float(text.replace(",", ""))
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def canonical_label(task: TaskSpec, text: str) -> str | None:
    """The label a reply names, spelled as in the label set (short answers: the stripped reply), or None
    when it names none."""
    text = text.strip().splitlines()[0].strip() if text.strip() else ""
    labels = task.label_set
    if labels is None:
        return text.rstrip(".").strip() or None
    wanted = normalise(text)
    if task.type == "multiple_choice":
        wanted = normalise(re.sub(r"^\(?\s*([^\s).]+)\s*\)?.*$", r"\1", text))
    for label in labels:
        if normalise(label) == wanted:
            return label
    return None


def is_correct(task: TaskSpec, reply: str, gold: str) -> bool:
    """Whether `reply` gives the gold label (see the module docstring for each task type)."""
    got = canonical_label(task, reply)
    if got is None:
        return False
    if task.type == "short_answer":
        a, b = _number(got), _number(gold.strip().rstrip("."))
        if a is not None and b is not None:
            return a == b
    return normalise(got) == normalise(gold)


def validate_distill_record(record: Any, task: TaskSpec | None = None, line: int | None = None) -> dict:
    """`{"input": str, "label"?: str, "rationale"?: str}` (nothing else), labels in the task's label set."""
    where = f"line {line}: " if line is not None else ""
    if not isinstance(record, Mapping):
        raise DataError(f"{where}expected a JSON object, got {type(record).__name__}")
    extra = sorted(set(record) - {"input", "label", "rationale"})
    if extra:
        raise DataError(f"{where}unknown key {extra[0][:40]!r}; a record holds input, label and rationale")
    if not isinstance(record.get("input"), str) or not record["input"].strip():
        raise DataError(f"{where}'input' must be a non-empty string")
    for key in ("input", "label", "rationale"):
        value = record.get(key)
        if value is None:
            continue
        if not isinstance(value, str) or not value.strip():
            raise DataError(f"{where}'{key}' must be a non-empty string when given")
        if len(value) > MAX_TEXT:
            raise DataError(f"{where}'{key}' is longer than {MAX_TEXT} characters")
    if record.get("label") is not None and "\n" in record["label"].strip():
        raise DataError(f"{where}'label' must be one line")
    if task is not None and record.get("label") is not None and task.label_set is not None:
        if canonical_label(task, record["label"]) is None:
            raise DataError(f"{where}the label is not one of the task's labels")
    return {k: record[k] for k in ("input", "label", "rationale") if record.get(k) is not None}


def check_records(records: Sequence[Any], task: TaskSpec | None = None) -> list[dict]:
    """Every record validated (DataError names the first bad one, 1-based), at least one."""
    if not records:
        raise DataError("no records")
    return [validate_distill_record(r, task, number) for number, r in enumerate(records, start=1)]


def read_distill_jsonl(path: str | Path, task: TaskSpec | None = None) -> list[dict]:
    """The records of a JSONL file (blank lines skipped); DataError names the first bad line."""
    records = []
    with open(path, encoding="utf-8") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except json.JSONDecodeError as error:
                raise DataError(
                    f"line {number}: invalid JSON ({error.msg} at column {error.colno})"
                ) from None
            records.append(validate_distill_record(record, task, number))
    if not records:
        raise DataError("the file holds no records")
    return records
