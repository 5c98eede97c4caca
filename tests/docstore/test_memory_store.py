"""The contract suite against `MemoryDocumentStore`."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from contract.docstore_contract import DocumentStoreContract

from docstore import DocumentStore, MemoryDocumentStore


class TestMemoryDocumentStore(DocumentStoreContract):
    @pytest.fixture
    def make_store(self) -> Iterator[Callable[..., DocumentStore]]:
        stores: list[DocumentStore] = []

        def make(**kwargs: Any) -> DocumentStore:
            store = MemoryDocumentStore(**kwargs)
            stores.append(store)
            return store

        yield make
        for store in stores:
            store.close()

    def test_stores_share_nothing(self, make_store: Callable[..., DocumentStore]) -> None:
        first, second = make_store(), make_store()
        first.create("c", {"a": 1}, id="x")
        assert second.read("c", "x") is None
        assert second.list_collections() == []
