"""SessionStore latency against the raw floor: redis-py and psycopg2 doing the least work.

Usage: python bench/session_bench.py [--rounds 2000] [--blocks 10] [--no-profile]

Talks to the servers named by POSTGRES_CONNECTION_STRING and REDIS_URL (by
default the local ones below). Everything lives in a fresh docstore table and
under a fresh key prefix, both removed at the end.

Each library operation is measured in blocks alternating with its raw floor
(`_common.interleaved`), so drift on the machine hits both alike:

- get_session, hit: redis-py GET + msgpack decode of the same cached value;
- get_session, miss + fill (cached key deleted untimed before each call):
  one primary-key SELECT + one Redis SET;
- update_session: one autocommit upsert (INSERT ... ON CONFLICT DO UPDATE ...
  RETURNING) of an equivalent document + one Redis SET;
- add_message at message 10 and at message 10,000: one statement that bumps
  the session row and inserts the message (CTE UPDATE ... RETURNING + INSERT)
  + one Redis SET.

The raw rows live in the same table and collections as the library's, so
both pay for the same indexes. Then, to show where the gap comes from: pieces
of the library against the same floors (a plain GET + the library's decode;
the docstore alone against the raw statement alone), round trips per call,
client CPU per call, PostgreSQL's planning and execution time of the very
statements each side sends (EXPLAIN ANALYZE, rolled back), the cost of the
READ scripts against a GET, and the library's hot spots under cProfile.
`--no-profile` stops after the two tables.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import msgpack
import psycopg2
import redis
from psycopg2 import sql

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Operation, interleaved, median, p99  # noqa: E402

from docstore import PostgresDocumentStore  # noqa: E402
from session import SessionStore  # noqa: E402
from session.coherence import (  # noqa: E402
    READ,
    READ_SESSION,
    MessageWindow,
    SessionKeys,
    new_lease_token,
    read_args,
    read_session_args,
    session_keys,
)
from session.serializer import decode_session  # noqa: E402

DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/test"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
SESSIONS = "sessions"
MESSAGES = "messages"
CACHE_TTL_MS = 3_600_000
LONG_CONVERSATION = 10_000
SHORT_CONVERSATION = 10
APPENDS_PER_SHORT_SESSION = 50
PROFILE_CALLS = 1000

SESSION_DATA: dict[str, Any] = {
    "cart": [{"sku": "A-1", "qty": 2}, {"sku": "B-7", "qty": 1}],
    "locale": "nb-NO",
    "flags": {"beta": True, "theme": "dark"},
    "counter": 0,
}
MESSAGE_TEXT = "What is the weather like in Oslo tomorrow? " * 4

# Target: library median / raw-floor median at most this.
TARGETS = {
    "get_session (hit)": 1.10,
    "get_session (miss + fill)": 1.5,
    "update_session": 1.25,
    "add_message @10": 1.2,
    "add_message @10,000": 1.2,
}
POSITION_TARGET = 1.10
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
MICROSECOND = timedelta(microseconds=1)
COLUMNS = "id, collection, data, created_at, updated_at, version, expires_at"


def micros(moment: datetime) -> int:
    return (moment - EPOCH) // MICROSECOND


def pack_session_row(row: tuple[Any, ...]) -> bytes:
    """Encode a session row as the cache does: a versioned msgpack array."""
    data = dict(row[2])
    meta = data.pop("_session")
    expires = None if row[6] is None else micros(row[6])
    packed: bytes = msgpack.packb(
        [1, row[5], meta["user_id"], meta["conv"], data, micros(row[3]), micros(row[4]), expires],
        use_bin_type=True,
    )
    return packed


class RawFloor:
    """The least work each operation needs: one statement and one Redis call."""

    def __init__(self, dsn: str, cache: redis.Redis, table: str, key_prefix: str) -> None:
        self.conn = psycopg2.connect(dsn)
        self.conn.autocommit = True
        self.cur = self.conn.cursor()
        self.cache = cache
        self.key_prefix = key_prefix
        t = sql.Identifier(table)
        self.upsert_sql = sql.SQL(
            "INSERT INTO {t} AS d (collection, id, data) VALUES (%s, %s, %s::jsonb)"
            " ON CONFLICT (collection, id) DO UPDATE SET data = d.data || EXCLUDED.data,"
            " version = d.version + 1, updated_at = now()"
            f" RETURNING {COLUMNS}"
        ).format(t=t)
        self.select_sql = sql.SQL(
            f"SELECT {COLUMNS} FROM {{t}} WHERE collection = %s AND id = %s"
        ).format(t=t)
        self.append_sql = sql.SQL(
            "WITH parent AS ("
            " UPDATE {t} SET version = version + 1, updated_at = now(), child_seq = child_seq + 1"
            f" WHERE collection = %s AND id = %s RETURNING {COLUMNS}, child_seq"
            "), child AS ("
            " INSERT INTO {t} (collection, id, data)"
            " SELECT %s, %s, %s::jsonb || jsonb_build_object('parent', %s::text,"
            " 'seq', parent.child_seq) FROM parent"
            f" RETURNING {COLUMNS}"
            f") SELECT 'parent', {COLUMNS} FROM parent"
            f" UNION ALL SELECT 'child', {COLUMNS} FROM child"
        ).format(t=t)
        self.bulk_messages_sql = sql.SQL(
            "INSERT INTO {t} (collection, id, data) SELECT %s, %s || '.' || g,"
            " jsonb_build_object('conv', %s::text, 'message_id', 'm' || g, 'role', 'user',"
            " 'content', %s::text, 'metadata', '{{}}'::jsonb, 'parent', %s::text, 'seq', g)"
            " FROM generate_series(1, %s) AS g"
        ).format(t=t)
        self.set_child_seq_sql = sql.SQL(
            "UPDATE {t} SET child_seq = %s WHERE collection = %s AND id = %s"
        ).format(t=t)

    def key(self, session_id: str) -> str:
        return f"{self.key_prefix}{session_id}"

    def new_session(self, name: str, messages: int = 0) -> str:
        """Insert a raw session row (and `messages` messages under it); return its id."""
        session_id = f"raw-{name}-{uuid.uuid4().hex[:8]}"
        self.write(session_id, {**SESSION_DATA, "_session": {"user_id": "u1", "conv": session_id}})
        if messages:
            self.cur.execute(
                self.bulk_messages_sql,
                (MESSAGES, session_id, session_id, MESSAGE_TEXT, session_id, messages),
            )
            self.cur.execute(self.set_child_seq_sql, (messages, SESSIONS, session_id))
        return session_id

    def hit(self, session_id: str) -> object:
        raw = self.cache.get(self.key(session_id))
        if not isinstance(raw, bytes):
            raise RuntimeError("the floor's cached value vanished: Redis was flushed or restarted")
        return msgpack.unpackb(raw, raw=False)

    def write(self, session_id: str, data: dict[str, Any], *, cached: bool = True) -> None:
        self.cur.execute(self.upsert_sql, (SESSIONS, session_id, json.dumps(data)))
        row = self.cur.fetchone()
        assert row is not None
        if cached:
            self.cache.set(self.key(session_id), pack_session_row(row), px=CACHE_TTL_MS)

    def miss(self, session_id: str, *, cached: bool = True) -> None:
        self.cur.execute(self.select_sql, (SESSIONS, session_id))
        row = self.cur.fetchone()
        assert row is not None
        if cached:
            self.cache.set(self.key(session_id), pack_session_row(row), px=CACHE_TTL_MS)

    def append(self, session_id: str, *, cached: bool = True) -> None:
        message_id = uuid.uuid4().hex
        body = {
            "conv": session_id,
            "message_id": message_id,
            "role": "user",
            "content": MESSAGE_TEXT,
            "metadata": {},
        }
        self.cur.execute(
            self.append_sql,
            (
                SESSIONS,
                session_id,
                MESSAGES,
                f"{session_id}.{message_id}",
                json.dumps(body),
                session_id,
            ),
        )
        rows = {row[0]: row[1:] for row in self.cur.fetchall()}
        if cached:
            self.cache.set(self.key(session_id), pack_session_row(rows["parent"]), px=CACHE_TTL_MS)

    def close(self) -> None:
        self.conn.close()


class ShortConversations:
    """Hands out sessions holding 10 messages; each serves 50 timed appends, then a fresh one."""

    def __init__(self, new_session: Callable[[], str], add: Callable[[str], object]) -> None:
        self._new_session = new_session
        self._add = add
        self.current = ""
        self._appends = APPENDS_PER_SHORT_SESSION

    def prepare(self, _: int) -> None:
        """Untimed: move to a fresh session with 10 messages when this one has had its 50."""
        if self._appends >= APPENDS_PER_SHORT_SESSION:
            self.current = self._new_session()
            for _ in range(SHORT_CONVERSATION):
                self._add(self.current)
            self._appends = 0
        self._appends += 1


@contextmanager
def round_trips(store: SessionStore, docs: PostgresDocumentStore) -> Iterator[Counter[str]]:
    """Count the Redis commands and PostgreSQL statements the block sends."""
    counts: Counter[str] = Counter()
    cache = store._cache
    assert cache is not None
    original_command = cache.execute_command
    original_execute = docs._execute

    def command(*args: Any, **options: Any) -> Any:
        name = args[0] if isinstance(args[0], str) else bytes(args[0]).decode()
        counts[f"redis {name}"] += 1
        return original_command(*args, **options)  # type: ignore[no-untyped-call]

    def execute(statement: Any, *args: Any, **kwargs: Any) -> Any:
        # A prepared statement is counted by the statement it prepared.
        text = statement if isinstance(statement, str) else statement.definition.split(" AS ", 1)[1]
        counts[f"postgres {text.split(None, 1)[0]}"] += 1
        return original_execute(statement, *args, **kwargs)

    cache.execute_command = command  # type: ignore[method-assign]
    docs._execute = execute  # type: ignore[method-assign]
    try:
        yield counts
    finally:
        del cache.execute_command
        del docs._execute


class ExplainingCursor:
    """A cursor that first runs each statement under EXPLAIN ANALYZE, rolled back.

    What PostgreSQL spends planning and executing the very statement (and
    parameters) the caller sends is added to `planning` and `execution` (ms).
    The statement then runs for real, so the caller sees no difference.
    """

    def __init__(self, cursor: Any, explain_cursor: Any, prepared: set[str]) -> None:
        self._cursor = cursor
        self._explain = explain_cursor
        self._prepared = prepared  # names prepared on the explain cursor's connection
        self.planning = 0.0
        self.execution = 0.0

    def execute(self, statement: Any, params: Any = ()) -> None:
        self.explain(statement, params)
        self._cursor.execute(statement, params)

    def explain(self, statement: Any, params: Any = ()) -> None:
        """Add what PostgreSQL spends on `statement` (run and rolled back) to the totals."""
        prefix = "EXPLAIN (ANALYZE, SUMMARY ON, TIMING OFF, FORMAT JSON) "
        name = getattr(statement, "name", None)
        if name is not None:
            # The docstore's server-side prepared statement: prepare it here too
            # (once per connection), then explain the EXECUTE the library sends.
            if name not in self._prepared:
                self._explain.execute(statement.definition)
                self._prepared.add(name)
            statement = statement.call
        if isinstance(statement, sql.Composable):
            explained: Any = sql.Composed([sql.SQL(prefix), statement])
        else:
            explained = prefix + statement
        self._explain.execute("BEGIN")
        try:
            self._explain.execute(explained, params)
            plan = self._explain.fetchone()[0][0]
        finally:
            self._explain.execute("ROLLBACK")
        self.planning += plan["Planning Time"]
        self.execution += plan["Execution Time"]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cursor, name)


def server_time(
    pairs: dict[str, tuple[Operation, Operation]],
    prepare: dict[str, Operation],
    docs: PostgresDocumentStore,
    raw: RawFloor,
    calls: int,
) -> None:
    """Print PostgreSQL's planning and execution time per call, library against floor."""
    explain_cursor = raw.conn.cursor()
    prepared: set[str] = set()
    print(f"{'operation':<28}{'library plan':>13}{'exec':>8}{'floor plan':>12}{'exec':>8}")
    for name, (library, floor) in pairs.items():
        if name == "get_session (hit)":
            continue  # no PostgreSQL at all
        spent = []
        for side, operation in enumerate((library, floor)):
            setup = prepare.get(name) if side == 0 else None
            plan, execution = [], []
            for i in range(calls):
                if setup is not None:
                    setup(i)
                cursor = ExplainingCursor(raw.cur, explain_cursor, prepared)
                if side == 0:
                    docs._execute = explaining_execute(docs, cursor)  # type: ignore[method-assign]
                else:
                    raw.cur = cursor  # type: ignore[assignment]
                try:
                    operation(i)
                finally:
                    if side == 0:
                        del docs._execute
                    else:
                        raw.cur = cursor._cursor
                plan.append(cursor.planning * 1000)
                execution.append(cursor.execution * 1000)
            spent += [median(plan), median(execution)]
        print(
            f"{name:<28}{spent[0]:>11.0f}us{spent[1]:>6.0f}us{spent[2]:>10.0f}us{spent[3]:>6.0f}us"
        )


