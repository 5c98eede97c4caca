"""Many threads and several processes writing, filling and reading the same sessions.

The guarantee under test (API.md): with Redis healthy, once a write has
returned, no reader anywhere sees an older version, also when several
processes write and fill at once. Every call records its version and its start
and end on `time.monotonic_ns()`, which on Linux is CLOCK_MONOTONIC: one clock
for every process of the machine. A read that started after a write ended must
return at least that write's version.

Also: concurrent `add_message` from two processes gives seqs 1..n without gaps
or duplicates, and a retried `message_id` is stored once.

PostgreSQL is the server named by POSTGRES_CONNECTION_STRING, else the
embedded one. Redis is the server named by REDIS_URL; without it the threaded
tests use one fakeredis server shared by the threads, and the cross-process
ones (which need a Redis every process can reach) are skipped, or fail when CI
is set.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import threading
import time
import traceback
from bisect import bisect_left
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import fakeredis
import pytest
import redis
from postgres_tables import drop_tables, unique_table

from docstore import PostgresDocumentStore
from session import SessionStore
from session.coherence import session_keys
from session.pytest_plugin import unique_key_prefix

pytestmark = pytest.mark.slow

RUN_SECONDS = 2.0
SESSIONS = 3
MESSAGES_PER_PROCESS = 30
SHARED_MESSAGES = 20
PROCESS_TIMEOUT = 120.0


@dataclass(frozen=True)
class Setup:
    """Everything a worker (thread or process) needs to build its own store."""

    dsn: str
    table: str
    redis_url: str | None
    key_prefix: str
    sessions_collection: str
    messages_collection: str
    session_ids: tuple[str, ...]


@dataclass(frozen=True)
class Event:
    """One call: a write ("w") or read ("r") of a session, its version, when it ran."""

    kind: str
    session: str
    version: int
    start_ns: int
    end_ns: int


def build_store(
    setup: Setup, docs: PostgresDocumentStore, cache: redis.Redis | None
) -> SessionStore:
    return SessionStore(
        docs,
        cache,
        key_prefix=setup.key_prefix,
        sessions_collection=setup.sessions_collection,
        messages_collection=setup.messages_collection,
        ensure_indexes=False,
    )


# --------------------------------------------------------------------------- the workload


def write_loop(store: SessionStore, setup: Setup, name: str, deadline: float) -> list[Event]:
    """Update the sessions in turn with an increasing counter until the deadline."""
    events = []
    counter = 0
    while time.monotonic() < deadline:
        session_id = setup.session_ids[counter % len(setup.session_ids)]
        counter += 1
        start = time.monotonic_ns()
        written = store.update_session(session_id, {name: counter})
        events.append(Event("w", session_id, written.version, start, time.monotonic_ns()))
    return events


def read_loop(
    store: SessionStore, setup: Setup, cache: redis.Redis | None, deadline: float, *, evict: bool
) -> list[Event]:
    """Read the sessions in turn until the deadline; with `evict`, drop each cached copy first."""
    events = []
    turn = 0
    while time.monotonic() < deadline:
        session_id = setup.session_ids[turn % len(setup.session_ids)]
        turn += 1
        if evict and cache is not None:
            # Force a miss, so that this read fills the cache racing the writers.
            cache.delete(session_keys(setup.key_prefix, session_id).value)
        start = time.monotonic_ns()
        found = store.get_session(session_id)
        end = time.monotonic_ns()
        assert found is not None, "a live session was not found"
        events.append(Event("r", session_id, found.version, start, end))
    return events


def run_workload(setup: Setup, name: str, threads: int, cache: redis.Redis | None) -> list[Event]:
    """Run writer, filler and reader threads (`threads` of each) on one store; return events."""
    docs = PostgresDocumentStore(setup.dsn, table=setup.table, max_connections=3 * threads + 2)
    store = build_store(setup, docs, cache)
    deadline = time.monotonic() + RUN_SECONDS
    results: list[list[Event]] = []
    failures: list[BaseException] = []
    lock = threading.Lock()

    def run(target: Callable[[], list[Event]]) -> None:
        try:
            found = target()
        except BaseException as exc:  # reported to the test below
            with lock:
                failures.append(exc)
            return
        with lock:
            results.append(found)

    targets: list[Callable[[], list[Event]]] = []
    for index in range(threads):
        targets.append(partial(write_loop, store, setup, f"{name}-w{index}", deadline))
        targets.append(partial(read_loop, store, setup, cache, deadline, evict=True))
        targets.append(partial(read_loop, store, setup, cache, deadline, evict=False))
    workers = [threading.Thread(target=run, args=(target,)) for target in targets]
    try:
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(PROCESS_TIMEOUT)
    finally:
        store.close()
        docs.close()
    if failures:
        raise failures[0]
    assert len(results) == len(targets), "a worker thread did not finish"
    return [event for found in results for event in found]


def append_messages(store: SessionStore, session_ids: tuple[str, ...], name: str) -> list[Any]:
    """Append own and shared message ids (each shared one twice); return (session, id, seq)."""
    seen = []
    for k in range(max(MESSAGES_PER_PROCESS, SHARED_MESSAGES)):
        for session_id in session_ids:
            planned = []
            if k < MESSAGES_PER_PROCESS:
                planned.append(f"{name}-{k}")
            if k < SHARED_MESSAGES:
                # Every process sends these, and retries them: each must be stored once.
                planned += [f"shared-{k}", f"shared-{k}"]
            for message_id in planned:
                message = store.add_message(
                    session_id, "user", f"text of {message_id}", message_id=message_id
                )
                assert message.id == message_id
                seen.append((session_id, message_id, message.seq, message.content))
    return seen


# --------------------------------------------------------------------------- processes


def process_main(
    setup: Setup, name: str, task: str, barrier: Any, results: Any
) -> None:  # pragma: no cover - runs in a child process
    """Entry point of a child process: wait for the others, run `task`, report the result."""
    try:
        cache = None if setup.redis_url is None else redis.Redis.from_url(setup.redis_url)
        if task == "workload":
            barrier.wait(PROCESS_TIMEOUT)
            found: Any = run_workload(setup, name, 1, cache)
        else:
            docs = PostgresDocumentStore(setup.dsn, table=setup.table)
            store = build_store(setup, docs, cache)
            barrier.wait(PROCESS_TIMEOUT)
            try:
                found = append_messages(store, setup.session_ids, name)
            finally:
                store.close()
                docs.close()
        if cache is not None:
            cache.close()
        results.put((name, "ok", found))
    except BaseException:
        results.put((name, "error", traceback.format_exc()))


def run_processes(setup: Setup, task: str, count: int) -> dict[str, Any]:
    """Run `task` in `count` spawned processes at once; return each one's result by name."""
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(count)
    results = context.Queue()
    names = [f"p{index}" for index in range(count)]
    processes = [
        context.Process(target=process_main, args=(setup, name, task, barrier, results))
        for name in names
    ]
    for process in processes:
        process.start()
    found: dict[str, Any] = {}
    try:
        deadline = time.monotonic() + PROCESS_TIMEOUT
        while len(found) < count:
            try:
                name, status, value = results.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"gave up after {PROCESS_TIMEOUT} s waiting for the worker processes")
            if status != "ok":
                pytest.fail(f"worker process {name} failed:\n{value}")
            found[name] = value
    finally:
        for process in processes:
            process.join(10)
            if process.is_alive():
                process.kill()
                process.join()
    return found


