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
from collections.abc import Iterator

import fakeredis
import pytest
import redis
from adapter_backends import Backend, delete_keys
from postgres_tables import postgres_store_factory

from docstore import MemoryDocumentStore
from session.config import redis_client_from_url

REAL_SERVERS = (pytest.mark.postgres, pytest.mark.redis)


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
