"""Faults of Redis: paused, killed and restarted (empty, or with its old AOF), partitioned.

Each test runs its own redis-server behind a FaultProxy, and the embedded
PostgreSQL. Every call must keep working through PostgreSQL within a couple of
seconds, with no Redis exception escaping, and no copy that missed an update
may be served once Redis is back (at most cache_ttl for another process's copy).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial

import pytest
from fault_proxy import FaultProxy
from fault_redis import RedisProcess
from fault_summary import FaultSummary

from session import Session, SessionStore

pytestmark = [pytest.mark.faults, pytest.mark.embedded]

CACHE_TTL = 2.0
BOUND = 2.0  # seconds any call may take while a fault is active


class Timed:
    """Run calls, recording how long each took under one fault kind."""

    def __init__(self, summary: FaultSummary, kind: str) -> None:
        self.summary = summary
        self.kind = kind
        self.durations: list[float] = []

    def __call__(self, call: Callable[[], object]) -> object:
        started = time.monotonic()
        try:
            return call()
        finally:
            elapsed = time.monotonic() - started
            self.durations.append(elapsed)
            assert elapsed < BOUND, f"a call took {elapsed:.2f} s under {self.kind}"

    def report(self) -> None:
        self.summary.add_operations(len(self.durations))
        self.summary.add_latencies(self.kind, self.durations)


@contextmanager
def fault(summary: FaultSummary, kind: str) -> Iterator[Timed]:
    summary.add_fault(kind)
    timed = Timed(summary, kind)
    try:
        yield timed
    finally:
        timed.report()


def work_through(timed: Timed, store: SessionStore, session: Session, seconds: float) -> Session:
    """Update, append and read for `seconds`; every answer must be the committed one."""
    deadline = time.monotonic() + seconds
    current = session
    number = 0
    while time.monotonic() < deadline:
        number += 1
        message_id = f"m{number}"
        updated = timed(partial(store.update_session, session.id, {"n": number}))
        assert isinstance(updated, Session)
        assert updated.version > current.version
        current = updated
        assert timed(lambda: store.get_session(session.id)) == current
        timed(partial(store.add_message, session.id, "user", "hi", message_id=message_id))
        current = store.get_session(session.id) or current
        messages = timed(lambda: store.get_messages(session.id, limit=1))
        assert isinstance(messages, list) and messages[-1].id == message_id
    return current


def poll_until_fresh(store: SessionStore, expected: Session, within: float) -> None:
    """Assert `store` serves `expected` within `within` seconds (a copy may live cache_ttl)."""
    deadline = time.monotonic() + within
    while store.get_session(expected.id) != expected:
        assert time.monotonic() < deadline, "a stale copy outlived cache_ttl"
        time.sleep(0.05)  # polling with a deadline


def test_redis_paused(
    make_session_store: Callable[..., SessionStore],
    redis_process: RedisProcess,
    fault_summary: FaultSummary,
) -> None:
    store = make_session_store(cache_ttl=CACHE_TTL)
    other = make_session_store(cache_ttl=CACHE_TTL)  # another process: knows nothing pending
    session = store.create_session(data={"n": 0})
    assert other.get_session(session.id) == session  # cached now
    with fault(fault_summary, "redis SIGSTOP") as timed:
        redis_process.pause()
        try:
            current = work_through(timed, store, session, 2.5)
        finally:
            redis_process.resume()
    assert store.stats()["cache_errors"] > 0
    # This store removes the copies it could not refresh before its next Redis call.
    assert store.get_session(session.id) == current
    poll_until_fresh(other, current, CACHE_TTL + 1)


@pytest.mark.parametrize("keep_data", [False, True], ids=["restart-empty", "restart-with-aof"])
def test_redis_killed_and_restarted(
    make_session_store: Callable[..., SessionStore],
    redis_process: RedisProcess,
    fault_summary: FaultSummary,
    keep_data: bool,
) -> None:
    reader = make_session_store()
    session = reader.create_session(data={"n": 0})
    assert reader.get_session(session.id) == session  # cached, and in the AOF
    reader.get_messages(session.id)  # the tail and its fence too
    kind = "redis kill -9, restart " + ("with AOF" if keep_data else "empty")
    with fault(fault_summary, kind) as timed:
        redis_process.kill()
        # A process that writes while Redis is down, then dies: its pending
        # invalidations die with it, so the AOF copy missed this write.
        writer = make_session_store()
        timed(lambda: writer.add_message(session.id, "user", "while down", message_id="down"))
        written = timed(lambda: writer.update_session(session.id, {"n": 1}))
        assert isinstance(written, Session) and written.version == 3
        assert timed(lambda: reader.get_session(session.id)) == written  # Redis down: PostgreSQL
        if not keep_data:
            redis_process.wipe()
        redis_process.start()
    # Never the copy from before the restart, in a store that knew the old
    # server, nor in one built after the restart.
    assert reader.get_session(session.id) == written
    assert [m.id for m in reader.get_messages(session.id)] == ["down"]
    newcomer = make_session_store()
    assert newcomer.get_session(session.id) == written
    assert reader.stats()["cache_fences"] + newcomer.stats()["cache_fences"] >= 1


def test_redis_restart_with_old_data_never_serves_a_missed_invalidation_to_anyone(
    make_session_store: Callable[..., SessionStore],
    redis_process: RedisProcess,
    fault_summary: FaultSummary,
) -> None:
    first, second = make_session_store(), make_session_store()
    sessions = [first.create_session(data={"n": 0}) for _ in range(5)]
    for session in sessions:
        first.get_session(session.id)
    fault_summary.add_fault("redis kill -9, restart with AOF")
    redis_process.kill()
    writer = make_session_store()
    written = [writer.update_session(session.id, {"n": 1}) for session in sessions]
    redis_process.start()
    # Whichever store reaches the restarted server first, none serves the old copies.
    for session, expected in zip(sessions, written, strict=True):
        assert second.get_session(session.id) == expected
        assert first.get_session(session.id) == expected
    fault_summary.add_operations(len(sessions) * 3)


def test_redis_partitioned(
    make_session_store: Callable[..., SessionStore],
    redis_proxy: FaultProxy,
    fault_summary: FaultSummary,
) -> None:
    store = make_session_store(cache_ttl=CACHE_TTL)
    other = make_session_store(cache_ttl=CACHE_TTL)
    session = store.create_session(data={"n": 0})
    assert other.get_session(session.id) == session
    with fault(fault_summary, "redis partition") as timed:
        redis_proxy.partition()
        try:
            current = work_through(timed, store, session, 2.5)
        finally:
            redis_proxy.heal()
    assert store.get_session(session.id) == current
    poll_until_fresh(other, current, CACHE_TTL + 1)


def test_redis_cut(
    make_session_store: Callable[..., SessionStore],
    redis_proxy: FaultProxy,
    fault_summary: FaultSummary,
) -> None:
    store = make_session_store(cache_ttl=CACHE_TTL)
    session = store.create_session(data={"n": 0})
    store.get_session(session.id)
    with fault(fault_summary, "redis connection cut") as timed:
        redis_proxy.cut()
        try:
            current = work_through(timed, store, session, 1.5)
        finally:
            redis_proxy.resume()
    assert store.get_session(session.id) == current
