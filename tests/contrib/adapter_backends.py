"""The Backend the framework adapters' tests run on (see conftest.py for the fixtures)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import redis
import redis.asyncio
from contract.sync_over_async import LoopThread

from docstore import AsyncDocumentStore, DocumentStore
from session import AsyncSessionStore, SessionStore

__all__ = ["Backend", "AsyncTwin", "delete_keys"]

T = TypeVar("T")

# Given the sync cache of a backend, the asyncio clients of the same docstore
# table and Redis server (the test closes them).
AsyncTwin = Callable[[redis.Redis], tuple[AsyncDocumentStore, redis.asyncio.Redis]]


def delete_keys(client: redis.Redis, prefix: str) -> None:
    keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
    if keys:
        client.delete(*keys)


class Backend:
    """A docstore and a way to get a cache as a freshly restarted process would see it.

    With `twin`, `store()` builds `AsyncSessionStore`s on the asyncio clients of
    the same table and Redis server, and `run()` runs coroutines on one event
    loop (in a thread) for the whole test, the loop those stores belong to
    (so `restart()` and `close()` are called outside `run()`).
    `sync_store()` is always a `SessionStore` on the same data, for a test to
    look at or write what the adapter stored.
    """

    def __init__(
        self,
        documents: DocumentStore,
        fresh_cache: Callable[[], redis.Redis],
        prefix: str,
        *,
        twin: AsyncTwin | None = None,
    ) -> None:
        self.documents = documents
        self.fresh_cache = fresh_cache
        self.prefix = prefix
        self.twin = twin
        self._cache: redis.Redis | None = None
        self._stores: list[SessionStore] = []
        self._async_closers: list[Callable[[], Awaitable[None]]] = []
        self._loop = LoopThread() if twin is not None else None

    @property
    def is_async(self) -> bool:
        return self.twin is not None

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run a coroutine to its end: on the backend's loop, or on a new one (sync stores)."""
        if self._loop is None:
            return asyncio.run(coroutine)
        return self._loop.run(lambda: coroutine)

    def sync_store(self, *, cached: bool = True, **kwargs: Any) -> SessionStore:
        """Return a SessionStore on this backend, sharing the current cache."""
        store = SessionStore(
            self.documents,
            self._current_cache() if cached else None,
            key_prefix=self.prefix,
            **kwargs,
        )
        self._stores.append(store)
        return store

    def store(self, *, cached: bool = True, **kwargs: Any) -> SessionStore | AsyncSessionStore:
        """Return the kind of store the test runs on, sharing the current cache."""
        if self.twin is None:
            return self.sync_store(cached=cached, **kwargs)
        documents, cache = self.twin(self._current_cache())
        store = AsyncSessionStore(
            documents, cache if cached else None, key_prefix=self.prefix, **kwargs
        )
        self._async_closers += [store.aclose, documents.aclose, cache.aclose]
        return store

    def restart(self) -> SessionStore | AsyncSessionStore:
        """Close every store so far; return a new one on an empty cache."""
        self._close_stores()
        self._cache = self.fresh_cache()
        return self.store()

    def close(self) -> None:
        try:
            self._close_stores()
        finally:
            if self._loop is not None:
                self._loop.stop()

    def _current_cache(self) -> redis.Redis:
        if self._cache is None:
            self._cache = self.fresh_cache()
        return self._cache

    def _close_stores(self) -> None:
        closers, self._async_closers = self._async_closers, []

        async def close_all() -> None:
            for close in closers:
                await close()

        if closers:
            self.run(close_all())
        for store in self._stores:
            store.close()
        self._stores.clear()
