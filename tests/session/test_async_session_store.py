"""`AsyncSessionStore`: the SessionStore contract suite against it, and what only asyncio has.

The contract classes here are configurations of tests/session/test_session_store.py
run with the asyncio store instead, one suite parametrized, not a copy: the
contract's stores are `AsyncSessionStore`s on the asyncio twin of the test's
docstore and Redis, driven through `SyncOverAsyncSessionStore` (an event loop
in a thread; the contract's threads become concurrent tasks). The contract
inspects and manipulates Redis and the docstore through the sync clients,
which share the server, the table and the key prefix with the async ones:
that also checks that both stores write the same keys and values.

A store a test builds on a docstore of its own (a `DocstoreProxy` that counts,
fails or holds calls) reaches it through `AsyncOverSyncDocumentStore` (worker
threads), so that its hooks may block without blocking the loop.

Configurations, to keep the suite's time modest: memory + fakeredis, memory
without a cache, PostgreSQL (embedded without service variables, the real
server with them) + fakeredis, and real PostgreSQL + real Redis (behind the
proxy an outage cuts). The private-server SCRIPT FLUSH tests and PostgreSQL
without a cache run for the sync store only: the protocol code they exercise
is the same, only the runner differs.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import fakeredis
import pytest
import redis
import redis.asyncio

# A module import: its Test classes must not be collected here a second time.
import test_session_store as sync_configurations
from contract.sync_over_async import (
    AsyncOverSyncDocumentStore,
    LoopThread,
    SyncOverAsyncSessionStore,
)
from faults.fault_redis import RedisProcess, redis_server_path
from postgres_tables import drop_tables

import docstore
from docstore import (
    AsyncDocumentStore,
    AsyncMemoryDocumentStore,
    AsyncPostgresDocumentStore,
    MemoryDocumentStore,
)
from session import (
    AsyncSessionStore,
    InvalidSessionData,
    SessionNotFound,
    StoreUnavailable,
    VersionConflict,
    get_async_session_store,
)
from session import config as session_config
from session.config import REDIS_SOCKET_TIMEOUT, async_redis_client_from_url
from session.pytest_plugin import POSTGRES_VARIABLE, unique_key_prefix

# -- the contract, against the asyncio store ----------------------------------------


class AsyncStoreContract:
    """Build the contract's stores as `AsyncSessionStore`s (see the module docstring).

    Mixed in before a sync configuration class, whose `cache` and `outage`
    fixtures stay: the test sees Redis through them.
    """

    @pytest.fixture
    def loop_thread(self) -> Iterator[LoopThread]:
        with LoopThread() as loop:
            yield loop

    @pytest.fixture
    def async_cache(self) -> redis.asyncio.Redis | None:
        raise NotImplementedError("a configuration provides `async_cache`")

    @pytest.fixture
    def async_session_docstore(
        self, session_docstore: docstore.DocumentStore
    ) -> AsyncDocumentStore:
        assert isinstance(session_docstore, MemoryDocumentStore)
        return AsyncMemoryDocumentStore(store=session_docstore)

    @pytest.fixture
    def make_store(
        self,
        session_docstore: docstore.DocumentStore,
        async_session_docstore: AsyncDocumentStore,
        async_cache: redis.asyncio.Redis | None,
        key_prefix: str,
        collections: tuple[str, str],
        loop_thread: LoopThread,
    ) -> Iterator[Callable[..., Any]]:
        stores: list[SyncOverAsyncSessionStore] = []
        wrappers: list[AsyncOverSyncDocumentStore] = []

        def make(*, docstore: Any = None, cache: Any = "default", **kwargs: Any) -> Any:
            documents: AsyncDocumentStore
            if docstore is None or docstore is session_docstore:
                documents = async_session_docstore
            else:
                documents = AsyncOverSyncDocumentStore(docstore)
                wrappers.append(documents)
            if cache != "default" and cache is not None:
                raise NotImplementedError("the contract passes cache=None only")
            store = SyncOverAsyncSessionStore(
                AsyncSessionStore(
                    documents,
                    async_cache if cache == "default" else None,
                    key_prefix=key_prefix,
                    sessions_collection=collections[0],
                    messages_collection=collections[1],
                    **kwargs,
                ),
                loop_thread,
            )
            stores.append(store)
            return store

        yield make
        for store in stores:
            store.close()
        for wrapper in wrappers:
            loop_thread.run(wrapper.aclose)
        if async_cache is not None:
            loop_thread.run(async_cache.aclose)


class AsyncFakeRedis:
    @pytest.fixture
    def async_cache(self, fake_server: fakeredis.FakeServer) -> redis.asyncio.Redis:
        client: redis.asyncio.Redis = fakeredis.FakeAsyncRedis(server=fake_server)
        return client


class AsyncRealRedis:
    @pytest.fixture
    def async_cache(self, redis_url: str, proxy: Any) -> redis.asyncio.Redis:
        parts = urlsplit(redis_url)
        userinfo, _, _ = parts.netloc.rpartition("@")
        netloc = f"{userinfo}@" if userinfo else ""
        proxied = urlunsplit(parts._replace(netloc=f"{netloc}{proxy.host}:{proxy.port}"))
        return async_redis_client_from_url(proxied)


# The memory configurations do not depend on the service variables: they run in
# the suite without them only (the suite with them would repeat them exactly).
if not os.environ.get(POSTGRES_VARIABLE):

    class TestAsyncFakeRedis(AsyncFakeRedis, AsyncStoreContract, sync_configurations.TestFakeRedis):
        pass

    class TestAsyncNoCache(AsyncStoreContract, sync_configurations.TestNoCache):
        @pytest.fixture
        def async_cache(self) -> None:
            return None


# The PostgreSQL configurations' module fixtures, as the sync classes have them.
embedded_postgres_docstore = sync_configurations.embedded_postgres_docstore
real_postgres_docstore = sync_configurations.real_postgres_docstore


def _async_twin(
    sync_store: docstore.DocumentStore, dsn: str, loop_thread: LoopThread
) -> Iterator[AsyncDocumentStore]:
    """Yield an asyncio store on the sync store's table; close it afterwards."""
    table = sync_store._table_name  # type: ignore[attr-defined]  # noqa: SLF001
    twin = AsyncPostgresDocumentStore(dsn, table=table, max_connections=20)
    try:
        yield twin
    finally:
        loop_thread.run(twin.aclose)


