"""A small bounded asyncpg connection pool that never hands out a broken connection."""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg

from .errors import StoreUnavailable

__all__ = ["AsyncConnectionPool", "PooledConnection"]

logger = logging.getLogger(__name__)


class PooledConnection:
    """An asyncpg connection and the statements prepared on it."""

    __slots__ = ("raw", "prepared", "backend_pid", "timed_out")

    def __init__(self, raw: Any) -> None:
        self.raw = raw
        # Numbered text -> asyncpg PreparedStatement, least recently used first.
        self.prepared: OrderedDict[str, Any] = OrderedDict()
        self.backend_pid: int = raw.get_server_pid()
        self.timed_out = False  # set when the store gave up waiting for an answer

    def is_usable(self) -> bool:
        return not self.raw.is_closed() and not self.raw.is_in_transaction()

    def discard(self) -> None:
        """Close the connection at once, without a round trip (safe mid-statement)."""
        if not self.raw.is_closed():
            self.raw.terminate()


class AsyncConnectionPool:
    """Hand out connections; at most `max_connections` exist at once.

    The twin of `pool.ConnectionPool`: a connection is checked on checkout
    without a round trip (the event loop reads a connection's socket while it
    idles, so one the server closed is already known closed), one released as
    broken is closed, never reused, and the idle ones are closed with it.
    `release` never awaits, so it runs to completion in a `finally` even when
    the caller is being cancelled. Asyncio objects are made on first use, so
    the pool can be built outside a running loop.
    """

    def __init__(
        self,
        connect: Callable[[], Awaitable[Any]],
        *,
        min_connections: int,
        max_connections: int,
        acquire_timeout: float,
    ) -> None:
        if min_connections < 0 or max_connections < 1 or min_connections > max_connections:
            raise ValueError("need 0 <= min_connections <= max_connections, max_connections >= 1")
        self._connect = connect
        self._min_connections = min_connections
        self._max_connections = max_connections
        self._acquire_timeout = acquire_timeout
        self._idle: list[PooledConnection] = []
        self._slots: asyncio.Semaphore | None = None
        self._closed = False

    async def prefill(self) -> None:
        """Open `min_connections` connections now, so the first calls pay no connect."""
        opened = []
        try:
            for _ in range(self._min_connections - len(self._idle)):
                opened.append(await self.acquire())
        finally:
            for conn in opened:
                self.release(conn)

    async def acquire(self) -> PooledConnection:
        """Return a healthy connection, waiting at most `acquire_timeout` for a free slot."""
        if self._closed:
            raise StoreUnavailable("the store is closed")
        slots = self._slots
        if slots is None:
            slots = self._slots = asyncio.Semaphore(self._max_connections)
        if slots.locked():
            try:
                await asyncio.wait_for(slots.acquire(), self._acquire_timeout)
            except asyncio.TimeoutError:
                raise StoreUnavailable(
                    f"no database connection free within {self._acquire_timeout:g} s "
                    "(pool exhausted)"
                ) from None
        else:
            await slots.acquire()  # free: returns at once
        try:
            while self._idle:
                conn = self._idle.pop()
                if conn.is_usable():
                    return conn
                logger.info("discarding a pooled connection that broke while idle")
                conn.discard()
            return PooledConnection(await self._connect())
        except BaseException:
            slots.release()
            raise

    def release(self, conn: PooledConnection, *, broken: bool = False) -> None:
        """Give a connection back; a broken one (or one left in a transaction) is closed."""
        try:
            if not broken and not self._closed and conn.is_usable():
                self._idle.append(conn)
                return
            conn.discard()
            if broken:
                # What broke one connection (a server restart, a network cut) has
                # most likely broken its idle siblings too: close them rather than
                # let each fail one more call.
                idle, self._idle = self._idle, []
                for sibling in idle:
                    sibling.discard()
        finally:
            if self._slots is not None:
                self._slots.release()

    async def aclose(self) -> None:
        """Close every idle connection; connections in use are closed when released."""
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            try:
                await asyncio.wait_for(conn.raw.close(), 1.0)
            except (OSError, asyncio.TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
                conn.discard()
