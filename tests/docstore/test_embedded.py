"""The embedded server's life: the last process to leave stops it, even when others were killed.

Each test here runs its own server in a temporary data directory (never the
session's shared one), and stops it itself if the test fails.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.embedded

# Starts (or joins) the server on argv[1], prints its DSN, then waits until killed.
USER = """
import sys
from docstore.embedded import start_embedded
print(start_embedded(sys.argv[1]), flush=True)
sys.stdin.read()
"""
# Starts (or joins) the server on argv[1], uses it once, exits normally.
SHORT_USER = """
import sys
import psycopg2
from docstore.embedded import start_embedded
psycopg2.connect(start_embedded(sys.argv[1]), connect_timeout=10).close()
"""


def postmaster_pid(data_dir: Path) -> int | None:
    """Return the pid of the server running on `data_dir`, or None if none is."""
    try:
        pid = int((data_dir / "postmaster.pid").read_text().split()[0])
    except (FileNotFoundError, IndexError, ValueError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    return pid


def wait_for(condition: Callable[[], bool], *, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


@pytest.fixture
def data_dir(tmp_path: Path) -> Iterator[Path]:
    directory = tmp_path / "pgdata"
    yield directory
    pid = postmaster_pid(directory)
    if pid is not None:  # the test failed with its server still up: stop it
        os.kill(pid, signal.SIGTERM)
        wait_for(lambda: postmaster_pid(directory) is None, timeout=30, what="the server to stop")


def test_the_last_user_stops_the_server_even_after_a_user_was_killed(data_dir: Path) -> None:
    killed = subprocess.Popen(
        [sys.executable, "-c", USER, str(data_dir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert killed.stdout is not None
        assert "host=" in killed.stdout.readline()  # the server is up
    finally:
        killed.kill()  # SIGKILL: no exit hook runs
        killed.wait()
        if killed.stdin is not None:
            killed.stdin.close()
        if killed.stdout is not None:
            killed.stdout.close()
    assert postmaster_pid(data_dir) is not None, "the server outlives its killed starter"
    later = subprocess.run(
        [sys.executable, "-c", SHORT_USER, str(data_dir)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert later.returncode == 0, later.stderr
    # The later process was the last live user: leaving, it stopped the server.
    wait_for(lambda: postmaster_pid(data_dir) is None, timeout=30, what="the server to stop")
