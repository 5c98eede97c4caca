"""Choose a document store from a URL or the environment."""

from __future__ import annotations

import os

from .async_memory import AsyncMemoryDocumentStore
from .async_postgres import AsyncPostgresDocumentStore
from .async_store import AsyncDocumentStore
from .memory import MemoryDocumentStore
from .postgres import PostgresDocumentStore
from .store import DocumentStore

__all__ = ["get_document_store", "get_async_document_store", "URL_VARIABLES", "MEMORY_URL"]

URL_VARIABLES = ("POSTGRES_CONNECTION_STRING", "DATABASE_URL")
MEMORY_URL = "memory://"


def _resolve_url(url: str | None) -> str:
    """Return `MEMORY_URL` or a PostgreSQL DSN: `url`, else the environment, else embedded."""
    if url is None:
        url = next((os.environ[name] for name in URL_VARIABLES if os.environ.get(name)), None)
    if url is not None and url.strip() == MEMORY_URL:
        return MEMORY_URL
    if url is None:
        from .embedded import start_embedded

        url = start_embedded()
    return url


def get_document_store(url: str | None = None) -> DocumentStore:
    """Return the store named by `url`, else by the environment, else the embedded server.

    `url` (or `$POSTGRES_CONNECTION_STRING`, then `$DATABASE_URL`) is a libpq
    URL or key/value string; `memory://` gives a `MemoryDocumentStore`. With
    none set, an embedded PostgreSQL server is started (or joined) with its
    data in `$DOCSTORE_DATA_DIR` or the per-user data directory.
    """
    resolved = _resolve_url(url)
    if resolved == MEMORY_URL:
        return MemoryDocumentStore()
    return PostgresDocumentStore(resolved)


def get_async_document_store(url: str | None = None) -> AsyncDocumentStore:
    """Return the asyncio store named by `url`, under the rules of `get_document_store`.

    `memory://` gives an `AsyncMemoryDocumentStore`, a PostgreSQL DSN an
    `AsyncPostgresDocumentStore` (which connects on its first call). With no
    URL and no variable set, the embedded server is started here, before any
    event loop needs it: call this at start-up, not from a coroutine.
    """
    resolved = _resolve_url(url)
    if resolved == MEMORY_URL:
        return AsyncMemoryDocumentStore()
    return AsyncPostgresDocumentStore(resolved)
