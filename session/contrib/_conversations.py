"""What the conversation adapters share: the default store, named conversations, threads.

A framework names a conversation with a key of the application's choosing;
the store names sessions with unguessable ids of its own. `Conversation`
maps one to the other through the public API only: the session of key K in
namespace N is the one whose `user_id` is `"N:K"` (found with
`list_sessions`, created on the first write). When two processes start the
same new conversation at the same moment and both create a session, every
process picks the same one: the oldest (`created_at`, then id).

The adapters serve asyncio frameworks over the synchronous `SessionStore`:
`call_store` runs a store call in a worker thread (`asyncio.to_thread`), so
the event loop never blocks. A store whose methods are coroutines (an
`AsyncSessionStore`) is awaited directly instead, so moving an adapter to
the asyncio store changes only what `default_store` builds.
"""

from __future__ import annotations

import asyncio
import atexit
import functools
import inspect
import json
import logging
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from docstore.store import DEFAULT_MAX_DOCUMENT_BYTES

from ..config import get_session_store
from ..errors import InvalidSessionData, SessionNotFound
from ..store import SessionStore

__all__ = [
    "Conversation",
    "default_store",
    "call_store",
    "is_async_store",
    "check_key",
    "encode_item",
    "decode_item",
    "MAX_ITEM_BYTES",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")

# How many sessions of one conversation key are compared to pick the canonical one.
_CANDIDATES = 20
# What one item's JSON may weigh: the docstore's default document limit, less
# room for the rest of the message document (ids, role, metadata, seq).
MAX_ITEM_BYTES = DEFAULT_MAX_DOCUMENT_BYTES - 2048


@functools.cache
def default_store() -> SessionStore:
    """Return the process-wide store the adapters use when given none.

    Built on first use by `get_session_store()` (so from `POSTGRES_CONNECTION_STRING`
    / `DATABASE_URL` and `REDIS_URL`), closed when the interpreter exits.
    """
    store = get_session_store()
    atexit.register(store.close)
    return store


async def call_store(call: Callable[[], T]) -> T:
    """Run a blocking store call without blocking the event loop."""
    return await asyncio.to_thread(call)


def is_async_store(store: object) -> bool:
    """Return True if the store's methods are coroutines (an `AsyncSessionStore`)."""
    return inspect.iscoroutinefunction(getattr(store, "get_messages", None))


def check_key(key: object, what: str) -> str:
    """Return a framework's conversation key, or raise ValueError if it cannot be one."""
    if not isinstance(key, str) or not key:
        raise ValueError(f"{what} must be a non-empty str, not {key!r}")
    return key


class Conversation:
    """The session holding one named conversation of one store (thread-safe).

    `find()` never writes: a key never seen before has no session yet.
    `find_or_create()` creates it. The session id found is remembered; `forget()`
    drops it (after `SessionNotFound`: the session expired or was deleted).
    """

    def __init__(self, store: SessionStore, namespace: str, key: str) -> None:
        self.store = store
        self.owner = f"{namespace}:{key}"
        self._lock = threading.Lock()
        self._session_id: str | None = None

    def find(self) -> str | None:
        """Return the conversation's session id, or None if it has none yet."""
        with self._lock:
            if self._session_id is None:
                self._session_id = self._canonical()
            return self._session_id

    def find_or_create(self) -> str:
        """Return the conversation's session id, creating its session if needed."""
        with self._lock:
            if self._session_id is None:
                found = self._canonical()
                if found is None:
                    self.store.create_session(self.owner)
                    # Read back rather than use ours: another process may have
                    # created one at the same moment, and all must pick the same.
                    found = self._canonical()
                    if found is None:
                        raise SessionNotFound("the conversation's new session vanished")
                self._session_id = found
            return self._session_id

    def forget(self, session_id: str) -> None:
        """Drop the remembered id if it is still `session_id`."""
        with self._lock:
            if self._session_id == session_id:
                self._session_id = None

    def _canonical(self) -> str | None:
        sessions = self.store.list_sessions(self.owner, limit=_CANDIDATES)
        if not sessions:
            return None
        if len(sessions) > 1:
            logger.info("conversation key has %d sessions; using the oldest", len(sessions))
        return min(sessions, key=lambda session: (session.created_at, session.id)).id

    def write(self, action: Callable[[str], T]) -> T:
        """Run `action(session_id)`, creating the session first; retry once if it is gone."""
        session_id = self.find_or_create()
        try:
            return action(session_id)
        except SessionNotFound:
            # Expired or deleted meanwhile: the key starts a new conversation.
            self.forget(session_id)
        return action(self.find_or_create())

    def read(self, action: Callable[[str], T], empty: T) -> T:
        """Run `action(session_id)`, or return `empty` if the conversation has no session."""
        session_id = self.find()
        if session_id is None:
            return empty
        try:
            return action(session_id)
        except SessionNotFound:
            self.forget(session_id)
            return empty


def encode_item(item: object, index: int) -> str:
    """Return a JSON object as the text a message stores, or raise InvalidSessionData.

    Called for every item of a batch before any is written, so that bad input
    never leaves half a batch behind. Non-ASCII text stays as it is (compact);
    text that is not valid Unicode (a lone surrogate) is kept in `\\u` escapes.
    """
    if not isinstance(item, dict):
        raise InvalidSessionData(f"item {index} is a {type(item).__name__}, not a JSON object")
    try:
        text = json.dumps(item, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError, RecursionError) as exc:
        raise InvalidSessionData(f"item {index} is not JSON: {exc}") from None
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        text = json.dumps(item, allow_nan=False, separators=(",", ":"))
        size = len(text)
    if size > MAX_ITEM_BYTES:
        raise InvalidSessionData(
            f"item {index} is {size} bytes of JSON, more than the limit of {MAX_ITEM_BYTES}"
        )
    return text


def decode_item(text: str) -> dict[str, Any] | None:
    """Return the JSON object a message holds, or None if it holds something else."""
    try:
        item = json.loads(text)
    except ValueError:
        return None
    return item if isinstance(item, dict) else None
