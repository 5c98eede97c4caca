"""Large messages: cold reads that cost what they return, and Redis growth per conversation.

Usage: python bench/large_messages_bench.py [--rounds 200] [--conversations 4]
       [--messages 120] [--size 200000] [--content random|text]
       [--compression pglz|lz4] [--no-breakdown]

Talks to the servers named by POSTGRES_CONNECTION_STRING and REDIS_URL (by
default the local ones below). Everything lives in a fresh docstore table and
under a fresh key prefix, both removed at the end.

Conversations of `--messages` messages of `--size` bytes each and the same
number of conversations of 200-byte messages are built through the public
API. `--content random` (the default) makes the large messages random base64,
which PostgreSQL cannot compress (stored out of line, uncompressed);
`--content text` makes them log-like lines, which TOAST compresses about 3.5x
(and then has to decompress on every read). Then, measured in blocks
alternating with raw floors (`_common.interleaved`):

- cold `get_messages(limit=3)` (every key of the session deleted, untimed,
  before each call) on a large-message conversation and on a small-message
  one, each against its raw floor: one psycopg2 SELECT of the same three
  message rows through the same index, decoded with json;
- cold `get_messages(limit=20)` against a cold `get_session` of the same
  small-message session (issue 9's row: <= 1.5x);
- hot `get_messages(limit=3)` on both;
- the floor of a cold read that also caches: the raw read plus msgpack
  encoding the newest messages that fit the byte budget and one pipelined
  DEL + RPUSH + SET into Redis (no lease, no fence check, no session read).

The summary prints target (a), cold limit=3 large / small, next to what bounds
it from below: the raw read of the three large rows divided by the store's
cold small read. The breakdown (`--no-breakdown` skips it) then takes the
cold large read apart: PostgreSQL's own time for the exact statement (EXPLAIN ANALYZE, which
runs no output function), for detoasting the values once more and for
`jsonb_out` (the statement wrapped in an aggregate), the transfer and
psycopg2's decoding, the JSON parse, msgpack encoding, and installing the
entries through the FILL_TAIL script against a plain RPUSH.

Last, target (b), the Redis growth per conversation after one cold
`get_messages(limit=3)` on each large-message conversation: MEMORY USAGE of
the session's keys against the tail's byte budget plus the session's own
cached value, and the INFO used_memory delta of each read (the median: other
clients of a shared server move used_memory too).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import random
import statistics
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import msgpack
import psycopg2
import psycopg2.extras
import redis
from psycopg2 import sql

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Operation, interleaved, median  # noqa: E402

from docstore import PostgresDocumentStore  # noqa: E402
from docstore.store import decode_json  # noqa: E402
from session import SessionStore  # noqa: E402
from session.coherence import FILL_TAIL, new_lease_token, session_keys  # noqa: E402
from session.models import Message, message_from_document  # noqa: E402
from session.serializer import encode_message  # noqa: E402
from session.store import DEFAULT_TAIL_BYTES  # noqa: E402

DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/test"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
SESSIONS = "sessions"
MESSAGES = "messages"
SMALL_SIZE = 200
PX = 600_000


def text_of(size: int, rng: random.Random) -> str:
    """Return `size` characters of random base64 text (incompressible to TOAST)."""
    return base64.b64encode(rng.randbytes(size * 3 // 4 + 3)).decode("ascii")[:size]


def log_text_of(size: int, rng: random.Random) -> str:
    """Return `size` characters of log-like lines (TOAST compresses them about 3.5x)."""
    lines: list[str] = []
    length = 0
    while length < size:
        line = (
            f"{length:08d} INFO worker-{rng.randrange(8)} processed item "
            f"{rng.randrange(10**6)} in {rng.random():.4f}s status=ok\n"
        )
        lines.append(line)
        length += len(line)
    return "".join(lines)[:size]


class RawFloor:
    """The least work a cold read of the newest N messages needs: one SELECT, json decoding."""

    def __init__(self, dsn: str, table: str, cache: redis.Redis, key_prefix: str) -> None:
        self.conn = psycopg2.connect(dsn)
        self.conn.autocommit = True
        self.cur = self.conn.cursor()
        self.cache = cache
        self.tail_key = f"{key_prefix}rawfloor:m"
        self.fence_key = f"{key_prefix}rawfloor:m:seq"
        # The same index the store's query uses: (data #> '{conv}', data #> '{seq}', id).
        # `data` itself, not `data::text`: under a Sort (the plan PostgreSQL picks
        # when it expects few rows per conversation) the cast would run below the
        # sort, jsonb_out over every message of the conversation; psycopg2 decodes
        # jsonb with json.loads, as the store does with its own decoder.
        self.newest_sql = sql.SQL(
            "SELECT id, data, created_at FROM {t} WHERE collection = %s"
            " AND (data #> '{{conv}}') = %s::jsonb"
            " ORDER BY (data #> '{{seq}}') DESC, id DESC LIMIT %s"
        ).format(t=sql.Identifier(table))

    def rows(self, conversation: str, limit: int) -> list[tuple[str, dict[str, Any], Any]]:
        self.cur.execute(self.newest_sql, (MESSAGES, json.dumps(conversation), limit))
        return self.cur.fetchall()

    def newest(self, conversation: str, limit: int) -> list[object]:
        return [data for _, data, _ in self.rows(conversation, limit)]

    def newest_and_cache(self, conversation: str, limit: int) -> list[object]:
        """The raw read, then msgpack the newest rows that fit the budget into Redis."""
        rows = self.rows(conversation, limit)
        entries: list[bytes] = []
        size = 0
        for id_, data, created in rows:  # newest first
            entry = msgpack.packb(
                [
                    2,
                    data["seq"],
                    id_,
                    data["role"],
                    data["content"],
                    json.dumps(data["metadata"], separators=(",", ":")),
                    int(created.timestamp() * 1e6),
                ],
                use_bin_type=True,
            )
            if size + len(entry) > DEFAULT_TAIL_BYTES:
                break
            entries.append(entry)
            size += len(entry)
        pipe = self.cache.pipeline(transaction=False)
        pipe.delete(self.tail_key)
        if entries:
            pipe.rpush(self.tail_key, *reversed(entries))
            pipe.pexpire(self.tail_key, PX)
        pipe.set(self.fence_key, f"{rows[0][1]['seq'] if rows else 0}:{size}:0", px=PX)
        pipe.execute()
        return [data for _, data, _ in rows]

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
    parser.add_argument("--content", choices=("random", "text"), default="random")
    parser.add_argument(
        "--compression",
        choices=("pglz", "lz4"),
        help="set data's TOAST compression before building (default: the docstore's own, "
        "lz4 where the server has it)",
    )
    parser.add_argument("--no-breakdown", dest="breakdown", action="store_false")
    args = parser.parse_args()
    dsn = os.environ.get("POSTGRES_CONNECTION_STRING") or DEFAULT_DSN
    redis_url = os.environ.get("REDIS_URL") or DEFAULT_REDIS_URL
    table = f"bench_large_{uuid.uuid4().hex[:10]}"
    key_prefix = f"benchlarge{uuid.uuid4().hex[:10]}:"
    cache = redis.Redis.from_url(redis_url, socket_timeout=10, socket_connect_timeout=5)
    docs = PostgresDocumentStore(dsn, table=table)
    raw = RawFloor(dsn, table, cache, key_prefix)
    store = SessionStore(
        docs, cache, key_prefix=key_prefix, sessions_collection=SESSIONS,
        messages_collection=MESSAGES,
    )  # fmt: skip
    started = time.monotonic()
    try:
        run(args, store, docs, raw, cache, key_prefix, table)
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
    print(
        f"\n(run took {time.monotonic() - started:.0f} s; "
        f"load average at the end: {os.getloadavg()[0]:.2f})"
    )


def run(
    args: argparse.Namespace,
    store: SessionStore,
    docs: PostgresDocumentStore,
    raw: RawFloor,
    cache: redis.Redis,
    key_prefix: str,
    table: str,
) -> None:
    if args.compression:
        raw.cur.execute(
            sql.SQL("ALTER TABLE {} ALTER COLUMN data SET COMPRESSION {}").format(
                sql.Identifier(table), sql.SQL(args.compression)
            )
        )
    rng = random.Random(15)
    make = text_of if args.content == "random" else log_text_of
    print(f"load average at the start: {os.getloadavg()[0]:.2f} (2 cores here)")
    print(
        f"building {args.conversations} conversations of {args.messages} messages of "
        f"{args.size:,} bytes ({args.content} content), and as many of {SMALL_SIZE}-byte "
        "messages ..."
    )
    large: list[str] = []
    small: list[str] = []
    for _ in range(args.conversations):
        for sessions, size in ((large, args.size), (small, SMALL_SIZE)):
            session_id = store.create_session("u1", {"title": "bench"}).id
            for i in range(args.messages):
                role = "tool" if i % 2 else "assistant"
                store.add_message(session_id, role, make(size, rng))
            sessions.append(session_id)
    raw.cur.execute(sql.SQL("ANALYZE {}").format(sql.Identifier(table)))
    conversation = {
        session_id: state.conversation
        for session_id in large + small
        if (state := store._drive(store._lookup(session_id)).state) is not None  # noqa: SLF001
    }
    raw.cur.execute(
        sql.SQL(
            "SELECT coalesce(pg_column_compression(data), 'none'), count(*),"
            " avg(pg_column_size(data))::bigint, avg(octet_length(data::text))::bigint"
            " FROM {} WHERE collection = %s AND (data #> '{{conv}}') = %s::jsonb GROUP BY 1"
        ).format(sql.Identifier(table)),
        (MESSAGES, json.dumps(conversation[large[0]])),
    )
    for method, count, stored, text in raw.cur.fetchall():
        print(
            f"large messages as stored: {count} with TOAST compression {method}, "
            f"{stored:,} B stored for {text:,} B of JSON text"
        )
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
        "raw read + msgpack SET, large": (
            lambda i: raw.newest_and_cache(conversation[big], 3),
            lambda i: raw.newest(conversation[big], 3),
        ),
        "raw read + msgpack SET, small": (
            lambda i: raw.newest_and_cache(conversation[little], 3),
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
    cached_large = medians["raw read + msgpack SET, large"]
    print(
        f"\n(a) cold limit=3, project large / project small: {cold_large / cold_small:.2f} "
        "(target <= 2)"
    )
    print(
        f"    its floor, raw read of the 3 large rows / project small: "
        f"{raw_large / cold_small:.2f} (no store can do better: the rows alone cost this)"
    )
    print(
        f"    project large / raw large read: {cold_large / raw_large:.2f}; "
        f"/ raw read + msgpack SET: {cold_large / cached_large:.2f}; "
        f"raw large / raw small: {raw_large / raw_small:.2f}"
    )
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load > cores:
        print(
            f"    (load average {load:.1f} on {cores} cores: the small read's four round trips "
            "wait for the CPU, so both ratios understate what an idle machine shows)"
        )
    cold_20 = medians["cold get_messages(limit=20), small"]
    cold_get = medians["cold get_session, small"]
    ratio_20 = cold_20 / cold_get
    print(f"cold get_messages(limit=20) / cold get_session: {ratio_20:.2f} (target <= 1.5)")
    counted = ("cache_errors", "cache_fences", "lease_waits", "fills_refused")
    counts = {name: after.get(name, 0) - before.get(name, 0) for name in counted}
    print(f"store counters during the measurement: {counts}")

    if args.breakdown:
        for name, session_id in (("large", big), ("small", little)):
            breakdown(name, store, docs, raw, cache, key_prefix, session_id, conversation)

    print("\n--- (b) Redis growth per conversation after one cold get_messages(limit=3) ---")
    for session_id in large:
        cache.delete(*session_keys(key_prefix, session_id).all())
    growths: list[int] = []
    for session_id in large:
        used = int(cache.info("memory")["used_memory"])
        assert len(store.get_messages(session_id, limit=3)) == 3
        growths.append(int(cache.info("memory")["used_memory"]) - used)
    values, tails = zip(*(session_memory(cache, key_prefix, sid) for sid in large), strict=True)
    budget = DEFAULT_TAIL_BYTES
    value_each, tail_each = max(values), max(tails)
    print(f"tail byte budget (default): {budget:,} B")
    print(
        f"MEMORY USAGE, the largest of {len(large)} conversations: session {value_each:,} B "
        f"+ tail and fence {tail_each:,} B"
    )
    print(
        f"(b) (session + tail) / (budget + session): "
        f"{(value_each + tail_each) / (budget + value_each):.2f} (target <= 1); "
        "before the budget the issue measured 22 MB per conversation"
    )
    print(
        f"INFO used_memory growth per read: median {statistics.median(growths):,.0f} B "
        f"(each: {', '.join(f'{g:,}' for g in growths)}; the first on a connection also "
        "keeps the buffer that took its 200 KB argument; other clients count too)"
    )


def _milliseconds(durations: Sequence[float]) -> float:
    return statistics.median(durations) * 1e3


def _server_seconds(cur: Any, statement: str, params: Sequence[object]) -> float:
    """Return the server's planning + execution time of `statement` (EXPLAIN ANALYZE)."""
    cur.execute("EXPLAIN (ANALYZE, TIMING OFF, FORMAT JSON) " + statement, params)
    plan = cur.fetchone()[0]
    if isinstance(plan, str):
        plan = json.loads(plan)
    return float(plan[0]["Execution Time"] + plan[0]["Planning Time"]) / 1e3


