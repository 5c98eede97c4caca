"""The SessionStore contract against each cache configuration.

- `TestFakeRedis`: an in-process fakeredis server per test (Lua through lupa);
  an outage is the server's `connected = False`.
- `TestNoCache`: no Redis at all; every read goes to the docstore.
- `TestRealRedis`: the server named by REDIS_URL, reached through a TCP proxy
  that a test can cut, with the fail-fast client `get_session_store` builds.
- `TestPrivateRedisServer`: a redis-server the class starts, for the tests a
  shared server must not see (SCRIPT FLUSH).
- `TestPostgresFakeRedis`, `TestPostgresNoCache`: fakeredis, and no cache, on
  PostgreSQL: the server named by POSTGRES_CONNECTION_STRING when it is set,
  else the embedded one.
- `TestRealPostgresRealRedis`: the real-Redis configuration on the PostgreSQL
  server named by POSTGRES_CONNECTION_STRING.

Every test of the PostgreSQL-backed classes gets a store on a table of its own
(dropped afterwards). A table shared by many tests piles up the indexes each
test's collections get, and planning every query over a thousand of them made
the later tests many times slower than the first.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import fakeredis
import pytest
import redis
from contract.session_contract import Outage, SessionStoreContract
from faults.fault_redis import RedisProcess, redis_server_path
from postgres_tables import postgres_store_factory
from tcp_proxy import TcpProxy

from docstore import DocumentStore
from session import SessionStore
from session.config import REDIS_SOCKET_TIMEOUT, redis_client_from_url
from session.pytest_plugin import POSTGRES_VARIABLE

# Seconds no call may take while a server is failing (README, reliability).
MAX_CALL_UNDER_A_FAULT = 2.0
assert REDIS_SOCKET_TIMEOUT * 4 <= MAX_CALL_UNDER_A_FAULT  # room for a loaded machine


class FakeServerOutage:
    def __init__(self, server: fakeredis.FakeServer) -> None:
        self._server = server

    def down(self) -> None:
        self._server.connected = False

    def up(self) -> None:
        self._server.connected = True


class ProxyOutage:
    def __init__(self, proxy: TcpProxy) -> None:
        self._proxy = proxy

    def down(self) -> None:
        self._proxy.cut()

    def up(self) -> None:
        self._proxy.resume()


class TestFakeRedis(SessionStoreContract):
    @pytest.fixture
    def fake_server(self) -> fakeredis.FakeServer:
        return fakeredis.FakeServer()

    @pytest.fixture
    def cache(self, fake_server: fakeredis.FakeServer) -> Iterator[redis.Redis]:
        client = fakeredis.FakeRedis(server=fake_server)
        yield client
        client.close()

    @pytest.fixture
    def outage(self, fake_server: fakeredis.FakeServer) -> Outage:
        return FakeServerOutage(fake_server)


class TestNoCache(SessionStoreContract):
    # Tests about the cache (`needs_cache`, `needs_outage`) do not apply: they are
    # deselected here (tests/conftest.py) rather than skipped.
    has_cache = False

    @pytest.fixture
    def cache(self) -> None:
        return None


@pytest.mark.redis
class TestRealRedis(SessionStoreContract):
    # The Redis server is shared (other tests, other users): tests marked
    # `flushes_redis_scripts` are deselected here (tests/conftest.py).
    shares_redis_server = True

    @pytest.fixture
    def proxy(self, redis_url: str) -> Iterator[TcpProxy]:
        parts = urlsplit(redis_url)
        with TcpProxy((parts.hostname or "127.0.0.1", parts.port or 6379)) as proxy:
            yield proxy

    @pytest.fixture
    def cache(self, redis_url: str, proxy: TcpProxy) -> Iterator[redis.Redis]:
        parts = urlsplit(redis_url)
        userinfo, _, _ = parts.netloc.rpartition("@")
        netloc = f"{userinfo}@" if userinfo else ""
        proxied = urlunsplit(parts._replace(netloc=f"{netloc}{proxy.host}:{proxy.port}"))
        client = redis_client_from_url(proxied)
        yield client
        client.close()

    @pytest.fixture
    def outage(self, proxy: TcpProxy) -> Outage:
        return ProxyOutage(proxy)

    @pytest.fixture
    def cleanup_cache(self, redis_url: str) -> Iterator[redis.Redis]:
        # Straight to the server: a test failing with its proxy cut still cleans up.
        client = redis_client_from_url(redis_url)
        yield client
        client.close()

    def test_stalled_redis_never_stalls_a_call_for_long(
        self, make_store: Callable[..., SessionStore], proxy: TcpProxy
    ) -> None:
        store = make_store(breaker_threshold=3)
        created = store.create_session(data={"a": 1})
        store.get_session(created.id)
        store.stats()  # reads the fill's reply, left unread by the miss, before the stall
        proxy.stall()
        try:
            for _ in range(6):
                started = time.monotonic()
                assert store.get_session(created.id) == created
                # The promise: no call under a fault takes longer than 2 s (one
                # socket timeout, REDIS_SOCKET_TIMEOUT, is what it costs unloaded).
                assert time.monotonic() - started < MAX_CALL_UNDER_A_FAULT
            stats = store.stats()
            assert stats["cache_errors"] == 3
            assert stats["cache_skipped"] == 3
        finally:
            proxy.resume()


class TestPrivateRedisServer(SessionStoreContract):
    """The tests a shared Redis must not see (SCRIPT FLUSH), on a redis-server of their own.

    Only the tests marked `flushes_redis_scripts` run here (tests/conftest.py);
    the rest of the contract already runs on the shared server.
    """

    only_flushes_redis_scripts = True

    @pytest.fixture
    def redis_process(self, tmp_path: Path) -> Iterator[RedisProcess]:
        if redis_server_path() is None:
            if os.environ.get("CI"):
                pytest.fail("CI is set but redis-server is not on PATH: these tests must run")
            pytest.skip("redis-server is not on PATH (apt-get install redis-server)")
        server = RedisProcess(tmp_path / "redis").start()
        yield server
        server.stop()

    @pytest.fixture
    def cache(self, redis_process: RedisProcess) -> Iterator[redis.Redis]:
        client = redis_client_from_url(redis_process.url)
        yield client
        client.close()


# The contract's concurrency tests run a few stores with several threads each.
_POOL_SIZE = 20


@pytest.fixture
def embedded_postgres_docstore(embedded_dsn: str) -> Iterator[DocumentStore]:
    with postgres_store_factory(embedded_dsn) as make:
        yield make(max_connections=_POOL_SIZE)


@pytest.fixture
def real_postgres_docstore(real_dsn: str) -> Iterator[DocumentStore]:
    with postgres_store_factory(real_dsn) as make:
        yield make(max_connections=_POOL_SIZE)


@pytest.fixture
def postgres_docstore_of_the_run(request: pytest.FixtureRequest) -> DocumentStore:
    """Return the real server's store when POSTGRES_CONNECTION_STRING names one, else the embedded.

    The configurations on it run once per suite mode at no extra cost: on the
    embedded server without service variables, on the real one with them.
    """
    if os.environ.get(POSTGRES_VARIABLE):
        store: DocumentStore = request.getfixturevalue("real_postgres_docstore")
    else:
        store = request.getfixturevalue("embedded_postgres_docstore")
    return store


class TestPostgresFakeRedis(TestFakeRedis):
    @pytest.fixture
    def session_docstore(self, postgres_docstore_of_the_run: DocumentStore) -> DocumentStore:
        return postgres_docstore_of_the_run


class TestPostgresNoCache(TestNoCache):
    @pytest.fixture
    def session_docstore(self, postgres_docstore_of_the_run: DocumentStore) -> DocumentStore:
        return postgres_docstore_of_the_run


@pytest.mark.postgres
class TestRealPostgresRealRedis(TestRealRedis):
    @pytest.fixture
    def session_docstore(self, real_postgres_docstore: DocumentStore) -> DocumentStore:
        return real_postgres_docstore
