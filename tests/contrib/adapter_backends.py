"""The Backend the framework adapters' tests run on (see conftest.py for the fixture)."""

from __future__ import annotations

from collections.abc import Callable

import redis

from docstore import DocumentStore
from session import SessionStore

__all__ = ["Backend", "delete_keys"]


def delete_keys(client: redis.Redis, prefix: str) -> None:
    keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
    if keys:
        client.delete(*keys)


class Backend:
    """A docstore and a way to get a cache as a freshly restarted process would see it."""

    def __init__(
        self, documents: DocumentStore, fresh_cache: Callable[[], redis.Redis], prefix: str
    ) -> None:
        self.documents = documents
        self.fresh_cache = fresh_cache
        self.prefix = prefix
        self._cache: redis.Redis | None = None
        self._stores: list[SessionStore] = []

    def store(self) -> SessionStore:
        """Return a store on this backend, sharing the current cache."""
        if self._cache is None:
            self._cache = self.fresh_cache()
        store = SessionStore(self.documents, self._cache, key_prefix=self.prefix)
        self._stores.append(store)
        return store

    def restart(self) -> SessionStore:
        """Close every store so far; return a new one on an empty cache."""
        self.close()
        self._cache = self.fresh_cache()
        return self.store()

    def close(self) -> None:
        for store in self._stores:
            store.close()
        self._stores.clear()
