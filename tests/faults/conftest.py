"""Fixtures of the fault suite: private redis-server processes, proxies, the embedded server.

Every test here starts its own `redis-server` on a free loopback port (and
signals only that process, by pid) and reaches it and PostgreSQL through a
`FaultProxy` it can partition and cut. PostgreSQL is the embedded server of
the test session (`embedded_dsn`), so the suite runs alike with and without
the service variables. Without `redis-server` on PATH the tests are skipped,
except when CI is set: then they fail.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from fault_async import AsyncReader
from fault_proxy import FaultProxy, socket_path, tcp_dsn
from fault_redis import RedisProcess, redis_server_path
from fault_summary import FaultSummary
from postgres_tables import drop_tables, unique_table

from docstore import PostgresDocumentStore
from session import SessionStore
from session.config import redis_client_from_url

_SUMMARY = pytest.StashKey[FaultSummary]()


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    summary = config.stash.get(_SUMMARY, None)
    if summary is None:
        return
    terminalreporter.section("fault-injection summary")
    for line in summary.lines():
        terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def fault_summary(request: pytest.FixtureRequest) -> FaultSummary:
    return request.config.stash.setdefault(_SUMMARY, FaultSummary())


@pytest.fixture(scope="session")
def redis_server_available() -> None:
    if redis_server_path() is not None:
        return
    if os.environ.get("CI"):
        pytest.fail("CI is set but redis-server is not on PATH: the fault tests must run")
    pytest.skip("redis-server is not on PATH (apt-get install redis-server)")


@pytest.fixture
def redis_process(redis_server_available: None, tmp_path: Path) -> Iterator[RedisProcess]:
    server = RedisProcess(tmp_path / "redis", appendonly=True).start()
    yield server
    server.stop()


@pytest.fixture
def redis_proxy(redis_process: RedisProcess) -> Iterator[FaultProxy]:
    with FaultProxy(("127.0.0.1", redis_process.port)) as proxy:
        yield proxy


@pytest.fixture
def pg_proxy(embedded_dsn: str) -> Iterator[FaultProxy]:
    with FaultProxy(socket_path(embedded_dsn)) as proxy:
        yield proxy


@pytest.fixture
def pg_table(embedded_dsn: str) -> Iterator[str]:
    table = unique_table()
    yield table
    drop_tables(embedded_dsn, [table])


@pytest.fixture
def make_docstore(
    embedded_dsn: str, pg_proxy: FaultProxy, pg_table: str
) -> Iterator[Callable[..., PostgresDocumentStore]]:
    """Docstores on one table through the proxy (or directly, `proxied=False`).

    `dsn_extra` appends libpq key=value parameters to the DSN.
    """
    stores: list[PostgresDocumentStore] = []

    def make(*, proxied: bool = True, dsn_extra: str = "", **kwargs: Any) -> PostgresDocumentStore:
        dsn = tcp_dsn(embedded_dsn, pg_proxy.port) if proxied else embedded_dsn
        dsn = f"{dsn} {dsn_extra}".strip()
        kwargs.setdefault("connect_timeout", 1)
        store = PostgresDocumentStore(dsn, table=pg_table, **kwargs)
        stores.append(store)
        return store

    yield make
    for store in stores:
        store.close()


@pytest.fixture
def key_prefix() -> str:
    return f"f{uuid.uuid4().hex[:10]}:"


@pytest.fixture
def make_session_store(
    make_docstore: Callable[..., PostgresDocumentStore],
    redis_process: RedisProcess,
    redis_proxy: FaultProxy,
    key_prefix: str,
) -> Iterator[Callable[..., SessionStore]]:
    """Session stores on the proxied docstore and the proxied private Redis.

    The Redis client is the library's own fail-fast client (default settings).
    `cached=False` gives a store without a cache: PostgreSQL's truth;
    `proxied=False` one that reaches Redis directly.
    """
    clients: list[redis.Redis] = []

    def make(
        *, cached: bool = True, proxied: bool = True, docstore: Any = None, **kwargs: Any
    ) -> SessionStore:
        cache = None
        if cached:
            port = redis_proxy.port if proxied else redis_process.port
            cache = redis_client_from_url(f"redis://127.0.0.1:{port}/0")
            clients.append(cache)
        kwargs.setdefault("key_prefix", key_prefix)
        return SessionStore(docstore if docstore is not None else make_docstore(), cache, **kwargs)

    yield make
    for client in clients:
        client.close()


@pytest.fixture
def make_async_reader(
    embedded_dsn: str,
    pg_proxy: FaultProxy,
    pg_table: str,
    redis_proxy: FaultProxy,
    key_prefix: str,
) -> Iterator[Callable[[], AsyncReader]]:
    """asyncio readers through the same proxies as `make_session_store`'s stores."""
    readers: list[AsyncReader] = []

    def make() -> AsyncReader:
        reader = AsyncReader(
            tcp_dsn(embedded_dsn, pg_proxy.port),
            pg_table,
            f"redis://127.0.0.1:{redis_proxy.port}/0",
            key_prefix,
        )
        readers.append(reader)
        return reader

    yield make
    for reader in readers:
        reader.close()
