"""Choose a document store from a URL or the environment."""

from __future__ import annotations

import os

from .memory import MemoryDocumentStore
from .postgres import PostgresDocumentStore
from .store import DocumentStore

__all__ = ["get_document_store", "URL_VARIABLES", "MEMORY_URL", "TABLE_VARIABLE", "DEFAULT_TABLE"]

URL_VARIABLES = ("POSTGRES_CONNECTION_STRING", "DATABASE_URL")
MEMORY_URL = "memory://"
TABLE_VARIABLE = "DOCSTORE_TABLE"
DEFAULT_TABLE = "documents"


def get_document_store(url: str | None = None, *, table: str | None = None) -> DocumentStore:
    """Return the store named by `url`, else by the environment, else the embedded server.

    `url` (or `$POSTGRES_CONNECTION_STRING`, then `$DATABASE_URL`) is a libpq
    URL or key/value string; `memory://` gives a `MemoryDocumentStore`. With
    none set, an embedded PostgreSQL server is started (or joined) with its
    data in `$DOCSTORE_DATA_DIR` or the per-user data directory. A PostgreSQL
    store uses the table `table`, else `$DOCSTORE_TABLE`, else `documents`.
    """
    if url is None:
        url = next((os.environ[name] for name in URL_VARIABLES if os.environ.get(name)), None)
    if url is not None and url.strip() == MEMORY_URL:
        return MemoryDocumentStore()
    if url is None:
        from .embedded import start_embedded

        url = start_embedded()
    if table is None:
        table = os.environ.get(TABLE_VARIABLE) or DEFAULT_TABLE
    return PostgresDocumentStore(url, table=table)
