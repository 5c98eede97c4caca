"""PostgreSQL faults: a partition, a connection lost during COMMIT, idle connections broken.

The store reaches the embedded server through a FaultProxy; "the truth" is a
store without a cache on a direct connection that no fault touches.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from functools import partial

import psycopg2
import pytest
import redis
from fault_proxy import FaultProxy
from fault_summary import FaultSummary

from docstore import PostgresDocumentStore
from docstore import StoreUnavailable as DocstoreUnavailable
from session import Session, SessionStore, StoreUnavailable
from session.coherence import session_keys

pytestmark = [pytest.mark.faults, pytest.mark.embedded]

# statement_timeout 1 s: the client gives up 0.5 s after the server would have.
FAST = {"statement_timeout": 1.0, "connect_timeout": 1}
# The promise: no call under a fault takes longer than 2 s. A partition costs a
# call about 1.1 s (the watchdog's probe after 0.5 s, 0.5 s for the probe), which
# leaves a loaded machine close to a second.
BOUND = 2.0


def timed_call(summary: FaultSummary, kind: str, call: Callable[[], object]) -> object:
    started = time.monotonic()
    try:
        return call()
    finally:
        elapsed = time.monotonic() - started
        summary.add_latencies(kind, [elapsed])
        summary.add_operations(1)
        assert elapsed < BOUND, f"a call took {elapsed:.2f} s under {kind}"


def test_postgres_partitioned(
    make_docstore: Callable[..., PostgresDocumentStore],
    make_session_store: Callable[..., SessionStore],
    pg_proxy: FaultProxy,
    fault_summary: FaultSummary,
) -> None:
    kind = "postgres partition"
    store = make_session_store(docstore=make_docstore(**FAST))
    cached = store.create_session(data={"n": 0})
    assert store.get_session(cached.id) == cached
    uncached = store.create_session(data={"n": 0})
    fault_summary.add_fault(kind)
    pg_proxy.partition()
    try:
        # A write raises StoreUnavailable within the bound; the cache never shows it.
        with pytest.raises(StoreUnavailable):
            timed_call(fault_summary, kind, lambda: store.update_session(cached.id, {"n": 1}))
        # A read of another session: a miss that cannot be answered.
        with pytest.raises(StoreUnavailable):
            timed_call(fault_summary, kind, lambda: store.get_session(uncached.id))
    finally:
        pg_proxy.heal()
    truth = make_session_store(cached=False, docstore=make_docstore(proxied=False))
    # The update's outcome was unknown (its statement may have reached the server):
    # whatever PostgreSQL holds is what every reader gets.
    assert store.get_session(cached.id) == truth.get_session(cached.id)
    assert store.update_session(cached.id, {"n": 2}).data["n"] == 2


def test_partition_fails_fast_with_the_default_statement_timeout(
    make_docstore: Callable[..., PostgresDocumentStore],
    pg_proxy: FaultProxy,
    fault_summary: FaultSummary,
) -> None:
    """With statement_timeout=5 (the default), a call sent into a partition still fails
    within 2 s: the watchdog's probe finds the server is not running it."""
    docstore = make_docstore()  # default statement_timeout
    created = docstore.create("c", {"n": 0})
    fault_summary.add_fault("postgres partition (default statement_timeout)")
    pg_proxy.partition()
    try:
        for call in (
            lambda: docstore.update("c", created.id, {"n": 1}),
            lambda: docstore.read("c", created.id),
        ):
            with pytest.raises(DocstoreUnavailable):
                timed_call(fault_summary, "postgres partition (default statement_timeout)", call)
            # The next call needs a new connection: connect_timeout (1 s here) bounds it.
    finally:
        pg_proxy.heal()
    assert docstore.read("c", created.id) is not None