# --------------------------------------------------------------------------- checks


def assert_no_stale_reads(events: list[Event]) -> None:
    """Fail if a read that started after a write had returned saw an older version."""
    writes: dict[str, list[Event]] = defaultdict(list)
    reads: dict[str, list[Event]] = defaultdict(list)
    for event in events:
        (writes if event.kind == "w" else reads)[event.session].append(event)
    assert writes and reads, "the workload did nothing"
    for session_id, session_writes in writes.items():
        session_writes.sort(key=lambda event: event.end_ns)
        ends = [event.end_ns for event in session_writes]
        newest_so_far = []
        newest = 0
        for event in session_writes:
            newest = max(newest, event.version)
            newest_so_far.append(newest)
        versions = sorted(event.version for event in session_writes)
        assert len(set(versions)) == len(versions), "two writes returned the same version"
        for read in reads[session_id]:
            returned_before = bisect_left(ends, read.start_ns)
            floor = newest_so_far[returned_before - 1] if returned_before else 1
            assert read.version >= floor, (
                f"stale read: version {read.version} read after version {floor} had returned"
            )
            assert read.version <= versions[-1], "a read saw a version nobody wrote"


def assert_conversation(
    store: SessionStore, plain: SessionStore, session_id: str, expected_ids: set[str]
) -> None:
    """Check one conversation from the docstore and from the cache: 1..n, each id once."""
    messages = plain.get_messages(session_id)
    assert [message.seq for message in messages] == list(range(1, len(messages) + 1))
    ids = [message.id for message in messages]
    assert len(set(ids)) == len(ids), "a message id was stored twice"
    assert set(ids) == expected_ids
    for limit in (None, 5, 150):
        assert store.get_messages(session_id, limit=limit) == plain.get_messages(
            session_id, limit=limit
        )
    session = plain.get_session(session_id)
    assert session is not None
    assert session.version == 1 + len(messages), "a retry bumped the version"
    assert store.get_session(session_id) == session


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def dsn(request: pytest.FixtureRequest) -> str:
    real = os.environ.get("POSTGRES_CONNECTION_STRING")
    if real:
        return real
    embedded: str = request.getfixturevalue("embedded_dsn")
    return embedded


