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
  interleaved with the same call through a docstore that sends its
  statements as text (`prepare_statements=False`: planned on every call);
* `purge_expired()` with nothing expired, and with 2,200 expired sessions
  (their 11,000 messages go with them), three times on other sessions;
* `get_session` and `get_messages(limit=20)` of sessions whose copies are not
  cached (each session read once), and the ratio of the two medians.

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
PURGE_ROUNDS = 3
COLD_READS = 100
LIST_CALLS = 100


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


def interleaved(first, second, repeat: int) -> tuple[float, float]:
    """Median milliseconds of `repeat` calls of each, alternating (after one untimed call each)."""
    first()
    second()
    durations: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeat):
        for operation, into in ((first, durations[0]), (second, durations[1])):
            start = time.perf_counter()
            operation()
            into.append(time.perf_counter() - start)
    return statistics.median(durations[0]) * 1000, statistics.median(durations[1]) * 1000


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
    result["load average (1 min) at start"] = round(os.getloadavg()[0], 1)
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
        # The same pages through a docstore that sends its statements as text
        # (prepare_statements=False: parsed and planned on every call), the two
        # stores interleaved: the cost of planning, measured in this run.
        text_docs = PostgresDocumentStore(dsn, table=table, prepare_statements=False)
        text_store = SessionStore(text_docs, cache, key_prefix=prefix, ensure_indexes=False)
        try:
            for label, user in (("1,000 of the user's", "thousand"), ("half of all", "heavy")):
                prepared_ms, text_ms = interleaved(
                    lambda user=user: store.list_sessions(user, limit=50),
                    lambda user=user: text_store.list_sessions(user, limit=50),
                    LIST_CALLS,
                )
                result[f"list_sessions({label}), ms"] = prepared_ms
                result[f"list_sessions({label}), text statements, ms"] = text_ms
        finally:
            text_store.close()
            text_docs.close()
        result["purge_expired(), nothing expired, ms"] = timed(store.purge_expired, 5)
        purges = []
        for round_ in range(PURGE_ROUNDS):
            expire(dsn, table, heavy + 1001 + round_ * (EXPIRED + 100), EXPIRED)
            start = time.perf_counter()
            purged = store.purge_expired()
            purges.append((time.perf_counter() - start) * 1000)
            assert purged == EXPIRED * (1 + MESSAGES_PER_SESSION), purged
        result[f"purge_expired(), {EXPIRED:,} expired, ms (median of {PURGE_ROUNDS})"] = (
            statistics.median(purges)
        )
        result[f"purge_expired(), {EXPIRED:,} expired, ms (slowest)"] = max(purges)

        # Sessions never read through this store's key prefix: nothing of theirs
        # is cached. Each one is read once, through get_session or get_messages,
        # the two interleaved so that both see the same load on the machine.
        def cold(first: int) -> tuple[float, float]:
            session_times, message_times = [], []
            for n in range(COLD_READS):
                start = time.perf_counter()
                assert store.get_session(f"sess-{first + 2 * n}") is not None
                middle = time.perf_counter()
                found = store.get_messages(f"sess-{first + 2 * n + 1}", limit=20)
                session_times.append(middle - start)
                message_times.append(time.perf_counter() - middle)
                assert len(found) == MESSAGES_PER_SESSION
            return statistics.median(session_times) * 1000, statistics.median(message_times) * 1000

        cold(heavy + 8000)  # the connections prepare their statements
        session_ms, messages_ms = cold(heavy + 8000 + 2 * COLD_READS)
        result["get_session, cold, ms"] = session_ms
        result["get_messages(limit=20), cold, ms"] = messages_ms
        result["get_messages cold / get_session cold"] = messages_ms / session_ms
        result["load average (1 min) at end"] = round(os.getloadavg()[0], 1)
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
    print(f"{'':56}" + "".join(f"{r['sessions']:>14,}" for r in results))
    for key in keys:
        print(f"{key:56}" + "".join(f"{r.get(key, '-')!s:>14}" for r in results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
