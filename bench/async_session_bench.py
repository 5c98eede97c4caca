"""AsyncSessionStore against an async floor, and 200 coroutines against 8 threads.

Usage: python bench/async_session_bench.py [--rounds 2000] [--blocks 10] [--ops 4000]
           [--json out.json] [--profile]

Talks to the servers named by POSTGRES_CONNECTION_STRING and REDIS_URL (by
default the local ones below). Everything lives in fresh docstore tables and
under fresh key prefixes, all removed at the end.

Latency: each AsyncSessionStore operation is measured in blocks alternating
with its async floor, the same raw statements as bench/session_bench.py's
floor sent through asyncpg (one connection, statements prepared once) and
redis.asyncio, so drift on the machine hits both alike:

- get_session, hit: GET + msgpack decode of the same cached value;
- get_session, miss + fill (cached key deleted untimed before each call):
  one primary-key SELECT + one SET;
- update_session: one upsert (INSERT ... ON CONFLICT DO UPDATE ... RETURNING)
  of an equivalent document + one SET;
- add_message at message 10..60: one statement that bumps the session row and
  inserts the message + one SET.

Target: each library median within 1.3x of its floor's median.

Throughput: one AsyncSessionStore (docstore pool of 10, one redis.asyncio
client with a blocking pool of 64 connections) driven by 200 coroutines,
against one SessionStore (pool of 10, one redis-py client) driven by 8
threads, on two workloads: `hits` (get_session of cached sessions) and `mix`
(70 % hits, 20 % update_session, 10 % add_message). Rounds alternate the two.
Target: 200 coroutines reach at
least the ops/s of 8 threads.

`--profile` then shows where the library's time goes: client CPU per call
(thread time; the rest of the wall time is waiting on the servers or the
loop) and the hot spots under cProfile.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import os
import pstats
import random
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import msgpack
import psycopg2
import redis
import redis.asyncio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import median, p99  # noqa: E402
from session_bench import COLUMNS, MESSAGE_TEXT, SESSION_DATA, pack_session_row  # noqa: E402

from docstore import AsyncPostgresDocumentStore, PostgresDocumentStore  # noqa: E402
from session import AsyncSessionStore, SessionStore  # noqa: E402
from session.coherence import session_keys  # noqa: E402

DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/test"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
SESSIONS = "sessions"
MESSAGES = "messages"
CACHE_TTL_MS = 3_600_000
SHORT_CONVERSATION = 10
APPENDS_PER_SHORT_SESSION = 50
TARGET = 1.3
COROUTINES = 200
THREADS = 8
POOL = 10
REDIS_CONNECTIONS = 64
THROUGHPUT_SESSIONS = 400
PROFILE_CALLS = 1000

AsyncOperation = Callable[[int], Awaitable[object]]


# --------------------------------------------------------------------------- the floor


class AsyncRawFloor:
    """The least work each operation needs, through asyncpg and redis.asyncio."""

    def __init__(self, conn: Any, cache: redis.asyncio.Redis, table: str, prefix: str) -> None:
        self.conn = conn
        self.cache = cache
        self.prefix = prefix
        t = '"' + table.replace('"', '""') + '"'
        self.upsert_sql = (
            f"INSERT INTO {t} AS d (collection, id, data) VALUES ($1, $2, $3::jsonb)"
            " ON CONFLICT (collection, id) DO UPDATE SET data = d.data || EXCLUDED.data,"
            f" version = d.version + 1, updated_at = now() RETURNING {COLUMNS}"
        )
        self.select_sql = f"SELECT {COLUMNS} FROM {t} WHERE collection = $1 AND id = $2"
        self.append_sql = (
            "WITH parent AS ("
            f" UPDATE {t} SET version = version + 1, updated_at = now(), child_seq = child_seq + 1"
            f" WHERE collection = $1 AND id = $2 RETURNING {COLUMNS}, child_seq"
            "), child AS ("
            f" INSERT INTO {t} (collection, id, data)"
            " SELECT $3, $4, $5::jsonb || jsonb_build_object('parent', $6::text,"
            " 'seq', parent.child_seq) FROM parent"
            f" RETURNING {COLUMNS}"
            f") SELECT 'parent', {COLUMNS} FROM parent"
            f" UNION ALL SELECT 'child', {COLUMNS} FROM child"
        )

    @classmethod
    async def connect(
        cls, dsn: str, cache: redis.asyncio.Redis, table: str, prefix: str
    ) -> AsyncRawFloor:
        conn = await asyncpg.connect(dsn)
        # jsonb as psycopg2 hands it over: text in, json.loads out.
        await conn.set_type_codec(
            "jsonb", encoder=lambda text: text, decoder=json.loads, schema="pg_catalog"
        )
        floor = cls(conn, cache, table, prefix)
        # Prepared once: the statement cache of the connection keeps them.
        for statement in (floor.upsert_sql, floor.select_sql, floor.append_sql):
            await conn.prepare(statement)
        return floor

    def key(self, session_id: str) -> str:
        return f"{self.prefix}{session_id}"

    async def new_session(self, name: str, messages: int = 0) -> str:
        session_id = f"raw-{name}-{uuid.uuid4().hex[:8]}"
        meta = {"_session": {"user_id": "u1", "conv": session_id}}
        await self.write(session_id, {**SESSION_DATA, **meta})
        for _ in range(messages):
            await self.append(session_id, cached=False)
        return session_id

    async def hit(self, session_id: str) -> object:
        raw = await self.cache.get(self.key(session_id))
        if not isinstance(raw, bytes):
            raise RuntimeError("the floor's cached value vanished: Redis was flushed or restarted")
        return msgpack.unpackb(raw, raw=False)

    async def write(self, session_id: str, data: dict[str, Any]) -> None:
        row = await self.conn.fetchrow(self.upsert_sql, SESSIONS, session_id, json.dumps(data))
        await self.cache.set(self.key(session_id), pack_session_row(row), px=CACHE_TTL_MS)

    async def miss(self, session_id: str) -> None:
        row = await self.conn.fetchrow(self.select_sql, SESSIONS, session_id)
        await self.cache.set(self.key(session_id), pack_session_row(row), px=CACHE_TTL_MS)

    async def append(self, session_id: str, *, cached: bool = True) -> None:
        message_id = uuid.uuid4().hex
        body = {
            "conv": session_id,
            "message_id": message_id,
            "role": "user",
            "content": MESSAGE_TEXT,
            "metadata": {},
        }
        rows = await self.conn.fetch(
            self.append_sql,
            SESSIONS,
            session_id,
            MESSAGES,
            f"{session_id}.{message_id}",
            json.dumps(body),
            session_id,
        )
        parent = next(row[1:] for row in rows if row[0] == "parent")
        if cached:
            await self.cache.set(self.key(session_id), pack_session_row(parent), px=CACHE_TTL_MS)


# --------------------------------------------------------------------------- latency


async def measure(
    operation: AsyncOperation, rounds: int, prepare: AsyncOperation | None = None
) -> list[float]:
    """Await `operation(i)` `rounds` times; return the durations (prepare(i) untimed)."""
    durations = []
    for i in range(rounds):
        if prepare is not None:
            await prepare(i)
        started = time.perf_counter()
        await operation(i)
        durations.append(time.perf_counter() - started)
    return durations


class ShortConversations:
    """Hands out sessions holding 10 messages; each serves 50 timed appends, then a fresh one."""

    def __init__(self, store: AsyncSessionStore) -> None:
        self._store = store
        self.current = ""
        self._appends = APPENDS_PER_SHORT_SESSION

    async def prepare(self, _: int) -> None:
        if self._appends >= APPENDS_PER_SHORT_SESSION:
            self.current = (await self._store.create_session("u1", SESSION_DATA)).id
            for _ in range(SHORT_CONVERSATION):
                await self._store.add_message(self.current, "user", MESSAGE_TEXT)
            self._appends = 0
        self._appends += 1


class ShortFloorConversations:
    """The floor's twin of ShortConversations."""

    def __init__(self, floor: AsyncRawFloor) -> None:
        self._floor = floor
        self.current = ""
        self._appends = APPENDS_PER_SHORT_SESSION

    async def prepare(self, _: int) -> None:
        if self._appends >= APPENDS_PER_SHORT_SESSION:
            self.current = await self._floor.new_session("a10", SHORT_CONVERSATION)
            self._appends = 0
        self._appends += 1


