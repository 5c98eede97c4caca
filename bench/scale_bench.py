"""How cost grows with the data: a store of N sessions, built in bulk, then the
operations whose cost must not follow N.

    python bench/scale_bench.py --dsn postgresql://postgres@127.0.0.1:5432/test \
        --redis redis://127.0.0.1:6379/0 --sessions 20000 200000

For each size, in a table of its own (`scale_<pid>_<n>`, dropped at the end;
`--keep` keeps it), the rows are written with `INSERT ... SELECT
generate_series` in the store's own document layout (what `create_session`
and `add_message` write: see docs/session.md, "Data model"), five messages
per session, then the store is opened on the table (its indexes are built
then, as `SessionStore` builds them) and this is timed:

* `list_sessions(user, limit=50)`: the first page of a user holding 1,000
  sessions, and of one holding half of all sessions (10,000 / 100,000);
* `purge_expired()` with nothing expired, and with 2,200 expired sessions
  (their 11,000 messages go with them);
* `get_messages(limit=20)` of a session whose copy is not cached (engineer
  "budget" owns this row of issue 9; shown for the whole picture).

Concurrency (8 threads of hits) is `bench/concurrency_bench.py`.
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

MESSAGES_PER_SESSION = 5
EXPIRED = 2200


def build(dsn: str, table: str, sessions: int, heavy: int) -> None:
    """Write `sessions` sessions (user 'heavy' owns `heavy` of them, 'thousand' 1,000,
    the rest one each) with five messages each, straight into the table."""
    store = PostgresDocumentStore(dsn, table=table)  # creates the table, as a store would
    store.close()
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    t = psycopg2.extensions.quote_ident(table, conn)
    with conn.cursor() as cur:
        cur.execute(
            f"INSERT INTO {t} (collection, id, data, created_at, updated_at, version, child_seq) "
            "SELECT 'sessions', 'sess-' || g, jsonb_build_object("
            "  '_session', jsonb_build_object("
            "    'user_id', CASE WHEN g <= %s THEN 'heavy' WHEN g <= %s THEN 'thousand'"
            "                    ELSE 'user-' || g END,"
            "    'conv', 'conv-' || g),"
            "  'theme', 'dark', 'cart', jsonb_build_array(g, g + 1), 'counter', g),"
            " now() - (g || ' seconds')::interval, now() - (g || ' seconds')::interval, 1, %s "
            "FROM generate_series(1, %s) AS g",
            (heavy, heavy + 1000, MESSAGES_PER_SESSION, sessions),
        )
        cur.execute(
            f"INSERT INTO {t} (collection, id, data) "
            "SELECT 'messages', 'conv-' || g || '.m' || s, jsonb_build_object("
            "  'conv', 'conv-' || g, 'message_id', 'm' || s, 'role', 'user',"
            "  'content', 'hello, this is message ' || s, 'metadata', '{}'::jsonb,"
            "  'parent', 'sess-' || g, 'seq', s) "
            "FROM generate_series(1, %s) AS g, generate_series(1, %s) AS s",
            (sessions, MESSAGES_PER_SESSION),
        )
        cur.execute(f"ANALYZE {t}")
    conn.close()


def analyze(dsn: str, table: str) -> None:
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f"ANALYZE {psycopg2.extensions.quote_ident(table, cur)}")
    conn.close()


def expire(dsn: str, table: str, first: int, count: int) -> None:
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    t = psycopg2.extensions.quote_ident(table, conn)
    with conn.cursor() as cur:
        cur.execute(
            f"UPDATE {t} SET expires_at = now() - interval '1 minute' "
            "WHERE collection = 'sessions' AND id = ANY(%s)",
            ([f"sess-{g}" for g in range(first, first + count)],),
        )
    conn.close()


def timed(operation, repeat: int) -> float:
    """Median milliseconds of `repeat` calls (after one untimed call)."""
    operation()
    durations = []
    for _ in range(repeat):
        start = time.perf_counter()
        operation()
        durations.append(time.perf_counter() - start)
    return statistics.median(durations) * 1000


def run(dsn: str, redis_url: str, sessions: int, keep: bool) -> dict[str, float]:
    table = f"scale_{os.getpid()}_{sessions}"
    heavy = sessions // 2
    started = time.perf_counter()
    build(dsn, table, sessions, heavy)
    built = time.perf_counter() - started
    docs = PostgresDocumentStore(dsn, table=table)
    cache = redis.Redis.from_url(redis_url, socket_timeout=5, socket_connect_timeout=5)
    prefix = f"scale:{os.getpid()}:{sessions}:"
    result: dict[str, float] = {"sessions": sessions, "build_s": round(built, 1)}
    store = None
    try:
        started = time.perf_counter()
        store = SessionStore(docs, cache, key_prefix=prefix)  # builds its indexes here
        result["index_build_s"] = round(time.perf_counter() - started, 1)
        # Statistics for the expression indexes just built (autovacuum would
        # gather them in time): without them PostgreSQL guesses that a
        # `conv = ANY(1,000 values)` matches most rows and scans the table.
        analyze(dsn, table)
        page = store.list_sessions("thousand", limit=50)
        assert len(page) == 50 and page[0].updated_at >= page[-1].updated_at
        result["list_sessions(1,000 of the user's), ms"] = timed(
            lambda: store.list_sessions("thousand", limit=50), 50
        )
        result["list_sessions(half of all are the user's), ms"] = timed(
            lambda: store.list_sessions("heavy", limit=50), 50
        )
        result["purge_expired(), nothing expired, ms"] = timed(store.purge_expired, 5)
        expire(dsn, table, heavy + 2000, EXPIRED)
        start = time.perf_counter()
        purged = store.purge_expired()
        result[f"purge_expired(), {EXPIRED:,} expired, ms"] = (time.perf_counter() - start) * 1000
        assert purged == EXPIRED * (1 + MESSAGES_PER_SESSION), purged
        # Never read through this store's key prefix: neither copy is cached.
        cold = [f"sess-{g}" for g in range(heavy + 5000, heavy + 5100)]
        times = []
        for session_id in cold:
            start = time.perf_counter()
            assert len(store.get_messages(session_id, limit=20)) == MESSAGES_PER_SESSION
            times.append(time.perf_counter() - start)
        result["get_messages(limit=20), cold, ms"] = statistics.median(times) * 1000
    finally:
        if store is not None:
            store.close()
        for key in cache.scan_iter(match=f"{prefix}*", count=1000):
            cache.delete(key)
        docs.close()
        if not keep:
            conn = psycopg2.connect(dsn)
            conn.autocommit = True
            with conn.cursor() as cur:
                for name in (table, f"{table}_meta"):
                    quoted = psycopg2.extensions.quote_ident(name, cur)
                    cur.execute(f"DROP TABLE IF EXISTS {quoted}")
            conn.close()
    return {key: round(value, 3) if isinstance(value, float) else value
            for key, value in result.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", default=os.environ.get("POSTGRES_CONNECTION_STRING"))
    parser.add_argument("--redis", default=os.environ.get("REDIS_URL"))
    parser.add_argument("--sessions", type=int, nargs="+", default=[20_000, 200_000])
    parser.add_argument("--keep", action="store_true", help="keep the tables")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if not args.dsn or not args.redis:
        parser.error("--dsn and --redis (or POSTGRES_CONNECTION_STRING and REDIS_URL) are needed")
    results = [run(args.dsn, args.redis, n, args.keep) for n in args.sessions]
    keys = [key for key in results[0] if key not in ("sessions",)]
    print(f"{'':48}" + "".join(f"{r['sessions']:>14,}" for r in results))
    for key in keys:
        print(f"{key:48}" + "".join(f"{r.get(key, '-')!s:>14}" for r in results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
