"""The values the session store hands out, and how they are built from documents."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from docstore import Document

__all__ = [
    "Session",
    "Message",
    "SessionState",
    "RESERVED_KEY",
    "EPOCH",
    "to_micros",
    "from_micros",
    "new_session",
    "new_state",
    "session_state_from_document",
    "message_from_document",
]

# The one top-level key of a session document that belongs to the store, not the user.
RESERVED_KEY = "_session"
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_MICROSECOND = timedelta(microseconds=1)


@dataclass(frozen=True)
class Session:
    """One session: the user's data plus the metadata PostgreSQL keeps for it."""

    id: str
    user_id: str | None
    data: dict[str, Any]
    created_at: datetime
    updated_at: datetime
    expires_at: datetime | None
    version: int


@dataclass(frozen=True)
class Message:
    """One message of a session's conversation."""

    session_id: str
    seq: int
    id: str
    role: str
    content: str
    metadata: dict[str, Any]
    created_at: datetime


@dataclass(frozen=True)
class SessionState:
    """A session as both tiers hold it: the public view plus its conversation key.

    The conversation key stays the same for the life of a session (also across
    `rotate_session_id`); messages are stored under it.
    """

    session: Session
    conversation: str


def to_micros(moment: datetime) -> int:
    """Return an aware datetime as integer microseconds since the Unix epoch (exact)."""
    return (moment - EPOCH) // _MICROSECOND


def from_micros(micros: int) -> datetime:
    """Return the UTC datetime of integer microseconds since the Unix epoch."""
    return EPOCH + timedelta(0, 0, micros)  # positional: no keyword parsing


def _utc(moment: datetime) -> datetime:
    # Both tiers must return equal objects, so every timestamp takes the same
    # round trip through microseconds that the cache encoding does: a UTC
    # datetime (what PostgreSQL and the memory store hand out) already has.
    if moment.tzinfo is timezone.utc:
        return moment
    return from_micros(to_micros(moment))


_new_object = object.__new__


def new_session(
    session_id: str,
    user_id: str | None,
    data: dict[str, Any],
    created_at: datetime,
    updated_at: datetime,
    expires_at: datetime | None,
    version: int,
) -> Session:
    """Return a `Session` built from checked values, without the frozen dataclass's
    seven `object.__setattr__` calls (it is built on every cache hit)."""
    session: Session = _new_object(Session)
    fields = session.__dict__
    fields["id"] = session_id
    fields["user_id"] = user_id
    fields["data"] = data
    fields["created_at"] = created_at
    fields["updated_at"] = updated_at
    fields["expires_at"] = expires_at
    fields["version"] = version
    return session


def new_state(session: Session, conversation: str) -> SessionState:
    """Return a `SessionState` (see `new_session`)."""
    state: SessionState = _new_object(SessionState)
    fields = state.__dict__
    fields["session"] = session
    fields["conversation"] = conversation
    return state


def session_state_from_document(doc: Document, session_id: str) -> SessionState | None:
    """Return the session a document holds, or None if it is not a session document."""
    reserved = doc.data.get(RESERVED_KEY)
    if not isinstance(reserved, dict):
        return None
    user_id = reserved.get("user_id")
    conversation = reserved.get("conv")
    if not (user_id is None or isinstance(user_id, str)) or not isinstance(conversation, str):
        return None
    data = dict(doc.data)
    del data[RESERVED_KEY]
    session = new_session(
        session_id,
        user_id,
        data,
        _utc(doc.created_at),
        _utc(doc.updated_at),
        None if doc.expires_at is None else _utc(doc.expires_at),
        doc.version,
    )
    return new_state(session, conversation)


def message_from_document(doc: Document, session_id: str) -> Message | None:
    """Return the message a document holds, or None if it is not a message document."""
    data = doc.data
    seq = data.get("seq")
    message_id = data.get("message_id")
    role = data.get("role")
    content = data.get("content")
    metadata = data.get("metadata")
    if (
        isinstance(seq, bool)
        or not isinstance(seq, int)
        or not isinstance(message_id, str)
        or not isinstance(role, str)
        or not isinstance(content, str)
        or not isinstance(metadata, dict)
    ):
        return None
    return Message(
        session_id=session_id,
        seq=seq,
        id=message_id,
        role=role,
        content=content,
        metadata=metadata,
        created_at=_utc(doc.created_at),
    )
