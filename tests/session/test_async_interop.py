"""A sync and an async store on the same table and key prefix: no stale read across them.

Sync writers (threads) and async readers (tasks on an event loop), and the
reverse, work on the same sessions at once, sharing PostgreSQL and Redis; the
test also evicts the sessions' cached copies now and then, so that readers of
both kinds fill while the other kind writes. Each write, once returned,
raises the version (and last message seq) every later read must reach: a
read must return at least the version of the last write that returned
before the read started.

Runs on the embedded PostgreSQL server + fakeredis (one server shared by the
sync and the async client), or on the real servers when
POSTGRES_CONNECTION_STRING and REDIS_URL are set.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import fakeredis
import pytest
import redis
import redis.asyncio
from async_harness import real_servers
from postgres_tables import drop_tables, unique_table

from docstore import AsyncPostgresDocumentStore, PostgresDocumentStore
from session import AsyncSessionStore, SessionStore
from session.coherence import session_keys
from session.pytest_plugin import unique_key_prefix

SESSIONS = 3
WRITES_PER_WORKER = 25
WORKERS = 2
READERS = 3


@dataclass
class Acked:
    """Per session: the highest version and message seq a returned write produced."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    version: dict[str, int] = field(default_factory=dict)
    seq: dict[str, int] = field(default_factory=dict)
    reads: int = 0
    errors: list[str] = field(default_factory=list)

    def wrote(self, session_id: str, *, version: int | None = None, seq: int | None = None) -> None:
        with self.lock:
            if version is not None:
                self.version[session_id] = max(self.version.get(session_id, 0), version)
            if seq is not None:
                self.seq[session_id] = max(self.seq.get(session_id, 0), seq)

    def floor(self, session_id: str) -> tuple[int, int]:
        with self.lock:
            return self.version.get(session_id, 0), self.seq.get(session_id, 0)

    def check(
        self, session_id: str, floor: tuple[int, int], version: int | None, seq: int, who: str
    ) -> None:
        with self.lock:
            self.reads += 1
            if version is None or version < floor[0]:
                self.errors.append(
                    f"{who}: session version {version} after version {floor[0]} was acked"
                )
            if seq < floor[1]:
                self.errors.append(f"{who}: last message seq {seq} after seq {floor[1]} was acked")


@dataclass
class Shared:
    dsn: str
    table: str
    key_prefix: str
    fake_server: fakeredis.FakeServer | None
    redis_url: str | None

    def sync_cache(self) -> redis.Redis:
        if self.fake_server is not None:
            return fakeredis.FakeRedis(server=self.fake_server)
        assert self.redis_url is not None
        return redis.Redis.from_url(self.redis_url)

    def async_cache(self) -> redis.asyncio.Redis:
        if self.fake_server is not None:
            return fakeredis.FakeAsyncRedis(server=self.fake_server)
        assert self.redis_url is not None
        return redis.asyncio.Redis.from_url(self.redis_url)


@pytest.fixture
def shared(request: pytest.FixtureRequest) -> Iterator[Shared]:
    servers = real_servers()
    if servers is None:
        dsn: str = request.getfixturevalue("embedded_dsn")
        setup = Shared(dsn, unique_table(), unique_key_prefix(), fakeredis.FakeServer(), None)
    else:
        setup = Shared(servers[0], unique_table(), unique_key_prefix(), None, servers[1])
    try:
        yield setup
    finally:
        cache = setup.sync_cache()
        keys = list(cache.scan_iter(match=setup.key_prefix + "*"))
        if keys:
            cache.delete(*keys)
        cache.close()
        drop_tables(setup.dsn, [setup.table])


class _SyncStore(SessionStore):
    """A sync store that closes the docstore and client it was given."""

    def __init__(self, setup: Shared) -> None:
        self.documents = PostgresDocumentStore(setup.dsn, table=setup.table)
        self.client = setup.sync_cache()
        super().__init__(self.documents, self.client, key_prefix=setup.key_prefix)


def _sync_store(setup: Shared) -> _SyncStore:
    return _SyncStore(setup)


def _close_sync(store: _SyncStore) -> None:
    store.close()
    store.documents.close()
    store.client.close()


def _async_store(
    setup: Shared,
) -> tuple[AsyncSessionStore, AsyncPostgresDocumentStore, redis.asyncio.Redis]:
    docs = AsyncPostgresDocumentStore(setup.dsn, table=setup.table)
    cache = setup.async_cache()
    return AsyncSessionStore(docs, cache, key_prefix=setup.key_prefix), docs, cache


async def _close_async(store: AsyncSessionStore, docs: Any, cache: Any) -> None:
    await store.aclose()
    await docs.aclose()
    await cache.aclose()


