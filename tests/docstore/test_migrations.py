"""The schema migration runner: ordered steps, each applied once, under the table's lock.

Each test works on its own table `t_<uuid hex>` and drops it (and its meta
table) afterwards.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import psycopg2
import pytest
from contract.docstore_contract import run_in_threads
from postgres_tables import drop_tables, unique_table
from psycopg2 import sql

from docstore import PostgresDocumentStore
from docstore.migrations import (
    LATEST_VERSION,
    MIGRATIONS,
    Migration,
    SchemaTooNew,
    migrate,
    migrate_dsn,
    read_version,
    schema_lock_name,
    table_indexes,
)

pytestmark = pytest.mark.usefixtures("dsn")


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
def table(dsn: str) -> Iterator[str]:
    name = unique_table()
    yield name
    drop_tables(dsn, [name, f"{name}_meta", f"{name}_log"])


def connect(dsn: str) -> psycopg2.extensions.connection:
    conn = psycopg2.connect(dsn, connect_timeout=10)
    conn.autocommit = True
    return conn


def logged_step(version: int, *, transactional: bool = True) -> Migration:
    """A step that fails if it ever runs twice on a table (a primary key on its version)."""

    def statements(table: str, online: bool) -> list[sql.Composable]:
        log = sql.Identifier(f"{table}_log")
        return [
            sql.SQL("CREATE TABLE IF NOT EXISTS {} (version int PRIMARY KEY)").format(log),
            sql.SQL("INSERT INTO {} (version) VALUES ({})").format(log, sql.Literal(version)),
        ]

    return Migration(version, f"log step {version}", statements, transactional=transactional)


def log_of(dsn: str, table: str) -> list[int]:
    conn = connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute(
                sql.SQL("SELECT version FROM {} ORDER BY 1").format(sql.Identifier(f"{table}_log"))
            )
            return [row[0] for row in cur.fetchall()]
    finally:
        conn.close()


def test_a_new_table_gets_every_step(dsn: str, table: str) -> None:
    report = migrate_dsn(dsn, table)
    assert (report.version_before, report.version_after) == (0, LATEST_VERSION)
    assert [step.version for step in report.applied] == [step.version for step in MIGRATIONS]
    again = migrate_dsn(dsn, table)
    assert again.applied == () and again.version_before == LATEST_VERSION
    conn = connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT indexname FROM pg_indexes WHERE tablename = %s", (table,))
            indexes = {row[0] for row in cur.fetchall()}
    finally:
        conn.close()
    assert f"{table}_updated" in indexes and f"{table}_created" in indexes


def test_a_table_made_by_an_older_step_list_is_upgraded_and_keeps_its_data(
    dsn: str, table: str
) -> None:
    older = MIGRATIONS[:1]
    assert migrate_dsn(dsn, table, steps=older).version_after == 1
    conn = connect(dsn)
    try:
        with conn.cursor() as cur:
            # What a store of the older code wrote.
            cur.execute(
                sql.SQL("INSERT INTO {} (collection, id, data) VALUES ('c', 'x', '{{}}')").format(
                    sql.Identifier(table)
                )
            )
        assert read_version(conn, table) == 1
    finally:
        conn.close()
    # The current code opens it: the newer steps run once, on the live table.
    store = PostgresDocumentStore(dsn, table=table)
    try:
        assert store.read("c", "x") is not None
    finally:
        store.close()
    conn = connect(dsn)
    try:
        assert read_version(conn, table) == LATEST_VERSION
        newer = (*MIGRATIONS, logged_step(LATEST_VERSION + 1, transactional=False))
        report = migrate(conn, table, steps=newer, dry_run=True)
        assert [step.version for step in report.applied] == [LATEST_VERSION + 1]
        assert read_version(conn, table) == LATEST_VERSION  # a dry run changes nothing
        report = migrate(conn, table, steps=newer)
        assert report.version_after == LATEST_VERSION + 1
        assert migrate(conn, table, steps=newer).applied == ()
    finally:
        conn.close()
    assert log_of(dsn, table) == [LATEST_VERSION + 1]


def test_a_failing_step_leaves_the_version_where_it_was(dsn: str, table: str) -> None:
    migrate_dsn(dsn, table)

    def broken(table: str, online: bool) -> list[sql.Composable]:
        return [
            sql.SQL("CREATE TABLE {} (version int)").format(sql.Identifier(f"{table}_log")),
            sql.SQL("SELECT no_such_function()"),
        ]

    steps = (*MIGRATIONS, Migration(LATEST_VERSION + 1, "broken", broken))
    with pytest.raises(Exception, match="no_such_function"):
        migrate_dsn(dsn, table, steps=steps)
    conn = connect(dsn)
    try:
        assert read_version(conn, table) == LATEST_VERSION
        with conn.cursor() as cur:
            cur.execute("SELECT to_regclass(%s)", (f"{table}_log",))
            assert cur.fetchone() == (None,)  # the step's first statement was rolled back
            # ... and the schema lock was released.
            cur.execute("SELECT pg_try_advisory_lock(hashtext(%s))", (schema_lock_name(table),))
            assert cur.fetchone() == (True,)
    finally:
        conn.close()


def test_a_table_newer_than_the_code_is_refused_untouched(dsn: str, table: str) -> None:
    newer = (*MIGRATIONS, logged_step(LATEST_VERSION + 1))
    migrate_dsn(dsn, table, steps=newer)
    with pytest.raises(SchemaTooNew, match=f"schema version {LATEST_VERSION + 1}.*upgrade"):
        migrate_dsn(dsn, table)
    with pytest.raises(SchemaTooNew, match="upgrade"):
        PostgresDocumentStore(dsn, table=table)
    conn = connect(dsn)
    try:
        assert read_version(conn, table) == LATEST_VERSION + 1
    finally:
        conn.close()


def test_processes_starting_together_apply_each_step_once(dsn: str, table: str) -> None:
    steps = (*MIGRATIONS, logged_step(LATEST_VERSION + 1), logged_step(LATEST_VERSION + 2))
    # One connection each, as separate processes would have; they start together.
    connections = [connect(dsn) for _ in range(6)]
    try:
        applied = run_in_threads(
            6, lambda index: len(migrate(connections[index], table, steps=steps).applied)
        )
    finally:
        for conn in connections:
            conn.close()
    # One starter applied every step; the others found nothing left to do.
    assert sorted(applied) == [0] * 5 + [len(steps)]
    assert log_of(dsn, table) == [LATEST_VERSION + 1, LATEST_VERSION + 2]


def test_steps_must_be_numbered_in_order(dsn: str, table: str) -> None:
    with pytest.raises(ValueError, match="1, 2, 3"):
        migrate_dsn(dsn, table, steps=(MIGRATIONS[1],))


def test_the_index_list_matches_what_each_step_builds(dsn: str, table: str) -> None:
    conn = connect(dsn)
    try:
        for version in range(1, LATEST_VERSION + 1):
            migrate(conn, table, steps=MIGRATIONS[:version])
            with conn.cursor() as cur:
                cur.execute("SELECT indexname FROM pg_indexes WHERE tablename = %s", (table,))
                found = sorted(row[0] for row in cur.fetchall())
            assert found == sorted(table_indexes(table, version))
    finally:
        conn.close()


def test_large_values_are_written_with_lz4_where_the_server_has_it(dsn: str, table: str) -> None:
    # Log-like text: TOAST compresses it (random text it would store uncompressed).
    lines = "".join(f"{i:08d} INFO item {i * 7919 % 10007} status=ok\n" for i in range(5000))
    conn = connect(dsn)
    try:
        # A table of the step before, holding a value written then.
        migrate(conn, table, steps=MIGRATIONS[:3])
        with conn.cursor() as cur:
            cur.execute(
                sql.SQL("INSERT INTO {} (collection, id, data) VALUES ('c', 'old', %s)").format(
                    sql.Identifier(table)
                ),
                (json.dumps({"content": lines}),),
            )
        store = PostgresDocumentStore(dsn, table=table)  # migrates the table
        try:
            store.create("c", {"content": lines}, id="new")
            for id_ in ("old", "new"):
                found = store.read("c", id_)
                assert found is not None and found.data == {"content": lines}
        finally:
            store.close()
        with conn.cursor() as cur:
            cur.execute(
                "SELECT coalesce(bool_or(enumvals @> ARRAY['lz4']), false) FROM pg_settings"
                " WHERE name = 'default_toast_compression'"
            )
            has_lz4 = cur.fetchone() == (True,)
            cur.execute(
                sql.SQL("SELECT id, pg_column_compression(data) FROM {} ORDER BY id").format(
                    sql.Identifier(table)
                )
            )
            methods = dict(cur.fetchall())
        assert methods == {"new": "lz4" if has_lz4 else "pglz", "old": "pglz"}
    finally:
        conn.close()
