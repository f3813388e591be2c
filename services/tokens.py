"""Bearer tokens of the API: made at random, stored only as their sha256, compared in constant time.

A leaked database or log therefore holds nothing a caller could sign in with; the token itself
is shown once, when it is made.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

from sqlalchemy.orm import Session

from .store import repository as repo

PREFIX = "fc_"


def digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def create(session: Session, user_name: str, label: str | None = None) -> tuple[int, str]:
    """(token id, the token) for the user, who is created if new; the token is not kept."""
    user = repo.get_or_create_user(session, user_name)
    token = PREFIX + secrets.token_urlsafe(32)
    row = repo.add_token(session, user.id, digest(token), (label or "").strip() or None)
    return row.id, token


def authenticate(session: Session, token: str) -> tuple[int, str] | None:
    """(user id, user name) of a valid token, else None."""
    if not token or len(token) > 200:
        return None
    wanted = digest(token)
    found = repo.token_owner(session, wanted)
    if found is None or not hmac.compare_digest(found[2], wanted):
        return None
    return found[0], found[1]
