"""Uploaded data files under `<home>/files/`, addressed by `file-<hex>` ids: training sets (purpose
"fine-tune": JSONL, validated record by record) and the user's own text (purpose "user_data": UTF-8 text, for
example a held-out text a profile measures quality on).

A file is checked line by line before anything is written (FileContentError names the first bad line and
why, and nothing is stored), then written to a temporary name and renamed into place, its metadata last: a
file is listed only once both are complete. Ids are matched against FILE_ID before any path is built, so
no id can name a path outside the files directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
import uuid
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from workers.train.data import DataError, read_jsonl, validate_record

FILE_ID = re.compile(r"^file-[0-9a-f]{24}$")
PURPOSES = ("fine-tune", "user_data")
TRAINING = "fine-tune"
USER_TEXT = "user_data"


class FileContentError(ValueError):
    """The upload is not what its purpose needs (the message names the line); nothing was stored."""


class FileTooLargeError(ValueError):
    pass


class FileNotFound(LookupError):
    pass


class FileRecord(BaseModel):
    """OpenAI's file object, plus the content's digest and record count."""

    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal["processed"] = "processed"
    status_details: str | None = None
    sha256: str = Field(description="Digest of the content, recorded in the lineage of models trained on it")
    records: int = Field(description="Training records (fine-tune) or lines of text (user_data)")


def clean_filename(name: str | None) -> str:
    """The last path component, printable characters only, at most 200 (a name is shown, never used)."""
    base = re.split(r"[\\/]", name or "")[-1]
    base = "".join(c for c in base if c.isprintable()).strip()
    return base[:200] or "upload.jsonl"


def check_jsonl(data: bytes) -> int:
    """The number of training records in `data`, or FileContentError naming the first bad line."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FileContentError(f"the file is not UTF-8 text (byte {e.start})") from None
    count = 0
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise FileContentError(f"line {number}: invalid JSON ({e.msg} at column {e.colno})") from None
        try:
            validate_record(record, number)
        except DataError as e:
            raise FileContentError(str(e)) from None
        count += 1
    if count == 0:
        raise FileContentError("the file holds no records (one JSON object per line expected)")
    return count


def check_text(data: bytes) -> int:
    """The number of lines of `data`, or FileContentError unless it is non-blank UTF-8 text without NUL."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FileContentError(f"the file is not UTF-8 text (byte {e.start})") from None
    if "\x00" in text:
        raise FileContentError("the file holds a NUL character; plain text expected")
    if not text.strip():
        raise FileContentError("the file holds no text")
    return len(text.splitlines())


CHECKS = {TRAINING: check_jsonl, USER_TEXT: check_text}


class FileStore:
    def __init__(self, root: Path, max_bytes: int):
        self.root = Path(root)
        self.max_bytes = max_bytes

    def _paths(self, file_id: str) -> tuple[Path, Path]:
        if not isinstance(file_id, str) or not FILE_ID.match(file_id):
            raise FileNotFound(f"no such file: {file_id[:80]!r} is not a file id (file-<24 hex digits>)")
        return self.root / f"{file_id}.jsonl", self.root / f"{file_id}.json"

    def put(self, data: bytes, filename: str | None, purpose: str) -> FileRecord:
        """Validate, then store; nothing is written unless the whole file is valid."""
        if purpose not in PURPOSES:
            raise FileContentError(f"purpose must be one of {', '.join(PURPOSES)}, not {purpose[:40]!r}")
        if len(data) > self.max_bytes:
            raise FileTooLargeError(f"the file has {len(data):,} bytes; at most {self.max_bytes:,}")
        records = CHECKS[purpose](data)
        record = FileRecord(
            id=f"file-{uuid.uuid4().hex[:24]}",
            bytes=len(data),
            created_at=int(time.time()),
            filename=clean_filename(filename),
            purpose=purpose,
            sha256=hashlib.sha256(data).hexdigest(),
            records=records,
        )
        content, meta = self._paths(record.id)
        self.root.mkdir(parents=True, exist_ok=True)
        for path, payload in ((content, data), (meta, record.model_dump_json().encode())):
            tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
            try:
                tmp.write_bytes(payload)
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
        return record

    def get(self, file_id: str) -> FileRecord:
        content, meta = self._paths(file_id)
        if not meta.is_file() or not content.is_file():
            raise FileNotFound(f"no such file: {file_id}")
        return FileRecord.model_validate_json(meta.read_text())

    def list(self) -> list[FileRecord]:
        """Every stored file, newest first."""
        found = []
        for meta in self.root.glob("file-*.json") if self.root.is_dir() else ():
            try:
                found.append(self.get(meta.stem))
            except (FileNotFound, ValueError):
                continue
        return sorted(found, key=lambda r: (r.created_at, r.id), reverse=True)

    def content_path(self, file_id: str) -> Path:
        self.get(file_id)
        return self._paths(file_id)[0]

    def of_purpose(self, file_id: str, purpose: str) -> FileRecord:
        """The file's record; FileContentError unless it was uploaded with `purpose`."""
        record = self.get(file_id)
        if record.purpose != purpose:
            raise FileContentError(f"{file_id} was uploaded for {record.purpose!r}, not {purpose!r}")
        return record

    def records(self, file_id: str) -> list[dict[str, Any]]:
        """A training file's records (validated again as they are read)."""
        self.of_purpose(file_id, TRAINING)
        return read_jsonl(self.content_path(file_id))

    def text(self, file_id: str) -> str:
        """A user_data file's text."""
        self.of_purpose(file_id, USER_TEXT)
        return self.content_path(file_id).read_bytes().decode("utf-8")

    def delete(self, file_id: str) -> FileRecord:
        """Remove a file: its metadata first (it is gone from listings at once), then its content."""
        record = self.get(file_id)
        content, meta = self._paths(file_id)
        meta.unlink(missing_ok=True)
        content.unlink(missing_ok=True)
        return record
