"""`SessionStore`: sessions and conversations in a DocumentStore, hot copies in Redis.

PostgreSQL (any `DocumentStore`) is the source of truth; Redis holds copies
that follow the lease-and-fence protocol of `coherence`. What every call does
is `protocol.SessionProtocol`, shared with `AsyncSessionStore`; this module
only runs its requests: docstore calls on a `DocumentStore`, commands on a
`redis.Redis`, lease waits with `time.sleep`.
"""

from __future__ import annotations

import collections
import os
import secrets  # noqa: F401  (the random source of every id, patched by tests through here)
import time
from collections.abc import Callable
from datetime import datetime
from types import TracebackType
from typing import Any, TypeVar

import hiredis
import redis
from redis.connection import HiredisRespSerializer

import docstore

from .models import Message, Session
from .protocol import (
    _SESSION_ID_BYTES,  # noqa: F401  (tests size the ids through here)
    DEFAULT_TAIL_BYTES,
    STAT_NAMES,
    CacheCall,
    CachePipeline,
    DeferredScript,
    DocCall,
    InTransaction,
    Request,
    SessionProtocol,
    Sleep,
    Steps,
    new_token,
    required_indexes,
    short_hash,
)

__all__ = [
    "SessionStore",
    "STAT_NAMES",
    "DEFAULT_TAIL_BYTES",
    "short_hash",
    "new_token",
    "required_indexes",
]

T = TypeVar("T")


def _script_caller(cache: redis.Redis | None) -> _Scripts:
    """Return how the store runs `EVALSHA sha numkeys *keys *args` on `cache`.

    A pooled client's `evalsha` spends about 45k instructions of client CPU in
    redis-py's generic command path (command-name lookups, event dispatch,
    operation metrics) on top of the round trip itself, a tenth of a cache
    hit's. Scripts are sent straight on a pooled connection instead
    (`_PooledScripts`), keeping what matters of that path: the client's retry
    policy (a broken connection is dropped before a retry), and a connection
    that failed mid-command is closed by redis-py itself, never reused. A
    client bound to a single connection keeps the generic path, and so does
    anything that is not a `redis.Redis` (a wrapper that watches the client's
    calls sees the scripts).
    """
    if cache is None:
        return _Scripts(_no_cache)
    if not isinstance(cache, redis.Redis) or cache.connection is not None:
        return _Scripts(cache.evalsha)
    return _PooledScripts(cache.connection_pool)


class _Scripts:
    """Script calls through `evalsha`; a deferred one is answered at once."""

    def __init__(self, evalsha: Callable[..., Any]) -> None:
        self._evalsha = evalsha

    def __call__(self, *args: Any) -> Any:
        return self._evalsha(*args)

    def defer(self, args: tuple[Any, ...], done: Callable[[object], None]) -> None:
        """Run the script; hand `done` its reply or error (here: before returning)."""
        try:
            reply = self._evalsha(*args)
        except Exception as exc:
            done(exc)
        else:
            done(reply)

    def drain(self) -> None:
        """Read every reply left unread (here: there are none)."""

    def release(self) -> None:
        """Read every reply left unread and give back every connection held (here: none)."""


# Bumped in a forked child: connections parked by the parent are not the child's.
_fork_generation = [0]


def _count_fork() -> None:
    _fork_generation[0] += 1


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_count_fork)


_Parked = tuple[Any, Any, Callable[[object], None]]


