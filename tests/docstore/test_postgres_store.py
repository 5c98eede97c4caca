"""The contract suite against `PostgresDocumentStore`: the embedded server and a real one.

Every store here works on its own table `t_<uuid hex>`, dropped after the test.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import fields
from datetime import datetime, timedelta, timezone
from functools import partial

import psycopg2
import pytest
from contract.docstore_contract import DocumentStoreContract, run_in_threads, unique_name
from postgres_tables import postgres_store_factory, unique_table
from psycopg2 import sql

from docstore import (
    Document,
    DocumentExists,
    DocumentStore,
    InvalidDocument,
    PostgresDocumentStore,
)
from docstore.postgres import _to_document


def index_count(dsn: str, table: str) -> int:
    conn = psycopg2.connect(dsn, connect_timeout=10)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM pg_indexes WHERE tablename = %s", (table,))
            (count,) = cur.fetchone()
            return int(count)
    finally:
        conn.close()


def first_calls(store: DocumentStore, index: int) -> object:
    """Run one kind of statement five times (index: which kind)."""
    calls: list[Callable[[], object]] = [
        lambda: store.read("c", "d0"),
        lambda: store.update("c", "d1", {"m": 1}),
        lambda: store.replace("c", "d2", {"r": 1}),
        lambda: store.upsert("c", "d3", {"u": 1}),
        lambda: store.delete("c", "d4"),
        lambda: store.append("m", {}, parent=("c", "d5")),
    ]
    return [calls[index]() for _ in range(5)][-1]


class PostgresStoreTests:
    """What only a store on a shared server can show: tables, pools, schema creation."""

    @pytest.fixture
    def make_store(self, dsn: str) -> Iterator[Callable[..., PostgresDocumentStore]]:
        with postgres_store_factory(dsn) as make:
            yield make

    def test_tables_are_isolated(self, make_store: Callable[..., DocumentStore]) -> None:
        first, second = make_store(), make_store()
        first.create("c", {"a": 1}, id="x")
        assert second.read("c", "x") is None
        assert second.list_collections() == []

    def test_stores_on_one_table_share_it(self, make_store: Callable[..., DocumentStore]) -> None:
        table = unique_table()
        first = make_store(table=table)
        created = first.create("c", {"a": 1}, id="x")
        first.ensure_index("c", "a", unique=True)
        second = make_store(table=table)  # the table exists already: no error
        assert second.read("c", "x") == created
        second.update("c", "x", {"b": 2})
        changed = first.read("c", "x")
        assert changed is not None and changed.data == {"a": 1, "b": 2}
        with pytest.raises(DocumentExists):
            second.create("c", {"a": 1})

    def test_prepared_and_plain_statements_agree(
        self, make_store: Callable[..., DocumentStore]
    ) -> None:
        # Hot statements run as server-side prepared statements unless turned off
        # (for a transaction-pooling proxy); both ways must behave the same.
        table = unique_table()
        prepared = make_store(table=table)
        plain = make_store(table=table, prepare_statements=False)
        for store, name in ((prepared, "a"), (plain, "b")):
            other = plain if store is prepared else prepared
            created = store.create("c", {"n": 1}, id=name, ttl=60)
            assert other.read("c", name) == created
            updated = store.update("c", name, {"m": 2}, expected_version=1, ttl=120)
            assert updated is not None and updated.data == {"n": 1, "m": 2}
            replaced = store.replace("c", name, {"r": 3})
            assert replaced is not None and replaced.version == 3
            assert store.upsert("c", name, {"u": 4}).data == {"r": 3, "u": 4}
            pair = store.append("m", {"t": "x"}, parent=("c", name), parent_ttl=30)
            assert pair is not None and pair[1].data["seq"] == 1
            renamed = store.rename("c", name, f"{name}2")
            assert renamed is not None and other.read("c", name) is None
            assert store.delete("c", f"{name}2", expected_version=renamed.version)
            assert other.read("c", f"{name}2") is None

    def test_an_index_with_order_by_serves_a_filtered_page_without_sorting(
        self, make_store: Callable[..., DocumentStore], dsn: str
    ) -> None:
        # What list_sessions relies on: one owner's newest documents, a page at a
        # time, read from the index in order rather than sorted from all of them.
        table = unique_table()
        store = make_store(table=table)
        for n in range(20):
            store.create("c", {"owner": f"u{n % 2}"}, id=f"d{n}")
        store.ensure_index("c", "owner", order_by=["-updated_at", "id"])
        conn = psycopg2.connect(dsn, connect_timeout=10)
        try:
            with conn.cursor() as cur:
                cur.execute("SET enable_seqscan = off; SET enable_bitmapscan = off")
                cur.execute(
                    sql.SQL(
                        "EXPLAIN SELECT id FROM {} WHERE collection = 'c'"
                        " AND (data #> ARRAY['owner']) = '\"u1\"'::jsonb"
                        " ORDER BY updated_at DESC NULLS FIRST, id ASC LIMIT 5"
                    ).format(sql.Identifier(table))
                )
                plan = "\n".join(row[0] for row in cur.fetchall())
        finally:
            conn.close()
        assert "Index Scan" in plan and "Sort" not in plan, plan
        page = store.query("c", {"owner": "u1"}, order_by=["-updated_at", "id"], limit=5)
        assert [doc.data["owner"] for doc in page] == ["u1"] * 5

    def test_first_use_of_statements_from_many_threads_at_once(
        self, make_store: Callable[..., DocumentStore]
    ) -> None:
        # Each statement gets a prepared-statement name on first use; threads
        # naming different statements at the same moment must not share a name.
        for _ in range(5):
            table = unique_table()
            setup = make_store(table=table)
            for n in range(6):
                setup.create("c", {"n": n}, id=f"d{n}")
            store = make_store(table=table, max_connections=3)  # threads share connections
            results = run_in_threads(6, partial(first_calls, store))
            assert all(result is not None for result in results[:4])
            assert setup.read("c", "d1").data == {"n": 1, "m": 1}  # type: ignore[union-attr]
            assert setup.count("m") == 5

    def test_concurrent_construction_on_a_new_table(
        self, make_store: Callable[..., DocumentStore]
    ) -> None:
        table = unique_table()
        stores = run_in_threads(4, lambda index: make_store(table=table))
        stores[0].create("c", {}, id="x")
        assert all(store.read("c", "x") is not None for store in stores)

    def test_hostile_table_name(self, make_store: Callable[..., DocumentStore]) -> None:
        table = f't_{uuid.uuid4().hex[:16]}"; --%s'
        store = make_store(table=table)
        store.create("c", {"a": 1}, id="x")
        store.ensure_index("c", "a", unique=True)
        assert [doc.id for doc in store.query("c", {"a": 1})] == ["x"]

    def test_ensure_index_creates_one_index_once(
        self, make_store: Callable[..., DocumentStore], dsn: str
    ) -> None:
        table = unique_table()
        store = make_store(table=table)
        coll = unique_name()
        store.create(coll, {"a": 1, "b": 2})
        before = index_count(dsn, table)
        store.ensure_index(coll, "a")
        once = index_count(dsn, table)
        store.ensure_index(coll, "a")
        store.ensure_index(coll, ["a"])
        assert once == before + 1
        assert index_count(dsn, table) == once
        store.ensure_index(coll, ["a", "b"], unique=True)
        store.ensure_index(coll, ["a", "b"], unique=True)
        assert index_count(dsn, table) == once + 1

    def test_numbers_beyond_64_bits_are_refused_but_read_back_as_floats(
        self, make_store: Callable[..., DocumentStore], dsn: str
    ) -> None:
        table = unique_table()
        store = make_store(table=table)
        with pytest.raises(InvalidDocument):
            store.create("c", {"big": 2**63}, id="x")
        store.create("c", {"big": 1}, id="x")
        # Another program writes a number this API refuses to write.
        conn = psycopg2.connect(dsn, connect_timeout=10)
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(
                    sql.SQL("UPDATE {} SET data = %s::jsonb WHERE id = 'x'").format(
                        sql.Identifier(table)
                    ),
                    ('{"big": 9223372036854775808, "edge": 9223372036854775807}',),
                )
        finally:
            conn.close()
        document = store.read("c", "x")
        assert document is not None
        assert document.data == {"big": 9.223372036854775808e18, "edge": 2**63 - 1}
        assert isinstance(document.data["big"], float) and isinstance(document.data["edge"], int)

    def test_more_threads_than_connections_wait_their_turn(
        self, make_store: Callable[..., DocumentStore]
    ) -> None:
        store = make_store(max_connections=2)
        store.create("c", {"n": 0}, id="x")

        def work(index: int) -> int:
            total = 0
            for _ in range(5):
                with store.transaction():
                    doc = store.read("c", "x")
                    assert doc is not None
                    total += doc.version
            return total

        assert run_in_threads(8, work) == [5] * 8


@pytest.mark.embedded
class TestEmbeddedPostgresDocumentStore(PostgresStoreTests, DocumentStoreContract):
    @pytest.fixture
    def dsn(self, embedded_dsn: str) -> str:
        return embedded_dsn


@pytest.mark.postgres
class TestRealPostgresDocumentStore(PostgresStoreTests, DocumentStoreContract):
    @pytest.fixture
    def dsn(self, real_dsn: str) -> str:
        return real_dsn

    @pytest.fixture
    def code_point_strings(self, dsn: str) -> bool:
        conn = psycopg2.connect(dsn, connect_timeout=10)
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT datcollate FROM pg_database WHERE datname = current_database()")
                (collation,) = cur.fetchone()
        finally:
            conn.close()
        return collation in ("C", "POSIX") or collation.startswith("C.")


def test_rows_become_documents_field_by_field() -> None:
    # _to_document fills Document's fields by name, in the order of the row.
    now = datetime.now(timezone.utc)
    row = ("id", "coll", {"a": [1]}, now, now + timedelta(seconds=1), 3, None)
    built = _to_document(row)
    assert built == Document(*row)
    assert vars(built) == {
        field.name: value for field, value in zip(fields(Document), row, strict=True)
    }
    with pytest.raises(ValueError):
        _to_document(row[:-1])