def explaining_execute(docs: PostgresDocumentStore, cursor: ExplainingCursor) -> Any:
    """Return a stand-in for the docstore's `_execute` that explains each statement first."""
    original = docs._execute

    def execute(statement: str, params: Any = (), **options: Any) -> Any:
        cursor.explain(statement, params)
        return original(statement, params, **options)

    return execute


def cpu_per_call(
    pairs: dict[str, tuple[Operation, Operation]], prepare: dict[str, Operation], calls: int
) -> None:
    """Print the client CPU each call burns (thread time), library against floor, interleaved.

    Wall time minus client CPU is time spent waiting on the servers; the
    difference in client CPU is the library's own Python overhead.
    """
    print(f"\n{'operation':<28}{'library CPU':>12}{'floor CPU':>11}{'overhead':>10}")
    for name, (library, floor) in pairs.items():
        spent = [0.0, 0.0]
        setup = prepare.get(name)
        for i in range(calls):
            if setup is not None:
                setup(i)
            for side, operation in enumerate((library, floor)):
                start = time.thread_time()
                operation(i)
                spent[side] += time.thread_time() - start
        lib_us, floor_us = (total / calls * 1e6 for total in spent)
        print(f"{name:<28}{lib_us:>10.0f}us{floor_us:>9.0f}us{lib_us - floor_us:>8.0f}us")


