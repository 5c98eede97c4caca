"""Run an `AsyncDocumentStore` behind the sync `DocumentStore` interface, for the contract suite.

The docstore contract is written once, as sync tests (threads included). This
shim lets the same suite drive the asyncio stores: an event loop runs in a
thread of its own, and each call from a test thread becomes a task on it. The
tasks of one test thread share one `contextvars.Context`, so a transaction
opened by a thread holds for that thread's later calls, exactly as the
async stores scope a transaction to a task and the sync ones to a thread.
Calls from several threads run as concurrent tasks on the one loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import inspect
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from functools import partial
from typing import Any, TypeVar

from docstore import AsyncDocumentStore, Document, DocumentStore
from docstore.store import Dumped, Filters, OrderBy, Ttl
from session import AsyncSessionStore

__all__ = [
    "LoopThread",
    "SyncOverAsyncStore",
    "AsyncOverSyncDocumentStore",
    "SyncOverAsyncSessionStore",
]

T = TypeVar("T")


class LoopThread:
    """An event loop running in a daemon thread; `run` waits for a coroutine's result.

    A context manager: the loop stops when the block ends.
    """

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self._contexts = threading.local()

    def run(self, make: Callable[[], Awaitable[T]], *, timeout: float = 120.0) -> T:
        """Run `make()` as a task on the loop, in this thread's context, and return its result."""
        context = getattr(self._contexts, "context", None)
        if context is None:
            context = self._contexts.context = contextvars.Context()
        future: concurrent.futures.Future[T] = concurrent.futures.Future()

        async def runner() -> None:
            try:
                future.set_result(await make())
            except BaseException as exc:  # handed to the calling thread
                future.set_exception(exc)

        self.loop.call_soon_threadsafe(lambda: self.loop.create_task(runner(), context=context))
        return future.result(timeout=timeout)

    def __enter__(self) -> LoopThread:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self.loop.close()


