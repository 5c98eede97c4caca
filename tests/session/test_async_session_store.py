"""The SessionStore contract suite against `AsyncSessionStore`, one suite parametrized.

Each class here is a configuration of tests/session/test_session_store.py run
with the asyncio store instead: the contract's stores are built as
`AsyncSessionStore`s on the asyncio twin of the test's docstore and Redis,
driven through `SyncOverAsyncSessionStore` (an event loop in a thread; the
contract's threads become concurrent tasks). The contract inspects and
manipulates Redis and the docstore through the sync clients, which share the
server, the table and the key prefix with the async ones: that also checks
that both stores write the same keys and values.

A store a test builds on a docstore wrapper of its own (a `DocstoreProxy`)
reaches it through `AsyncOverSyncDocumentStore` (worker threads), so the
wrapper's hooks may block without blocking the loop.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import fakeredis
import pytest
import redis
import redis.asyncio

# A module import: its Test classes must not be collected here a second time.
import test_session_store as sync_configurations
from contract.session_contract import SessionStoreContract
from contract.sync_over_async import (
    AsyncOverSyncDocumentStore,
    LoopThread,
    SyncOverAsyncSessionStore,
)

import docstore
from docstore import (
    AsyncDocumentStore,
    AsyncMemoryDocumentStore,
    AsyncPostgresDocumentStore,
    MemoryDocumentStore,
)
from session import AsyncSessionStore
from session.config import async_redis_client_from_url


class AsyncStoreContract(SessionStoreContract):
    """Build the contract's stores as `AsyncSessionStore`s (see the module docstring)."""

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
        if isinstance(session_docstore, MemoryDocumentStore):
            return AsyncMemoryDocumentStore(store=session_docstore)
        raise NotImplementedError("a PostgreSQL configuration provides `async_session_docstore`")

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

        def make(*, docstore: Any = None, cache: Any = "default", **kwargs: Any) -> Any:
            if docstore is None or docstore is session_docstore:
                documents: AsyncDocumentStore = async_session_docstore
            else:
                documents = AsyncOverSyncDocumentStore(docstore)
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


class AsyncFakeRedis:
    @pytest.fixture
    def async_cache(self, fake_server: fakeredis.FakeServer) -> redis.asyncio.Redis:
        client: redis.asyncio.Redis = fakeredis.FakeAsyncRedis(server=fake_server)
        return client


class TestAsyncFakeRedis(AsyncFakeRedis, AsyncStoreContract, sync_configurations.TestFakeRedis):
    pass


class TestAsyncNoCache(AsyncStoreContract, sync_configurations.TestNoCache):
    @pytest.fixture
    def async_cache(self) -> None:
        return None


class AsyncRealRedis:
    @pytest.fixture
    def async_cache(self, redis_url: str, proxy: Any) -> redis.asyncio.Redis:
        parts = urlsplit(redis_url)
        userinfo, _, _ = parts.netloc.rpartition("@")
        netloc = f"{userinfo}@" if userinfo else ""
        proxied = urlunsplit(parts._replace(netloc=f"{netloc}{proxy.host}:{proxy.port}"))
        return async_redis_client_from_url(proxied)


@pytest.mark.redis
class TestAsyncRealRedis(AsyncRealRedis, AsyncStoreContract, sync_configurations.TestRealRedis):
    pass


# The PostgreSQL configurations' module fixtures, shared with the sync classes.
embedded_postgres_docstore = sync_configurations.embedded_postgres_docstore
real_postgres_docstore = sync_configurations.real_postgres_docstore


@contextmanager
def _async_twin(
    sync_store: Any, dsn: str, loop_thread: LoopThread
) -> Iterator[AsyncPostgresDocumentStore]:
    """An asyncio store on the sync store's table, closed afterwards."""
    twin = AsyncPostgresDocumentStore(dsn, table=sync_store._table_name, max_connections=20)
    try:
        yield twin
    finally:
        loop_thread.run(twin.aclose)


@pytest.mark.embedded
class TestAsyncEmbeddedPostgres(
    AsyncFakeRedis, AsyncStoreContract, sync_configurations.TestEmbeddedPostgres
):
    @pytest.fixture
    def async_session_docstore(
        self,
        embedded_postgres_docstore: docstore.DocumentStore,
        embedded_dsn: str,
        loop_thread: LoopThread,
    ) -> Iterator[AsyncDocumentStore]:
        with _async_twin(embedded_postgres_docstore, embedded_dsn, loop_thread) as twin:
            yield twin


@pytest.mark.postgres
class TestAsyncRealPostgresRealRedis(
    AsyncRealRedis, AsyncStoreContract, sync_configurations.TestRealPostgresRealRedis
):
    @pytest.fixture
    def async_session_docstore(
        self,
        real_postgres_docstore: docstore.DocumentStore,
        real_dsn: str,
        loop_thread: LoopThread,
    ) -> Iterator[AsyncDocumentStore]:
        with _async_twin(real_postgres_docstore, real_dsn, loop_thread) as twin:
            yield twin