def _timed(operation: Callable[[], object]) -> float:
    start = time.perf_counter()
    operation()
    return time.perf_counter() - start


def breakdown(
    name: str,
    store: SessionStore,
    docs: PostgresDocumentStore,
    raw: RawFloor,
    cache: redis.Redis,
    key_prefix: str,
    session_id: str,
    conversation: dict[str, str],
) -> None:
    """Take a cold get_messages(limit=3) apart, step by step, each step timed alone."""
    rounds = 100
    conv = conversation[session_id]
    try:
        # The docstore's own statement for the newest 3 (its internals: the bench
        # needs the exact text; a change there shows up as "unavailable").
        steps = docs._protocol.query(  # noqa: SLF001
            MESSAGES, {"conv": conv}, limit=3, offset=0, order_by=["-seq", "-id"], after=None
        )
        request = next(steps)
        statement, params = request.statement.text, list(request.params)
    except Exception as exc:  # noqa: BLE001
        print(f"\n(breakdown unavailable: the docstore's statement: {exc!r})")
        return
    cur = raw.cur
    if name == "large":
        cur.execute("EXPLAIN (ANALYZE, BUFFERS, VERBOSE) " + statement, params)
        print("\nthe store's statement, EXPLAIN (ANALYZE, BUFFERS, VERBOSE), large:")
        print("  " + "\n  ".join(row[0] for row in cur.fetchall()))
    # Wrapped in an aggregate, the same rows cost their output function on the
    # server but cross the network as one number.
    again = f"SELECT sum(octet_length((s.data -> 'seq')::text)) FROM ({statement}) s"
    output = f"SELECT sum(octet_length(s.data::text)) FROM ({statement}) s"
    text_cur = raw.conn.cursor()
    psycopg2.extras.register_default_jsonb(conn_or_curs=text_cur, loads=lambda text: text)

    def fetch(i: int) -> list[tuple[Any, ...]]:
        text_cur.execute(statement, params)
        return text_cur.fetchall()

    # A cheaper form the docstore does not offer: the content as text (no
    # escaping by jsonb_out, no JSON parse of it), the rest as jsonb.
    split = f"SELECT s.id, s.data - 'content', s.data ->> 'content' FROM ({statement}) s"

    def fetch_split(i: int) -> list[dict[str, Any]]:
        cur.execute(split, params)
        return [{**rest, "content": content} for _, rest, content in cur.fetchall()]

    rows = fetch(0)
    texts = [row[2] for row in rows]
    documents = docs.query(MESSAGES, {"conv": conv}, limit=3, order_by=["-seq", "-id"])

    def build(i: int) -> list[Message | None]:
        return [message_from_document(doc, session_id) for doc in documents]

    messages = [message for message in build(0) if message is not None]
    fitting: list[bytes] = []
    for message in messages:  # newest first, as the store collects them
        entry = encode_message(message)
        if sum(map(len, fitting)) + len(entry) > DEFAULT_TAIL_BYTES:
            break
        fitting.append(entry)
    keys = session_keys(key_prefix, f"breakdown-{name}")
    fill_script = cache.register_script(FILL_TAIL)
    token = new_lease_token()
    entries = list(reversed(fitting))
    last = messages[0].seq if messages else 0
    size = sum(map(len, entries))

    def fill(i: int) -> object:
        return fill_script(
            keys=[keys.tail, keys.fence, keys.tail_lease],
            args=[token, last, PX, DEFAULT_TAIL_BYTES, 0, *entries],
        )

    def take_lease(i: int) -> None:
        cache.delete(keys.tail, keys.fence)
        cache.set(keys.tail_lease, token, px=PX)

    def rpush(i: int) -> object:
        pipe = cache.pipeline(transaction=False)
        pipe.delete(keys.tail)
        if entries:
            pipe.rpush(keys.tail, *entries)
        pipe.set(keys.fence, f"{last}:{size}:0", px=PX)
        return pipe.execute()

    # Round robin, so that the machine's load drifts over every step alike.
    steps: dict[str, Callable[[], float]] = {
        "server": lambda: _server_seconds(cur, statement, params),
        "again": lambda: _server_seconds(cur, again, params),
        "output": lambda: _server_seconds(cur, output, params),
        "fetch": lambda: _timed(lambda: fetch(0)),
        "parse": lambda: _timed(lambda: [decode_json(text) for text in texts]),
        "construct": lambda: _timed(lambda: build(0)),
        "encode": lambda: _timed(
            lambda: [encode_message(message) for message in messages[: len(fitting)]]
        ),
        "fill": lambda: (take_lease(0), _timed(lambda: fill(0)))[1],
        "rpush": lambda: _timed(lambda: rpush(0)),
        "split": lambda: _timed(lambda: fetch_split(0)),
    }
    samples: dict[str, list[float]] = {step: [] for step in steps}
    for round_ in range(rounds + 10):
        for step, operation in steps.items():
            duration = operation()
            if round_ >= 10:
                samples[step].append(duration)
    ms = {step: _milliseconds(durations) for step, durations in samples.items()}
    server, server_again, server_output = ms["server"], ms["again"], ms["output"]
    fetched, parse, construct, encode = ms["fetch"], ms["parse"], ms["construct"], ms["encode"]
    fill_ms, rpush_ms, split_ms = ms["fill"], ms["rpush"], ms["split"]
    cache.delete(*keys.all())
    stored = sum(len(text) for text in texts)
    print(
        f"\nbreakdown of a cold limit=3, {name} ({len(texts)} rows, {stored:,} B of JSON "
        f"text; {len(fitting)} of them fit the budget, {size:,} B), medians of {rounds}:"
    )
    steps_ms: list[tuple[str, float]] = [
        ("PostgreSQL: plan + the statement (EXPLAIN ANALYZE)", server),
        ("PostgreSQL: detoasting the values once more", server_again - server),
        ("PostgreSQL: jsonb_out (jsonb -> text)", server_output - server_again),
        ("transfer + libpq + psycopg2 str decoding", fetched - server_output),
        ("JSON parse (decode_json)", parse),
        ("Message objects (message_from_document)", construct),
        ("msgpack encoding of what fits", encode),
        ("Redis: FILL_TAIL script with what fits", fill_ms),
    ]
    for step, value in steps_ms:
        print(f"  {step:<52} {value:8.3f} ms")
    print(f"  {'(a plain DEL + RPUSH + SET of the same, instead)':<52} {rpush_ms:8.3f} ms")
    print(f"  {'sum':<52} {sum(value for _, value in steps_ms):8.3f} ms")
    print(
        f"  {'(the read with content as text, parsed: instead of':<52} {split_ms:8.3f} ms"
        f"\n  {' the whole read ' + format(fetched + parse, '.3f') + ' ms; not offered)':<52}"
    )


if __name__ == "__main__":
    main()