async def latency(
    args: argparse.Namespace, dsn: str, redis_url: str, names: Names
) -> dict[str, Any]:
    cache = redis.asyncio.Redis.from_url(redis_url)
    docs = AsyncPostgresDocumentStore(dsn, table=names.table, max_connections=POOL)
    store = AsyncSessionStore(docs, cache, key_prefix=names.key_prefix)
    floor: AsyncRawFloor | None = None
    try:
        hit_id, miss_id, write_id = [
            (await store.create_session("u1", SESSION_DATA)).id for _ in range(3)
        ]
        # After the store's first call, which created the table.
        floor = await AsyncRawFloor.connect(dsn, cache, names.table, names.raw_prefix)
        await store.get_session(hit_id)  # filled: every timed get is a hit
        raw_hit, raw_miss, raw_write = [await floor.new_session(name) for name in "hmw"]
        await floor.conn.execute(f'ANALYZE "{names.table}"')
        short, raw_short = ShortConversations(store), ShortFloorConversations(floor)
        miss_key = session_keys(names.key_prefix, miss_id).value

        async def drop_miss_copy(_: int) -> None:
            await cache.delete(miss_key)  # untimed: the next get is a miss

        pairs: dict[str, tuple[AsyncOperation, AsyncOperation]] = {
            "get_session (hit)": (
                lambda i: store.get_session(hit_id),
                lambda i: floor.hit(raw_hit),
            ),
            "get_session (miss + fill)": (
                lambda i: store.get_session(miss_id),
                lambda i: floor.miss(raw_miss),
            ),
            "update_session": (
                lambda i: store.update_session(write_id, {"counter": i}),
                lambda i: floor.write(raw_write, {**SESSION_DATA, "counter": i}),
            ),
            "add_message @10": (
                lambda i: store.add_message(short.current, "user", MESSAGE_TEXT),
                lambda i: floor.append(raw_short.current),
            ),
        }
        prepare: dict[str, AsyncOperation] = {
            "get_session (miss + fill)": drop_miss_copy,
            "add_message @10": short.prepare,
        }
        print(f"measuring {args.rounds} calls per operation in {args.blocks} alternating blocks")
        before = store.stats()
        # The floor's appends move to a fresh conversation on the same schedule.
        floor_prepare = {"add_message @10": raw_short.prepare}
        results = await interleaved(pairs, args.rounds, args.blocks, prepare, floor_prepare)
        after = store.stats()
        counted = ("hits", "misses", "cache_errors", "lease_waits")
        counters = {name: after.get(name, 0) - before.get(name, 0) for name in counted}
        report = latency_table(results)
        print(f"store counters during the measurement: {counters}")
        if args.profile:
            await where_the_time_goes(pairs, prepare)
        return {"latency": report, "store_counters": counters}
    finally:
        if floor is not None:
            await floor.conn.close()
        await store.aclose()
        await docs.aclose()
        await cache.aclose()


