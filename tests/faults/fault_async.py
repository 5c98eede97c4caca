"""An asyncio reader for the sync fault tests: an `AsyncSessionStore` on a loop of its own."""

from __future__ import annotations

import asyncio

from fault_redis import async_redis_client

from docstore import AsyncPostgresDocumentStore
from session import AsyncSessionStore, Message, Session

__all__ = ["AsyncReader"]


class AsyncReader:
    """An `AsyncSessionStore` with the sync reading calls the fault tests use.

    Its event loop lives as long as the reader and runs for each call, so the
    store keeps its connections (and what it learnt of Redis) between calls,
    like a long-lived asyncio service.
    """

    def __init__(self, dsn: str, table: str, redis_url: str, key_prefix: str) -> None:
        self._loop = asyncio.new_event_loop()
        self._docstore = AsyncPostgresDocumentStore(dsn, table=table, connect_timeout=1)
        self._cache = async_redis_client(redis_url)
        self.store = AsyncSessionStore(self._docstore, self._cache, key_prefix=key_prefix)

    def get_session(self, session_id: str) -> Session | None:
        return self._loop.run_until_complete(self.store.get_session(session_id))

    def get_messages(self, session_id: str) -> list[Message]:
        return self._loop.run_until_complete(self.store.get_messages(session_id))

    def close(self) -> None:
        try:
            self._loop.run_until_complete(self.store.aclose())
            self._loop.run_until_complete(self._cache.aclose())
            self._loop.run_until_complete(self._docstore.aclose())
        finally:
            self._loop.close()
