"""Pytest fixtures for code that uses `session`, installed with the package (`pytest11`).

In-process, nothing to set up:

- `docstore_memory`: a `MemoryDocumentStore`.
- `fake_redis`: a `fakeredis.FakeRedis` on a server of its own (needs
  `fakeredis[lua]`), so no two tests share a cache.
- `session_store`: a `SessionStore` on those two.

Real servers, named by the same variables `get_session_store()` reads:

- `postgres_url` / `redis_server_url`: `$POSTGRES_CONNECTION_STRING` / `$REDIS_URL`.
- `postgres_table`: a table name no other test uses (`t_<run tag><hex>`).
- `postgres_docstore`: a `PostgresDocumentStore` on `postgres_table`; afterwards
  the table and its `<table>_meta` companion are dropped.
- `session_key_prefix`: a Redis key prefix of its own (`t<run tag><hex>:`).
- `real_redis`: the fail-fast client `get_session_store()` would build;
  afterwards it deletes the keys under `session_key_prefix`, nothing else.
- `real_session_store`: a `SessionStore` on `postgres_docstore` and `real_redis`.

For asyncio, the same under `async_` names (an `AsyncSessionStore` and the
asyncio clients under it, each closed with `await ...aclose()` afterwards):

- `async_docstore_memory`, `async_fake_redis` (a `fakeredis.FakeAsyncRedis` on a
  server of its own), `async_session_store` on those two;
- `async_postgres_docstore`, `async_real_redis`, `async_real_session_store`: as
  their sync namesakes, on `postgres_table` and `session_key_prefix`.

They work with pytest-asyncio (strict or auto mode) and with anyio's pytest
plugin (`@pytest.mark.anyio`, asyncio backend): each is set up and torn down in
the event loop its test runs in. Under pytest-asyncio that is the loop of
`asyncio_default_fixture_loop_scope`, so it must be the tests' loop scope too
(`function`, unless the project runs its tests in a wider loop).

A test that needs a real server whose variable is unset is skipped with the
reason, except when the environment variable `CI` is set: there it fails, so
that a CI run cannot pass without having run it. Nothing is read from the
environment or connected at import time; `session` and `docstore` are
imported when a fixture first runs.

Unique names carry the run tag from `$DOCSTORE_SESSION_TEST_RUN` (8 hex
digits; empty when unset), so that a test run can tell the tables and keys it
created from those of runs going on at the same time (`unique_table_name`,
`unique_key_prefix`, `run_table_pattern`, `run_key_pattern`).
"""

from __future__ import annotations

import asyncio
import os
import re
import types
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest

try:
    import pytest_asyncio
except ImportError:  # anyio's plugin alone runs the async fixtures then
    pytest_asyncio = None  # type: ignore[assignment]

if TYPE_CHECKING:
    import redis
    import redis.asyncio

    from docstore import (
        AsyncMemoryDocumentStore,
        AsyncPostgresDocumentStore,
        MemoryDocumentStore,
        PostgresDocumentStore,
    )
    from session import AsyncSessionStore, SessionStore

__all__ = [
    "POSTGRES_VARIABLE",
    "REDIS_VARIABLE",
    "RUN_VARIABLE",
    "server_url",
    "run_tag",
    "unique_table_name",
    "unique_key_prefix",
    "run_table_pattern",
    "run_key_pattern",
    "drop_postgres_tables",
    "docstore_memory",
    "fake_redis",
    "session_store",
    "postgres_url",
    "redis_server_url",
    "postgres_table",
    "postgres_docstore",
    "session_key_prefix",
    "real_redis",
    "real_session_store",
    "async_docstore_memory",
    "async_fake_redis",
    "async_session_store",
    "async_postgres_docstore",
    "async_real_redis",
    "async_real_session_store",
]

POSTGRES_VARIABLE = "POSTGRES_CONNECTION_STRING"
REDIS_VARIABLE = "REDIS_URL"
RUN_VARIABLE = "DOCSTORE_SESSION_TEST_RUN"
_RUN_TAG = re.compile(r"[0-9a-f]{8}")


