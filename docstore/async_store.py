"""The `AsyncDocumentStore` contract: `DocumentStore`'s methods as coroutines."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import Any

from .document import Document
from .store import Dumped, Filters, OrderBy, Ttl

__all__ = ["AsyncDocumentStore"]


class AsyncDocumentStore(ABC):
    """An asyncio document store: every method of `DocumentStore`, awaited.

    Same arguments, results, errors and guarantees as the sync store (one
    contract suite runs against both). `transaction()` is an async context
    manager scoped to the current task (and the tasks it starts inside the
    block); `aclose()` replaces `close()`, and the store is an async context
    manager. Building a store needs no running event loop; it binds to the
    loop of its first call.
    """

    @abstractmethod
    async def create(
        self,
        collection: str,
        data: dict[str, Any],
        *,
        id: str | None = None,
        ttl: Ttl | None = None,
    ) -> Document:
        """Create a document; raise DocumentExists when the id is taken by a live one."""

    @abstractmethod
    async def read(self, collection: str, id: str) -> Document | None:
        """Return the live document, or None."""

    @abstractmethod
    async def update(
        self,
        collection: str,
        id: str,
        data: dict[str, Any],
        *,
        expected_version: int | None = None,
        ttl: Ttl | None = None,
    ) -> Document | None:
        """Shallow-merge `data` into the document; None when it is missing."""

    @abstractmethod
    async def replace(
        self,
        collection: str,
        id: str,
        data: dict[str, Any],
        *,
        expected_version: int | None = None,
        ttl: Ttl | None = None,
    ) -> Document | None:
        """Replace the document's data; None when it is missing."""

    @abstractmethod
    async def upsert(
        self, collection: str, id: str, data: dict[str, Any], *, ttl: Ttl | None = None
    ) -> Document:
        """Create the document, or shallow-merge into it, in one atomic step."""

    @abstractmethod
    async def delete(
        self, collection: str, id: str, *, expected_version: int | None = None
    ) -> bool:
        """Delete the document; True if a live one was deleted."""

    @abstractmethod
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
        """Return the live documents matching `filters`, in a deterministic order."""

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
        """Read a live document and, with it, the live documents of `related` it links to
        (see `DocumentStore.read_with`; this default reads, then queries)."""
        from .query import linked_filters, parse_link  # as in DocumentStore.read_with

        related_path, own_path = parse_link(link, filters)
        document = await self.read(collection, id)
        if document is None:
            return None, []
        linked = linked_filters(filters, related_path, own_path, document.data)
        if linked is None:
            return document, []
        return document, await self.query(related, linked, limit=limit, order_by=order_by)

    @abstractmethod
    async def count(self, collection: str, filters: Filters | None = None) -> int:
        """Count the live documents matching `filters`."""

    @abstractmethod
    async def list_collections(self) -> list[str]:
        """Return the names of collections holding a live document, sorted by code point."""

    @abstractmethod
    async def delete_collection(self, collection: str) -> bool:
        """Delete every document of the collection; True if it held a live one."""

    @abstractmethod
    async def ensure_index(
        self,
        collection: str,
        paths: str | Sequence[str],
        *,
        unique: bool = False,
        order_by: OrderBy | None = None,
    ) -> None:
        """Index one field path, or several in order (then `order_by`'s columns); idempotent."""

    @abstractmethod
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
        """Add a child with the parent's next `seq`, bumping the parent; None if it is missing
        (`parent_data=False`: the parent comes back with empty data)."""

    @abstractmethod
    async def pop_child(
        self,
        collection: str,
        filters: Filters,
        *,
        parent: tuple[str, str],
        parent_ttl: Ttl | None = None,
    ) -> tuple[Document, Document | None] | None:
        """Delete the live child with the highest `seq` and bump the parent, in one atomic step."""

    @abstractmethod
    async def delete_children(
        self,
        collection: str,
        filters: Filters,
        *,
        parent: tuple[str, str],
        parent_ttl: Ttl | None = None,
    ) -> tuple[Document, int] | None:
        """Delete every live child matching `filters` and bump the parent, in one atomic step."""

    @abstractmethod
    async def rename(
        self, collection: str, id: str, new_id: str, *, expected_version: int | None = None
    ) -> Document | None:
        """Move a live document to `new_id` atomically; None when it is missing."""

    @abstractmethod
    async def delete_many(self, collection: str, filters: Filters) -> int:
        """Delete every matching document; return how many."""

    @abstractmethod
    def transaction(self) -> AbstractAsyncContextManager[None]:
        """Group the calls made in this task inside the block into one transaction."""

    @abstractmethod
    async def purge_expired(self, collection: str | None = None, *, batch_size: int = 1000) -> int:
        """Delete expired documents in batches; return how many."""

    # -- export and import: not abstract, as in DocumentStore --------------------

    async def dump(
        self,
        collection: str,
        filters: Filters | None = None,
        *,
        after: Document | None = None,
        limit: int = 1000,
        include_expired: bool = False,
    ) -> list[Dumped]:
        """Return a page of documents with their append counters, by (created_at, id)."""
        raise NotImplementedError(f"{type(self).__name__} cannot dump documents")

    async def restore(self, document: Document, *, counter: int = 0) -> Document | None:
        """Write `document` exactly as given; return the live one holding its id, if any."""
        raise NotImplementedError(f"{type(self).__name__} cannot restore documents")

    async def restore_many(self, documents: Sequence[Document]) -> list[str]:
        """Restore several documents of one collection; return the ids already held."""
        held = []
        for document in documents:
            if await self.restore(document) is not None:
                held.append(document.id)
        return held

    @abstractmethod
    async def pop_expired(self, collection: str, *, limit: int = 1000) -> list[Document]:
        """Delete up to `limit` expired documents of the collection and return them."""

    @abstractmethod
    async def aclose(self) -> None:
        """Release connections."""

    async def __aenter__(self) -> AsyncDocumentStore:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()
