"""A profile's evaluation text: a bundled held-out text by name (`workers/eval/heldout.py`), or the user's
own, inline, a UTF-8 file under an import root or an uploaded file (POST /v1/files, purpose "user_data"),
checked before anything is measured or stored.

The spec is a mapping with at most one of "text" (inline), "path" (a file) and "file" (an uploaded file's id),
and "name" (the text's name in the profile; alone, a bundled held-out text).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workers.eval.heldout import DEFAULT_EVAL_TEXT, heldout_texts
from workers.store.files import FileContentError, FileNotFound, FileStore
from workers.store.references import resolve_path

MAX_EVAL_TEXT_BYTES = 2_000_000
QUALITY_WINDOW = 256  # tokens a quality window holds (fewer when the model's context is shorter)
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


class EvalTextError(ValueError):
    """The evaluation text cannot be used; the message is one short line that echoes none of its content."""


class UnknownEvalTextError(EvalTextError):
    """No bundled held-out text has that name."""


class EvalTextTooLargeError(EvalTextError):
    """The text is over MAX_EVAL_TEXT_BYTES."""


@dataclass(frozen=True)
class EvalText:
    name: str
    text: str
    source: str  # "bundled", "inline" or "file"


def _check_size(size: int) -> None:
    if size > MAX_EVAL_TEXT_BYTES:
        raise EvalTextTooLargeError(
            f"the evaluation text has {size:,} bytes; at most {MAX_EVAL_TEXT_BYTES:,}"
        )


def _decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise EvalTextError(f"the evaluation text is not UTF-8 (byte {e.start})") from None


def resolve_eval_text(
    spec: Mapping[str, Any] | None, import_roots: Sequence[Path], files: FileStore | None = None
) -> EvalText:
    """The evaluation text a spec names (None: the broad held-out, `DEFAULT_EVAL_TEXT`); EvalTextError when it
    is unknown, too large, not UTF-8, outside the import roots or an uploaded file of another purpose."""
    spec = spec or {}
    name = spec.get("name")
    if name is not None and not re.match(NAME_PATTERN, name):
        raise EvalTextError("an evaluation text's name is 1-64 letters, digits, '.', '_' or '-'")
    bundled = heldout_texts()
    if spec.get("text") is not None:
        raw = spec["text"].encode("utf-8", errors="surrogatepass")
        _check_size(len(raw))
        text, source = _decode(raw), "inline"
        name = name or "user"
    elif spec.get("path") is not None:
        try:
            path = resolve_path(spec["path"], list(import_roots), directory=False)
        except Exception as e:  # ModelReferenceError: outside the roots, or no such file
            raise EvalTextError(str(e)) from None
        _check_size(path.stat().st_size)
        text, source = _decode(path.read_bytes()), "file"
        _check_size(len(text.encode("utf-8")))  # the file may have grown since
        name = name or path.stem[:64]
    elif spec.get("file") is not None:
        if files is None:
            raise EvalTextError("uploaded files cannot be read here")
        try:
            record = files.get(spec["file"])
        except FileNotFound as e:
            raise UnknownEvalTextError(str(e)) from None
        _check_size(record.bytes)
        try:
            text, source = files.text(record.id), "file"
        except FileContentError as e:
            raise EvalTextError(f"{e} (upload the text with purpose 'user_data')") from None
        name = name or record.id
    else:
        name = name or DEFAULT_EVAL_TEXT
        if name not in bundled:
            known = ", ".join(sorted(bundled))
            raise UnknownEvalTextError(f"no evaluation text named {name!r}; bundled: {known}")
        return EvalText(name, bundled[name].text, "bundled")
    if name in bundled:
        raise EvalTextError(f"{name!r} is a bundled evaluation text; give your text another name")
    return EvalText(name, text, source)


def scoring_window(max_positions: int | None) -> int:
    """Tokens per quality window for a model with `max_positions` positions."""
    return min(QUALITY_WINDOW, max_positions or QUALITY_WINDOW)


def check_tokens(count: int, window: int) -> None:
    """A text must fill one scoring window at least (`window` tokens)."""
    if count < window:
        raise EvalTextError(f"the evaluation text has {count} tokens; at least one window of {window} needed")
