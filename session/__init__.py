"""Write-through cached session store: PostgreSQL documents, Redis hot copies."""

from .async_store import AsyncSessionStore
from .config import get_async_session_store, get_session_store
from .errors import (
    InvalidSessionData,
    SessionError,
    SessionNotFound,
    StoreUnavailable,
    VersionConflict,
)
from .models import Message, Session
from .store import SessionStore

__all__ = [
    "SessionStore",
    "Session",
    "Message",
    "get_session_store",
    "AsyncSessionStore",
    "get_async_session_store",
    "SessionError",
    "SessionNotFound",
    "VersionConflict",
    "InvalidSessionData",
    "StoreUnavailable",
]
