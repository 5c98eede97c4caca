"""`get_document_store`: the URL argument, else POSTGRES_CONNECTION_STRING, else DATABASE_URL,
else the embedded server."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
from postgres_tables import drop_tables, unique_table

from docstore import (
    DocstoreError,
    DocumentStore,
    MemoryDocumentStore,
    PostgresDocumentStore,
    StoreUnavailable,
    get_document_store,
)

VARIABLES = ("POSTGRES_CONNECTION_STRING", "DATABASE_URL")


def unreachable_url() -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"postgresql://nobody@127.0.0.1:{port}/nothing?connect_timeout=2"


def open_and_use(url: str | None = None) -> DocumentStore:
    store = get_document_store(url)
    try:
        assert store.read("c", "x") is None
    except BaseException:
        store.close()
        raise
    return store


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)


def test_memory_url() -> None:
    with get_document_store("memory://") as store:
        assert isinstance(store, MemoryDocumentStore)
        created = store.create("c", {"a": 1})
        assert store.read("c", created.id) == created


def test_the_url_argument_comes_first(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in VARIABLES:
        monkeypatch.setenv(name, unreachable_url())
    with open_and_use("memory://") as store:
        assert isinstance(store, MemoryDocumentStore)


def test_postgres_connection_string_comes_before_database_url(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("POSTGRES_CONNECTION_STRING", "memory://")
    monkeypatch.setenv("DATABASE_URL", unreachable_url())
    with open_and_use() as store:
        assert isinstance(store, MemoryDocumentStore)


def test_database_url_is_the_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "memory://")
    with open_and_use() as store:
        assert isinstance(store, MemoryDocumentStore)


def test_a_configured_server_is_used_not_the_embedded_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DATABASE_URL", unreachable_url())
    started = time.monotonic()
    with pytest.raises(StoreUnavailable):
        open_and_use()
    assert time.monotonic() - started < 10


@pytest.mark.embedded
def test_no_configuration_starts_the_embedded_server(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("DOCSTORE_DATA_DIR", str(tmp_path / "docstore"))
    with get_document_store() as store:
        assert isinstance(store, PostgresDocumentStore)
        created = store.create("c", {"kept": True}, id="x")
    # A new store on the same data directory finds what the first one wrote.
    with get_document_store() as again:
        assert isinstance(again, PostgresDocumentStore)
        assert again.read("c", "x") == created


@pytest.mark.parametrize("url", ["mysql://app:hunter2@db/chat", "host=db password='hunter2"])
def test_an_unparsable_url_is_named_without_its_password(url: str) -> None:
    with pytest.raises(DocstoreError) as raised:
        get_document_store(url)
    assert "invalid PostgreSQL connection string" in str(raised.value)
    assert "hunter2" not in str(raised.value)


@pytest.mark.postgres
def test_the_table_comes_from_the_argument_else_docstore_table(
    real_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from_variable, from_argument = unique_table(), unique_table()
    monkeypatch.setenv("DOCSTORE_TABLE", from_variable)
    try:
        with get_document_store(real_dsn) as store:
            store.create("c", {"a": 1}, id="x")
        with get_document_store(real_dsn, table=from_argument) as store:
            assert store.read("c", "x") is None
        with PostgresDocumentStore(real_dsn, table=from_variable) as store:
            assert store.read("c", "x") is not None
    finally:
        drop_tables(real_dsn, [from_variable, from_argument])
