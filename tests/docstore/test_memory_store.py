"""The contract suite against `MemoryDocumentStore`."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
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


def test_an_injected_clock_drives_timestamps_and_expiry() -> None:
    now = [1_700_000_000.0]
    store = MemoryDocumentStore(clock=lambda: now[0])
    start = datetime.fromtimestamp(now[0], timezone.utc)
    created = store.create("c", {"a": 1}, ttl=10)
    assert created.created_at == created.updated_at == start
    assert created.expires_at == start + timedelta(seconds=10)
    now[0] += 9.5
    updated = store.update("c", created.id, {"a": 2}, ttl=10)
    assert updated is not None
    assert updated.updated_at == start + timedelta(seconds=9.5)
    assert updated.expires_at == start + timedelta(seconds=19.5)
    now[0] += 10
    assert store.read("c", created.id) is None
    assert store.purge_expired() == 1
