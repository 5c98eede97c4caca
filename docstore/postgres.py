"""The PostgreSQL document store: one JSONB table, one statement per call where SQL allows.

What each call sends lives in `postgres_protocol.py`, shared with the asyncio
store; this module runs it through psycopg2: a pool, a statement watchdog and
thread-local transactions.
"""

from __future__ import annotations

import logging
import select
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import psycopg2
import psycopg2.errors
import psycopg2.extensions
import psycopg2.extras
from psycopg2.extensions import connection as Connection
from psycopg2.extensions import cursor as Cursor

from .document import Document
from .errors import DocstoreError, StoreUnavailable
from .migrations import LATEST_VERSION, migrate
from .pool import ConnectionPool, connect_timeout_seconds
from .postgres_protocol import (
    OPEN_STATEMENT_SAVEPOINT,
    PREPARED_PER_CONNECTION,
    PREPARED_STATEMENT_EXISTS,
    PREPARED_STATEMENT_MISSING,
    RELEASE_STATEMENT_SAVEPOINT,
    ROLLBACK_STATEMENT_SAVEPOINT,
    STATEMENT_SAVEPOINT,
    Atomic,
    Exclusive,
    PostgresProtocol,
    Rows,
    Statement,
    Steps,
    block_savepoint,
    check_table_name,
    commit_outcome_unknown,
    first_line,
    index_name,
    parse_dsn,
    to_document,
    translate_error,
    write_outcome_unknown,
)
from .store import (
    DEFAULT_MAX_DOCUMENT_BYTES,
    DocumentStore,
    Dumped,
    Filters,
    OrderBy,
    Ttl,
    decode_json,
)
from .watchdog import StatementWatchdog

__all__ = ["PostgresDocumentStore", "SCHEMA_VERSION", "index_name", "check_table_name"]

logger = logging.getLogger(__name__)

T = TypeVar("T")
SCHEMA_VERSION = LATEST_VERSION
# Seconds past statement_timeout before the client stops waiting for an answer.
_NETWORK_GRACE = 0.5
# A statement unanswered this long is checked with a probe (see watchdog.py), and
# the probe must answer within _PROBE_TIMEOUT: a partition fails a call in about
# 1 s, which leaves a loaded machine a margin under the 2 s no call may take.
_PROBE_AFTER = 0.5
_PROBE_TIMEOUT = 0.5
# Kept under its old name: tests check that rows unpack into Document's fields.
_to_document = to_document


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
        # Names prepared on this connection, least recently used first (bounded:
        # see _text_for). They vanish with the connection: a new one starts empty.
        self.prepared: OrderedDict[str, None] = OrderedDict()
        self.timed_out = False  # set by the watchdog when it gave up on a statement
        # Read once here: asking psycopg2 while a statement runs would wait for it.
        self.backend_pid: int = self.get_backend_pid()


