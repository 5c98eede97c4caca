"""Schema migrations of the document table: ordered steps, each applied once.

The table's schema version lives in `<table>_meta` (key `schema_version`).
`migrate()` holds a session-level advisory lock named after the table while it
reads the version and applies every newer step in order, recording each one's
version as it completes, so that several processes starting together apply
each step exactly once: the others wait for the lock, then find nothing to do.
A table whose version is newer than the newest step this code knows is
refused with `SchemaTooNew` and left untouched.

A step is a list of SQL statements. A transactional step runs in one
transaction together with its version update (all or nothing). A step whose
statements cannot run in a transaction (`CREATE INDEX CONCURRENTLY`, which
builds an index without blocking writes) must be idempotent (`IF NOT EXISTS`),
since it may be interrupted between its statements and its version update.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import psycopg2
import psycopg2.extensions
from psycopg2 import sql
from psycopg2.extensions import connection as Connection

from .errors import DocstoreError, StoreUnavailable
from .pool import connect_timeout_seconds
from .query import PercentSafeIdentifier, PercentSafeLiteral

__all__ = [
    "Migration",
    "MigrationReport",
    "SchemaTooNew",
    "MIGRATIONS",
    "LATEST_VERSION",
    "schema_lock_name",
    "migrate",
    "migrate_dsn",
    "read_version",
    "table_indexes",
]


class SchemaTooNew(DocstoreError):
    """The table was migrated by a newer version of this library than the one running."""


@dataclasses.dataclass(frozen=True)
class Migration:
    """One schema step: the version it brings the table to and the statements that do it.

    `statements(table, online)` returns the statements for the table named
    `table`; `online` is True when the step upgrades a table that exists (and
    may be big and in use), False when it completes a table created in the
    same run. A step is `transactional` unless it needs `online` statements
    that cannot run in a transaction; on a new table every step is.
    """

    version: int
    description: str
    statements: Callable[[str, bool], list[sql.Composable]]
    transactional: bool = True
    # Index suffixes (`<table>_<suffix>`) that an interrupted run of a
    # non-transactional step may have left INVALID: dropped before it runs again.
    rebuilds: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class MigrationReport:
    """What `migrate()` found and did."""

    table: str
    version_before: int  # 0: the table did not exist
    version_after: int
    applied: tuple[Migration, ...]  # with dry_run: the steps it would apply
    dry_run: bool = False


def _name(table: str, suffix: str) -> sql.Identifier:
    return PercentSafeIdentifier(f"{table}_{suffix}")


def _base_schema(table: str, online: bool) -> list[sql.Composable]:
    t = PercentSafeIdentifier(table)
    return [
        sql.SQL(
            "CREATE TABLE IF NOT EXISTS {t} ("
            " collection text NOT NULL,"
            " id text NOT NULL,"
            " data jsonb NOT NULL,"
            " created_at timestamptz NOT NULL DEFAULT now(),"
            " updated_at timestamptz NOT NULL DEFAULT now(),"
            " version bigint NOT NULL DEFAULT 1,"
            " expires_at timestamptz,"
            " child_seq bigint NOT NULL DEFAULT 0,"
            " PRIMARY KEY (collection, id))"
        ).format(t=t),
        sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} USING gin (data jsonb_path_ops)").format(
            _name(table, "data_gin"), t
        ),
        sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} (collection, created_at, id)").format(
            _name(table, "created"), t
        ),
        sql.SQL(
            "CREATE INDEX IF NOT EXISTS {} ON {} (expires_at) WHERE expires_at IS NOT NULL"
        ).format(_name(table, "expiry"), t),
    ]


def _recent_activity_index(table: str, online: bool) -> list[sql.Composable]:
    # Serves "the most recently active documents of a collection" (warming the
    # cache after a deploy) without sorting the whole collection.
    return [
        sql.SQL("CREATE INDEX {}IF NOT EXISTS {} ON {} (collection, updated_at, id)").format(
            sql.SQL("CONCURRENTLY " if online else ""),
            _name(table, "updated"),
            PercentSafeIdentifier(table),
        )
    ]


def _drop_whole_document_gin(table: str, online: bool) -> list[sql.Composable]:
    # No query of the store can use a GIN index over all of `data`: filters
    # compare `data #> path`, which only ensure_index's expression indexes serve.
    # It cost every write a few dozen index entries (about 35 us of a session
    # update) and its share of the table's size.
    return [
        sql.SQL("DROP INDEX {}IF EXISTS {}").format(
            sql.SQL("CONCURRENTLY " if online else ""), _name(table, "data_gin")
        )
    ]


def _lz4_toast_compression(table: str, online: bool) -> list[sql.Composable]:
    # A large `data` (a message holding a 200 KB tool output) is stored out of
    # line and compressed when that saves at least a quarter; every read then
    # decompresses it, twice for a query ordered by a path of it (the sort key
    # and the output each detoast the value). pglz, PostgreSQL's default,
    # decompressed 200 KB of log-like text in about 0.27 ms here, lz4 in
    # 0.05 ms, storing 9% more (bench/large_messages_bench.py --content text).
    # Only values written from now on use it; older ones stay pglz and read
    # as before. A server built without lz4 (or older than PostgreSQL 14)
    # keeps pglz. The column's setting takes an ACCESS EXCLUSIVE lock for an
    # instant (no rewrite), but while it waits for the lock every other query
    # of the table queues behind it: it waits at most 0.5 s, then the step
    # gives up with a WARNING and leaves pglz (docs/operations.md: how to set
    # it by hand).
    return [
        # `%%` is `%` once the driver formats the (empty) parameters.
        sql.SQL(
            "DO $docstore$ BEGIN"
            " IF EXISTS (SELECT FROM pg_settings WHERE name = 'default_toast_compression'"
            " AND 'lz4' = ANY (enumvals)) THEN"
            " PERFORM set_config('lock_timeout', '500ms', true);"
            " BEGIN"
            " EXECUTE format('ALTER TABLE %%I ALTER COLUMN data SET COMPRESSION lz4', {name});"
            " EXCEPTION WHEN lock_not_available THEN"
            " RAISE WARNING 'docstore: %% keeps pglz: the table was busy', {name};"
            " END; END IF; END $docstore$"
        ).format(name=PercentSafeLiteral(table))
    ]


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "documents table, its GIN, created_at and expiry indexes", _base_schema),
    Migration(
        2,
        "index on (collection, updated_at, id), built without blocking writes",
        _recent_activity_index,
        transactional=False,
        rebuilds=("updated",),
    ),
    Migration(
        3,
        "drop the whole-document GIN index no query uses, without blocking writes",
        _drop_whole_document_gin,
        transactional=False,
    ),
    Migration(
        4, "lz4 TOAST compression for data, where the server has lz4", _lz4_toast_compression
    ),
)
LATEST_VERSION = MIGRATIONS[-1].version

# The table's own indexes after each step (`<table>_<suffix>`; ensure_index's
# come on top): what `session-store doctor` expects. A step that adds or drops
# an index changes this list with it.
INDEXES_BY_VERSION: dict[int, tuple[str, ...]] = {
    1: ("pkey", "data_gin", "created", "expiry"),
    2: ("pkey", "data_gin", "created", "expiry", "updated"),
    3: ("pkey", "created", "expiry", "updated"),
    4: ("pkey", "created", "expiry", "updated"),
}


def table_indexes(table: str, version: int = LATEST_VERSION) -> list[str]:
    """Return the names of the indexes the steps up to `version` give `table`."""
    return [f"{table}_{suffix}" for suffix in INDEXES_BY_VERSION.get(version, ())]


# How long a starting process waits for another one's migration before giving up.
DEFAULT_LOCK_TIMEOUT = 300.0
_LOCK_POLL = 0.05


def schema_lock_name(table: str) -> str:
    """Return the advisory lock name that serialises schema changes of `table`."""
    return f"docstore schema {table}"


def _check_steps(steps: Sequence[Migration]) -> None:
    versions = [step.version for step in steps]
    if not versions or versions != list(range(1, len(versions) + 1)):
        raise ValueError(f"migration versions must be 1, 2, 3 ... in order, not {versions}")


def _exists(conn: Connection, relation: str) -> bool:
    with conn.cursor() as cur:
        cur.execute(
            "SELECT to_regclass(%s) IS NOT NULL", (sql.Identifier(relation).as_string(conn),)
        )
        row = cur.fetchone()
    return bool(row and row[0])


def read_version(conn: Connection, table: str) -> int:
    """Return the table's schema version: 0 when neither it nor its meta table exists.

    A table without a meta table predates versioning: version 0, so step 1
    (all `IF NOT EXISTS`) runs over it and records version 1.
    """
    if not _exists(conn, f"{table}_meta"):
        return 0
    with conn.cursor() as cur:
        cur.execute(
            sql.SQL("SELECT value FROM {} WHERE key = 'schema_version'").format(
                _name(table, "meta")
            ),
            (),
        )
        found = cur.fetchone()
    return int(found[0]) if found else 0


def _record_version(cur: Any, table: str, version: int) -> None:
    cur.execute(
        sql.SQL("CREATE TABLE IF NOT EXISTS {} (key text PRIMARY KEY, value text NOT NULL)").format(
            _name(table, "meta")
        ),
        (),
    )
    cur.execute(
        sql.SQL(
            "INSERT INTO {} (key, value) VALUES ('schema_version', %s) "
            "ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value"
        ).format(_name(table, "meta")),
        (str(version),),
    )


def _drop_invalid(cur: Any, table: str, suffixes: Sequence[str]) -> None:
    """Drop the step's indexes that an interrupted concurrent build left INVALID."""
    for suffix in suffixes:
        name = f"{table}_{suffix}"
        cur.execute(
            "SELECT NOT i.indisvalid FROM pg_index i WHERE i.indexrelid = to_regclass(%s)",
            (sql.Identifier(name).as_string(cur.connection),),
        )
        row = cur.fetchone()
        if row and row[0]:
            cur.execute(
                sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(PercentSafeIdentifier(name)),
                (),
            )


