"""The asyncio PostgreSQL store when the server is unreachable, mute, slow, or the caller gives up.

As in test_postgres_faults.py, the store reaches the embedded server through a
`TcpProxy` that a test can cut, stall or make drop traffic; tables are created
and dropped through a direct connection.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import psycopg2
import pytest
import pytest_asyncio
from contract.docstore_contract import unique_name
from postgres_tables import drop_tables, unique_table
from tcp_proxy import TcpProxy
from test_postgres_faults import (
    backends_running,
    free_port,
    lock_all_rows,
    socket_path,
    tcp_dsn,
    waiting_on_locks,
)

from docstore import AsyncPostgresDocumentStore, StoreUnavailable

pytestmark = [pytest.mark.embedded, pytest.mark.faults]

BOUND = 10.0


async def wait_for_condition(
    predicate: Callable[[], Any], *, timeout: float = 10.0, what: str = "it"
) -> None:
    """Poll `predicate` (a blocking check, run off the loop) until true, or fail."""
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(predicate):
        if time.monotonic() >= deadline:
            pytest.fail(f"gave up after {timeout} s waiting for {what}")
        await asyncio.sleep(0.02)


async def expect_unavailable(call: Callable[[], Any], bound: float = BOUND) -> StoreUnavailable:
    started = time.monotonic()
    with pytest.raises(StoreUnavailable) as raised:
        await call()
    assert time.monotonic() - started < bound
    return raised.value


@pytest.fixture
def proxy(embedded_dsn: str) -> Iterator[TcpProxy]:
    with TcpProxy(socket_path(embedded_dsn)) as proxy:
        yield proxy


@pytest.fixture
def admin(embedded_dsn: str) -> Iterator[Any]:
    conn = psycopg2.connect(embedded_dsn, connect_timeout=10)
    try:
        yield conn
    finally:
        conn.close()


@pytest_asyncio.fixture
async def make_store(
    embedded_dsn: str, proxy: TcpProxy
) -> AsyncIterator[Callable[..., AsyncPostgresDocumentStore]]:
    """Async stores on fresh tables; `direct=True` bypasses the proxy."""
    stores: list[AsyncPostgresDocumentStore] = []
    tables: list[str] = []

    def make(*, direct: bool = False, **kwargs: Any) -> AsyncPostgresDocumentStore:
        table = kwargs.pop("table", None) or unique_table()
        tables.append(table)
        kwargs.setdefault("connect_timeout", 2)
        dsn = embedded_dsn if direct else tcp_dsn(embedded_dsn, proxy.port)
        store = AsyncPostgresDocumentStore(dsn, table=table, **kwargs)
        stores.append(store)
        return store

    try:
        yield make
    finally:
        proxy.resume()
        for store in stores:
            await store.aclose()
        await asyncio.to_thread(drop_tables, embedded_dsn, tables)


def test_built_outside_an_event_loop_and_used_in_one(embedded_dsn: str) -> None:
    table = unique_table()
    store = AsyncPostgresDocumentStore(embedded_dsn, table=table, min_connections=0)

    async def use() -> None:
        created = await store.create("c", {"a": 1}, id="x")
        assert await store.read("c", "x") == created
        await store.aclose()

    try:
        asyncio.run(use())
    finally:
        drop_tables(embedded_dsn, [table])


@pytest.mark.asyncio
async def test_nothing_listening(embedded_dsn: str) -> None:
    store = AsyncPostgresDocumentStore(
        tcp_dsn(embedded_dsn, free_port()), table=unique_table(), connect_timeout=2
    )
    error = await expect_unavailable(lambda: store.read("c", "x"))
    assert "connect" in str(error)
    await store.aclose()


@pytest.mark.asyncio
async def test_server_that_never_answers_the_connect(
    make_store: Callable[..., AsyncPostgresDocumentStore], proxy: TcpProxy
) -> None:
    proxy.stall()
    store = make_store(connect_timeout=0.5)
    await expect_unavailable(lambda: store.read("c", "x"), bound=3.0)


@pytest.mark.asyncio
async def test_network_drops_traffic_mid_call(
    make_store: Callable[..., AsyncPostgresDocumentStore], proxy: TcpProxy
) -> None:
    store = make_store()  # statement_timeout 5 s
    created = await store.create("c", {"a": 1}, id="x")
    proxy.drop_traffic()
    # No answer ever comes. A probe after 0.5 s cannot reach the server either,
    # so the store gives up after about 1 s, long before statement_timeout.
    error = await expect_unavailable(lambda: store.update("c", "x", {"b": 2}), bound=2.0)
    assert error.outcome_unknown is True  # sent, perhaps applied: the caller cannot know
    # The broken connection was discarded; a new one cannot be opened either.
    error = await expect_unavailable(lambda: store.read("c", "x"), bound=3.0)
    assert error.outcome_unknown is False
    proxy.resume()
    found = await store.read("c", "x")
    assert found is not None and found.id == created.id


@pytest.mark.asyncio
async def test_server_gone_then_back(
    make_store: Callable[..., AsyncPostgresDocumentStore], proxy: TcpProxy
) -> None:
    store = make_store(max_connections=3)
    await store.create("c", {"n": 0}, id="x")
    # Three pooled connections, all about to be cut.
    await asyncio.gather(*(store.read("c", "x") for _ in range(6)))
    proxy.cut()
    await expect_unavailable(lambda: store.read("c", "x"))
    await expect_unavailable(lambda: store.update("c", "x", {"n": 1}))
    proxy.resume()
    # Recovered without a restart: broken connections were discarded, not reused.
    doc = await store.read("c", "x")
    assert doc is not None and doc.data == {"n": 0}
    updated = await store.update("c", "x", {"n": 1})
    assert updated is not None and updated.version == 2


@pytest.mark.asyncio
async def test_a_slow_statement_the_server_is_running_is_not_cut_short(
    make_store: Callable[..., AsyncPostgresDocumentStore], admin: Any
) -> None:
    table = unique_table()
    store = make_store(table=table, statement_timeout=30)  # through the proxy
    coll = unique_name()
    await store.create(coll, {"n": 0}, id="x")
    await asyncio.to_thread(lock_all_rows, admin, table)
    blocked = asyncio.create_task(store.update(coll, "x", {"n": 1}))
    # Well past the probe (0.5 s): the server reports the backend busy, so it waits.
    await asyncio.sleep(1.5)
    assert not blocked.done()
    admin.rollback()
    updated = await blocked
    assert updated is not None and updated.data == {"n": 1}


@pytest.mark.asyncio
async def test_statement_timeout(
    make_store: Callable[..., AsyncPostgresDocumentStore], admin: Any
) -> None:
    table = unique_table()
    store = make_store(direct=True, table=table, statement_timeout=0.5)
    coll = unique_name()
    await store.create(coll, {"n": 0}, id="x")
    await asyncio.to_thread(lock_all_rows, admin, table)
    try:
        started = time.monotonic()
        await expect_unavailable(lambda: store.update(coll, "x", {"n": 1}))
        assert time.monotonic() - started >= 0.4
        doc = await store.read(coll, "x")  # reads do not wait for row locks
        assert doc is not None and doc.data == {"n": 0}
    finally:
        admin.rollback()
    updated = await store.update(coll, "x", {"n": 1})
    assert updated is not None and updated.version == 2


@pytest.mark.asyncio
async def test_a_cancelled_call_never_returns_its_connection_mid_statement(
    make_store: Callable[..., AsyncPostgresDocumentStore], admin: Any, embedded_dsn: str
) -> None:
    table = unique_table()
    # One connection only: if the cancelled call put its busy connection back,
    # the next call would get it and fail ("another operation is in progress").
    store = make_store(direct=True, table=table, max_connections=1, statement_timeout=30)
    coll = unique_name()
    await store.create(coll, {"n": 0}, id="x")
    await asyncio.to_thread(lock_all_rows, admin, table)
    try:
        blocked = asyncio.create_task(store.update(coll, "x", {"n": 1}))
        await wait_for_condition(
            lambda: waiting_on_locks(embedded_dsn) > 0, what="the update to block"
        )
        blocked.cancel()
        with pytest.raises(asyncio.CancelledError):
            await blocked
        started = time.monotonic()
        doc = await store.read(coll, "x")
        assert time.monotonic() - started < 2.0
        assert doc is not None and doc.data == {"n": 0}
    finally:
        admin.rollback()
    # The server may still apply the cancelled update once the lock is gone
    # (the caller gave up, the statement was sent): settled once it has ended.
    await wait_for_condition(
        lambda: backends_running(embedded_dsn, table) == 0, what="the cancelled update to end"
    )
    doc = await store.read(coll, "x")
    assert doc is not None
    updated = await store.update(coll, "x", {"n": 2}, expected_version=doc.version)
    assert updated is not None and updated.data == {"n": 2}


@pytest.mark.asyncio
async def test_a_cancelled_transaction_is_rolled_back_and_its_connection_closed(
    make_store: Callable[..., AsyncPostgresDocumentStore],
) -> None:
    store = make_store(direct=True, max_connections=1)
    entered = asyncio.Event()

    async def transfer() -> None:
        async with store.transaction():
            await store.create("c", {"a": 1}, id="x")
            entered.set()
            await asyncio.Event().wait()  # cancelled here, inside the block

    task = asyncio.create_task(transfer())
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await store.read("c", "x") is None
    assert (await store.create("c", {"a": 2}, id="x")).data == {"a": 2}


@pytest.mark.asyncio
async def test_pool_exhaustion_is_a_bounded_wait(
    make_store: Callable[..., AsyncPostgresDocumentStore],
) -> None:
    store = make_store(direct=True, max_connections=1, connect_timeout=0.3)
    await store.create("c", {}, id="x")
    holding = asyncio.Event()
    release = asyncio.Event()

    async def hold() -> None:
        async with store.transaction():
            await store.read("c", "x")
            holding.set()
            await release.wait()

    holder = asyncio.create_task(hold())
    await holding.wait()
    error = await expect_unavailable(lambda: store.read("c", "x"), bound=2.0)
    assert "pool exhausted" in str(error)
    release.set()
    await holder
    assert await store.read("c", "x") is not None


@pytest.mark.asyncio
async def test_transactions_belong_to_their_task(
    make_store: Callable[..., AsyncPostgresDocumentStore],
) -> None:
    store = make_store(direct=True)
    inside = asyncio.Event()
    checked = asyncio.Event()

    async def rolled_back() -> None:
        with pytest.raises(RuntimeError):
            async with store.transaction():
                await store.create("c", {"from": "tx"}, id="in-tx")
                inside.set()
                await checked.wait()
                raise RuntimeError("undo")

    task = asyncio.create_task(rolled_back())
    await inside.wait()
    # Another task: neither sees the open transaction's write nor joins it.
    assert await store.read("c", "in-tx") is None
    await store.create("c", {"from": "outside"}, id="outside")
    checked.set()
    await task
    assert await store.read("c", "in-tx") is None
    outside = await store.read("c", "outside")
    assert outside is not None and outside.data == {"from": "outside"}
