"""The asyncio PostgreSQL document store: the shared protocol, run through asyncpg.

Every call's statements, validation, decoding and retries come from
`postgres_protocol.py`, exactly as for `PostgresDocumentStore`; this module
only waits differently. Why asyncpg rather than psycopg 3: see
docs/docstore.md ("Choosing the asyncio driver").
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import logging
import shlex
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import asyncpg

from .async_pool import AsyncConnectionPool, PooledConnection
from .async_store import AsyncDocumentStore
from .async_watchdog import AsyncStatementWatchdog
from .document import Document
from .errors import DocstoreError, StoreUnavailable
from .migrations import migrate_dsn
from .postgres import _masked_dsn
from .postgres_protocol import (
    OPEN_STATEMENT_SAVEPOINT,
    PREPARED_PER_CONNECTION,
    RELEASE_STATEMENT_SAVEPOINT,
    ROLLBACK_STATEMENT_SAVEPOINT,
    STATEMENT_SAVEPOINT,
    Atomic,
    Exclusive,
    Execute,
    PostgresProtocol,
    Rows,
    Statement,
    Steps,
    block_savepoint,
    commit_outcome_unknown,
    first_line,
    parse_dsn,
    rowcount_of,
    translate_error,
    write_outcome_unknown,
)
from .store import DEFAULT_MAX_DOCUMENT_BYTES, Filters, OrderBy, Ttl, decode_json

__all__ = ["AsyncPostgresDocumentStore"]

logger = logging.getLogger(__name__)

T = TypeVar("T")
# Seconds past statement_timeout before the client stops waiting for an answer
# (the server cancels a statement at statement_timeout; no answer shortly after
# that means the network dropped it).
_NETWORK_GRACE = 0.5
# A statement unanswered this long is checked with a probe (see async_watchdog.py),
# which must answer within _PROBE_TIMEOUT: a partition fails a call in about 1 s.
_PROBE_AFTER = 0.5
_PROBE_TIMEOUT = 0.5
# Errors that mean the connection, not the statement, failed.
_CONNECTION_ERRORS = (OSError, asyncpg.InterfaceError, asyncpg.PostgresConnectionError)


@dataclasses.dataclass
class _Transaction:
    store: AsyncPostgresDocumentStore
    conn: PooledConnection
    lock: asyncio.Lock
    depth: int = 1
    statement_savepoint_open: bool = False
    broken: bool = False

    def release_statement_savepoint_sql(self) -> str:
        if not self.statement_savepoint_open:
            return ""
        self.statement_savepoint_open = False
        return RELEASE_STATEMENT_SAVEPOINT


# The open transaction of the current task, per store (a task may use several stores).
_TRANSACTIONS: contextvars.ContextVar[tuple[_Transaction, ...]] = contextvars.ContextVar(
    "docstore_async_transactions", default=()
)


def _connect_arguments(
    dsn: str, *, statement_timeout: float, application_name: str
) -> dict[str, Any]:
    """Translate a libpq URL or key/value string into asyncpg.connect() arguments."""
    parts = parse_dsn(dsn)
    settings = {
        "application_name": parts.pop("application_name", application_name),
        "statement_timeout": str(int(statement_timeout * 1000)),
        "TimeZone": "UTC",
    }
    options = shlex.split(parts.pop("options", ""))
    for index, option in enumerate(options):
        setting = None
        if option == "-c" and index + 1 < len(options):
            setting = options[index + 1]
        elif option.startswith("-c") and option != "-c":
            setting = option[2:]
        elif option.startswith("--"):
            setting = option[2:]
        if setting is not None and "=" in setting:
            name, _, value = setting.partition("=")
            settings.setdefault(name.replace("-", "_"), value)
    arguments: dict[str, Any] = {"server_settings": settings}
    renamed = {"dbname": "database", "sslmode": "ssl"}
    ignored = {"connect_timeout"}  # the store's own connect_timeout applies
    for key, value in parts.items():
        if key in ignored:
            continue
        if key in ("host", "user", "password", "dbname", "sslmode", "passfile"):
            arguments[renamed.get(key, key)] = value
        elif key == "hostaddr":
            arguments["host"] = value
        elif key == "port":
            ports = [int(port) for port in value.split(",")]
            arguments["port"] = ports if len(ports) > 1 else ports[0]
        else:
            raise DocstoreError(f"connection parameter {key!r} is not supported by asyncpg")
    if isinstance(arguments.get("host"), str) and "," in arguments["host"]:
        arguments["host"] = arguments["host"].split(",")
    return arguments


def _encode_jsonb(text: str) -> str:
    return text  # parameters are JSON text already (encode_data / query.py)


class AsyncPostgresDocumentStore(AsyncDocumentStore):
    """Documents in one PostgreSQL table, reached through asyncpg and a small pool.

    Same constructor arguments and behaviour as `PostgresDocumentStore`. The
    table is created (if missing) on the first call, not in the constructor,
    which may run outside an event loop. No call waits longer than
    `statement_timeout` + 0.5 s for an answer: past that the connection is
    closed (the network dropped the statement or its answer) and the call
    raises `StoreUnavailable`. A call cancelled while a statement runs closes
    that connection instead of returning it to the pool.
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
        if connect_timeout <= 0 or statement_timeout <= 0:
            raise ValueError("connect_timeout and statement_timeout must be positive")
        self._protocol = PostgresProtocol(table, max_document_bytes=max_document_bytes)
        self._table_name = table
        self._connect_arguments = _connect_arguments(
            dsn, statement_timeout=statement_timeout, application_name="docstore"
        )
        self._dsn = dsn
        self._probe_arguments = _connect_arguments(
            dsn, statement_timeout=_PROBE_TIMEOUT, application_name="docstore probe"
        )
        self._watchdog = AsyncStatementWatchdog(
            self._running_backends, probe_after=min(_PROBE_AFTER, statement_timeout)
        )
        self._dsn_for_repr = _masked_dsn(dsn)
        self._connect_timeout = connect_timeout
        self._deadline = statement_timeout + _NETWORK_GRACE
        # Off for a transaction-pooling proxy (PgBouncer before 1.21), which would
        # hand a prepared statement's execution to another server connection.
        self._prepare_statements = prepare_statements
        self._pool = AsyncConnectionPool(
            self._connect,
            min_connections=min_connections,
            max_connections=max_connections,
            acquire_timeout=connect_timeout,
        )
        self._schema_ready = False
        self._schema_lock: asyncio.Lock | None = None

    def __repr__(self) -> str:
        return f"AsyncPostgresDocumentStore({self._dsn_for_repr!r}, table={self._table_name!r})"

    # -- connections ------------------------------------------------------------

    async def _connect(self) -> Any:
        try:
            raw = await asyncpg.connect(
                **self._connect_arguments,
                timeout=self._connect_timeout,
                statement_cache_size=0,  # the store prepares its own statements
            )
        except (*_CONNECTION_ERRORS, asyncpg.PostgresError) as exc:
            raise StoreUnavailable(f"cannot connect to PostgreSQL: {first_line(exc)}") from exc
        try:
            await asyncio.wait_for(
                raw.set_type_codec(
                    "jsonb", encoder=_encode_jsonb, decoder=decode_json, schema="pg_catalog"
                ),
                self._connect_timeout,
            )
        except BaseException as exc:
            raw.terminate()
            if isinstance(exc, (*_CONNECTION_ERRORS, asyncpg.PostgresError)):
                raise StoreUnavailable(f"cannot set up the connection: {first_line(exc)}") from exc
            raise
        return raw

    async def _ensure_schema(self) -> None:
        if self._schema_lock is None:
            self._schema_lock = asyncio.Lock()
        async with self._schema_lock:
            if self._schema_ready:
                return
            # The schema migrations (migrations.py) run once per store, through
            # psycopg2 in a worker thread: never a blocking call on the loop.
            report = await asyncio.to_thread(
                migrate_dsn, self._dsn, self._table_name, connect_timeout=self._connect_timeout
            )
            if report.applied:
                logger.info(
                    "table %s migrated from schema version %d to %d",
                    self._table_name,
                    report.version_before,
                    report.version_after,
                )
            warning = await self._drive(self._protocol.check_collation())
            if warning is not None:
                logger.warning(warning)
            await self._pool.prefill()
            self._schema_ready = True

    async def open(self) -> None:
        """Create the table if missing and open the first connections (else done on first use)."""
        if not self._schema_ready:
            await self._ensure_schema()

    # -- running the protocol ---------------------------------------------------

    async def _run(self, steps: Steps[T]) -> T:
        if not self._schema_ready:
            await self._ensure_schema()
        return await self._drive(steps)

    async def _drive(self, steps: Steps[T]) -> T:
        """Drive one call's protocol generator, awaiting each request it yields."""
        try:
            request = next(steps)
            while True:
                try:
                    if isinstance(request, Execute):
                        rows = await self._execute(
                            request.statement, request.params, write=request.write
                        )
                    elif isinstance(request, Atomic):
                        rows = await self._atomic(request)
                    else:
                        rows = await self._exclusive(request)
                except DocstoreError as exc:
                    request = steps.throw(exc)
                else:
                    request = steps.send(rows)
        except StopIteration as stop:
            result: T = stop.value
            return result

    async def _statement_rows(
        self,
        conn: PooledConnection,
        statement: Statement,
        params: Sequence[Any],
        *,
        savepoint: bool = False,
        resend: bool = True,
    ) -> Rows:
        try:
            return await self._fetch(conn, statement, params)
        except asyncpg.InvalidSQLStatementNameError:
            # The server no longer has what this connection prepared (a proxy, or
            # someone's DISCARD ALL / DEALLOCATE): nothing ran. Forget them all
            # and send the statement once more; in a transaction, back to the
            # statement's savepoint first (it stays open).
            conn.prepared.clear()
            if not resend:
                raise
            if savepoint:
                await conn.raw.execute(
                    f"ROLLBACK TO SAVEPOINT {STATEMENT_SAVEPOINT}", timeout=self._deadline
                )
            return await self._fetch(conn, statement, params)

    async def _fetch(
        self, conn: PooledConnection, statement: Statement, params: Sequence[Any]
    ) -> Rows:
        """Run `statement` with the connection's prepared statement for it, preparing it once.

        A named statement (`PostgresProtocol.prepared`) is prepared on the
        server under a name of asyncpg's, so PostgreSQL keeps its plan (a
        generic one once it proves as good); the others are parsed and planned
        on every run (asyncpg's unnamed statement), their asyncpg objects kept
        for the type information. At most PREPARED_PER_CONNECTION per
        connection, least recently used dropped first (asyncpg closes a named
        one on the server when its object goes).
        """
        text = statement.numbered
        cache = conn.prepared
        prepared = cache.get(text)
        if prepared is None:
            named = self._prepare_statements and statement.name is not None
            while len(cache) >= PREPARED_PER_CONNECTION:
                cache.popitem(last=False)
            # name=True: a name of asyncpg's own, never the name of a statement
            # it has yet to close. None: the unnamed statement.
            prepared = await conn.raw.prepare(
                text, name=True if named else None, timeout=self._deadline
            )
            if self._prepare_statements:
                cache[text] = prepared
        else:
            cache.move_to_end(text)
        rows: Rows = await prepared.fetch(*params, timeout=self._deadline)
        if not rows and not prepared.get_attributes():
            return [(rowcount_of(prepared.get_statusmsg()),)]
        return rows

    def _transaction_of_task(self) -> _Transaction | None:
        for transaction in _TRANSACTIONS.get():
            if transaction.store is self:
                return transaction
        return None

    async def _execute(
        self, statement: Statement, params: Sequence[Any] = (), *, write: bool = True
    ) -> Rows:
        """Run one statement and return its rows (or [(rowcount,)] when it returns none)."""
        transaction = self._transaction_of_task()
        if transaction is not None:
            return await self._execute_in_transaction(transaction, statement, params)
        # A read that finds its connection dead is sent once more on a fresh one;
        # a write is not: it may have been committed before the connection died.
        attempts = 1 if write else 2
        for attempt in range(1, attempts + 1):
            conn = await self._pool.acquire()
            # Until the answer is in: a cancellation mid-statement must not
            # return the connection to the pool.
            broken = True
            self._watchdog.enter(conn)
            try:
                rows = await self._statement_rows(conn, statement, params)
                broken = False
                return rows
            except asyncpg.PostgresError as exc:
                broken = conn.raw.is_closed() or isinstance(exc, asyncpg.PostgresConnectionError)
                # Not after the watchdog gave up on it: sending it again would wait as long.
                if broken and attempt < attempts and not conn.timed_out:
                    continue
                error = _translate(exc, broken=broken)
                if write and broken and isinstance(error, StoreUnavailable):
                    error = write_outcome_unknown(error)
                raise error from exc
            except asyncio.TimeoutError as exc:
                # Sending it again would wait as long.
                unavailable = StoreUnavailable(
                    f"no answer from PostgreSQL within {self._deadline:g} s"
                )
                raise (write_outcome_unknown(unavailable) if write else unavailable) from exc
            except _CONNECTION_ERRORS as exc:
                if attempt < attempts and not conn.timed_out:
                    continue
                unavailable = StoreUnavailable(f"PostgreSQL is unavailable: {first_line(exc)}")
                raise (write_outcome_unknown(unavailable) if write else unavailable) from exc
            finally:
                self._watchdog.leave(conn)
                self._pool.release(conn, broken=broken)
        raise AssertionError("unreachable")

    async def _execute_in_transaction(
        self, transaction: _Transaction, statement: Statement, params: Sequence[Any]
    ) -> Rows:
        async with transaction.lock:  # tasks started inside the block share its connection
            if transaction.broken:
                raise StoreUnavailable("the connection of this transaction is broken")
            conn = transaction.conn
            prefix = transaction.release_statement_savepoint_sql() + OPEN_STATEMENT_SAVEPOINT
            self._watchdog.enter(conn)
            try:
                await conn.raw.execute(prefix, timeout=self._deadline)
                rows = await self._statement_rows(conn, statement, params, savepoint=True)
                transaction.statement_savepoint_open = True
                return rows
            except asyncpg.PostgresError as exc:
                if conn.raw.is_closed():
                    transaction.broken = True
                else:
                    await self._rollback_statement(transaction)
                raise _translate(exc, broken=transaction.broken) from exc
            except (asyncio.TimeoutError, *_CONNECTION_ERRORS) as exc:
                transaction.broken = True
                conn.discard()
                raise StoreUnavailable(f"PostgreSQL is unavailable: {first_line(exc)}") from exc
            except BaseException:
                transaction.broken = True  # cancelled mid-statement
                conn.discard()
                raise
            finally:
                self._watchdog.leave(conn)

    async def _rollback_statement(self, transaction: _Transaction) -> None:
        try:
            await transaction.conn.raw.execute(ROLLBACK_STATEMENT_SAVEPOINT, timeout=self._deadline)
        except BaseException:
            transaction.broken = True
            transaction.conn.discard()
            raise
        finally:
            transaction.statement_savepoint_open = False

    async def _atomic(self, request: Atomic) -> Rows:
        """Run the steps in the task's transaction, or in one of their own on one connection."""
        rows: Rows = []
        if self._transaction_of_task() is not None:
            for step in request.steps:
                rows = await self._execute(step.statement, step.params, write=step.write)
            return rows
        conn = await self._pool.acquire()
        broken = True  # until COMMIT answered (see _execute)
        try:
            await conn.raw.execute("BEGIN", timeout=self._deadline)
            try:
                for step in request.steps:
                    # No savepoint to go back to: a refused step fails the unit.
                    rows = await self._statement_rows(
                        conn, step.statement, step.params, resend=False
                    )
            except asyncpg.PostgresError:
                if not conn.raw.is_closed():
                    await conn.raw.execute("ROLLBACK", timeout=self._deadline)
                raise
            await conn.raw.execute("COMMIT", timeout=self._deadline)
            broken = False
            return rows
        except asyncpg.PostgresError as exc:
            broken = conn.raw.is_closed() or isinstance(exc, asyncpg.PostgresConnectionError)
            error = _translate(exc, broken=broken)
            if broken and isinstance(error, StoreUnavailable):
                error = write_outcome_unknown(error)
            raise error from exc
        except (asyncio.TimeoutError, *_CONNECTION_ERRORS) as exc:
            raise write_outcome_unknown(
                StoreUnavailable(f"PostgreSQL is unavailable: {first_line(exc)}")
            ) from exc
        finally:
            self._pool.release(conn, broken=broken)

    async def _exclusive(self, request: Exclusive) -> Rows:
        conn = await self._pool.acquire()
        broken = True
        try:
            rows: Rows = []
            try:
                for statement in request.statements:
                    rows = await conn.raw.fetch(statement.numbered, timeout=self._deadline)
            except asyncpg.PostgresError:
                if request.cleanup is not None and not conn.raw.is_closed():
                    await conn.raw.execute(request.cleanup.numbered, timeout=self._deadline)
                raise
            if request.cleanup is not None:
                await conn.raw.execute(request.cleanup.numbered, timeout=self._deadline)
            broken = False
            return rows
        except asyncpg.PostgresError as exc:
            broken = conn.raw.is_closed()
            raise _translate(exc, broken=broken) from exc
        except (asyncio.TimeoutError, *_CONNECTION_ERRORS) as exc:
            raise StoreUnavailable(f"PostgreSQL is unavailable: {first_line(exc)}") from exc
        finally:
            self._pool.release(conn, broken=broken)

    # -- transactions -------------------------------------------------------------

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        """Run the block's calls (this task and those it starts, this store) in one transaction.

        A nested block is a savepoint: an exception leaving it undoes only its
        own calls and propagates; the outermost block commits or rolls back.
        """
        transaction = self._transaction_of_task()
        if transaction is not None:
            async with self._nested_block(transaction):
                yield
            return
        if not self._schema_ready:
            await self._ensure_schema()
        conn = await self._pool.acquire()
        transaction = _Transaction(self, conn, asyncio.Lock())
        token = _TRANSACTIONS.set((*_TRANSACTIONS.get(), transaction))
        try:
            await self._send(transaction, "BEGIN")
            try:
                yield
            except BaseException:
                await self._send(transaction, "ROLLBACK", quiet=True)
                raise
            try:
                await self._send(transaction, "COMMIT")
            except StoreUnavailable as exc:
                if transaction.broken:
                    raise commit_outcome_unknown() from exc.__cause__
                raise
        finally:
            _TRANSACTIONS.reset(token)
            self._pool.release(conn, broken=transaction.broken)

    @asynccontextmanager
    async def _nested_block(self, transaction: _Transaction) -> AsyncIterator[None]:
        transaction.depth += 1
        savepoint = block_savepoint(transaction.depth)
        try:
            await self._send(transaction, f"SAVEPOINT {savepoint}")
            try:
                yield
            except BaseException:
                if not transaction.broken:
                    await self._send(transaction, f"ROLLBACK TO SAVEPOINT {savepoint}", quiet=True)
                raise
            await self._send(transaction, f"RELEASE SAVEPOINT {savepoint}")
        finally:
            transaction.depth -= 1

    async def _send(self, transaction: _Transaction, command: str, *, quiet: bool = False) -> None:
        async with transaction.lock:
            if transaction.broken:
                if quiet:
                    return
                raise StoreUnavailable("the connection of this transaction is broken")
            conn = transaction.conn
            try:
                await conn.raw.execute(
                    transaction.release_statement_savepoint_sql() + command,
                    timeout=self._deadline,
                )
            except (asyncio.TimeoutError, asyncpg.PostgresError, *_CONNECTION_ERRORS) as exc:
                transaction.broken = transaction.broken or conn.raw.is_closed()
                if quiet:
                    logger.warning("%s failed: %s", command, type(exc).__name__)
                    transaction.broken = True
                    return
                if not isinstance(exc, asyncpg.PostgresError):
                    transaction.broken = True
                    conn.discard()
                    raise StoreUnavailable(f"PostgreSQL is unavailable: {first_line(exc)}") from exc
                raise _translate(exc, broken=transaction.broken) from exc
            except BaseException:
                transaction.broken = True  # cancelled mid-command
                conn.discard()
                raise

    # -- single documents ---------------------------------------------------------

    async def create(
        self,
        collection: str,
        data: dict[str, Any],
        *,
        id: str | None = None,
        ttl: Ttl | None = None,
    ) -> Document:
        return await self._run(self._protocol.create(collection, data, id=id, ttl=ttl))

    async def read(self, collection: str, id: str) -> Document | None:
        return await self._run(self._protocol.read(collection, id))

    async def update(
        self,
        collection: str,
        id: str,
        data: dict[str, Any],
        *,
        expected_version: int | None = None,
        ttl: Ttl | None = None,
    ) -> Document | None:
        return await self._run(
            self._protocol.modify(collection, id, data, expected_version, ttl, merge=True)
        )

    async def replace(
        self,
        collection: str,
        id: str,
        data: dict[str, Any],
        *,
        expected_version: int | None = None,
        ttl: Ttl | None = None,
    ) -> Document | None:
        return await self._run(
            self._protocol.modify(collection, id, data, expected_version, ttl, merge=False)
        )

    async def upsert(
        self, collection: str, id: str, data: dict[str, Any], *, ttl: Ttl | None = None
    ) -> Document:
        return await self._run(self._protocol.upsert(collection, id, data, ttl=ttl))

    async def delete(
        self, collection: str, id: str, *, expected_version: int | None = None
    ) -> bool:
        return await self._run(
            self._protocol.delete(collection, id, expected_version=expected_version)
        )

    async def rename(
        self, collection: str, id: str, new_id: str, *, expected_version: int | None = None
    ) -> Document | None:
        return await self._run(
            self._protocol.rename(collection, id, new_id, expected_version=expected_version)
        )

    # -- many documents -------------------------------------------------------------

    async def query(
        self,
        collection: str,
        filters: Filters | None = None,
        *,
        limit: int | None = 100,
        offset: int = 0,
        order_by: OrderBy | None = None,
        after: Document | None = None,
    ) -> list[Document]:
        return await self._run(
            self._protocol.query(
                collection, filters, limit=limit, offset=offset, order_by=order_by, after=after
            )
        )

    async def read_with(
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
        return await self._run(
            self._protocol.read_with(
                collection, id, related, filters, link=link, limit=limit, order_by=order_by
            )
        )

    async def count(self, collection: str, filters: Filters | None = None) -> int:
        return await self._run(self._protocol.count(collection, filters))

    async def list_collections(self) -> list[str]:
        return await self._run(self._protocol.list_collections())

    async def delete_collection(self, collection: str) -> bool:
        return await self._run(self._protocol.delete_collection(collection))

    async def delete_many(self, collection: str, filters: Filters) -> int:
        return await self._run(self._protocol.delete_many(collection, filters))

    async def purge_expired(self, collection: str | None = None, *, batch_size: int = 1000) -> int:
        return await self._run(self._protocol.purge_expired(collection, batch_size=batch_size))

    async def pop_expired(self, collection: str, *, limit: int = 1000) -> list[Document]:
        return await self._run(self._protocol.pop_expired(collection, limit=limit))

    async def ensure_index(
        self,
        collection: str,
        paths: str | Sequence[str],
        *,
        unique: bool = False,
        order_by: OrderBy | None = None,
    ) -> None:
        await self._run(
            self._protocol.ensure_index(collection, paths, unique=unique, order_by=order_by)
        )

    # -- sequences ----------------------------------------------------------------

    async def append(
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
        return await self._run(
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

    async def pop_child(
        self,
        collection: str,
        filters: Filters,
        *,
        parent: tuple[str, str],
        parent_ttl: Ttl | None = None,
    ) -> tuple[Document, Document | None] | None:
        return await self._run(
            self._protocol.pop_child(collection, filters, parent=parent, parent_ttl=parent_ttl)
        )

    async def delete_children(
        self,
        collection: str,
        filters: Filters,
        *,
        parent: tuple[str, str],
        parent_ttl: Ttl | None = None,
    ) -> tuple[Document, int] | None:
        return await self._run(
            self._protocol.delete_children(
                collection, filters, parent=parent, parent_ttl=parent_ttl
            )
        )

    async def _running_backends(self, pids: list[int]) -> set[int]:
        """Return which of these server processes are running a statement (the watchdog's probe).

        Asked on a fresh connection with a deadline of its own, so that a probe
        through the same broken network fails fast instead of hanging.
        """

        async def ask() -> set[int]:
            conn = await asyncpg.connect(**self._probe_arguments, timeout=_PROBE_TIMEOUT)
            try:
                rows = await conn.fetch(
                    "SELECT pid FROM pg_stat_activity WHERE pid = ANY($1::int[])"
                    " AND state = 'active'",
                    pids,
                )
                return {int(row[0]) for row in rows}
            finally:
                conn.terminate()

        return await asyncio.wait_for(ask(), _PROBE_TIMEOUT)

    async def aclose(self) -> None:
        self._watchdog.close()
        await self._pool.aclose()


def _translate(exc: asyncpg.PostgresError, *, broken: bool) -> DocstoreError:
    """Turn an asyncpg server error into the store's own error type."""
    sqlstate = getattr(exc, "sqlstate", None)
    return translate_error(
        sqlstate,
        first_line(exc),
        broken=broken,
        connection_error=isinstance(exc, asyncpg.PostgresConnectionError),
    )
