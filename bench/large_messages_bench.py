"""Large messages: cold reads that cost what they return, and Redis growth per conversation.

Usage: python bench/large_messages_bench.py [--rounds 200] [--conversations 4]
       [--messages 120] [--size 200000]

Talks to the servers named by POSTGRES_CONNECTION_STRING and REDIS_URL (by
default the local ones below). Everything lives in a fresh docstore table and
under a fresh key prefix, both removed at the end.

Conversations of `--messages` messages of `--size` bytes each (agent tool
outputs: random text, which PostgreSQL cannot compress away) and the same
number of conversations of 200-byte messages are built through the public
API. Then, measured in blocks alternating with raw floors (`_common.interleaved`):

- cold `get_messages(limit=3)` (every key of the session deleted, untimed,
  before each call) on a large-message conversation and on a small-message
  one, each against its raw floor: one psycopg2 SELECT of the same three
  message rows through the same index, decoded with json;
- cold `get_messages(limit=20)` against a cold `get_session` of the same
  small-message session (issue 9's row: <= 1.5x);
- hot `get_messages(limit=3)` on both.

Last, the Redis growth per conversation after one cold `get_messages(limit=3)`
on each large-message conversation: MEMORY USAGE of the session's keys and the
INFO used_memory delta, against the tail's byte budget plus the session's own
cached value.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import random
import sys
import time
import uuid
from pathlib import Path

import psycopg2
import redis
from psycopg2 import sql

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Operation, interleaved, median  # noqa: E402

from docstore import PostgresDocumentStore  # noqa: E402
from session import SessionStore  # noqa: E402
from session.coherence import session_keys  # noqa: E402
from session.store import DEFAULT_TAIL_BYTES  # noqa: E402

DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/test"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
SESSIONS = "sessions"
MESSAGES = "messages"
SMALL_SIZE = 200


def text_of(size: int, rng: random.Random) -> str:
    """Return `size` characters of random base64 text (about as compressible as tool output)."""
    return base64.b64encode(rng.randbytes(size * 3 // 4 + 3)).decode("ascii")[:size]


class RawFloor:
    """The least work a cold read of the newest N messages needs: one SELECT, json decoding."""

    def __init__(self, dsn: str, table: str) -> None:
        self.conn = psycopg2.connect(dsn)
        self.conn.autocommit = True
        self.cur = self.conn.cursor()
        # The same index the store's query uses: (data #> '{conv}', data #> '{seq}', id).
        self.newest_sql = sql.SQL(
            "SELECT id, data::text FROM {t} WHERE collection = %s"
            " AND (data #> '{{conv}}') = %s::jsonb"
            " ORDER BY (data #> '{{seq}}') DESC, id DESC LIMIT %s"
        ).format(t=sql.Identifier(table))

    def newest(self, conversation: str, limit: int) -> list[object]:
        self.cur.execute(self.newest_sql, (MESSAGES, json.dumps(conversation), limit))
        return [json.loads(text) for _, text in self.cur.fetchall()]

    def plan(self, conversation: str, limit: int) -> str:
        self.cur.execute(
            sql.SQL("EXPLAIN ") + self.newest_sql, (MESSAGES, json.dumps(conversation), limit)
        )
        return "\n".join(row[0] for row in self.cur.fetchall())


def session_memory(cache: redis.Redis, key_prefix: str, session_id: str) -> tuple[int, int]:
    """Return (MEMORY USAGE of the session value, of the tail's keys) in bytes."""
    keys = session_keys(key_prefix, session_id)
    value = cache.memory_usage(keys.value, samples=0) or 0
    tail = sum(cache.memory_usage(key, samples=0) or 0 for key in (keys.tail, keys.fence))
    return value, tail


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200, help="timed calls per operation")
    parser.add_argument("--blocks", type=int, default=5, help="library/raw alternations")
    parser.add_argument("--conversations", type=int, default=4)
    parser.add_argument("--messages", type=int, default=120)
    parser.add_argument("--size", type=int, default=200_000, help="bytes per large message")
    args = parser.parse_args()
    dsn = os.environ.get("POSTGRES_CONNECTION_STRING") or DEFAULT_DSN
    redis_url = os.environ.get("REDIS_URL") or DEFAULT_REDIS_URL
    table = f"bench_large_{uuid.uuid4().hex[:10]}"
    key_prefix = f"benchlarge{uuid.uuid4().hex[:10]}:"
    cache = redis.Redis.from_url(redis_url, socket_timeout=10, socket_connect_timeout=5)
    docs = PostgresDocumentStore(dsn, table=table)
    raw = RawFloor(dsn, table)
    store = SessionStore(
        docs, cache, key_prefix=key_prefix, sessions_collection=SESSIONS,
        messages_collection=MESSAGES,
    )  # fmt: skip
    started = time.monotonic()
    try:
        run(args, store, raw, cache, key_prefix, table)
    finally:
        store.close()
        docs.close()
        raw.cur.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(table)))
        raw.cur.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(f"{table}_meta")))
        raw.conn.close()
        keys = list(cache.scan_iter(match=f"{key_prefix}*", count=1000))
        for start in range(0, len(keys), 500):
            cache.delete(*keys[start : start + 500])
        cache.close()
    print(f"\n(run took {time.monotonic() - started:.0f} s)")


