"""PostgreSQL JSONB document store, with an in-memory twin and an embedded default."""

from .config import get_document_store
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
    "DocstoreError",
    "DocumentExists",
    "VersionConflict",
    "InvalidDocument",
    "InvalidQuery",
    "StoreUnavailable",
]
