"""Shared route builders for the two uploaded-file resources (models and datasets)."""

from __future__ import annotations

from urllib.parse import quote

from fastapi import APIRouter, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, RedirectResponse, StreamingResponse
from sqlalchemy.orm import Session

from app.api.dependencies import Caller, ReadDb, WriteDb
from app.api.schemas import FileOut, ModelPage, error_responses
from app.api.views import file_out
from app.blobs.store import BlobStore, make_store
from app.core.auth import Principal
from app.core.config import Settings, get_settings
from app.core.errors import APIError
from app.core.tables import DatasetFile, ModelFile
from app.files import service as files
from app.files.receive import FRAMING_SLACK, Received, receive
from app.teams import limits


def _byte_range(header: str | None, size: int) -> tuple[int, int] | None | str:
    """One `bytes=a-b` range -> (start, end) inclusive; None: serve it all (no header, or several ranges,
    which a server may ignore); "unsatisfiable": a 416."""
    if not header or not header.startswith("bytes=") or "," in header:
        return None
    first, _, last = header[6:].strip().partition("-")
    try:
        if not first:  # the last N bytes
            n = int(last)
            if n <= 0:
                return "unsatisfiable"
            return max(0, size - n), size - 1
        start = int(first)
        end = min(int(last), size - 1) if last else size - 1
    except ValueError:
        return None
    if start < 0 or start >= size or end < start:
        return "unsatisfiable"
    return start, end


def download_response(request: Request, store: BlobStore, sha256: str, filename: str) -> Response:
    """Serves a blob with its SHA-256 as ETag, honouring If-None-Match and one Range: from the file itself
    when the store has one, else streamed from the store, or a 307 to a presigned URL when the store hands
    those out."""
    etag = f'"{sha256}"'
    if request.headers.get("if-none-match") in (etag, "*"):
        return Response(status_code=304, headers={"ETag": etag})
    try:
        local = store.local_path(sha256)
        if local is not None:
            return FileResponse(local, filename=filename, media_type="application/octet-stream",
                                headers={"ETag": etag, "Accept-Ranges": "bytes"})
        url = store.presigned_url(sha256, filename)
        if url is not None:
            return RedirectResponse(url, status_code=307, headers={"ETag": etag})
        size = store.size(sha256)
    except FileNotFoundError:
        raise APIError(404, "blob_missing", "the stored file is missing") from None
    headers = {"ETag": etag, "Accept-Ranges": "bytes",
               "Content-Disposition": f"attachment; filename*=utf-8''{quote(filename)}"}
    if_range = request.headers.get("if-range")
    wanted = _byte_range(request.headers.get("range"), size) if if_range in (None, etag) else None
    if wanted == "unsatisfiable":
        return Response(status_code=416, headers={**headers, "Content-Range": f"bytes */{size}"})
    if wanted is None:
        start, end, status = 0, size - 1, 200
    else:
        (start, end), status = wanted, 206
        headers["Content-Range"] = f"bytes {start}-{end}/{size}"
    headers["Content-Length"] = str(end - start + 1)
    body = store.read_range(sha256, start, end) if size else iter(())
    return StreamingResponse(body, status_code=status, media_type="application/octet-stream", headers=headers)


def _declared(request: Request) -> int:
    """The body's declared length less multipart framing (0 when not declared): what the upload will store."""
    declared = request.headers.get("content-length", "")
    return max(0, int(declared) - FRAMING_SLACK) if declared.isdigit() else 0


def _check_received(db: Session, settings: Settings, principal: Principal, received: Received) -> None:
    """The team's stored bytes with this upload's real size; over the quota, the received file goes."""
    try:
        limits.check_upload_bytes(db, settings, principal.team_id, received.size)
    except BaseException:
        received.path.unlink(missing_ok=True)
        raise
    finally:
        db.rollback()  # no transaction stays open while the upload is screened and stored


def file_router(kind: str, row_type: type[ModelFile] | type[DatasetFile]) -> APIRouter:
    router = APIRouter(prefix=f"/v1/{kind}", tags=[kind], responses=error_responses(401))

    @router.post("", status_code=201, response_model=FileOut,
                 responses=error_responses(400, 413, 415, 422, 429, 507),
                 openapi_extra={"requestBody": {"content": {
                     "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
                     "multipart/form-data": {"schema": {"type": "object", "properties": {
                         "file": {"type": "string", "format": "binary"}}, "required": ["file"]}}}}})
    async def upload(request: Request, db: WriteDb, principal: Caller,
                     name: str | None = Query(None, max_length=255)) -> FileOut:
        settings = get_settings()
        await run_in_threadpool(limits.check_upload_start, db, settings, principal.team_id, _declared(request))
        received = await receive(request, settings.tmp_dir, settings.max_upload_bytes)
        await run_in_threadpool(_check_received, db, settings, principal, received)
        row = await files.store_upload(db, make_store(settings), settings, principal, row_type, received, name)
        return file_out(row, kind)

    @router.get("", response_model=ModelPage, responses=error_responses(422))
    def list_(db: ReadDb, principal: Caller, limit: int = Query(50, ge=1, le=200),
              after: str | None = Query(None, max_length=40),
              sha256: str | None = Query(None, pattern="^[0-9a-f]{64}$", description=(
                  "Only the team's files with this content (lowercase hex)."))) -> ModelPage:
        rows, more = files.list_owned(db, principal, row_type, limit, after, sha256)
        return ModelPage(data=[file_out(r, kind) for r in rows], has_more=more,
                         next=rows[-1].id if more else None)

    @router.get("/{ident}", response_model=FileOut, responses=error_responses(404))
    def show(ident: str, db: ReadDb, principal: Caller) -> FileOut:
        return file_out(files.get_owned(db, principal, row_type, ident), kind)

    @router.delete("/{ident}", status_code=204, responses=error_responses(404))
    def delete(ident: str, db: WriteDb, principal: Caller) -> None:
        files.delete_owned(db, make_store(), principal, row_type, ident)

    @router.get("/{ident}/file", responses={200: {"content": {"application/octet-stream": {}}},
                                           **error_responses(404)})
    def download(ident: str, request: Request, db: ReadDb, principal: Caller) -> Response:
        row = files.get_owned(db, principal, row_type, ident)
        return download_response(request, make_store(), row.sha256, row.name)

    return router