def script_costs(cache: redis.Redis, keys: SessionKeys, rounds: int) -> None:
    """Print what running a script costs against a plain GET of the same value, interleaved."""
    trivial = cache.register_script("return redis.call('GET', KEYS[1])")
    read_session = cache.register_script(READ_SESSION)
    read = cache.register_script(READ)
    all_keys = list(keys.all())
    # The value is cached, so READ_SESSION never takes its lease; READ is told not to.
    session_args: list[Any] = read_session_args(new_lease_token(), 2000)
    args: list[Any] = read_args(new_lease_token(), 2000, MessageWindow(limit=20), take_lease=False)

    def get(i: int) -> object:
        return cache.get(keys.value)

    pairs: dict[str, tuple[Operation, Operation]] = {
        "EVALSHA 'return GET'": (lambda i: trivial(keys=[keys.value]), get),
        "READ_SESSION (get_session)": (
            lambda i: read_session(keys=[keys.value, keys.lease], args=session_args),
            get,
        ),
        "READ (get_messages' lookup)": (lambda i: read(keys=all_keys, args=args), get),
    }
    print(f"{'':<28}{'script':>10}{'GET':>10}{'extra':>10}")
    for name, (script, plain) in interleaved(pairs, rounds).items():
        script_us, get_us = median(script) * 1e6, median(plain) * 1e6
        print(f"{name:<28}{script_us:>8.0f}us{get_us:>8.0f}us{script_us - get_us:>8.0f}us")


