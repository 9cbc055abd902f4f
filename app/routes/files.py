"""Shared route builders for the two uploaded-file resources (models and datasets)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import FileResponse
from sqlalchemy.orm import Session

from app.auth import Principal, authenticate
from app.config import get_settings
from app.db import get_db, get_read_db
from app.models import Dataset, Model
from app.schemas import FileOut, ModelPage, error_responses, file_out
from app.services import files
from app.storage import make_store
from app.uploads import receive


def download_response(request: Request, path, sha256: str, filename: str) -> Response:
    """Serves a blob with its SHA-256 as ETag; Range requests are handled by FileResponse."""
    etag = f'"{sha256}"'
    if request.headers.get("if-none-match") in (etag, "*"):
        return Response(status_code=304, headers={"ETag": etag})
    return FileResponse(path, filename=filename, media_type="application/octet-stream",
                        headers={"ETag": etag, "Accept-Ranges": "bytes"})


def file_router(kind: str, row_type: type[Model] | type[Dataset]) -> APIRouter:
    router = APIRouter(prefix=f"/v1/{kind}", tags=[kind], responses=error_responses(401))

    @router.post("", status_code=201, response_model=FileOut, responses=error_responses(400, 413, 415, 422),
                 openapi_extra={"requestBody": {"content": {
                     "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
                     "multipart/form-data": {"schema": {"type": "object", "properties": {
                         "file": {"type": "string", "format": "binary"}}, "required": ["file"]}}}}})
    async def upload(request: Request, name: str | None = Query(None, max_length=255),
                     db: Session = Depends(get_db), principal: Principal = Depends(authenticate)) -> FileOut:
        settings = get_settings()
        received = await receive(request, settings.tmp_dir, settings.max_upload_bytes)
        row = await files.store_upload(db, make_store(settings), settings, principal, row_type, received, name)
        return file_out(row, kind)

    @router.get("", response_model=ModelPage)
    def list_(limit: int = Query(50, ge=1, le=200), after: str | None = Query(None, max_length=40),
              db: Session = Depends(get_read_db), principal: Principal = Depends(authenticate)) -> ModelPage:
        rows, more = files.list_owned(db, principal, row_type, limit, after)
        return ModelPage(data=[file_out(r, kind) for r in rows], has_more=more,
                         next=rows[-1].id if more else None)

    @router.get("/{ident}", response_model=FileOut, responses=error_responses(404))
    def show(ident: str, db: Session = Depends(get_read_db), principal: Principal = Depends(authenticate)) -> FileOut:
        return file_out(files.get_owned(db, principal, row_type, ident), kind)

    @router.delete("/{ident}", status_code=204, responses=error_responses(404))
    def delete(ident: str, db: Session = Depends(get_db), principal: Principal = Depends(authenticate)) -> None:
        files.delete_owned(db, make_store(), principal, row_type, ident)

    @router.get("/{ident}/file", responses={200: {"content": {"application/octet-stream": {}}},
                                           **error_responses(404)})
    def download(ident: str, request: Request, db: Session = Depends(get_read_db),
                 principal: Principal = Depends(authenticate)) -> Response:
        row = files.get_owned(db, principal, row_type, ident)
        return download_response(request, files.blob_path(make_store(), row.sha256), row.sha256, row.name)

    return router
