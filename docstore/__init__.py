"""PostgreSQL JSONB document store, with an in-memory twin and an embedded default."""

from .async_memory import AsyncMemoryDocumentStore
from .async_postgres import AsyncPostgresDocumentStore
from .async_store import AsyncDocumentStore
from .config import get_async_document_store, get_document_store
from .document import Document
from .errors import (
    DocstoreError,
    DocumentExists,
    InvalidDocument,
    InvalidQuery,
    StoreUnavailable,
    VersionConflict,
)
from .memory import MemoryDocumentStore
from .postgres import PostgresDocumentStore
from .store import DocumentStore

__all__ = [
    "Document",
    "DocumentStore",
    "PostgresDocumentStore",
    "MemoryDocumentStore",
    "get_document_store",
    "AsyncDocumentStore",
    "AsyncPostgresDocumentStore",
    "AsyncMemoryDocumentStore",
    "get_async_document_store",
    "DocstoreError",
    "DocumentExists",
    "VersionConflict",
    "InvalidDocument",
    "InvalidQuery",
    "StoreUnavailable",
]