def profile(name: str, operation: Operation, prepare: Operation | None, calls: int) -> None:
    """Print the library functions that burn the most client CPU per call (cProfile)."""
    profiler = cProfile.Profile()
    for i in range(calls):
        if prepare is not None:
            prepare(i)
        profiler.enable()
        operation(i)
        profiler.disable()
    entries = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    rows = []
    for (filename, line, function), (_, calls_made, tottime, cumtime, _) in entries.items():
        if filename == "~" or "/session/" in filename or "/docstore/" in filename:
            label = function if filename == "~" else f"{Path(filename).name}:{line}({function})"
            if "socket" in label or "'execute'" in label:
                continue  # waiting on a server, not client work
            rows.append((tottime, calls_made, cumtime, label))
    rows.sort(reverse=True)
    print(f"\n{name}: top self time per call (us), calls per call")
    for tottime, calls_made, _, label in rows[:8]:
        print(f"    {tottime / calls * 1e6:7.1f}  {calls_made / calls:5.1f}x  {label}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2000, help="timed calls per operation")
    parser.add_argument("--blocks", type=int, default=10, help="library/raw alternations")
    parser.add_argument("--no-profile", action="store_true")
    args = parser.parse_args()
    dsn = os.environ.get("POSTGRES_CONNECTION_STRING") or DEFAULT_DSN
    redis_url = os.environ.get("REDIS_URL") or DEFAULT_REDIS_URL
    table = f"bench_session_{uuid.uuid4().hex[:10]}"
    run_id = uuid.uuid4().hex[:10]
    key_prefix = f"bench{run_id}:"
    # The floor's keys sit outside the store's namespace, which the store may drop
    # as a whole (after another client's SCRIPT FLUSH, say).
    raw_prefix = f"benchraw{run_id}:"
    cache = redis.Redis.from_url(redis_url)
    docs = PostgresDocumentStore(dsn, table=table)
    raw = RawFloor(dsn, cache, table, raw_prefix)
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
        raw.close()
        for prefix in (key_prefix, raw_prefix):
            keys = list(cache.scan_iter(match=f"{prefix}*", count=1000))
            for start in range(0, len(keys), 500):
                cache.delete(*keys[start : start + 500])
        cache.close()
    print(f"\n(run took {time.monotonic() - started:.0f} s)")


def run(
    args: argparse.Namespace,
    store: SessionStore,
    docs: PostgresDocumentStore,
    raw: RawFloor,
    cache: redis.Redis,
    key_prefix: str,
    table: str,
) -> None:
    def new_session() -> str:
        return store.create_session("u1", SESSION_DATA).id

    def add(session_id: str) -> object:
        return store.add_message(session_id, "user", MESSAGE_TEXT)

    hit_id, miss_id, write_id, long_id = (new_session() for _ in range(4))
    print(f"building a conversation of {LONG_CONVERSATION:,} messages through the store ...")
    for _ in range(LONG_CONVERSATION):
        add(long_id)
    store.get_session(hit_id)  # filled: every timed get is a hit
    miss_key = session_keys(key_prefix, miss_id).value
    raw_hit_id, raw_miss_id, raw_write_id = (raw.new_session(name) for name in ("h", "m", "w"))
    raw_short_id = raw.new_session("a10", SHORT_CONVERSATION)
    raw_long_id = raw.new_session("a10k", LONG_CONVERSATION)
    raw.cur.execute(sql.SQL("ANALYZE {}").format(sql.Identifier(table)))
    short = ShortConversations(new_session, add)

    pairs: dict[str, tuple[Operation, Operation]] = {
        "get_session (hit)": (
            lambda i: store.get_session(hit_id),
            lambda i: raw.hit(raw_hit_id),
        ),
        "get_session (miss + fill)": (
            lambda i: store.get_session(miss_id),
            lambda i: raw.miss(raw_miss_id),
        ),
        "update_session": (
            lambda i: store.update_session(write_id, {"counter": i}),
            lambda i: raw.write(raw_write_id, {"counter": i}),
        ),
        "add_message @10": (
            lambda i: add(short.current),
            lambda i: raw.append(raw_short_id),
        ),
        "add_message @10,000": (
            lambda i: add(long_id),
            lambda i: raw.append(raw_long_id),
        ),
    }
    prepare: dict[str, Operation] = {
        "get_session (miss + fill)": lambda i: cache.delete(miss_key),
        "add_message @10": short.prepare,
    }
    print(f"measuring {args.rounds} calls per operation in {args.blocks} alternating blocks ...")
    before = store.stats()
    results = interleaved(pairs, args.rounds, args.blocks, prepare)
    after = store.stats()
    print_table(results)
    counted = ("hits", "misses", "fills", "cache_errors", "cache_fences", "lease_waits")
    counts = {name: after.get(name, 0) - before.get(name, 0) for name in counted}
    print(f"\nstore counters during the measurement: {counts}")
    if counts["cache_errors"] or counts["cache_fences"] or counts["lease_waits"]:
        print(
            "WARNING: Redis misbehaved during the measurement (errors, a SCRIPT FLUSH or a"
            " restart by another client): the numbers above include the recovery"
        )

    print("\n--- where the gap is: pieces of the library against the same floors ---")
    hit_key = session_keys(key_prefix, hit_id).value
    diagnostic: dict[str, tuple[Operation, Operation]] = {
        # What a hit would cost with a plain GET instead of the READ_SESSION script.
        "GET + decode_session": (
            lambda i: decode_session(cache.get(hit_key), hit_id),
            lambda i: raw.hit(raw_hit_id),
        ),
        # The docstore alone against the raw statement alone (no Redis on either side).
        "docstore.read": (
            lambda i: docs.read(SESSIONS, miss_id),
            lambda i: raw.miss(raw_miss_id, cached=False),
        ),
        "docstore.update": (
            lambda i: docs.update(SESSIONS, write_id, {"counter": i}),
            lambda i: raw.write(raw_write_id, {"counter": i}, cached=False),
        ),
        "docstore.append @10,000": (
            lambda i: docs.append(
                MESSAGES,
                {"conv": "c", "message_id": "m", "role": "user", "content": MESSAGE_TEXT,
                 "metadata": {}},
                parent=(SESSIONS, long_id),
                id=uuid.uuid4().hex,
            ),
            lambda i: raw.append(raw_long_id, cached=False),
        ),
    }  # fmt: skip
    print_table(interleaved(diagnostic, args.rounds // 2, args.blocks), targets=False)

    if args.no_profile:
        return
    print("\n--- round trips per call (library) ---")
    for name, (library, _) in pairs.items():
        setup = prepare.get(name)
        if setup is not None:
            setup(-1)
        with round_trips(store, docs) as counts_seen:
            library(0)
        print(f"{name:<28}" + ", ".join(f"{n} {what}" for what, n in sorted(counts_seen.items())))
    print("\n--- client CPU per call (thread time; the rest of the wall time is waiting) ---")
    cpu_per_call(pairs, prepare, PROFILE_CALLS)
    print("\n--- PostgreSQL's own time per call (EXPLAIN ANALYZE of the same statements) ---")
    server_time(pairs, prepare, docs, raw, PROFILE_CALLS // 5)
    print("\n--- one Redis round trip: plain GET against the read scripts on the same value ---")
    script_costs(cache, session_keys(key_prefix, hit_id), PROFILE_CALLS)
    print("\n--- library hot spots (cProfile, which inflates Python time ~2x) ---")
    for name, (library, _) in pairs.items():
        profile(name, library, prepare.get(name), PROFILE_CALLS)


def print_table(
    results: dict[str, tuple[list[float], list[float]]], *, targets: bool = True
) -> None:
    print()
    header = (
        f"{'operation':<28}{'library':>10}{'p99':>9}{'floor':>10}{'p99':>9}"
        f"{'ratio':>8}{'p99 ratio':>10}{'target':>8}  verdict"
    )
    print(header)
    print("-" * len(header))
    for name, (library, floor) in results.items():
        ratio = median(library) / median(floor)
        target = TARGETS.get(name)
        verdict = (
            "" if target is None else f"{target:>7.2f}x  " + ("ok" if ratio <= target else "MISSED")
        )
        print(
            f"{name:<28}{median(library) * 1e6:>8.0f}us{p99(library) * 1e6:>7.0f}us"
            f"{median(floor) * 1e6:>8.0f}us{p99(floor) * 1e6:>7.0f}us"
            f"{ratio:>7.2f}x{p99(library) / p99(floor):>9.2f}x{verdict}"
        )
    if not targets:
        return
    at_10 = median(results["add_message @10"][0])
    at_10k = median(results["add_message @10,000"][0])
    ratio = at_10k / at_10
    print(
        f"{'add_message @10,000 / @10':<28}{at_10k * 1e6:>8.0f}us{'':>9}{at_10 * 1e6:>8.0f}us"
        f"{'':>9}{ratio:>7.2f}x{'':>10}{POSITION_TARGET:>7.2f}x  "
        + ("ok" if ratio <= POSITION_TARGET else "MISSED")
    )
    print("(medians; ratio = library median / floor median, same run, interleaved blocks)")


if __name__ == "__main__":
    main()
