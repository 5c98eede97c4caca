"""The PostgreSQL document store: one JSONB table, one statement per call where SQL allows."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
import select
import threading
import time
import uuid
from collections.abc import Callable, Hashable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg2
import psycopg2.errors
import psycopg2.extensions
import psycopg2.extras
from psycopg2 import sql
from psycopg2.extensions import connection as Connection
from psycopg2.extensions import cursor as Cursor

from .document import Document
from .errors import (
    DocstoreError,
    DocumentExists,
    InvalidDocument,
    InvalidQuery,
    StoreUnavailable,
    VersionConflict,
)
from .migrations import LATEST_VERSION, migrate
from .pool import ConnectionPool, connect_timeout_seconds
from .query import (
    PercentSafeIdentifier,
    PercentSafeLiteral,
    check_paging,
    compile_keyset,
    compile_order_by,
    compile_where,
    condition_params,
    condition_shape,
    keyset_columns,
    keyset_params,
    keyset_values,
    parse_filters,
    parse_index_order,
    parse_order_by,
    parse_path,
    path_expression,
)
from .store import (
    DEFAULT_MAX_DOCUMENT_BYTES,
    DocumentStore,
    Dumped,
    Filters,
    OrderBy,
    Ttl,
    check_name,
    check_parent,
    check_restorable,
    check_ttl,
    decode_json,
    encode_data,
    iter_paths,
)
from .watchdog import StatementWatchdog

__all__ = ["PostgresDocumentStore", "SCHEMA_VERSION", "index_name", "check_table_name"]

logger = logging.getLogger(__name__)

SCHEMA_VERSION = LATEST_VERSION
_COLUMNS = sql.SQL("id, collection, data, created_at, updated_at, version, expires_at")
_LIVE = sql.SQL("(expires_at IS NULL OR expires_at > now())")
_STATEMENT_SAVEPOINT = "docstore_statement"
# The largest seq a child could get, so that a size check made before the
# server assigns the real one never underestimates the stored document.
_SEQ_PLACEHOLDER = 2**62
# Documents per INSERT of restore_many: each batch size is one cached statement text.
_RESTORE_BATCH = 100
# Seconds past statement_timeout before the client stops waiting for an answer.
_NETWORK_GRACE = 0.5
# A statement unanswered this long is checked with a probe (see watchdog.py), and
# the probe must answer within _PROBE_TIMEOUT: a partition fails a call in about
# 1 s, which leaves a loaded machine a margin under the 2 s no call may take.
_PROBE_AFTER = 0.5
_PROBE_TIMEOUT = 0.5


def _check_version(expected_version: object) -> int | None:
    if expected_version is None:
        return None
    if isinstance(expected_version, bool) or not isinstance(expected_version, int):
        raise InvalidDocument(f"expected_version must be an int, not {expected_version!r}")
    return expected_version


def _expiry_sql(ttl_seconds: float | None, params: list[Any]) -> sql.Composable:
    if ttl_seconds is None:
        return sql.SQL("NULL::timestamptz")
    params.append(ttl_seconds)
    return sql.SQL("(now() + %s * interval '1 second')")


_new_object = object.__new__


def _to_document(row: Sequence[Any]) -> Document:
    # Filling __dict__ directly skips the frozen dataclass's seven object.__setattr__
    # calls, and one unpacking assignment is four times cheaper than
    # update(zip(...)): together most of the cost of building each of the
    # (often hundred) documents of a query. The targets are Document's fields
    # in order (tests/docstore/test_postgres_store.py checks); a row of another
    # length raises ValueError.
    document: Document = _new_object(Document)
    fields = document.__dict__
    (
        fields["id"],
        fields["collection"],
        fields["data"],
        fields["created_at"],
        fields["updated_at"],
        fields["version"],
        fields["expires_at"],
    ) = row
    return document


def _masked_dsn(dsn: str) -> str:
    try:
        parts = psycopg2.extensions.parse_dsn(dsn)
    except psycopg2.Error:
        return "<unparsable dsn>"
    shown = {key: value for key, value in parts.items() if key != "password"}
    if "password" in parts:
        shown["password"] = "***"
    return " ".join(f"{key}={value}" for key, value in sorted(shown.items()))


class _Connection(psycopg2.extensions.connection):
    """A connection that knows its server process and the statements it has prepared."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.prepared: set[str] = set()
        self.timed_out = False  # set by the watchdog when it gave up on a statement
        # Read once here: asking psycopg2 while a statement runs would wait for it.
        self.backend_pid: int = self.get_backend_pid()


@dataclasses.dataclass(frozen=True)
class _Prepared:
    """A hot statement run as a server-side prepared statement.

    psycopg2 sends every statement as text, so the server plans it on each
    call; for the single-row statements on the hot path planning costs as much
    as executing. Each connection prepares such a statement once, then runs
    `EXECUTE name(...)`.
    """

    name: str
    definition: str  # PREPARE name AS ... with $1, $2, ...
    call: str  # EXECUTE name(%s, %s, ...)


_PLACEHOLDER = re.compile(r"%%|%s")


def _prepared(name: str, text: str) -> _Prepared:
    count = 0

    def number(match: re.Match[str]) -> str:
        nonlocal count
        if match.group() == "%%":
            return "%%"
        count += 1
        return f"${count}"

    body = _PLACEHOLDER.sub(number, text)
    arguments = ", ".join(["%s"] * count)
    return _Prepared(
        name,
        f"PREPARE {name} AS {body}",
        f"EXECUTE {name}({arguments})" if count else f"EXECUTE {name}",
    )


class _TransactionState(threading.local):
    conn: Connection | None = None
    depth: int = 0
    statement_savepoint_open: bool = False
    broken: bool = False


def check_table_name(table: object) -> str:
    """Return `table` if it can name a store's table, else raise InvalidDocument.

    At most 40 characters, so that the names of its indexes and of `<table>_meta`
    fit PostgreSQL's 63-byte identifiers.
    """
    name = check_name("table", table)
    if len(name) > 40:
        raise InvalidDocument("table name is longer than 40 characters")
    return name


