"""The docstore contract suite against `AsyncMemoryDocumentStore` (through the sync shim)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from contract.docstore_contract import DocumentStoreContract
from contract.sync_over_async import LoopThread, SyncOverAsyncStore

from docstore import AsyncMemoryDocumentStore, DocumentStore


class TestAsyncMemoryDocumentStore(DocumentStoreContract):
    @pytest.fixture
    def make_store(self) -> Iterator[Callable[..., DocumentStore]]:
        stores: list[DocumentStore] = []
        with LoopThread() as loop:

            def make(**kwargs: Any) -> DocumentStore:
                store = SyncOverAsyncStore(AsyncMemoryDocumentStore(**kwargs), loop)
                stores.append(store)
                return store

            yield make
            for store in stores:
                store.close()
