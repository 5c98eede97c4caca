"""Choose a document store from a URL or the environment."""

from __future__ import annotations

import os

from .async_memory import AsyncMemoryDocumentStore
from .async_postgres import AsyncPostgresDocumentStore
from .async_store import AsyncDocumentStore
from .memory import MemoryDocumentStore
from .postgres import PostgresDocumentStore
from .store import DocumentStore

__all__ = [
    "get_document_store",
    "get_async_document_store",
    "URL_VARIABLES",
    "MEMORY_URL",
    "TABLE_VARIABLE",
    "DEFAULT_TABLE",
]

URL_VARIABLES = ("POSTGRES_CONNECTION_STRING", "DATABASE_URL")
MEMORY_URL = "memory://"
TABLE_VARIABLE = "DOCSTORE_TABLE"
DEFAULT_TABLE = "documents"


def _resolve(url: str | None, table: str | None) -> tuple[str, str]:
    """Return (`MEMORY_URL` or a PostgreSQL DSN, table): the arguments, else the environment.

    With no URL anywhere, the embedded server is started (or joined).
    """
    if url is None:
        url = next((os.environ[name] for name in URL_VARIABLES if os.environ.get(name)), None)
    if table is None:
        table = os.environ.get(TABLE_VARIABLE) or DEFAULT_TABLE
    if url is not None and url.strip() == MEMORY_URL:
        return MEMORY_URL, table
    if url is None:
        from .embedded import start_embedded

        url = start_embedded()
    return url, table


def get_document_store(url: str | None = None, *, table: str | None = None) -> DocumentStore:
    """Return the store named by `url`, else by the environment, else the embedded server.

    `url` (or `$POSTGRES_CONNECTION_STRING`, then `$DATABASE_URL`) is a libpq
    URL or key/value string; `memory://` gives a `MemoryDocumentStore`. With
    none set, an embedded PostgreSQL server is started (or joined) with its
    data in `$DOCSTORE_DATA_DIR` or the per-user data directory. A PostgreSQL
    store uses the table `table`, else `$DOCSTORE_TABLE`, else `documents`.
    """
    resolved, table = _resolve(url, table)
    if resolved == MEMORY_URL:
        return MemoryDocumentStore()
    return PostgresDocumentStore(resolved, table=table)


def get_async_document_store(
    url: str | None = None, *, table: str | None = None
) -> AsyncDocumentStore:
    """Return the asyncio store named by `url`, under the rules of `get_document_store`.

    `memory://` gives an `AsyncMemoryDocumentStore`, a PostgreSQL DSN an
    `AsyncPostgresDocumentStore` (which connects on its first call). With no
    URL and no variable set, the embedded server is started here, before any
    event loop needs it: call this at start-up, not from a coroutine.
    """
    resolved, table = _resolve(url, table)
    if resolved == MEMORY_URL:
        return AsyncMemoryDocumentStore()
    return AsyncPostgresDocumentStore(resolved, table=table)
