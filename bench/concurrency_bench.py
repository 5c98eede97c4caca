"""Throughput with 8 threads on one store, against raw floors with 8 threads and
against 1 thread.

    python bench/concurrency_bench.py --dsn postgresql://postgres@127.0.0.1:5432/test \
        --redis redis://127.0.0.1:6379/0

Two workloads, each run by the project (one `SessionStore`, one docstore pool
of 10 connections, one Redis client shared by every thread) and by its floor
(what a hand-written store does: redis-py + msgpack, psycopg2 with a pool of
10 connections):

* hits: `get_session` of cached sessions / `GET` + `msgpack.unpackb`;
* mix: 70 % hits, 20 % `update_session` (two keys), 10 % `add_message` /
  the floors' GET, upsert + SET, and one-statement append + DEL.

Rounds alternate project and floor so that drift hits both. Printed: ops/s
per configuration (median of the rounds) and the ratios that matter: the
project's 8-thread throughput against its 1-thread throughput (a lock or
pool that serialises would keep it near 1) and against the floor's.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import msgpack
import psycopg2
import psycopg2.pool
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from docstore import PostgresDocumentStore  # noqa: E402
from session import SessionStore  # noqa: E402

SESSIONS = 400
CONTENT = "Hello, I would like to change the delivery address of my last order."


def payload(i: int) -> dict[str, object]:
    return {
        "user_agent": "Mozilla/5.0 (X11; Linux x86_64) Chrome/126.0",
        "locale": "en-US",
        "cart": [{"sku": f"SKU-{i}-{k}", "qty": k + 1, "price": 9.99 + k} for k in range(6)],
        "recent": [f"/products/{i * 7 + k}" for k in range(8)],
        "counter": 0,
    }


class Floor:
    """The hand-written store: a table of its own, msgpack copies in Redis."""

    def __init__(self, dsn: str, cache: redis.Redis, tag: str) -> None:
        self.cache, self.tag = cache, tag
        self.pool = psycopg2.pool.ThreadedConnectionPool(1, 10, dsn)
        self.table = f"conc_floor_{tag}"
        self.local = {}
        with self.connection() as cur:
            cur.execute(
                f"CREATE TABLE {self.table} (id text PRIMARY KEY, data jsonb NOT NULL,"
                " version integer NOT NULL DEFAULT 1, last_seq bigint NOT NULL DEFAULT 0,"
                " updated_at timestamptz NOT NULL DEFAULT now());"
                f"CREATE TABLE {self.table}_m (sid text, seq bigint, content text,"
                " PRIMARY KEY (sid, seq))"
            )
            for i in range(SESSIONS):
                cur.execute(
                    f"INSERT INTO {self.table} (id, data) VALUES (%s, %s)",
                    (f"f{i}", json.dumps(payload(i))),
                )
                self.local[f"f{i}"] = payload(i)
                cache.set(self.key(f"f{i}"), msgpack.packb([1, payload(i)]), px=3_600_000)

    def key(self, sid: str) -> str:
        return f"conc:{self.tag}:{sid}"

    def connection(self):  # type: ignore[no-untyped-def]
        pool = self.pool

        class Lend:
            def __enter__(self):  # type: ignore[no-untyped-def]
                self.conn = pool.getconn()
                self.conn.autocommit = True
                self.cur = self.conn.cursor()
                return self.cur

            def __exit__(self, *exc: object) -> None:
                self.cur.close()
                pool.putconn(self.conn)

        return Lend()

    def hit(self, i: int) -> None:
        msgpack.unpackb(self.cache.get(self.key(f"f{i % SESSIONS}")))

    def update(self, i: int) -> None:
        sid = f"f{i % SESSIONS}"
        delta = {"counter": i, "last_seen": time.time()}
        with self.connection() as cur:
            cur.execute(
                f"UPDATE {self.table} SET data = data || %s::jsonb, version = version + 1,"
                " updated_at = now() WHERE id = %s RETURNING version",
                (json.dumps(delta), sid),
            )
            (version,) = cur.fetchone()
        data = dict(self.local[sid], **delta)
        self.cache.set(self.key(sid), msgpack.packb([version, data]), px=3_600_000)

    def append(self, i: int) -> None:
        sid = f"f{i % SESSIONS}"
        with self.connection() as cur:
            cur.execute(
                f"WITH s AS (UPDATE {self.table} SET version = version + 1,"
                " last_seq = last_seq + 1 WHERE id = %s RETURNING id, last_seq)"
                f" INSERT INTO {self.table}_m SELECT s.id, s.last_seq, %s FROM s",
                (sid, CONTENT),
            )
        self.cache.delete(self.key(sid) + ":tail")

    def close(self) -> None:
        with self.connection() as cur:
            cur.execute(f"DROP TABLE {self.table}; DROP TABLE {self.table}_m")
        self.pool.closeall()
        for key in self.cache.scan_iter(match=f"conc:{self.tag}:*", count=1000):
            self.cache.delete(key)


class Project:
    def __init__(self, dsn: str, cache: redis.Redis, tag: str) -> None:
        self.table = f"conc_{tag}"
        self.docs = PostgresDocumentStore(dsn, table=self.table, max_connections=10)
        self.store = SessionStore(self.docs, cache, key_prefix=f"conc:{tag}:p:")
        self.ids = [self.store.create_session(f"u{i}", payload(i)).id for i in range(SESSIONS)]
        for session_id in self.ids:
            self.store.get_session(session_id)

    def hit(self, i: int) -> None:
        self.store.get_session(self.ids[i % SESSIONS])

    def update(self, i: int) -> None:
        self.store.update_session(self.ids[i % SESSIONS], {"counter": i, "last_seen": time.time()})

    def append(self, i: int) -> None:
        self.store.add_message(self.ids[i % SESSIONS], "user", CONTENT)

    def close(self, dsn: str) -> None:
        self.store.close()
        self.docs.close()
        conn = psycopg2.connect(dsn)
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f"DROP TABLE {self.table}; DROP TABLE {self.table}_meta")
        conn.close()


def mix(target: Floor | Project) -> Callable[[int], None]:
    def operation(i: int) -> None:
        draw = random.random()
        if draw < 0.7:
            target.hit(i)
        elif draw < 0.9:
            target.update(i)
        else:
            target.append(i)

    return operation


def throughput(operation: Callable[[int], None], threads: int, per_thread: int) -> float:
    """Ops per second of `threads` threads each running `operation` `per_thread` times."""
    start_line = threading.Barrier(threads + 1)

    def work(offset: int) -> None:
        start_line.wait()
        for i in range(per_thread):
            operation(offset + i * 7)

    workers = [threading.Thread(target=work, args=(n * 1_000,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    start_line.wait()
    started = time.perf_counter()
    for worker in workers:
        worker.join()
    return threads * per_thread / (time.perf_counter() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", default=os.environ.get("POSTGRES_CONNECTION_STRING"))
    parser.add_argument("--redis", default=os.environ.get("REDIS_URL"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ops", type=int, default=4000, help="operations per configuration")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if not args.dsn or not args.redis:
        parser.error("--dsn and --redis (or POSTGRES_CONNECTION_STRING and REDIS_URL) are needed")
    tag = f"{os.getpid()}"
    cache = redis.Redis.from_url(
        args.redis, socket_timeout=5, socket_connect_timeout=5, max_connections=32
    )
    floor, project = Floor(args.dsn, cache, tag), Project(args.dsn, cache, tag)
    runs: dict[str, list[float]] = {}
    try:
        for _ in range(args.rounds):
            for workload in ("hits", "mix"):
                for threads in (1, 8):
                    for name, target in (("project", project), ("floor", floor)):
                        operation = target.hit if workload == "hits" else mix(target)
                        ops = args.ops if workload == "hits" else args.ops // 4
                        key = f"{workload} {name} {threads}t"
                        throughput(operation, threads, max(1, ops // threads // 4))  # warm-up
                        runs.setdefault(key, []).append(
                            throughput(operation, threads, max(1, ops // threads))
                        )
    finally:
        floor.close()
        project.close(args.dsn)
    result = {key: round(statistics.median(values)) for key, values in runs.items()}
    for key, value in result.items():
        print(f"{key:24} {value:>9,} ops/s")
    ratios = {}
    for workload in ("hits", "mix"):
        p1, p8 = result[f"{workload} project 1t"], result[f"{workload} project 8t"]
        f1, f8 = result[f"{workload} floor 1t"], result[f"{workload} floor 8t"]
        ratios[f"{workload}: project 8t / 1t"] = round(p8 / p1, 2)
        ratios[f"{workload}: floor 8t / 1t"] = round(f8 / f1, 2)
        ratios[f"{workload}: project 8t / floor 8t"] = round(p8 / f8, 2)
    for key, value in ratios.items():
        print(f"{key:36} {value:>6}")
    if args.json:
        Path(args.json).write_text(json.dumps({"ops_s": result, "ratios": ratios}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