def test_a_slow_statement_the_server_is_running_is_not_cut_short(
    make_docstore: Callable[..., PostgresDocumentStore], embedded_dsn: str
) -> None:
    """The probe tells a partition from a slow statement: a write waiting 2.5 s on a
    row lock (under statement_timeout=5) is left to finish."""
    docstore = make_docstore()
    created = docstore.create("c", {"n": 0})
    blocker = psycopg2.connect(embedded_dsn)
    try:
        with blocker.cursor() as cur:
            cur.execute(
                "SELECT 1 FROM " + docstore_table(docstore) + " WHERE id = %s FOR UPDATE",
                (created.id,),
            )
        releaser = threading.Timer(2.5, blocker.rollback)
        releaser.start()
        started = time.monotonic()
        updated = docstore.update("c", created.id, {"n": 1})
        assert time.monotonic() - started >= 2.0
        assert updated is not None and updated.data == {"n": 1}
        releaser.join()
    finally:
        blocker.close()


def docstore_table(docstore: PostgresDocumentStore) -> str:
    table: str = docstore._table_name  # the test's own unique table name
    return f'"{table}"'


def test_a_cache_hit_works_while_postgres_is_partitioned(
    make_docstore: Callable[..., PostgresDocumentStore],
    make_session_store: Callable[..., SessionStore],
    pg_proxy: FaultProxy,
    fault_summary: FaultSummary,
) -> None:
    store = make_session_store(docstore=make_docstore(**FAST))
    session = store.create_session(data={"n": 0})
    assert store.get_session(session.id) == session
    pg_proxy.partition()
    try:
        hit = timed_call(fault_summary, "postgres partition", lambda: store.get_session(session.id))
        assert hit == session
    finally:
        pg_proxy.heal()


@pytest.mark.parametrize("lost", ["reply", "request"])
def test_connection_lost_during_commit(
    make_docstore: Callable[..., PostgresDocumentStore],
    make_session_store: Callable[..., SessionStore],
    pg_proxy: FaultProxy,
    redis_proxy: FaultProxy,
    key_prefix: str,
    fault_summary: FaultSummary,
    lost: str,
) -> None:
    """The commit happened (reply lost) or not (request lost): the client cannot know."""
    store = make_session_store(docstore=make_docstore(**FAST))
    cache = redis.Redis(host="127.0.0.1", port=redis_proxy.port)
    truth = make_session_store(cached=False, docstore=make_docstore(proxied=False))
    created = store.create_session(data={"n": 0})
    # One write first, so the connection has prepared the update statement and the
    # lost message is the update's own (not its one-time PREPARE).
    store.update_session(created.id, {"n": 0})
    session = store.get_session(created.id)
    assert session is not None and session.version == 2
    keys = session_keys(key_prefix, session.id)
    assert cache.exists(keys.value)
    fault_summary.add_fault(f"postgres connection lost during COMMIT ({lost})")
    if lost == "reply":
        pg_proxy.lose_next_reply()
    else:
        pg_proxy.lose_next_request()
    with pytest.raises(StoreUnavailable) as raised:
        timed_call(
            fault_summary,
            "postgres COMMIT lost",
            lambda: store.update_session(session.id, {"n": 1}),
        )
    assert raised.value.outcome_unknown
    assert "may or may not have been committed" in str(raised.value)
    assert not isinstance(raised.value.__cause__, StoreUnavailable)
    # The cached copy was removed, not updated.
    assert not cache.exists(keys.value)
    cache.close()
    held = truth.get_session(session.id)
    assert held is not None
    assert held.data["n"] == (1 if lost == "reply" else 0)
    assert store.get_session(session.id) == held


