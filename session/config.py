"""Build a SessionStore or an AsyncSessionStore from the environment: the docstore's URL
variables and REDIS_URL."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import psycopg2
import psycopg2.extensions
import redis
import redis.asyncio
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.retry import Retry

from docstore import get_async_document_store, get_document_store
from docstore.config import MEMORY_URL, URL_VARIABLES

from .async_store import AsyncSessionStore
from .coherence import check_key_prefix
from .store import SessionStore

__all__ = [
    "get_session_store",
    "get_async_session_store",
    "redis_client_from_url",
    "async_redis_client_from_url",
    "check_redis_url",
    "check_postgres_dsn",
    "check_key_prefix",
    "describe_backends",
    "Backends",
    "REDIS_VARIABLE",
    "REDIS_SOCKET_TIMEOUT",
]

REDIS_VARIABLE = "REDIS_URL"

# Redis serves in well under a millisecond; a chat turn must never wait on it
# for long, so a slow Redis counts as a failing one.
REDIS_SOCKET_TIMEOUT = 0.25


def redis_client_from_url(url: str) -> redis.Redis:
    """Return a client that fails fast: short timeouts and at most one retry."""
    return redis.Redis.from_url(
        url,
        socket_timeout=REDIS_SOCKET_TIMEOUT,
        socket_connect_timeout=REDIS_SOCKET_TIMEOUT,
        # Retry a broken connection once (a pooled socket Redis closed), never a
        # timeout: retrying a slow server only doubles the stall.
        retry=Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)),
        health_check_interval=30,
    )


# redis.asyncio's pool from a URL holds at most 100 connections and raises
# MaxConnectionsError at once beyond that: with more calls in flight the
# store would count cache errors and go to PostgreSQL under load alone. Each
# call in flight holds one connection for one round trip, so the bound is
# how many may be in flight at once; beyond it a call still degrades to
# PostgreSQL. (redis.asyncio's BlockingConnectionPool would queue instead,
# but its checkout costs more client CPU than a cache hit's whole script
# call: measured 586k against 497k instructions per hit.)
ASYNC_POOL_CONNECTIONS = 1000


def async_redis_client_from_url(url: str) -> redis.asyncio.Redis:
    """Return a `redis.asyncio` client that fails fast, as `redis_client_from_url`'s does,
    with room for ASYNC_POOL_CONNECTIONS calls in flight."""
    client: redis.asyncio.Redis = redis.asyncio.Redis.from_url(
        url,
        max_connections=ASYNC_POOL_CONNECTIONS,
        socket_timeout=REDIS_SOCKET_TIMEOUT,
        socket_connect_timeout=REDIS_SOCKET_TIMEOUT,
        retry=AsyncRetry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)),
        health_check_interval=30,
    )
    return client


def check_redis_url(url: str) -> None:
    """Raise ValueError unless redis-py can parse `url` (the message never quotes the URL)."""
    try:
        # Builds the pool's settings only: nothing connects.
        redis.ConnectionPool.from_url(url)
    except ValueError as exc:
        # redis-py's messages name the scheme or the port, never the whole URL.
        raise ValueError(f"not a Redis URL (redis://, rediss:// or unix://): {exc}") from None


def check_postgres_dsn(dsn: str) -> None:
    """Raise ValueError (never quoting the string) unless libpq can parse `dsn`.

    Also checks what libpq only checks when connecting: the port must be a number.
    """
    try:
        parts = psycopg2.extensions.parse_dsn(dsn)
    except psycopg2.Error:
        # libpq's message repeats the string, password included: leave it out.
        raise ValueError(
            "not a PostgreSQL connection string (a postgresql:// URL or key=value pairs)"
        ) from None
    for port in (parts.get("port") or "").split(","):
        if port and not port.strip().isdigit():
            raise ValueError("the port of the PostgreSQL connection string is not a number")


def _fakeredis() -> Any:
    try:
        import fakeredis
    except ImportError as exc:
        raise RuntimeError(
            "REDIS_URL is not set and fakeredis is not installed: set REDIS_URL to a Redis "
            "server, or install fakeredis[lua] for an in-process cache"
        ) from exc
    return fakeredis


def _in_process_redis() -> redis.Redis:
    fakeredis = _fakeredis()
    client: redis.Redis = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    return client


def _in_process_async_redis() -> redis.asyncio.Redis:
    fakeredis = _fakeredis()
    client: redis.asyncio.Redis = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
    return client


def get_session_store(
    *,
    docstore_url: str | None = None,
    redis_url: str | None = None,
    cache_ttl: float = 3600,
    session_ttl: float | None = None,
    key_prefix: str = "sess:",
) -> SessionStore:
    """Return a SessionStore that owns (and closes) the docstore and Redis client it builds.

    The docstore comes from `docstore.get_document_store(docstore_url)`; the
    cache from `redis_url`, else the environment variable `REDIS_URL`, else an
    in-process fakeredis server (which needs the `fakeredis[lua]` package).
    """
    url = redis_url if redis_url is not None else os.environ.get(REDIS_VARIABLE) or None
    cache = redis_client_from_url(url) if url else _in_process_redis()
    try:
        documents = get_document_store(docstore_url)
    except BaseException:
        cache.close()
        raise
    try:
        return SessionStore(
            documents,
            cache,
            cache_ttl=cache_ttl,
            session_ttl=session_ttl,
            key_prefix=key_prefix,
            owns_docstore=True,
            owns_cache=True,
        )
    except BaseException:
        cache.close()
        documents.close()
        raise


def get_async_session_store(
    *,
    docstore_url: str | None = None,
    redis_url: str | None = None,
    cache_ttl: float = 3600,
    session_ttl: float | None = None,
    key_prefix: str = "sess:",
) -> AsyncSessionStore:
    """Return an AsyncSessionStore that owns (and closes) what it builds, as `get_session_store`.

    The docstore comes from `docstore.get_async_document_store(docstore_url)`;
    the cache from `redis_url`, else `REDIS_URL` (a `redis.asyncio` client with
    the same timeouts), else an in-process fakeredis server (its asyncio
    client). Nothing connects here; with no docstore URL at all the embedded
    PostgreSQL server is started here, so call this at start-up rather than
    from a coroutine.
    """
    url = redis_url if redis_url is not None else os.environ.get(REDIS_VARIABLE) or None
    # Neither client connects before its first call: nothing to close on failure.
    cache = async_redis_client_from_url(url) if url else _in_process_async_redis()
    return AsyncSessionStore(
        get_async_document_store(docstore_url),
        cache,
        cache_ttl=cache_ttl,
        session_ttl=session_ttl,
        key_prefix=key_prefix,
        owns_docstore=True,
        owns_cache=True,
    )


@dataclass(frozen=True)
class Backends:
    """What `get_session_store()` would connect to, described without secrets."""

    docstore: str
    cache: str
    # The documents outlive this process (PostgreSQL, not memory://).
    persistent: bool
    # Another process reaches the same cache (a Redis server, not in-process fakeredis).
    shared_cache: bool


def describe_backends(*, docstore_url: str | None = None, redis_url: str | None = None) -> Backends:
    """Describe the tiers `get_session_store` would use with these arguments and the environment.

    Names the variable a setting came from and shows host, port and database,
    never a password.
    """
    source = "docstore_url"
    if docstore_url is None:
        source, docstore_url = next(
            ((name, os.environ[name]) for name in URL_VARIABLES if os.environ.get(name)),
            ("", None),
        )
    if docstore_url is None:
        from docstore.embedded import default_data_dir

        documents = f"embedded PostgreSQL, data in {default_data_dir()}"
    elif docstore_url.strip() == MEMORY_URL:
        documents = f"in-memory store ({source}={MEMORY_URL}, nothing kept)"
    else:
        documents = f"PostgreSQL {_postgres_address(docstore_url)} (from {source})"
    redis_source = "redis_url"
    if redis_url is None:
        redis_source, redis_url = REDIS_VARIABLE, os.environ.get(REDIS_VARIABLE) or None
    if redis_url:
        cache = f"Redis {_redis_address(redis_url)} (from {redis_source})"
    else:
        cache = "in-process fakeredis (empty at start, gone at exit)"
    return Backends(
        docstore=documents,
        cache=cache,
        persistent=docstore_url is None or docstore_url.strip() != MEMORY_URL,
        shared_cache=bool(redis_url),
    )


def _postgres_address(dsn: str) -> str:
    try:
        parts = psycopg2.extensions.parse_dsn(dsn)
    except psycopg2.Error:
        return "(unparsable connection string)"
    user = f"{parts['user']}@" if parts.get("user") else ""
    host = parts.get("host") or "localhost"
    port = f":{parts['port']}" if parts.get("port") else ""
    return f"{user}{host}{port}/{parts.get('dbname', '')}"


def _redis_address(url: str) -> str:
    try:
        parts = urlsplit(url)
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "(unparsable URL)"
    return f"{parts.scheme}://{parts.hostname or 'localhost'}{port}{parts.path}"
