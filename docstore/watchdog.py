"""A client-side deadline for statements, for when the network, not the server, is stuck.

psycopg2 has no client-side query timeout: the server's `statement_timeout`
cancels a slow statement, but when the network drops traffic the server never
sees the statement (or its answer never arrives) and the call blocks in libpq
until the kernel gives up, minutes later. TCP keepalives do not help when a
middlebox (a proxy, a NAT, a load balancer) keeps acknowledging.

`StatementWatchdog` watches the connections a store lends out: a call registers
its connection with a deadline before sending and unregisters it after the
answer (a dict store and delete under a lock, well under a microsecond). One
daemon thread per store wakes a few times a second and shuts down the socket
of any connection past its deadline; libpq then fails the call at once with a
broken connection, which the store turns into `StoreUnavailable` and discards.
Only connections the store registers are touched; other psycopg2 connections
in the process keep their behaviour (unlike `psycopg2.extensions.set_wait_callback`,
which is process-wide).

Waiting for the whole statement_timeout before giving up would let a partition
stall every call for seconds, so a statement still unanswered after half a
second is checked: a probe on a fresh connection asks the server whether the
backend is still running it (see `StatementWatchdog`).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import psycopg2
from psycopg2.extensions import connection as Connection

__all__ = ["StatementWatchdog"]

logger = logging.getLogger(__name__)


Probe = Callable[[list[int]], set[int]]


@dataclass
class _Watched:
    conn: Connection
    backend_pid: int
    deadline: float  # give up for good (statement_timeout has long passed)
    next_probe: float  # ask the server whether it is still working on it


class StatementWatchdog:
    """Shut down the socket of a registered connection whose answer is not coming.

    A statement is given up `timeout` seconds after it was sent. With a
    `probe`, the watchdog asks sooner: `probe_after` seconds after sending
    (and every `probe_after` seconds after that) it asks the server, on a
    separate connection, which of the waiting connections' backends are
    still running a statement. One whose backend is not (the statement never
    arrived, or its answer was lost) is broken at once; when the probe itself
    cannot reach the server, all of them are. A slow statement the server is
    still running is left alone until `timeout`.
    """

    def __init__(
        self,
        timeout: float,
        *,
        interval: float = 0.1,
        probe: Probe | None = None,
        probe_after: float = 1.2,
    ) -> None:
        if timeout <= 0 or interval <= 0 or probe_after <= 0:
            raise ValueError("timeout, interval and probe_after must be positive")
        self.timeout = timeout
        self._interval = min(interval, timeout / 4)
        self._probe = probe
        self._probe_after = probe_after
        self._lock = threading.Lock()
        self._busy: dict[int, _Watched] = {}  # keyed by id(conn)
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self.fired = 0

    def enter(self, conn: Connection, backend_pid: int = 0) -> None:
        """Start watching `conn` (whose server process is `backend_pid`) for one statement."""
        now = time.monotonic()
        watched = _Watched(conn, backend_pid, now + self.timeout, now + self._probe_after)
        with self._lock:
            self._busy[id(conn)] = watched
            if self._thread is None:
                self._start()

    def leave(self, conn: Connection) -> None:
        """Stop watching `conn`: its statement answered (or failed)."""
        with self._lock:
            self._busy.pop(id(conn), None)

    def close(self) -> None:
        """Stop the thread; nothing is watched afterwards."""
        self._stopped.set()
        with self._lock:
            self._busy.clear()

    def _start(self) -> None:
        self._thread = threading.Thread(
            target=self._run, name="docstore-statement-watchdog", daemon=True
        )
        self._thread.start()

    def _run(self) -> None:
        while not self._stopped.wait(self._interval):
            now = time.monotonic()
            with self._lock:
                for watched in [w for w in self._busy.values() if w.deadline <= now]:
                    self._break_watched(watched, "no answer within the statement timeout")
                probing = self._probe is not None
                due = [w for w in self._busy.values() if probing and w.next_probe <= now]
            if due:
                self._check(due)

    def _check(self, due: list[_Watched]) -> None:
        assert self._probe is not None
        try:
            working = self._probe([watched.backend_pid for watched in due])
            reason = "the server is not running its statement"
        except Exception as exc:  # any failure to ask means: the server cannot be reached
            logger.debug("probe failed: %s", type(exc).__name__)
            working, reason = set(), "the server cannot be reached"
        now = time.monotonic()
        with self._lock:
            for watched in due:
                if self._busy.get(id(watched.conn)) is not watched:
                    continue  # answered meanwhile
                if watched.backend_pid in working:
                    watched.next_probe = now + self._probe_after
                else:
                    self._break_watched(watched, reason)

    def _break_watched(self, watched: _Watched, reason: str) -> None:
        # Called under the lock: the owner cannot leave and hand the connection to
        # another call while we break it.
        del self._busy[id(watched.conn)]
        logger.warning("no answer from PostgreSQL (%s); breaking the connection", reason)
        self._break(watched.conn)

    def _break(self, conn: Connection) -> None:
        self.fired += 1
        try:
            # Tells the store the call timed out (not a connection that died idle,
            # which is worth one retry): sending it again would wait as long.
            conn.timed_out = True  # type: ignore[attr-defined]
        except AttributeError:
            pass  # a plain psycopg2 connection takes no attributes
        try:
            # fromfd duplicates the descriptor; shutdown acts on the shared socket,
            # so libpq's blocked read returns at once. Closing the duplicate leaves
            # libpq's own descriptor for libpq to close.
            with socket.fromfd(conn.fileno(), socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.shutdown(socket.SHUT_RDWR)
        except (OSError, ValueError, psycopg2.Error) as exc:
            # psycopg2.InterfaceError: the connection was closed meanwhile.
            logger.debug("could not shut down an overdue connection: %s", exc)