def _sync_writer(setup: Shared, ids: list[str], acked: Acked, worker: int) -> None:
    store = _sync_store(setup)
    cache = setup.sync_cache()
    try:
        for i in range(WRITES_PER_WORKER):
            session_id = ids[(i + worker) % len(ids)]
            if i % 2:
                acked.wrote(
                    session_id, version=store.update_session(session_id, {f"w{worker}": i}).version
                )
            else:
                message = store.add_message(session_id, "user", f"{worker}-{i}")
                acked.wrote(session_id, seq=message.seq)
            if i % 5 == 4:  # an eviction: the next readers fill
                cache.delete(*session_keys(setup.key_prefix, session_id).all())
    except Exception as exc:  # reported by the test
        acked.errors.append(f"sync writer {worker}: {exc!r}")
    finally:
        cache.close()
        _close_sync(store)


async def _async_writer(
    store: AsyncSessionStore,
    cache: redis.asyncio.Redis,
    setup: Shared,
    ids: list[str],
    acked: Acked,
    worker: int,
) -> None:
    for i in range(WRITES_PER_WORKER):
        session_id = ids[(i + worker) % len(ids)]
        if i % 2:
            updated = await store.update_session(session_id, {f"w{worker}": i})
            acked.wrote(session_id, version=updated.version)
        else:
            message = await store.add_message(session_id, "user", f"{worker}-{i}")
            acked.wrote(session_id, seq=message.seq)
        if i % 5 == 4:
            await cache.delete(*session_keys(setup.key_prefix, session_id).all())


async def _async_reader(
    store: AsyncSessionStore, ids: list[str], acked: Acked, done: threading.Event, who: str
) -> None:
    i = 0
    while not done.is_set():
        session_id = ids[i % len(ids)]
        i += 1
        floor = acked.floor(session_id)
        session = await store.get_session(session_id)
        messages = await store.get_messages(session_id, limit=2)
        acked.check(
            session_id,
            floor,
            None if session is None else session.version,
            messages[-1].seq if messages else 0,
            who,
        )


def _sync_reader(
    setup: Shared, ids: list[str], acked: Acked, done: threading.Event, who: str
) -> None:
    store = _sync_store(setup)
    try:
        i = 0
        while not done.is_set():
            session_id = ids[i % len(ids)]
            i += 1
            floor = acked.floor(session_id)
            session = store.get_session(session_id)
            messages = store.get_messages(session_id, limit=2)
            acked.check(
                session_id,
                floor,
                None if session is None else session.version,
                messages[-1].seq if messages else 0,
                who,
            )
    except Exception as exc:
        acked.errors.append(f"{who}: {exc!r}")
    finally:
        _close_sync(store)


def _sessions(setup: Shared) -> list[str]:
    store = _sync_store(setup)
    try:
        return [store.create_session(f"user-{n}", {"n": n}).id for n in range(SESSIONS)]
    finally:
        _close_sync(store)


def test_sync_writers_async_readers(shared: Shared) -> None:
    ids = _sessions(shared)
    acked = Acked()
    done = threading.Event()

    async def main() -> None:
        store, docs, cache = _async_store(shared)
        try:
            await store.get_session(ids[0])  # started before the writers
            writers = [
                threading.Thread(target=_sync_writer, args=(shared, ids, acked, worker))
                for worker in range(WORKERS)
            ]
            for thread in writers:
                thread.start()
            readers = [
                asyncio.create_task(_async_reader(store, ids, acked, done, f"async reader {n}"))
                for n in range(READERS)
            ]
            while any(thread.is_alive() for thread in writers):
                await asyncio.sleep(0.01)
            done.set()
            await asyncio.gather(*readers)
        finally:
            done.set()
            await _close_async(store, docs, cache)

    asyncio.run(main())
    assert acked.errors == []
    assert acked.reads >= READERS
    assert sum(acked.seq.values()) == WORKERS * ((WRITES_PER_WORKER + 1) // 2)


def test_async_writers_sync_readers(shared: Shared) -> None:
    ids = _sessions(shared)
    acked = Acked()
    done = threading.Event()
    readers = [
        threading.Thread(target=_sync_reader, args=(shared, ids, acked, done, f"sync reader {n}"))
        for n in range(READERS)
    ]

    async def main() -> None:
        store, docs, cache = _async_store(shared)
        try:
            await asyncio.gather(
                *(
                    _async_writer(store, cache, shared, ids, acked, worker)
                    for worker in range(WORKERS)
                )
            )
        finally:
            await _close_async(store, docs, cache)

    for thread in readers:
        thread.start()
    try:
        asyncio.run(main())
    finally:
        done.set()
        for thread in readers:
            thread.join()
    assert acked.errors == []
    assert acked.reads >= READERS
    assert sum(acked.seq.values()) == WORKERS * ((WRITES_PER_WORKER + 1) // 2)