class _TransactionState(threading.local):
    conn: Connection | None = None
    depth: int = 0
    statement_savepoint_open: bool = False
    broken: bool = False


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
        dsn_parts = parse_dsn(dsn)
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
        self._protocol = PostgresProtocol(table, max_document_bytes=max_document_bytes)
        self._local = _TransactionState()
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
        warning = self._run(self._protocol.check_collation())
        if warning is not None:
            logger.warning(warning)

    # -- schema -------------------------------------------------------------

    # -- running statements -----------------------------------------------

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
        self, statement: Statement, params: Sequence[Any] = (), *, write: bool = True
    ) -> Rows:
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
                    try:
                        cur.execute(_text_for(conn, statement, self._prepare_statements), params)
                    except psycopg2.Error as exc:
                        if not _prepared_out_of_step(conn, statement, exc):
                            raise
                        # Nothing ran (the EXECUTE or its PREPARE was refused): start
                        # the connection's prepared statements afresh, send it again.
                        cur.execute("DEALLOCATE ALL")
                        cur.execute(_text_for(conn, statement, self._prepare_statements), params)
                    return _rows(cur)
            except psycopg2.Error as exc:
                broken = conn.closed != 0
                if broken and attempt < attempts and not getattr(conn, "timed_out", False):
                    continue
                error = _translate(exc, broken=broken)
                if write and broken and isinstance(error, StoreUnavailable):
                    error = write_outcome_unknown(error)
                raise error from exc
            finally:
                self._watchdog.leave(conn)
                self._pool.release(conn, broken=broken)
        raise AssertionError("unreachable")

    def _execute_in_transaction(
        self, local: _TransactionState, statement: Statement, params: Sequence[Any]
    ) -> Rows:
        conn = local.conn
        assert conn is not None
        if local.broken:
            raise StoreUnavailable("the connection of this transaction is broken")
        # Each statement runs under a savepoint so that a failing call (say a
        # DocumentExists the caller catches) undoes only itself, as in the memory store.
        prefix = self._release_statement_savepoint_sql(local) + OPEN_STATEMENT_SAVEPOINT
        self._watchdog.enter(conn, _backend_pid(conn))
        try:
            with conn.cursor() as cur:
                try:
                    text = _text_for(conn, statement, self._prepare_statements)
                    cur.execute(prefix + text, params)
                except psycopg2.Error as exc:
                    if not _prepared_out_of_step(conn, statement, exc):
                        raise
                    # The savepoint opened before the refused EXECUTE or PREPARE:
                    # back to it (it stays open), then as outside a transaction.
                    cur.execute(f"ROLLBACK TO SAVEPOINT {STATEMENT_SAVEPOINT}; DEALLOCATE ALL")
                    cur.execute(_text_for(conn, statement, self._prepare_statements), params)
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
        return RELEASE_STATEMENT_SAVEPOINT

    @staticmethod
    def _rollback_statement(conn: Connection, local: _TransactionState) -> None:
        try:
            with conn.cursor() as cur:
                cur.execute(ROLLBACK_STATEMENT_SAVEPOINT)
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
        savepoint = block_savepoint(local.depth)
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
                raise commit_outcome_unknown() from exc.__cause__
            raise

    def pop_child(
        self,
        collection: str,
        filters: Filters,
        *,
        parent: tuple[str, str],
        parent_ttl: Ttl | None = None,
    ) -> tuple[Document, Document | None] | None:
        return self._run(
            self._protocol.pop_child(collection, filters, parent=parent, parent_ttl=parent_ttl)
        )

    def delete_children(
        self,
        collection: str,
        filters: Filters,
        *,
        parent: tuple[str, str],
        parent_ttl: Ttl | None = None,
    ) -> tuple[Document, int] | None:
        return self._run(
            self._protocol.delete_children(
                collection, filters, parent=parent, parent_ttl=parent_ttl
            )
        )

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
        return self._run(
            self._protocol.dump(
                collection, filters, after=after, limit=limit, include_expired=include_expired
            )
        )

    def restore(self, document: Document, *, counter: int = 0) -> Document | None:
        return self._run(self._protocol.restore(document, counter=counter))

    def restore_many(self, documents: Sequence[Document]) -> list[str]:
        return self._run(self._protocol.restore_many(documents))

    def table_stats(self, collections: Sequence[str]) -> dict[str, Any]:
        """Return the table's size on disk, its indexes' and schema version, and per collection
        how many live and expired documents it holds (a count over the collection's rows).
        """
        return self._run(self._protocol.table_stats(collections))

    # -- running the protocol ---------------------------------------------------

    def _run(self, steps: Steps[T]) -> T:
        """Drive one call's protocol generator, running each request it yields."""
        try:
            request = next(steps)
            while True:
                try:
                    if isinstance(request, Exclusive):
                        rows = self._exclusive(request)
                    else:
                        # psycopg2 sends an Atomic's statements in one round trip.
                        run = request.combined if isinstance(request, Atomic) else request
                        rows = self._execute(run.statement, run.params, write=run.write)
                except DocstoreError as exc:
                    request = steps.throw(exc)
                else:
                    request = steps.send(rows)
        except StopIteration as stop:
            result: T = stop.value
            return result

    def _exclusive(self, request: Exclusive) -> Rows:
        rows: Rows = []
        with self._connection() as conn, conn.cursor() as cur:
            try:
                for statement in request.statements:
                    # Always with a parameter sequence: names are rendered with `%` doubled.
                    cur.execute(statement.text, ())
                    rows = _rows(cur)
            finally:
                if request.cleanup is not None and conn.closed == 0:
                    cur.execute(request.cleanup.text, ())
        return rows

    # -- single documents ---------------------------------------------------

    def create(
        self,
        collection: str,
        data: dict[str, Any],
        *,
        id: str | None = None,
        ttl: Ttl | None = None,
    ) -> Document:
        return self._run(self._protocol.create(collection, data, id=id, ttl=ttl))

    def read(self, collection: str, id: str) -> Document | None:
        return self._run(self._protocol.read(collection, id))

    def update(
        self,
        collection: str,
        id: str,
        data: dict[str, Any],
        *,
        expected_version: int | None = None,
        ttl: Ttl | None = None,
    ) -> Document | None:
        return self._run(
            self._protocol.modify(collection, id, data, expected_version, ttl, merge=True)
        )

    def replace(
        self,
        collection: str,
        id: str,
        data: dict[str, Any],
        *,
        expected_version: int | None = None,
        ttl: Ttl | None = None,
    ) -> Document | None:
        return self._run(
            self._protocol.modify(collection, id, data, expected_version, ttl, merge=False)
        )

    def upsert(
        self, collection: str, id: str, data: dict[str, Any], *, ttl: Ttl | None = None
    ) -> Document:
        return self._run(self._protocol.upsert(collection, id, data, ttl=ttl))

    def delete(self, collection: str, id: str, *, expected_version: int | None = None) -> bool:
        return self._run(self._protocol.delete(collection, id, expected_version=expected_version))

    def rename(
        self, collection: str, id: str, new_id: str, *, expected_version: int | None = None
    ) -> Document | None:
        return self._run(
            self._protocol.rename(collection, id, new_id, expected_version=expected_version)
        )

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
        return self._run(
            self._protocol.query(
                collection, filters, limit=limit, offset=offset, order_by=order_by, after=after
            )
        )

    def read_with(
        self,
        collection: str,
        id: str,
        related: str,
        filters: Filters | None = None,
        *,
        link: tuple[str, str],
        limit: int | None = 100,
        order_by: OrderBy | None = None,
    ) -> tuple[Document | None, list[Document]]:
        return self._run(
            self._protocol.read_with(
                collection, id, related, filters, link=link, limit=limit, order_by=order_by
            )
        )

    def count(self, collection: str, filters: Filters | None = None) -> int:
        return self._run(self._protocol.count(collection, filters))

    def list_collections(self) -> list[str]:
        return self._run(self._protocol.list_collections())

    def delete_collection(self, collection: str) -> bool:
        return self._run(self._protocol.delete_collection(collection))

    def delete_many(self, collection: str, filters: Filters) -> int:
        return self._run(self._protocol.delete_many(collection, filters))

    def purge_expired(self, collection: str | None = None, *, batch_size: int = 1000) -> int:
        return self._run(self._protocol.purge_expired(collection, batch_size=batch_size))

    def pop_expired(self, collection: str, *, limit: int = 1000) -> list[Document]:
        return self._run(self._protocol.pop_expired(collection, limit=limit))

    def ensure_index(
        self,
        collection: str,
        paths: str | Sequence[str],
        *,
        unique: bool = False,
        order_by: OrderBy | None = None,
    ) -> None:
        self._run(self._protocol.ensure_index(collection, paths, unique=unique, order_by=order_by))

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
        parent_data: bool = True,
    ) -> tuple[Document, Document] | None:
        return self._run(
            self._protocol.append(
                collection,
                data,
                parent=parent,
                id=id,
                ttl=ttl,
                parent_ttl=parent_ttl,
                parent_data=parent_data,
            )
        )

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


