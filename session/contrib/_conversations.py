"""What the conversation adapters share: default stores, named conversations, runners.

A framework names a conversation with a key of the application's choosing;
the store names sessions with unguessable ids of its own. `Conversation`
maps one to the other through the public API only: the session of key K in
namespace N is the one whose `user_id` is `"N:K"` (found with
`list_sessions`, created on the first write). When two processes (or two
tasks or threads of one) start the same new conversation at the same moment
and both create a session, every one picks the same: the oldest
(`created_at`, then id); the other stays empty.

One implementation for both stores: what a conversation does is written once
as steps (generators) that yield `StoreCall`s and receive their results, as
`session.protocol` does for the stores themselves. `run_sync` answers the
calls on a `SessionStore`; `run_async` awaits them on an `AsyncSessionStore`.
`Conversation.arun` serves asyncio frameworks with either store: an
`AsyncSessionStore` is awaited on the loop (no thread); a `SessionStore`
runs all the steps of the call in one worker thread (`asyncio.to_thread`),
so the event loop never blocks.
"""

from __future__ import annotations

import asyncio
import atexit
import functools
import inspect
import json
import logging
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from docstore.store import DEFAULT_MAX_DOCUMENT_BYTES

from ..async_store import AsyncSessionStore
from ..config import get_async_session_store, get_session_store
from ..errors import InvalidSessionData, SessionNotFound
from ..store import SessionStore

__all__ = [
    "AnyStore",
    "Conversation",
    "StoreCall",
    "Steps",
    "call",
    "run_sync",
    "run_async",
    "default_store",
    "default_async_store",
    "is_async_store",
    "check_store",
    "check_key",
    "encode_item",
    "decode_item",
    "MAX_ITEM_BYTES",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")

AnyStore = SessionStore | AsyncSessionStore

# How many sessions of one conversation key are compared to pick the canonical one.
_CANDIDATES = 20
# What one item's JSON may weigh: the docstore's default document limit, less
# room for the rest of the message document (ids, role, metadata, seq).
MAX_ITEM_BYTES = DEFAULT_MAX_DOCUMENT_BYTES - 2048


@dataclass(frozen=True)
class StoreCall:
    """One call of a store method, by name: the same for both stores."""

    method: str
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)


# Steps yield store calls, are sent their results (or thrown their errors), return T.
Steps = Generator[StoreCall, Any, T]


def call(method: str, *args: Any, **kwargs: Any) -> Steps[Any]:
    """Yield one store call; return its result (`x = yield from call(...)`)."""
    return (yield StoreCall(method, args, kwargs))


def run_sync(store: SessionStore, steps: Steps[T]) -> T:
    """Run steps against a `SessionStore`; a call's error is raised inside the steps."""
    try:
        request = next(steps)
        while True:
            try:
                result = getattr(store, request.method)(*request.args, **request.kwargs)
            except Exception as exc:
                request = steps.throw(exc)
            else:
                request = steps.send(result)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]


async def run_async(store: AsyncSessionStore, steps: Steps[T]) -> T:
    """Run steps against an `AsyncSessionStore`, awaiting each call on the running loop."""
    try:
        request = next(steps)
        while True:
            try:
                result = await getattr(store, request.method)(*request.args, **request.kwargs)
            except Exception as exc:
                request = steps.throw(exc)
            else:
                request = steps.send(result)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]


@functools.cache
def default_store() -> SessionStore:
    """Return the process-wide `SessionStore` the adapters use when given none.

    Built on first use by `get_session_store()` (so from `POSTGRES_CONNECTION_STRING`
    / `DATABASE_URL` and `REDIS_URL`), closed when the interpreter exits.
    """
    store = get_session_store()
    atexit.register(store.close)
    return store


@functools.cache
def default_async_store() -> AsyncSessionStore:
    """Return the process-wide `AsyncSessionStore` the asyncio adapters use when given none.

    Built on first use by `get_async_session_store()` (same variables as
    `default_store`); its connections open on its first call and belong to
    that call's event loop, so one process with one event loop shares it.
    Closed when the interpreter exits (best effort: `aclose()` on a new loop).
    """
    store = get_async_session_store()
    atexit.register(_close_at_exit, store)
    return store