class PostgresDocumentStore(DocumentStore):
    """Documents in one PostgreSQL table (`data JSONB`), through a small connection pool.

    Every call is one autocommit statement unless it runs inside `transaction()`.
    Driver errors never escape: they become `StoreUnavailable`, `DocumentExists`,
    `InvalidQuery` or `DocstoreError`.
    """

    def __init__(
        self,
        dsn: str,
        *,
        table: str = "documents",
        min_connections: int = 1,
        max_connections: int = 10,
        connect_timeout: float = 5.0,
        statement_timeout: float = 5.0,
        max_document_bytes: int = DEFAULT_MAX_DOCUMENT_BYTES,
        prepare_statements: bool = True,
    ) -> None:
        check_table_name(table)
        if connect_timeout <= 0 or statement_timeout <= 0:
            raise ValueError("connect_timeout and statement_timeout must be positive")
        try:
            dsn_parts = psycopg2.extensions.parse_dsn(dsn)
        except psycopg2.Error:
            # libpq's message quotes the string, password included: leave it out.
            raise DocstoreError(
                "invalid PostgreSQL connection string (not a postgresql:// URL or key=value pairs)"
            ) from None
        options = " ".join(
            part
            for part in (
                dsn_parts.pop("options", ""),
                f"-c statement_timeout={int(statement_timeout * 1000)}",
                "-c TimeZone=UTC",
            )
            if part
        )
        connect_kwargs: dict[str, Any] = {
            **dsn_parts,
            "options": options,
            "connect_timeout": connect_timeout_seconds(connect_timeout),
            "application_name": dsn_parts.get("application_name", "docstore"),
            "connection_factory": _Connection,
        }
        self._dsn_for_repr = _masked_dsn(dsn)
        # The server cancels a statement at statement_timeout; no answer shortly
        # after that means the network dropped it, so the client gives up too.
        self._probe_kwargs = {**connect_kwargs, "application_name": "docstore probe"}
        del self._probe_kwargs["connection_factory"]
        self._watchdog = StatementWatchdog(
            statement_timeout + _NETWORK_GRACE,
            probe=self._running_backends,
            probe_after=min(_PROBE_AFTER, statement_timeout),
        )
        self._table_name = table
        self._table = PercentSafeIdentifier(table)
        self._max_document_bytes = max_document_bytes
        self._local = _TransactionState()
        self._ensured_indexes: set[str] = set()
        # Rendering psycopg2.sql compositions costs more than a local round trip,
        # so each statement's text is rendered once and kept, keyed by its shape.
        self._statements: dict[Hashable, str] = {}
        self._prepared_statements: dict[Hashable, _Prepared] = {}
        self._prepared_lock = threading.Lock()
        # Off for a transaction-pooling proxy (PgBouncer before 1.21), which would
        # hand a prepared statement's EXECUTE to another server connection.
        self._prepare_statements = prepare_statements
        self._pool = ConnectionPool(
            connect_kwargs,
            min_connections=min_connections,
            max_connections=max_connections,
            acquire_timeout=connect_timeout,
            on_connect=_prepare_connection,
        )
        self._create_schema()
        self._pool.prefill()

    def __repr__(self) -> str:
        return f"PostgresDocumentStore({self._dsn_for_repr!r}, table={self._table_name!r})"

    # -- schema -------------------------------------------------------------

    def _name(self, suffix: str) -> sql.Identifier:
        return PercentSafeIdentifier(f"{self._table_name}_{suffix}")

    def _create_schema(self) -> None:
        """Create the table or bring its schema up to date (see migrations.py)."""
        with self._connection() as conn:
            report = migrate(conn, self._table_name)
            if report.applied:
                logger.info(
                    "table %s migrated from schema version %d to %d",
                    self._table_name,
                    report.version_before,
                    report.version_after,
                )
        with self._connection() as conn, conn.cursor() as cur:
            cur.execute("""SELECT '"B"'::jsonb < '"a"'::jsonb AND '"z"'::jsonb < '"é"'::jsonb""")
            code_point_order = cur.fetchone()
            if not (code_point_order and code_point_order[0]):
                logger.warning(
                    "the database collation does not order strings by code point; "
                    "string ranges and order_by follow the collation instead"
                )

    # -- running statements -----------------------------------------------

    def _sql(self, key: Hashable, build: Callable[[], sql.Composable]) -> str:
        """Return the rendered text of the statement `build` makes, rendering it once per key."""
        text = self._statements.get(key)
        if text is None:
            if self._local.conn is not None:
                text = build().as_string(self._local.conn)
            else:
                with self._connection() as conn:
                    text = build().as_string(conn)
            if len(self._statements) > 2000:
                self._statements.clear()  # unbounded query shapes must not grow memory forever
            self._statements[key] = text
        return text

    def _hot(self, key: Hashable, build: Callable[[], sql.Composable]) -> str | _Prepared:
        """Return the statement as a prepared one (for single-row statements of fixed shape)."""
        if not self._prepare_statements:
            return self._sql(key, build)
        prepared = self._prepared_statements.get(key)
        if prepared is None:
            text = self._sql(key, build)
            # Under a lock: two threads naming two statements at once must not pick
            # one name, or a connection would run one under the other's name.
            with self._prepared_lock:
                prepared = self._prepared_statements.get(key)
                if prepared is None:
                    name = f"docstore_{len(self._prepared_statements)}"
                    prepared = _prepared(name, text)
                    self._prepared_statements[key] = prepared
        return prepared

    @contextmanager
    def _connection(self) -> Iterator[Connection]:
        """Lend a pooled connection for one autocommit unit of work, translating errors."""
        conn = self._pool.acquire()
        broken = False
        try:
            yield conn
        except psycopg2.Error as exc:
            broken = conn.closed != 0
            raise _translate(exc, broken=broken) from exc
        finally:
            self._pool.release(conn, broken=broken)

    def _execute(
        self, statement: str | _Prepared, params: Sequence[Any] = (), *, write: bool = True
    ) -> list[tuple[Any, ...]]:
        """Run one statement and return its rows (or [(rowcount,)] when it returns none)."""
        local = self._local
        if local.conn is not None:
            return self._execute_in_transaction(local, statement, params)
        # A read that finds its connection dead is sent once more on a fresh one;
        # a write is not: it may have been committed before the connection died.
        attempts = 1 if write else 2
        for attempt in range(1, attempts + 1):
            conn = self._pool.acquire()
            broken = False
            self._watchdog.enter(conn, _backend_pid(conn))
            try:
                with conn.cursor() as cur:
                    cur.execute(_text_for(conn, cur, statement), params)
                    return _rows(cur)
            except psycopg2.Error as exc:
                broken = conn.closed != 0
                if broken and attempt < attempts and not getattr(conn, "timed_out", False):
                    continue
                error = _translate(exc, broken=broken)
                if write and broken and isinstance(error, StoreUnavailable):
                    error = StoreUnavailable(
                        "the connection broke during a write: it may or may not have been "
                        f"committed ({error})",
                        outcome_unknown=True,
                    )
                raise error from exc
            finally:
                self._watchdog.leave(conn)
                self._pool.release(conn, broken=broken)
        raise AssertionError("unreachable")

    def _execute_in_transaction(
        self, local: _TransactionState, statement: str | _Prepared, params: Sequence[Any]
    ) -> list[tuple[Any, ...]]:
        conn = local.conn
        assert conn is not None
        if local.broken:
            raise StoreUnavailable("the connection of this transaction is broken")
        # Each statement runs under a savepoint so that a failing call (say a
        # DocumentExists the caller catches) undoes only itself, as in the memory store.
        prefix = self._release_statement_savepoint_sql(local)
        prefix += f"SAVEPOINT {_STATEMENT_SAVEPOINT}; "
        self._watchdog.enter(conn, _backend_pid(conn))
        try:
            with conn.cursor() as cur:
                cur.execute(prefix + _text_for(conn, cur, statement), params)
                local.statement_savepoint_open = True
                return _rows(cur)
        except psycopg2.Error as exc:
            if conn.closed:
                local.broken = True
            else:
                self._rollback_statement(conn, local)
            raise _translate(exc, broken=local.broken) from exc
        finally:
            self._watchdog.leave(conn)

    @staticmethod
    def _release_statement_savepoint_sql(local: _TransactionState) -> str:
        if not local.statement_savepoint_open:
            return ""
        local.statement_savepoint_open = False
        return f"RELEASE SAVEPOINT {_STATEMENT_SAVEPOINT}; "

    @staticmethod
    def _rollback_statement(conn: Connection, local: _TransactionState) -> None:
        try:
            with conn.cursor() as cur:
                cur.execute(
                    f"ROLLBACK TO SAVEPOINT {_STATEMENT_SAVEPOINT}; "
                    f"RELEASE SAVEPOINT {_STATEMENT_SAVEPOINT}"
                )
        except psycopg2.Error:
            local.broken = True
        local.statement_savepoint_open = False

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Run the block's calls (this thread, this store) in one transaction.

        A nested block is a savepoint: an exception leaving it undoes only its
        own calls and propagates; the outermost block commits or rolls back.
        """
        local = self._local
        if local.conn is not None:
            yield from self._nested_block(local)
            return
        conn = self._pool.acquire()
        local.conn, local.depth, local.broken = conn, 1, False
        local.statement_savepoint_open = False
        try:
            self._send(local, "BEGIN")
            try:
                yield
            except BaseException:
                self._finish(local, "ROLLBACK", quiet=True)
                raise
            self._finish(local, "COMMIT", quiet=False)
        finally:
            local.conn, local.depth = None, 0
            self._pool.release(conn, broken=local.broken)

    def _nested_block(self, local: _TransactionState) -> Iterator[None]:
        local.depth += 1
        savepoint = f"docstore_block_{local.depth}"
        try:
            self._send(local, f"SAVEPOINT {savepoint}")
            try:
                yield
            except BaseException:
                if not local.broken:
                    self._send(local, f"ROLLBACK TO SAVEPOINT {savepoint}", quiet=True)
                raise
            self._send(local, f"RELEASE SAVEPOINT {savepoint}")
        finally:
            local.depth -= 1

    def _send(self, local: _TransactionState, command: str, *, quiet: bool = False) -> None:
        conn = local.conn
        assert conn is not None
        if local.broken:
            if quiet:
                return
            raise StoreUnavailable("the connection of this transaction is broken")
        self._watchdog.enter(conn, _backend_pid(conn))
        try:
            with conn.cursor() as cur:
                cur.execute(self._release_statement_savepoint_sql(local) + command)
        except psycopg2.Error as exc:
            local.broken = local.broken or conn.closed != 0
            if quiet:
                logger.warning("%s failed: %s", command, type(exc).__name__)
                local.broken = True
                return
            raise _translate(exc, broken=local.broken) from exc
        finally:
            self._watchdog.leave(conn)

    def _finish(self, local: _TransactionState, command: str, *, quiet: bool) -> None:
        try:
            self._send(local, command, quiet=quiet)
        except StoreUnavailable as exc:
            if command == "COMMIT" and local.broken:
                exc.outcome_unknown = True
                raise StoreUnavailable(
                    "the connection broke during COMMIT: the transaction may or may not "
                    "have been committed",
                    outcome_unknown=True,
                ) from exc.__cause__
            raise

    # -- single documents ---------------------------------------------------

    def create(
        self,
        collection: str,
        data: dict[str, Any],
        *,
        id: str | None = None,
        ttl: Ttl | None = None,
    ) -> Document:
        check_name("collection", collection)
        doc_id = check_name("id", id) if id is not None else _new_id()
        text = encode_data(data, self._max_document_bytes)
        ttl_seconds = check_ttl(ttl)
        params: list[Any] = [collection, doc_id, text]
        expiry = _expiry_sql(ttl_seconds, params)
        statement = self._hot(
            ("create", ttl_seconds is None),
            lambda: sql.SQL(
                "INSERT INTO {t} AS d (collection, id, data, expires_at) "
                "VALUES (%s, %s, %s::jsonb, {expiry}) "
                "ON CONFLICT (collection, id) DO UPDATE SET data = EXCLUDED.data, "
                " created_at = now(), updated_at = now(), version = 1, "
                " expires_at = EXCLUDED.expires_at, child_seq = 0 "
                "WHERE d.expires_at IS NOT NULL AND d.expires_at <= now() "
                "RETURNING {cols}"
            ).format(t=self._table, expiry=expiry, cols=_COLUMNS),
        )
        rows = self._write_with_unique_retry(collection, statement, params)
        if not rows:
            raise DocumentExists(f"a document with this id already exists in {collection!r}")
        return _to_document(rows[0])

    def read(self, collection: str, id: str) -> Document | None:
        check_name("collection", collection)
        check_name("id", id)
        statement = self._hot(
            "read",
            lambda: sql.SQL(
                "SELECT {cols} FROM {t} WHERE collection = %s AND id = %s AND {live}"
            ).format(cols=_COLUMNS, t=self._table, live=_LIVE),
        )
        rows = self._execute(statement, (collection, id), write=False)
        return _to_document(rows[0]) if rows else None

    def update(
        self,
        collection: str,
        id: str,
        data: dict[str, Any],
        *,
        expected_version: int | None = None,
        ttl: Ttl | None = None,
    ) -> Document | None:
        return self._modify(collection, id, data, expected_version, ttl, merge=True)

    def replace(
        self,
        collection: str,
        id: str,
        data: dict[str, Any],
        *,
        expected_version: int | None = None,
        ttl: Ttl | None = None,
    ) -> Document | None:
        return self._modify(collection, id, data, expected_version, ttl, merge=False)

    def _modify(
        self,
        collection: str,
        id: str,
        data: dict[str, Any],
        expected_version: int | None,
        ttl: Ttl | None,
        *,
        merge: bool,
    ) -> Document | None:
        check_name("collection", collection)
        check_name("id", id)
        text = encode_data(data, self._max_document_bytes)
        version = _check_version(expected_version)
        ttl_seconds = check_ttl(ttl)
        params: list[Any] = [text]
        if ttl_seconds is not None:
            params.append(ttl_seconds)
        params.extend([collection, id])
        if merge:
            # The merged document must respect the size limit too.
            params.extend([text, self._max_document_bytes])
        if version is not None:
            params.append(version)

        def build() -> sql.Composable:
            # Composed only when the statement is first rendered: formatting costs
            # more than the rest of the call.
            new_data = sql.SQL("data || %s::jsonb" if merge else "%s::jsonb")
            assignments = [sql.SQL("data = {}").format(new_data)]
            if ttl_seconds is not None:
                assignments.append(sql.SQL("expires_at = {}").format(_expiry_sql(ttl_seconds, [])))
            guards = [_LIVE]
            if merge:
                guards.append(sql.SQL("octet_length((data || %s::jsonb)::text) <= %s"))
            if version is not None:
                guards.append(sql.SQL("version = %s"))
            return sql.SQL(
                "UPDATE {t} SET {assignments}, updated_at = now(), version = version + 1 "
                "WHERE collection = %s AND id = %s AND {guards} RETURNING {cols}"
            ).format(
                t=self._table,
                assignments=sql.SQL(", ").join(assignments),
                guards=sql.SQL(" AND ").join(guards),
                cols=_COLUMNS,
            )

        statement = self._hot(("modify", merge, ttl_seconds is None, version is None), build)
        rows = self._write_with_unique_retry(collection, statement, params)
        if rows:
            return _to_document(rows[0])
        if version is None and not merge:
            return None
        self._explain_refusal(collection, id, version, text if merge else None)
        return None

    def _explain_refusal(
        self, collection: str, id: str, expected_version: int | None, merged_text: str | None
    ) -> None:
        """Raise why a guarded write matched no row, or return None if the document is missing."""
        size = sql.SQL("octet_length((data || %s::jsonb)::text)" if merged_text else "0")
        statement = self._sql(
            ("refusal", merged_text is not None),
            lambda: sql.SQL(
                "SELECT version, {size} FROM {t} WHERE collection = %s AND id = %s AND {live}"
            ).format(size=size, t=self._table, live=_LIVE),
        )
        rows = self._execute(
            statement,
            ([merged_text] if merged_text is not None else []) + [collection, id],
            write=False,
        )
        if not rows:
            return None
        actual_version, merged_bytes = rows[0]
        if expected_version is not None and actual_version != expected_version:
            raise VersionConflict(
                f"expected version {expected_version}, found {actual_version}",
                expected=expected_version,
                actual=actual_version,
            )
        if merged_bytes > self._max_document_bytes:
            raise InvalidDocument(
                f"the merged document would be {merged_bytes} bytes, more than the limit "
                f"of {self._max_document_bytes}"
            )
        # The row changed between the two statements; report it as a conflict.
        raise VersionConflict(
            "the document changed concurrently", expected=expected_version, actual=actual_version
        )

    def upsert(
        self, collection: str, id: str, data: dict[str, Any], *, ttl: Ttl | None = None
    ) -> Document:
        check_name("collection", collection)
        check_name("id", id)
        text = encode_data(data, self._max_document_bytes)
        ttl_seconds = check_ttl(ttl)
        params: list[Any] = [collection, id, text]
        expiry = _expiry_sql(ttl_seconds, params)
        params.append(self._max_document_bytes)
        expired = sql.SQL("(d.expires_at IS NOT NULL AND d.expires_at <= now())")
        statement = self._hot(
            ("upsert", ttl_seconds is None),
            lambda: sql.SQL(
                "INSERT INTO {t} AS d (collection, id, data, expires_at) "
                "VALUES (%s, %s, %s::jsonb, {expiry}) "
                "ON CONFLICT (collection, id) DO UPDATE SET "
                " data = CASE WHEN {expired} THEN EXCLUDED.data ELSE d.data || EXCLUDED.data END, "
                " created_at = CASE WHEN {expired} THEN now() ELSE d.created_at END, "
                " updated_at = now(), "
                " version = CASE WHEN {expired} THEN 1 ELSE d.version + 1 END, "
                " expires_at = CASE WHEN {expired} THEN EXCLUDED.expires_at "
                "   ELSE COALESCE(EXCLUDED.expires_at, d.expires_at) END, "
                " child_seq = CASE WHEN {expired} THEN 0 ELSE d.child_seq END "
                "WHERE {expired} OR octet_length((d.data || EXCLUDED.data)::text) <= %s "
                "RETURNING {cols}"
            ).format(t=self._table, expiry=expiry, expired=expired, cols=_COLUMNS),
        )
        rows = self._write_with_unique_retry(collection, statement, params)
        if not rows:
            self._explain_refusal(collection, id, None, text)
            raise DocstoreError("upsert matched no row")  # only if the row vanished meanwhile
        return _to_document(rows[0])

    def delete(self, collection: str, id: str, *, expected_version: int | None = None) -> bool:
        check_name("collection", collection)
        check_name("id", id)
        version = _check_version(expected_version)
        params: list[Any] = [collection, id]
        guard = sql.SQL("")
        if version is not None:
            guard = sql.SQL(" AND version = %s")
            params.append(version)
        statement = self._hot(
            ("delete", version is None),
            lambda: sql.SQL(
                "DELETE FROM {t} WHERE collection = %s AND id = %s AND {live}{guard} RETURNING 1"
            ).format(t=self._table, live=_LIVE, guard=guard),
        )
        rows = self._execute(statement, params)
        if rows:
            return True
        if version is not None:
            self._explain_refusal(collection, id, version, None)
        return False

    def rename(
        self, collection: str, id: str, new_id: str, *, expected_version: int | None = None
    ) -> Document | None:
        check_name("collection", collection)
        check_name("id", id)
        check_name("id", new_id)
        version = _check_version(expected_version)
        if new_id == id:
            raise DocumentExists("new_id is the document's own id")
        params: list[Any] = [new_id, collection, id]
        guard = sql.SQL("")
        if version is not None:
            guard = sql.SQL(" AND version = %s")
            params.append(version)
        statement = self._hot(
            ("rename", version is None),
            lambda: sql.SQL(
                "UPDATE {t} SET id = %s, version = version + 1, updated_at = now() "
                "WHERE collection = %s AND id = %s AND {live}{guard} RETURNING {cols}"
            ).format(t=self._table, live=_LIVE, guard=guard, cols=_COLUMNS),
        )
        rows = self._write_clearing_expired(collection, new_id, statement, params)
        if rows:
            return _to_document(rows[0])
        if version is not None:
            self._explain_refusal(collection, id, version, None)
        return None

    # -- conflicts with expired rows -------------------------------------------

    def _write_with_unique_retry(
        self, collection: str, statement: str | _Prepared, params: Sequence[Any]
    ) -> list[tuple[Any, ...]]:
        """Run a write; if a unique index refuses it, drop expired rows of the collection once.

        Unique indexes cannot tell live rows from expired ones, and expired
        documents must never conflict.
        """
        try:
            return self._execute(statement, params)
        except DocumentExists:
            if not self._purge_expired_in(collection):
                raise
        return self._execute(statement, params)

    def _write_clearing_expired(
        self, collection: str, id: str, statement: str | _Prepared, params: Sequence[Any]
    ) -> list[tuple[Any, ...]]:
        """Run a write that claims `id`, retrying when the id (or a unique value) was taken.

        The retry sees what took it: an expired row (removed first), a
        concurrent writer's row (an idempotent `append` then returns it), or a
        live conflict that raises DocumentExists again.
        """
        for attempt in range(3):
            try:
                return self._execute(statement, params)
            except DocumentExists:
                if attempt == 2:
                    raise
                clear = self._sql(
                    "clear expired id",
                    lambda: sql.SQL(
                        "DELETE FROM {t} WHERE collection = %s AND id = %s AND NOT {live}"
                    ).format(t=self._table, live=_LIVE),
                )
                self._execute(clear, (collection, id))
                self._purge_expired_in(collection)
        raise AssertionError("unreachable")

    def _purge_expired_in(self, collection: str) -> bool:
        statement = self._sql(
            "purge collection",
            lambda: sql.SQL("DELETE FROM {t} WHERE collection = %s AND NOT {live}").format(
                t=self._table, live=_LIVE
            ),
        )
        rows = self._execute(statement, (collection,))
        return bool(rows and rows[0][0])

    # -- many documents -----------------------------------------------------

    def query(
        self,
        collection: str,
        filters: Filters | None = None,
        *,
        limit: int | None = 100,
        offset: int = 0,
        order_by: OrderBy | None = None,
        after: Document | None = None,
    ) -> list[Document]:
        check_name("collection", collection)
        check_paging(limit, offset)
        conditions = parse_filters(filters)
        keys = parse_order_by(order_by)
        cursor: list[Any] = []
        keyset: sql.Composable = sql.SQL("TRUE")
        if after is not None:
            columns = keyset_columns(keys)
            cursor = keyset_params(keyset_values(after, columns))
            keyset = compile_keyset(columns)
        statement = self._sql(
            ("query", tuple(map(condition_shape, conditions)), tuple(keys), after is None),
            lambda: sql.SQL(
                "SELECT {cols} FROM {t} WHERE collection = %s AND {live} AND {where} "
                "AND {keyset} ORDER BY {order} LIMIT %s OFFSET %s"
            ).format(
                cols=_COLUMNS,
                t=self._table,
                live=_LIVE,
                where=compile_where(conditions),
                keyset=keyset,
                order=compile_order_by(keys),
            ),
        )
        params = [collection, *condition_params(conditions), *cursor, limit, offset]
        rows = self._execute(statement, params, write=False)
        return [_to_document(row) for row in rows]

    def count(self, collection: str, filters: Filters | None = None) -> int:
        check_name("collection", collection)
        conditions = parse_filters(filters)
        statement = self._sql(
            ("count", tuple(map(condition_shape, conditions))),
            lambda: sql.SQL(
                "SELECT count(*) FROM {t} WHERE collection = %s AND {live} AND {where}"
            ).format(t=self._table, live=_LIVE, where=compile_where(conditions)),
        )
        rows = self._execute(statement, [collection, *condition_params(conditions)], write=False)
        return int(rows[0][0])

    def list_collections(self) -> list[str]:
        statement = self._sql(
            "collections",
            lambda: sql.SQL(
                'SELECT DISTINCT collection COLLATE "C" AS name FROM {t} WHERE {live} ORDER BY name'
            ).format(t=self._table, live=_LIVE),
        )
        rows = self._execute(statement, write=False)
        return [row[0] for row in rows]

    def delete_collection(self, collection: str) -> bool:
        check_name("collection", collection)
        statement = self._sql(
            "delete collection",
            lambda: sql.SQL(
                "WITH gone AS (DELETE FROM {t} WHERE collection = %s RETURNING {live} AS live) "
                "SELECT coalesce(bool_or(live), false) FROM gone"
            ).format(t=self._table, live=_LIVE),
        )
        rows = self._execute(statement, (collection,))
        return bool(rows[0][0])

    def delete_many(self, collection: str, filters: Filters) -> int:
        check_name("collection", collection)
        if filters is None:
            raise InvalidQuery("delete_many needs filters; pass {} to delete every document")
        conditions = parse_filters(filters)
        statement = self._sql(
            ("delete many", tuple(map(condition_shape, conditions))),
            lambda: sql.SQL("DELETE FROM {t} WHERE collection = %s AND {live} AND {where}").format(
                t=self._table, live=_LIVE, where=compile_where(conditions)
            ),
        )
        rows = self._execute(statement, [collection, *condition_params(conditions)])
        return int(rows[0][0])

    def purge_expired(self, collection: str | None = None, *, batch_size: int = 1000) -> int:
        if collection is not None:
            check_name("collection", collection)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InvalidQuery(f"batch_size must be an int >= 1, not {batch_size!r}")
        scope = sql.SQL("")
        params: list[Any] = []
        if collection is not None:
            scope = sql.SQL(" AND collection = %s")
            params.append(collection)
        params.append(batch_size)
        statement = self._sql(
            ("purge", collection is None),
            lambda: sql.SQL(
                "DELETE FROM {t} WHERE ctid = ANY(ARRAY("
                " SELECT ctid FROM {t} WHERE expires_at <= now(){scope} LIMIT %s))"
            ).format(t=self._table, scope=scope),
        )
        total = 0
        while True:
            deleted = int(self._execute(statement, params)[0][0])
            total += deleted
            if deleted < batch_size:
                return total

    def pop_expired(self, collection: str, *, limit: int = 1000) -> list[Document]:
        check_name("collection", collection)
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise InvalidQuery(f"limit must be an int >= 1, not {limit!r}")
        statement = self._sql(
            "pop expired",
            lambda: sql.SQL(
                "DELETE FROM {t} WHERE ctid = ANY(ARRAY("
                " SELECT ctid FROM {t} WHERE expires_at <= now() AND collection = %s LIMIT %s))"
                " RETURNING {cols}"
            ).format(t=self._table, cols=_COLUMNS),
        )
        return [_to_document(row) for row in self._execute(statement, (collection, limit))]

    def ensure_index(
        self,
        collection: str,
        paths: str | Sequence[str],
        *,
        unique: bool = False,
        order_by: OrderBy | None = None,
    ) -> None:
        check_name("collection", collection)
        parsed = [parse_path(path) for path in iter_paths(paths)]
        if not parsed:
            raise InvalidQuery("ensure_index needs at least one field path")
        order = parse_index_order(order_by)
        if order and unique:
            raise InvalidQuery("a unique index takes no order_by")
        key = _index_key(collection, parsed, unique, order)
        if key in self._ensured_indexes:
            return
        columns = [path_expression(path) for path in parsed]
        for column, descending in order:
            # DESC is NULLS FIRST and ASC NULLS LAST, as query's ORDER BY spells them.
            columns.append(
                sql.SQL("{}{}").format(
                    sql.Identifier(column), sql.SQL(" DESC" if descending else "")
                )
            )
        if not unique and all(column != "id" for column, _ in order):
            # id last, so that order_by on these paths (ties broken by id) reads the index in order.
            columns.append(sql.SQL("id"))
        statement = sql.SQL(
            "CREATE {unique}INDEX IF NOT EXISTS {name} ON {t} ({columns}) WHERE collection = {coll}"
        ).format(
            unique=sql.SQL("UNIQUE " if unique else ""),
            name=PercentSafeIdentifier(_index_name(self._table_name, key)),
            t=self._table,
            columns=sql.SQL(", ").join(columns),
            coll=PercentSafeLiteral(collection),
        )
        lock_name = PercentSafeLiteral(f"docstore index {self._table_name}")
        lock = sql.SQL("SELECT pg_advisory_lock(hashtext({}))").format(lock_name)
        unlock = sql.SQL("SELECT pg_advisory_unlock(hashtext({}))").format(lock_name)
        if unique:
            self._purge_expired_in(collection)
        # Two processes creating the same index at once would collide in the catalog.
        with self._connection() as conn, conn.cursor() as cur:
            cur.execute(lock, ())
            try:
                cur.execute(statement, ())
            finally:
                if conn.closed == 0:
                    cur.execute(unlock, ())
        self._ensured_indexes.add(key)

    # -- sequences ----------------------------------------------------------

    def append(
        self,
        collection: str,
        data: dict[str, Any],
        *,
        parent: tuple[str, str],
        id: str | None = None,
        ttl: Ttl | None = None,
        parent_ttl: Ttl | None = None,
    ) -> tuple[Document, Document] | None:
        check_name("collection", collection)
        parent_collection, parent_id = check_parent(parent)
        child_id = check_name("id", id) if id is not None else _new_id()
        # One encoding, with room for the "parent" and "seq" the statement adds.
        added = f',"parent":{json.dumps(parent_id, ensure_ascii=False)},"seq":{_SEQ_PLACEHOLDER}'
        text = encode_data(data, self._max_document_bytes, reserve=len(added.encode("utf-8")))
        ttl_seconds = check_ttl(ttl)
        parent_ttl_seconds = check_ttl(parent_ttl)
        params: list[Any] = [collection, child_id]
        parent_expiry: sql.Composable = sql.SQL("")
        if parent_ttl_seconds is not None:
            # The SQL only for the first rendering below; the parameter every time.
            parent_expiry = sql.SQL(", expires_at = (now() + %s * interval '1 second')")
            params.append(parent_ttl_seconds)
        params.extend([parent_collection, parent_id])
        params.extend([collection, child_id, text, parent_id])
        expiry = _expiry_sql(ttl_seconds, params)
        params.extend([parent_collection, parent_id])
        statement = self._hot(
            ("append", ttl_seconds is None, parent_ttl_seconds is None),
            lambda: sql.SQL(
                "WITH existing AS ("
                " SELECT {cols} FROM {t} WHERE collection = %s AND id = %s AND {live}"
                "), parent AS ("
                " UPDATE {t} SET version = version + 1, updated_at = now(),"
                "  child_seq = child_seq + 1{parent_expiry}"
                " WHERE collection = %s AND id = %s AND {live}"
                "  AND NOT EXISTS (SELECT 1 FROM existing)"
                " RETURNING {cols}, child_seq"
                "), child AS ("
                " INSERT INTO {t} (collection, id, data, expires_at)"
                " SELECT %s, %s,"
                "  %s::jsonb || jsonb_build_object('parent', %s::text, 'seq', parent.child_seq),"
                "  {expiry} FROM parent"
                " RETURNING {cols}"
                ") "
                "SELECT 'parent', {cols} FROM parent "
                "UNION ALL SELECT 'child', {cols} FROM child "
                "UNION ALL SELECT 'child', {cols} FROM existing "
                "UNION ALL SELECT 'parent', {cols} FROM {t}"
                " WHERE collection = %s AND id = %s AND {live} AND EXISTS (SELECT 1 FROM existing)"
            ).format(
                cols=_COLUMNS,
                t=self._table,
                live=_LIVE,
                expiry=expiry,
                parent_expiry=parent_expiry,
            ),
        )
        rows = self._write_clearing_expired(collection, child_id, statement, params)
        found = {row[0]: _to_document(row[1:]) for row in rows}
        if "parent" not in found or "child" not in found:
            return None
        return found["parent"], found["child"]

    def pop_child(
        self,
        collection: str,
        filters: Filters,
        *,
        parent: tuple[str, str],
        parent_ttl: Ttl | None = None,
    ) -> tuple[Document, Document | None] | None:
        rows = self._remove_children(collection, filters, parent, parent_ttl, newest_only=True)
        found = {row[0]: _to_document(row[1:]) for row in rows}
        if "parent" not in found:
            return None
        return found["parent"], found.get("child")

    def delete_children(
        self,
        collection: str,
        filters: Filters,
        *,
        parent: tuple[str, str],
        parent_ttl: Ttl | None = None,
    ) -> tuple[Document, int] | None:
        rows = self._remove_children(collection, filters, parent, parent_ttl, newest_only=False)
        if not rows:
            return None
        return _to_document(rows[0][:-1]), int(rows[0][-1])

    def _remove_children(
        self,
        collection: str,
        filters: Filters,
        parent: tuple[str, str],
        parent_ttl: Ttl | None,
        *,
        newest_only: bool,
    ) -> list[tuple[Any, ...]]:
        """Lock the parent, then bump it and delete its (newest) matching child.

        Two statements in one round trip, which PostgreSQL runs as one implicit
        transaction. The first only locks the parent row. The second takes its
        snapshot after that, so it sees every append that committed before the
        lock (a single statement would take its snapshot before waiting for the
        lock and could miss an append that committed meanwhile, popping an
        older child); appends and other pops of this parent wait for the lock.
        """
        check_name("collection", collection)
        if filters is None:
            raise InvalidQuery("filters must select the children; pass {} for all of them")
        parent_collection, parent_id = check_parent(parent)
        conditions = parse_filters(filters)
        parent_ttl_seconds = check_ttl(parent_ttl)
        params: list[Any] = [parent_collection, parent_id]
        parent_expiry: sql.Composable = sql.SQL("")
        if parent_ttl_seconds is not None:
            parent_expiry = sql.SQL(", expires_at = {}").format(
                _expiry_sql(parent_ttl_seconds, params)
            )
        params.extend([parent_collection, parent_id, collection])
        params.extend(condition_params(conditions))
        fields = {
            "t": self._table,
            "live": _LIVE,
            "cols": _COLUMNS,
            "seq": path_expression(("seq",)),
            "where": compile_where(conditions),
            "parent_expiry": parent_expiry,
        }

        def build() -> sql.Composable:
            lock = sql.SQL(
                "SELECT 1 FROM {t} WHERE collection = %s AND id = %s AND {live} "
                "FOR NO KEY UPDATE; "
            ).format(**fields)
            bump = sql.SQL(
                "WITH parent AS ("
                " UPDATE {t} SET version = version + 1, updated_at = now(){parent_expiry}"
                " WHERE collection = %s AND id = %s AND {live}"
                " RETURNING {cols}"
                ")"
            ).format(**fields)
            children = sql.SQL(
                "collection = %s AND {live} AND {where} AND jsonb_typeof({seq}) = 'number'"
                " AND EXISTS (SELECT 1 FROM parent)"
            ).format(**fields)
            if newest_only:
                remove = sql.SQL(
                    ", victim AS ("
                    " SELECT collection, id FROM {t} WHERE {children}"
                    " ORDER BY {seq} DESC, id DESC LIMIT 1 FOR UPDATE"
                    "), gone AS ("
                    " DELETE FROM {t} USING victim"
                    " WHERE {t}.collection = victim.collection AND {t}.id = victim.id"
                    " RETURNING {t}.id, {t}.collection, {t}.data, {t}.created_at,"
                    " {t}.updated_at, {t}.version, {t}.expires_at"
                    ") "
                    "SELECT 'parent', {cols} FROM parent UNION ALL SELECT 'child', {cols} FROM gone"
                ).format(children=children, **fields)
            else:
                remove = sql.SQL(
                    ", gone AS (DELETE FROM {t} WHERE {children} RETURNING 1) "
                    "SELECT {cols}, (SELECT count(*) FROM gone) FROM parent"
                ).format(children=children, **fields)
            return sql.Composed([lock, bump, remove])

        shape = tuple(map(condition_shape, conditions))
        statement = self._sql(
            ("remove children", newest_only, shape, parent_ttl_seconds is None), build
        )
        return self._execute(statement, params)
    # -- export and import ---------------------------------------------------

    def dump(
        self,
        collection: str,
        filters: Filters | None = None,
        *,
        after: Document | None = None,
        limit: int = 1000,
        include_expired: bool = False,
    ) -> list[Dumped]:
        check_name("collection", collection)
        check_paging(limit, 0)
        conditions = parse_filters(filters)
        cursor: list[Any] = []
        # A row comparison, not compile_keyset's OR of branches: PostgreSQL uses it
        # as an index condition on (collection, created_at, id), so every page
        # starts where the last one ended instead of filtering the rows before it.
        keyset: sql.Composable = sql.SQL("TRUE")
        if after is not None:
            cursor = keyset_values(after, [("created_at", False), ("id", False)])
            keyset = sql.SQL("(created_at, id) > (%s, %s)")
        statement = self._sql(
            ("dump", tuple(map(condition_shape, conditions)), after is None, include_expired),
            lambda: sql.SQL(
                "SELECT {cols}, child_seq FROM {t} WHERE collection = %s AND {live} AND {where} "
                "AND {keyset} ORDER BY created_at, id LIMIT %s"
            ).format(
                cols=_COLUMNS,
                t=self._table,
                live=sql.SQL("TRUE") if include_expired else _LIVE,
                where=compile_where(conditions),
                keyset=keyset,
            ),
        )
        params = [collection, *condition_params(conditions), *cursor, limit]
        rows = self._execute(statement, params, write=False)
        return [Dumped(_to_document(row[:-1]), int(row[-1])) for row in rows]

    def _restore_statement(self, rows: int) -> str:
        """Return the INSERT that restores `rows` documents unless a live one holds the id."""
        return self._sql(
            ("restore", rows),
            lambda: sql.SQL(
                "INSERT INTO {t} AS d (collection, id, data, created_at, updated_at, version,"
                " expires_at, child_seq) VALUES {values} "
                "ON CONFLICT (collection, id) DO UPDATE SET data = EXCLUDED.data,"
                " created_at = EXCLUDED.created_at, updated_at = EXCLUDED.updated_at,"
                " version = EXCLUDED.version, expires_at = EXCLUDED.expires_at,"
                " child_seq = EXCLUDED.child_seq "
                "WHERE d.expires_at IS NOT NULL AND d.expires_at <= now() "
                "RETURNING id"
            ).format(
                t=self._table,
                values=sql.SQL(", ").join(
                    [sql.SQL("(%s, %s, %s::jsonb, %s, %s, %s, %s, %s)")] * rows
                ),
            ),
        )

    def _restore_params(self, document: Document, counter: int) -> list[Any]:
        check_restorable(document, counter)
        return [
            document.collection,
            document.id,
            encode_data(document.data, self._max_document_bytes),
            document.created_at,
            document.updated_at,
            document.version,
            document.expires_at,
            counter,
        ]

    def restore(self, document: Document, *, counter: int = 0) -> Document | None:
        params = self._restore_params(document, counter)
        statement = self._restore_statement(1)
        for _ in range(3):
            if self._write_with_unique_retry(document.collection, statement, params):
                return None
            live = self.read(document.collection, document.id)
            if live is not None:
                return live
            # The live document went away between the two statements: try again.
        raise DocstoreError("restore kept racing with writers of the same id")

    def restore_many(self, documents: Sequence[Document]) -> list[str]:
        held: list[str] = []
        for start in range(0, len(documents), _RESTORE_BATCH):
            batch = documents[start : start + _RESTORE_BATCH]
            collections = {document.collection for document in batch}
            if len(collections) != 1:
                raise InvalidDocument("restore_many needs documents of one collection")
            ids = [document.id for document in batch]
            if len(set(ids)) != len(ids):
                raise InvalidDocument("restore_many got the same id twice")
            params = [value for document in batch for value in self._restore_params(document, 0)]
            rows = self._write_with_unique_retry(
                batch[0].collection, self._restore_statement(len(batch)), params
            )
            written = {row[0] for row in rows}
            held.extend(doc_id for doc_id in ids if doc_id not in written)
        return held

    def table_stats(self, collections: Sequence[str]) -> dict[str, Any]:
        """Return the table's size on disk, its indexes' and schema version, and per collection
        how many live and expired documents it holds (a count over the collection's rows).
        """
        for collection in collections:
            check_name("collection", collection)
        counts = self._sql(
            "stats counts",
            lambda: sql.SQL(
                "SELECT collection, count(*) FILTER (WHERE {live}),"
                " count(*) FILTER (WHERE NOT {live})"
                " FROM {t} WHERE collection = ANY(%s) GROUP BY collection"
            ).format(t=self._table, live=_LIVE),
        )
        sizes = self._sql(
            "stats sizes",
            lambda: sql.SQL(
                "SELECT pg_table_size(c.oid), pg_indexes_size(c.oid),"
                " pg_total_relation_size(c.oid),"
                " (SELECT value FROM {meta} WHERE key = 'schema_version')"
                " FROM pg_class c WHERE c.oid = to_regclass(%s)"
            ).format(meta=self._name("meta")),
        )
        indexes = self._sql(
            "stats indexes",
            lambda: sql.SQL(
                "SELECT c.relname, pg_relation_size(c.oid), i.indisvalid FROM pg_index i"
                " JOIN pg_class c ON c.oid = i.indexrelid"
                " WHERE i.indrelid = to_regclass(%s) ORDER BY c.relname"
            ),
        )
        regclass = '"' + self._table_name.replace('"', '""') + '"'
        rows = self._execute(counts, (list(collections),), write=False)
        found = {row[0]: (int(row[1]), int(row[2])) for row in rows}
        table_bytes, index_bytes, total_bytes, version = self._execute(
            sizes, (regclass,), write=False
        )[0]
        listed = self._execute(indexes, (regclass,), write=False)
        return {
            "table": self._table_name,
            "schema_version": int(version),
            "table_bytes": int(table_bytes),
            "indexes_bytes": int(index_bytes),
            "total_bytes": int(total_bytes),
            "indexes": {
                name: {"bytes": int(size), "valid": bool(valid)} for name, size, valid in listed
            },
            "collections": {
                collection: dict(
                    zip(("live", "expired"), found.get(collection, (0, 0)), strict=True)
                )
                for collection in collections
            },
        }

    def _running_backends(self, pids: list[int]) -> set[int]:
        """Return which of these server processes are running a statement (the watchdog's probe).

        Asked on a fresh asynchronous connection with a deadline of its own, so
        that a probe through the same broken network fails fast instead of hanging.
        """
        deadline = time.monotonic() + _PROBE_TIMEOUT
        conn = psycopg2.connect(**self._probe_kwargs, async_=True)
        try:
            _wait_until_ready(conn, deadline)
            with conn.cursor() as cur:
                cur.execute(
                    "SELECT pid FROM pg_stat_activity WHERE pid = ANY(%s) AND state = 'active'",
                    (pids,),
                )
                _wait_until_ready(conn, deadline)
                return {int(row[0]) for row in cur.fetchall()}
        finally:
            conn.close()

    def close(self) -> None:
        self._watchdog.close()
        self._pool.close()


def _index_key(
    collection: str, parsed: Sequence[Any], unique: bool, order: Sequence[tuple[str, bool]] = ()
) -> str:
    # The key (and so the name) of an index without order_by is what it always was.
    return repr((collection, list(parsed), bool(unique), *([list(order)] if order else [])))


def _index_name(table: str, key: str) -> str:
    return f"{table}_ix_{hashlib.sha256(key.encode('utf-8')).hexdigest()[:16]}"


def index_name(
    table: str,
    collection: str,
    paths: str | Sequence[str],
    *,
    unique: bool = False,
    order_by: OrderBy | None = None,
) -> str:
    """Return the name `ensure_index(collection, paths, unique=..., order_by=...)` gives
    its index."""
    parsed = [parse_path(path) for path in iter_paths(paths)]
    order = parse_index_order(order_by)
    return _index_name(table, _index_key(collection, parsed, unique, order))


def _new_id() -> str:
    return str(uuid.uuid4())


def _backend_pid(conn: Connection) -> int:
    pid: int = getattr(conn, "backend_pid", 0)
    return pid


def _wait_until_ready(conn: Connection, deadline: float) -> None:
    """Drive an asynchronous connection until its current operation is done, or time out."""
    while True:
        state = conn.poll()
        if state == psycopg2.extensions.POLL_OK:
            return
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("the probe got no answer in time")
        if state == psycopg2.extensions.POLL_READ:
            select.select([conn.fileno()], [], [], remaining)
        elif state == psycopg2.extensions.POLL_WRITE:
            select.select([], [conn.fileno()], [], remaining)
        else:
            raise psycopg2.OperationalError(f"unexpected poll state {state}")


def _prepare_connection(conn: Connection) -> None:
    psycopg2.extras.register_default_jsonb(conn_or_curs=conn, loads=decode_json)


def _text_for(conn: Connection, cur: Cursor, statement: str | _Prepared) -> str:
    """Return the text to send for `statement`, preparing it on this connection first."""
    if isinstance(statement, str):
        return statement
    prepared: set[str] = conn.prepared  # type: ignore[attr-defined]
    if statement.name not in prepared:
        cur.execute(statement.definition, ())
        prepared.add(statement.name)
    return statement.call


def _rows(cur: Cursor) -> list[tuple[Any, ...]]:
    if cur.description is None:
        return [(cur.rowcount,)]
    return list(cur.fetchall())


def _translate(exc: psycopg2.Error, *, broken: bool) -> DocstoreError:
    """Turn a driver error into the store's own error type."""
    message = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    if isinstance(exc, psycopg2.errors.UniqueViolation):
        return DocumentExists(f"a live document already holds this id or unique value ({message})")
    if isinstance(exc, psycopg2.errors.InvalidRegularExpression):
        return InvalidQuery(f"PostgreSQL refused the pattern: {message}")
    if isinstance(exc, psycopg2.errors.QueryCanceled):
        return StoreUnavailable(f"the statement was cancelled (statement_timeout): {message}")
    if broken or isinstance(exc, psycopg2.OperationalError | psycopg2.InterfaceError):
        return StoreUnavailable(f"PostgreSQL is unavailable: {message}")
    return DocstoreError(f"PostgreSQL refused the statement: {message}")
