"""The FastAPI dependencies routes take, as Annotated aliases: `db: ReadDb, principal: Caller`."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends
from sqlalchemy.orm import Session

from app.core.auth import Principal, authenticate, require_admin
from app.core.config import Settings, get_settings
from app.core.db import get_db, get_read_db

WriteDb = Annotated[Session, Depends(get_db)]  # the primary: every write goes here
ReadDb = Annotated[Session, Depends(get_read_db)]  # a replica when one is configured (SQUEEZE_READ_DATABASE_URL)
Caller = Annotated[Principal, Depends(authenticate)]  # the key's team; 401 without a valid key
Admin = Annotated[Principal, Depends(require_admin)]  # 403 for a team key
CurrentSettings = Annotated[Settings, Depends(get_settings)]
