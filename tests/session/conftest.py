"""Fixtures of the session tests: the docstore underneath, and the real Redis server.

`session_docstore` is the DocumentStore every SessionStore under test is built
on. It is a memory store here; a conftest closer to the tests (or a
parametrization of this fixture) can hand in a PostgreSQL-backed store instead:
every test works in its own uniquely named collections and removes them.

`redis_url` is the server named by REDIS_URL. Unset, the tests that need it are
skipped, except when CI is set: then they fail, so that CI can never pass
without having run them.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from docstore import DocumentStore, MemoryDocumentStore
from session import SessionStore
from session.pytest_plugin import REDIS_VARIABLE, server_url


@pytest.fixture
def session_docstore() -> Iterator[DocumentStore]:
    store = MemoryDocumentStore()
    yield store
    store.close()


@pytest.fixture(scope="session")
def redis_url() -> str:
    return server_url(REDIS_VARIABLE, "real Redis server")


@pytest.fixture(params=["fakeredis", "real"])
def client(request: pytest.FixtureRequest) -> redis.Redis:
    """A client of fakeredis, then of the server named by REDIS_URL (skipped when unset)."""
    if request.param == "real":
        return request.getfixturevalue("real_redis")  # type: ignore[no-any-return]
    return request.getfixturevalue("fake_redis")  # type: ignore[no-any-return]


@pytest.fixture
def store(client: redis.Redis, session_key_prefix: str) -> Iterator[SessionStore]:
    """A SessionStore on a memory docstore and `client`, closed afterwards."""
    with SessionStore(MemoryDocumentStore(), client, key_prefix=session_key_prefix) as store:
        yield store