def _acquire(conn: Connection, table: str, timeout: float) -> None:
    """Take the table's schema lock, polling so that no waiter holds a snapshot.

    A waiter blocked inside `pg_advisory_lock` would hold a snapshot, and
    `CREATE INDEX CONCURRENTLY` run by the lock's holder waits for every such
    snapshot to end: the two would wait for each other.
    """
    deadline = time.monotonic() + timeout
    name = PercentSafeLiteral(schema_lock_name(table))
    statement = sql.SQL("SELECT pg_try_advisory_lock(hashtext({}))").format(name)
    with conn.cursor() as cur:
        while True:
            cur.execute(statement, ())
            row = cur.fetchone()
            if row and row[0]:
                return
            if time.monotonic() >= deadline:
                raise StoreUnavailable(
                    f"another process has held the schema lock of {table!r} for {timeout:g} s"
                )
            time.sleep(_LOCK_POLL)


def _release(conn: Connection, table: str) -> None:
    if conn.closed:
        return
    name = PercentSafeLiteral(schema_lock_name(table))
    with conn.cursor() as cur:
        cur.execute(sql.SQL("SELECT pg_advisory_unlock(hashtext({}))").format(name), ())


def migrate(
    conn: Connection,
    table: str,
    *,
    steps: Sequence[Migration] = MIGRATIONS,
    dry_run: bool = False,
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
) -> MigrationReport:
    """Bring `table` to the newest step's version on this autocommit connection.

    Raise SchemaTooNew (changing nothing) when the table is newer than `steps`.
    With `dry_run`, report the steps that would run and change nothing.
    """
    _check_steps(steps)
    if not conn.autocommit:
        raise ValueError("migrate() needs an autocommit connection")
    latest = steps[-1].version
    _acquire(conn, table, lock_timeout)
    try:
        with conn.cursor() as cur:
            # An index build on a big table outlasts any statement_timeout meant
            # for the hot path; the connection's own setting returns at RESET.
            cur.execute("SET statement_timeout = 0")
        before = read_version(conn, table)
        if before > latest:
            raise SchemaTooNew(
                f"table {table!r} has schema version {before}, newer than the {latest} this "
                "version of docstore knows; upgrade the docstore-session package (nothing "
                "was changed)"
            )
        pending = tuple(step for step in steps if step.version > before)
        if dry_run:
            return MigrationReport(table, before, before, pending, dry_run=True)
        # A table created in this run is new and empty: no step needs to spare its writers.
        online = _exists(conn, table)
        with conn.cursor() as cur:
            for step in pending:
                if step.transactional or not online:
                    cur.execute("BEGIN")
                    try:
                        for statement in step.statements(table, online):
                            cur.execute(statement, ())
                        _record_version(cur, table, step.version)
                    except BaseException:
                        if not conn.closed:
                            cur.execute("ROLLBACK")
                        raise
                    cur.execute("COMMIT")
                else:
                    _drop_invalid(cur, table, step.rebuilds)
                    for statement in step.statements(table, online):
                        cur.execute(statement, ())
                    _record_version(cur, table, step.version)
        return MigrationReport(table, before, latest, pending)
    finally:
        if not conn.closed:
            with conn.cursor() as cur:
                cur.execute("RESET statement_timeout")
        _release(conn, table)


def migrate_dsn(
    dsn: str,
    table: str = "documents",
    *,
    steps: Sequence[Migration] = MIGRATIONS,
    dry_run: bool = False,
    connect_timeout: float = 5.0,
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
) -> MigrationReport:
    """Connect to `dsn` and run `migrate()` on `table` (what `python -m session migrate` does).

    Driver errors become StoreUnavailable (server unreachable) or DocstoreError.
    """
    try:
        conn = psycopg2.connect(
            dsn,
            connect_timeout=connect_timeout_seconds(connect_timeout),
            application_name="docstore migrate",
        )
    except psycopg2.Error as exc:
        message = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise StoreUnavailable(f"PostgreSQL is unavailable: {message}") from exc
    try:
        conn.autocommit = True
        try:
            return migrate(conn, table, steps=steps, dry_run=dry_run, lock_timeout=lock_timeout)
        except psycopg2.Error as exc:
            message = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            if conn.closed or isinstance(exc, psycopg2.OperationalError):
                raise StoreUnavailable(f"PostgreSQL is unavailable: {message}") from exc
            raise DocstoreError(f"migration failed: {message}") from exc
    finally:
        conn.close()
