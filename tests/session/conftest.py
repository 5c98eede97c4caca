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

from docstore import DocumentStore, MemoryDocumentStore
from session.pytest_plugin import REDIS_VARIABLE, server_url


@pytest.fixture
def session_docstore() -> Iterator[DocumentStore]:
    store = MemoryDocumentStore()
    yield store
    store.close()


@pytest.fixture(scope="session")
def redis_url() -> str:
    return server_url(REDIS_VARIABLE, "real Redis server")
