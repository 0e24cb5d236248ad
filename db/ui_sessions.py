"""Jobs-page (/ui) sessions: one-time login links and browser sessions, both bound to an API key.

Invariants:

- Only a token's SHA-256 is stored (``ui_sessions.token_sha256``); the token itself exists only in
  the login URL or the cookie. Tokens are 32 random bytes, so a fast hash is enough.
- A login token works once: exchanging it deletes its row in the transaction that creates the
  session, so two concurrent exchanges cannot both succeed.
- A session is only as good as its key: the caller resolves ``api_key_id`` to a principal on every
  request, so revoking the key ends its sessions at once (and deleting it deletes them, ON DELETE
  CASCADE).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import secrets

from sqlalchemy import Connection, Engine, text

LOGIN_TTL = dt.timedelta(minutes=5)
SESSION_TTL = dt.timedelta(hours=8)

_INSERT = text("""
INSERT INTO ui_sessions (token_sha256, api_key_id, kind, expires_at)
VALUES (:digest, :key_id, :kind, now() + make_interval(secs => :ttl))
""")

# Expired rows are removed whenever a login link is made, so the table stays small without a job.
_EXPIRED = text("DELETE FROM ui_sessions WHERE expires_at < now()")

_TAKE_LOGIN = text("""
DELETE FROM ui_sessions WHERE token_sha256 = :digest AND kind = 'login' AND expires_at > now()
RETURNING api_key_id
""")

_PEEK_LOGIN = text("""
SELECT api_key_id FROM ui_sessions WHERE token_sha256 = :digest AND kind = 'login' AND expires_at > now()
""")

_SESSION = text("""
SELECT api_key_id FROM ui_sessions WHERE token_sha256 = :digest AND kind = 'session' AND expires_at > now()
""")

_END = text("DELETE FROM ui_sessions WHERE token_sha256 = :digest AND kind = 'session'")


def digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def csrf_token(session_token: str) -> str:
    """The token every /ui form posts back: bound to the session, unguessable without its cookie."""
    return hmac.new(session_token.encode(), b"imgq-ui-csrf", hashlib.sha256).hexdigest()


def csrf_ok(session_token: str, offered: str | None) -> bool:
    return bool(offered) and hmac.compare_digest(csrf_token(session_token), str(offered))


def _insert(conn: Connection, key_id: str, kind: str, ttl: dt.timedelta) -> str:
    token = secrets.token_urlsafe(32)
    conn.execute(_INSERT, {"digest": digest(token), "key_id": key_id, "kind": kind, "ttl": ttl.total_seconds()})
    return token


def _create(engine: Engine, key_id: str, kind: str, ttl: dt.timedelta) -> str:
    with engine.begin() as conn:
        conn.execute(_EXPIRED)
        return _insert(conn, key_id, kind, ttl)


def create_login(engine: Engine, key_id: str) -> str:
    """A one-time login token for the key, valid for :data:`LOGIN_TTL`."""
    return _create(engine, key_id, "login", LOGIN_TTL)


def create_session(engine: Engine, key_id: str) -> str:
    """A session token for the key (the login form's path), valid for :data:`SESSION_TTL`."""
    return _create(engine, key_id, "session", SESSION_TTL)


def exchange_login(engine: Engine, token: str) -> tuple[str, str] | None:
    """Spend a login token: ``(session_token, api_key_id)``, or None if it is unknown, used or expired."""
    if not token:
        return None
    with engine.begin() as conn:
        key_id = conn.execute(_TAKE_LOGIN, {"digest": digest(token)}).scalar_one_or_none()
        if key_id is None:
            return None
        return _insert(conn, key_id, "session", SESSION_TTL), key_id


def login_key_id(engine: Engine, token: str | None) -> str | None:
    """The API key id of a live, unspent login token, without spending it (the confirm page)."""
    if not token:
        return None
    with engine.connect() as conn:
        return conn.execute(_PEEK_LOGIN, {"digest": digest(token)}).scalar_one_or_none()


def session_key_id(engine: Engine, token: str | None) -> str | None:
    """The API key id of a live session, or None."""
    if not token:
        return None
    with engine.connect() as conn:
        return conn.execute(_SESSION, {"digest": digest(token)}).scalar_one_or_none()


def end_session(engine: Engine, token: str) -> None:
    with engine.begin() as conn:
        conn.execute(_END, {"digest": digest(token)})