def test_message_append_lost_during_commit_is_retried_without_duplicates(
    make_docstore: Callable[..., PostgresDocumentStore],
    make_session_store: Callable[..., SessionStore],
    pg_proxy: FaultProxy,
    fault_summary: FaultSummary,
) -> None:
    store = make_session_store(docstore=make_docstore(**FAST))
    session = store.create_session()
    store.add_message(session.id, "user", "first", message_id="a")
    store.get_messages(session.id)
    fault_summary.add_fault("postgres connection lost during COMMIT (reply)")
    pg_proxy.lose_next_reply()
    with pytest.raises(StoreUnavailable) as raised:
        store.add_message(session.id, "user", "second", message_id="b")
    assert raised.value.outcome_unknown
    retried = store.add_message(session.id, "user", "second", message_id="b")
    assert retried.seq == 2
    assert [(m.id, m.seq) for m in store.get_messages(session.id)] == [("a", 1), ("b", 2)]


@pytest.mark.parametrize("calls", ["reads", "writes"])
@pytest.mark.parametrize("how", ["proxy-cut", "server-terminated"])
def test_pooled_connections_broken_while_idle(
    embedded_dsn: str,
    make_docstore: Callable[..., PostgresDocumentStore],
    make_session_store: Callable[..., SessionStore],
    pg_proxy: FaultProxy,
    fault_summary: FaultSummary,
    calls: str,
    how: str,
) -> None:
    """The first call after succeeds or fails once; no broken connection is used again.

    `server-terminated` is what a server restart does to every session (the
    backends are terminated: the client finds a closed socket); `proxy-cut`
    what a network device dropping idle connections does.
    """
    application = f"fault_{uuid.uuid4().hex[:12]}"
    docstore = make_docstore(
        min_connections=3, max_connections=3, dsn_extra=f"application_name={application}", **FAST
    )
    store = make_session_store(cached=False, docstore=docstore)
    sessions = [store.create_session(data={"n": 0}) for _ in range(3)]
    run_together_on(store, sessions)  # all three pooled connections have been used
    fault_summary.add_fault(f"postgres idle connections broken ({how})")
    if how == "proxy-cut":
        pg_proxy.cut()
        pg_proxy.resume()
    else:
        assert terminate_backends(embedded_dsn, application) == 3
    failures = 0
    for number in range(20):
        session = sessions[number % 3]
        try:
            if calls == "reads":
                result: Session | None = store.get_session(session.id)
            else:
                result = store.update_session(session.id, {"n": number})
            assert result is not None
        except StoreUnavailable:
            failures += 1
    assert failures <= 1
    fault_summary.add_operations(20)


def run_together_on(store: SessionStore, sessions: list[Session]) -> None:
    """Read the sessions from three threads at once, so that the pool opens all its connections."""
    barrier = threading.Barrier(len(sessions))

    def read(session: Session) -> None:
        barrier.wait()
        for _ in range(20):
            store.get_session(session.id)

    threads = [threading.Thread(target=read, args=(session,)) for session in sessions]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)


def terminate_backends(dsn: str, application: str) -> int:
    """Terminate the server sessions of one application name (the test's own store)."""
    conn = psycopg2.connect(dsn)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE application_name = %s",
                (application,),
            )
            row = cur.fetchone()
            return int(row[0]) if row else 0
    finally:
        conn.close()


def test_no_driver_exception_escapes_while_postgres_flaps(
    make_docstore: Callable[..., PostgresDocumentStore],
    make_session_store: Callable[..., SessionStore],
    pg_proxy: FaultProxy,
    fault_summary: FaultSummary,
) -> None:
    store = make_session_store(docstore=make_docstore(**FAST))
    session = store.create_session()
    fault_summary.add_fault("postgres connection cut")
    for round_number in range(5):
        pg_proxy.cut()
        for call in (
            partial(store.update_session, session.id, {"r": round_number}),
            lambda: store.add_message(session.id, "user", "x"),
            lambda: store.list_sessions("nobody"),
            lambda: store.create_session(),
        ):
            # Only the documented error: a driver exception escapes pytest.raises
            # and fails the test.
            with pytest.raises(StoreUnavailable):
                timed_call(fault_summary, "postgres connection cut", call)
        pg_proxy.resume()
    # Nothing was committed while the server was cut off, and the store recovered.
    assert store.get_session(session.id) == session
