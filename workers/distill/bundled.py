"""The files of the bundled distillation tasks (`kinds`, `multistep`): `<task>.<split>.jsonl` under
workers/data/tasks/, one `{"input", "label", "rationale"}` record a line, written by each task's generator."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from workers.tasks import tasks_dir

SPLITS = ("train", "test")


def path(task: str, split: str, directory: Path | None = None) -> Path:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}")
    return (directory or tasks_dir()) / f"{task}.{split}.jsonl"


def load(task: str, split: str) -> list[dict[str, Any]]:
    lines = path(task, split).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def write(
    task: str, splits: Mapping[str, Sequence[Mapping[str, str]]], directory: Path | None = None
) -> list[Path]:
    """Each split's records to its file (in `directory`, by default the bundled data's), in order."""
    written = []
    for split, records in splits.items():
        target = path(task, split, directory)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
        written.append(target)
    return written
