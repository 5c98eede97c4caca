"""Depth and size: appends deep in a conversation, and what a session costs in
Redis and PostgreSQL.

    python bench/depth_memory_bench.py --dsn postgresql://postgres@127.0.0.1:5432/test \
        --redis redis://127.0.0.1:6379/0 --depth 100000

Depth: one conversation is filled to `--depth` messages in bulk (rows in the
store's own layout, then the session's append counter set to match), then
`add_message` is timed there and in a conversation holding 10 messages, in
alternating blocks; and `get_messages(limit=20)` at that depth, hot (tail
cached) and cold (nothing cached: a key prefix never used before).

Memory: `INFO memory`'s used_memory before and after caching `--sessions`
sessions (`get_session`), then after caching a 20-message tail for each
(`get_messages`), divided by the count, against the msgpack size of the same
values (`STRLEN` of what the store wrote); PostgreSQL's bytes per session and
per message: `pg_total_relation_size` of the store's own table (indexes
included) divided by the rows, sessions and messages measured apart.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import psycopg2
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from docstore import PostgresDocumentStore  # noqa: E402
from session import SessionStore  # noqa: E402
from session.coherence import session_keys  # noqa: E402

CONTENT = "Hello, I would like to change the delivery address of my last order to the office."
META = {"lang": "en", "tokens": 42}


def blocks(operations: dict[str, object], rounds: int, per_block: int = 20) -> dict[str, float]:
    """Median microseconds of each operation, run in alternating blocks."""
    samples: dict[str, list[float]] = {name: [] for name in operations}
    for _ in range(rounds):
        for name, operation in operations.items():
            for _ in range(per_block):
                start = time.perf_counter()
                operation()  # type: ignore[operator]
                samples[name].append(time.perf_counter() - start)
    return {name: round(statistics.median(values) * 1e6, 1) for name, values in samples.items()}


def sql(dsn: str, statement: str, params: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(statement, params)
            return cur.fetchall() if cur.description else []
    finally:
        conn.close()


def depth(store: SessionStore, dsn: str, table: str, cache: redis.Redis, prefix: str,
          docs: PostgresDocumentStore, messages: int) -> dict[str, float]:
    deep = store.create_session("deep", {"k": 1})
    store.add_message(deep.id, "user", CONTENT, metadata=META, message_id="first")
    conv = store._conversations.get(deep.id, 0)  # noqa: SLF001 (bench only)
    assert conv is not None
    quoted = f'"{table}"'
    # Messages 2..depth-1 in bulk, as add_message lays them out; then the counter.
    sql(dsn,
        f"INSERT INTO {quoted} (collection, id, data) SELECT 'messages', %s || '.b' || g,"
        " jsonb_build_object('conv', %s, 'message_id', 'b' || g, 'role', 'user',"
        " 'content', %s, 'metadata', %s::jsonb, 'parent', %s, 'seq', g)"
        " FROM generate_series(2, %s) AS g",
        (conv, conv, CONTENT, json.dumps(META), deep.id, messages - 1))
    sql(dsn, f"UPDATE {quoted} SET child_seq = %s WHERE collection = 'sessions' AND id = %s",
        (messages - 1, deep.id))
    sql(dsn, f"ANALYZE {quoted}")
    shallow = [store.create_session("shallow", {"k": 2}) for _ in range(40)]
    for session in shallow:
        for _ in range(9):
            store.add_message(session.id, "user", CONTENT, metadata=META)
    state = {"n": 0}

    def shallow_append() -> None:
        # Each of 40 sessions takes appends 10..19 in turn (like floors.py's add_message@10).
        session = shallow[(state["n"] // 10) % len(shallow)]
        state["n"] += 1
        store.add_message(session.id, "user", CONTENT, metadata=META)

    appends = blocks(
        {"add_message@10": shallow_append,
         f"add_message@{messages}": lambda: store.add_message(deep.id, "user", CONTENT,
                                                                metadata=META)},
        rounds=10,
    )
    store.get_messages(deep.id, limit=20)
    fresh = {"n": 0}

    def cold() -> None:
        # A store over a key prefix never used: neither the session nor its tail is cached.
        fresh["n"] += 1
        other = SessionStore(docs, cache, key_prefix=f"{prefix}cold{fresh['n']}:",
                             ensure_indexes=False)
        start = time.perf_counter()
        assert len(other.get_messages(deep.id, limit=20)) == 20
        fresh.setdefault("t", []).append(time.perf_counter() - start)  # type: ignore[attr-defined]

    for _ in range(30):
        cold()
    hot = blocks({"hot": lambda: store.get_messages(deep.id, limit=20)}, rounds=5)["hot"]
    cold_us = round(statistics.median(fresh["t"]) * 1e6, 1)  # type: ignore[arg-type]
    result = dict(appends)
    result[f"add_message@{messages} / add_message@10"] = round(
        appends[f"add_message@{messages}"] / appends["add_message@10"], 3)
    result[f"get_messages(limit=20)@{messages}, hot"] = hot
    result[f"get_messages(limit=20)@{messages}, cold"] = cold_us
    return result


def memory(store: SessionStore, dsn: str, table: str, cache: redis.Redis, prefix: str,
           count: int) -> dict[str, float]:
    quoted = f'"{table}"'

    def pg_bytes() -> int:
        sql(dsn, f"VACUUM FULL {quoted}")  # our own table: measure it compact
        return int(sql(dsn, f"SELECT pg_total_relation_size('{quoted}')")[0][0])

    empty = pg_bytes()
    sessions = [store.create_session(f"m{i}", {"theme": "dark", "cart": [i, i + 1],
                                              "locale": "en-US", "counter": i})
                for i in range(count)]
    with_sessions = pg_bytes()
    for session in sessions:
        for n in range(20):
            store.add_message(session.id, "user", CONTENT, metadata=META, message_id=f"m{n}")
    with_messages = pg_bytes()
    # The appends refreshed whatever was cached: start from nothing under the prefix.
    for key in cache.scan_iter(match=f"{prefix}*", count=1000):
        cache.delete(key)
    base = cache.info("memory")["used_memory"]
    for session in sessions:
        store.get_session(session.id)
    after_sessions = cache.info("memory")["used_memory"]
    for session in sessions:
        store.get_messages(session.id, limit=20)
    after_tails = cache.info("memory")["used_memory"]
    keys = session_keys(prefix, sessions[0].id)
    value_bytes = cache.strlen(keys.value)
    entries = cache.lrange(keys.tail, 0, -1)
    entry_bytes = statistics.mean(len(entry) for entry in entries) if entries else 0
    return {
        "redis bytes per cached session": round((after_sessions - base) / count, 1),
        "msgpack bytes of that session": value_bytes,
        "redis bytes per cached tail message": round((after_tails - after_sessions)
                                                     / (count * 20), 1),
        "msgpack bytes of that message": round(entry_bytes, 1),
        "postgres bytes per session (row + indexes)": round((with_sessions - empty) / count, 1),
        "postgres bytes per message (row + indexes)": round(
            (with_messages - with_sessions) / (count * 20), 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", default=os.environ.get("POSTGRES_CONNECTION_STRING"))
    parser.add_argument("--redis", default=os.environ.get("REDIS_URL"))
    parser.add_argument("--depth", type=int, default=100_000)
    parser.add_argument("--sessions", type=int, default=2000, help="for the memory figures")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if not args.dsn or not args.redis:
        parser.error("--dsn and --redis (or POSTGRES_CONNECTION_STRING and REDIS_URL) are needed")
    cache = redis.Redis.from_url(args.redis, socket_timeout=5, socket_connect_timeout=5)
    results: dict[str, float] = {}
    for part in ("depth", "memory"):
        table = f"dm_{part}_{os.getpid()}"
        prefix = f"dm:{os.getpid()}:{part}:"
        docs = PostgresDocumentStore(args.dsn, table=table)
        store = SessionStore(docs, cache, key_prefix=prefix)
        try:
            if part == "depth":
                results.update(depth(store, args.dsn, table, cache, prefix, docs, args.depth))
            else:
                results.update(memory(store, args.dsn, table, cache, prefix, args.sessions))
        finally:
            store.close()
            docs.close()
            for key in cache.scan_iter(match=f"dm:{os.getpid()}:*", count=1000):
                cache.delete(key)
            sql(args.dsn, f'DROP TABLE IF EXISTS "{table}"; DROP TABLE IF EXISTS "{table}_meta"')
    for key, value in results.items():
        print(f"{key:48} {value:>12}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
