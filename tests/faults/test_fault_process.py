"""The application process killed (kill -9) between a commit and the cache update."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from fault_proxy import FaultProxy
from fault_summary import FaultSummary

from docstore import PostgresDocumentStore
from session import SessionStore

pytestmark = [pytest.mark.faults, pytest.mark.embedded]

CACHE_TTL = 1.5


def test_process_killed_between_commit_and_cache_update(
    embedded_dsn: str,
    pg_table: str,
    redis_proxy: FaultProxy,
    key_prefix: str,
    make_docstore: Callable[..., PostgresDocumentStore],
    make_session_store: Callable[..., SessionStore],
    fault_summary: FaultSummary,
) -> None:
    store = make_session_store(cache_ttl=CACHE_TTL)
    session = store.create_session(data={"n": 0})
    assert store.get_session(session.id) == session  # the pre-write copy is cached
    cached_at = time.monotonic()
    writer = subprocess.Popen(
        [
            sys.executable,
            str(Path(__file__).with_name("fault_crash_writer.py")),
            embedded_dsn,
            pg_table,
            f"redis://127.0.0.1:{redis_proxy.port}/0",
            key_prefix,
            str(CACHE_TTL),
            session.id,
        ],
        stdout=subprocess.PIPE,
    )
    try:
        assert writer.stdout is not None
        assert writer.stdout.readline().strip() == b"COMMITTED"
    finally:
        writer.kill()  # kill -9, by its pid
        writer.wait(timeout=10)
        if writer.stdout is not None:
            writer.stdout.close()
    fault_summary.add_fault("application killed between commit and cache update")
    truth = make_session_store(cached=False, docstore=make_docstore(proxied=False))
    committed = truth.get_session(session.id)
    assert committed is not None and committed.data == {"n": 1}
    # The write never returned, so the old copy may still be served, but never
    # past cache_ttl (its PX was set when it was cached), from any process.
    newcomer = make_session_store(cache_ttl=CACHE_TTL)
    reads = 0
    while True:
        seen = newcomer.get_session(session.id)
        reads += 1
        assert seen in (session, committed)
        if seen == committed:
            break
        assert time.monotonic() < cached_at + CACHE_TTL + 0.5, "the old copy outlived cache_ttl"
        time.sleep(0.05)  # polling with a deadline
    # And the next write that returns is seen at once by everyone.
    updated = newcomer.update_session(session.id, {"n": 2})
    assert store.get_session(session.id) == updated
    fault_summary.add_operations(reads + 2)


def test_process_killed_then_a_new_write_replaces_the_old_copy(
    embedded_dsn: str,
    pg_table: str,
    redis_proxy: FaultProxy,
    key_prefix: str,
    make_session_store: Callable[..., SessionStore],
    fault_summary: FaultSummary,
) -> None:
    store = make_session_store()  # default cache_ttl: only a write can refresh the copy
    session = store.create_session(data={"n": 0})
    store.get_session(session.id)
    writer = subprocess.Popen(
        [
            sys.executable,
            str(Path(__file__).with_name("fault_crash_writer.py")),
            embedded_dsn,
            pg_table,
            f"redis://127.0.0.1:{redis_proxy.port}/0",
            key_prefix,
            "3600",
            session.id,
        ],
        stdout=subprocess.PIPE,
    )
    try:
        assert writer.stdout is not None
        assert writer.stdout.readline().strip() == b"COMMITTED"
    finally:
        writer.kill()
        writer.wait(timeout=10)
        if writer.stdout is not None:
            writer.stdout.close()
    fault_summary.add_fault("application killed between commit and cache update")
    newcomer = make_session_store()
    updated = newcomer.update_session(session.id, {"n": 2})
    assert updated.version == 3 and updated.data == {"n": 2}
    assert store.get_session(session.id) == updated
    assert newcomer.get_session(session.id) == updated
