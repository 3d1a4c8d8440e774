"""The `eval_text` field of a profile request and its check before the job is queued: the user's own text
(inline or a file under an import root) or a bundled held-out text by name (`workers/eval/eval_text.py`)."""

from __future__ import annotations

from pathlib import Path

from fastapi import HTTPException
from pydantic import BaseModel, ConfigDict, Field, model_validator

from workers.eval.eval_text import (
    MAX_EVAL_TEXT_BYTES,
    NAME_PATTERN,
    EvalTextError,
    EvalTextTooLargeError,
    UnknownEvalTextError,
    check_tokens,
    resolve_eval_text,
    scoring_window,
)
from workers.store.files import FileStore
from workers.store.model_files import read_config

TOKENS_PREFIX_CHARS = 50_000  # enough characters to hold one window of tokens in any realistic text


class EvalTextSpec(BaseModel):
    """The text a profile measures quality on, and which quality floors then read: `text` (inline), `path`
    (a UTF-8 file under an import root) or `file` (an uploaded file's id, purpose "user_data") with an
    optional `name`, or `name` alone for a bundled held-out text (broad, heldout, heldout_prose, dpkg-spec,
    gnu-manuals, vim-manual, python-reference, python-docstrings, legal)."""

    model_config = ConfigDict(extra="forbid")
    name: str | None = Field(default=None, pattern=NAME_PATTERN, description="The text's name in the profile")
    text: str | None = Field(default=None, max_length=MAX_EVAL_TEXT_BYTES, description="The text itself")
    path: str | None = Field(default=None, max_length=4096, description="A UTF-8 file under an import root")
    file: str | None = Field(
        default=None,
        max_length=64,
        description='An uploaded file id (POST /v1/files, purpose "user_data")',
    )

    @model_validator(mode="after")
    def _one_source(self) -> EvalTextSpec:
        given = [k for k in ("text", "path", "file") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give one of text, path or file, not {' and '.join(given)}")
        if not given and self.name is None:
            raise ValueError("give text, path, file or the name of a bundled evaluation text")
        return self


def check_eval_text(spec: EvalTextSpec, model_path: Path, import_roots: list[Path], files: FileStore) -> None:
    """4xx unless the text can be profiled: a known name or file, UTF-8, within the size limit, under an
    import root, at least one scoring window of the model's tokens."""
    try:
        text = resolve_eval_text(spec.model_dump(exclude_none=True), import_roots, files)
    except UnknownEvalTextError as e:
        raise HTTPException(404, str(e)) from None
    except EvalTextTooLargeError as e:
        raise HTTPException(413, str(e)) from None
    except EvalTextError as e:
        raise HTTPException(422, str(e)) from None
    from service.generation.runner import load_tokenizer  # the API's cached tokenizers

    tokenizer = load_tokenizer(model_path, (model_path / "config.json").stat().st_mtime)
    window = scoring_window(read_config(model_path).get("max_position_embeddings"))
    count = len(tokenizer.encode(text.text[:TOKENS_PREFIX_CHARS]))
    if count < window and len(text.text) > TOKENS_PREFIX_CHARS:
        count = len(tokenizer.encode(text.text))
    try:
        check_tokens(count, window)
    except EvalTextError as e:
        raise HTTPException(422, str(e)) from None
