"""`AsyncSessionStore`: the session store for asyncio, sharing every rule with `SessionStore`.

What every call does is `protocol.SessionProtocol`, exactly as for the sync
store; this module only awaits its requests: docstore calls on an
`AsyncDocumentStore`, commands on a `redis.asyncio.Redis`, lease waits with
`asyncio.sleep`. No call blocks the event loop.

Cancellation: when the caller is cancelled (or times out) while a request is
in flight, `Abandoned` is thrown into the call's steps at once, so a write
that may commit anyway is remembered as pending before the cancellation
propagates; the clean-up the protocol then asks for (removing the session's
cached copy, releasing a fill lease) runs in a background task of the store,
which `aclose()` waits for.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from types import TracebackType
from typing import Any, TypeVar

import hiredis
import redis.asyncio

import docstore

from .models import Message, Session
from .protocol import (
    DEFAULT_TAIL_BYTES,
    Abandoned,
    CacheCall,
    CachePipeline,
    DeferredScript,
    DocCall,
    InTransaction,
    Request,
    SessionProtocol,
    Sleep,
    Steps,
)

__all__ = ["AsyncSessionStore"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

# How long aclose() waits for the clean-up of cancelled calls.
_CLEANUP_GRACE = 5.0


# Docstore methods that change nothing: a read in flight is dropped when its caller is
# cancelled; anything else is finished (see AsyncSessionStore._finish_in_background).
_READS = frozenset({"read", "read_with", "query", "count", "list_collections", "ensure_index"})


def _may_commit(request: Request) -> bool:
    """Whether a request may commit a change in PostgreSQL."""
    if isinstance(request, DocCall):
        return request.method not in _READS
    return isinstance(request, InTransaction)


def _script_caller(cache: redis.asyncio.Redis | None) -> Callable[..., Awaitable[Any]]:
    """Return how the store awaits `EVALSHA sha numkeys *keys *args` on `cache`.

    As the sync store does (see `session.store._script_caller`): straight on a
    pooled connection, under the client's retry policy, skipping
    `redis.asyncio`'s generic command path (an `initialize()` and awaited
    operation metrics per call). A connection interrupted mid-command, by an
    error or a cancellation, is closed by redis-py itself and never reused
    with a reply unread. A client bound to a single connection keeps the
    generic path, and so does anything that is not a `redis.asyncio.Redis`
    (a wrapper that watches the client's calls sees the scripts).
    """
    if cache is None:
        return _no_cache
    pool = _script_pool(cache)
    if pool is None:
        return cache.evalsha
    return pool


def _script_pool(cache: redis.asyncio.Redis | None) -> _PooledScripts | None:
    """Return the connections the store sends scripts on itself; None for the generic path."""
    if not isinstance(cache, redis.asyncio.Redis) or cache.single_connection_client:
        return None
    return _PooledScripts(cache.connection_pool)


class _PooledScripts:
    """Script calls straight on the client's pooled connections.

    As in the sync store, connections whose replies were all read are kept
    checked out between calls (up to 16, and never more than half of the
    pool), which skips the pool's locked checkout and release and their
    awaited metrics. A kept connection the server closed meanwhile is
    reconnected before use; `release()` (from `aclose()`) gives them back.
    """

    _MAX_KEPT = 16

    def __init__(self, pool: Any) -> None:
        self.pool = pool
        self._kept: list[Any] = []
        self._max_kept = min(self._MAX_KEPT, getattr(pool, "max_connections", 0) // 2)

    async def __call__(self, *args: Any) -> Any:
        conn = await self.checkout()
        try:
            reply = await conn.retry.call_with_retry(
                lambda: _send_script(conn, args), lambda _error: conn.disconnect()
            )
        except BaseException:
            await self.pool.release(conn)
            raise
        if not self._keep(conn):
            await self.pool.release(conn)
        return reply

    async def checkout(self) -> Any:
        """A connection with nothing left to read: a kept one, else the pool's."""
        try:
            conn = self._kept.pop()
        except IndexError:
            return await self.pool.get_connection()
        try:
            if conn.is_connected:
                # Closed by the server meanwhile (a restart), or (never expected)
                # data left to read: reconnect, as the pool's own checkout does.
                try:
                    stale = await conn.can_read()
                except (redis.ConnectionError, redis.TimeoutError, OSError):
                    stale = True
                if stale:
                    await conn.disconnect()
        except BaseException:
            await self.pool.release(conn)
            raise
        return conn

    def _keep(self, conn: Any) -> bool:
        """Hold a connection whose replies were all read, for the next call; False when
        enough are kept (the caller releases it then)."""
        if len(self._kept) < self._max_kept:
            self._kept.append(conn)
            return True
        return False

    async def read_reply(self, conn: Any, done: Callable[[object], None]) -> None:
        """Hand `done` the reply waiting on `conn` (or the error reading it); keep or release it."""
        try:
            reply = await conn.read_response()
        except BaseException as exc:
            # An error reply; or a broken connection, which redis-py closed.
            await self.pool.release(conn)
            if not isinstance(exc, Exception):
                raise
            done(exc)
            return
        if not self._keep(conn):
            await self.pool.release(conn)
        done(reply)

    async def release(self) -> None:
        """Give every kept connection back to the pool."""
        while self._kept:
            await self.pool.release(self._kept.pop())


async def _send_script(conn: Any, args: tuple[Any, ...]) -> Any:
    await _send_evalsha(conn, args)
    return await conn.read_response()


async def _send_evalsha(conn: Any, args: tuple[Any, ...]) -> None:
    """Send `EVALSHA *args` on `conn`, packed by hiredis when the client encodes as UTF-8.

    `redis.asyncio` packs commands in Python (6.0 us for a READ_SESSION
    against 1.1 us for hiredis) even where hiredis is installed. hiredis
    writes str as UTF-8, so a client set to another encoding keeps its own
    packer.
    """
    encoder = conn.encoder
    if encoder.encoding in _UTF8 and encoder.encoding_errors == "strict":
        await conn.send_packed_command([hiredis.pack_command(("EVALSHA", *args))])
    else:
        await conn.send_command("EVALSHA", *args)


_UTF8 = frozenset({"utf-8", "utf8", "UTF-8", "UTF8"})


async def _no_cache(*args: Any) -> Any:
    raise AssertionError("a store without a cache sent a script")


class AsyncSessionStore(SessionProtocol):
    """Sessions and their conversations for asyncio: PostgreSQL committed, Redis cached.

    Every method of `SessionStore` under the same name, with the same
    arguments, results, errors and guarantees, as a coroutine, except
    `stats()` (no I/O, a plain method); `aclose()` replaces `close()` and the
    store is an async context manager. `docstore` is an `AsyncDocumentStore`,
    `cache` a `redis.asyncio.Redis` (or None). Building the store needs no
    running event loop: the first call fences Redis if it lost the scripts
    and creates the docstore's indexes, as `SessionStore()` does at once.
    """

    def __init__(
        self,
        docstore: docstore.AsyncDocumentStore,
        cache: redis.asyncio.Redis | None = None,
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
        if cache is not None and cache.get_encoder().decode_responses:  # type: ignore[no-untyped-call]
            raise ValueError("the Redis client must not decode responses (decode_responses=False)")
        self._docstore = docstore
        self._cache = cache
        self._call_script = _script_caller(cache)
        self._script_pool = (
            self._call_script if isinstance(self._call_script, _PooledScripts) else None
        )
        self._owns_docstore = owns_docstore
        self._owns_cache = owns_cache
        self._ensure_indexes = ensure_indexes
        self._started = False
        # Binds to a loop on first use only (Python 3.10+): no loop needed here.
        self._start_lock = asyncio.Lock()
        self._cleanups: set[asyncio.Task[None]] = set()

    @classmethod
    def from_env(cls) -> AsyncSessionStore:
        """Return a store configured from the environment (see `get_async_session_store`)."""
        from .config import get_async_session_store

        return get_async_session_store()

    # -- running the protocol -----------------------------------------------------

    async def _call(self, steps: Steps[T]) -> T:
        if not self._started:
            try:
                await self._start()
            except BaseException:
                steps.close()
                raise
        return await self._drive(steps)

    async def _start(self) -> None:
        """Run the protocol's start-up once (fence a Redis that lost the scripts, indexes)."""
        async with self._start_lock:
            if not self._started:
                await self._drive(self._startup_steps(self._ensure_indexes), clean_up=False)
                self._started = True

    async def _drive(self, steps: Steps[T], *, clean_up: bool = True) -> T:
        """Await one call's requests in order, sending each result (or error) back."""
        call_script = self._call_script
        try:
            request = next(steps)
            while True:
                write: asyncio.Task[Any] | None = None
                try:
                    # A script call (a plain tuple) first: a cache hit's only request.
                    if type(request) is tuple:
                        result = await call_script(*request)
                    elif clean_up and _may_commit(request):
                        # Not interrupted by a cancellation of the caller: see
                        # _finish_in_background.
                        write = asyncio.get_running_loop().create_task(self._perform(request))
                        result = await asyncio.shield(write)
                    else:
                        result = await self._perform(request)
                except asyncio.CancelledError:
                    if write is not None and not write.cancelled():
                        self._finish_in_background(steps, write)
                    elif clean_up:
                        self._abandon(steps)
                    else:
                        steps.close()
                    raise
                except Exception as exc:  # the protocol decides what it handles
                    request = steps.throw(exc)
                else:
                    request = steps.send(result)
        except StopIteration as stop:
            value: T = stop.value
            return value

    def _finish_in_background(self, steps: Steps[Any], write: asyncio.Task[Any]) -> None:
        """The caller was cancelled with a docstore write in flight: finish the call (the
        write, then its cache update, or the invalidation its failure asks for) in
        the background.

        PostgreSQL does not stop a statement because its client went away: a write
        sent may commit after the caller was cancelled (once a row lock it waits
        for is free, say). An invalidation at the cancellation would come too
        early for it: a reader could fill the cache in between, from the state
        before the write, and that copy would be served stale until cache_ttl.
        Finished here, the call refreshes the copy after the commit, and the
        connection goes back to the pool with its answer read.
        """
        task = asyncio.get_running_loop().create_task(self._finish_write(steps, write))
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)

    async def _finish_write(self, steps: Steps[Any], write: asyncio.Task[Any]) -> None:
        try:
            try:
                result = await write
            except Exception as exc:
                request = steps.throw(exc)
            else:
                request = steps.send(result)
        except StopIteration:
            return
        except Exception:  # the call's own error: its caller is gone
            logger.debug("a cancelled session call failed", exc_info=True)
            return
        except asyncio.CancelledError:  # aclose() gave up waiting for the write
            steps.close()
            raise
        await self._finish_abandoned(steps, request, quiet=True)

    def _abandon(self, steps: Steps[Any]) -> None:
        """Tell the steps their caller is gone; finish their clean-up in the background."""
        try:
            # Runs the protocol's immediate reaction (remembering the session as
            # possibly stale) now, before the cancellation propagates.
            request = steps.throw(Abandoned())
        except (Abandoned, StopIteration):
            return
        except Exception:
            logger.exception("cleaning up after a cancelled session call failed")
            return
        # Its own task: the cancellation of the caller's task does not reach it.
        task = asyncio.get_running_loop().create_task(self._finish_abandoned(steps, request))
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)

    async def _finish_abandoned(
        self, steps: Steps[Any], request: Request, *, quiet: bool = False
    ) -> None:
        try:
            while True:
                try:
                    if type(request) is tuple:
                        result = await self._call_script(*request)
                    else:
                        result = await self._perform(request)
                except Exception as exc:
                    request = steps.throw(exc)
                else:
                    request = steps.send(result)
        except (Abandoned, StopIteration):
            pass
        except asyncio.CancelledError:
            steps.close()
            raise
        except Exception:
            if quiet:  # the call's own error (a finished write): its caller is gone
                logger.debug("a cancelled session call failed", exc_info=True)
            else:
                logger.exception("cleaning up after a cancelled session call failed")

    async def _defer_script(self, request: DeferredScript) -> None:
        """Send a fill; read its reply in a task of its own, so the miss returns sooner.

        On a pooled `redis.asyncio.Redis` the caller awaits only the send (a
        cancellation there leaves the connection closed by redis-py, and the
        protocol releases the lease); the reply is read, and the connection
        released, in the background (`aclose()` waits for it). Any other
        client runs the script in the call.
        """
        pool = self._script_pool
        if pool is None:
            try:
                reply = await self._call_script(*request.args)
            except Exception as exc:
                request.done(exc)
            else:
                request.done(reply)
            return
        try:
            conn: Any = await pool.checkout()
        except Exception as exc:
            request.done(exc)
            return
        try:
            await _send_evalsha(conn, request.args)
        except BaseException as exc:
            await pool.pool.release(conn)
            if not isinstance(exc, Exception):
                raise
            request.done(exc)
            return
        task = asyncio.get_running_loop().create_task(pool.read_reply(conn, request.done))
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)

    async def _perform(self, request: Request) -> Any:
        if isinstance(request, DocCall):
            method = getattr(self._docstore, request.method)
            if request.kwargs is None:
                return await method(*request.args)
            return await method(*request.args, **request.kwargs)
        if isinstance(request, CacheCall):
            return await getattr(self._cache, request.method)(*request.args)
        if isinstance(request, CachePipeline):
            assert self._cache is not None
            pipe = self._cache.pipeline(transaction=False)
            for name, args in request.commands:
                getattr(pipe, name)(*args)
            return await pipe.execute()
        if isinstance(request, DeferredScript):
            await self._defer_script(request)
            return None
        if isinstance(request, Sleep):
            await asyncio.sleep(request.seconds)
            return None
        if isinstance(request, InTransaction):
            async with self._docstore.transaction():
                return await self._drive(request.steps, clean_up=False)
        raise TypeError(f"unknown request {type(request).__name__}")

    # -- public API ------------------------------------------------------------

    async def create_session(
        self,
        user_id: str | None = None,
        data: dict[str, Any] | None = None,
        *,
        ttl: float | None = None,
    ) -> Session:
        """Create a session with an unguessable id; nothing is cached until it is read."""
        return await self._call(self._create_session_steps(user_id, data, ttl))

    async def get_session(self, session_id: str) -> Session | None:
        """Return the session, cache first; None when it is missing or expired."""
        return await self._call(self._get_session_steps(session_id))

    async def update_session(
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
        return await self._call(self._update_session_steps(session_id, data, expected_version, ttl))

    async def touch_session(self, session_id: str, ttl: float | None = None) -> bool:
        """Push the expiry to `ttl` (default: session_ttl) from now; False if missing."""
        return await self._call(self._touch_session_steps(session_id, ttl))

    async def delete_session(self, session_id: str) -> bool:
        """Remove the session and its messages from both tiers; True if it existed."""
        return await self._call(self._delete_session_steps(session_id))

    async def rotate_session_id(self, session_id: str) -> Session:
        """Move the session (data and messages) to a new id; the old id stops working."""
        return await self._call(self._rotate_session_id_steps(session_id))

    async def list_sessions(
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
        return await self._call(self._list_sessions_steps(user_id, limit, after))

    async def add_message(
        self,
        session_id: str,
        role: str,
        content: str,
        *,
        metadata: dict[str, Any] | None = None,
        message_id: str | None = None,
    ) -> Message:
        """Append a message; a repeated `message_id` returns the stored message instead."""
        return await self._call(
            self._add_message_steps(session_id, role, content, metadata, message_id)
        )

    async def pop_message(self, session_id: str) -> Message | None:
        """Remove the newest message and return it (None if there is none), version + 1.

        One atomic docstore step: concurrent pops never return the same message.
        The next `add_message` continues after the highest seq ever given out.
        """
        return await self._call(self._pop_message_steps(session_id))

    async def clear_messages(self, session_id: str) -> int:
        """Remove every message of the session, keep the session; return how many (version + 1)."""
        return await self._call(self._clear_messages_steps(session_id))

    async def get_messages(
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
        return await self._call(self._get_messages_steps(session_id, limit, after_seq, before_seq))

    async def purge_expired(self, *, batch_size: int = 1000, orphans: bool = False) -> int:
        """Delete expired sessions with their messages; return how many documents went.

        As `SessionStore.purge_expired`: each batch in one transaction, and
        `orphans=True` also sweeps messages whose session went some other way.
        """
        return await self._call(self._purge_expired_steps(batch_size, orphans))

    # -- for operations tools -----------------------------------------------------

    @property
    def document_store(self) -> docstore.AsyncDocumentStore:
        """The AsyncDocumentStore underneath (PostgreSQL is the source of truth)."""
        return self._docstore

    @property
    def cache(self) -> redis.asyncio.Redis | None:
        """The `redis.asyncio` client, or None when the store runs without a cache."""
        return self._cache

    async def evict(self, session_id: str) -> None:
        """Drop every cached key of the session (after a write made around this store)."""
        await self._call(self._evict_steps(session_id))

    async def aclose(self) -> None:
        """Finish the clean-up of cancelled calls and read the replies of fills in flight;
        release what this store created itself.

        A docstore or Redis client passed in stays open for its owner.
        """
        if self._cleanups:
            _, late = await asyncio.wait(set(self._cleanups), timeout=_CLEANUP_GRACE)
            for task in late:
                # Redis does not answer: what the clean-up would remove expires
                # within cache_ttl (the session stays remembered as stale meanwhile).
                task.cancel()
            if late:
                logger.warning("closing with %d clean-ups of cancelled calls unfinished", len(late))
        if self._script_pool is not None:
            await self._script_pool.release()
        if self._owns_cache and self._cache is not None:
            await self._cache.aclose()
        if self._owns_docstore:
            await self._docstore.aclose()

    async def __aenter__(self) -> AsyncSessionStore:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()
