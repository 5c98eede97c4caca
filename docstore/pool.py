"""A small bounded psycopg2 connection pool that never hands out a broken connection."""

from __future__ import annotations

import logging
import math
import select
import threading
from collections.abc import Callable
from typing import Any

import psycopg2
from psycopg2.extensions import connection as Connection

from .errors import StoreUnavailable

__all__ = ["ConnectionPool"]

logger = logging.getLogger(__name__)


class ConnectionPool:
    """Hand out autocommit connections; at most `max_connections` exist at once.

    A connection is checked on checkout without a round trip: one the client
    already knows is closed, or whose socket became readable while it sat idle
    (the server only speaks unasked when it terminates the session), is closed
    and replaced. A connection released as broken is closed, never reused, and
    the idle ones are closed with it.
    """

    def __init__(
        self,
        connect_kwargs: dict[str, Any],
        *,
        min_connections: int,
        max_connections: int,
        acquire_timeout: float,
        on_connect: Callable[[Connection], None],
    ) -> None:
        if min_connections < 0 or max_connections < 1 or min_connections > max_connections:
            raise ValueError("need 0 <= min_connections <= max_connections, max_connections >= 1")
        self._connect_kwargs = connect_kwargs
        self._min_connections = min_connections
        self._acquire_timeout = acquire_timeout
        self._on_connect = on_connect
        self._idle: list[Connection] = []
        self._slots = threading.BoundedSemaphore(max_connections)
        self._lock = threading.Lock()
        self._closed = False

    def prefill(self) -> None:
        """Open `min_connections` connections now, so the first calls pay no connect."""
        opened = [self.acquire() for _ in range(self._min_connections)]
        for conn in opened:
            self.release(conn)

    def acquire(self) -> Connection:
        """Return a healthy connection, waiting at most `acquire_timeout` for a free slot."""
        if self._closed:
            raise StoreUnavailable("the store is closed")
        if not self._slots.acquire(timeout=self._acquire_timeout):
            raise StoreUnavailable(
                f"no database connection free within {self._acquire_timeout:g} s (pool exhausted)"
            )
        try:
            while True:
                with self._lock:
                    conn = self._idle.pop() if self._idle else None
                if conn is None:
                    return self._connect()
                if _looks_healthy(conn):
                    return conn
                logger.info("discarding a pooled connection that broke while idle")
                _close_quietly(conn)
        except BaseException:
            self._slots.release()
            raise

    def release(self, conn: Connection, *, broken: bool = False) -> None:
        """Give a connection back; a broken one (or one left in a transaction) is closed."""
        try:
            keep = (
                not broken
                and not self._closed
                and conn.closed == 0
                and conn.get_transaction_status() == psycopg2.extensions.TRANSACTION_STATUS_IDLE
            )
            if keep:
                with self._lock:
                    self._idle.append(conn)
                return
            _close_quietly(conn)
            if broken:
                # What broke one connection (a server restart, a network cut) has
                # most likely broken its idle siblings too, perhaps not visibly yet:
                # close them rather than let each fail one more call.
                with self._lock:
                    idle, self._idle = self._idle, []
                for sibling in idle:
                    _close_quietly(sibling)
        finally:
            self._slots.release()

    def close(self) -> None:
        """Close every idle connection; connections in use are closed when released."""
        self._closed = True
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            _close_quietly(conn)

    def _connect(self) -> Connection:
        try:
            conn: Connection = psycopg2.connect(**self._connect_kwargs)
        except psycopg2.Error as exc:
            raise StoreUnavailable(f"cannot connect to PostgreSQL: {_first_line(exc)}") from exc
        try:
            conn.autocommit = True
            self._on_connect(conn)
        except psycopg2.Error as exc:
            _close_quietly(conn)
            raise StoreUnavailable(f"cannot set up the connection: {_first_line(exc)}") from exc
        return conn


def _looks_healthy(conn: Connection) -> bool:
    if conn.closed:
        return False
    try:
        readable, _, _ = select.select([conn.fileno()], [], [], 0)
    except (OSError, ValueError, psycopg2.Error):
        return False
    return not readable


def _close_quietly(conn: Connection) -> None:
    try:
        conn.close()
    except psycopg2.Error:
        # Closing a connection whose socket is already gone may complain; it is closed anyway.
        logger.debug("error while closing a broken connection", exc_info=True)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def connect_timeout_seconds(timeout: float) -> int:
    """Return libpq's whole-second connect_timeout for `timeout` (libpq takes no fractions)."""
    return max(1, math.ceil(timeout))
