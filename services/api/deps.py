"""What every request needs: a database session, the caller, cursors."""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass

import anyio
from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool
from sqlalchemy.orm import Session

from .. import tokens

CONTROL = re.compile(r"[\x00-\x1f\x7f]")
bearer = HTTPBearer(auto_error=False, description="a token from `facecluster token create --user NAME`")


async def get_session(request: Request) -> AsyncIterator[Session]:
    """A session for the request. Made in the event loop (a Session connects only when first
    used, in the endpoint's thread) and closed in a worker thread (that returns the connection
    to the pool: I/O): one hand-over between threads fewer per request than a plain generator,
    whose start and end both run in the thread pool."""
    session = request.app.state.sessions()
    try:
        yield session
    finally:
        with anyio.CancelScope(shield=True):  # a client gone away still gives the connection back
            await run_in_threadpool(session.close)


@dataclass(frozen=True)
class Caller:
    user_id: int
    name: str


def get_caller(credentials: HTTPAuthorizationCredentials | None = Depends(bearer),
               session: Session = Depends(get_session)) -> Caller:
    found = tokens.authenticate(session, credentials.credentials) if credentials else None
    if found is None:
        raise HTTPException(401, "a valid bearer token is needed: Authorization: Bearer <token> "
                                 "(make one with `facecluster token create --user NAME`)",
                            headers={"WWW-Authenticate": "Bearer"})
    return Caller(*found)


def encode_cursor(key: list) -> str:
    return base64.urlsafe_b64encode(json.dumps(key, separators=(",", ":")).encode()).decode().rstrip("=")


def _is_text(v: str) -> bool:
    """What a name can be: UTF-8 without control characters (the database refuses NUL or a lone
    surrogate in a parameter, and no stored name holds either)."""
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return not CONTROL.search(v)


def decode_cursor(cursor: str | None, shape: tuple[type, ...]) -> list | None:
    """The sort key a cursor carries, checked against ``shape`` (types; ``type(None)`` allowed
    where a name may be missing); a cursor that is not ours answers 400."""
    if not cursor:
        return None
    try:
        key = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (binascii.Error, ValueError, UnicodeDecodeError):
        key = None
    ok = (isinstance(key, list) and len(key) == len(shape)
          and all(isinstance(v, t) and not isinstance(v, bool) for v, t in zip(key, shape)))
    if ok and any(isinstance(v, int) and not (-2**63 <= v < 2**63) for v in key):
        ok = False
    if ok and any(isinstance(v, str) and not _is_text(v) for v in key):
        ok = False
    if not ok:
        raise HTTPException(400, "cursor is not one this API gave out: pass next_cursor of the previous page")
    return key