class SyncOverAsyncStore(DocumentStore):
    """A `DocumentStore` whose every call awaits the wrapped async store's own."""

    def __init__(self, async_store: AsyncDocumentStore, loop: LoopThread) -> None:
        self.async_store = async_store
        self.loop_thread = loop

    def _run(self, make: Callable[[], Awaitable[T]]) -> T:
        return self.loop_thread.run(make)

    def create(
        self,
        collection: str,
        data: dict[str, Any],
        *,
        id: str | None = None,
        ttl: Ttl | None = None,
    ) -> Document:
        return self._run(lambda: self.async_store.create(collection, data, id=id, ttl=ttl))

    def read(self, collection: str, id: str) -> Document | None:
        return self._run(lambda: self.async_store.read(collection, id))

    def update(
        self,
        collection: str,
        id: str,
        data: dict[str, Any],
        *,
        expected_version: int | None = None,
        ttl: Ttl | None = None,
    ) -> Document | None:
        return self._run(
            lambda: self.async_store.update(
                collection, id, data, expected_version=expected_version, ttl=ttl
            )
        )

    def replace(
        self,
        collection: str,
        id: str,
        data: dict[str, Any],
        *,
        expected_version: int | None = None,
        ttl: Ttl | None = None,
    ) -> Document | None:
        return self._run(
            lambda: self.async_store.replace(
                collection, id, data, expected_version=expected_version, ttl=ttl
            )
        )

    def upsert(
        self, collection: str, id: str, data: dict[str, Any], *, ttl: Ttl | None = None
    ) -> Document:
        return self._run(lambda: self.async_store.upsert(collection, id, data, ttl=ttl))

    def delete(self, collection: str, id: str, *, expected_version: int | None = None) -> bool:
        return self._run(
            lambda: self.async_store.delete(collection, id, expected_version=expected_version)
        )

    def query(
        self,
        collection: str,
        filters: Filters | None = None,
        *,
        limit: int | None = 100,
        offset: int = 0,
        order_by: OrderBy | None = None,
        after: Document | None = None,
    ) -> list[Document]:
        return self._run(
            lambda: self.async_store.query(
                collection, filters, limit=limit, offset=offset, order_by=order_by, after=after
            )
        )

    def read_with(
        self,
        collection: str,
        id: str,
        related: str,
        filters: Filters | None = None,
        *,
        link: tuple[str, str],
        limit: int | None = 100,
        order_by: OrderBy | None = None,
    ) -> tuple[Document | None, list[Document]]:
        return self._run(
            lambda: self.async_store.read_with(
                collection, id, related, filters, link=link, limit=limit, order_by=order_by
            )
        )

    def count(self, collection: str, filters: Filters | None = None) -> int:
        return self._run(lambda: self.async_store.count(collection, filters))

    def list_collections(self) -> list[str]:
        return self._run(self.async_store.list_collections)

    def delete_collection(self, collection: str) -> bool:
        return self._run(lambda: self.async_store.delete_collection(collection))

    def ensure_index(
        self,
        collection: str,
        paths: str | Sequence[str],
        *,
        unique: bool = False,
        order_by: OrderBy | None = None,
    ) -> None:
        self._run(
            lambda: self.async_store.ensure_index(
                collection, paths, unique=unique, order_by=order_by
            )
        )

    def pop_expired(self, collection: str, *, limit: int = 1000) -> list[Document]:
        return self._run(lambda: self.async_store.pop_expired(collection, limit=limit))

    def append(
        self,
        collection: str,
        data: dict[str, Any],
        *,
        parent: tuple[str, str],
        id: str | None = None,
        ttl: Ttl | None = None,
        parent_ttl: Ttl | None = None,
        parent_data: bool = True,
    ) -> tuple[Document, Document] | None:
        return self._run(
            lambda: self.async_store.append(
                collection,
                data,
                parent=parent,
                id=id,
                ttl=ttl,
                parent_ttl=parent_ttl,
                parent_data=parent_data,
            )
        )

    def pop_child(
        self,
        collection: str,
        filters: Filters,
        *,
        parent: tuple[str, str],
        parent_ttl: Ttl | None = None,
    ) -> tuple[Document, Document | None] | None:
        return self._run(
            lambda: self.async_store.pop_child(
                collection, filters, parent=parent, parent_ttl=parent_ttl
            )
        )

    def delete_children(
        self,
        collection: str,
        filters: Filters,
        *,
        parent: tuple[str, str],
        parent_ttl: Ttl | None = None,
    ) -> tuple[Document, int] | None:
        return self._run(
            lambda: self.async_store.delete_children(
                collection, filters, parent=parent, parent_ttl=parent_ttl
            )
        )

    def rename(
        self, collection: str, id: str, new_id: str, *, expected_version: int | None = None
    ) -> Document | None:
        return self._run(
            lambda: self.async_store.rename(
                collection, id, new_id, expected_version=expected_version
            )
        )

    def delete_many(self, collection: str, filters: Filters) -> int:
        return self._run(lambda: self.async_store.delete_many(collection, filters))

    def dump(
        self,
        collection: str,
        filters: Filters | None = None,
        *,
        after: Document | None = None,
        limit: int = 1000,
        include_expired: bool = False,
    ) -> list[Dumped]:
        return self._run(
            lambda: self.async_store.dump(
                collection, filters, after=after, limit=limit, include_expired=include_expired
            )
        )

    def restore(self, document: Document, *, counter: int = 0) -> Document | None:
        return self._run(lambda: self.async_store.restore(document, counter=counter))

    def restore_many(self, documents: Sequence[Document]) -> list[str]:
        return self._run(lambda: self.async_store.restore_many(documents))

    @contextmanager
    def transaction(self) -> Iterator[None]:
        block = self.async_store.transaction()
        self._run(block.__aenter__)
        try:
            yield
        except BaseException as exc:
            exit_block = partial(block.__aexit__, type(exc), exc, exc.__traceback__)
            if not self._run(exit_block):
                raise
        else:
            self._run(lambda: block.__aexit__(None, None, None))

    def purge_expired(self, collection: str | None = None, *, batch_size: int = 1000) -> int:
        return self._run(lambda: self.async_store.purge_expired(collection, batch_size=batch_size))

    def close(self) -> None:
        self._run(self.async_store.aclose)