def _close_at_exit(store: AsyncSessionStore) -> None:
    try:
        asyncio.run(store.aclose())
    except Exception as exc:  # the loop it used is gone: the process's end closes the rest
        logger.debug("closing the default asyncio session store at exit: %s", exc)


def is_async_store(store: object) -> bool:
    """Return True if the store's methods are coroutines (an `AsyncSessionStore`)."""
    return inspect.iscoroutinefunction(getattr(store, "get_messages", None))


def check_store(store: object) -> AnyStore:
    """Return a `SessionStore` or an `AsyncSessionStore` (or a stand-in), else raise TypeError."""
    if not all(callable(getattr(store, name, None)) for name in ("list_sessions", "get_messages")):
        raise TypeError(
            f"store must be a SessionStore or an AsyncSessionStore, not {type(store).__name__}"
        )
    return store  # type: ignore[return-value]


def check_key(key: object, what: str) -> str:
    """Return a framework's conversation key, or raise ValueError if it cannot be one."""
    if not isinstance(key, str) or not key:
        raise ValueError(f"{what} must be a non-empty str, not {key!r}")
    return key


class Conversation:
    """The session holding one named conversation of one store (either kind).

    `find()` never writes: a key never seen before has no session yet.
    `find_or_create()` creates it. The session id found is remembered; `forget()`
    drops it (after `SessionNotFound`: the session expired or was deleted).
    Those and `read`/`write` are steps; `run` (a `SessionStore` only) and
    `arun` (either store) execute them.
    """

    def __init__(self, store: AnyStore, namespace: str, key: str) -> None:
        self.store = store
        self.is_async = is_async_store(store)
        self.owner = f"{namespace}:{key}"
        self._session_id: str | None = None

    def run(self, steps: Steps[T]) -> T:
        """Run steps in the calling thread; the store must be a `SessionStore`."""
        if self.is_async:
            steps.close()
            raise TypeError("the store is an AsyncSessionStore: await the adapter's async methods")
        assert isinstance(self.store, SessionStore)
        return run_sync(self.store, steps)

    async def arun(self, steps: Steps[T]) -> T:
        """Run steps without blocking the event loop: awaited, or in one worker thread."""
        if self.is_async:
            assert isinstance(self.store, AsyncSessionStore)
            return await run_async(self.store, steps)
        assert isinstance(self.store, SessionStore)
        return await asyncio.to_thread(run_sync, self.store, steps)

    def find(self) -> Steps[str | None]:
        """Return the conversation's session id, or None if it has none yet."""
        if self._session_id is None:
            self._session_id = yield from self._canonical()
        return self._session_id

    def find_or_create(self) -> Steps[str]:
        """Return the conversation's session id, creating its session if needed."""
        if self._session_id is None:
            found = yield from self._canonical()
            if found is None:
                yield from call("create_session", self.owner)
                # Read back rather than use ours: another process may have
                # created one at the same moment, and all must pick the same.
                found = yield from self._canonical()
                if found is None:
                    raise SessionNotFound("the conversation's new session vanished")
            self._session_id = found
        return self._session_id

    def forget(self, session_id: str) -> None:
        """Drop the remembered id if it is still `session_id`."""
        if self._session_id == session_id:
            self._session_id = None

    def _canonical(self) -> Steps[str | None]:
        sessions = yield from call("list_sessions", self.owner, limit=_CANDIDATES)
        if not sessions:
            return None
        if len(sessions) > 1:
            logger.info("conversation key has %d sessions; using the oldest", len(sessions))
        return str(min(sessions, key=lambda session: (session.created_at, session.id)).id)

    def write(self, action: Callable[[str], Steps[T]]) -> Steps[T]:
        """Run `action(session_id)`, creating the session first; retry once if it is gone."""
        session_id = yield from self.find_or_create()
        try:
            return (yield from action(session_id))
        except SessionNotFound:
            # Expired or deleted meanwhile: the key starts a new conversation.
            self.forget(session_id)
        return (yield from action((yield from self.find_or_create())))

    def read(self, action: Callable[[str], Steps[T]], empty: T) -> Steps[T]:
        """Run `action(session_id)`, or return `empty` if the conversation has no session."""
        session_id = yield from self.find()
        if session_id is None:
            return empty
        try:
            return (yield from action(session_id))
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