def server_url(variable: str, what: str) -> str:
    """Return `$variable`; skip the test when it is unset, or fail it when `CI` is set."""
    url = os.environ.get(variable)
    if url:
        return url
    if os.environ.get("CI"):
        pytest.fail(f"CI is set but {variable} is not: the tests that need {what} must run")
    pytest.skip(f"{variable} is not set: no {what} to test against")


def run_tag() -> str:
    """Return this test run's tag (`$DOCSTORE_SESSION_TEST_RUN`, 8 hex digits), or ""."""
    tag = os.environ.get(RUN_VARIABLE, "")
    return tag if _RUN_TAG.fullmatch(tag) else ""


def unique_table_name() -> str:
    """Return a table name no other test uses, tagged with the run (at most 34 characters)."""
    tag = run_tag()
    return f"t_{tag}_{uuid.uuid4().hex[:23]}" if tag else f"t_{uuid.uuid4().hex}"


def unique_key_prefix() -> str:
    """Return a Redis key prefix no other test uses, tagged with the run."""
    tag = run_tag()
    return f"t{tag}_{uuid.uuid4().hex[:12]}:" if tag else f"t{uuid.uuid4().hex[:12]}:"


def run_table_pattern(tag: str) -> str:
    """Return the SQL LIKE pattern of the tables named by `unique_table_name` in run `tag`."""
    return f"t\\_{tag}\\_%"


def run_key_pattern(tag: str) -> str:
    """Return the SCAN MATCH pattern of the keys under `unique_key_prefix`es of run `tag`."""
    return f"t{tag}_*"


def drop_postgres_tables(dsn: str, tables: list[str]) -> None:
    """Drop these document tables and their `<table>_meta` companions, if they exist."""
    if not tables:
        return
    import psycopg2
    from psycopg2 import sql

    conn = psycopg2.connect(dsn, connect_timeout=10)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            for table in tables:
                for name in (table, f"{table}_meta"):
                    cur.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(name)))
    finally:
        conn.close()


# --------------------------------------------------------------------------- in-process


@pytest.fixture
def docstore_memory() -> Iterator[MemoryDocumentStore]:
    """Return an empty in-memory document store."""
    from docstore import MemoryDocumentStore

    store = MemoryDocumentStore()
    yield store
    store.close()


@pytest.fixture
def fake_redis() -> Iterator[redis.Redis]:
    """Return a fakeredis client on a server of its own (empty, private to the test)."""
    try:
        import fakeredis
    except ImportError:
        # An error, not a skip: a missing test dependency must not pass as green.
        pytest.fail("fake_redis needs fakeredis: pip install 'fakeredis[lua]'", pytrace=False)
    client: redis.Redis = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    yield client
    client.close()


@pytest.fixture
def session_store(
    docstore_memory: MemoryDocumentStore, fake_redis: redis.Redis
) -> Iterator[SessionStore]:
    """Return a SessionStore on `docstore_memory` and `fake_redis`."""
    from session import SessionStore

    store = SessionStore(docstore_memory, fake_redis)
    yield store
    store.close()


# --------------------------------------------------------------------------- real servers


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """Return `$POSTGRES_CONNECTION_STRING` (skip, or fail under CI, when unset)."""
    return server_url(POSTGRES_VARIABLE, "PostgreSQL server")


@pytest.fixture(scope="session")
def redis_server_url() -> str:
    """Return `$REDIS_URL` (skip, or fail under CI, when unset)."""
    return server_url(REDIS_VARIABLE, "Redis server")


@pytest.fixture
def postgres_table() -> str:
    """Return a table name no other test uses."""
    return unique_table_name()


@pytest.fixture
def postgres_docstore(postgres_url: str, postgres_table: str) -> Iterator[PostgresDocumentStore]:
    """Return a PostgresDocumentStore on `postgres_table`; drop its tables afterwards."""
    from docstore import PostgresDocumentStore

    store = PostgresDocumentStore(postgres_url, table=postgres_table)
    try:
        yield store
    finally:
        store.close()
        drop_postgres_tables(postgres_url, [postgres_table])


@pytest.fixture
def session_key_prefix() -> str:
    """Return a Redis key prefix no other test uses."""
    return unique_key_prefix()


