"""Stores on uniquely named tables, and dropping exactly those tables afterwards."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from docstore import DocumentStore, PostgresDocumentStore
from session.pytest_plugin import drop_postgres_tables, unique_table_name

__all__ = ["unique_table", "drop_tables", "postgres_store_factory"]


def unique_table() -> str:
    """Return a table name of this test run's own (see `session.pytest_plugin`)."""
    return unique_table_name()


def drop_tables(dsn: str, tables: list[str]) -> None:
    """Drop exactly these tables (created by the tests) and their `_meta` tables, if they exist."""
    drop_postgres_tables(dsn, tables)


@contextmanager
def postgres_store_factory(
    dsn: str, *, admin_dsn: str | None = None
) -> Iterator[Callable[..., PostgresDocumentStore]]:
    """Yield `make(**kwargs)` building stores on fresh tables; close them, drop the tables.

    `make(table=...)` reuses or names a table explicitly (it is dropped too).
    The tables are dropped through `admin_dsn` (default: `dsn`), for tests whose
    stores reach the server through a proxy that may be cut.
    """
    stores: list[DocumentStore] = []
    tables: list[str] = []

    def make(**kwargs: Any) -> PostgresDocumentStore:
        table = kwargs.pop("table", None) or unique_table()
        if table not in tables:
            tables.append(table)
        store = PostgresDocumentStore(dsn, table=table, **kwargs)
        stores.append(store)
        return store

    try:
        yield make
    finally:
        try:
            for store in stores:
                store.close()
        finally:
            drop_tables(admin_dsn or dsn, tables)