# One PostgreSQL configuration per suite mode: the embedded server and fakeredis
# without service variables, the real servers (Redis behind the proxy an outage
# cuts) with them. The message-window matrix is left out: it checks the paging
# arithmetic, which the memory configuration above runs through this same store.
if not os.environ.get(POSTGRES_VARIABLE):

    class TestAsyncPostgres(
        AsyncFakeRedis, AsyncStoreContract, sync_configurations.TestPostgresFakeRedis
    ):
        test_message_windows = None

        @pytest.fixture
        def session_docstore(
            self, embedded_postgres_docstore: docstore.DocumentStore
        ) -> docstore.DocumentStore:
            return embedded_postgres_docstore

        @pytest.fixture
        def async_session_docstore(
            self,
            embedded_postgres_docstore: docstore.DocumentStore,
            embedded_dsn: str,
            loop_thread: LoopThread,
        ) -> Iterator[AsyncDocumentStore]:
            yield from _async_twin(embedded_postgres_docstore, embedded_dsn, loop_thread)

else:

    @pytest.mark.postgres
    class TestAsyncPostgres(  # type: ignore[no-redef]
        AsyncRealRedis, AsyncStoreContract, sync_configurations.TestRealPostgresRealRedis
    ):
        test_message_windows = None

        @pytest.fixture
        def async_session_docstore(
            self,
            real_postgres_docstore: docstore.DocumentStore,
            real_dsn: str,
            loop_thread: LoopThread,
        ) -> Iterator[AsyncDocumentStore]:
            yield from _async_twin(real_postgres_docstore, real_dsn, loop_thread)


# -- what only the asyncio store has ---------------------------------------------------


def memory_store(**kwargs: Any) -> AsyncSessionStore:
    """Return an asyncio store on memory and an in-process fakeredis, built with no loop."""
    cache = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
    return AsyncSessionStore(
        AsyncMemoryDocumentStore(), cache, key_prefix=unique_key_prefix(), **kwargs
    )


@pytest.mark.no_real_servers
def test_building_needs_no_running_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REDIS_URL", raising=False)  # an in-process fakeredis
    with pytest.raises(RuntimeError):
        asyncio.get_running_loop()
    store = memory_store()
    built = get_async_session_store(docstore_url="memory://", key_prefix=unique_key_prefix())

    async def use() -> None:
        for each in (store, built):
            async with each:
                created = await each.create_session("alice", {"a": 1})
                assert await each.get_session(created.id) == created
                assert await each.get_session(created.id) == created
                assert each.stats()["hits"] == 1

    asyncio.run(use())


