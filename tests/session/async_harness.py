"""Backends and call-counting proxies for the asyncio session store's black-box tests.

`Backends` is what one test runs on: an `AsyncPostgresDocumentStore` on a table
of its own (the embedded server, or the one named by POSTGRES_CONNECTION_STRING)
and a `redis.asyncio` client (fakeredis, or the server named by REDIS_URL),
with a key prefix of its own. Built inside the test's event loop.

`CancelAt` wraps the docstore and the Redis client the store under test gets:
every awaited call (a docstore method, a Redis command, a pipeline's execute,
a transaction's BEGIN and COMMIT) is an await point, counted in order. With a
target `k`, the calling task is cancelled at the k-th point:
- "before": before the call is made;
- "during": as soon as the call waits for the server (the request is sent,
  the answer not read: the driver itself is interrupted);
- "after": once the call has completed on the server, before the caller sees
  the answer (the answer is lost).
"""

from __future__ import annotations

import asyncio
import inspect
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import fakeredis
import psycopg2
import redis.asyncio

from docstore import AsyncPostgresDocumentStore
from session import AsyncSessionStore
from session.coherence import session_keys
from session.pytest_plugin import REDIS_VARIABLE, unique_key_prefix

PHASES = ("before", "during", "after")


def real_servers() -> tuple[str, str] | None:
    """Return (PostgreSQL DSN, Redis URL) when both real servers are configured."""
    dsn = os.environ.get("POSTGRES_CONNECTION_STRING")
    url = os.environ.get(REDIS_VARIABLE)
    return (dsn, url) if dsn and url else None


@dataclass
class CancelAt:
    """Count awaited calls; cancel the calling task at the `target`-th one (see module doc)."""

    target: int | None = None
    phase: str = "before"
    count: int = 0
    points: list[str] = field(default_factory=list)
    fired: bool = False
    victim: asyncio.Task[Any] | None = None

    def arm(
        self, target: int | None, phase: str = "before", victim: asyncio.Task[Any] | None = None
    ) -> None:
        """Cancel `victim` (default: the task making the call) at point `target`, in `phase`."""
        self.target, self.phase, self.count, self.fired = target, phase, 0, False
        self.points = []
        self.victim = victim

    async def point(self, name: str, call: Callable[[], Awaitable[Any]]) -> Any:
        self.count += 1
        self.points.append(name)
        if self.count != self.target:
            return await call()
        self.fired = True
        # The caller's task is cancelled (the store may run a call's request in
        # a task of its own: that one is not the caller).
        victim = self.victim or asyncio.current_task()
        assert victim is not None
        if self.phase == "before":
            victim.cancel()
            await asyncio.sleep(0)  # raises CancelledError if this is the caller's task
            return await call()
        if self.phase == "during":
            asyncio.get_running_loop().call_soon(victim.cancel)
            result = await call()
            # The call never waited (answered at once): the cancellation lands here.
            await asyncio.sleep(0)
            return result
        result = await call()
        victim.cancel()
        await asyncio.sleep(0)
        return result


def _closing(awaitable: Awaitable[Any]) -> None:
    close = getattr(awaitable, "close", None)
    if close is not None:
        close()


class _Counted:
    """Forward attribute access; a call returning an awaitable becomes an await point."""

    def __init__(self, inner: Any, plan: CancelAt, tier: str) -> None:
        self._inner = inner
        self._plan = plan
        self._tier = tier

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._inner, name)
        if not callable(attribute) or name.startswith("_"):
            return attribute

        def call(*args: Any, **kwargs: Any) -> Any:
            result = attribute(*args, **kwargs)
            if not inspect.isawaitable(result):
                return result
            return self._counted(f"{self._tier}.{name}", result)

        return call

    async def _counted(self, name: str, awaitable: Awaitable[Any]) -> Any:
        started = False

        async def run() -> Any:
            nonlocal started
            started = True
            return await awaitable

        try:
            return await self._plan.point(name, run)
        finally:
            if not started:
                _closing(awaitable)


class CountedDocstore(_Counted):
    def __init__(self, inner: AsyncPostgresDocumentStore, plan: CancelAt) -> None:
        super().__init__(inner, plan, "doc")

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        inner = self._inner.transaction()
        entered = False

        async def begin() -> None:
            nonlocal entered
            await inner.__aenter__()
            entered = True

        try:
            await self._plan.point("doc.BEGIN", begin)
        except BaseException as exc:
            if entered:  # BEGIN answered, then cancelled: roll back
                await inner.__aexit__(type(exc), exc, exc.__traceback__)
            raise
        try:
            yield
        except BaseException as exc:
            if not await inner.__aexit__(type(exc), exc, exc.__traceback__):
                raise
            return
        committed = False

        async def commit() -> None:
            nonlocal committed
            committed = True
            await inner.__aexit__(None, None, None)

        try:
            await self._plan.point("doc.COMMIT", commit)
        except BaseException as exc:
            if not committed:  # cancelled before COMMIT was sent: roll back
                await inner.__aexit__(type(exc), exc, exc.__traceback__)
            raise


class _CountedPipeline(_Counted):
    """Queued commands return the pipeline (itself awaitable): only `execute` is awaited."""

    def __getattr__(self, name: str) -> Any:
        if name == "execute":
            return super().__getattr__(name)
        attribute = getattr(self._inner, name)
        if not callable(attribute):
            return attribute

        def queue(*args: Any, **kwargs: Any) -> _CountedPipeline:
            attribute(*args, **kwargs)
            return self

        return queue


