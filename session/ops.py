"""Operations on a running deployment: warm the cache, and report what the store holds."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import redis

import docstore
from docstore import Document, PostgresDocumentStore

from . import coherence
from .store import STAT_NAMES, SessionStore
from .transfer import store_errors

__all__ = ["WarmReport", "warm_cache", "collect_stats", "redis_usage"]

_WARM_PAGE = 100
_SCAN_BATCH = 1000


@dataclass(frozen=True)
class WarmReport:
    """What `warm_cache` did: sessions visited and values installed in Redis."""

    sessions: int
    fills: int  # session copies and message tails installed
    already_cached: int  # sessions Redis already held


def warm_cache(
    store: SessionStore, count: int, *, progress: Callable[[int], None] | None = None
) -> WarmReport:
    """Load the `count` most recently active sessions and their message tails into Redis.

    Each session is read through the store's own fill protocol (a lookup that
    misses fills the session's copy, a second one fills its message tail), so
    a warm racing with writers can never install a stale value.
    """
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"count must be an int >= 0, not {count!r}")
    if store.cache is None:
        raise ValueError("the store has no cache to warm")
    documents = store.document_store
    sessions, _ = store.collections
    before = store.stats()
    visited = already_cached = 0
    after: Document | None = None
    while visited < count:
        with store_errors(store):
            page = documents.query(
                sessions,
                order_by="-updated_at",
                limit=min(_WARM_PAGE, count - visited),
                after=after,
            )
        for doc in page:
            hits = store.stats()["hits"]
            store.get_session(doc.id)
            already_cached += store.stats()["hits"] - hits
            store.get_messages(doc.id, limit=1)
        visited += len(page)
        if progress is not None and page:
            progress(len(page))
        if not page:
            break
        after = page[-1]
    after_stats = store.stats()
    return WarmReport(
        sessions=visited,
        fills=after_stats["fills"] - before["fills"],
        already_cached=already_cached,
    )


def redis_usage(client: redis.Redis, key_prefix: str) -> dict[str, Any]:
    """Return how many keys the prefix holds in Redis and their memory (SCAN + MEMORY USAGE).

    `memory_bytes` is None when the server does not answer MEMORY USAGE.
    """
    keys = 0
    memory: int | None = 0
    batch: list[bytes] = []

    def measure() -> None:
        nonlocal memory
        if memory is None or not batch:
            return
        pipe = client.pipeline(transaction=False)
        for key in batch:
            pipe.memory_usage(key)
        try:
            sizes = pipe.execute()
        except redis.ResponseError:
            memory = None
            return
        memory += sum(size or 0 for size in sizes)

    for key in client.scan_iter(match=coherence.glob_escape(key_prefix) + "*", count=_SCAN_BATCH):
        keys += 1
        batch.append(key)
        if len(batch) >= _SCAN_BATCH:
            measure()
            batch = []
    measure()
    try:
        info = client.info("memory")
    except redis.ResponseError:  # a server without INFO (fakeredis)
        info = {}
    return {
        "prefix": key_prefix,
        "keys": keys,
        "memory_bytes": memory,
        "server_used_memory": info.get("used_memory"),
        "server_maxmemory": info.get("maxmemory"),
    }


def collect_stats(store: SessionStore) -> dict[str, Any]:
    """Return sessions, messages, table and index sizes, Redis usage and the store's counters."""
    documents = store.document_store
    sessions, messages = store.collections
    result: dict[str, Any] = {}
    with store_errors(store):
        if isinstance(documents, PostgresDocumentStore):
            table = documents.table_stats([sessions, messages])
            counts = table.pop("collections")
            result["sessions"] = counts[sessions]
            result["messages"] = counts[messages]["live"]
            result["postgres"] = table
        else:
            live = documents.count(sessions)
            result["sessions"] = {"live": live, "expired": _expired(documents, sessions)}
            result["messages"] = documents.count(messages)
            result["postgres"] = None
    if store.cache is None:
        result["redis"] = None
    else:
        try:
            result["redis"] = redis_usage(store.cache, store.key_prefix)
        except (redis.RedisError, OSError) as exc:
            result["redis"] = {"error": f"{type(exc).__name__}: {exc}"}
    counters = store.stats()
    result["store"] = {name: counters[name] for name in (*STAT_NAMES, "breaker_open")}
    return result


def _expired(documents: docstore.DocumentStore, collection: str) -> int:
    """Count expired documents by walking the collection (for stores without SQL)."""
    expired = 0
    after: Document | None = None
    while True:
        page = documents.dump(collection, after=after, include_expired=True)
        expired += sum(1 for item in page if not _live(item.document))
        if len(page) < 1000:
            return expired
        after = page[-1].document


def _live(doc: Document) -> bool:
    return doc.expires_at is None or doc.expires_at > datetime.now(timezone.utc)