async def interleaved(
    pairs: dict[str, tuple[AsyncOperation, AsyncOperation]],
    rounds: int,
    blocks: int,
    prepare: dict[str, AsyncOperation],
    floor_prepare: dict[str, AsyncOperation],
) -> dict[str, tuple[list[float], list[float]]]:
    """Measure library and floor in alternating blocks, so drift hits both alike.

    `prepare[name]` / `floor_prepare[name]` run untimed before each call of that side.
    """
    results: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in pairs}
    per_block = max(1, rounds // blocks)
    for _ in range(blocks):
        for name, (library, floor) in pairs.items():
            setup, floor_setup = prepare.get(name), floor_prepare.get(name)
            await measure(library, 10, setup)  # warm-up
            results[name][0].extend(await measure(library, per_block, setup))
            await measure(floor, 10, floor_setup)
            results[name][1].extend(await measure(floor, per_block, floor_setup))
    return results


def latency_table(results: dict[str, tuple[list[float], list[float]]]) -> dict[str, Any]:
    header = (
        f"{'operation':<28}{'library':>10}{'p99':>9}{'floor':>10}{'p99':>9}"
        f"{'ratio':>8}{'target':>8}  verdict"
    )
    print()
    print(header)
    print("-" * len(header))
    report = {}
    for name, (library, floor) in results.items():
        ratio = median(library) / median(floor)
        verdict = "ok" if ratio <= TARGET else "MISSED"
        print(
            f"{name:<28}{median(library) * 1e6:>8.0f}us{p99(library) * 1e6:>7.0f}us"
            f"{median(floor) * 1e6:>8.0f}us{p99(floor) * 1e6:>7.0f}us"
            f"{ratio:>7.2f}x{TARGET:>7.2f}x  {verdict}"
        )
        report[name] = {
            "library_median_us": round(median(library) * 1e6, 1),
            "library_p99_us": round(p99(library) * 1e6, 1),
            "floor_median_us": round(median(floor) * 1e6, 1),
            "floor_p99_us": round(p99(floor) * 1e6, 1),
            "ratio": round(ratio, 3),
            "target": TARGET,
            "ok": ratio <= TARGET,
        }
    print("(medians; ratio = library median / floor median, same run, interleaved blocks)")
    return report


async def where_the_time_goes(
    pairs: dict[str, tuple[AsyncOperation, AsyncOperation]], prepare: dict[str, AsyncOperation]
) -> None:
    """Print client CPU per call (library against floor) and the library's cProfile hot spots."""
    print("\n--- client CPU per call (thread time; the rest of the wall time is waiting) ---")
    print(f"{'operation':<28}{'library CPU':>12}{'floor CPU':>11}{'overhead':>10}")
    for name, (library, floor) in pairs.items():
        spent = [0.0, 0.0]
        setup = prepare.get(name)
        for i in range(PROFILE_CALLS):
            if setup is not None:
                await setup(i)
            for side, operation in enumerate((library, floor)):
                started = time.thread_time()
                await operation(i)
                spent[side] += time.thread_time() - started
        lib_us, floor_us = (total / PROFILE_CALLS * 1e6 for total in spent)
        print(f"{name:<28}{lib_us:>10.0f}us{floor_us:>9.0f}us{lib_us - floor_us:>8.0f}us")
    print("\n--- library hot spots (cProfile, which inflates Python time ~2x) ---")
    for name, (library, _) in pairs.items():
        profiler = cProfile.Profile()
        setup = prepare.get(name)
        for i in range(PROFILE_CALLS):
            if setup is not None:
                await setup(i)
            profiler.enable()
            await library(i)
            profiler.disable()
        entries = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
        rows = []
        for (filename, line, function), (_, calls, tottime, _, _) in entries.items():
            label = function if filename == "~" else f"{Path(filename).name}:{line}({function})"
            if "select" in label or "epoll" in label:
                continue  # the loop waiting on a server, not client work
            rows.append((tottime, calls, label))
        rows.sort(reverse=True)
        print(f"\n{name}: top self time per call (us), calls per call")
        for tottime, calls, label in rows[:10]:
            print(
                f"    {tottime / PROFILE_CALLS * 1e6:7.1f}  {calls / PROFILE_CALLS:5.1f}x  {label}"
            )


# --------------------------------------------------------------------------- throughput


def payload(i: int) -> dict[str, object]:
    return {**SESSION_DATA, "counter": i, "cart": [{"sku": f"SKU-{i}-{k}"} for k in range(6)]}


def pick(i: int, workload: str) -> str:
    """Return the operation number `i` of `workload` does: hit, update or append."""
    if workload == "hits":
        return "hit"
    draw = random.Random(i).random()
    return "hit" if draw < 0.7 else "update" if draw < 0.9 else "append"


def sync_operation(store: SessionStore, ids: list[str], workload: str) -> Callable[[int], object]:
    def operation(i: int) -> object:
        session_id = ids[i % len(ids)]
        what = pick(i, workload)
        if what == "hit":
            return store.get_session(session_id)
        if what == "update":
            return store.update_session(session_id, {"counter": i})
        return store.add_message(session_id, "user", MESSAGE_TEXT)

    return operation


def async_operation(store: AsyncSessionStore, ids: list[str], workload: str) -> AsyncOperation:
    async def operation(i: int) -> object:
        session_id = ids[i % len(ids)]
        what = pick(i, workload)
        if what == "hit":
            return await store.get_session(session_id)
        if what == "update":
            return await store.update_session(session_id, {"counter": i})
        return await store.add_message(session_id, "user", MESSAGE_TEXT)

    return operation


def sync_throughput(operation: Callable[[int], object], ops: int) -> tuple[float, float]:
    """Return (ops/s, process CPU us per op) of THREADS threads running `operation`."""
    per_thread = max(1, ops // THREADS)
    start_line = threading.Barrier(THREADS + 1)

    def work(offset: int) -> None:
        start_line.wait()
        for n in range(per_thread):
            operation(offset + n)

    workers = [threading.Thread(target=work, args=(t * per_thread,)) for t in range(THREADS)]
    for worker in workers:
        worker.start()
    start_line.wait()
    started, cpu = time.perf_counter(), time.process_time()
    for worker in workers:
        worker.join()
    done = THREADS * per_thread
    return done / (time.perf_counter() - started), (time.process_time() - cpu) / done * 1e6


async def async_throughput(operation: AsyncOperation, ops: int) -> tuple[float, float]:
    """Return (ops/s, process CPU us per op) of COROUTINES coroutines awaiting `operation`."""
    per_task = max(1, ops // COROUTINES)

    async def work(offset: int) -> None:
        for n in range(per_task):
            await operation(offset + n)

    started, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(work(t * per_task) for t in range(COROUTINES)))
    done = COROUTINES * per_task
    return done / (time.perf_counter() - started), (time.process_time() - cpu) / done * 1e6


async def throughput(
    args: argparse.Namespace, dsn: str, redis_url: str, names: Names
) -> dict[str, Any]:
    sync_cache = redis.Redis.from_url(redis_url, max_connections=32)
    sync_docs = PostgresDocumentStore(dsn, table=names.sync_table, max_connections=POOL)
    sync_store = SessionStore(sync_docs, sync_cache, key_prefix=names.sync_prefix)
    # A pool that makes a coroutine wait for a free connection: redis.asyncio's
    # default pool (100 connections) raises MaxConnectionsError beyond that.
    async_cache = redis.asyncio.Redis(
        connection_pool=redis.asyncio.BlockingConnectionPool.from_url(
            redis_url, max_connections=REDIS_CONNECTIONS, timeout=5
        )
    )
    async_docs = AsyncPostgresDocumentStore(dsn, table=names.table, max_connections=POOL)
    async_store = AsyncSessionStore(async_docs, async_cache, key_prefix=names.key_prefix)
    runs: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}
    errors: dict[str, int] = {}
    try:
        sync_ids = [
            sync_store.create_session(f"u{i}", payload(i)).id for i in range(THROUGHPUT_SESSIONS)
        ]
        async_ids = [
            (await async_store.create_session(f"u{i}", payload(i))).id
            for i in range(THROUGHPUT_SESSIONS)
        ]
        raw_keys = [f"{names.raw_prefix}tp{i}" for i in range(THROUGHPUT_SESSIONS)]
        for i in range(THROUGHPUT_SESSIONS):  # every session cached
            sync_store.get_session(sync_ids[i])
            await async_store.get_session(async_ids[i])
            value = msgpack.packb([1, payload(i)])
            sync_cache.set(raw_keys[i], value, px=CACHE_TTL_MS)

        # The floor of a hit, for scale: GET + msgpack decode, from threads and coroutines.
        def floor_hit(i: int) -> object:
            return msgpack.unpackb(sync_cache.get(raw_keys[i % len(raw_keys)]))

        async def async_floor_hit(i: int) -> object:
            return msgpack.unpackb(await async_cache.get(raw_keys[i % len(raw_keys)]))

        configurations: list[tuple[str, Callable[[int], object], AsyncOperation]] = [
            ("hits", sync_operation(sync_store, sync_ids, "hits"),
             async_operation(async_store, async_ids, "hits")),
            ("mix", sync_operation(sync_store, sync_ids, "mix"),
             async_operation(async_store, async_ids, "mix")),
            ("floor hits", floor_hit, async_floor_hit),
        ]  # fmt: skip
        print(f"\nthroughput: {COROUTINES} coroutines against {THREADS} threads, "
              f"{args.ops} ops per run, {args.throughput_rounds} alternating rounds")  # fmt: skip
        for _ in range(args.throughput_rounds):
            for workload, sync_op, async_op in configurations:
                ops = args.ops // 2 if workload == "mix" else args.ops
                # The threads block the loop's thread: nothing else runs meanwhile.
                sync_throughput(sync_op, ops // 4)  # warm-up
                rate, cpu_us = sync_throughput(sync_op, ops)
                runs.setdefault(f"{workload}: sync {THREADS} threads", []).append(rate)
                cpu.setdefault(f"{workload}: sync {THREADS} threads", []).append(cpu_us)
                await async_throughput(async_op, ops // 4)
                rate, cpu_us = await async_throughput(async_op, ops)
                runs.setdefault(f"{workload}: async {COROUTINES} coroutines", []).append(rate)
                cpu.setdefault(f"{workload}: async {COROUTINES} coroutines", []).append(cpu_us)
        for name, store_stats in (("sync", sync_store.stats()), ("async", async_store.stats())):
            errors[name] = store_stats.get("cache_errors", 0)
    finally:
        await async_store.aclose()
        await async_docs.aclose()
        await async_cache.aclose()
        sync_store.close()
        sync_docs.close()
        sync_cache.close()
    result = {key: round(statistics.median(values)) for key, values in runs.items()}
    cpu_per_op = {key: round(statistics.median(values), 1) for key, values in cpu.items()}
    print(f"{'':36} {'ops/s':>9}  {'CPU/op':>8}  (ops/s of each round)")
    for key, value in result.items():
        rounds = ", ".join(f"{v:,.0f}" for v in runs[key])
        print(f"{key:36} {value:>9,}  {cpu_per_op[key]:>6.0f}us  ({rounds})")
    ratios = {}
    for workload, _, _ in configurations:
        ratio = (
            result[f"{workload}: async {COROUTINES} coroutines"]
            / result[f"{workload}: sync {THREADS} threads"]
        )
        ratios[f"{workload}: async / sync"] = round(ratio, 2)
        verdict = (
            ""
            if workload.startswith("floor")
            else "  (target >= 1.00x)  " + ("ok" if ratio >= 1.0 else "MISSED")
        )
        print(f"{workload}: {COROUTINES} coroutines / {THREADS} threads = {ratio:.2f}x{verdict}")
    print(f"cache errors (a Redis call that failed and fell back to PostgreSQL): {errors}")
    print(
        "(CPU/op: this process' CPU time per operation, all threads; on a busy machine the"
        " 8 threads get up to 8 scheduler shares where the event loop's thread gets one)"
    )
    return {
        "ops_s": result,
        "rounds_ops_s": runs,
        "cpu_us_per_op": cpu_per_op,
        "ratios": ratios,
        "cache_errors": errors,
    }


# --------------------------------------------------------------------------- main


class Names:
    """This run's tables and key prefixes (dropped and deleted at the end)."""

    def __init__(self) -> None:
        run = uuid.uuid4().hex[:10]
        self.table = f"bench_async_{run}"
        self.sync_table = f"bench_sync_{run}"
        self.key_prefix = f"bencha{run}:"
        self.sync_prefix = f"benchs{run}:"
        # The floor's keys sit outside the store's namespace, as in session_bench.py.
        self.raw_prefix = f"benchraw{run}:"

    def clean_up(self, dsn: str, redis_url: str) -> None:
        conn = psycopg2.connect(dsn)
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                for table in (self.table, self.sync_table):
                    for name in (table, f"{table}_meta"):
                        cur.execute(f'DROP TABLE IF EXISTS "{name}"')
        finally:
            conn.close()
        cache = redis.Redis.from_url(redis_url)
        try:
            for prefix in (self.key_prefix, self.sync_prefix, self.raw_prefix):
                keys = list(cache.scan_iter(match=f"{prefix}*", count=1000))
                for start in range(0, len(keys), 500):
                    cache.delete(*keys[start : start + 500])
        finally:
            cache.close()


async def run(args: argparse.Namespace, dsn: str, redis_url: str, names: Names) -> dict[str, Any]:
    report: dict[str, Any] = {}
    if not args.skip_latency:
        report.update(await latency(args, dsn, redis_url, names))
    if not args.skip_throughput:
        report["throughput"] = await throughput(args, dsn, redis_url, names)
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2000, help="timed calls per operation")
    parser.add_argument("--blocks", type=int, default=10, help="library/floor alternations")
    parser.add_argument("--ops", type=int, default=4000, help="operations per throughput run")
    parser.add_argument("--throughput-rounds", type=int, default=5)
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--profile", action="store_true", help="where the library's time goes")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument(
        "--uvloop", action="store_true", help="run on uvloop's event loop (pip install uvloop)"
    )
    args = parser.parse_args()
    dsn = os.environ.get("POSTGRES_CONNECTION_STRING") or DEFAULT_DSN
    redis_url = os.environ.get("REDIS_URL") or DEFAULT_REDIS_URL
    names = Names()
    started = time.monotonic()
    load = os.getloadavg()
    try:
        if args.uvloop:
            import uvloop

            report = uvloop.run(run(args, dsn, redis_url, names))
        else:
            report = asyncio.run(run(args, dsn, redis_url, names))
    finally:
        names.clean_up(dsn, redis_url)
    elapsed = time.monotonic() - started
    loop = "uvloop" if args.uvloop else "asyncio"
    print(f"\n(event loop: {loop}; run took {elapsed:.0f} s; load average {load[0]:.2f} before, "
          f"{os.getloadavg()[0]:.2f} after, on {os.cpu_count()} cpus)")  # fmt: skip
    if args.json:
        report["meta"] = {
            "rounds": args.rounds,
            "blocks": args.blocks,
            "ops": args.ops,
            "throughput_rounds": args.throughput_rounds,
            "coroutines": COROUTINES,
            "threads": THREADS,
            "pool": POOL,
            "elapsed_s": round(elapsed, 1),
            "loadavg_before": load,
            "loadavg_after": os.getloadavg(),
            "cpus": os.cpu_count(),
            "event_loop": "uvloop" if args.uvloop else "asyncio",
        }
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
