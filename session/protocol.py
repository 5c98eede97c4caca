"""What every session store call does, as plain code that never waits for I/O itself.

PostgreSQL (any document store) is the source of truth; Redis holds copies
that follow the lease-and-fence protocol of `coherence`. Each public call of
`SessionStore` and `AsyncSessionStore` is a generator method of
`SessionProtocol` (as psycopg 3's `generators.py` works): it yields the I/O
it needs as requests (`CacheCall`, `CachePipeline`, `DocCall`, `Sleep`,
`InTransaction`), receives each result, or has the failure thrown in at that
point, and returns the call's result. `store.py` runs the requests on a
`DocumentStore` and a `redis.Redis`; `async_store.py` awaits them on an
`AsyncDocumentStore` and a `redis.asyncio.Redis`. So the coherence rules,
validation, serialisation, error translation, the circuit breaker, the
pending invalidations and the restart fence exist once, and a sync and an
async store on the same table and prefix speak the same protocol.

A runner that gives up on a call mid-request (an asyncio cancellation)
throws `Abandoned` into the generator: the protocol then remembers the
session as possibly stale and yields the clean-up it needs (removing a copy
that a committed write could not refresh, releasing fill leases), which the
runner finishes in the background.
"""

from __future__ import annotations

import contextvars
import hashlib
import logging
import math
import secrets
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any, NamedTuple, TypeVar, Union

import redis

import docstore
from docstore.store import MAX_NAME_LENGTH, check_ttl, encode_data

from . import coherence
from .breaker import CircuitBreaker
from .coherence import (
    FillResult,
    MessageWindow,
    ProtocolError,
    ReadReply,
    SessionKeys,
    SessionRead,
    TailRead,
)
from .errors import (
    InvalidSessionData,
    SessionError,
    SessionNotFound,
    StoreUnavailable,
    VersionConflict,
)
from .models import (
    RESERVED_KEY,
    Message,
    Session,
    SessionState,
    message_from_document,
    session_state_from_document,
    to_micros,
)
from .serializer import (
    TOMBSTONE,
    DecodeError,
    EncodeError,
    decode_message,
    decode_session,
    encode_message,
    encode_session,
    session_patch,
)

