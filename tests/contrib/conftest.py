"""Backends for the framework adapters' tests: each runs on all three.

- `memory`: the memory docstore and fakeredis;
- `embedded`: the embedded PostgreSQL server and fakeredis;
- `real`: POSTGRES_CONNECTION_STRING and REDIS_URL (skipped without them,
  failing under CI).

`backend` gives `SessionStore`s (the Django engine's store). `any_backend`
(the asyncio adapters) also gives `AsyncSessionStore`s on the asyncio clients
of the same docstore table and Redis server: `memory-async` (memory +
fakeredis) and `real-async` (the real servers); the embedded server runs the
sync store only, to keep the suite's time modest.

`Backend.store()` builds a SessionStore on the backend's docstore table and
key prefix; `Backend.restart()` closes the stores built so far and returns a
new one whose cache is empty, as a restarted process with a flushed Redis
would see it (on the real Redis only this test's prefix is deleted).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import fakeredis
import pytest
import redis
import redis.asyncio
from adapter_backends import AsyncTwin, Backend, delete_keys
from postgres_tables import postgres_store_factory

from docstore import (
    AsyncDocumentStore,
    AsyncMemoryDocumentStore,
    AsyncPostgresDocumentStore,
    MemoryDocumentStore,
)
from session.config import async_redis_client_from_url, redis_client_from_url

REAL_SERVERS = (pytest.mark.postgres, pytest.mark.redis)


@pytest.fixture(
    params=[
        "memory",
        pytest.param("embedded", marks=pytest.mark.embedded),
        pytest.param("real", marks=REAL_SERVERS),
    ]
)
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    yield from make_backend(request, request.param, asynchronous=False)


@pytest.fixture(
    params=[
        "memory",
        "memory-async",
        pytest.param("embedded", marks=pytest.mark.embedded),
        pytest.param("real", marks=REAL_SERVERS),
        pytest.param("real-async", marks=REAL_SERVERS),
    ]
)
def any_backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    kind, _, asynchronous = request.param.partition("-")
    yield from make_backend(request, kind, asynchronous=bool(asynchronous))


def make_backend(
    request: pytest.FixtureRequest, kind: str, *, asynchronous: bool
) -> Iterator[Backend]:
    prefix = f"t{uuid.uuid4().hex[:12]}:"
    if kind in ("memory", "embedded"):
        clients: list[redis.Redis] = []
        servers: dict[int, fakeredis.FakeServer] = {}

        def empty_fake() -> redis.Redis:
            server = fakeredis.FakeServer()
            client = fakeredis.FakeRedis(server=server)
            clients.append(client)
            servers[id(client)] = server
            return client

        try:
            if kind == "memory":
                documents = MemoryDocumentStore()

                def memory_twin(
                    cache: redis.Redis,
                ) -> tuple[AsyncDocumentStore, redis.asyncio.Redis]:
                    twin_cache: redis.asyncio.Redis = fakeredis.FakeAsyncRedis(
                        server=servers[id(cache)]
                    )
                    return AsyncMemoryDocumentStore(store=documents), twin_cache

                backend = Backend(
                    documents, empty_fake, prefix, twin=memory_twin if asynchronous else None
                )
                yield backend
                backend.close()
            else:
                assert not asynchronous, "the embedded server runs the sync store only"
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
            documents = make()
            table: str = documents._table_name  # type: ignore[attr-defined]  # noqa: SLF001

            def real_twin(_: redis.Redis) -> tuple[AsyncDocumentStore, redis.asyncio.Redis]:
                return (
                    AsyncPostgresDocumentStore(real_dsn, table=table),
                    async_redis_client_from_url(redis_url),
                )

            twin: AsyncTwin | None = real_twin if asynchronous else None
            backend = Backend(documents, flushed, prefix, twin=twin)
            yield backend
            backend.close()
    finally:
        delete_keys(client, prefix)
        client.close()


@pytest.fixture(scope="session")
def redis_url() -> str:
    from session.pytest_plugin import REDIS_VARIABLE, server_url

    return server_url(REDIS_VARIABLE, "real Redis server")