@pytest.fixture
def real_redis(redis_server_url: str, session_key_prefix: str) -> Iterator[redis.Redis]:
    """Return a client of `$REDIS_URL`; afterwards delete the keys under `session_key_prefix`."""
    from session.config import redis_client_from_url

    client = redis_client_from_url(redis_server_url)
    try:
        yield client
    finally:
        try:
            # Only this test's keys: never FLUSHDB a server others may share.
            keys = list(client.scan_iter(match=f"{session_key_prefix}*", count=1000))
            if keys:
                client.delete(*keys)
        finally:
            client.close()


@pytest.fixture
def real_session_store(
    postgres_docstore: PostgresDocumentStore, real_redis: redis.Redis, session_key_prefix: str
) -> Iterator[SessionStore]:
    """Return a SessionStore on `postgres_docstore` and `real_redis`, under `session_key_prefix`."""
    from session import SessionStore

    store = SessionStore(postgres_docstore, real_redis, key_prefix=session_key_prefix)
    yield store
    store.close()


# --------------------------------------------------------------------------- asyncio
#
# An async fixture must run in the loop of its test: the clients it builds
# bind to the loop of their first call, and `aclose()` must run there too.
# pytest-asyncio runs only the fixtures it marked (strict mode), anyio's plugin
# only plain async fixtures of tests that use `anyio_backend`. So each async
# fixture below exists twice, as a private fixture for each runner, and its
# public name is a plain fixture that picks the one of its test's runner.

_ANYIO = "anyio"
_ASYNCIO = "asyncio"


def _pytest_asyncio_mode(config: pytest.Config) -> str | None:
    """Return pytest-asyncio's mode ("strict" or "auto"), or None when it is not running."""
    if pytest_asyncio is None or not config.pluginmanager.has_plugin("asyncio"):
        return None
    mode = config.getoption("asyncio_mode", None) or config.getini("asyncio_mode")
    return str(mode)


def _runner_neutral(implementation: Callable[..., AsyncIterator[Any]]) -> tuple[Any, Any, Any]:
    """Return (the public fixture, its anyio twin, its pytest-asyncio twin or None).

    `implementation` is named `_<name>`; the public fixture is `<name>`, the
    twins `_<name>_anyio` and `_<name>_asyncio` (the latter only with
    pytest-asyncio installed), each a copy of the implementation, since
    pytest-asyncio marks the function it decorates.
    """
    name = implementation.__name__.removeprefix("_")

    def twin(runner: str) -> Callable[..., AsyncIterator[Any]]:
        function = types.FunctionType(
            implementation.__code__,
            implementation.__globals__,
            f"_{name}_{runner}",
            implementation.__defaults__,
            implementation.__closure__,
        )
        function.__doc__ = implementation.__doc__
        function.__annotations__ = implementation.__annotations__
        return function

    anyio_twin = pytest.fixture(name=f"_{name}_{_ANYIO}")(twin(_ANYIO))
    asyncio_twin = None
    if pytest_asyncio is not None:
        asyncio_twin = pytest_asyncio.fixture(name=f"_{name}_{_ASYNCIO}")(twin(_ASYNCIO))

    def public(request: pytest.FixtureRequest) -> Any:
        asyncio_mode = _pytest_asyncio_mode(request.config)
        if "anyio_backend" in request.fixturenames:
            backend = request.getfixturevalue("anyio_backend_name")
            if backend != "asyncio":
                pytest.fail(f"{name} needs anyio's asyncio backend, not {backend!r}", pytrace=False)
            if asyncio_mode == "auto":
                # pytest-asyncio would run the fixture in its own loop, not the test's.
                pytest.fail(
                    f"{name} in an anyio test needs pytest-asyncio in strict mode "
                    "(asyncio_mode = strict): its auto mode takes every async fixture",
                    pytrace=False,
                )
            return request.getfixturevalue(f"_{name}_{_ANYIO}")
        if asyncio_mode is None:
            pytest.fail(
                f"{name} is an async fixture: use it in a test run by pytest-asyncio "
                "(pip install pytest-asyncio) or by anyio's plugin (@pytest.mark.anyio)",
                pytrace=False,
            )
        return request.getfixturevalue(f"_{name}_{_ASYNCIO}")

    public.__name__ = public.__qualname__ = name
    public.__doc__ = implementation.__doc__
    return pytest.fixture(name=name)(public), anyio_twin, asyncio_twin


