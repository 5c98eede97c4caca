"""Run the `serial` tests alone while pytest-xdist runs the others side by side.

Every test of a worker holds a shared lock on a file the run's workers share;
a `serial` test (a latency bound, where another test's load could make it
fail) holds it exclusively, so it starts once the other workers have finished
the test they were running, and they start nothing new until it is done.
A turnstile in front of the shared lock keeps a stream of ordinary tests from
starving the one waiting to run alone.
"""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

__all__ = ["RunLock"]


class RunLock:
    """Readers-writer lock between the processes that open the same `directory`."""

    def __init__(self, directory: Path) -> None:
        self._gate: IO[bytes] = open(directory / "gate", "ab")  # noqa: SIM115
        self._room: IO[bytes] = open(directory / "room", "ab")  # noqa: SIM115

    @contextmanager
    def hold(self, *, alone: bool) -> Iterator[None]:
        if alone:
            fcntl.flock(self._gate, fcntl.LOCK_EX)  # no one new comes in
            try:
                fcntl.flock(self._room, fcntl.LOCK_EX)  # those inside leave
                try:
                    yield
                finally:
                    fcntl.flock(self._room, fcntl.LOCK_UN)
            finally:
                fcntl.flock(self._gate, fcntl.LOCK_UN)
            return
        fcntl.flock(self._gate, fcntl.LOCK_EX)  # wait behind a test that waits to run alone
        fcntl.flock(self._room, fcntl.LOCK_SH)
        fcntl.flock(self._gate, fcntl.LOCK_UN)
        try:
            yield
        finally:
            fcntl.flock(self._room, fcntl.LOCK_UN)

    def close(self) -> None:
        self._gate.close()
        self._room.close()
