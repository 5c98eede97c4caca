"""Choose a document store from a URL or the environment."""

from __future__ import annotations

import os

from .memory import MemoryDocumentStore
from .postgres import PostgresDocumentStore
from .store import DocumentStore

__all__ = ["get_document_store", "URL_VARIABLES", "MEMORY_URL"]

URL_VARIABLES = ("POSTGRES_CONNECTION_STRING", "DATABASE_URL")
MEMORY_URL = "memory://"


def get_document_store(url: str | None = None) -> DocumentStore:
    """Return the store named by `url`, else by the environment, else the embedded server.

    `url` (or `$POSTGRES_CONNECTION_STRING`, then `$DATABASE_URL`) is a libpq
    URL or key/value string; `memory://` gives a `MemoryDocumentStore`. With
    none set, an embedded PostgreSQL server is started (or joined) with its
    data in `$DOCSTORE_DATA_DIR` or the per-user data directory.
    """
    if url is None:
        url = next((os.environ[name] for name in URL_VARIABLES if os.environ.get(name)), None)
    if url is not None and url.strip() == MEMORY_URL:
        return MemoryDocumentStore()
    if url is None:
        from .embedded import start_embedded

        url = start_embedded()
    return PostgresDocumentStore(url)
