"""Export/import round trip at growing sizes: time, ratio to raw SQL, memory peak.

For each size (by default 25,000, 50,000 and 100,000 messages, 100 per
session) it builds a JSON Lines file, then:

1. imports it into an empty table (`import_sessions`), timed;
2. exports that table (`export_sessions`), timed, and checks that the bytes
   equal the file (the round trip is exact);
3. measures the raw floor in the same run: the same rows written with one
   multi-row INSERT per session in one transaction each, and read back with
   one keyset SELECT per page plus one per session's messages;
   (both tables are ANALYZEd after loading, as autovacuum would soon do);
4. repeats export and import under tracemalloc to report the peak of Python
   memory, which must not grow with the size.

Usage: python bench/transfer_bench.py [--sizes 25000,50000,100000] [--per-session 100]
(PostgreSQL from POSTGRES_CONNECTION_STRING, else the embedded server).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import secrets
import sys
import time
import tracemalloc
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import psycopg2
import psycopg2.extras
from psycopg2 import sql

from docstore import PostgresDocumentStore
from session import SessionStore
from session.transfer import export_sessions, import_sessions


def synthetic_lines(messages: int, per_session: int) -> Iterator[str]:
    """Yield export lines: sessions of `per_session` messages, `messages` in all."""
    start = datetime(2025, 1, 1, tzinfo=timezone.utc)
    sessions = messages // per_session
    for n in range(sessions):
        created = start + timedelta(seconds=n)
        stamp = created.isoformat(timespec="microseconds")
        record = {
            "id": secrets.token_urlsafe(32).replace("-", "a"),
            "user_id": f"user{n % 100}",
            "created_at": stamp,
            "updated_at": stamp,
            "expires_at": None,
            "version": 1 + per_session,
            "data": {"plan": "pro", "n": n},
            "conversation": secrets.token_urlsafe(16).replace("-", "a"),
            "last_seq": per_session,
        }
        head = ",".join(
            f"{json.dumps(key)}:{json.dumps(value, separators=(',', ':'), sort_keys=True)}"
            for key, value in record.items()
        )
        body = ",".join(
            json.dumps(
                {
                    "content": f"message {seq} of session {n}: " + "lorem ipsum " * 8,
                    "created_at": stamp,
                    "id": f"m{seq}",
                    "metadata": {"tokens": seq},
                    "role": "user" if seq % 2 else "assistant",
                    "seq": seq,
                },
                separators=(",", ":"),
                sort_keys=True,
            )
            for seq in range(1, per_session + 1)
        )
        # Field order as export writes it: messages last.
        yield "{" + head + ',"messages":[' + body + "]}\n"


def canonical(path: Path, dsn: str) -> bytes:
    """Return the file as export writes it (import it into a scratch table, export it)."""
    with fresh_store(dsn) as (store, _):
        with path.open(encoding="utf-8") as lines:
            import_sessions(store, lines)
        out = io.StringIO()
        export_sessions(store, out)
        return out.getvalue().encode("utf-8")


class fresh_store:
    """A SessionStore on a new table (no cache), dropped on exit."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.table = f"bench_{uuid.uuid4().hex[:12]}"

    def __enter__(self) -> tuple[SessionStore, str]:
        self.store = SessionStore(PostgresDocumentStore(self.dsn, table=self.table), None,
                                  owns_docstore=True)  # fmt: skip
        return self.store, self.table

    def __exit__(self, *exc: object) -> None:
        self.store.close()
        conn = psycopg2.connect(self.dsn, connect_timeout=10)
        conn.autocommit = True
        with conn.cursor() as cur:
            for name in (self.table, f"{self.table}_meta"):
                cur.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(name)))
        conn.close()


def analyze(dsn: str, table: str | SessionStore) -> None:
    """Give the planner statistics, as autovacuum would soon after a bulk load."""
    if isinstance(table, SessionStore):
        documents = table.document_store
        assert isinstance(documents, PostgresDocumentStore)
        table = documents.table_stats([])["table"]
    conn = psycopg2.connect(dsn, connect_timeout=10)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(sql.SQL("ANALYZE {}").format(sql.Identifier(table)))
    conn.close()


def raw_import(dsn: str, table: str, path: Path) -> None:
    """The floor: each session and its messages in one transaction, one INSERT per session."""
    conn = psycopg2.connect(dsn, connect_timeout=10)
    insert = sql.SQL(
        "INSERT INTO {} (collection, id, data, created_at, updated_at, version, child_seq) "
        "VALUES %s"
    ).format(sql.Identifier(table))
    with conn, conn.cursor() as cur:
        for line in path.open(encoding="utf-8"):
            record = json.loads(line)
            conv = record["conversation"]
            rows = [
                (
                    "sessions",
                    record["id"],
                    json.dumps(
                        record["data"] | {"_session": {"user_id": record["user_id"], "conv": conv}}
                    ),
                    record["created_at"],
                    record["updated_at"],
                    record["version"],
                    record["last_seq"],
                )
            ]
            for message in record["messages"]:
                data = {
                    "conv": conv,
                    "message_id": message["id"],
                    "role": message["role"],
                    "content": message["content"],
                    "metadata": message["metadata"],
                    "parent": record["id"],
                    "seq": message["seq"],
                }
                rows.append(("messages", f"{conv}.{message['id']}", json.dumps(data),
                             message["created_at"], message["created_at"], 1, 0))  # fmt: skip
            psycopg2.extras.execute_values(cur, insert, rows, page_size=1000)
            conn.commit()
    conn.close()


