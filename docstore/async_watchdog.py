"""Give up on a statement whose answer is not coming, for the asyncio store.

The twin of `watchdog.py`: the per-statement deadline (statement_timeout +
0.5 s) alone would let a network partition stall every call for seconds, so a
statement still unanswered after `probe_after` seconds is checked. A probe on
a fresh connection (with a deadline of its own) asks the server whether the
waiting connections' backends are still running a statement; a connection
whose backend is not (the statement never arrived, or its answer was lost),
or every waiting one when the probe cannot reach the server, is closed at
once, which fails the waiting call. One task per store does the checking,
started when a statement is registered and ending when none is left.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable

from .async_pool import PooledConnection

__all__ = ["AsyncStatementWatchdog"]

logger = logging.getLogger(__name__)

Probe = Callable[[list[int]], Awaitable[set[int]]]


@dataclasses.dataclass
class _Watched:
    conn: PooledConnection
    next_probe: float


class AsyncStatementWatchdog:
    """Close a registered connection whose server is not working on its statement."""

    def __init__(self, probe: Probe, *, probe_after: float, interval: float = 0.1) -> None:
        if probe_after <= 0 or interval <= 0:
            raise ValueError("probe_after and interval must be positive")
        self._probe = probe
        self._probe_after = probe_after
        self._interval = min(interval, probe_after / 2)
        self._busy: dict[int, _Watched] = {}  # keyed by id(conn)
        self._task: asyncio.Task[None] | None = None
        self.fired = 0

    def enter(self, conn: PooledConnection) -> None:
        """Start watching `conn` for one statement."""
        self._busy[id(conn)] = _Watched(conn, time.monotonic() + self._probe_after)
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    def leave(self, conn: PooledConnection) -> None:
        """Stop watching `conn`: its statement answered (or failed)."""
        self._busy.pop(id(conn), None)

    def close(self) -> None:
        """Stop watching; nothing is watched afterwards."""
        self._busy.clear()
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _run(self) -> None:
        try:
            while self._busy:
                await asyncio.sleep(self._interval)
                now = time.monotonic()
                due = [watched for watched in self._busy.values() if watched.next_probe <= now]
                if due:
                    await self._check(due)
        finally:
            if self._task is asyncio.current_task():
                self._task = None

    async def _check(self, due: list[_Watched]) -> None:
        try:
            working = await self._probe([watched.conn.backend_pid for watched in due])
            reason = "the server is not running its statement"
        except Exception as exc:  # any failure to ask means: the server cannot be reached
            logger.debug("probe failed: %s", type(exc).__name__)
            working, reason = set(), "the server cannot be reached"
        now = time.monotonic()
        for watched in due:
            if self._busy.get(id(watched.conn)) is not watched:
                continue  # answered meanwhile
            if watched.conn.backend_pid in working:
                watched.next_probe = now + self._probe_after
                continue
            del self._busy[id(watched.conn)]
            logger.warning("no answer from PostgreSQL (%s); closing the connection", reason)
            self.fired += 1
            watched.conn.timed_out = True
            watched.conn.discard()
