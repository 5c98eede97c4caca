"""`get_async_document_store`: the URL rules of `get_document_store`, asyncio stores."""

from __future__ import annotations

import time

import pytest
from test_get_document_store import VARIABLES, unreachable_url

from docstore import (
    AsyncDocumentStore,
    AsyncMemoryDocumentStore,
    AsyncPostgresDocumentStore,
    DocstoreError,
    StoreUnavailable,
    get_async_document_store,
)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)


async def open_and_use(url: str | None = None) -> AsyncDocumentStore:
    store = get_async_document_store(url)
    try:
        assert await store.read("c", "x") is None
    finally:
        await store.aclose()
    return store


@pytest.mark.asyncio
async def test_memory_url() -> None:
    async with get_async_document_store("memory://") as store:
        assert isinstance(store, AsyncMemoryDocumentStore)
        created = await store.create("c", {"a": 1})
        assert await store.read("c", created.id) == created


@pytest.mark.asyncio
async def test_the_url_argument_comes_first(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in VARIABLES:
        monkeypatch.setenv(name, unreachable_url())
    assert isinstance(await open_and_use("memory://"), AsyncMemoryDocumentStore)


@pytest.mark.asyncio
async def test_postgres_connection_string_comes_before_database_url(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("POSTGRES_CONNECTION_STRING", "memory://")
    monkeypatch.setenv("DATABASE_URL", unreachable_url())
    assert isinstance(await open_and_use(), AsyncMemoryDocumentStore)


@pytest.mark.asyncio
async def test_database_url_is_the_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "memory://")
    assert isinstance(await open_and_use(), AsyncMemoryDocumentStore)


@pytest.mark.asyncio
async def test_a_configured_server_is_used_and_its_absence_is_typed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DATABASE_URL", unreachable_url())
    store = get_async_document_store()  # connects on first use, not here
    assert isinstance(store, AsyncPostgresDocumentStore)
    started = time.monotonic()
    with pytest.raises(StoreUnavailable):
        await store.read("c", "x")
    assert time.monotonic() - started < 10
    await store.aclose()


def test_no_configuration_uses_the_embedded_server(monkeypatch: pytest.MonkeyPatch) -> None:
    embedded = "host=/run/embedded port=5439 user=postgres dbname=docstore"
    started: list[bool] = []

    def start_embedded() -> str:
        started.append(True)
        return embedded

    monkeypatch.setattr("docstore.embedded.start_embedded", start_embedded)
    store = get_async_document_store()  # no connection yet: nothing to clean up
    assert started == [True]
    assert isinstance(store, AsyncPostgresDocumentStore)
    assert "host=/run/embedded" in repr(store) and "port=5439" in repr(store)


@pytest.mark.parametrize("url", ["mysql://app:hunter2@db/chat", "host=db password='hunter2"])
def test_an_unparsable_url_is_named_without_its_password(url: str) -> None:
    with pytest.raises(DocstoreError) as raised:
        get_async_document_store(url)
    assert "invalid PostgreSQL connection string" in str(raised.value)
    assert "hunter2" not in str(raised.value)