def run(
    args: argparse.Namespace,
    store: SessionStore,
    raw: RawFloor,
    cache: redis.Redis,
    key_prefix: str,
    table: str,
) -> None:
    rng = random.Random(15)
    print(
        f"building {args.conversations} conversations of {args.messages} messages of "
        f"{args.size:,} bytes, and as many of {SMALL_SIZE}-byte messages ..."
    )
    large: list[str] = []
    small: list[str] = []
    for _ in range(args.conversations):
        for sessions, size in ((large, args.size), (small, SMALL_SIZE)):
            session_id = store.create_session("u1", {"title": "bench"}).id
            for i in range(args.messages):
                role = "tool" if i % 2 else "assistant"
                store.add_message(session_id, role, text_of(size, rng))
            sessions.append(session_id)
    raw.cur.execute(sql.SQL("ANALYZE {}").format(sql.Identifier(table)))
    conversation = {
        session_id: state.conversation
        for session_id in large + small
        if (state := store._lookup(session_id).state) is not None  # noqa: SLF001
    }
    print("raw floor's plan:\n  " + raw.plan(conversation[large[0]], 3).replace("\n", "\n  "))

    def cold(session_id: str) -> Operation:
        keys = session_keys(key_prefix, session_id).all()
        return lambda i: cache.delete(*keys)

    def cold_session(session_id: str) -> Operation:
        keys = session_keys(key_prefix, session_id)
        return lambda i: cache.delete(keys.value, keys.lease)

    big, little = large[0], small[0]
    pairs: dict[str, tuple[Operation, Operation]] = {
        "cold get_messages(limit=3), large": (
            lambda i: store.get_messages(big, limit=3),
            lambda i: raw.newest(conversation[big], 3),
        ),
        "cold get_messages(limit=3), small": (
            lambda i: store.get_messages(little, limit=3),
            lambda i: raw.newest(conversation[little], 3),
        ),
        "cold get_messages(limit=20), small": (
            lambda i: store.get_messages(little, limit=20),
            lambda i: raw.newest(conversation[little], 20),
        ),
        "cold get_session, small": (
            lambda i: store.get_session(little),
            lambda i: raw.newest(conversation[little], 0),
        ),
        "hot get_messages(limit=3), large": (
            lambda i: store.get_messages(big, limit=3),
            lambda i: raw.newest(conversation[big], 3),
        ),
        "hot get_messages(limit=3), small": (
            lambda i: store.get_messages(little, limit=3),
            lambda i: raw.newest(conversation[little], 3),
        ),
    }
    prepare: dict[str, Operation] = {
        "cold get_messages(limit=3), large": cold(big),
        "cold get_messages(limit=3), small": cold(little),
        "cold get_messages(limit=20), small": cold(little),
        "cold get_session, small": cold_session(little),
    }
    print(f"measuring {args.rounds} calls per operation in {args.blocks} alternating blocks ...")
    before = store.stats()
    results = interleaved(pairs, args.rounds, args.blocks, prepare)
    after = store.stats()
    print(f"\n{'operation':<38} {'store ms':>9} {'raw ms':>8} {'store/raw':>9}")
    medians: dict[str, float] = {}
    for name, (library, floor) in results.items():
        medians[name] = median(library)
        ratio = median(library) / median(floor)
        print(f"{name:<38} {median(library) * 1e3:9.3f} {median(floor) * 1e3:8.3f} {ratio:9.2f}")
    cold_large = medians["cold get_messages(limit=3), large"]
    cold_small = medians["cold get_messages(limit=3), small"]
    raw_large = median(results["cold get_messages(limit=3), large"][1])
    raw_small = median(results["cold get_messages(limit=3), small"][1])
    print(
        f"\ncold limit=3, large / small: {cold_large / cold_small:.2f} (target <= 2; "
        f"the raw floors' own ratio: {raw_large / raw_small:.2f})"
    )
    cold_20 = medians["cold get_messages(limit=20), small"]
    cold_get = medians["cold get_session, small"]
    ratio_20 = cold_20 / cold_get
    print(f"cold get_messages(limit=20) / cold get_session: {ratio_20:.2f} (target <= 1.5)")
    counted = ("cache_errors", "cache_fences", "lease_waits", "fills_refused")
    counts = {name: after.get(name, 0) - before.get(name, 0) for name in counted}
    print(f"store counters during the measurement: {counts}")

    print("\n--- Redis growth per conversation after one cold get_messages(limit=3) ---")
    for session_id in large:
        cache.delete(*session_keys(key_prefix, session_id).all())
    memory_before = cache.info("memory")
    for session_id in large:
        assert len(store.get_messages(session_id, limit=3)) == 3
    memory_after = cache.info("memory")
    values, tails = zip(*(session_memory(cache, key_prefix, sid) for sid in large), strict=True)
    count = len(large)
    value_each, tail_each = sum(values) / count, sum(tails) / count
    budget = DEFAULT_TAIL_BYTES
    print(f"tail byte budget (default): {budget:,} B")
    print(f"MEMORY USAGE per conversation: session {value_each:,.0f} B + tail {tail_each:,.0f} B")
    growth = (int(memory_after["used_memory"]) - int(memory_before["used_memory"])) / count
    # Client buffers (the query buffer that held a 200 KB script argument) are
    # the connection's, not the data's: shown apart.
    buffers = (
        int(memory_after.get("mem_clients_normal", 0))
        - int(memory_before.get("mem_clients_normal", 0))
    ) / count
    print(
        f"INFO used_memory growth per conversation: {growth:,.0f} B "
        f"(of which client buffers {buffers:,.0f} B; data {growth - buffers:,.0f} B)"
    )
    growth -= buffers
    print(
        f"data growth / (budget + session): {growth / (budget + value_each):.2f} (target <= 1); "
        f"before the budget the issue measured 22 MB per conversation"
    )


if __name__ == "__main__":
    main()
