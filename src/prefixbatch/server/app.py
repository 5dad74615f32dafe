"""The HTTP routes: OpenAI's Files and Batches API (and ``/v1/models``, ``/health``) on FastAPI.

Request and response shapes follow the OpenAI API reference as the official ``openai`` Python
client sends and parses them (``openai/resources/files.py``, ``openai/resources/batches.py``),
and are tested against the schemas of OpenAI's published OpenAPI description
(``tests/data/openai_openapi_subset.json``). Every error is OpenAI-shaped (``errors.APIError``),
including bad parameters (400, where FastAPI would answer 422), unknown routes (404), a missing
or wrong API key (401, checked before anything else: ``envelope.py``), a full disk (507) and
anything unexpected (500).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from pydantic import BaseModel, ConfigDict
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from ..io.batch_file import URLS
from ..io.json_text import json_text
from .envelope import OpenAIEnvelope
from .errors import APIError, bad_request, not_found
from .objects import (
    ACTIVE,
    BATCH_ID,
    BATCH_PREFIX,
    COMPLETION_WINDOW_S,
    FILE_ID,
    FILE_PREFIX,
    BatchRecord,
    FileRecord,
    list_object,
    new_id,
    new_stored_name,
)
from .storage import FileInUse, Store, UnknownCursor
from .uploads import BadUpload, check_jsonl
from .worker import BatchWorker

log = logging.getLogger(__name__)
_CHUNK = 1 << 20


@dataclass(frozen=True)
class AppConfig:
    model_name: str  # what /v1/models lists and batches record
    api_key: str | None = None  # when set, /v1/* needs "Authorization: Bearer <key>"
    max_upload_bytes: int = 200 * 2**20  # OpenAI's limit for batch input files


class CreateBatch(BaseModel):
    """``POST /v1/batches``; other fields the client may send (``output_expires_after``) are
    accepted and ignored."""

    model_config = ConfigDict(extra="allow")
    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict[str, str] | None = None


def create_app(store: Store, worker: BatchWorker, config: AppConfig) -> FastAPI:
    """The ASGI app; its lifespan starts the batch worker and stops it at shutdown."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        removed = store.remove_orphan_blobs()
        if removed:
            log.info("removed %d partial files left by an earlier server", removed)
        worker.start()
        yield
        await run_in_threadpool(worker.stop)

    app = FastAPI(title="prefixbatch", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.add_middleware(OpenAIEnvelope, api_key=config.api_key)
    started = int(time.time())
    _install_error_handlers(app)

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        model = {"id": config.model_name, "object": "model", "created": started}
        return list_object([model | {"owned_by": "prefixbatch"}], has_more=False)

    # files

    @app.post("/v1/files")
    async def upload_file(request: Request) -> dict[str, Any]:
        size = request.headers.get("content-length")
        if size is None or not size.isdigit():
            raise APIError(411, "the upload needs a Content-Length header")
        if int(size) > config.max_upload_bytes + _CHUNK:  # multipart framing adds a little
            raise _too_large(config.max_upload_bytes)
        async with request.form(max_files=1, max_fields=8) as form:
            upload, purpose = form.get("file"), form.get("purpose")
            if not isinstance(upload, UploadFile):
                raise bad_request("missing the 'file' part", param="file")
            if purpose != "batch":
                raise bad_request(
                    f'purpose must be "batch", got {json_text(purpose)}',
                    param="purpose",
                    code="invalid_value",
                )
            name, path = store.new_blob()
            filename = upload.filename or "upload.jsonl"
            try:  # whatever fails (a bad file, a full disk), no partial file stays behind
                written = await _save(upload, path, config.max_upload_bytes)
                await run_in_threadpool(check_jsonl, path)
                record = FileRecord(
                    new_id(FILE_PREFIX), written, int(time.time()), filename, "batch", name
                )
                store.add(record)
            except BadUpload as e:
                path.unlink(missing_ok=True)
                raise bad_request(f"the file is not JSONL: {e}", param="file") from None
            except BaseException:
                path.unlink(missing_ok=True)
                raise
        return record.to_openai()

    @app.get("/v1/files")
    def list_files(
        after: str | None = None,
        limit: int = Query(10_000, ge=1, le=10_000),
        order: Literal["asc", "desc"] = "desc",
        purpose: str | None = None,
    ) -> dict[str, Any]:
        match = {"purpose": purpose} if purpose else None
        return _page(store, FileRecord, after, limit, order == "desc", match)

    @app.get("/v1/files/{file_id}")
    def get_file(file_id: str) -> dict[str, Any]:
        return _file(store, file_id).to_openai()

    @app.get("/v1/files/{file_id}/content")
    def file_content(file_id: str) -> FileResponse:
        path = store.blob_path(_file(store, file_id).stored_name)
        if not path.is_file():
            raise APIError(
                500,
                f"the content of {file_id} is missing from the server's data dir",
                code="file_content_missing",
                type="server_error",
            )
        return FileResponse(path, media_type="application/octet-stream")

    @app.delete("/v1/files/{file_id}")
    def delete_file(file_id: str) -> dict[str, Any]:
        _file(store, file_id)
        try:
            if store.delete_file(file_id) is None:
                raise not_found("File", file_id)
        except FileInUse as e:
            raise APIError(
                409, f"the file is the input of batch {e}, which has not finished"
            ) from None
        return {"id": file_id, "object": "file", "deleted": True}

    # batches

    @app.post("/v1/batches")
    def create_batch(body: CreateBatch) -> dict[str, Any]:
        if body.endpoint not in URLS:
            raise bad_request(
                f"endpoint must be one of {', '.join(URLS)}, got {json_text(body.endpoint)}",
                param="endpoint",
                code="invalid_value",
            )
        window = COMPLETION_WINDOW_S.get(body.completion_window)
        if window is None:
            raise bad_request(
                f"completion_window must be one of {sorted(COMPLETION_WINDOW_S)}",
                param="completion_window",
                code="invalid_value",
            )
        _check_metadata(body.metadata)
        source = _file(store, body.input_file_id, param="input_file_id")
        if source.purpose != "batch":
            raise bad_request(
                f'the input file\'s purpose is {json_text(source.purpose)}, not "batch"',
                param="input_file_id",
            )
        now = int(time.time())
        batch = BatchRecord(
            id=new_id(BATCH_PREFIX),
            input_file_id=source.id,
            endpoint=body.endpoint,
            completion_window=body.completion_window,
            created_at=now,
            expires_at=now + window,
            model=config.model_name,
            records_name=new_stored_name(),
            metadata=body.metadata,
        )
        store.add(batch)
        worker.notify()
        return batch.to_openai()

    @app.get("/v1/batches")
    def list_batches(
        after: str | None = None, limit: int = Query(20, ge=1, le=100)
    ) -> dict[str, Any]:
        return _page(store, BatchRecord, after, limit, newest_first=True)

    @app.get("/v1/batches/{batch_id}")
    def get_batch(batch_id: str) -> dict[str, Any]:
        return _batch(store, batch_id).to_openai()

    @app.post("/v1/batches/{batch_id}/cancel")
    def cancel_batch(batch_id: str) -> dict[str, Any]:
        current = _batch(store, batch_id)
        if current.status not in ACTIVE:
            raise APIError(409, f"Cannot cancel a batch with status '{current.status}'.")
        batch = store.update_batch(
            batch_id,
            lambda b: (
                {"status": "cancelling", "cancelling_at": int(time.time())}
                if b.status in ACTIVE and b.status != "cancelling"
                else None
            ),
        )
        worker.notify()
        return batch.to_openai()

    return app


def _install_error_handlers(app: FastAPI) -> None:
    def answer(error: APIError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return answer(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(x) for x in first.get("loc", ()) if x not in ("body", "query", "path")]
        message = f"{'.'.join(loc) or 'request'}: {first.get('msg', 'invalid request')}"
        return answer(bad_request(message, param=".".join(loc) or None))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return answer(APIError(exc.status_code, str(exc.detail)))


async def _save(upload: UploadFile, path: Path, limit: int) -> int:
    """Copy the upload to ``path`` in chunks; raises 413 past ``limit`` bytes."""
    written = 0
    with open(path, "wb") as out:
        while chunk := await upload.read(_CHUNK):
            written += len(chunk)
            if written > limit:
                raise _too_large(limit)
            out.write(chunk)
    return written


def _too_large(limit: int) -> APIError:
    return APIError(413, f"the file is larger than the limit of {limit} bytes", param="file")


def _file(store: Store, file_id: str, param: str = "id") -> FileRecord:
    record = store.get(FileRecord, file_id) if FILE_ID.fullmatch(file_id) else None
    if record is None:
        raise not_found("File", file_id, param)
    return record


def _batch(store: Store, batch_id: str) -> BatchRecord:
    record = store.get(BatchRecord, batch_id) if BATCH_ID.fullmatch(batch_id) else None
    if record is None:
        raise not_found("Batch", batch_id)
    return record


def _page(
    store: Store,
    cls: type[FileRecord] | type[BatchRecord],
    after: str | None,
    limit: int,
    newest_first: bool,
    match: dict[str, str] | None = None,
) -> dict[str, Any]:
    try:
        records, more = store.page(cls, after, limit, newest_first, match)
    except UnknownCursor:
        raise not_found(cls.__name__.removesuffix("Record"), str(after), "after") from None
    return list_object([r.to_openai() for r in records], more)


def _check_metadata(metadata: dict[str, str] | None) -> None:
    """OpenAI's metadata limits: at most 16 pairs, keys up to 64 and values up to 512 chars."""
    if metadata is None:
        return
    if len(metadata) > 16:
        raise bad_request("metadata holds at most 16 pairs", param="metadata")
    for key, value in metadata.items():
        if len(key) > 64 or len(value) > 512:
            raise bad_request(
                "metadata keys are at most 64 characters and values at most 512",
                param="metadata",
            )