async def _async_docstore_memory() -> AsyncIterator[AsyncMemoryDocumentStore]:
    """Return an empty asyncio in-memory document store."""
    from docstore import AsyncMemoryDocumentStore

    store = AsyncMemoryDocumentStore()
    yield store
    await store.aclose()


async def _async_fake_redis() -> AsyncIterator[redis.asyncio.Redis]:
    """Return a fakeredis asyncio client on a server of its own (empty, private to the test)."""
    try:
        import fakeredis
    except ImportError:
        pytest.fail("async_fake_redis needs fakeredis: pip install 'fakeredis[lua]'", pytrace=False)
    client: redis.asyncio.Redis = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
    yield client
    await client.aclose()


async def _async_session_store(
    async_docstore_memory: AsyncMemoryDocumentStore, async_fake_redis: redis.asyncio.Redis
) -> AsyncIterator[AsyncSessionStore]:
    """Return an AsyncSessionStore on `async_docstore_memory` and `async_fake_redis`."""
    from session import AsyncSessionStore

    store = AsyncSessionStore(async_docstore_memory, async_fake_redis)
    yield store
    await store.aclose()


async def _async_postgres_docstore(
    postgres_url: str, postgres_table: str
) -> AsyncIterator[AsyncPostgresDocumentStore]:
    """Return an AsyncPostgresDocumentStore on `postgres_table`; drop its tables afterwards."""
    from docstore import AsyncPostgresDocumentStore

    store = AsyncPostgresDocumentStore(postgres_url, table=postgres_table)
    try:
        yield store
    finally:
        try:
            await store.aclose()
        finally:
            # psycopg2 blocks: keep it off the loop, which other fixtures may still use.
            await asyncio.to_thread(drop_postgres_tables, postgres_url, [postgres_table])


async def _async_real_redis(
    redis_server_url: str, session_key_prefix: str
) -> AsyncIterator[redis.asyncio.Redis]:
    """Return an asyncio client of `$REDIS_URL`; afterwards delete the keys under the prefix."""
    from session.config import async_redis_client_from_url

    client = async_redis_client_from_url(redis_server_url)
    try:
        yield client
    finally:
        try:
            # Only this test's keys: never FLUSHDB a server others may share.
            keys = [key async for key in client.scan_iter(match=f"{session_key_prefix}*")]
            if keys:
                await client.delete(*keys)
        finally:
            await client.aclose()


async def _async_real_session_store(
    async_postgres_docstore: AsyncPostgresDocumentStore,
    async_real_redis: redis.asyncio.Redis,
    session_key_prefix: str,
) -> AsyncIterator[AsyncSessionStore]:
    """Return an AsyncSessionStore on the real servers, under `session_key_prefix`."""
    from session import AsyncSessionStore

    store = AsyncSessionStore(
        async_postgres_docstore, async_real_redis, key_prefix=session_key_prefix
    )
    yield store
    await store.aclose()


async_docstore_memory, _async_docstore_memory_anyio, _async_docstore_memory_asyncio = (
    _runner_neutral(_async_docstore_memory)
)
async_fake_redis, _async_fake_redis_anyio, _async_fake_redis_asyncio = _runner_neutral(
    _async_fake_redis
)
async_session_store, _async_session_store_anyio, _async_session_store_asyncio = _runner_neutral(
    _async_session_store
)
async_postgres_docstore, _async_postgres_docstore_anyio, _async_postgres_docstore_asyncio = (
    _runner_neutral(_async_postgres_docstore)
)
async_real_redis, _async_real_redis_anyio, _async_real_redis_asyncio = _runner_neutral(
    _async_real_redis
)
async_real_session_store, _async_real_session_store_anyio, _async_real_session_store_asyncio = (
    _runner_neutral(_async_real_session_store)
)
