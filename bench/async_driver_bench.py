"""Choose the asyncio PostgreSQL driver: asyncpg against psycopg 3 on the docstore's statements.

Usage: POSTGRES_CONNECTION_STRING=postgresql://... python bench/async_driver_bench.py
(psycopg 3 and psycopg_pool are needed for the comparison only:
`pip install "psycopg[binary]" psycopg_pool`).

Both drivers run the same single-row read and merge-update the docstore sends
(prepared once per connection, autocommit) on one table of their own, first
one call at a time, then 64 coroutines sharing a pool of 8 connections. Prints
microseconds per call (median of 5 blocks) and calls per second.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable

import asyncpg

READ = "SELECT id, collection, data, created_at FROM {t} WHERE collection = %s AND id = %s"
UPDATE = (
    "UPDATE {t} SET data = data || %s::jsonb, version = version + 1 "
    "WHERE collection = %s AND id = %s RETURNING id, collection, data, created_at"
)
SEQUENTIAL = 2000
CONCURRENT_TASKS = 64
POOL_SIZE = 8
CONCURRENT_CALLS = 6000


def numbered(text: str) -> str:
    count = 0
    out = []
    for part in text.split("%s"):
        out.append(part)
        count += 1
        out.append(f"${count}")
    return "".join(out[:-1])


async def per_call(call: Callable[[], Awaitable[object]]) -> float:
    blocks = []
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(SEQUENTIAL // 5):
            await call()
        blocks.append((time.perf_counter() - started) / (SEQUENTIAL // 5))
    return statistics.median(blocks) * 1e6


async def throughput(call: Callable[[], Awaitable[object]]) -> float:
    remaining = CONCURRENT_CALLS

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await call()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(CONCURRENT_TASKS)))
    return CONCURRENT_CALLS / (time.perf_counter() - started)


async def bench_asyncpg(dsn: str, table: str) -> dict[str, float]:
    conn = await asyncpg.connect(dsn)
    await conn.set_type_codec("jsonb", encoder=str, decoder=str, schema="pg_catalog")
    read = await conn.prepare(numbered(READ.format(t=table)))
    update = await conn.prepare(numbered(UPDATE.format(t=table)))
    results = {
        "read us": await per_call(lambda: read.fetch("c", "x")),
        "update us": await per_call(lambda: update.fetch('{"n":1}', "c", "x")),
    }
    await conn.close()
    pool = await asyncpg.create_pool(dsn, min_size=POOL_SIZE, max_size=POOL_SIZE)

    async def pooled_read() -> object:
        async with pool.acquire() as pooled:
            return await pooled.fetch(numbered(READ.format(t=table)), "c", "x")

    results["64 tasks reads/s"] = await throughput(pooled_read)
    await pool.close()
    return results


async def bench_psycopg(dsn: str, table: str) -> dict[str, float] | None:
    try:
        import psycopg
        from psycopg_pool import AsyncConnectionPool
    except ImportError:
        return None
    conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True, prepare_threshold=0)
    read_text, update_text = READ.format(t=table), UPDATE.format(t=table)

    async def read() -> object:
        cursor = await conn.execute(read_text, ("c", "x"))
        return await cursor.fetchall()

    async def update() -> object:
        cursor = await conn.execute(update_text, ('{"n":1}', "c", "x"))
        return await cursor.fetchall()

    results = {"read us": await per_call(read), "update us": await per_call(update)}
    await conn.close()

    async def configure(pooled: psycopg.AsyncConnection[object]) -> None:
        await pooled.set_autocommit(True)
        pooled.prepare_threshold = 0

    pool = AsyncConnectionPool(
        dsn, min_size=POOL_SIZE, max_size=POOL_SIZE, configure=configure, open=False
    )
    await pool.open(wait=True)

    async def pooled_read() -> object:
        async with pool.connection() as pooled:
            cursor = await pooled.execute(read_text, ("c", "x"))
            return await cursor.fetchall()

    results["64 tasks reads/s"] = await throughput(pooled_read)
    await pool.close()
    return results


async def main() -> None:
    dsn = os.environ.get("POSTGRES_CONNECTION_STRING")
    if not dsn:
        sys.exit("set POSTGRES_CONNECTION_STRING")
    table = f"bench_{uuid.uuid4().hex[:12]}"
    setup = await asyncpg.connect(dsn)
    await setup.execute(
        f"CREATE TABLE {table} (collection text, id text, data jsonb, version bigint DEFAULT 1,"
        " created_at timestamptz DEFAULT now(), PRIMARY KEY (collection, id))"
    )
    await setup.execute(f"""INSERT INTO {table} VALUES ('c', 'x', '{{"a": 1, "b": "hi"}}')""")
    try:
        rows = {"asyncpg": await bench_asyncpg(dsn, table)}
        psycopg_results = await bench_psycopg(dsn, table)
        if psycopg_results is not None:
            rows["psycopg 3"] = psycopg_results
    finally:
        await setup.execute(f"DROP TABLE {table}")
        await setup.close()
    print(f"{'driver':<10} {'read us':>9} {'update us':>10} {'64 tasks reads/s':>17}")
    for name, result in rows.items():
        print(
            f"{name:<10} {result['read us']:>9.1f} {result['update us']:>10.1f}"
            f" {result['64 tasks reads/s']:>17.0f}"
        )


if __name__ == "__main__":
    asyncio.run(main())
