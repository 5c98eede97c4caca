"""Docstore latency against raw psycopg2 doing the same SQL, in the same run.

Usage: POSTGRES_CONNECTION_STRING=postgresql://postgres@127.0.0.1:5432/test \
       python bench/docstore_bench.py [--rounds 2000]
Without the variable it uses the embedded server.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import uuid
from pathlib import Path

import psycopg2
from psycopg2 import sql

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import interleaved, median  # noqa: E402

from docstore import PostgresDocumentStore  # noqa: E402
from docstore.embedded import start_embedded  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2000)
    args = parser.parse_args()
    dsn = os.environ.get("POSTGRES_CONNECTION_STRING") or start_embedded()
    table = f"bench_{uuid.uuid4().hex[:10]}"
    store = PostgresDocumentStore(dsn, table=table)
    raw = psycopg2.connect(dsn)
    raw.autocommit = True
    cur = raw.cursor()
    t = sql.Identifier(table)
    try:
        # 10,000 documents in the queried collection, 100 of them matching.
        for i in range(10_000):
            store.create("people", {"group": i % 100, "name": f"n{i}", "age": i % 90})
        store.ensure_index("people", "group")
        cur.execute(sql.SQL("ANALYZE {}").format(t))
        doc = {"name": "Ada", "age": 36, "tags": ["a", "b"], "profile": {"city": "Oslo"}}
        text = json.dumps(doc)  # the raw target row; every timed call encodes its own JSON
        cols = "id, collection, data, created_at, updated_at, version, expires_at"
        raw_insert = sql.SQL(
            f"INSERT INTO {{}} (collection, id, data) VALUES (%s, %s, %s::jsonb) RETURNING {cols}"
        ).format(t)
        raw_select = sql.SQL(
            f"SELECT {cols} FROM {{}} WHERE collection = %s AND id = %s"
            " AND (expires_at IS NULL OR expires_at > now())"
        ).format(t)
        raw_update = sql.SQL(
            "UPDATE {} SET data = data || %s::jsonb, version = version + 1, updated_at = now()"
            f" WHERE collection = %s AND id = %s RETURNING {cols}"
        ).format(t)
        raw_query = sql.SQL(
            f"SELECT {cols} FROM {{}} WHERE collection = 'people'"
            " AND (expires_at IS NULL OR expires_at > now())"
            " AND (data #> ARRAY['group']) = %s::jsonb ORDER BY created_at, id LIMIT 100"
        ).format(t)
        target = store.create("bench", doc)
        cur.execute(raw_insert, ("rawbench", "target", text))

        def raw_run(statement: sql.Composable, params: tuple[object, ...]) -> None:
            cur.execute(statement, params)
            cur.fetchall()

        pairs = {
            "create": (
                lambda i: store.create("bench", doc),
                lambda i: raw_run(raw_insert, ("rawbench", str(uuid.uuid4()), json.dumps(doc))),
            ),
            "read": (
                lambda i: store.read("bench", target.id),
                lambda i: raw_run(raw_select, ("rawbench", "target")),
            ),
            "update": (
                lambda i: store.update("bench", target.id, {"age": i}),
                lambda i: raw_run(raw_update, (json.dumps({"age": i}), "rawbench", "target")),
            ),
            "query-100 (indexed)": (
                lambda i: store.query("people", {"group": i % 100}, limit=100),
                lambda i: raw_run(raw_query, (json.dumps(i % 100),)),
            ),
        }
        results = interleaved(pairs, args.rounds)
        print(f"{'operation':<22}{'docstore':>12}{'raw psycopg2':>14}{'ratio':>8}")
        for name, (library, baseline) in results.items():
            lib_ms, raw_ms = median(library) * 1e3, median(baseline) * 1e3
            print(f"{name:<22}{lib_ms:>10.3f}ms{raw_ms:>12.3f}ms{lib_ms / raw_ms:>7.2f}x")
    finally:
        store.close()
        cur.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(t))
        cur.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(f"{table}_meta")))
        raw.close()


if __name__ == "__main__":
    main()
