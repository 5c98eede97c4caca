"""The asyncio face of `MemoryDocumentStore`: the same store, awaited."""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractContextManager, asynccontextmanager
from typing import Any, TypeVar

from .async_store import AsyncDocumentStore
from .document import Document
from .memory import MemoryDocumentStore
from .store import DEFAULT_MAX_DOCUMENT_BYTES, Dumped, Filters, OrderBy, Ttl

__all__ = ["AsyncMemoryDocumentStore"]

T = TypeVar("T")


class AsyncMemoryDocumentStore(AsyncDocumentStore):
    """A `MemoryDocumentStore` behind coroutines; every call is the sync store's own.

    Nothing here waits for I/O, so each call runs the memory store's method
    directly. Only transactions need more: the memory store isolates them per
    thread, and all tasks share the loop's thread, so a task's transaction
    holds an asyncio lock that the other tasks' calls wait for while it is open.
    `max_document_bytes` and `clock` are the memory store's; `store`
    (optional) is a memory store to wrap instead, e.g. one a sync
    `SessionStore` uses too.
    """

    def __init__(
        self,
        *,
        max_document_bytes: int = DEFAULT_MAX_DOCUMENT_BYTES,
        clock: Callable[[], float] = time.time,
        store: MemoryDocumentStore | None = None,
    ) -> None:
        if store is None:
            store = MemoryDocumentStore(max_document_bytes=max_document_bytes, clock=clock)
        self.sync_store = store
        self._transaction_lock: asyncio.Lock | None = None
        self._in_transaction: contextvars.ContextVar[bool] = contextvars.ContextVar(
            f"docstore_memory_transaction_{id(self)}", default=False
        )

    def __repr__(self) -> str:
        return f"AsyncMemoryDocumentStore({self.sync_store!r})"

    async def _call(self, call: Callable[[], T]) -> T:
        lock = self._transaction_lock
        if lock is None or not lock.locked() or self._in_transaction.get():
            return call()
        async with lock:  # another task's transaction is open: wait for it to end
            return call()

    async def create(
        self,
        collection: str,
        data: dict[str, Any],
        *,
        id: str | None = None,
        ttl: Ttl | None = None,
    ) -> Document:
        return await self._call(lambda: self.sync_store.create(collection, data, id=id, ttl=ttl))

    async def read(self, collection: str, id: str) -> Document | None:
        return await self._call(lambda: self.sync_store.read(collection, id))

    async def update(
        self,
        collection: str,
        id: str,
        data: dict[str, Any],
        *,
        expected_version: int | None = None,
        ttl: Ttl | None = None,
    ) -> Document | None:
        return await self._call(
            lambda: self.sync_store.update(
                collection, id, data, expected_version=expected_version, ttl=ttl
            )
        )

    async def replace(
        self,
        collection: str,
        id: str,
        data: dict[str, Any],
        *,
        expected_version: int | None = None,
        ttl: Ttl | None = None,
    ) -> Document | None:
        return await self._call(
            lambda: self.sync_store.replace(
                collection, id, data, expected_version=expected_version, ttl=ttl
            )
        )

    async def upsert(
        self, collection: str, id: str, data: dict[str, Any], *, ttl: Ttl | None = None
    ) -> Document:
        return await self._call(lambda: self.sync_store.upsert(collection, id, data, ttl=ttl))

    async def delete(
        self, collection: str, id: str, *, expected_version: int | None = None
    ) -> bool:
        return await self._call(
            lambda: self.sync_store.delete(collection, id, expected_version=expected_version)
        )

    async def query(
        self,
        collection: str,
        filters: Filters | None = None,
        *,
        limit: int | None = 100,
        offset: int = 0,
        order_by: OrderBy | None = None,
        after: Document | None = None,
    ) -> list[Document]:
        return await self._call(
            lambda: self.sync_store.query(
                collection, filters, limit=limit, offset=offset, order_by=order_by, after=after
            )
        )

    async def read_with(
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
        return await self._call(
            lambda: self.sync_store.read_with(
                collection, id, related, filters, link=link, limit=limit, order_by=order_by
            )
        )

    async def count(self, collection: str, filters: Filters | None = None) -> int:
        return await self._call(lambda: self.sync_store.count(collection, filters))

    async def list_collections(self) -> list[str]:
        return await self._call(self.sync_store.list_collections)

    async def delete_collection(self, collection: str) -> bool:
        return await self._call(lambda: self.sync_store.delete_collection(collection))

    async def ensure_index(
        self,
        collection: str,
        paths: str | Sequence[str],
        *,
        unique: bool = False,
        order_by: OrderBy | None = None,
    ) -> None:
        await self._call(
            lambda: self.sync_store.ensure_index(
                collection, paths, unique=unique, order_by=order_by
            )
        )

    async def pop_expired(self, collection: str, *, limit: int = 1000) -> list[Document]:
        return await self._call(lambda: self.sync_store.pop_expired(collection, limit=limit))

    async def append(
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
        return await self._call(
            lambda: self.sync_store.append(
                collection,
                data,
                parent=parent,
                id=id,
                ttl=ttl,
                parent_ttl=parent_ttl,
                parent_data=parent_data,
            )
        )

    async def pop_child(
        self,
        collection: str,
        filters: Filters,
        *,
        parent: tuple[str, str],
        parent_ttl: Ttl | None = None,
    ) -> tuple[Document, Document | None] | None:
        return await self._call(
            lambda: self.sync_store.pop_child(
                collection, filters, parent=parent, parent_ttl=parent_ttl
            )
        )

    async def delete_children(
        self,
        collection: str,
        filters: Filters,
        *,
        parent: tuple[str, str],
        parent_ttl: Ttl | None = None,
    ) -> tuple[Document, int] | None:
        return await self._call(
            lambda: self.sync_store.delete_children(
                collection, filters, parent=parent, parent_ttl=parent_ttl
            )
        )

    async def rename(
        self, collection: str, id: str, new_id: str, *, expected_version: int | None = None
    ) -> Document | None:
        return await self._call(
            lambda: self.sync_store.rename(
                collection, id, new_id, expected_version=expected_version
            )
        )

    async def delete_many(self, collection: str, filters: Filters) -> int:
        return await self._call(lambda: self.sync_store.delete_many(collection, filters))

    async def purge_expired(self, collection: str | None = None, *, batch_size: int = 1000) -> int:
        return await self._call(
            lambda: self.sync_store.purge_expired(collection, batch_size=batch_size)
        )

    async def dump(
        self,
        collection: str,
        filters: Filters | None = None,
        *,
        after: Document | None = None,
        limit: int = 1000,
        include_expired: bool = False,
    ) -> list[Dumped]:
        return await self._call(
            lambda: self.sync_store.dump(
                collection, filters, after=after, limit=limit, include_expired=include_expired
            )
        )

    async def restore(self, document: Document, *, counter: int = 0) -> Document | None:
        return await self._call(lambda: self.sync_store.restore(document, counter=counter))

    async def restore_many(self, documents: Sequence[Document]) -> list[str]:
        return await self._call(lambda: self.sync_store.restore_many(documents))

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        """Run the block's calls (this task, this store) in one transaction.

        A nested block is a savepoint, as in the sync store.
        """
        if self._in_transaction.get():
            with self.sync_store.transaction():
                yield
            return
        if self._transaction_lock is None:
            self._transaction_lock = asyncio.Lock()
        async with self._transaction_lock:
            token = self._in_transaction.set(True)
            block: AbstractContextManager[None] = self.sync_store.transaction()
            try:
                with block:
                    yield
            finally:
                self._in_transaction.reset(token)

    async def aclose(self) -> None:
        self.sync_store.close()
