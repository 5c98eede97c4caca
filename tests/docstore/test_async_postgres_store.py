"""The docstore contract suite against `AsyncPostgresDocumentStore`: embedded and real server.

The suite is the sync one, driven through `SyncOverAsyncStore`; every store
works on its own table `t_<uuid hex>`, dropped after the test.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from contract.docstore_contract import DocumentStoreContract
from contract.sync_over_async import LoopThread, SyncOverAsyncStore
from postgres_tables import drop_tables, unique_table

from docstore import AsyncPostgresDocumentStore, DocumentStore


class AsyncPostgresContract(DocumentStoreContract):
    @pytest.fixture
    def make_store(self, dsn: str) -> Iterator[Callable[..., DocumentStore]]:
        stores: list[DocumentStore] = []
        tables: list[str] = []
        with LoopThread() as loop:

            def make(**kwargs: Any) -> DocumentStore:
                table = kwargs.pop("table", None) or unique_table()
                tables.append(table)
                store = SyncOverAsyncStore(
                    AsyncPostgresDocumentStore(dsn, table=table, **kwargs), loop
                )
                stores.append(store)
                return store

            try:
                yield make
            finally:
                try:
                    for store in stores:
                        store.close()
                finally:
                    drop_tables(dsn, tables)


@pytest.mark.embedded
class TestEmbeddedAsyncPostgresDocumentStore(AsyncPostgresContract):
    @pytest.fixture
    def dsn(self, embedded_dsn: str) -> str:
        return embedded_dsn


@pytest.mark.postgres
class TestRealAsyncPostgresDocumentStore(AsyncPostgresContract):
    @pytest.fixture
    def dsn(self, real_dsn: str) -> str:
        return real_dsn