def raw_export(dsn: str, table: str) -> int:
    """The floor: keyset pages of sessions, each session's messages in one SELECT, as JSON."""
    conn = psycopg2.connect(dsn, connect_timeout=10)
    out = io.StringIO()
    written = 0
    t = sql.Identifier(table)
    sessions = sql.SQL(
        "SELECT id, data, created_at, child_seq FROM {} WHERE collection = 'sessions' "
        "AND (created_at, id) > (%s, %s) ORDER BY created_at, id LIMIT 100"
    ).format(t)
    # The same expressions as the store's (conv, seq) index, so the floor is indexed too.
    messages = sql.SQL(
        "SELECT data, created_at FROM {} WHERE collection = 'messages' "
        "AND (data #> ARRAY['conv']) = %s::jsonb ORDER BY (data #> ARRAY['seq'])"
    ).format(t)
    cursor = (datetime(1970, 1, 1, tzinfo=timezone.utc), "")
    with conn.cursor() as cur:
        while True:
            cur.execute(sessions, cursor)
            page = cur.fetchall()
            for session_id, data, created_at, counter in page:
                cur.execute(messages, (json.dumps(data["_session"]["conv"]),))
                out.write(json.dumps([session_id, data, str(created_at), counter,
                                      [[m, str(c)] for m, c in cur.fetchall()]]))  # fmt: skip
                out.write("\n")
                written += 1
            if len(page) < 100:
                break
            cursor = (page[-1][2], page[-1][0])
    conn.close()
    return written


def measure_size(dsn: str, messages: int, per_session: int, directory: Path) -> dict[str, float]:
    source = directory / f"source-{messages}.jsonl"
    with source.open("w", encoding="utf-8") as out:
        out.writelines(synthetic_lines(messages, per_session))
    expected = canonical(source, dsn)
    source.write_bytes(expected)
    results: dict[str, float] = {"messages": messages, "bytes": len(expected)}
    with fresh_store(dsn) as (store, _):
        started = time.perf_counter()
        with source.open(encoding="utf-8") as lines:
            report = import_sessions(store, lines)
        results["import_s"] = time.perf_counter() - started
        assert report.imported == messages // per_session and report.rejected == 0
        analyze(dsn, store)
        out = io.StringIO()
        started = time.perf_counter()
        export_sessions(store, out)
        results["export_s"] = time.perf_counter() - started
        assert out.getvalue().encode("utf-8") == expected, "the round trip changed the bytes"
        # Memory: the same work under tracemalloc (slower; only the peak counts).
        tracemalloc.start()
        export_sessions(store, _Discard())
        results["export_peak_kib"] = tracemalloc.get_traced_memory()[1] / 1024
        tracemalloc.stop()
    with fresh_store(dsn) as (store, _):
        tracemalloc.start()
        with source.open(encoding="utf-8") as lines:
            import_sessions(store, lines)
        results["import_peak_kib"] = tracemalloc.get_traced_memory()[1] / 1024
        tracemalloc.stop()
    with fresh_store(dsn) as (_, table):
        started = time.perf_counter()
        raw_import(dsn, table, source)
        results["raw_import_s"] = time.perf_counter() - started
        analyze(dsn, table)
        started = time.perf_counter()
        raw_export(dsn, table)
        results["raw_export_s"] = time.perf_counter() - started
    source.unlink()
    return results


class _Discard(io.TextIOBase):
    def write(self, text: str) -> int:
        return len(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="25000,50000,100000")
    parser.add_argument("--per-session", type=int, default=100)
    parser.add_argument("--dir", default=None, help="scratch directory (default: a temporary one)")
    args = parser.parse_args()
    dsn = os.environ.get("POSTGRES_CONNECTION_STRING")
    if not dsn:
        from docstore.embedded import start_embedded

        dsn = start_embedded()
    import tempfile

    with tempfile.TemporaryDirectory(dir=args.dir) as scratch:
        print(
            f"{'messages':>9} {'MB':>6} {'import s':>9} {'raw s':>7} {'ratio':>6} "
            f"{'export s':>9} {'raw s':>7} {'ratio':>6} {'import peak':>12} {'export peak':>12}"
        )
        for size in (int(part) for part in args.sizes.split(",")):
            r = measure_size(dsn, size, args.per_session, Path(scratch))
            print(
                f"{int(r['messages']):>9} {r['bytes'] / 1e6:>6.1f} "
                f"{r['import_s']:>9.2f} {r['raw_import_s']:>7.2f} "
                f"{r['import_s'] / r['raw_import_s']:>6.2f} "
                f"{r['export_s']:>9.2f} {r['raw_export_s']:>7.2f} "
                f"{r['export_s'] / r['raw_export_s']:>6.2f} "
                f"{r['import_peak_kib']:>9.0f} KiB {r['export_peak_kib']:>9.0f} KiB",
                flush=True,
            )
    sys.exit(0)


if __name__ == "__main__":
    main()
