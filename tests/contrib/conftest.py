"""Backends for the framework adapters' tests: each runs on all three.

- `memory`: the memory docstore and fakeredis;
- `embedded`: the embedded PostgreSQL server and fakeredis;
- `real`: POSTGRES_CONNECTION_STRING and REDIS_URL (skipped without them,
  failing under CI).

`Backend.store()` builds a SessionStore on the backend's docstore table and
key prefix; `Backend.restart()` closes the stores built so far and returns a
new one whose cache is empty, as a restarted process with a flushed Redis
would see it (on the real Redis only this test's prefix is deleted).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator

import fakeredis
import pytest
import redis
from postgres_tables import postgres_store_factory

from docstore import DocumentStore, MemoryDocumentStore
from session import SessionStore
from session.config import redis_client_from_url

REAL_SERVERS = (pytest.mark.postgres, pytest.mark.redis)


def delete_keys(client: redis.Redis, prefix: str) -> None:
    keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
    if keys:
        client.delete(*keys)


class Backend:
    """A docstore and a way to get a cache as a freshly restarted process would see it."""

    def __init__(
        self, documents: DocumentStore, fresh_cache: Callable[[], redis.Redis], prefix: str
    ) -> None:
        self.documents = documents
        self.fresh_cache = fresh_cache
        self.prefix = prefix
        self._cache: redis.Redis | None = None
        self._stores: list[SessionStore] = []

    def store(self) -> SessionStore:
        """Return a store on this backend, sharing the current cache."""
        if self._cache is None:
            self._cache = self.fresh_cache()
        store = SessionStore(self.documents, self._cache, key_prefix=self.prefix)
        self._stores.append(store)
        return store

    def restart(self) -> SessionStore:
        """Close every store so far; return a new one on an empty cache."""
        self.close()
        self._cache = self.fresh_cache()
        return self.store()

    def close(self) -> None:
        for store in self._stores:
            store.close()
        self._stores.clear()


@pytest.fixture(
    params=[
        "memory",
        pytest.param("embedded", marks=pytest.mark.embedded),
        pytest.param("real", marks=REAL_SERVERS),
    ]
)
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    prefix = f"t{uuid.uuid4().hex[:12]}:"
    if request.param in ("memory", "embedded"):
        clients: list[redis.Redis] = []

        def empty_fake() -> redis.Redis:
            client = fakeredis.FakeRedis(server=fakeredis.FakeServer())
            clients.append(client)
            return client

        try:
            if request.param == "memory":
                backend = Backend(MemoryDocumentStore(), empty_fake, prefix)
                yield backend
                backend.close()
            else:
                dsn: str = request.getfixturevalue("embedded_dsn")
                with postgres_store_factory(dsn) as make:
                    backend = Backend(make(), empty_fake, prefix)
                    yield backend
                    backend.close()
        finally:
            for client in clients:
                client.close()
        return
    real_dsn: str = request.getfixturevalue("real_dsn")
    redis_url: str = request.getfixturevalue("redis_url")
    client = redis_client_from_url(redis_url)

    def flushed() -> redis.Redis:
        delete_keys(client, prefix)
        return client

    try:
        with postgres_store_factory(real_dsn) as make:
            backend = Backend(make(), flushed, prefix)
            yield backend
            backend.close()
    finally:
        delete_keys(client, prefix)
        client.close()


@pytest.fixture(scope="session")
def redis_url() -> str:
    from session.pytest_plugin import REDIS_VARIABLE, server_url

    return server_url(REDIS_VARIABLE, "real Redis server")
