"""get_session_store / from_env, the default Redis client, and the store's own arguments."""

from __future__ import annotations

from typing import Any

import fakeredis
import pytest
import redis

import session.config
from docstore import MemoryDocumentStore
from session import SessionStore, get_session_store
from session.config import REDIS_SOCKET_TIMEOUT, redis_client_from_url
from session.pytest_plugin import unique_key_prefix


def test_default_client_fails_fast() -> None:
    client = redis_client_from_url("redis://127.0.0.1:1/0")
    try:
        kwargs = client.connection_pool.connection_kwargs
        assert kwargs["socket_timeout"] == REDIS_SOCKET_TIMEOUT <= 0.5
        assert kwargs["socket_connect_timeout"] == REDIS_SOCKET_TIMEOUT
        assert kwargs["retry"].get_retries() <= 1
    finally:
        client.close()


def test_unreachable_redis_costs_little() -> None:
    client = redis_client_from_url("redis://127.0.0.1:1/0")
    with SessionStore(MemoryDocumentStore(), client, owns_cache=True) as store:
        created = store.create_session(data={"a": 1})
        assert store.get_session(created.id) == created
        assert store.stats()["cache_errors"] == 1


@pytest.fixture
def docstore_urls(monkeypatch: pytest.MonkeyPatch) -> list[str | None]:
    """Stand in for docstore.get_document_store: record the URL, return a memory store."""
    urls: list[str | None] = []

    def fake(url: str | None = None) -> MemoryDocumentStore:
        urls.append(url)
        return MemoryDocumentStore()

    monkeypatch.setattr(session.config, "get_document_store", fake)
    return urls


def test_get_session_store_without_redis_url(
    monkeypatch: pytest.MonkeyPatch, docstore_urls: list[str | None]
) -> None:
    monkeypatch.delenv("REDIS_URL", raising=False)
    store = get_session_store(docstore_url="memory://")
    assert docstore_urls == ["memory://"]
    with store:
        created = store.create_session("u", {"a": 1})
        assert store.get_session(created.id) == created
        assert store.get_session(created.id) == created
        assert store.stats()["hits"] == 1
        cache = store._cache  # noqa: SLF001 - checking what the factory built
        assert isinstance(cache, fakeredis.FakeRedis)


def test_get_session_store_with_redis_url(redis_url: str, docstore_urls: list[str | None]) -> None:
    with get_session_store(
        docstore_url="memory://", redis_url=redis_url, key_prefix=unique_key_prefix()
    ) as store:
        created = store.create_session()
        assert store.get_session(created.id) == created
        assert store.delete_session(created.id)
        assert store.stats()["cache_errors"] == 0


def test_close_closes_only_what_the_store_owns() -> None:
    closed: set[str] = set()

    class Documents(MemoryDocumentStore):
        def close(self) -> None:
            closed.add("docstore")

    class Cache(fakeredis.FakeRedis):
        def close(self) -> None:
            closed.add("cache")
            super().close()

    server = fakeredis.FakeServer()
    documents, cache = Documents(), Cache(server=server)
    SessionStore(documents, cache).close()
    assert closed == set()
    with SessionStore(Documents(), Cache(server=server), owns_docstore=True, owns_cache=True):
        pass
    assert closed == {"cache", "docstore"}


@pytest.mark.parametrize(
    "arguments",
    [
        {"cache_ttl": 0},
        {"cache_ttl": -1},
        {"session_ttl": 0},
        {"key_prefix": "a{b}"},
        {"tail_size": -1},
        {"lease_wait": -1},
        {"fill_lease_ttl": 0},
    ],
)
def test_bad_store_arguments(arguments: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        SessionStore(MemoryDocumentStore(), None, **arguments)


def test_decoding_client_is_refused() -> None:
    client = fakeredis.FakeRedis(server=fakeredis.FakeServer(), decode_responses=True)
    with pytest.raises(ValueError):
        SessionStore(MemoryDocumentStore(), client)


def test_redis_errors_never_reach_the_caller() -> None:
    # Every reply is an error, wherever the store sends its commands from.
    class Broken(fakeredis.FakeRedis):
        def evalsha(self, *args: Any, **kwargs: Any) -> Any:
            raise redis.ResponseError("script exploded")

    client = Broken(server=fakeredis.FakeServer())
    get_connection = client.connection_pool.get_connection

    def broken_connection() -> Any:
        connection = get_connection()

        def read_response(*args: Any, **kwargs: Any) -> Any:
            raise redis.ResponseError("script exploded")

        connection.read_response = read_response
        return connection

    client.connection_pool.get_connection = broken_connection  # type: ignore[method-assign]
    with SessionStore(MemoryDocumentStore(), client) as store:
        created = store.create_session()
        assert store.get_session(created.id) == created
        assert store.update_session(created.id, {"a": 1}).version == 2
        assert store.stats()["cache_errors"] >= 1


def test_from_env_reads_redis_url(
    monkeypatch: pytest.MonkeyPatch, docstore_urls: list[str | None]
) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/0")
    with SessionStore.from_env() as store:
        assert docstore_urls == [None]
        kwargs = store._cache.connection_pool.connection_kwargs  # type: ignore[union-attr]  # noqa: SLF001
        assert (kwargs["host"], kwargs["port"]) == ("127.0.0.1", 1)
        created = store.create_session()
        assert store.get_session(created.id) == created  # Redis unreachable: the docstore answers
