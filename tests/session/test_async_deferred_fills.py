"""AsyncSessionStore: a miss awaits only the send of its fill; the reply is read in a task.

What must hold: the fill lands and is counted once `aclose()` has read its
reply; the connection goes back to the pool; a caller cancelled at any
moment of a miss leaves no fill lease and no connection checked out, and
every cached copy equals what PostgreSQL holds (here: the docstore).

Each test runs on fakeredis and on the Redis server named by REDIS_URL
(skipped when unset).
"""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import fakeredis
import pytest
import redis.asyncio

from docstore import AsyncMemoryDocumentStore
from session import AsyncSessionStore
from session.coherence import session_keys
from session.pytest_plugin import REDIS_VARIABLE, unique_key_prefix

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(120)]


@pytest.fixture(params=["fakeredis", "real"])
def kind(request: pytest.FixtureRequest) -> str:
    if request.param == "real" and not os.environ.get(REDIS_VARIABLE):
        pytest.skip(f"{REDIS_VARIABLE} is not set: no real Redis server to test against")
    return str(request.param)


@asynccontextmanager
async def redis_client(kind: str) -> AsyncIterator[redis.asyncio.Redis]:
    """A client of fakeredis or the real server, with a key prefix of its own (removed after)."""
    if kind == "real":
        url = os.environ[REDIS_VARIABLE]
        cache: redis.asyncio.Redis = redis.asyncio.Redis.from_url(url, socket_timeout=2)
    else:
        cache = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
    prefix = unique_key_prefix()
    cache.test_prefix = prefix  # type: ignore[attr-defined]
    try:
        yield cache
    finally:
        keys = [key async for key in cache.scan_iter(match=f"{prefix}*", count=1000)]
        if keys:
            await cache.delete(*keys)
        await cache.aclose()


def in_use(cache: redis.asyncio.Redis) -> int:
    return len(cache.connection_pool._in_use_connections)  # type: ignore[attr-defined]


def new_store(
    docs: AsyncMemoryDocumentStore, cache: redis.asyncio.Redis, suffix: str = ""
) -> AsyncSessionStore:
    return AsyncSessionStore(docs, cache, key_prefix=cache.test_prefix + suffix)  # type: ignore[attr-defined]


async def test_a_miss_returns_before_its_fill_reply_and_aclose_reads_it(kind: str) -> None:
    async with redis_client(kind) as client:
        await miss_then_aclose(client)


async def miss_then_aclose(client: redis.asyncio.Redis) -> None:
    docs = AsyncMemoryDocumentStore()
    store = new_store(docs, client)
    sid = (await store.create_session(data={"n": 1})).id
    assert (await store.get_session(sid)).data == {"n": 1}  # type: ignore[union-attr]
    # The fill was sent; a task of the store still owns its connection and reply.
    assert in_use(client) == 1
    await store.aclose()
    assert in_use(client) == 0
    assert (store.stats()["fills"], store.stats()["cache_errors"]) == (1, 0)
    other = new_store(docs, client)
    assert (await other.get_session(sid)).data == {"n": 1}  # type: ignore[union-attr]
    assert other.stats()["hits"] == 1
    await other.aclose()


async def test_cancelled_misses_leave_no_lease_no_connection_and_no_stale_copy(kind: str) -> None:
    """Many concurrent misses, each cancelled after a random delay (some before their
    first request, some mid-fill, some never), interleaved with updates."""
    async with redis_client(kind) as client:
        await cancelled_rounds(client)


async def cancelled_rounds(client: redis.asyncio.Redis) -> None:
    docs = AsyncMemoryDocumentStore()
    setup = new_store(docs, client)
    ids = [(await setup.create_session(data={"n": 0})).id for _ in range(12)]
    await setup.aclose()
    rng = random.Random(7)
    for round_ in range(15):
        store = new_store(docs, client, f"r{round_}:")

        tasks: list[asyncio.Task[object]] = [
            asyncio.create_task(store.get_session(sid)) for sid in ids
        ]
        tasks += [asyncio.create_task(store.update_session(sid, {"n": round_})) for sid in ids[::3]]
        for task in tasks:
            await asyncio.sleep(rng.choice([0, 0, 0.0002, 0.001]))
            if rng.random() < 0.6:
                task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await store.aclose()
        assert in_use(client) == 0, f"round {round_}: a connection was not given back"
        truth = AsyncSessionStore(docs, None)
        reader = new_store(docs, client, f"r{round_}:")
        for sid in ids:
            keys = session_keys(client.test_prefix + f"r{round_}:", sid)  # type: ignore[attr-defined]
            assert await client.exists(keys.lease) == 0, (
                f"round {round_}: a lease outlived its call"
            )
            assert await reader.get_session(sid) == await truth.get_session(sid), (
                f"round {round_}: a cached copy differs from the docstore"
            )
        await reader.aclose()
        await truth.aclose()


async def test_a_caller_cancelled_while_its_fill_is_sent(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The send of a fill is the miss's last await: cancelled there, the connection goes
    back (closed), the lease is released, and the next miss fills the copy."""
    async with redis_client(kind) as client:
        docs = AsyncMemoryDocumentStore()
        store = new_store(docs, client)
        sid = (await store.create_session(data={"n": 1})).id
        await store.get_session("warm-up")  # started: the scripts are loaded
        fill_sha = store._scripts["FILL_SESSION"][1]
        connection_class = client.connection_pool.connection_class
        send = connection_class.send_packed_command
        sending = asyncio.Event()

        async def slow_send(self: object, command: Any, *args: object, **kwargs: object) -> None:
            packed = command if isinstance(command, bytes) else b"".join(command)
            if fill_sha.encode() in packed and not sending.is_set():
                sending.set()  # the miss's fill (the lease's release after it goes through)
                await asyncio.sleep(10)  # cancelled here
            await send(self, command, *args, **kwargs)

        monkeypatch.setattr(connection_class, "send_packed_command", slow_send)
        task = asyncio.create_task(store.get_session(sid))
        await asyncio.wait_for(sending.wait(), 5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await store.aclose()
        assert in_use(client) == 0
        keys = session_keys(client.test_prefix, sid)  # type: ignore[attr-defined]
        assert await client.exists(keys.lease, keys.value) == 0  # released, nothing installed
        again = new_store(docs, client)
        assert (await again.get_session(sid)).data == {"n": 1}  # type: ignore[union-attr]
        await again.aclose()
        assert (again.stats()["misses"], again.stats()["fills"]) == (1, 1)