@pytest.mark.no_real_servers
def test_get_async_session_store_mirrors_get_session_store(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/0")
    store = get_async_session_store(docstore_url="memory://", cache_ttl=60, session_ttl=600)
    cache = store.cache
    assert isinstance(cache, redis.asyncio.Redis)
    kwargs = cache.connection_pool.connection_kwargs
    assert (kwargs["host"], kwargs["port"]) == ("127.0.0.1", 1)
    # The fail-fast settings of the sync factory's client.
    assert kwargs["socket_timeout"] == kwargs["socket_connect_timeout"] == REDIS_SOCKET_TIMEOUT
    assert kwargs["retry"].get_retries() == 1
    assert isinstance(store.document_store, AsyncMemoryDocumentStore)

    async def use() -> None:
        async with store:
            created = await store.create_session()
            # Redis unreachable: the docstore answers, the failure is counted.
            assert await store.get_session(created.id) == created
            assert store.stats()["cache_errors"] >= 1
            assert (await store.get_session(created.id)) is not None
            assert created.expires_at is not None

    asyncio.run(use())
    monkeypatch.delenv("REDIS_URL")
    in_process = get_async_session_store(docstore_url="memory://")
    assert isinstance(in_process.cache, fakeredis.FakeAsyncRedis)
    asyncio.run(in_process.aclose())


@pytest.mark.no_real_servers
def test_aclose_closes_only_what_the_store_owns() -> None:
    closed: list[str] = []

    class Documents(AsyncMemoryDocumentStore):
        async def aclose(self) -> None:
            closed.append("docstore")

    class Cache(fakeredis.FakeAsyncRedis):
        async def aclose(self, close_connection_pool: bool | None = None) -> None:
            closed.append("cache")

    async def use(owns: bool) -> None:
        store = AsyncSessionStore(
            Documents(),
            Cache(server=fakeredis.FakeServer()),
            owns_docstore=owns,
            owns_cache=owns,
        )
        async with store:
            await store.create_session()

    asyncio.run(use(owns=False))
    assert closed == []
    asyncio.run(use(owns=True))
    assert sorted(closed) == ["cache", "docstore"]


@pytest.mark.no_real_servers
def test_every_sync_method_is_a_coroutine_here_except_stats() -> None:
    from session import SessionStore

    public = {
        name
        for name in dir(SessionStore)
        if not name.startswith("_") and callable(getattr(SessionStore, name))
    }
    plain = {"stats", "add_counter_observer", "from_env", "close"}
    for name in public - plain:
        assert inspect.iscoroutinefunction(getattr(AsyncSessionStore, name)), name
        sync_args = inspect.signature(getattr(SessionStore, name)).parameters
        async_args = inspect.signature(getattr(AsyncSessionStore, name)).parameters
        assert list(sync_args) == list(async_args), name
    assert not inspect.iscoroutinefunction(AsyncSessionStore.stats)
    assert inspect.iscoroutinefunction(AsyncSessionStore.aclose)
    store = memory_store()
    assert isinstance(store.stats(), dict)
    assert store.stats()["hits"] == 0


@pytest.mark.no_real_servers
def test_errors_are_the_session_packages_own() -> None:
    class Failing(AsyncMemoryDocumentStore):
        async def update(self, *args: Any, **kwargs: Any) -> Any:
            raise docstore.StoreUnavailable("connection refused", outcome_unknown=True)

    async def use() -> None:
        async with memory_store() as store:
            created = await store.create_session()
            with pytest.raises(SessionNotFound):
                await store.update_session("no-such-id", {"a": 1})
            with pytest.raises(InvalidSessionData):
                await store.update_session(created.id, {"bad": {1, 2}})
            with pytest.raises(InvalidSessionData):
                await store.add_message(created.id, "user", 5)  # type: ignore[arg-type]
            with pytest.raises(VersionConflict):
                await store.update_session(created.id, {"a": 1}, expected_version=7)
            assert await store.get_session(created.id) == created
        failing = AsyncSessionStore(Failing(), fakeredis.FakeAsyncRedis())
        created = await failing.create_session()
        assert await failing.get_session(created.id) == created
        with pytest.raises(StoreUnavailable) as caught:
            await failing.update_session(created.id, {"a": 1})
        assert caught.value.outcome_unknown
        # The copy that may be stale is gone: the next read asks the docstore.
        assert await failing.get_session(created.id) == created
        assert failing.stats()["misses"] == 2

    asyncio.run(use())


def _run_watching_the_loop(
    calls: Callable[[AsyncSessionStore], Any], make_store: Callable[[], AsyncSessionStore]
) -> list[logging.LogRecord]:
    """Run `calls(store)` on a debug loop that reports steps over 20 ms; return the reports.

    A first run is not watched: it opens the connections and has Redis compile
    the scripts, once per process. Then up to three watched runs, until one
    is clean: a blocking call blocks in every run, while a loaded machine
    preempting the process now and then does not.
    """
    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "Executing" in record.getMessage() and "took" in record.getMessage():
                records.append(record)

    handler = Collect(logging.WARNING)
    asyncio_logger = logging.getLogger("asyncio")
    asyncio_logger.addHandler(handler)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        async with make_store() as store:
            loop.slow_callback_duration = 60.0
            await calls(store)
            for _ in range(3):
                records.clear()
                loop.slow_callback_duration = 0.02
                await calls(store)
                loop.slow_callback_duration = 60.0
                if not records:
                    break

    try:
        asyncio.run(main(), debug=True)
    finally:
        asyncio_logger.removeHandler(handler)
    return records


@pytest.fixture
def loop_redis_url(tmp_path: Path) -> Iterator[str]:
    """Return REDIS_URL, else the URL of a redis-server started for the test.

    A real server either way: an in-process fakeredis runs Redis itself on the loop.
    """
    url = os.environ.get("REDIS_URL")
    if url:
        yield url
        return
    if redis_server_path() is None:
        if os.environ.get("CI"):
            pytest.fail("CI is set but redis-server is not on PATH: this test must run")
        pytest.skip("redis-server is not on PATH (apt-get install redis-server)")
    server = RedisProcess(tmp_path / "redis").start()
    try:
        yield server.url
    finally:
        server.stop()


# Bounds how long a loop step takes: alone under pytest-xdist (tests/conftest.py).
@pytest.mark.serial
def test_no_call_blocks_the_event_loop(request: pytest.FixtureRequest, loop_redis_url: str) -> None:
    """Every call against real servers (PostgreSQL of the run): no loop step takes 20 ms."""
    real = bool(os.environ.get(POSTGRES_VARIABLE))
    dsn: str = request.getfixturevalue("real_dsn" if real else "embedded_dsn")
    table = f"async_loop_{unique_key_prefix().strip(':').replace('-', '_')}"
    prefix = unique_key_prefix()

    def make_store() -> AsyncSessionStore:
        return AsyncSessionStore(
            AsyncPostgresDocumentStore(dsn, table=table),
            async_redis_client_from_url(loop_redis_url),
            key_prefix=prefix,
            owns_docstore=True,
            owns_cache=True,
        )

    async def calls(store: AsyncSessionStore) -> None:
        created = await store.create_session("bob", {"a": 1})
        await store.get_session(created.id)
        await store.get_session(created.id)
        await store.update_session(created.id, {"b": 2})
        await store.add_message(created.id, "user", "hello")
        await store.get_messages(created.id)
        await store.get_messages(created.id, limit=1)
        await store.list_sessions("bob")
        await store.touch_session(created.id, ttl=60)
        rotated = await store.rotate_session_id(created.id)
        await store.delete_session(rotated.id)
        await store.purge_expired()

    try:
        assert _run_watching_the_loop(calls, make_store) == []
    finally:
        drop_tables(dsn, [table])
        with redis.Redis.from_url(loop_redis_url) as client:
            keys = list(client.scan_iter(match=f"{prefix}*"))
            if keys:
                client.delete(*keys)


def test_two_hundred_calls_in_flight_all_reach_redis(loop_redis_url: str) -> None:
    """A URL-built client has a connection for each of 200 calls in flight at once
    (redis.asyncio's default of 100 made half of them cache errors)."""
    cache = async_redis_client_from_url(loop_redis_url)
    assert cache.connection_pool.max_connections == session_config.ASYNC_POOL_CONNECTIONS

    async def main() -> dict[str, int]:
        prefix = unique_key_prefix()
        store = AsyncSessionStore(docstore.AsyncMemoryDocumentStore(), cache, key_prefix=prefix)
        async with store:
            created = [await store.create_session(data={"n": n}) for n in range(10)]
            for session in created:
                await store.get_session(session.id)  # cached
            # Open the connections first, on the client itself: 200 connects at
            # once on one loop may take longer than the 0.25 s connect timeout
            # (a cache error of their own, which would open the store's breaker).
            for _ in range(10):
                pings = await asyncio.gather(
                    *(cache.ping() for _ in range(200)), return_exceptions=True
                )
                if not any(isinstance(reply, BaseException) for reply in pings):
                    break
            before = store.stats()
            found = await asyncio.gather(
                *(store.get_session(created[n % 10].id) for n in range(200))
            )
            assert [s.data["n"] if s else None for s in found] == [n % 10 for n in range(200)]
            for session in created:
                await store.delete_session(session.id)
            after = store.stats()
        async for key in cache.scan_iter(match=f"{prefix}*"):  # the tombstones
            await cache.delete(key)
        await cache.aclose()
        return {name: after[name] - before[name] for name in ("hits", "cache_errors")}

    assert asyncio.run(main()) == {"hits": 200, "cache_errors": 0}