@pytest.fixture
def make_setup(dsn: str) -> Iterator[Callable[[str | None, redis.Redis | None], Setup]]:
    """Return `make(redis_url, cache)`: fresh table, key prefix and sessions; removed after."""
    tables: list[str] = []
    cleanups: list[Callable[[], None]] = []

    def make(redis_url: str | None, cache: redis.Redis | None) -> Setup:
        table = unique_table()
        tables.append(table)
        docs = PostgresDocumentStore(dsn, table=table)
        setup = Setup(
            dsn=dsn,
            table=table,
            redis_url=redis_url,
            key_prefix=unique_key_prefix(),
            sessions_collection=f"sessions_{table}",
            messages_collection=f"messages_{table}",
            session_ids=(),
        )
        store = SessionStore(
            docs,
            cache,
            key_prefix=setup.key_prefix,
            sessions_collection=setup.sessions_collection,
            messages_collection=setup.messages_collection,
        )
        ids = tuple(store.create_session("u", {"start": 0}).id for _ in range(SESSIONS))
        store.close()
        docs.close()
        if cache is not None:
            cleanups.append(lambda: delete_keys(cache, setup.key_prefix))
        return replace(setup, session_ids=ids)

    yield make
    for cleanup in cleanups:
        cleanup()
    drop_tables(dsn, tables)


def delete_keys(cache: redis.Redis, key_prefix: str) -> None:
    keys = list(cache.scan_iter(match=f"{key_prefix}*", count=1000))
    if keys:
        cache.delete(*keys)


@pytest.fixture
def real_cache(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


# --------------------------------------------------------------------------- tests


def test_threads_never_read_an_older_version(
    make_setup: Callable[[str | None, redis.Redis | None], Setup],
) -> None:
    """Three stores (as if three processes) on one Redis, each with writers, fillers, readers."""
    redis_url = os.environ.get("REDIS_URL")
    server = None if redis_url else fakeredis.FakeServer()

    def client() -> redis.Redis:
        if redis_url:
            return redis.Redis.from_url(redis_url)
        return fakeredis.FakeRedis(server=server)

    admin = client()
    setup = make_setup(redis_url, admin)
    clients = [client() for _ in range(3)]
    events: list[Event] = []
    failures: list[BaseException] = []

    def one_store(index: int) -> None:
        try:
            events.extend(run_workload(setup, f"s{index}", 2, clients[index]))
        except BaseException as exc:  # reported below
            failures.append(exc)

    stores = [threading.Thread(target=one_store, args=(index,)) for index in range(3)]
    for thread in stores:
        thread.start()
    for thread in stores:
        thread.join(PROCESS_TIMEOUT)
    for cache in clients:
        cache.close()
    if failures:
        raise failures[0]
    assert_no_stale_reads(events)


@pytest.mark.redis
def test_processes_never_read_an_older_version(
    make_setup: Callable[[str | None, redis.Redis | None], Setup],
    redis_url: str,
    real_cache: redis.Redis,
) -> None:
    setup = make_setup(redis_url, real_cache)
    found = run_processes(setup, "workload", 3)
    assert_no_stale_reads([event for events in found.values() for event in events])


@pytest.mark.parametrize("cached", [True, False], ids=["redis", "no-cache"])
def test_processes_append_without_gaps_or_duplicates(
    make_setup: Callable[[str | None, redis.Redis | None], Setup],
    request: pytest.FixtureRequest,
    cached: bool,
) -> None:
    cache: redis.Redis | None = None
    redis_url: str | None = None
    if cached:
        # Each process needs to reach the same Redis: a real one.
        redis_url = request.getfixturevalue("redis_url")
        cache = request.getfixturevalue("real_cache")
    setup = make_setup(redis_url, cache)
    found = run_processes(setup, "append", 2)
    expected_ids = {f"shared-{k}" for k in range(SHARED_MESSAGES)}
    for name in found:
        expected_ids |= {f"{name}-{k}" for k in range(MESSAGES_PER_PROCESS)}
    docs = PostgresDocumentStore(setup.dsn, table=setup.table)
    store = build_store(setup, docs, cache)
    plain = build_store(setup, docs, None)
    try:
        stored: dict[tuple[str, str], tuple[int, str]] = {}
        for session_id in setup.session_ids:
            assert_conversation(store, plain, session_id, expected_ids)
            for message in plain.get_messages(session_id):
                stored[(session_id, message.id)] = (message.seq, message.content)
        # Whatever a call returned, the first append or a retry, is what was stored.
        for appended in found.values():
            for session_id, message_id, seq, content in appended:
                assert stored[(session_id, message_id)] == (seq, content)
    finally:
        store.close()
        plain.close()
        docs.close()