class _PooledScripts(_Scripts):
    """Script calls straight on the client's pooled connections.

    A deferred call (a fill after a miss) is sent, and its connection is parked
    with the reply unread, still checked out of the pool: the miss returns one
    round trip sooner. The next script call of any thread takes a parked
    connection first and sends its own command behind the fill (a pipeline of
    two), then reads both replies: no round trip of its own is added, and the
    same thread's next read reaches Redis after its fill. `drain()` (from
    `stats()` and `close()`) reads every reply still waiting.

    A connection whose replies were all read is kept for the next call (see
    `_kept`) instead of going back to the pool; `release()` (from `close()`)
    gives the kept ones back.
    """

    _MAX_PARKED = 16
    _MAX_KEPT = 16

    def __init__(self, pool: Any) -> None:
        self._pool = pool
        # (connection, its socket when parked, what to hand the waiting reply)
        self._parked: collections.deque[_Parked] = collections.deque()
        # Connections kept checked out between calls, every reply read: taking
        # one skips the pool's checkout and release, a sixth of a cache hit's
        # client CPU. As many as calls ran at once, up to _MAX_KEPT, and never
        # more than half of a bounded pool, so the application's own commands
        # still find connections.
        self._kept: list[Any] = []
        self._max_kept = min(self._MAX_KEPT, getattr(pool, "max_connections", 0) // 2)
        self._generation = _fork_generation[0]

    def __call__(self, *args: Any) -> Any:
        parked = self._take_parked() if self._parked else None
        if parked is None:
            conn: Any = self._checkout()
            return self._run_on(
                conn, lambda: _send_script(conn, args), lambda _error: conn.disconnect()
            )
        conn, sock, done = parked
        waiting = [done]

        def attempt() -> Any:
            if waiting and conn._sock is not sock:
                # Closed meanwhile (a client close(), a pool reset): the reply went
                # with the socket, and the next one on a new socket is our own.
                waiting.pop()(redis.ConnectionError("closed before a fill's reply was read"))
            _send_evalsha(conn, args)
            if waiting:
                _read_into(conn, waiting.pop())
            return conn.read_response()

        def failed(error: Exception) -> None:
            if waiting:  # the send failed: the fill's reply is lost with the connection
                waiting.pop()(error)
            conn.disconnect()

        return self._run_on(conn, attempt, failed)

    def _run_on(
        self, conn: Any, attempt: Callable[[], Any], failed: Callable[[Exception], None]
    ) -> Any:
        """Run `attempt` on `conn` under the client's retry policy; keep `conn` after
        (every reply read), or give it back to the pool if anything was raised."""
        try:
            reply = conn.retry.call_with_retry(attempt, failed)
        except BaseException:
            self._pool.release(conn)
            raise
        self._keep(conn)
        return reply

    def _checkout(self) -> Any:
        """A connection with nothing left to read: one this object keeps, else the pool's."""
        if self._generation != _fork_generation[0]:
            self._forget_parents()
        try:
            conn = self._kept.pop()
        except IndexError:
            return self._pool.get_connection()
        if conn._sock is not None:
            # Closed by the server meanwhile (a restart), or (never expected)
            # data left to read: reconnect, as the pool's own checkout does.
            try:
                stale = conn.can_read()
            except (redis.ConnectionError, redis.TimeoutError, OSError):
                stale = True
            if stale:
                conn.disconnect()
        return conn

    def _keep(self, conn: Any) -> None:
        """Hold a connection whose replies were all read, for the next call."""
        if len(self._kept) < self._max_kept and self._generation == _fork_generation[0]:
            self._kept.append(conn)
        else:
            self._pool.release(conn)

    def defer(self, args: tuple[Any, ...], done: Callable[[object], None]) -> None:
        try:
            conn = self._checkout()
        except Exception as exc:
            done(exc)
            return
        try:
            _send_evalsha(conn, args)
        except Exception as exc:
            # redis-py closed the connection; the lease expires on its own.
            self._pool.release(conn)
            done(exc)
            return
        if len(self._parked) < self._MAX_PARKED:
            self._parked.append((conn, conn._sock, done))
        else:
            self._settle((conn, conn._sock, done))

    def drain(self) -> None:
        while (parked := self._take_parked()) is not None:
            self._settle(parked)

    def release(self) -> None:
        """Read every waiting reply, then hand every kept connection back to the pool."""
        self.drain()
        while self._kept:
            try:
                conn = self._kept.pop()
            except IndexError:
                break
            self._pool.release(conn)

    def _settle(self, parked: _Parked) -> None:
        """Read a parked reply into its `done` (unless its socket is gone), then release."""
        conn, sock, done = parked
        if conn._sock is not sock:
            done(redis.ConnectionError("closed before a fill's reply was read"))
            self._pool.release(conn)
            return
        try:
            _read_into(conn, done)
        except Exception:  # handed to `done`; redis-py closed the connection
            self._pool.release(conn)
            return
        self._keep(conn)

    def __del__(self) -> None:
        # A store dropped without close(): close the sockets of parked
        # connections, so no reply is left unread on an open connection, and
        # hand the kept ones back.
        for conn, _, _ in self._parked:
            conn.disconnect()
        if self._generation == _fork_generation[0]:
            for conn in self._kept:
                self._pool.release(conn)

    def _take_parked(self) -> _Parked | None:
        """Return the oldest parked connection and its reply's `done`; None if none is left."""
        if self._generation != _fork_generation[0]:
            self._forget_parents()
            return None
        try:
            return self._parked.popleft()
        except IndexError:
            return None

    def _forget_parents(self) -> None:
        """In a forked child: drop the parent's connections (their sockets are not ours)."""
        self._parked = collections.deque()
        self._kept = []
        self._generation = _fork_generation[0]


def _read_into(conn: Any, done: Callable[[object], None]) -> None:
    """Read one reply from `conn` into `done`; re-raise an error that broke the connection."""
    try:
        reply = conn.read_response()
    except redis.ResponseError as exc:
        done(exc)  # an error reply: the connection is fine
        return
    except Exception as exc:
        done(exc)
        raise
    done(reply)


def _send_script(conn: Any, args: tuple[Any, ...]) -> Any:
    _send_evalsha(conn, args)
    return conn.read_response()


def _send_evalsha(conn: Any, args: tuple[Any, ...]) -> None:
    """Send `EVALSHA *args` on `conn`, packed by hiredis where redis-py would use it.

    redis-py's packer first walks the arguments looking for byte views and
    space-separated command names, which a script's never are: 3.8 us against
    1.6 us for hiredis alone, of a cache hit's ~90 us of client CPU.
    """
    if type(conn._command_packer) is HiredisRespSerializer:
        conn.send_packed_command([hiredis.pack_command(("EVALSHA", *args))])
    else:
        conn.send_command("EVALSHA", *args)


def _no_cache(*args: Any) -> Any:
    raise AssertionError("a store without a cache sent a script")


class SessionStore(SessionProtocol):
    """Sessions and their conversations: PostgreSQL committed, Redis cached.

    `docstore` is any DocumentStore; `cache` a `redis.Redis` client (or None
    for no cache). `cache_ttl` bounds how long any value lives in Redis;
    `session_ttl` is the idle lifetime of a session (None: no expiry).
    See docs/session.md for the protocol and every keyword argument.
    """

    def __init__(
        self,
        docstore: docstore.DocumentStore,
        cache: redis.Redis | None = None,
        *,
        cache_ttl: float = 3600,
        session_ttl: float | None = None,
        key_prefix: str = "sess:",
        sessions_collection: str = "sessions",
        messages_collection: str = "messages",
        tail_size: int = 100,
        tail_bytes: int = DEFAULT_TAIL_BYTES,
        fill_lease_ttl: float = 2.0,
        lease_wait: float = 0.1,
        tombstone_ttl: float = 10.0,
        breaker_threshold: int = 3,
        breaker_cooldown: float = 1.0,
        clock: Callable[[], float] = time.time,
        ensure_indexes: bool = True,
        owns_docstore: bool = False,
        owns_cache: bool = False,
    ) -> None:
        super().__init__(
            has_cache=cache is not None,
            cache_ttl=cache_ttl,
            session_ttl=session_ttl,
            key_prefix=key_prefix,
            sessions_collection=sessions_collection,
            messages_collection=messages_collection,
            tail_size=tail_size,
            tail_bytes=tail_bytes,
            fill_lease_ttl=fill_lease_ttl,
            lease_wait=lease_wait,
            tombstone_ttl=tombstone_ttl,
            breaker_threshold=breaker_threshold,
            breaker_cooldown=breaker_cooldown,
            clock=clock,
        )
        if cache is not None and cache.get_encoder().decode_responses:
            raise ValueError("the Redis client must not decode responses (decode_responses=False)")
        self._docstore = docstore
        self._cache = cache
        self._script_io = _script_caller(cache)
        self._call_script = self._script_io.__call__
        self._owns_docstore = owns_docstore
        self._owns_cache = owns_cache
        self._drive(self._startup_steps(ensure_indexes))

    @classmethod
    def from_env(cls) -> SessionStore:
        """Return a store configured from the environment (see `get_session_store`)."""
        from .config import get_session_store

        return get_session_store()

    # -- running the protocol -----------------------------------------------------

    def _drive(self, steps: Steps[T]) -> T:
        """Run one call's requests in order, sending each result (or error) back."""
        call_script = self._call_script
        try:
            request = next(steps)
            while True:
                try:
                    # A script call (a plain tuple) first: a cache hit's only request.
                    if type(request) is tuple:
                        result = call_script(*request)
                    else:
                        result = self._perform(request)
                except Exception as exc:  # the protocol decides what it handles
                    request = steps.throw(exc)
                else:
                    request = steps.send(result)
        except StopIteration as stop:
            value: T = stop.value
            return value

    def _perform(self, request: Request) -> Any:
        if isinstance(request, CacheCall):
            return getattr(self._cache, request.method)(*request.args)
        if isinstance(request, DocCall):
            method = getattr(self._docstore, request.method)
            if request.kwargs is None:
                return method(*request.args)
            return method(*request.args, **request.kwargs)
        if isinstance(request, CachePipeline):
            assert self._cache is not None
            pipe = self._cache.pipeline(transaction=False)
            for name, args in request.commands:
                getattr(pipe, name)(*args)
            return pipe.execute()
        if isinstance(request, DeferredScript):
            self._script_io.defer(request.args, request.done)
            return None
        if isinstance(request, Sleep):
            time.sleep(request.seconds)
            return None
        if isinstance(request, InTransaction):
            with self._docstore.transaction():
                return self._drive(request.steps)
        raise TypeError(f"unknown request {type(request).__name__}")

    # -- public API ------------------------------------------------------------

    def create_session(
        self,
        user_id: str | None = None,
        data: dict[str, Any] | None = None,
        *,
        ttl: float | None = None,
    ) -> Session:
        """Create a session with an unguessable id; nothing is cached until it is read."""
        return self._drive(self._create_session_steps(user_id, data, ttl))

    def get_session(self, session_id: str) -> Session | None:
        """Return the session, cache first; None when it is missing or expired."""
        return self._drive(self._get_session_steps(session_id))

    def update_session(
        self,
        session_id: str,
        data: dict[str, Any],
        *,
        expected_version: int | None = None,
        ttl: float | None = None,
    ) -> Session:
        """Shallow-merge `data` into the session (version + 1), written through.

        `ttl` sets the expiry to that many seconds from now in the same step
        (default: slide it by `session_ttl`, if set).
        """
        return self._drive(self._update_session_steps(session_id, data, expected_version, ttl))

    def touch_session(self, session_id: str, ttl: float | None = None) -> bool:
        """Push the expiry to `ttl` (default: session_ttl) from now; False if missing."""
        return self._drive(self._touch_session_steps(session_id, ttl))

    def delete_session(self, session_id: str) -> bool:
        """Remove the session and its messages from both tiers; True if it existed."""
        return self._drive(self._delete_session_steps(session_id))

    def rotate_session_id(self, session_id: str) -> Session:
        """Move the session (data and messages) to a new id; the old id stops working."""
        return self._drive(self._rotate_session_id_steps(session_id))

    def list_sessions(
        self,
        user_id: str,
        *,
        limit: int = 100,
        after: Session | tuple[datetime, str] | None = None,
    ) -> list[Session]:
        """Return the user's live sessions, most recently updated first.

        `after` is a keyset cursor: the last session of the previous page (or
        its `(updated_at, id)`); the page holds the sessions listed after it.
        """
        return self._drive(self._list_sessions_steps(user_id, limit, after))

    def add_message(
        self,
        session_id: str,
        role: str,
        content: str,
        *,
        metadata: dict[str, Any] | None = None,
        message_id: str | None = None,
    ) -> Message:
        """Append a message; a repeated `message_id` returns the stored message instead."""
        return self._drive(self._add_message_steps(session_id, role, content, metadata, message_id))

    def pop_message(self, session_id: str) -> Message | None:
        """Remove the newest message and return it (None if there is none), version + 1.

        One atomic docstore step: concurrent pops never return the same message.
        The next `add_message` continues after the highest seq ever given out.
        """
        return self._drive(self._pop_message_steps(session_id))

    def clear_messages(self, session_id: str) -> int:
        """Remove every message of the session, keep the session; return how many (version + 1)."""
        return self._drive(self._clear_messages_steps(session_id))

    def get_messages(
        self,
        session_id: str,
        *,
        limit: int | None = None,
        after_seq: int | None = None,
        before_seq: int | None = None,
    ) -> list[Message]:
        """Return messages oldest first; `limit` alone gives the newest N.

        `after_seq=S` gives those after S (with `limit=N` the first N of them);
        `before_seq=S` those before S (with `limit=N` the newest N of them:
        paging backwards). [] when the session is missing or expired.
        """
        return self._drive(self._get_messages_steps(session_id, limit, after_seq, before_seq))

    def purge_expired(self, *, batch_size: int = 1000, orphans: bool = False) -> int:
        """Delete expired sessions with their messages; return how many documents went.

        Each batch of expired sessions goes with its messages in one transaction,
        so the cost follows what expired, not the size of the store. Run it from
        a periodic job. `orphans=True` also sweeps the messages of sessions that
        went some other way (a purge by the docstore itself, or by a version of
        this library older than the transactional one): that walks the first
        message of every conversation, so it is for an occasional clean-up.
        """
        return self._drive(self._purge_expired_steps(batch_size, orphans))

    # -- for operations tools (session.transfer, session.ops) --------------------

    @property
    def document_store(self) -> docstore.DocumentStore:
        """The DocumentStore underneath (PostgreSQL is the source of truth)."""
        return self._docstore

    @property
    def cache(self) -> redis.Redis | None:
        """The Redis client, or None when the store runs without a cache."""
        return self._cache

    def evict(self, session_id: str) -> None:
        """Drop every cached key of the session (after a write made around this store).

        An import writes to the docstore directly: a tombstone or an older copy
        left in Redis must not hide what it wrote. Fills in flight are cancelled.
        """
        self._drive(self._evict_steps(session_id))

    def stats(self) -> dict[str, int]:
        """Return the cache counters (see STAT_NAMES), plus whether the breaker is open.

        Fills whose replies were not yet read (see `_PooledScripts`) are read
        first, so the counts include them.
        """
        self._script_io.drain()
        return super().stats()

    def close(self) -> None:
        """Release what this store created itself; a client passed in stays open."""
        self._script_io.release()
        if self._owns_cache and self._cache is not None:
            self._cache.close()
        if self._owns_docstore:
            self._docstore.close()

    def __enter__(self) -> SessionStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