def _text_for(conn: Connection, statement: Statement, prepare: bool) -> str:
    """Return the text to send for `statement`: its `EXECUTE`, preceded by its `PREPARE`
    (in the same round trip) the first time on this connection.

    At most PREPARED_PER_CONNECTION statements stay prepared on a connection:
    the least recently used is deallocated, in the same round trip, when
    another would exceed it. The name is recorded before the text is sent: if
    the PREPARE never ran, the EXECUTE's next use is refused with
    "prepared statement does not exist", which the caller recovers from.
    """
    name = statement.name
    if name is None or not prepare:
        return statement.text
    prepared: OrderedDict[str, None] = conn.prepared  # type: ignore[attr-defined]
    if name in prepared:
        prepared.move_to_end(name)
        return statement.call
    evicted = ""
    while len(prepared) >= PREPARED_PER_CONNECTION:
        evicted += f"DEALLOCATE {prepared.popitem(last=False)[0]}; "
    prepared[name] = None
    return f"{evicted}{statement.definition}; {statement.call}"


def _prepared_out_of_step(conn: Connection, statement: Statement, exc: psycopg2.Error) -> bool:
    """Return True (and forget the connection's list) if `exc` says its prepared statements
    are not what we recorded: refused before anything ran, so safe to send again."""
    if statement.name is None or conn.closed:
        return False
    if exc.pgcode not in (PREPARED_STATEMENT_MISSING, PREPARED_STATEMENT_EXISTS):
        return False
    conn.prepared.clear()  # type: ignore[attr-defined]
    return True


def _rows(cur: Cursor) -> Rows:
    if cur.description is None:
        return [(cur.rowcount,)]
    return list(cur.fetchall())


def _translate(exc: psycopg2.Error, *, broken: bool) -> DocstoreError:
    """Turn a driver error into the store's own error type."""
    return translate_error(
        exc.pgcode,
        first_line(exc),
        broken=broken,
        connection_error=isinstance(exc, psycopg2.OperationalError | psycopg2.InterfaceError),
    )