class AsyncOverSyncDocumentStore(AsyncDocumentStore):
    """A sync `DocumentStore` behind coroutines, each call in a worker thread.

    For session tests that hand the store a docstore of their own (a
    `DocstoreProxy` that counts calls, fails them or holds them): its hooks
    may block, which they may do in a worker thread but never on the loop. A
    transaction block runs all its calls on one thread of its own, since the
    sync stores scope transactions to a thread.
    """

    def __init__(self, inner: DocumentStore) -> None:
        self.inner = inner
        self._threads = concurrent.futures.ThreadPoolExecutor(max_workers=32)
        self._block_thread: contextvars.ContextVar[concurrent.futures.Executor | None] = (
            contextvars.ContextVar(f"block_thread_{id(self)}", default=None)
        )

    def __getattribute__(self, name: str) -> Any:
        if name in _ASYNC_METHODS:
            inner = object.__getattribute__(self, "inner")
            block = object.__getattribute__(self, "_block_thread").get()
            threads = block or object.__getattribute__(self, "_threads")
            method = getattr(inner, name)

            async def call(*args: Any, **kwargs: Any) -> Any:
                loop = asyncio.get_running_loop()
                return await loop.run_in_executor(threads, partial(method, *args, **kwargs))

            return call
        return object.__getattribute__(self, name)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        thread = concurrent.futures.ThreadPoolExecutor(max_workers=1)
        block = self.inner.transaction()
        token = self._block_thread.set(thread)
        try:
            await loop.run_in_executor(thread, block.__enter__)
            try:
                yield
            except BaseException as exc:
                exit_block = partial(block.__exit__, type(exc), exc, exc.__traceback__)
                if not await loop.run_in_executor(thread, exit_block):
                    raise
            else:
                await loop.run_in_executor(thread, partial(block.__exit__, None, None, None))
        finally:
            self._block_thread.reset(token)
            thread.shutdown(wait=False)

    async def aclose(self) -> None:
        self._threads.shutdown(wait=False)


_ASYNC_METHODS = frozenset(
    {
        "create",
        "read",
        "read_with",
        "update",
        "replace",
        "upsert",
        "delete",
        "query",
        "count",
        "list_collections",
        "delete_collection",
        "ensure_index",
        "append",
        "pop_child",
        "delete_children",
        "rename",
        "delete_many",
        "purge_expired",
        "pop_expired",
        "dump",
        "restore",
        "restore_many",
    }
)
for _name in _ASYNC_METHODS:
    # Satisfy the ABC: the real coroutines come from __getattribute__.
    setattr(AsyncOverSyncDocumentStore, _name, getattr(AsyncDocumentStore, _name))
AsyncOverSyncDocumentStore.__abstractmethods__ = frozenset()


class SyncOverAsyncSessionStore:
    """The `SessionStore` interface over an `AsyncSessionStore`, for the session contract.

    Each coroutine method becomes a blocking call that runs it as a task on
    the loop thread; everything else (`stats`, properties) passes through.
    """

    def __init__(self, async_store: AsyncSessionStore, loop: LoopThread) -> None:
        self.async_store = async_store
        self.loop_thread = loop

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.async_store, name)
        if name.startswith("_") or not inspect.iscoroutinefunction(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            return self.loop_thread.run(partial(attr, *args, **kwargs))

        return call

    def stats(self) -> dict[str, int]:
        """The store's counters once the fill replies it reads in the background have
        arrived, as the sync store's `stats()` reads its parked replies first."""
        self.loop_thread.run(self._settled)
        return self.async_store.stats()

    async def _settled(self) -> None:
        while self.async_store._cleanups:
            await asyncio.wait(set(self.async_store._cleanups))

    def close(self) -> None:
        self.loop_thread.run(self.async_store.aclose)

    def __enter__(self) -> SyncOverAsyncSessionStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
