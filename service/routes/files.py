"""OpenAI's /v1/files: upload a JSONL training set (validated line by line first) or a UTF-8 text (user_data),
list, read, delete."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, File, Form, HTTPException, UploadFile
from fastapi.responses import FileResponse
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from service import deps
from service.schemas import ERROR_RESPONSES
from workers.settings import Settings
from workers.store.files import (
    TRAINING,
    FileContentError,
    FileNotFound,
    FileRecord,
    FileStore,
    FileTooLargeError,
)

router = APIRouter(tags=["files"], responses={**ERROR_RESPONSES, 400: ERROR_RESPONSES[422]})
UPLOAD_SLACK = 64 << 10  # multipart framing around the file, allowed beyond STRATA_MAX_FILE_BYTES


def file_store(settings: Annotated[Settings, Depends(deps.settings)]) -> FileStore:
    return FileStore(settings.files_dir, settings.max_file_bytes)


StoreDep = Annotated[FileStore, Depends(file_store)]


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileRecord]
    has_more: bool = False


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True


def get_or_404(store: FileStore, file_id: str) -> FileRecord:
    try:
        return store.get(file_id)
    except FileNotFound as e:
        raise HTTPException(404, str(e)) from e


@router.post("/v1/files", response_model=FileRecord)
async def upload_file(
    store: StoreDep,
    file: Annotated[UploadFile, File(description="fine-tune: JSONL, a record per line; user_data: text")],
    purpose: Annotated[str, Form(description='"fine-tune" or "user_data"')],
) -> FileRecord:
    """A training set (purpose "fine-tune": every line a JSON record, {"messages"} with an assistant turn,
    {"prompt", "completion"} or {"text"}; 400 naming the first bad line) or the user's own text (purpose
    "user_data": UTF-8, e.g. a profile's evaluation text), checked before anything is stored, at most
    STRATA_MAX_FILE_BYTES (413)."""
    data = await file.read(store.max_bytes + 1)
    try:
        return await run_in_threadpool(store.put, data, file.filename, purpose)
    except FileTooLargeError as e:
        raise HTTPException(413, f"{e} (STRATA_MAX_FILE_BYTES)") from e
    except FileContentError as e:
        raise HTTPException(400, str(e)) from e


@router.get("/v1/files", response_model=FileList)
def list_files(store: StoreDep, purpose: str | None = None) -> FileList:
    return FileList(data=[r for r in store.list() if purpose is None or r.purpose == purpose])


@router.get("/v1/files/{file_id}", response_model=FileRecord)
def get_file(file_id: str, store: StoreDep) -> FileRecord:
    return get_or_404(store, file_id)


@router.get("/v1/files/{file_id}/content", response_class=FileResponse)
def file_content(file_id: str, store: StoreDep) -> FileResponse:
    record = get_or_404(store, file_id)
    media_type = "application/jsonl" if record.purpose == TRAINING else "text/plain; charset=utf-8"
    return FileResponse(store.content_path(record.id), media_type=media_type)


@router.delete("/v1/files/{file_id}", response_model=FileDeleted)
def delete_file(file_id: str, store: StoreDep) -> FileDeleted:
    try:
        return FileDeleted(id=store.delete(file_id).id)
    except FileNotFound as e:
        raise HTTPException(404, str(e)) from e
