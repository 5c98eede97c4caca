"""PostgreSQL unreachable, going away mid-use, or too slow: typed errors, then recovery.

The embedded server listens only on a Unix socket; the store reaches it through
`TcpProxy` (TCP on 127.0.0.1 -> that socket), which a test can cut and resume.
Tables are created and dropped through a direct connection that no cut touches.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psycopg2
import pytest
from contract.docstore_contract import run_in_threads, unique_name, wait_until
from postgres_tables import postgres_store_factory, unique_table
from psycopg2 import sql
from psycopg2.extensions import make_dsn, parse_dsn
from tcp_proxy import TcpProxy

from docstore import PostgresDocumentStore, StoreUnavailable

pytestmark = [pytest.mark.embedded, pytest.mark.faults]

# connect_timeout=2 (libpq's minimum), so every failure must surface well within this.
BOUND = 10.0


def socket_path(dsn: str) -> Path:
    params = parse_dsn(dsn)
    return Path(params["host"]) / f".s.PGSQL.{params.get('port', '5432')}"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def tcp_dsn(dsn: str, port: int) -> str:
    params = {key: value for key, value in parse_dsn(dsn).items() if value != ""}
    params.update(host="127.0.0.1", port=str(port))
    return make_dsn(**params)


def expect_unavailable(call: Callable[[], object]) -> StoreUnavailable:
    """Assert `call` raises StoreUnavailable within BOUND seconds.

    A driver exception is not a StoreUnavailable: it escapes pytest.raises and
    fails the test. The driver's error is kept as the cause (raise ... from).
    """
    started = time.monotonic()
    with pytest.raises(StoreUnavailable) as raised:
        call()
    assert time.monotonic() - started < BOUND
    assert isinstance(raised.value.__cause__, psycopg2.Error | OSError), raised.value.__cause__
    return raised.value


@pytest.fixture
def proxy(embedded_dsn: str) -> Iterator[TcpProxy]:
    with TcpProxy(socket_path(embedded_dsn)) as proxy:
        yield proxy


@pytest.fixture
def make_store(
    embedded_dsn: str, proxy: TcpProxy
) -> Iterator[Callable[..., PostgresDocumentStore]]:
    """Stores reaching the embedded server through the proxy (connect_timeout=2 s)."""
    with postgres_store_factory(tcp_dsn(embedded_dsn, proxy.port), admin_dsn=embedded_dsn) as make:

        def make_proxied(**kwargs: Any) -> PostgresDocumentStore:
            kwargs.setdefault("connect_timeout", 2)
            return make(**kwargs)

        yield make_proxied


@pytest.fixture
def admin(embedded_dsn: str) -> Iterator[Any]:
    """A direct connection to the embedded server, for locks and checks."""
    conn = psycopg2.connect(embedded_dsn, connect_timeout=10)
    try:
        yield conn
    finally:
        conn.close()


def lock_all_rows(conn: Any, table: str) -> None:
    """Open a transaction on `conn` holding a row lock on every row of `table`."""
    with conn.cursor() as cur:
        cur.execute(sql.SQL("SELECT 1 FROM {} FOR UPDATE").format(sql.Identifier(table)))


def waiting_on_locks(dsn: str) -> int:
    conn = psycopg2.connect(dsn, connect_timeout=10)
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE wait_event_type = 'Lock' AND datname = current_database()"
            )
            (count,) = cur.fetchone()
            return int(count)
    finally:
        conn.close()


def backends_running(dsn: str, table: str) -> int:
    """Count other backends still running a statement on `table`."""
    conn = psycopg2.connect(dsn, connect_timeout=10)
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE state = 'active'"
                " AND pid <> pg_backend_pid() AND position(%s in query) > 0",
                (table,),
            )
            (count,) = cur.fetchone()
            return int(count)
    finally:
        conn.close()


def test_proxy_forwards(make_store: Callable[..., PostgresDocumentStore]) -> None:
    store = make_store()
    created = store.create("c", {"a": 1}, id="x")
    assert store.read("c", "x") == created


def test_nothing_listening(embedded_dsn: str) -> None:
    dsn = tcp_dsn(embedded_dsn, free_port())

    def open_and_use() -> None:
        # The constructor may connect at once, or on first use: either must fail cleanly.
        store = PostgresDocumentStore(dsn, table=unique_table(), connect_timeout=2)
        try:
            store.read("c", "x")
        finally:
            store.close()

    expect_unavailable(open_and_use)


def test_server_that_never_answers(embedded_dsn: str, proxy: TcpProxy) -> None:
    proxy.stall()
    dsn = tcp_dsn(embedded_dsn, proxy.port)

    def open_and_use() -> None:
        store = PostgresDocumentStore(dsn, table=unique_table(), connect_timeout=2)
        try:
            store.read("c", "x")
        finally:
            store.close()

    expect_unavailable(open_and_use)


def test_server_gone_then_back(
    make_store: Callable[..., PostgresDocumentStore], proxy: TcpProxy
) -> None:
    store = make_store(max_connections=4)
    coll = unique_name()
    kept = store.create(coll, {"n": 0}, id="kept")
    store.create(coll, {}, id="parent")

    # Fill the pool: four connections open at once, all returned to the pool.
    barrier = threading.Barrier(4)

    def hold_a_connection(index: int) -> None:
        with store.transaction():
            store.read(coll, "kept")
            barrier.wait(timeout=10)

    run_in_threads(4, hold_a_connection)

    proxy.cut()
    calls: list[tuple[str, Callable[[], object]]] = [
        ("read", lambda: store.read(coll, "kept")),
        ("create", lambda: store.create(coll, {}, id="during")),
        ("update", lambda: store.update(coll, "kept", {"n": 1})),
        ("replace", lambda: store.replace(coll, "kept", {"n": 1})),
        ("upsert", lambda: store.upsert(coll, "during", {})),
        ("delete", lambda: store.delete(coll, "kept")),
        ("query", lambda: store.query(coll)),
        ("count", lambda: store.count(coll)),
        ("list_collections", store.list_collections),
        ("delete_collection", lambda: store.delete_collection(coll)),
        ("delete_many", lambda: store.delete_many(coll, {})),
        ("ensure_index", lambda: store.ensure_index(coll, "n")),
        ("append", lambda: store.append(coll, {}, parent=(coll, "parent"))),
        ("purge_expired", store.purge_expired),
    ]
    for _label, call in calls:
        expect_unavailable(call)

    def in_a_transaction() -> None:
        with store.transaction():
            store.create(coll, {}, id="during")

    expect_unavailable(in_a_transaction)

    proxy.resume()
    # Broken pooled connections are discarded, never handed out: the first call works.
    assert store.read(coll, "kept") == kept
    for _ in range(10):
        assert store.read(coll, "kept") == kept
    assert run_in_threads(4, lambda index: store.read(coll, "kept")) == [kept] * 4
    assert store.read(coll, "during") is None
    assert store.update(coll, "kept", {"n": 1}) is not None
    assert store.count(coll) == 2


def test_connection_breaks_inside_a_transaction(
    make_store: Callable[..., PostgresDocumentStore], proxy: TcpProxy
) -> None:
    store = make_store()
    coll = unique_name()
    store.create(coll, {}, id="before")

    def interrupted() -> None:
        with store.transaction():
            store.create(coll, {}, id="inside")
            proxy.cut()
            store.create(coll, {}, id="after the cut")

    expect_unavailable(interrupted)
    proxy.resume()
    assert store.read(coll, "inside") is None
    assert store.read(coll, "after the cut") is None
    assert [doc.id for doc in store.query(coll)] == ["before"]
    with store.transaction():
        store.create(coll, {}, id="later")
    assert store.count(coll) == 2


def test_connection_breaks_during_a_statement(
    make_store: Callable[..., PostgresDocumentStore],
    proxy: TcpProxy,
    admin: Any,
    embedded_dsn: str,
) -> None:
    table = unique_table()
    store = make_store(table=table, statement_timeout=60)
    coll = unique_name()
    store.create(coll, {"n": 0}, id="x")
    lock_all_rows(admin, table)
    try:
        with ThreadPoolExecutor(max_workers=1) as pool:
            blocked = pool.submit(store.update, coll, "x", {"n": 1})
            wait_until(lambda: waiting_on_locks(embedded_dsn) > 0, what="the update to block")
            started = time.monotonic()
            proxy.cut()
            with pytest.raises(StoreUnavailable) as raised:
                blocked.result(timeout=BOUND)
            assert time.monotonic() - started < BOUND
        # The update was sent: the server may still apply it, the caller cannot know.
        assert raised.value.outcome_unknown is True
    finally:
        admin.rollback()
    # The orphaned backend may still apply the update once the lock is gone; the
    # outcome is settled only when it has finished.
    wait_until(lambda: backends_running(embedded_dsn, table) == 0, what="the orphaned update")
    proxy.resume()
    doc = store.read(coll, "x")
    assert doc is not None and doc.data["n"] in (0, 1)
    assert store.update(coll, "x", {"n": 2}, expected_version=doc.version) is not None


def test_statement_timeout(embedded_dsn: str, admin: Any) -> None:
    table = unique_table()
    with postgres_store_factory(embedded_dsn) as make:
        store = make(table=table, statement_timeout=0.5)
        coll = unique_name()
        store.create(coll, {"n": 0}, id="x")
        lock_all_rows(admin, table)
        try:
            started = time.monotonic()
            expect_unavailable(lambda: store.update(coll, "x", {"n": 1}))
            assert time.monotonic() - started >= 0.4
            # Reads do not wait for row locks: the store is not wedged meanwhile.
            doc = store.read(coll, "x")
            assert doc is not None and doc.data == {"n": 0}
        finally:
            admin.rollback()
        updated = store.update(coll, "x", {"n": 1})
        assert updated is not None and updated.version == 2