__all__ = [
    "SessionProtocol",
    "Steps",
    "Request",
    "ScriptCall",
    "CacheCall",
    "CachePipeline",
    "DocCall",
    "Sleep",
    "InTransaction",
    "DeferredScript",
    "Abandoned",
    "STAT_NAMES",
    "DEFAULT_TAIL_BYTES",
    "short_hash",
    "new_token",
    "required_indexes",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")


# -- what the protocol asks a runner to do ---------------------------------------------
# Named tuples: one is built per round trip, and a tuple is built in C.


# A script call, the request of every round trip on the hot paths, is a plain
# tuple: EVALSHA's arguments (sha, number of keys, keys..., args...). The runner
# sends back the reply.
ScriptCall = tuple[Any, ...]


class CacheCall(NamedTuple):
    """Call `method` of the Redis client with `args`; send back its reply."""

    method: str
    args: tuple[Any, ...]


class CachePipeline(NamedTuple):
    """Send these (method, args) commands in one non-transactional pipeline; send back
    the replies."""

    commands: tuple[tuple[str, tuple[Any, ...]], ...]


class DocCall(NamedTuple):
    """Call `method` of the document store; send back its result."""

    method: str
    args: tuple[Any, ...]
    kwargs: Mapping[str, Any] | None = None


class Sleep(NamedTuple):
    """Wait this many seconds (a lease wait), then send back None."""

    seconds: float


class InTransaction(NamedTuple):
    """Run `steps` inside one docstore transaction; send back what they return."""

    steps: Generator[Request, Any, Any]


class DeferredScript(NamedTuple):
    """A script call whose reply the caller does not wait for: a fill after a miss.

    `args` are EVALSHA's, as in a plain script call. The runner hands
    `done` the reply, or the exception it raised, whenever it reads it (at
    once, or during a later call of the store); `done` never raises. The
    runner sends back None. The reply only tells whether the fill landed,
    which the caller never needs: it already has what it read from the
    docstore, and the lease protocol decides whether the copy installs.
    """

    args: tuple[Any, ...]
    done: Callable[[object], None]


Request = Union[  # noqa: UP007
    ScriptCall, CacheCall, CachePipeline, DocCall, Sleep, InTransaction, DeferredScript
]
Steps = Generator[Request, Any, T]


class Abandoned(BaseException):
    """Thrown into a call's steps when its caller went away mid-request (cancelled).

    A BaseException, like the cancellation it stands for: only the protocol's
    clean-up catches it, and always re-raises it.
    """


_DOCSTORE_ERRORS = (docstore.InvalidDocument, docstore.VersionConflict, docstore.StoreUnavailable)


def _session_error(exc: Exception) -> SessionError:
    """Return the session package's error for one of `_DOCSTORE_ERRORS`."""
    if isinstance(exc, docstore.InvalidDocument):
        return InvalidSessionData(str(exc))
    if isinstance(exc, docstore.VersionConflict):
        return VersionConflict(str(exc), expected=exc.expected, actual=exc.actual)
    assert isinstance(exc, docstore.StoreUnavailable)
    return StoreUnavailable(str(exc), outcome_unknown=exc.outcome_unknown)


STAT_NAMES = (
    "hits",  # session lookups answered by Redis (a tombstone counts: it answers "gone")
    "misses",  # session lookups that went to the docstore
    "cache_errors",  # Redis calls that failed (each one swallowed)
    "cache_skipped",  # Redis reads skipped while the circuit breaker was open
    "decode_errors",  # cached values that could not be decoded (dropped, reloaded)
    "fills",  # values installed by a reader after a miss
    "fills_refused",  # fills the protocol refused (a writer or a newer value got there first)
    "lease_waits",  # misses that waited for another reader's fill
    "lease_timeouts",  # ... and gave up waiting, reading the docstore instead
    "message_hits",  # get_messages answered from the cached tail
    "message_misses",  # get_messages answered from the docstore
    "invalidations_pending",  # sessions whose stale copy awaits removal (a gauge)
    "cache_fences",  # times Redis had lost the scripts and the namespace was dropped
    "foreign_keys",  # keys under the prefix a fence met that are not the store's (left alone)
)

# The default byte budget of a cached message tail: a chat's last 100 turns of
# ordinary size fit; a few agent tool outputs fill it (see README).
DEFAULT_TAIL_BYTES = 256 * 1024

# Reserve room for "<conversation key>." in a message document's id.
_CONVERSATION_BYTES = 16
_MAX_MESSAGE_ID = MAX_NAME_LENGTH - len(secrets.token_urlsafe(_CONVERSATION_BYTES)) - 1
_SESSION_ID_BYTES = 32
_MAX_PENDING_INVALIDATIONS = 10_000
_NEVER_LIVE_ID_ATTEMPTS = 3


def new_token(nbytes: int) -> str:
    """Return `nbytes` random bytes as URL-safe text that starts with a letter or digit.

    `secrets.token_urlsafe` starts with `-` one time in 64, and an id that
    starts with `-` reads as an option to every command-line tool an operator
    pastes it into (our own CLI included). Redrawing keeps the token uniform
    over the ids that remain.
    """
    while True:
        token = secrets.token_urlsafe(nbytes)
        if token[0].isalnum():
            return token


def short_hash(session_id: str) -> str:
    """Return a short, stable hash of a session id: what logs show instead of the id."""
    return hashlib.sha256(session_id.encode("utf-8", "surrogatepass")).hexdigest()[:12]


def _parse_int(reply: object) -> int:
    if isinstance(reply, int):
        return reply
    raise ProtocolError(f"expected an integer reply, got {type(reply).__name__}")


def _seconds(name: str, value: object, *, allow_zero: bool = False) -> float:
    """Return a constructor's duration argument as float seconds, or raise ValueError."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value < 0
        or (value == 0 and not allow_zero)
    ):
        raise ValueError(f"{name} must be a positive number of seconds, not {value!r}")
    return float(value)


def _optional_count(name: str, value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidSessionData(f"{name} must be an int >= 0 or None, not {value!r}")
    return value


class _Lookup(NamedTuple):
    """A session lookup: the session (None if gone) and, from a cache hit, the tail.

    (A named tuple: one is built per lookup, and a tuple is built in C.)
    """

    state: SessionState | None
    from_cache: bool = False
    tail: TailRead = TailRead.NONE
    messages: tuple[bytes, ...] = ()
    token: str = ""
    cache_failed: bool = False  # Redis failed or was skipped: do not ask it again
    # FILL_SESSION's value, version and px, not run yet: the tail's fill runs it too.
    session_fill: tuple[bytes, int, int] | None = None
    # The window's message documents, oldest first, read with the session.
    docs: list[docstore.Document] | None = None


def _window_query(window: MessageWindow) -> tuple[dict[str, Any], dict[str, Any]]:
    """Return the filters (but the conversation's) and the order and limit of a window's query."""
    filters: dict[str, Any] = {}
    seq_bounds = window.seq_filter()
    if seq_bounds:
        filters["seq"] = seq_bounds
    options = {
        # "-id" too: the (conv, seq, id) index then serves the newest N by
        # walking backwards, reading N rows instead of sorting the conversation.
        "order_by": ["-seq", "-id"] if window.newest_first() else "seq",
        "limit": window.limit,
    }
    return filters, options


def required_indexes(sessions: str, messages: str) -> list[tuple[str, list[str], list[str] | None]]:
    """Return the (collection, field paths, order_by) of every index the store asks its
    docstore for."""
    return [
        # Serves list_sessions: one user's sessions, newest first, a page at a
        # time, whatever the number of sessions the user has.
        (sessions, [f"{RESERVED_KEY}.user_id"], ["-updated_at", "id"]),
        (sessions, [f"{RESERVED_KEY}.conv"], None),
        (messages, ["conv", "seq"], None),
        # Finds each conversation's first message, for purge_expired(orphans=True).
        (messages, ["seq", "conv"], None),
    ]


class _Counters:
    """Thread-safe counters behind `stats()`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(STAT_NAMES, 0)

    def add(self, name: str, amount: int = 1) -> None:
        with self._lock:
            self._counts[name] += amount

    def set(self, name: str, value: int) -> None:
        with self._lock:
            self._counts[name] = value

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)


class _ObservedCounters(_Counters):
    """Counters that also report every change to observers, in the calling thread."""

    def __init__(self, counts: dict[str, int], observers: list[Callable[[str, int], None]]):
        super().__init__()
        self._counts.update(counts)
        self._observers = observers

    def add(self, name: str, amount: int = 1) -> None:
        super().add(name, amount)
        for observer in self._observers:
            observer(name, amount)


class _ConversationKeys:
    """Remember each session's conversation key (it never changes for an id), bounded LRU.

    `add_message` needs the key to name the message document; knowing it saves
    a cache round trip per append. A stale entry is harmless: an append to a
    deleted, rotated or expired session finds no live parent in the docstore.
    """

    def __init__(self, capacity: int = 10_000) -> None:
        self._capacity = capacity
        self._lock = threading.Lock()
        # session id -> (conversation key, expires_at in epoch microseconds or None)
        self._entries: OrderedDict[str, tuple[str, int | None]] = OrderedDict()

    def remember(self, session_id: str, state: SessionState) -> None:
        self.remember_key(session_id, state.conversation, state.session.expires_at)

    def remember_key(self, session_id: str, conversation: str, expires_at: datetime | None) -> None:
        entry = (conversation, None if expires_at is None else to_micros(expires_at))
        if self._entries.get(session_id) == entry:
            # Known already (every hit of a session lands here): keep its place
            # in the LRU order rather than pay a lock per hit to refresh it.
            return
        with self._lock:
            self._entries[session_id] = entry
            self._entries.move_to_end(session_id)
            if len(self._entries) > self._capacity:
                self._entries.popitem(last=False)

    def get(self, session_id: str, now_us: int) -> str | None:
        """Return the key if known and, by what we last saw, the session has not expired."""
        with self._lock:
            entry = self._entries.get(session_id)
        if entry is None or (entry[1] is not None and entry[1] <= now_us):
            return None
        return entry[0]

    def forget(self, session_id: str) -> None:
        with self._lock:
            self._entries.pop(session_id, None)


class SessionProtocol:
    """The state and rules a sync and an async session store share; no I/O of its own.

    Holds the configuration, the counters, the circuit breaker, the sessions
    whose cached copy awaits removal and the scripts' SHAs, all safe to share
    between threads and tasks. Each public call is a generator method named
    `_<call>_steps` (see the module docstring); `_startup_steps` is what a
    store runs before its first call. `SessionStore` and `AsyncSessionStore`
    subclass it and only run the requests.
    """

    def __init__(
        self,
        *,
        has_cache: bool,
        cache_ttl: float,
        session_ttl: float | None,
        key_prefix: str,
        sessions_collection: str,
        messages_collection: str,
        tail_size: int,
        tail_bytes: int,
        fill_lease_ttl: float,
        lease_wait: float,
        tombstone_ttl: float,
        breaker_threshold: int,
        breaker_cooldown: float,
        clock: Callable[[], float],
    ) -> None:
        self._cache_ttl = _seconds("cache_ttl", cache_ttl)
        self._session_ttl = None if session_ttl is None else _seconds("session_ttl", session_ttl)
        self._fill_lease_ms = max(1, int(_seconds("fill_lease_ttl", fill_lease_ttl) * 1000))
        self._tombstone_ms = max(1, int(_seconds("tombstone_ttl", tombstone_ttl) * 1000))
        self._lease_wait = _seconds("lease_wait", lease_wait, allow_zero=True)
        try:
            coherence.check_key_prefix(key_prefix)
        except ValueError:
            raise ValueError(
                f"key_prefix must be a str without braces, not {key_prefix!r}"
            ) from None
        if isinstance(tail_size, bool) or not isinstance(tail_size, int) or tail_size < 0:
            raise ValueError(f"tail_size must be an int >= 0, not {tail_size!r}")
        if isinstance(tail_bytes, bool) or not isinstance(tail_bytes, int) or tail_bytes < 0:
            raise ValueError(f"tail_bytes must be an int >= 0, not {tail_bytes!r}")
        self._has_cache = has_cache
        self._key_prefix = key_prefix
        self._sessions = sessions_collection
        self._messages = messages_collection
        self._tail_size = tail_size
        self._tail_bytes = tail_bytes
        self._clock = clock
        self._stats = _Counters()
        self._breaker = CircuitBreaker(
            threshold=breaker_threshold, cooldown=breaker_cooldown, clock=clock
        )
        self._pending_lock = threading.Lock()
        # Sessions whose cache update failed: their (possibly stale) copies are
        # removed before this store's next Redis call. Value: a generation, so a
        # drain does not forget a session that failed again meanwhile.
        self._pending: OrderedDict[str, int] = OrderedDict()
        self._pending_generation = 0
        # Redis failures seen by this thread (sync) or task (asyncio), to spot a
        # failure within one call (`_cache_failures_here`).
        self._failures_here: contextvars.ContextVar[int] = contextvars.ContextVar(
            "session_cache_failures", default=0
        )
        self._decode_error_logged = False
        self._foreign_warned = False
        self._conversations = _ConversationKeys()
        # Script name -> (source, SHA1). The store runs EVALSHA itself: Redis not
        # knowing a script means it restarted (or failed over) and may hold copies
        # that missed invalidations, so the namespace is fenced before reloading.
        # The sources also name the server they were loaded on (`_server_scripts`).
        self._scripts = self._server_scripts("")
        # Never waited for: a second fencer (thread or task) falls back to the
        # docstore instead (non-blocking acquire), so it may be held across a wait.
        self._fence_lock = threading.Lock()

    def _startup_steps(self, ensure_indexes: bool) -> Steps[None]:
        """Fence Redis if it lacks the scripts, then create the docstore's indexes.

        Fencing first means that what callers put in Redis afterwards is not
        mistaken for a restart's leftovers.
        """
        if self._has_cache:
            try:
                yield from self._fence_and_load()
            except (redis.RedisError, OSError) as exc:
                # Not counted: the first call meets the same Redis and counts it.
                logger.info("Redis unreachable at start (%s); fencing later", type(exc).__name__)
        if ensure_indexes:
            for collection, paths, order_by in required_indexes(self._sessions, self._messages):
                yield from self._doc("ensure_index", (collection, paths), {"order_by": order_by})

    # -- the public calls, as steps ----------------------------------------------

    def _create_session_steps(
        self, user_id: str | None, data: dict[str, Any] | None, ttl: float | None
    ) -> Steps[Session]:
        if user_id is not None and not isinstance(user_id, str):
            raise InvalidSessionData(f"user_id must be a str or None, not {type(user_id).__name__}")
        body = dict(self._check_user_data({} if data is None else data))
        lifetime = self._session_ttl if ttl is None else self._check_ttl(ttl)
        body[RESERVED_KEY] = {
            "user_id": user_id,
            "conv": new_token(_CONVERSATION_BYTES),
        }
        for _ in range(_NEVER_LIVE_ID_ATTEMPTS):
            session_id = new_token(_SESSION_ID_BYTES)
            try:
                doc = yield from self._doc(
                    "create", (self._sessions, body), {"id": session_id, "ttl": lifetime}
                )
            except docstore.DocumentExists:
                continue  # 256 random bits collided: astronomically unlikely, but free to handle
            return self._state_of(doc, session_id).session
        raise SessionError("could not find an unused session id")

    def _get_session_steps(self, session_id: str) -> Steps[Session | None]:
        if not self._usable_id(session_id):
            return None
        state = (yield from self._lookup(session_id)).state
        return None if state is None else state.session

    def _update_session_steps(
        self,
        session_id: str,
        data: dict[str, Any],
        expected_version: int | None,
        ttl: float | None,
    ) -> Steps[Session]:
        data = self._check_user_data(data)
        lifetime = self._session_ttl if ttl is None else self._check_ttl(ttl)
        if not self._usable_id(session_id):
            raise SessionNotFound("no such session")
        doc = yield from self._write(
            session_id,
            self._doc(
                "update",
                (self._sessions, session_id, data),
                {"expected_version": expected_version, "ttl": lifetime},
            ),
        )
        if doc is None:
            yield from self._invalidate(session_id, tombstone=True)
            raise SessionNotFound("no such session")
        state = self._state_of(doc, session_id)
        yield from self._refresh_session(session_id, state)
        return state.session

    def _touch_session_steps(self, session_id: str, ttl: float | None) -> Steps[bool]:
        lifetime = self._session_ttl if ttl is None else self._check_ttl(ttl)
        if not self._usable_id(session_id):
            return False
        doc = yield from self._write(
            session_id,
            self._doc("update", (self._sessions, session_id, {}), {"ttl": lifetime}),
        )
        if doc is None:
            yield from self._invalidate(session_id, tombstone=True)
            return False
        yield from self._refresh_session(session_id, self._state_of(doc, session_id))
        return True

    def _delete_session_steps(self, session_id: str) -> Steps[bool]:
        if not self._usable_id(session_id):
            return False

        def delete() -> Steps[bool]:
            doc = yield from self._doc("read", (self._sessions, session_id))
            # The session row goes first: an append waiting on it then finds it
            # gone, so no message can slip in after the messages are deleted.
            if doc is None or not (yield from self._doc("delete", (self._sessions, session_id))):
                return False
            state = session_state_from_document(doc, session_id)
            if state is not None:
                yield from self._doc("delete_many", (self._messages, {"conv": state.conversation}))
            return True

        deleted: bool = yield from self._write(session_id, self._in_transaction(delete()))
        yield from self._invalidate(session_id, tombstone=True)
        return deleted

    def _rotate_session_id_steps(self, session_id: str) -> Steps[Session]:
        if not self._usable_id(session_id):
            raise SessionNotFound("no such session")
        for _ in range(_NEVER_LIVE_ID_ATTEMPTS):
            new_id = new_token(_SESSION_ID_BYTES)
            try:
                doc = yield from self._write(
                    session_id, self._doc("rename", (self._sessions, session_id, new_id))
                )
            except docstore.DocumentExists:
                continue
            # The old id is gone for good: a tombstone stops any fill in flight.
            # The new id is not cached; its first reader fills it.
            yield from self._invalidate(session_id, tombstone=True)
            if doc is None:
                raise SessionNotFound("no such session")
            return self._state_of(doc, new_id).session
        raise SessionError("could not find an unused session id")

    def _list_sessions_steps(
        self,
        user_id: str,
        limit: int,
        after: Session | tuple[datetime, str] | None,
    ) -> Steps[list[Session]]:
        if not isinstance(user_id, str):
            raise InvalidSessionData(f"user_id must be a str, not {type(user_id).__name__}")
        count = _optional_count("limit", limit)
        if count is None:
            raise InvalidSessionData("limit must be an int >= 0")
        cursor = self._cursor(after)
        found: list[Session] = []
        # Keyset pages straight from the index order (updated_at desc, then id);
        # sessions our clock already sees as expired are skipped, so read on.
        while len(found) < count:
            docs = yield from self._doc(
                "query",
                (self._sessions, {f"{RESERVED_KEY}.user_id": user_id}),
                {"order_by": ["-updated_at"], "limit": count - len(found), "after": cursor},
            )
            for doc in docs:
                state = session_state_from_document(doc, doc.id)
                if state is not None and not self._expired(state):
                    found.append(state.session)
            if not docs:
                break
            cursor = docs[-1]
        return found

    def _add_message_steps(
        self,
        session_id: str,
        role: str,
        content: str,
        metadata: dict[str, Any] | None,
        message_id: str | None,
    ) -> Steps[Message]:
        if not isinstance(role, str) or not isinstance(content, str):
            raise InvalidSessionData("role and content must be str")
        if metadata is None:
            metadata = {}
        if not isinstance(metadata, dict):
            raise InvalidSessionData(f"metadata must be a dict, not {type(metadata).__name__}")
        if message_id is not None and (
            not isinstance(message_id, str) or not message_id or len(message_id) > _MAX_MESSAGE_ID
        ):
            raise InvalidSessionData(
                f"message_id must be a non-empty str of at most {_MAX_MESSAGE_ID} characters"
            )
        body: dict[str, Any] = {
            "conv": "",
            "message_id": message_id or "",
            "role": role,
            "content": content,
            "metadata": metadata,
        }
        if not self._usable_id(session_id):
            raise SessionNotFound("no such session")
        cache_failures = self._failures_here.get()
        # Refuse bad input before the session lookup, which may fill the cache.
        # (With the key known, the docstore's own validation refuses it before
        # anything is written.)
        conversation = yield from self._conversation_of(
            session_id, lambda: self._check_document(body)
        )
        message_key = message_id if message_id is not None else new_token(16)
        body["conv"] = conversation
        body["message_id"] = message_key
        # Conversation-scoped: a retry after rotate_session_id still finds the message.
        child_id = f"{conversation}.{message_key}"
        # A new random id cannot meet a stored message, so this append bumps the
        # session by exactly one version and changes nothing else of it: the
        # cached copy is patched (WRITE_MESSAGE), and the docstore need not send
        # the session's data back. A caller's id may be a retry: then the full path.
        patch = message_id is None
        # One statement: bumps the session, slides its idle expiry, adds the message.
        appended = yield from self._write(
            session_id,
            self._doc(
                "append",
                (self._messages, body),
                {
                    "parent": (self._sessions, session_id),
                    "id": child_id,
                    "parent_ttl": self._session_ttl,
                    "parent_data": not patch,
                },
            ),
        )
        # A lookup that just timed out means Redis is down: one timeout per call is enough.
        try_cache = self._failures_here.get() == cache_failures
        if appended is None:
            yield from self._invalidate(session_id, tombstone=True, try_cache=try_cache)
            raise SessionNotFound("no such session")
        parent = appended[0]
        parent_state = None if patch else self._state_of(parent, session_id)
        self._conversations.remember_key(session_id, conversation, parent.expires_at)
        message = message_from_document(appended[1], session_id)
        if message is None:
            raise SessionError(f"message document {short_hash(child_id)} is malformed")
        yield from self._refresh_after_append(
            session_id, parent, parent_state, message, try_cache=try_cache
        )
        return message

    def _pop_message_steps(self, session_id: str) -> Steps[Message | None]:
        popped = yield from self._remove_messages(session_id, "pop_child")
        if popped is None:
            return None
        message = message_from_document(popped, session_id)
        if message is None:
            raise SessionError(f"message document {short_hash(popped.id)} is malformed")
        return message

    def _clear_messages_steps(self, session_id: str) -> Steps[int]:
        removed: int = yield from self._remove_messages(session_id, "delete_children")
        return removed

    def _get_messages_steps(
        self,
        session_id: str,
        limit: int | None,
        after_seq: int | None,
        before_seq: int | None,
    ) -> Steps[list[Message]]:
        window = MessageWindow(
            after_seq=_optional_count("after_seq", after_seq),
            before_seq=_optional_count("before_seq", before_seq),
            limit=_optional_count("limit", limit),
        )
        if not self._usable_id(session_id):
            return []
        use_tail = self._has_cache and self._tail_size > 0 and self._tail_bytes > 0
        lookup = yield from self._lookup(session_id, window if use_tail else None)
        state = lookup.state
        if state is None:
            return []
        if use_tail and lookup.tail is TailRead.NONE and not lookup.cache_failed:
            # The session was read from the docstore without a word about the
            # tail (a lease wait gave up, or our clock said expired): ask Redis.
            lookup = yield from self._read_tail(session_id, state, window)
        return (yield from self._messages_for(session_id, state, window, lookup))

    def _purge_expired_steps(self, batch_size: int, orphans: bool) -> Steps[int]:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, not {batch_size!r}")
        purged = 0
        while True:
            # Each batch of expired sessions goes with its messages in one transaction.
            gone, messages = yield from self._in_transaction(self._purge_batch(batch_size))
            purged += gone + messages
            if gone < batch_size:
                break
        if orphans:
            purged += yield from self._purge_orphaned_messages(batch_size)
        return purged

    def _purge_batch(self, batch_size: int) -> Steps[tuple[int, int]]:
        """Pop up to `batch_size` expired sessions and delete their messages; return both counts."""
        gone = yield from self._doc("pop_expired", (self._sessions,), {"limit": batch_size})
        conversations = [
            state.conversation
            for state in (session_state_from_document(doc, doc.id) for doc in gone)
            if state is not None
        ]
        messages = 0
        if conversations:
            messages = yield from self._doc(
                "delete_many", (self._messages, {"conv": {"$in": conversations}})
            )
        return len(gone), messages

    def _purge_orphaned_messages(self, batch_size: int) -> Steps[int]:
        """Delete the messages of every conversation whose session is gone."""
        purged = 0
        last_conversation: str | None = None
        while True:
            # Every conversation has exactly one first message: walk them by key.
            filters: dict[str, Any] = {"seq": 1}
            if last_conversation is not None:
                filters["conv"] = {"$gt": last_conversation}
            firsts = yield from self._doc(
                "query", (self._messages, filters), {"order_by": "conv", "limit": batch_size}
            )
            conversations = [
                doc.data["conv"] for doc in firsts if isinstance(doc.data.get("conv"), str)
            ]
            if conversations:
                sessions = yield from self._doc(
                    "query",
                    (self._sessions, {f"{RESERVED_KEY}.conv": {"$in": conversations}}),
                    {"limit": None},
                )
                live = {
                    state.conversation
                    for state in (session_state_from_document(doc, doc.id) for doc in sessions)
                    if state is not None
                }
                orphans = [conv for conv in conversations if conv not in live]
                if orphans:
                    purged += yield from self._doc(
                        "delete_many", (self._messages, {"conv": {"$in": orphans}})
                    )
                last_conversation = conversations[-1]
            if len(firsts) < batch_size:
                return purged

    def _evict_steps(self, session_id: str) -> Steps[None]:
        if self._usable_id(session_id):
            yield from self._invalidate(session_id, tombstone=False)

    # -- for operations tools and both stores -----------------------------------

    @property
    def key_prefix(self) -> str:
        """The prefix of every Redis key this store writes."""
        return self._key_prefix

    @property
    def collections(self) -> tuple[str, str]:
        """The docstore collections of the sessions and of their messages."""
        return self._sessions, self._messages

    def add_counter_observer(self, observer: Callable[[str, int], None]) -> None:
        """Call `observer(name, amount)` in the calling thread whenever a counter moves.

        For metrics (session.metrics): a store that has none pays nothing for them.
        """
        if not isinstance(self._stats, _ObservedCounters):
            self._stats = _ObservedCounters(self._stats.snapshot(), [])
        self._stats._observers.append(observer)

    def stats(self) -> dict[str, int]:
        """Return the cache counters (see STAT_NAMES), plus whether the breaker is open."""
        with self._pending_lock:
            self._stats.set("invalidations_pending", len(self._pending))
        counts = self._stats.snapshot()
        counts["breaker_open"] = int(self._breaker.is_open)
        return counts

    # -- input -------------------------------------------------------------------

    @staticmethod
    def _usable_id(session_id: object) -> bool:
        """Return True if `session_id` could name a session; raise if it is not a str.

        An id that can never exist (empty, too long, NUL) is simply missing:
        ids come from cookies, and garbage there is not a programming error.
        """
        if not isinstance(session_id, str):
            raise InvalidSessionData(f"session_id must be a str, not {type(session_id).__name__}")
        if not 0 < len(session_id) <= MAX_NAME_LENGTH or "\x00" in session_id:
            return False
        try:
            session_id.encode("utf-8")
        except UnicodeEncodeError:
            return False
        return True

    @staticmethod
    def _check_user_data(data: object) -> dict[str, Any]:
        if not isinstance(data, dict):
            raise InvalidSessionData(f"data must be a dict, not {type(data).__name__}")
        if RESERVED_KEY in data:
            raise InvalidSessionData(f"the key {RESERVED_KEY!r} is reserved for the store")
        return data

    @staticmethod
    def _check_ttl(ttl: object) -> float:
        try:
            seconds = check_ttl(ttl)
        except docstore.InvalidDocument as exc:
            raise InvalidSessionData(str(exc)) from exc
        if seconds is None:
            raise InvalidSessionData("ttl must be a positive number of seconds")
        return seconds

    @staticmethod
    def _check_document(body: dict[str, Any]) -> None:
        # The docstore validates again when it writes (including its size limit);
        # this early pass only keeps a bad message from reaching any tier.
        try:
            encode_data(body, sys.maxsize)
        except docstore.InvalidDocument as exc:
            raise InvalidSessionData(str(exc)) from exc

    def _cursor(self, after: Session | tuple[datetime, str] | None) -> docstore.Document | None:
        """Return the docstore keyset cursor for a `list_sessions` cursor."""
        if after is None:
            return None
        if isinstance(after, Session):
            updated_at, session_id = after.updated_at, after.id
        elif (
            isinstance(after, tuple)
            and len(after) == 2
            and isinstance(after[0], datetime)
            and after[0].tzinfo is not None
            and isinstance(after[1], str)
        ):
            updated_at, session_id = after
        else:
            raise InvalidSessionData("after must be a Session or an (aware updated_at, id) pair")
        # Only the ordering columns (updated_at, id) of a cursor are compared.
        return docstore.Document(
            id=session_id,
            collection=self._sessions,
            data={},
            created_at=updated_at,
            updated_at=updated_at,
            version=0,
        )

    # -- docstore ----------------------------------------------------------------

    @staticmethod
    def _doc(
        method: str, args: tuple[Any, ...], kwargs: Mapping[str, Any] | None = None
    ) -> Steps[Any]:
        """Call a docstore method; re-raise its errors as the session package's own."""
        try:
            return (yield DocCall(method, args, kwargs))
        except SessionError:
            raise
        except _DOCSTORE_ERRORS as exc:
            raise _session_error(exc) from exc

    @staticmethod
    def _in_transaction(steps: Steps[T]) -> Steps[T]:
        """Run `steps` in one docstore transaction (its commit's errors translated too)."""
        try:
            result: T = yield InTransaction(steps)
        except SessionError:
            raise
        except _DOCSTORE_ERRORS as exc:
            raise _session_error(exc) from exc
        return result

    def _write(self, session_id: str, write: Steps[T]) -> Steps[T]:
        """Run a docstore write; if it may have committed unseen, drop the cached copy."""
        try:
            return (yield from write)
        except StoreUnavailable as exc:
            if exc.outcome_unknown:
                yield from self._invalidate(session_id, tombstone=False)
            raise
        except Abandoned:
            # The caller went away with the write in flight: it may commit (or have
            # committed) unseen, so the cached copy goes, now or at the next call.
            self._remember_stale(session_id)
            yield from self._invalidate(session_id, tombstone=False)
            raise

    def _state_of(self, doc: docstore.Document, session_id: str) -> SessionState:
        state = session_state_from_document(doc, session_id)
        if state is None:
            raise SessionError(f"session document {short_hash(session_id)} is malformed")
        return state

    def _read_document(self, session_id: str) -> Steps[SessionState | None]:
        """Return the session as the docstore holds it (even if our clock says expired)."""
        doc = yield from self._doc("read", (self._sessions, session_id))
        if doc is None:
            return None
        state = session_state_from_document(doc, session_id)
        if state is None:
            logger.warning(
                "session document %s is malformed; treated as missing", short_hash(session_id)
            )
        return state

    def _read_live(self, session_id: str) -> Steps[SessionState | None]:
        state = yield from self._read_document(session_id)
        return None if state is None or self._expired(state) else state

    def _query_messages(
        self, session_id: str, state: SessionState, window: MessageWindow
    ) -> Steps[list[Message]]:
        return self._messages_of((yield from self._query_documents(state, window)), session_id)

    def _query_documents(
        self, state: SessionState, window: MessageWindow
    ) -> Steps[list[docstore.Document]]:
        """Return the message documents of the window, oldest first."""
        filters, options = _window_query(window)
        filters["conv"] = state.conversation
        docs: list[docstore.Document] = yield from self._doc(
            "query", (self._messages, filters), options
        )
        if window.newest_first():
            docs.reverse()
        return docs

    def _read_document_and_window(
        self, session_id: str, window: MessageWindow
    ) -> Steps[tuple[SessionState | None, list[docstore.Document]]]:
        """Read the session and its window's message documents (oldest first) in one step."""
        filters, options = _window_query(window)
        doc, docs = yield from self._doc(
            "read_with",
            (self._sessions, session_id, self._messages, filters),
            {"link": ("conv", f"{RESERVED_KEY}.conv"), **options},
        )
        if doc is None:
            return None, []
        state = session_state_from_document(doc, session_id)
        if state is None:
            logger.warning(
                "session document %s is malformed; treated as missing", short_hash(session_id)
            )
            return None, []
        if window.newest_first():
            docs.reverse()
        return state, docs

    @staticmethod
    def _messages_of(docs: Sequence[docstore.Document], session_id: str) -> list[Message]:
        messages = []
        for doc in docs:
            message = message_from_document(doc, session_id)
            if message is None:
                logger.warning("message document %s is malformed; skipped", short_hash(doc.id))
            else:
                messages.append(message)
        return messages

    # -- time ------------------------------------------------------------------

    def _now_us(self) -> int:
        return int(self._clock() * 1_000_000)

    def _expired(self, state: SessionState) -> bool:
        expires_at = state.session.expires_at
        return expires_at is not None and to_micros(expires_at) <= self._now_us()

    def _px(self, state: SessionState) -> int | None:
        return self._px_until(state.session.expires_at)

    def _px_until(self, expires_at: datetime | None) -> int | None:
        """How long a copy of a session expiring at `expires_at` may live in Redis."""
        return coherence.cache_px(
            None if expires_at is None else to_micros(expires_at), self._now_us(), self._cache_ttl
        )

    # -- Redis plumbing ---------------------------------------------------------

    def _run(
        self,
        script: str,
        keys: Sequence[str],
        args: Sequence[object],
        parse: Callable[[object], T],
        *,
        write: bool = False,
    ) -> Steps[T | None]:
        """Run one protocol script; None (counted, logged once per burst) if Redis failed.

        A read skips Redis while the breaker is open. A write's cache update
        (`write=True`) never skips it: the breaker is this process's guess that
        Redis is down, and a write that skipped a Redis that is in fact up
        would return while other processes still serve the older copy. During
        a real outage the write pays at most one socket timeout, then remembers
        the session as stale.
        """
        if not write and not self._breaker.allow():
            self._stats.add("cache_skipped")
            return None
        if self._pending and not (yield from self._drain()):
            return None
        try:
            try:
                reply = yield (self._scripts[script][1], len(keys), *keys, *args)
            except redis.exceptions.NoScriptError:
                # Redis lost the scripts: fence the namespace, then run it again
                # (the fence may have moved to the scripts of another server identity).
                yield from self._fence_and_load()
                reply = yield (self._scripts[script][1], len(keys), *keys, *args)
            parsed = parse(reply)
        except (redis.RedisError, OSError, ProtocolError) as exc:
            self._cache_failed(exc)
            return None
        self._cache_ok()
        return parsed

    def _server_scripts(self, identity: str) -> dict[str, tuple[str, str]]:
        """Return each script's (source, SHA) as loaded on the server named `identity`.

        A failed-over server may still hold scripts from an earlier life: a master
        demoted to a replica keeps its script cache through the resync, so when it
        is promoted again, lagging, it would know the scripts and never be fenced.
        Naming the server's identity in the source gives every server life its
        own SHAs, so such a server answers NOSCRIPT like a new one.
        """
        scripts = {}
        for name, source in coherence.SCRIPTS.items():
            tagged = coherence.namespaced_source(source, self._key_prefix)
            if identity:
                tagged = f"-- server {identity}\n{tagged}"
            scripts[name] = (tagged, hashlib.sha1(tagged.encode("utf-8")).hexdigest())
        return scripts

    @staticmethod
    def _server_identity() -> Steps[str]:
        """Return the Redis server's identity: its process (run_id) and its history as
        a master (master_replid, new on every promotion); "" if INFO is unavailable."""
        try:
            server = yield CacheCall("info", ("server",))
            replication = yield CacheCall("info", ("replication",))
        except redis.ResponseError:
            return ""  # INFO renamed or missing (fakeredis): fence on NOSCRIPT alone
        return f"{server.get('run_id', '')}:{replication.get('master_replid', '')}"

    def _fence_and_load(self) -> Steps[None]:
        """Drop every key of this namespace, then load the scripts.

        Redis 7 keeps scripts in memory only (never in RDB or AOF, never
        replicated), and our scripts name the server's identity, so a missing
        script means a new server process, a promotion, or SCRIPT FLUSH.
        A restarted server may have reloaded copies that missed invalidations
        while it was down. Every client finds the scripts missing until the
        first one has fenced and loaded them, so no stale copy is read after
        a restart. Other callers fall back to the docstore meanwhile.
        """
        if not self._fence_lock.acquire(blocking=False):
            raise redis.exceptions.NoScriptError("another caller is fencing the cache")
        try:
            scripts = self._server_scripts((yield from self._server_identity()))
            shas = tuple(sha for _, sha in scripts.values())
            if all((yield CacheCall("script_exists", shas))):
                self._scripts = scripts
                return  # another client fenced this server and loaded them meanwhile
            dropped = yield from self._fence_namespace()
            for source, _ in scripts.values():
                yield CacheCall("script_load", (source,))
            self._scripts = scripts
            self._stats.add("cache_fences")
            # A new Redis (or a new library version) has no scripts and no keys: that
            # is routine. Copies dropped means Redis lost its scripts but kept data.
            logger.log(
                logging.WARNING if dropped else logging.INFO,
                "Redis did not know the session scripts (new server, restart, failover or "
                "SCRIPT FLUSH): dropped %d cached keys of this namespace, reloaded the scripts",
                dropped,
            )
        finally:
            self._fence_lock.release()

    def _fence_namespace(self) -> Steps[int]:
        """Delete the keys under this store's prefix that are provably its own; return how many.

        A key is ours only if its name is in the layout of `coherence.session_keys`
        and its value is what the store writes there (FENCE_KEY checks and deletes
        in one step). Anything else under the prefix belongs to someone sharing
        it: left alone, counted in `foreign_keys`, and warned about once.
        """
        fence_sha = yield CacheCall("script_load", (coherence.FENCE_KEY,))
        pattern = coherence.glob_escape(self._key_prefix) + "*"
        dropped = foreign = 0
        batch: list[tuple[bytes, str]] = []

        def fence_batch() -> Steps[None]:
            nonlocal dropped, foreign
            # One script per key, pipelined: atomic per key, one round trip per
            # batch, and every call stays within one Redis Cluster slot.
            replies = yield CachePipeline(
                tuple(("evalsha", (fence_sha, 1, key, kind)) for key, kind in batch)
            )
            for reply in replies:
                result = _parse_int(reply)
                if result == coherence.FenceResult.DROPPED:
                    dropped += 1
                elif result == coherence.FenceResult.FOREIGN:
                    foreign += 1
                elif result != coherence.FenceResult.GONE:
                    raise ProtocolError(f"unexpected fence reply {result}")
            batch.clear()

        cursor: object = 0
        while True:
            # SCAN cursor MATCH pattern COUNT 1000, as redis-py's scan_iter runs it.
            cursor, keys = yield CacheCall("scan", (cursor, pattern, 1000))
            for key in keys:
                kind = coherence.fence_kind(self._key_prefix, key)
                if kind is None:
                    foreign += 1
                    continue
                batch.append((key, kind))
                if len(batch) >= 1000:
                    yield from fence_batch()
            if not cursor:  # SCAN is done when the cursor comes back as 0
                break
        if batch:
            yield from fence_batch()
        if foreign:
            self._stats.add("foreign_keys", foreign)
            if not self._foreign_warned:
                self._foreign_warned = True
                logger.warning(
                    "the Redis key prefix %r is shared with something that is not this "
                    "session store: %d keys under it are not in the store's layout or "
                    "encoding (left alone). Give the store a key_prefix of its own.",
                    self._key_prefix,
                    foreign,
                )
        return dropped

    def _cache_failed(self, exc: Exception, *, here: bool = True) -> None:
        self._stats.add("cache_errors")
        if here:
            self._failures_here.set(self._failures_here.get() + 1)
        if self._breaker.record_failure():
            logger.warning(
                "Redis call failed (%s: %s); using the docstore alone until Redis recovers",
                type(exc).__name__,
                str(exc)[:200],
            )

    def _cache_ok(self) -> None:
        failures = self._breaker.record_success()
        if failures:
            logger.warning("Redis recovered after %d failed calls", failures)

    def _remember_stale(self, session_id: str) -> None:
        """Note a session whose cached copy may be stale, to remove once Redis answers."""
        with self._pending_lock:
            self._pending_generation += 1
            self._pending[session_id] = self._pending_generation
            self._pending.move_to_end(session_id)
            if len(self._pending) > _MAX_PENDING_INVALIDATIONS:
                # cache_ttl bounds what is forgotten here.
                self._pending.popitem(last=False)

    def _drain(self) -> Steps[bool]:
        """Delete the copies of every session remembered as stale; False if Redis failed."""
        with self._pending_lock:
            batch = list(self._pending.items())
        if not batch:
            return True
        try:
            yield CachePipeline(
                tuple(("delete", self._keys(session_id).all()) for session_id, _ in batch)
            )
        except (redis.RedisError, OSError) as exc:
            self._cache_failed(exc)
            return False
        with self._pending_lock:
            for session_id, generation in batch:
                if self._pending.get(session_id) == generation:
                    del self._pending[session_id]
        return True

    def _keys(self, session_id: str) -> SessionKeys:
        return coherence.session_keys(self._key_prefix, session_id)

    def _invalidate(
        self, session_id: str, *, tombstone: bool, try_cache: bool = True
    ) -> Steps[None]:
        """Remove every cached key of the session, leaving a tombstone if it is gone for good.

        `try_cache=False`: Redis already failed during this call; remember the
        session as stale instead of paying a second timeout.
        """
        self._conversations.forget(session_id)
        if not self._has_cache:
            return
        if not try_cache:
            self._remember_stale(session_id)
            return
        keys = self._keys(session_id).all()
        args: list[object] = [TOMBSTONE if tombstone else b"", self._tombstone_ms]
        try:
            done = yield from self._run("INVALIDATE", keys, args, _parse_int, write=True)
        except Abandoned:
            # The caller went away before Redis answered: remember the session (this
            # store's next Redis call removes its copy), and run the invalidation
            # again in the clean-up, since other stores may read the copy meanwhile.
            self._remember_stale(session_id)
            yield from self._run("INVALIDATE", keys, args, _parse_int, write=True)
            raise
        if done is None:
            self._remember_stale(session_id)

    def _cache_write(
        self,
        session_id: str,
        script: str,
        keys: Sequence[str],
        args: Sequence[object],
        *,
        try_cache: bool = True,
    ) -> Steps[None]:
        """Run a script that refreshes the cache after a commit; on failure remember the session.

        `try_cache=False`: Redis already failed during this call; remember the
        session as stale instead of paying a second timeout.
        """
        if not try_cache:
            self._remember_stale(session_id)
            return
        try:
            done = yield from self._run(script, keys, args, _parse_int, write=True)
        except Abandoned:
            # The refresh may or may not have run: the copy goes, now or at the next call.
            self._remember_stale(session_id)
            yield from self._invalidate(session_id, tombstone=False)
            raise
        if done is None:
            self._remember_stale(session_id)

    def _note_decode_error(self, session_id: str, what: str, exc: Exception) -> None:
        self._stats.add("decode_errors")
        if not self._decode_error_logged:
            self._decode_error_logged = True
            logger.warning(
                "dropped an undecodable cached %s of session %s (%s); "
                "later ones are logged at debug level",
                what,
                short_hash(session_id),
                exc,
            )
        else:
            logger.debug(
                "dropped an undecodable cached %s of session %s (%s)",
                what,
                short_hash(session_id),
                exc,
            )

    # -- reading ---------------------------------------------------------------

    def _lookup(self, session_id: str, window: MessageWindow | None = None) -> Steps[_Lookup]:
        """Return the session, cache first; with a `window`, also what the tail holds."""
        if not self._has_cache:
            self._stats.add("misses")
            return _Lookup((yield from self._read_live(session_id)))
        token = coherence.new_lease_token()
        try:
            lease_ms = self._fill_lease_ms
            keys = self._keys(session_id) if window is not None else None
            value_keys = coherence.session_value_keys(self._key_prefix, session_id)
            drop = b""
            waits: Iterator[float] | None = None
            for _ in range(3):
                while True:
                    reply: ReadReply | None
                    if window is None:
                        args = coherence.read_session_args(token, lease_ms, drop_value=drop)
                        reply = yield from self._run(
                            "READ_SESSION", value_keys, args, coherence.parse_read_session_reply
                        )
                    else:
                        assert keys is not None
                        args = coherence.read_args(token, lease_ms, window, drop_value=drop)
                        reply = yield from self._run(
                            "READ", keys.all(), args, coherence.parse_read_reply
                        )
                    if reply is None:
                        self._stats.add("misses")
                        return _Lookup((yield from self._read_live(session_id)), cache_failed=True)
                    if reply.dropped and not drop:
                        self._note_decode_error(session_id, "value", ProtocolError("wrong type"))
                    if reply.session is not SessionRead.BUSY:
                        break
                    if waits is None:
                        self._stats.add("lease_waits")
                        waits = coherence.lease_wait_delays(self._lease_wait)
                    delay = next(waits, None)
                    if delay is None:
                        # The filler is slow: read without installing (no lease, no fill).
                        self._stats.add("lease_timeouts")
                        self._stats.add("misses")
                        return _Lookup((yield from self._read_live(session_id)))
                    yield Sleep(delay)
                if reply.session is SessionRead.LEASED:
                    self._stats.add("misses")
                    if reply.tail is not TailRead.LEASED:
                        state = yield from self._fill_session(session_id, token)
                        return _Lookup(state, False, reply.tail, reply.messages, token)
                    # READ leased us the tail too: read the session and the window in
                    # one docstore step, then install the session together with the
                    # tail (FILL_SESSION_AND_TAIL), one round trip for both.
                    assert window is not None
                    state, docs = yield from self._read_document_and_window(session_id, window)
                    state, fill = self._session_fill(state)
                    if state is None:
                        yield from self._finish_session_fill(session_id, token, fill)
                        return _Lookup(None)
                    return _Lookup(
                        state, False, reply.tail, (), token, session_fill=fill, docs=docs
                    )
                assert reply.session is SessionRead.HIT and reply.value is not None
                if reply.is_tombstone:
                    self._stats.add("hits")
                    return _Lookup(None, from_cache=True)
                try:
                    state = decode_session(reply.value, session_id)
                except DecodeError as exc:
                    self._note_decode_error(session_id, "session", exc)
                    drop = reply.value
                    continue
                if self._expired(state):
                    # Our copy says expired; a touch whose cache update failed may
                    # have extended it, so the docstore decides.
                    self._stats.add("misses")
                    return _Lookup((yield from self._read_live(session_id)))
                self._stats.add("hits")
                self._conversations.remember(session_id, state)
                return _Lookup(state, True, reply.tail, reply.messages, token)
            self._stats.add("misses")
            return _Lookup((yield from self._read_live(session_id)))
        except Abandoned:
            # The caller went away: a lease this lookup may hold must not keep
            # other readers waiting until it expires.
            yield from self._release_leases(session_id, token, tail=window is not None)
            raise

    def _release_leases(self, session_id: str, token: str, *, tail: bool) -> Steps[None]:
        """Give up the fill leases `token` may hold (a no-op for leases it does not hold)."""
        keys = self._keys(session_id)
        # An empty value (or a last seq of -1) only releases a lease that is still ours.
        yield from self._run(
            "FILL_SESSION",
            (keys.value, keys.lease),
            (token, b"", 0, self._tombstone_ms),
            coherence.parse_fill_reply,
            write=True,
        )
        if tail:
            yield from self._run(
                "FILL_TAIL",
                (keys.tail, keys.fence, keys.tail_lease),
                (token, -1, 0, 0, 0),
                coherence.parse_fill_reply,
                write=True,
            )

    def _fill_session(self, session_id: str, token: str) -> Steps[SessionState | None]:
        """Read the docstore under our fill lease and install what it holds, if still ours."""
        state, fill = yield from self._session_fill_args(session_id)
        yield from self._finish_session_fill(session_id, token, fill)
        return state

    def _finish_session_fill(
        self, session_id: str, token: str, fill: tuple[bytes, int, int]
    ) -> Steps[None]:
        """Install what a miss read (an empty value only releases the lease, so
        waiting readers stop waiting), without waiting for Redis to answer."""
        installing = bool(fill[0])

        def count(reply: object) -> None:
            self._count_fill(coherence.parse_fill_reply(reply), installing=installing)

        keys = coherence.session_value_keys(self._key_prefix, session_id)
        yield from self._send_fill("FILL_SESSION", keys, (token, *fill), count)

    def _send_fill(
        self,
        script: str,
        keys: Sequence[str],
        args: Sequence[object],
        count: Callable[[object], None],
    ) -> Steps[None]:
        """Run a fill script without waiting for its reply, which only `count` needs
        (it parses and counts the reply, raising ProtocolError if it has no meaning)."""
        if not self._breaker.allow():
            self._stats.add("cache_skipped")
            return
        if self._pending and not (yield from self._drain()):
            return

        def done(reply: object) -> None:
            if isinstance(reply, redis.exceptions.NoScriptError):
                return  # Redis lost the scripts: the next call fences, the leases expire
            try:
                if isinstance(reply, Exception):
                    raise reply
                count(reply)
            except (redis.RedisError, OSError, ProtocolError) as exc:
                # Not this thread's failure: the call that reads the reply did not fail.
                self._cache_failed(exc, here=False)
                return
            self._cache_ok()

        sha = self._scripts[script][1]
        yield DeferredScript((sha, len(keys), *keys, *args), done)

    def _session_fill_args(
        self, session_id: str
    ) -> Steps[tuple[SessionState | None, tuple[bytes, int, int]]]:
        """Read the session from the docstore (under our fill lease); return it and what to cache.

        The state is None when the session is missing or expired.
        """
        return self._session_fill((yield from self._read_document(session_id)))

    def _session_fill(
        self, state: SessionState | None
    ) -> tuple[SessionState | None, tuple[bytes, int, int]]:
        """Return the session as a caller sees it (None when missing or expired) and what
        to cache of the docstore's `state`."""
        value, version, px = b"", 0, self._tombstone_ms
        if state is None:
            # Ids are never reused, so "missing" is final: cache it as a tombstone.
            value = TOMBSTONE
        elif not self._expired(state):
            session_px = self._px(state)
            if session_px is not None:
                try:
                    value = encode_session(state)
                except EncodeError as exc:
                    logger.warning(
                        "session %s cannot be cached: %s", short_hash(state.session.id), exc
                    )
                version, px = state.session.version, session_px
        live = None if state is None or self._expired(state) else state
        return live, (value, version, px)

    def _count_fill(self, result: FillResult | None, *, installing: bool) -> None:
        if result is FillResult.INSTALLED:
            self._stats.add("fills")
        elif result is not None and installing:
            self._stats.add("fills_refused")

    def _read_tail(
        self, session_id: str, state: SessionState, window: MessageWindow
    ) -> Steps[_Lookup]:
        """Ask Redis about the tail only (the session itself is already known)."""
        token = coherence.new_lease_token()
        args = coherence.read_args(token, self._fill_lease_ms, window, take_lease=False)
        reply = yield from self._run(
            "READ", self._keys(session_id).all(), args, coherence.parse_read_reply
        )
        if reply is None or reply.session is not SessionRead.HIT or reply.is_tombstone:
            return _Lookup(state)
        return _Lookup(state, True, reply.tail, reply.messages, token)

    def _messages_for(
        self, session_id: str, state: SessionState, window: MessageWindow, lookup: _Lookup
    ) -> Steps[list[Message]]:
        if lookup.tail is TailRead.HIT:
            try:
                messages = [decode_message(raw, session_id) for raw in lookup.messages]
                if not coherence.is_contiguous([message.seq for message in messages]):
                    raise DecodeError("the cached tail has a gap")
            except DecodeError as exc:
                self._note_decode_error(session_id, "message tail", exc)
                lookup = yield from self._drop_tail(session_id, state, window)
            else:
                self._stats.add("message_hits")
                return messages
        self._stats.add("message_misses")
        if lookup.tail is TailRead.LEASED:
            try:
                return (
                    yield from self._fill_tail(
                        session_id, state, window, lookup.token, lookup.session_fill, lookup.docs
                    )
                )
            except Abandoned:
                yield from self._release_leases(session_id, lookup.token, tail=True)
                raise
        return (yield from self._query_messages(session_id, state, window))

    def _drop_tail(
        self, session_id: str, state: SessionState, window: MessageWindow
    ) -> Steps[_Lookup]:
        token = coherence.new_lease_token()
        args = coherence.read_args(
            token, self._fill_lease_ms, window, take_lease=False, drop_tail=True
        )
        reply = yield from self._run(
            "READ", self._keys(session_id).all(), args, coherence.parse_read_reply
        )
        if reply is None or reply.session is not SessionRead.HIT or reply.tail is TailRead.HIT:
            return _Lookup(state)
        return _Lookup(state, True, reply.tail, (), token)

    def _fill_tail(
        self,
        session_id: str,
        state: SessionState,
        window: MessageWindow,
        token: str,
        session_fill: tuple[bytes, int, int] | None = None,
        docs: list[docstore.Document] | None = None,
    ) -> Steps[list[Message]]:
        """Answer the request from the docstore; under our tail lease, install what fits of it.

        A cold read costs what it returns: the docstore is asked for the
        window alone, never for more to fill the tail. When the window
        reaches the conversation's end, its newest messages that fit the
        count limit and the byte budget become the tail.
        """
        if docs is None:
            docs = yield from self._query_documents(state, window)
        messages = self._messages_of(docs, session_id)
        tail: list[tuple[Message, bytes]] = []
        args: list[object] = [token, -1, 0, 0, 0]
        px = self._px(state)
        reached_end = window.before_seq is None and (
            window.newest_first() or window.limit is None or len(docs) < window.limit
        )
        if (
            px is not None
            and reached_end
            and len(messages) == len(docs)
            # An empty answer says the conversation is empty only if it asked for all.
            and (messages or (window.after_seq in (None, 0) and window.limit != 0))
        ):
            try:
                bound = self._newest_that_fit(messages, tail)
            except EncodeError as exc:
                logger.warning("messages of %s cannot be cached: %s", short_hash(session_id), exc)
            else:
                reached_start = window.after_seq in (None, 0) and (
                    window.limit is None or len(docs) < window.limit
                )
                last_seq = messages[-1].seq if messages else 0
                complete = int(bound or reached_start)
                entries = [entry for _, entry in reversed(tail)]
                args = [token, last_seq, px, self._tail_bytes, complete, *entries]
        keys = self._keys(session_id)
        if session_fill is not None:
            # A cold read: the session and the tail in one script, whose reply only
            # the counters need (as a miss's session fill, see _finish_session_fill).
            installing = bool(session_fill[0]), args[1] != -1

            def count(reply: object) -> None:
                session_result, tail_result = coherence.parse_fill_pair_reply(reply)
                self._count_fill(session_result, installing=installing[0])
                self._count_fill(tail_result, installing=installing[1])

            fill_args = [token, *session_fill, *args[1:]]
            yield from self._send_fill("FILL_SESSION_AND_TAIL", keys.all(), fill_args, count)
            return messages
        result = yield from self._run(
            "FILL_TAIL", (keys.tail, keys.fence, keys.tail_lease), args, coherence.parse_fill_reply
        )
        self._count_fill(result, installing=args[1] != -1)
        return messages

    def _newest_that_fit(
        self, messages: Sequence[Message], tail: list[tuple[Message, bytes]]
    ) -> bool:
        """Collect into `tail`, newest first, the run of messages the tail can hold.

        Return True if an older message was left out (it does not fit, or a
        gap in the seqs stops the run), False if every message was taken.
        """
        size = 0
        for message in reversed(messages):
            if tail and message.seq != tail[-1][0].seq - 1:
                return True
            if len(tail) >= self._tail_size:
                return True
            entry = encode_message(message)
            if size + len(entry) > self._tail_bytes:
                return True
            tail.append((message, entry))
            size += len(entry)
        return False

    # -- writing -----------------------------------------------------------------

    def _conversation_of(self, session_id: str, before_lookup: Callable[[], None]) -> Steps[str]:
        """Return the session's conversation key, looking the session up if it is not known.

        `before_lookup` runs first when a lookup is needed (input checks that
        must refuse bad input before the lookup may fill the cache).
        """
        conversation = self._conversations.get(session_id, self._now_us())
        if conversation is None:
            before_lookup()
            state = (yield from self._lookup(session_id)).state
            if state is None:
                raise SessionNotFound("no such session")
            conversation = state.conversation
        return conversation

    def _remove_messages(self, session_id: str, method: str) -> Steps[Any]:
        """Run a docstore step that removes messages and bumps the session; refresh the cache.

        `method` is the docstore's `pop_child` or `delete_children`; returns what it removed.
        """
        if not self._usable_id(session_id):
            raise SessionNotFound("no such session")
        cache_failures = self._failures_here.get()
        conversation = yield from self._conversation_of(session_id, _nothing)
        removed = yield from self._write(
            session_id,
            self._doc(
                method,
                (self._messages, {"conv": conversation}),
                {"parent": (self._sessions, session_id), "parent_ttl": self._session_ttl},
            ),
        )
        # A lookup that just timed out means Redis is down: one timeout per call is enough.
        try_cache = self._failures_here.get() == cache_failures
        if removed is None:
            yield from self._invalidate(session_id, tombstone=True, try_cache=try_cache)
            raise SessionNotFound("no such session")
        state = self._state_of(removed[0], session_id)
        self._conversations.remember(session_id, state)
        yield from self._refresh_after_removal(session_id, state, try_cache=try_cache)
        return removed[1]

    # -- writing the cache ------------------------------------------------------

    def _refresh_session(self, session_id: str, state: SessionState) -> Steps[None]:
        """After a commit: replace an older cached copy and cancel fills in flight."""
        if not self._has_cache:
            return
        px = self._px(state)
        try:
            value = encode_session(state) if px is not None else None
        except EncodeError:
            value = None
        if value is None or px is None:
            yield from self._invalidate(session_id, tombstone=False)
            return
        yield from self._cache_write(
            session_id,
            "WRITE_SESSION",
            coherence.session_value_keys(self._key_prefix, session_id),
            (value, state.session.version, px),
        )

    def _refresh_after_append(
        self,
        session_id: str,
        parent: docstore.Document,
        state: SessionState | None,
        message: Message,
        *,
        try_cache: bool,
    ) -> Steps[None]:
        """After an append: refresh the session copy, extend the tail, cancel fills in flight.

        With `state` the copy is replaced by its encoding; without (`parent`
        came without its data), a copy of the version before is patched.
        """
        if not self._has_cache:
            return
        px = self._px_until(parent.expires_at)
        try:
            if state is None:
                value, patch = session_patch(parent.version, parent.updated_at, parent.expires_at)
            else:
                value, patch = encode_session(state), None
            entry = encode_message(message)
        except EncodeError:
            px = None
        if px is None:
            yield from self._invalidate(session_id, tombstone=False, try_cache=try_cache)
            return
        args: tuple[object, ...] = (
            value,
            parent.version,
            px,
            entry,
            message.seq,
            max(self._tail_size, 1),
            self._tail_bytes,
        )
        if patch is not None:
            args += (patch,)
        yield from self._cache_write(
            session_id, "WRITE_MESSAGE", self._keys(session_id).all(), args, try_cache=try_cache
        )

    def _refresh_after_removal(
        self, session_id: str, state: SessionState, *, try_cache: bool
    ) -> Steps[None]:
        """After a pop or clear: refresh the session copy, drop the tail, cancel fills in flight."""
        if not self._has_cache:
            return
        px = self._px(state)
        try:
            value = encode_session(state) if px is not None else None
        except EncodeError:
            value = None
        if value is None or px is None:
            yield from self._invalidate(session_id, tombstone=False, try_cache=try_cache)
            return
        yield from self._cache_write(
            session_id,
            "WRITE_REMOVAL",
            self._keys(session_id).all(),
            (value, state.session.version, px),
            try_cache=try_cache,
        )


def _nothing() -> None:
    """Check nothing (pop and clear take no input that a lookup must not see)."""
