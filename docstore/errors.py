"""The docstore's exception hierarchy: one base class, builtin mixins where they help."""

from __future__ import annotations

__all__ = [
    "DocstoreError",
    "DocumentExists",
    "VersionConflict",
    "InvalidDocument",
    "InvalidQuery",
    "StoreUnavailable",
]


class DocstoreError(Exception):
    """Base class of every error the document store raises."""


class DocumentExists(DocstoreError):
    """A live document already holds this id, or these values of a unique index."""


class VersionConflict(DocstoreError):
    """The stored version differs from the `expected_version` the caller gave."""

    def __init__(self, message: str, *, expected: int | None = None, actual: int | None = None):
        super().__init__(message)
        self.expected = expected
        self.actual = actual


class InvalidDocument(DocstoreError, ValueError):
    """Data, a collection name, an id or a ttl that the store refuses to write."""


class InvalidQuery(DocstoreError, ValueError):
    """A filter, an ordering or a paging argument the store cannot run."""


class StoreUnavailable(DocstoreError):
    """The database cannot be reached, or the connection broke during the call.

    `outcome_unknown` is True when the connection broke while a write may
    already have been committed (for instance during COMMIT): the caller
    cannot tell whether it took effect.
    """

    def __init__(self, message: str, *, outcome_unknown: bool = False):
        super().__init__(message)
        self.outcome_unknown = outcome_unknown