class CountedRedis(_Counted):
    def __init__(self, inner: redis.asyncio.Redis, plan: CancelAt) -> None:
        super().__init__(inner, plan, "redis")

    def pipeline(self, *args: Any, **kwargs: Any) -> Any:
        return _CountedPipeline(self._inner.pipeline(*args, **kwargs), self._plan, "redis.pipeline")

    def get_encoder(self) -> Any:
        return self._inner.get_encoder()


async def settled(store: AsyncSessionStore) -> None:
    """Wait until `store` has nothing left in the background: a fill's reply still
    to read, the clean-up of a cancelled call."""
    while store._cleanups:
        await asyncio.wait(set(store._cleanups))


def sql_rows(dsn: str, statement: str, params: tuple[Any, ...] = ()) -> list[Any]:
    """Run one statement on a connection of its own (blocking: call it in a thread)."""
    conn = psycopg2.connect(dsn)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(statement, params)
            return list(cur.fetchall()) if cur.description else []
    finally:
        conn.close()


@dataclass
class Backends:
    dsn: str
    table: str
    docstore: AsyncPostgresDocumentStore
    cache: redis.asyncio.Redis
    key_prefix: str
    plan: CancelAt = field(default_factory=CancelAt)
    stores: list[AsyncSessionStore] = field(default_factory=list)
    named: dict[str, AsyncSessionStore] = field(default_factory=dict)

    def store(
        self, *, cached: bool = True, counted: bool = False, **kwargs: Any
    ) -> AsyncSessionStore:
        """A store on the shared table and prefix; `counted`: through the `CancelAt` proxies."""
        docs: Any = CountedDocstore(self.docstore, self.plan) if counted else self.docstore
        cache: Any = None
        if cached:
            cache = CountedRedis(self.cache, self.plan) if counted else self.cache
        store = AsyncSessionStore(docs, cache, key_prefix=self.key_prefix, **kwargs)
        self.stores.append(store)
        return store

    def shared(self, name: str, **kwargs: Any) -> AsyncSessionStore:
        """The store `name` of this test, built by `store(**kwargs)` on first use.

        Any store but the one under test reads as "another process" would.
        """
        if name not in self.named:
            self.named[name] = self.store(**kwargs)
        return self.named[name]

    async def leases(self, *session_ids: str) -> list[str]:
        """Names of fill-lease keys of these sessions still in Redis, and any under the prefix."""
        found = []
        for session_id in session_ids:
            keys = session_keys(self.key_prefix, session_id)
            for key in (keys.lease, keys.tail_lease):
                if await self.cache.exists(key):
                    found.append(key)
        async for key in self.cache.scan_iter(match=self.key_prefix + "*"):
            name = key.decode()
            if name.endswith(":lease") and name not in found:
                found.append(name)
        return found

    async def busy_backends(self) -> list[str]:
        """Server connections mid-statement or mid-transaction on the table (not this check's)."""
        return await asyncio.to_thread(
            sql_rows,
            self.dsn,
            "SELECT state, left(query, 80) FROM pg_stat_activity"
            " WHERE pid <> pg_backend_pid() AND state IS NOT NULL AND state <> 'idle'"
            " AND position(%s in query) > 0",
            (self.table,),
        )

    async def aclose(self) -> None:
        for store in self.stores:
            await store.aclose()
        keys = [key async for key in self.cache.scan_iter(match=self.key_prefix + "*")]
        if keys:
            await self.cache.delete(*keys)
        await self.docstore.aclose()
        await self.cache.aclose()


@asynccontextmanager
async def backends(
    dsn: str, table: str, fake_server: fakeredis.FakeServer | None
) -> AsyncIterator[Backends]:
    """Build `Backends` in the running loop: fakeredis on `fake_server`, else real Redis."""
    if fake_server is None:
        servers = real_servers()
        assert servers is not None
        cache: redis.asyncio.Redis = redis.asyncio.Redis.from_url(servers[1])
    else:
        cache = fakeredis.FakeAsyncRedis(server=fake_server)
    found = Backends(
        dsn, table, AsyncPostgresDocumentStore(dsn, table=table), cache, unique_key_prefix()
    )
    try:
        yield found
    finally:
        await found.aclose()


class ReplyGate:
    """A loopback TCP proxy (in the test's event loop) that can hold the server's replies.

    Requests always reach the server; while `hold()` is in force, what the
    server answers waits in the proxy until `release()`: a command executed,
    its reply not yet read by the client.
    """

    def __init__(self, host: str, port: int) -> None:
        self._target = (host, port)
        self._open = asyncio.Event()
        self._open.set()
        self.held = asyncio.Event()  # set once a reply waits
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0

    async def start(self) -> ReplyGate:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def hold(self) -> None:
        self.held.clear()
        self._open.clear()

    def release(self) -> None:
        self._open.set()

    async def aclose(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self._target)
        requests = asyncio.create_task(self._pump(reader, up_writer, replies=False))
        replies = asyncio.create_task(self._pump(up_reader, writer, replies=True))
        self._tasks.update((requests, replies))
        await asyncio.wait((requests, replies), return_when=asyncio.FIRST_COMPLETED)
        for task in (requests, replies):
            task.cancel()
            self._tasks.discard(task)
        for stream in (writer, up_writer):
            stream.close()

    async def _pump(
        self, source: asyncio.StreamReader, sink: asyncio.StreamWriter, *, replies: bool
    ) -> None:
        while chunk := await source.read(65536):
            if replies and not self._open.is_set():
                self.held.set()
                await self._open.wait()
            sink.write(chunk)
            await sink.drain()
