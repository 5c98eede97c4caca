"""AsyncPostgresDocumentStore latency against raw asyncpg running the same SQL, in one run.

Usage: POSTGRES_CONNECTION_STRING=postgresql://postgres@127.0.0.1:5432/test \
       python bench/async_docstore_bench.py [--rounds 2000]
Without the variable it uses the embedded server.

The floor is what the store's statements cost through asyncpg with nothing
around them: one connection, each statement prepared once, the rows fetched.
The store adds its validation, the shared protocol generator, its pool and
its deadline watchdog. Library and floor alternate in blocks (see _common.py),
and the ratio of the medians is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent))

from docstore import AsyncPostgresDocumentStore  # noqa: E402
from docstore.embedded import start_embedded  # noqa: E402
from docstore.postgres_protocol import PostgresProtocol  # noqa: E402
from docstore.store import decode_json  # noqa: E402

Operation = Callable[[int], Awaitable[object]]


async def measure(operation: Operation, rounds: int) -> list[float]:
    durations = []
    for i in range(rounds):
        started = time.perf_counter()
        await operation(i)
        durations.append(time.perf_counter() - started)
    return durations


async def interleaved(
    pairs: dict[str, tuple[Operation, Operation]], rounds: int, blocks: int = 5
) -> dict[str, tuple[list[float], list[float]]]:
    results: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in pairs}
    per_block = max(1, rounds // blocks)
    for _ in range(blocks):
        for name, (library, raw) in pairs.items():
            await measure(library, 10)  # warm-up
            results[name][0].extend(await measure(library, per_block))
            await measure(raw, 10)
            results[name][1].extend(await measure(raw, per_block))
    return results


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2000)
    args = parser.parse_args()
    dsn = os.environ.get("POSTGRES_CONNECTION_STRING") or start_embedded()
    table = f"bench_{uuid.uuid4().hex[:10]}"
    store = AsyncPostgresDocumentStore(dsn, table=table)
    await store.open()
    # The floor runs the store's own statement texts: the protocol renders them.
    protocol = PostgresProtocol(table, max_document_bytes=1_048_576)
    raw = await asyncpg.connect(dsn)
    await raw.set_type_codec(
        "jsonb", encoder=lambda text: text, decoder=decode_json, schema="pg_catalog"
    )

    def statement_of(steps: object) -> str:
        request = next(steps)  # type: ignore[call-overload]
        return str(request.statement.numbered)

    read_sql = statement_of(protocol.read("c", "x"))
    update_sql = statement_of(protocol.modify("c", "x", {}, None, None, merge=True))
    create_sql = statement_of(protocol.create("c", {}, id="x", ttl=None))
    query_sql = statement_of(
        protocol.query("q", {"n": 7}, limit=100, offset=0, order_by=None, after=None)
    )
    read_raw = await raw.prepare(read_sql)
    update_raw = await raw.prepare(update_sql)
    create_raw = await raw.prepare(create_sql)
    query_raw = await raw.prepare(query_sql)
    try:
        await store.create("c", {"a": 1, "b": "hello"}, id="x")
        for i in range(2000):
            await store.create("q", {"n": i % 20, "i": i})
        await raw.execute(f'ANALYZE "{table}"')
        data = '{"n":1}'
        pairs: dict[str, tuple[Operation, Operation]] = {
            "read": (
                lambda i: store.read("c", "x"),
                lambda i: read_raw.fetch("c", "x"),
            ),
            "update": (
                lambda i: store.update("c", "x", {"n": 1}),
                lambda i: update_raw.fetch(data, "c", "x", data, 1_048_576),
            ),
            "create": (
                lambda i: store.create("new", {"i": i}),
                lambda i: create_raw.fetch("raw", str(uuid.uuid4()), '{"i":1}'),
            ),
            "query-100": (
                lambda i: store.query("q", {"n": 7}, limit=100),
                lambda i: query_raw.fetch("q", '7', 100, 0),
            ),
        }
        results = await interleaved(pairs, args.rounds)
    finally:
        await raw.execute(f'DROP TABLE IF EXISTS "{table}"')
        await raw.execute(f'DROP TABLE IF EXISTS "{table}_meta"')
        await raw.close()
        await store.aclose()
    print(f"{'operation':<12} {'async store':>12} {'raw asyncpg':>12} {'ratio':>7}")
    for name, (library, floor) in results.items():
        ours, theirs = statistics.median(library), statistics.median(floor)
        print(f"{name:<12} {ours * 1e3:>10.3f}ms {theirs * 1e3:>10.3f}ms {ours / theirs:>6.2f}x")


if __name__ == "__main__":
    asyncio.run(main())
