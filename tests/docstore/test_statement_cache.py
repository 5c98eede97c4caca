"""The statement cache of the PostgreSQL stores (sync and asyncio).

Each query shape (collection, filter structure, ordering, page size) is
rendered once and prepared once per connection, the collection and paths
baked into the text. What must hold: results are right whatever is cached or
evicted, the caches are bounded, no two collections share a statement, and
prepared statements lost with a connection, or dropped behind the store's
back, are prepared again rather than failing the call.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

import psycopg2
import pytest
from postgres_tables import drop_tables, postgres_store_factory, unique_table

import docstore.async_postgres
import docstore.postgres
import docstore.postgres_protocol
from docstore import AsyncPostgresDocumentStore, PostgresDocumentStore, StoreUnavailable

# Collection names that differ only where quoting or formatting could go wrong.
COLLECTIONS = ["c", "C", "c'", "c''", 'c"', "c%s", "c%%s", "c\\", "c$1", "c; DROP"]


@pytest.fixture(
    params=[
        pytest.param("embedded", marks=pytest.mark.embedded),
        pytest.param("real", marks=pytest.mark.postgres),
    ]
)
def dsn(request: pytest.FixtureRequest) -> str:
    name = "embedded_dsn" if request.param == "embedded" else "real_dsn"
    value: str = request.getfixturevalue(name)
    return value


@pytest.fixture
def make_store(dsn: str) -> Iterator[Callable[..., PostgresDocumentStore]]:
    with postgres_store_factory(dsn) as make:
        yield make


@pytest.fixture
def small_caches(monkeypatch: pytest.MonkeyPatch) -> int:
    """Shrink both bounds so that a few shapes overflow them."""
    monkeypatch.setattr(docstore.postgres, "PREPARED_PER_CONNECTION", 4)
    monkeypatch.setattr(docstore.async_postgres, "PREPARED_PER_CONNECTION", 4)
    monkeypatch.setattr(docstore.postgres_protocol, "STATEMENT_CACHE_SIZE", 6)
    return 4


class Shape:
    """One query shape: a call on a store and the answer it must give over `seed` data."""

    def __init__(self, method: str, *args: Any, expected: Any, **kwargs: Any) -> None:
        self.method, self.args, self.kwargs, self.expected = method, args, kwargs, expected

    def answer(self, result: Any) -> Any:
        return [doc.data["n"] for doc in result] if isinstance(result, list) else result

    def check(self, store: Any) -> None:
        result = getattr(store, self.method)(*self.args, **self.kwargs)
        assert self.answer(result) == self.expected, (self.method, self.args, self.kwargs)

    async def check_async(self, store: Any) -> None:
        result = await getattr(store, self.method)(*self.args, **self.kwargs)
        assert self.answer(result) == self.expected, (self.method, self.args, self.kwargs)


def shapes(c: str) -> list[Shape]:
    return [
        Shape("query", c, order_by="n", limit=None, expected=list(range(12))),
        Shape("query", c, {"k": "k1"}, order_by="n", expected=[1, 4, 7, 10]),
        Shape("query", c, {"n": {"$in": [3, 5, 99]}}, order_by="n", expected=[3, 5]),
        Shape("query", c, {"n": {"$gte": 9}}, order_by="-n", expected=[11, 10, 9]),
        Shape("query", c, order_by="-n", limit=2, expected=[11, 10]),
        Shape("query", c, order_by="-n", limit=3, expected=[11, 10, 9]),
        Shape("query", c, order_by="n", limit=2, offset=5, expected=[5, 6]),
        Shape("query", c, order_by="n", limit=2, offset=7, expected=[7, 8]),
        Shape("query", c, {"tags": {"$contains": [1]}}, order_by="n", limit=3, expected=[1, 3, 5]),
        Shape("count", c, {"k": {"$ne": "k0"}}, expected=8),
        Shape("count", c, {"k": {"$in": ["k0", "k2"]}}, expected=8),
        Shape("count", c, {"missing": {"$exists": False}}, expected=12),
    ]


def seed(store: Any, collection: str) -> None:
    for n in range(12):
        store.create(collection, {"n": n, "k": f"k{n % 3}", "tags": [n % 2]}, id=f"d{n}")


def prepared_on_server(conn: Any) -> int:
    with conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM pg_prepared_statements")
        (count,) = cur.fetchone()
    return int(count)


class TestSyncStatementCache:
    def test_many_shapes_stay_right_while_the_caches_evict(
        self, make_store: Callable[..., PostgresDocumentStore], small_caches: int
    ) -> None:
        store = make_store(max_connections=1)
        seed(store, "c")
        for _ in range(3):  # every round evicts and prepares each shape again
            for shape in shapes("c"):
                shape.check(store)
        assert store._protocol.cached_statements() <= 6
        conn = store._pool.acquire()
        try:
            assert len(conn.prepared) <= small_caches  # type: ignore[attr-defined]
            assert prepared_on_server(conn) <= small_caches
        finally:
            store._pool.release(conn)

    def test_the_default_bounds_hold_with_more_shapes_than_they_allow(
        self, make_store: Callable[..., PostgresDocumentStore]
    ) -> None:
        store = make_store(max_connections=1)
        store.create("c", {"f0": 1}, id="x")
        bound = docstore.postgres.PREPARED_PER_CONNECTION
        for n in range(bound + 20):
            assert store.count("c", {f"f{n}": {"$exists": n == 0}}) == 1
        conn = store._pool.acquire()
        try:
            assert len(conn.prepared) == bound  # type: ignore[attr-defined]
            assert prepared_on_server(conn) == bound
        finally:
            store._pool.release(conn)

    def test_collections_never_share_a_statement(
        self, make_store: Callable[..., PostgresDocumentStore]
    ) -> None:
        store = make_store(max_connections=1)
        for collection in COLLECTIONS:
            store.create(collection, {"k": "same", "owner": collection}, id="x")
        names = set()
        for _ in range(2):
            for collection in COLLECTIONS:
                found = store.query(collection, {"k": "same"}, order_by="-updated_at", limit=5)
                assert [doc.data["owner"] for doc in found] == [collection]
                assert {doc.collection for doc in found} == {collection}
                assert store.count(collection, {"k": "same"}) == 1
                assert [dumped.document.collection for dumped in store.dump(collection)] == [
                    collection
                ]
                assert store.pop_expired(collection) == []
        for collection in COLLECTIONS:
            key = ("count", collection, ((("k",), "$eq", None, None),))
            names.add(store._protocol._statements[(True, key)].name)
        assert len(names) == len(COLLECTIONS)
        assert store.delete_many("c'", {"k": {"$in": ["same"]}}) == 1
        assert sorted(c for c in COLLECTIONS if store.count(c) == 1) == sorted(
            c for c in COLLECTIONS if c != "c'"
        )

    def test_two_tables_never_share_a_statement(
        self, make_store: Callable[..., PostgresDocumentStore]
    ) -> None:
        first, second = make_store(), make_store()
        first.create("c", {"k": 1}, id="in first")
        second.create("c", {"k": 1}, id="in second")
        assert [doc.id for doc in first.query("c", {"k": 1})] == ["in first"]
        assert [doc.id for doc in second.query("c", {"k": 1})] == ["in second"]

    def test_a_lost_connection_takes_its_statements_and_the_next_one_prepares_again(
        self, make_store: Callable[..., PostgresDocumentStore], dsn: str
    ) -> None:
        # What a server restart does to the store's connections.
        store = make_store(max_connections=2)
        seed(store, "c")
        for shape in shapes("c"):
            shape.check(store)
        terminate_backends(dsn, store)
        for shape in shapes("c"):  # reads: resent once on a fresh connection
            shape.check(store)
        terminate_backends(dsn, store)
        try:  # a write is never resent: it fails if its connection was one of those
            store.delete_many("c", {"n": {"$in": [0]}})
        except StoreUnavailable:
            pass
        assert store.delete_many("c", {"n": {"$in": [0, 1]}}) >= 1
        assert store.count("c", {"n": {"$in": [0, 1]}}) == 0

    def test_statements_dropped_behind_the_stores_back_are_prepared_again(
        self, make_store: Callable[..., PostgresDocumentStore]
    ) -> None:
        # A pooler's DISCARD ALL, or someone's DEALLOCATE, on the store's connection.
        store = make_store(max_connections=1)
        seed(store, "c")
        assert store.count("c", {"k": "k1"}) == 4
        deallocate_all(store)
        assert store.count("c", {"k": "k1"}) == 4
        assert store.delete_many("c", {"n": {"$in": [1]}}) == 1  # a write: nothing ran before
        deallocate_all(store)
        with store.transaction():
            assert store.count("c", {"k": "k1"}) == 3
            assert store.delete_many("c", {"n": {"$in": [4]}}) == 1
        assert store.count("c", {"k": "k1"}) == 2
        # The other way round: prepared, but the store believes it is not.
        assert store.query("c", {"n": 7}, limit=1)[0].id == "d7"
        conn = store._pool.acquire()
        conn.prepared.clear()  # type: ignore[attr-defined]
        store._pool.release(conn)
        assert store.query("c", {"n": 7}, limit=1)[0].id == "d7"
        with store.transaction():
            conn = store._local.conn
            conn.prepared.clear()  # type: ignore[union-attr]
            assert store.query("c", {"n": 7}, limit=1)[0].id == "d7"
            store.create("c", {"n": 12}, id="d12")
        assert store.read("c", "d12") is not None


def terminate_backends(dsn: str, store: Any) -> None:
    conn = psycopg2.connect(dsn, connect_timeout=10)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE pid <> pg_backend_pid() AND application_name = 'docstore'"
                " AND pid = ANY(%s)",
                (backend_pids(store),),
            )
    finally:
        conn.close()


def backend_pids(store: Any) -> list[int]:
    if isinstance(store, PostgresDocumentStore):
        return [conn.backend_pid for conn in store._pool._idle]  # type: ignore[attr-defined]
    return [conn.backend_pid for conn in store._pool._idle]


def deallocate_all(store: PostgresDocumentStore) -> None:
    conn = store._pool.acquire()
    try:
        with conn.cursor() as cur:
            cur.execute("DEALLOCATE ALL")
    finally:
        store._pool.release(conn)


class TestAsyncStatementCache:
    @pytest.fixture
    def run(self, dsn: str) -> Iterator[Callable[..., Any]]:
        tables: list[str] = []

        def run(test: Callable[..., Any], **kwargs: Any) -> Any:
            async def main() -> Any:
                table = unique_table()
                tables.append(table)
                store = AsyncPostgresDocumentStore(dsn, table=table, **kwargs)
                try:
                    return await test(store)
                finally:
                    await store.aclose()

            return asyncio.run(main())

        try:
            yield run
        finally:
            drop_tables(dsn, tables)

    def test_many_shapes_stay_right_while_the_caches_evict(
        self, run: Callable[..., Any], small_caches: int
    ) -> None:
        async def test(store: AsyncPostgresDocumentStore) -> None:
            await seed_async(store, "c")
            for _ in range(3):
                for shape in shapes("c"):
                    await shape.check_async(store)
            conn = await store._pool.acquire()
            try:
                assert len(conn.prepared) <= small_caches
                count = await conn.raw.fetchval("SELECT count(*) FROM pg_prepared_statements")
                assert count <= small_caches + 1  # asyncpg closes a dropped one lazily
            finally:
                store._pool.release(conn)

        run(test, max_connections=1)

    def test_collections_never_share_a_statement(self, run: Callable[..., Any]) -> None:
        async def test(store: AsyncPostgresDocumentStore) -> None:
            for collection in COLLECTIONS:
                await store.create(collection, {"k": "same", "owner": collection}, id="x")
            for _ in range(2):
                for collection in COLLECTIONS:
                    found = await store.query(collection, {"k": "same"}, limit=5)
                    assert [doc.data["owner"] for doc in found] == [collection]
                    assert await store.count(collection, {"k": {"$in": ["same"]}}) == 1

        run(test, max_connections=1)

    def test_statements_lost_or_dropped_are_prepared_again(
        self, run: Callable[..., Any], dsn: str
    ) -> None:
        async def test(store: AsyncPostgresDocumentStore) -> None:
            await seed_async(store, "c")
            assert await store.count("c", {"k": "k1"}) == 4
            conn = await store._pool.acquire()
            await conn.raw.execute("DEALLOCATE ALL")
            store._pool.release(conn)
            assert await store.count("c", {"k": "k1"}) == 4
            assert await store.delete_many("c", {"n": {"$in": [1]}}) == 1
            conn = await store._pool.acquire()
            await conn.raw.execute("DEALLOCATE ALL")
            store._pool.release(conn)
            async with store.transaction():
                assert await store.count("c", {"k": "k1"}) == 3
                assert await store.delete_many("c", {"n": {"$in": [4]}}) == 1
            assert await store.count("c", {"k": "k1"}) == 2
            # A lost connection (a server restart) takes its statements with it.
            await asyncio.to_thread(terminate_backends, dsn, store)
            await asyncio.sleep(0.05)  # the loop reads the closed socket
            assert await store.count("c", {"k": "k1"}) == 2
            found = await store.query("c", {"k": "k1"}, order_by="n")
            assert [doc.data["n"] for doc in found] == [7, 10]

        run(test, max_connections=1)


async def seed_async(store: AsyncPostgresDocumentStore, collection: str) -> None:
    for n in range(12):
        await store.create(collection, {"n": n, "k": f"k{n % 3}", "tags": [n % 2]}, id=f"d{n}")
