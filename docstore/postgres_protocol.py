"""What every PostgreSQL call sends and how it reads the answers, without any I/O.

The sync store (`postgres.py`, psycopg2) and the async store
(`async_postgres.py`, asyncpg) share this module and differ only in how they
wait: each public call is a generator here (as in psycopg 3's
`generators.py`) that validates its arguments, yields `Execute` or `Exclusive`
requests, receives each request's rows (or has the store's own error thrown
into it) and returns the call's result. A runner drives the generator:

    gen = protocol.read(collection, id)
    request = next(gen)            # validation errors are raised here
    rows = <run request on a connection>
    gen.send(rows)                 # -> StopIteration(value=result)

So the SQL text, the filter compiler (`query.py`), validation, row decoding,
the retries on unique conflicts with expired rows and the explanation of a
refused guarded write exist once, and error translation (`translate_error`)
works on SQLSTATE codes that both drivers report.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import threading
import uuid
from collections.abc import Callable, Generator, Hashable, Sequence
from typing import Any, TypeVar

import psycopg2.extensions
from psycopg2 import sql

from .document import Document
from .errors import (
    DocstoreError,
    DocumentExists,
    InvalidDocument,
    InvalidQuery,
    StoreUnavailable,
    VersionConflict,
)
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
    parse_link,
    parse_order_by,
    parse_path,
    path_expression,
)
from .store import (
    Dumped,
    Filters,
    OrderBy,
    Ttl,
    check_flag,
    check_name,
    check_parent,
    check_restorable,
    check_ttl,
    encode_data,
    iter_paths,
)

__all__ = [
    "index_name",
    "STATEMENT_SAVEPOINT",
    "RELEASE_STATEMENT_SAVEPOINT",
    "OPEN_STATEMENT_SAVEPOINT",
    "ROLLBACK_STATEMENT_SAVEPOINT",
    "block_savepoint",
    "rowcount_of",
    "Statement",
    "Execute",
    "Exclusive",
    "Atomic",
    "Request",
    "Rows",
    "Steps",
    "PostgresProtocol",
    "render",
    "to_document",
    "translate_error",
    "check_table_name",
    "parse_dsn",
]

# Inside a transaction each statement runs under this savepoint, so that a
# failing call (say a DocumentExists the caller catches) undoes only itself.
STATEMENT_SAVEPOINT = "docstore_statement"
RELEASE_STATEMENT_SAVEPOINT = f"RELEASE SAVEPOINT {STATEMENT_SAVEPOINT}; "
OPEN_STATEMENT_SAVEPOINT = f"SAVEPOINT {STATEMENT_SAVEPOINT}; "
ROLLBACK_STATEMENT_SAVEPOINT = (
    f"ROLLBACK TO SAVEPOINT {STATEMENT_SAVEPOINT}; RELEASE SAVEPOINT {STATEMENT_SAVEPOINT}"
)
_COLUMNS = sql.SQL("id, collection, data, created_at, updated_at, version, expires_at")
# The same columns with an empty object for the data (append's parent_data=False).
_COLUMNS_BUT_DATA = sql.SQL(
    "id, collection, '{}'::jsonb, created_at, updated_at, version, expires_at"
)
_LIVE = sql.SQL("(expires_at IS NULL OR expires_at > now())")
# The largest seq a child could get, so that a size check made before the
# server assigns the real one never underestimates the stored document.
_SEQ_PLACEHOLDER = 2**62
# Documents per INSERT of restore_many: each batch size is one cached statement text.
_RESTORE_BATCH = 100

Rows = list[Sequence[Any]]
T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Statement:
    """One statement's text, in the two placeholder styles the drivers take.

    `text` uses `%s` (psycopg2 formats it client-side, `%%` is a literal `%`);
    `numbered` uses `$1, $2, ...` with plain `%` (asyncpg, and the body of a
    server-side `PREPARE`). `name` is set for the statements a runner prepares
    once per connection (see `PostgresProtocol.prepared`): it is derived from
    the text alone, so one name always means one text, whatever store,
    collection or thread asked for it.
    """

    text: str
    numbered: str
    name: str | None = None
    param_count: int = 0
    # `EXECUTE name(%s, %s::jsonb, ...)`: each parameter with the cast its
    # placeholder has in the text. psycopg2 sends a list as `ARRAY[...]` of
    # text, which EXECUTE will not coerce to `jsonb[]` unless cast the same way.
    call: str = ""

    @property
    def definition(self) -> str:
        """Return `PREPARE name AS ...` (the `%%` kept, for a client-side formatting driver)."""
        return f"PREPARE {self.name} AS {self.numbered.replace('%', '%%')}"


_PLACEHOLDER = re.compile(r"%%|%s(::[a-z_]+(?:\[\])?)?")
# Server-side prepared statements kept per connection (both drivers): the least
# recently used one is deallocated when another would exceed it.
PREPARED_PER_CONNECTION = 128
# Statement texts kept per store (rendered once per shape); the oldest goes first.
STATEMENT_CACHE_SIZE = 1024
# SQLSTATEs saying a connection's prepared statements are not what the runner
# believes (a proxy or someone's DISCARD ALL / DEALLOCATE): nothing ran, so
# the runner forgets its list and sends the statement once more.
PREPARED_STATEMENT_MISSING = "26000"
PREPARED_STATEMENT_EXISTS = "42P05"


def _numbered(text: str) -> tuple[str, int, list[str]]:
    """Return `text` with `$1, $2, ...` for its `%s` and `%` for its `%%`, the count,
    and the cast that follows each placeholder ("" when none)."""
    count = 0
    casts: list[str] = []

    def number(match: re.Match[str]) -> str:
        nonlocal count
        if match.group() == "%%":
            return "%"
        count += 1
        cast = match.group(1) or ""
        casts.append(cast)
        return f"${count}{cast}"

    numbered = _PLACEHOLDER.sub(number, text)
    return numbered, count, casts


def _statement(text: str, *, prepared: bool = False) -> Statement:
    numbered, count, casts = _numbered(text)
    if not prepared:
        return Statement(text, numbered, None, count)
    # 96 bits of the text's hash: a name shared by two texts is not a practical worry.
    name = "docstore_" + hashlib.sha256(numbered.encode("utf-8")).hexdigest()[:24]
    arguments = ", ".join(f"%s{cast}" for cast in casts)
    call = f"EXECUTE {name}({arguments})" if count else f"EXECUTE {name}"
    return Statement(text, numbered, name, count, call)


@dataclasses.dataclass(frozen=True)
class Execute:
    """Run one statement (autocommit, or inside the caller's transaction); send back its rows.

    A statement that returns no rows answers `[(rowcount,)]`. `write=False`
    lets a runner send a read once more on a fresh connection when the first
    one turns out dead; a write is never resent (it may have committed).
    """

    statement: Statement
    params: Sequence[Any] = ()
    write: bool = True


@dataclasses.dataclass(frozen=True)
class Exclusive:
    """Run parameterless statements in order on one connection, then `cleanup` if it lives.

    Answers the rows of the last statement. Used where a session-level lock
    or an explicit transaction must span several statements.
    """

    statements: tuple[Statement, ...]
    cleanup: Statement | None = None


@dataclasses.dataclass(frozen=True)
class Atomic:
    """Run `steps` as one unit (the caller's transaction, or one of their own); answer the last.

    `combined` is the same statements joined by `;` with all their
    parameters: a driver that formats parameters client-side (psycopg2)
    sends it in one round trip, which PostgreSQL runs as one implicit
    transaction; one that binds them server-side (asyncpg) runs the steps
    in an explicit transaction.
    """

    steps: tuple[Execute, ...]
    combined: Execute


Request = Execute | Exclusive | Atomic
Steps = Generator[Request, Rows, T]


def render(composable: sql.Composable) -> str:
    """Return the text of a psycopg2 `sql` composition, with no connection needed.

    Identifiers and literals are quoted as PostgreSQL reads them whatever
    `standard_conforming_strings` says (a string with a backslash uses the
    E'' form), and their `%` signs are doubled: every statement is sent with a
    parameter sequence, so the driver (or `Statement.numbered`) turns `%%`
    back into `%`.
    """
    parts: list[str] = []
    _render_into(composable, parts)
    return "".join(parts)


def _render_into(composable: sql.Composable, parts: list[str]) -> None:
    if isinstance(composable, sql.Composed):
        for part in composable.seq:
            _render_into(part, parts)
    elif isinstance(composable, sql.SQL):
        parts.append(composable.string)
    elif isinstance(composable, sql.Identifier):
        parts.append(
            ".".join('"' + name.replace('"', '""') + '"' for name in composable.strings).replace(
                "%", "%%"
            )
        )
    elif isinstance(composable, sql.Literal):
        parts.append(_literal(composable.wrapped).replace("%", "%%"))
    else:
        raise TypeError(f"cannot render {type(composable).__name__}")


def _literal(value: object) -> str:
    if isinstance(value, str):
        if "\x00" in value:
            raise InvalidQuery("a name must not contain NUL characters")
        quoted = value.replace("'", "''")
        if "\\" in quoted:
            return "E'" + quoted.replace("\\", "\\\\") + "'"
        return "'" + quoted + "'"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, list | tuple):
        return "ARRAY[" + ",".join(_literal(item) for item in value) + "]"
    raise TypeError(f"cannot render a literal of type {type(value).__name__}")


def block_savepoint(depth: int) -> str:
    """Return the savepoint name of a transaction block nested `depth` deep."""
    return f"docstore_block_{depth}"


def rowcount_of(status: str | None) -> int:
    """Return the row count of a command status such as "DELETE 3" (0 if it has none)."""
    last = (status or "").rpartition(" ")[2]
    return int(last) if last.isdigit() else 0


def parse_dsn(dsn: str) -> dict[str, str]:
    """Return the parameters of a libpq URL or key/value string, or raise DocstoreError."""
    try:
        parts: dict[str, str] = psycopg2.extensions.parse_dsn(dsn)
    except psycopg2.Error:
        # libpq's message quotes the string, password included: leave it out.
        raise DocstoreError(
            "invalid PostgreSQL connection string (not a postgresql:// URL or key=value pairs)"
        ) from None
    return parts


def check_table_name(table: object) -> str:
    """Return `table` if it can name a store's table, else raise InvalidDocument.

    At most 40 characters, so that the names of its indexes and of `<table>_meta`
    fit PostgreSQL's 63-byte identifiers.
    """
    name = check_name("table", table)
    if len(name) > 40:
        raise InvalidDocument("table name is longer than 40 characters")
    return name


def check_version(expected_version: object) -> int | None:
    """Return `expected_version` if it is None or an int, else raise InvalidDocument."""
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


def _paging(limit: int | None, offset: int) -> sql.Composable:
    """Return `LIMIT n` (`LIMIT ALL` for None), with `OFFSET %s` when offset is not 0.

    The limit is part of a prepared statement's text, not a parameter: with
    `LIMIT $n` PostgreSQL's generic plan assumes a tenth of the rows are
    wanted, costs it above every custom plan, and so plans each run anew.
    A page size takes a handful of values; offsets take many, and paging by
    offset reads the skipped rows anyway, so a non-zero offset stays a parameter.
    """
    count = sql.SQL("ALL") if limit is None else sql.Literal(int(limit))
    if offset:
        return sql.SQL("LIMIT {} OFFSET %s").format(count)
    return sql.SQL("LIMIT {}").format(count)


_new_object = object.__new__


def to_document(row: Sequence[Any]) -> Document:
    """Build the Document of one row of `id, collection, data, created_at, ...`."""
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


def new_id() -> str:
    """Return a new document id (a UUID4 string)."""
    return str(uuid.uuid4())


# SQLSTATE codes the store gives a meaning of its own.
_UNIQUE_VIOLATION = "23505"
_INVALID_REGULAR_EXPRESSION = "2201B"
_QUERY_CANCELED = "57014"
# Class 08 (connection exception), 53 (insufficient resources), 57P (operator
# intervention: admin shutdown, crash shutdown, cannot connect now).
_UNAVAILABLE_PREFIXES = ("08", "53", "57P")


def translate_error(
    sqlstate: str | None, message: str, *, broken: bool, connection_error: bool
) -> DocstoreError:
    """Turn a driver error (its SQLSTATE and first message line) into the store's own error.

    `broken`: the connection is dead after the error; `connection_error`: the
    driver classed the error as a connection or interface failure.
    """
    if sqlstate == _UNIQUE_VIOLATION:
        return DocumentExists(f"a live document already holds this id or unique value ({message})")
    if sqlstate == _INVALID_REGULAR_EXPRESSION:
        return InvalidQuery(f"PostgreSQL refused the pattern: {message}")
    if sqlstate == _QUERY_CANCELED:
        return StoreUnavailable(f"the statement was cancelled (statement_timeout): {message}")
    if broken or connection_error or (sqlstate or "").startswith(_UNAVAILABLE_PREFIXES):
        return StoreUnavailable(f"PostgreSQL is unavailable: {message}")
    return DocstoreError(f"PostgreSQL refused the statement: {message}")


def write_outcome_unknown(error: StoreUnavailable) -> StoreUnavailable:
    """Return the error for a write whose connection broke: it may have been committed."""
    return StoreUnavailable(
        f"the connection broke during a write: it may or may not have been committed ({error})",
        outcome_unknown=True,
    )


def commit_outcome_unknown() -> StoreUnavailable:
    """Return the error for a transaction whose connection broke during COMMIT."""
    return StoreUnavailable(
        "the connection broke during COMMIT: the transaction may or may not have been committed",
        outcome_unknown=True,
    )


def first_line(exc: BaseException) -> str:
    """Return the first line of an exception's message (driver messages run long)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class PostgresProtocol:
    """The statements of one store table, and each call as a generator of requests.

    Rendering `sql` compositions costs more than a local round trip, so each
    statement's text is rendered once and kept, keyed by its shape.
    Thread-safe: the only shared state is that cache.
    """

    def __init__(self, table: str, *, max_document_bytes: int) -> None:
        self.table_name = check_table_name(table)
        self.max_document_bytes = max_document_bytes
        self._table = PercentSafeIdentifier(table)
        self._statements: dict[Hashable, Statement] = {}
        self._lock = threading.Lock()
        self._ensured_indexes: set[str] = set()

    # -- statement texts ----------------------------------------------------------

    def _name(self, suffix: str) -> sql.Identifier:
        return PercentSafeIdentifier(f"{self.table_name}_{suffix}")

    def statement(self, key: Hashable, build: Callable[[], sql.Composable]) -> Statement:
        """Return the statement `build` makes, rendered once per key, sent as text each time.

        For rare statements (errors explained, administration): each run is
        parsed and planned anew.
        """
        return self._cached(key, build, prepared=False)

    def prepared(self, key: Hashable, build: Callable[[], sql.Composable]) -> Statement:
        """Return the statement `build` makes, named, for runners that prepare it per connection.

        The statement cache for repeated shapes: the key holds what shapes the
        text (the collection, filter structure, ordering) and the text bakes it
        in, the collection as a literal and paths as literals, so that
        PostgreSQL's generic plan of the prepared statement can use the
        collection's partial indexes; values stay parameters. The name comes
        from the text's hash, so two collections (or two tables) never share a
        prepared statement. Bounded: at most `STATEMENT_CACHE_SIZE` texts here,
        `PREPARED_PER_CONNECTION` prepared on each connection.
        """
        return self._cached(key, build, prepared=True)

    def _cached(
        self, key: Hashable, build: Callable[[], sql.Composable], *, prepared: bool
    ) -> Statement:
        found = self._statements.get((prepared, key))
        if found is None:
            found = _statement(render(build()), prepared=prepared)
            with self._lock:  # eviction iterates the dict: not while another thread inserts
                while len(self._statements) >= STATEMENT_CACHE_SIZE:
                    del self._statements[next(iter(self._statements))]
                self._statements[(prepared, key)] = found
        return found

    def cached_statements(self) -> int:
        """Return how many statement texts this store keeps (bounded by STATEMENT_CACHE_SIZE)."""
        return len(self._statements)

    @staticmethod
    def plain(text: str) -> Statement:
        """Return a parameterless statement written by hand (with `%%` for `%`)."""
        return _statement(text)

    # -- schema -----------------------------------------------------------------

    def check_collation(self) -> Steps[str | None]:
        """Return a warning to log when strings do not order by code point, else None."""
        rows = yield Execute(
            self.plain("""SELECT '"B"'::jsonb < '"a"'::jsonb AND '"z"'::jsonb < '"é"'::jsonb"""),
            write=False,
        )
        if rows and rows[0][0]:
            return None
        return (
            "the database collation does not order strings by code point; "
            "string ranges and order_by follow the collation instead"
        )

    # -- single documents ---------------------------------------------------------

    def create(
        self, collection: str, data: dict[str, Any], *, id: str | None, ttl: Ttl | None
    ) -> Steps[Document]:
        check_name("collection", collection)
        doc_id = check_name("id", id) if id is not None else new_id()
        text = encode_data(data, self.max_document_bytes)
        ttl_seconds = check_ttl(ttl)
        params: list[Any] = [collection, doc_id, text]
        expiry = _expiry_sql(ttl_seconds, params)
        statement = self.prepared(
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
        rows = yield from self._write_with_unique_retry(collection, statement, params)
        if not rows:
            raise DocumentExists(f"a document with this id already exists in {collection!r}")
        return to_document(rows[0])

    def read(self, collection: str, id: str) -> Steps[Document | None]:
        check_name("collection", collection)
        check_name("id", id)
        statement = self.prepared(
            "read",
            lambda: sql.SQL(
                "SELECT {cols} FROM {t} WHERE collection = %s AND id = %s AND {live}"
            ).format(cols=_COLUMNS, t=self._table, live=_LIVE),
        )
        rows = yield Execute(statement, (collection, id), write=False)
        return to_document(rows[0]) if rows else None

    def read_with(
        self,
        collection: str,
        id: str,
        related: str,
        filters: Filters | None,
        *,
        link: tuple[str, str],
        limit: int | None,
        order_by: OrderBy | None,
    ) -> Steps[tuple[Document | None, list[Document]]]:
        check_name("collection", collection)
        check_name("id", id)
        check_name("collection", related)
        check_paging(limit, 0)
        related_path, own_path = parse_link(link, filters)
        conditions = parse_filters(filters)
        keys = parse_order_by(order_by)
        statement = self.prepared(
            (
                "read_with",
                related,
                related_path,
                own_path,
                tuple(map(condition_shape, conditions)),
                tuple(keys),
                limit,
            ),
            # The document, then (same snapshot) the related documents whose link
            # path equals its own: the subquery is a value the planner can look
            # up in an index on that path.
            lambda: sql.SQL(
                "WITH d AS (SELECT {cols} FROM {t} WHERE collection = %s AND id = %s AND {live}) "
                "SELECT 0, {cols} FROM d UNION ALL "
                "(SELECT 1, {cols} FROM {t} WHERE collection = {related} AND {live} AND {where}"
                " AND {link} = (SELECT NULLIF({own}, 'null'::jsonb) FROM d)"
                " ORDER BY {order} {paging})"
            ).format(
                cols=_COLUMNS,
                t=self._table,
                live=_LIVE,
                related=PercentSafeLiteral(related),
                where=compile_where(conditions),
                link=path_expression(related_path),
                own=path_expression(own_path),
                order=compile_order_by(keys),
                paging=_paging(limit, 0),
            ),
        )
        params = [collection, id, *condition_params(conditions)]
        rows = yield Execute(statement, params, write=False)
        document: Document | None = None
        linked: list[Document] = []
        for row in rows:
            if row[0] == 0:
                document = to_document(row[1:])
            else:
                linked.append(to_document(row[1:]))
        return (document, linked) if document is not None else (None, [])

    def modify(
        self,
        collection: str,
        id: str,
        data: dict[str, Any],
        expected_version: int | None,
        ttl: Ttl | None,
        *,
        merge: bool,
    ) -> Steps[Document | None]:
        """Update (`merge=True`) or replace a document."""
        check_name("collection", collection)
        check_name("id", id)
        text = encode_data(data, self.max_document_bytes)
        version = check_version(expected_version)
        ttl_seconds = check_ttl(ttl)
        params: list[Any] = [text]
        if ttl_seconds is not None:
            params.append(ttl_seconds)
        params.extend([collection, id])
        if merge:
            # The merged document must respect the size limit too.
            params.extend([text, self.max_document_bytes])
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

        statement = self.prepared(("modify", merge, ttl_seconds is None, version is None), build)
        rows = yield from self._write_with_unique_retry(collection, statement, params)
        if rows:
            return to_document(rows[0])
        if version is None and not merge:
            return None
        yield from self._explain_refusal(collection, id, version, text if merge else None)
        return None

    def _explain_refusal(
        self, collection: str, id: str, expected_version: int | None, merged_text: str | None
    ) -> Steps[None]:
        """Raise why a guarded write matched no row, or return None if the document is missing."""
        size = sql.SQL("octet_length((data || %s::jsonb)::text)" if merged_text else "0")
        statement = self.statement(
            ("refusal", merged_text is not None),
            lambda: sql.SQL(
                "SELECT version, {size} FROM {t} WHERE collection = %s AND id = %s AND {live}"
            ).format(size=size, t=self._table, live=_LIVE),
        )
        rows = yield Execute(
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
        if merged_bytes > self.max_document_bytes:
            raise InvalidDocument(
                f"the merged document would be {merged_bytes} bytes, more than the limit "
                f"of {self.max_document_bytes}"
            )
        # The row changed between the two statements; report it as a conflict.
        raise VersionConflict(
            "the document changed concurrently", expected=expected_version, actual=actual_version
        )

    def upsert(
        self, collection: str, id: str, data: dict[str, Any], *, ttl: Ttl | None
    ) -> Steps[Document]:
        check_name("collection", collection)
        check_name("id", id)
        text = encode_data(data, self.max_document_bytes)
        ttl_seconds = check_ttl(ttl)
        params: list[Any] = [collection, id, text]
        expiry = _expiry_sql(ttl_seconds, params)
        params.append(self.max_document_bytes)
        expired = sql.SQL("(d.expires_at IS NOT NULL AND d.expires_at <= now())")
        statement = self.prepared(
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
        rows = yield from self._write_with_unique_retry(collection, statement, params)
        if not rows:
            yield from self._explain_refusal(collection, id, None, text)
            raise DocstoreError("upsert matched no row")  # only if the row vanished meanwhile
        return to_document(rows[0])

    def delete(self, collection: str, id: str, *, expected_version: int | None) -> Steps[bool]:
        check_name("collection", collection)
        check_name("id", id)
        version = check_version(expected_version)
        params: list[Any] = [collection, id]
        guard = sql.SQL("")
        if version is not None:
            guard = sql.SQL(" AND version = %s")
            params.append(version)
        statement = self.prepared(
            ("delete", version is None),
            lambda: sql.SQL(
                "DELETE FROM {t} WHERE collection = %s AND id = %s AND {live}{guard} RETURNING 1"
            ).format(t=self._table, live=_LIVE, guard=guard),
        )
        rows = yield Execute(statement, params)
        if rows:
            return True
        if version is not None:
            yield from self._explain_refusal(collection, id, version, None)
        return False

    def rename(
        self, collection: str, id: str, new_id: str, *, expected_version: int | None
    ) -> Steps[Document | None]:
        check_name("collection", collection)
        check_name("id", id)
        check_name("id", new_id)
        version = check_version(expected_version)
        if new_id == id:
            raise DocumentExists("new_id is the document's own id")
        params: list[Any] = [new_id, collection, id]
        guard = sql.SQL("")
        if version is not None:
            guard = sql.SQL(" AND version = %s")
            params.append(version)
        statement = self.prepared(
            ("rename", version is None),
            lambda: sql.SQL(
                "UPDATE {t} SET id = %s, version = version + 1, updated_at = now() "
                "WHERE collection = %s AND id = %s AND {live}{guard} RETURNING {cols}"
            ).format(t=self._table, live=_LIVE, guard=guard, cols=_COLUMNS),
        )
        rows = yield from self._write_clearing_expired(collection, new_id, statement, params)
        if rows:
            return to_document(rows[0])
        if version is not None:
            yield from self._explain_refusal(collection, id, version, None)
        return None

    # -- conflicts with expired rows ------------------------------------------------

    def _write_with_unique_retry(
        self, collection: str, statement: Statement, params: Sequence[Any]
    ) -> Steps[Rows]:
        """Run a write; if a unique index refuses it, drop expired rows of the collection once.

        Unique indexes cannot tell live rows from expired ones, and expired
        documents must never conflict.
        """
        try:
            return (yield Execute(statement, params))
        except DocumentExists:
            if not (yield from self._purge_expired_in(collection)):
                raise
        return (yield Execute(statement, params))

    def _write_clearing_expired(
        self, collection: str, id: str, statement: Statement, params: Sequence[Any]
    ) -> Steps[Rows]:
        """Run a write that claims `id`, retrying when the id (or a unique value) was taken.

        The retry sees what took it: an expired row (removed first), a
        concurrent writer's row (an idempotent `append` then returns it), or a
        live conflict that raises DocumentExists again.
        """
        for attempt in range(3):
            try:
                return (yield Execute(statement, params))
            except DocumentExists:
                if attempt == 2:
                    raise
                clear = self.statement(
                    "clear expired id",
                    lambda: sql.SQL(
                        "DELETE FROM {t} WHERE collection = %s AND id = %s AND NOT {live}"
                    ).format(t=self._table, live=_LIVE),
                )
                yield Execute(clear, (collection, id))
                yield from self._purge_expired_in(collection)
        raise AssertionError("unreachable")

    def _purge_expired_in(self, collection: str) -> Steps[bool]:
        statement = self.statement(
            "purge collection",
            lambda: sql.SQL("DELETE FROM {t} WHERE collection = %s AND NOT {live}").format(
                t=self._table, live=_LIVE
            ),
        )
        rows = yield Execute(statement, (collection,))
        return bool(rows and rows[0][0])

    # -- many documents -------------------------------------------------------------

    def query(
        self,
        collection: str,
        filters: Filters | None,
        *,
        limit: int | None,
        offset: int,
        order_by: OrderBy | None,
        after: Document | None,
    ) -> Steps[list[Document]]:
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
        statement = self.prepared(
            (
                "query",
                collection,
                tuple(map(condition_shape, conditions)),
                tuple(keys),
                after is None,
                limit,
                offset or None,
            ),
            lambda: sql.SQL(
                "SELECT {cols} FROM {t} WHERE collection = {coll} AND {live} AND {where} "
                "AND {keyset} ORDER BY {order} {paging}"
            ).format(
                cols=_COLUMNS,
                t=self._table,
                coll=PercentSafeLiteral(collection),
                live=_LIVE,
                where=compile_where(conditions),
                keyset=keyset,
                order=compile_order_by(keys),
                paging=_paging(limit, offset),
            ),
        )
        params = [*condition_params(conditions), *cursor, *([offset] if offset else [])]
        rows = yield Execute(statement, params, write=False)
        return [to_document(row) for row in rows]

    def count(self, collection: str, filters: Filters | None) -> Steps[int]:
        check_name("collection", collection)
        conditions = parse_filters(filters)
        statement = self.prepared(
            ("count", collection, tuple(map(condition_shape, conditions))),
            lambda: sql.SQL(
                "SELECT count(*) FROM {t} WHERE collection = {coll} AND {live} AND {where}"
            ).format(
                t=self._table,
                coll=PercentSafeLiteral(collection),
                live=_LIVE,
                where=compile_where(conditions),
            ),
        )
        rows = yield Execute(statement, condition_params(conditions), write=False)
        return int(rows[0][0])

    def list_collections(self) -> Steps[list[str]]:
        statement = self.statement(
            "collections",
            lambda: sql.SQL(
                'SELECT DISTINCT collection COLLATE "C" AS name FROM {t} WHERE {live} ORDER BY name'
            ).format(t=self._table, live=_LIVE),
        )
        rows = yield Execute(statement, write=False)
        return [row[0] for row in rows]

    def delete_collection(self, collection: str) -> Steps[bool]:
        check_name("collection", collection)
        statement = self.statement(
            "delete collection",
            lambda: sql.SQL(
                "WITH gone AS (DELETE FROM {t} WHERE collection = %s RETURNING {live} AS live) "
                "SELECT coalesce(bool_or(live), false) FROM gone"
            ).format(t=self._table, live=_LIVE),
        )
        rows = yield Execute(statement, (collection,))
        return bool(rows[0][0])

    def delete_many(self, collection: str, filters: Filters) -> Steps[int]:
        check_name("collection", collection)
        if filters is None:
            raise InvalidQuery("delete_many needs filters; pass {} to delete every document")
        conditions = parse_filters(filters)
        statement = self.prepared(
            ("delete many", collection, tuple(map(condition_shape, conditions))),
            lambda: sql.SQL(
                "DELETE FROM {t} WHERE collection = {coll} AND {live} AND {where}"
            ).format(
                t=self._table,
                coll=PercentSafeLiteral(collection),
                live=_LIVE,
                where=compile_where(conditions),
            ),
        )
        rows = yield Execute(statement, condition_params(conditions))
        return int(rows[0][0])

    def purge_expired(self, collection: str | None, *, batch_size: int) -> Steps[int]:
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
        statement = self.statement(
            ("purge", collection is None),
            lambda: sql.SQL(
                "DELETE FROM {t} WHERE ctid = ANY(ARRAY("
                " SELECT ctid FROM {t} WHERE expires_at <= now(){scope} LIMIT %s))"
            ).format(t=self._table, scope=scope),
        )
        total = 0
        while True:
            deleted = int((yield Execute(statement, params))[0][0])
            total += deleted
            if deleted < batch_size:
                return total

    def pop_expired(self, collection: str, *, limit: int) -> Steps[list[Document]]:
        check_name("collection", collection)
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise InvalidQuery(f"limit must be an int >= 1, not {limit!r}")
        statement = self.prepared(
            ("pop expired", collection, limit),
            lambda: sql.SQL(
                "DELETE FROM {t} WHERE ctid = ANY(ARRAY("
                " SELECT ctid FROM {t} WHERE expires_at <= now() AND collection = {coll} {paging}))"
                " RETURNING {cols}"
            ).format(
                t=self._table,
                coll=PercentSafeLiteral(collection),
                paging=_paging(limit, 0),
                cols=_COLUMNS,
            ),
        )
        rows = yield Execute(statement, ())
        return [to_document(row) for row in rows]

    def ensure_index(
        self,
        collection: str,
        paths: str | Sequence[str],
        *,
        unique: bool,
        order_by: OrderBy | None,
    ) -> Steps[None]:
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
            name=PercentSafeIdentifier(_index_name(self.table_name, key)),
            t=self._table,
            columns=sql.SQL(", ").join(columns),
            coll=PercentSafeLiteral(collection),
        )
        lock_name = PercentSafeLiteral(f"docstore index {self.table_name}")
        lock = sql.SQL("SELECT pg_advisory_lock(hashtext({}))").format(lock_name)
        unlock = sql.SQL("SELECT pg_advisory_unlock(hashtext({}))").format(lock_name)
        if unique:
            yield from self._purge_expired_in(collection)
        # Two processes creating the same index at once would collide in the catalog.
        # Building an index over a big collection outlasts any statement_timeout
        # meant for the hot path (a million rows: tens of seconds).
        yield Exclusive(
            (
                self.plain(render(lock)),
                self.plain("SET statement_timeout = 0"),
                self.plain(render(statement)),
                self.plain(self._statistics_sql(parsed)),
            ),
            # One statement (some drivers run a single one per call): unlock, and
            # put back the timeout RESET would restore.
            cleanup=self.plain(
                render(unlock) + ", set_config('statement_timeout', (SELECT reset_val"
                " FROM pg_settings WHERE name = 'statement_timeout'), false)"
            ),
        )
        self._ensured_indexes.add(key)

    def _statistics_sql(self, paths: Sequence[tuple[str, ...]]) -> str:
        """Return a statement that gives PostgreSQL statistics of each path's expression.

        The planner ignores the statistics of a partial index's expressions
        (every index here is partial, `WHERE collection = ...`) and so guesses
        that `path = value` matches 0.5% of the table, and `path = ANY(<1,000
        values>)` nearly all of it: a sequential scan where the index would read
        a few rows (purging 2,200 sessions' messages from 1.2 million rows took
        seconds). An extended statistics object on the expression (PostgreSQL
        14 and later) gives it the real distribution. Created once per path
        (a no-op when it exists), then the table is analysed so that it holds
        numbers at once rather than at autovacuum's next visit; nothing is done
        on older servers.
        """
        table_literal = _literal('"' + self.table_name.replace('"', '""') + '"')
        steps = []
        for path in paths:
            name = f"{self.table_name}_st_{hashlib.sha256(repr(path).encode()).hexdigest()[:16]}"
            create = render(
                sql.SQL("CREATE STATISTICS IF NOT EXISTS {} ON ({}) FROM {}").format(
                    sql.Identifier(name), path_expression(path), sql.Identifier(self.table_name)
                )
            ).replace("%%", "%")
            steps.append(
                f"IF NOT EXISTS (SELECT 1 FROM pg_statistic_ext WHERE stxrelid = "
                f"to_regclass({table_literal}) AND stxname = {_literal(name)}) THEN "
                f"EXECUTE {_literal(create)}; created := true; END IF;"
            )
        analyze = render(sql.SQL("ANALYZE {}").format(sql.Identifier(self.table_name)))
        body = (
            "DECLARE created boolean := false; BEGIN "
            "IF current_setting('server_version_num')::int >= 140000 THEN "
            + " ".join(steps)
            + f" END IF; IF created THEN EXECUTE {_literal(analyze.replace('%%', '%'))}; END IF;"
            " END"
        )
        return f"DO {_literal(body)}".replace("%", "%%")

    # -- sequences --------------------------------------------------------------

    def append(
        self,
        collection: str,
        data: dict[str, Any],
        *,
        parent: tuple[str, str],
        id: str | None,
        ttl: Ttl | None,
        parent_ttl: Ttl | None,
        parent_data: bool = True,
    ) -> Steps[tuple[Document, Document] | None]:
        check_name("collection", collection)
        check_flag("parent_data", parent_data)
        parent_collection, parent_id = check_parent(parent)
        child_id = check_name("id", id) if id is not None else new_id()
        # One encoding, with room for the "parent" and "seq" the statement adds.
        added = f',"parent":{json.dumps(parent_id, ensure_ascii=False)},"seq":{_SEQ_PLACEHOLDER}'
        text = encode_data(data, self.max_document_bytes, reserve=len(added.encode("utf-8")))
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
        # Without the parent's data, PostgreSQL neither renders nor sends it.
        parent_cols = _COLUMNS if parent_data else _COLUMNS_BUT_DATA
        statement = self.prepared(
            ("append", ttl_seconds is None, parent_ttl_seconds is None, parent_data),
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
                "SELECT 'parent', {parent_cols} FROM parent "
                "UNION ALL SELECT 'child', {cols} FROM child "
                "UNION ALL SELECT 'child', {cols} FROM existing "
                "UNION ALL SELECT 'parent', {parent_cols} FROM {t}"
                " WHERE collection = %s AND id = %s AND {live} AND EXISTS (SELECT 1 FROM existing)"
            ).format(
                cols=_COLUMNS,
                parent_cols=parent_cols,
                t=self._table,
                live=_LIVE,
                expiry=expiry,
                parent_expiry=parent_expiry,
            ),
        )
        rows = yield from self._write_clearing_expired(collection, child_id, statement, params)
        found = {row[0]: to_document(row[1:]) for row in rows}
        if "parent" not in found or "child" not in found:
            return None
        return found["parent"], found["child"]

    def pop_child(
        self,
        collection: str,
        filters: Filters,
        *,
        parent: tuple[str, str],
        parent_ttl: Ttl | None,
    ) -> Steps[tuple[Document, Document | None] | None]:
        rows = yield from self._remove_children(
            collection, filters, parent, parent_ttl, newest_only=True
        )
        found = {row[0]: to_document(row[1:]) for row in rows}
        if "parent" not in found:
            return None
        return found["parent"], found.get("child")

    def delete_children(
        self,
        collection: str,
        filters: Filters,
        *,
        parent: tuple[str, str],
        parent_ttl: Ttl | None,
    ) -> Steps[tuple[Document, int] | None]:
        rows = yield from self._remove_children(
            collection, filters, parent, parent_ttl, newest_only=False
        )
        if not rows:
            return None
        row = tuple(rows[0])
        return to_document(row[:-1]), int(row[-1])

    def _remove_children(
        self,
        collection: str,
        filters: Filters,
        parent: tuple[str, str],
        parent_ttl: Ttl | None,
        *,
        newest_only: bool,
    ) -> Steps[Rows]:
        """Lock the parent, then bump it and delete its (newest) matching child.

        Two statements run as one unit (see `Atomic`). The first only locks the
        parent row. The second takes its snapshot after that, so it sees every
        append that committed before the lock (a single statement would take
        its snapshot before waiting for the lock and could miss an append that
        committed meanwhile, popping an older child); appends and other pops
        of this parent wait for the lock.
        """
        check_name("collection", collection)
        if filters is None:
            raise InvalidQuery("filters must select the children; pass {} for all of them")
        parent_collection, parent_id = check_parent(parent)
        conditions = parse_filters(filters)
        parent_ttl_seconds = check_ttl(parent_ttl)
        lock_params: list[Any] = [parent_collection, parent_id]
        params: list[Any] = []
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

        def build_lock() -> sql.Composable:
            return sql.SQL(
                "SELECT 1 FROM {t} WHERE collection = %s AND id = %s AND {live} FOR NO KEY UPDATE"
            ).format(**fields)

        def build_remove() -> sql.Composable:
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
            return sql.Composed([bump, remove])

        shape = (
            "remove children",
            newest_only,
            tuple(map(condition_shape, conditions)),
            parent_ttl_seconds is None,
        )
        lock = self.statement("lock parent", build_lock)
        remove = self.statement(shape, build_remove)
        combined = self.statement(
            ("combined", shape), lambda: sql.Composed([build_lock(), sql.SQL("; "), build_remove()])
        )
        return (
            yield Atomic(
                (Execute(lock, lock_params), Execute(remove, params)),
                Execute(combined, [*lock_params, *params]),
            )
        )

    # -- export and import ----------------------------------------------------------

    def dump(
        self,
        collection: str,
        filters: Filters | None,
        *,
        after: Document | None,
        limit: int,
        include_expired: bool,
    ) -> Steps[list[Dumped]]:
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
        statement = self.prepared(
            (
                "dump",
                collection,
                tuple(map(condition_shape, conditions)),
                after is None,
                include_expired,
                limit,
            ),
            lambda: sql.SQL(
                "SELECT {cols}, child_seq FROM {t} WHERE collection = {coll} AND {live}"
                " AND {where} AND {keyset} ORDER BY created_at, id {paging}"
            ).format(
                cols=_COLUMNS,
                t=self._table,
                coll=PercentSafeLiteral(collection),
                live=sql.SQL("TRUE") if include_expired else _LIVE,
                where=compile_where(conditions),
                keyset=keyset,
                paging=_paging(limit, 0),
            ),
        )
        params = [*condition_params(conditions), *cursor]
        rows = yield Execute(statement, params, write=False)
        return [Dumped(to_document(tuple(row)[:-1]), int(row[-1])) for row in rows]

    def _restore_statement(self, rows: int) -> Statement:
        """Return the INSERT that restores `rows` documents unless a live one holds the id."""
        return self.statement(
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
            encode_data(document.data, self.max_document_bytes),
            document.created_at,
            document.updated_at,
            document.version,
            document.expires_at,
            counter,
        ]

    def restore(self, document: Document, *, counter: int) -> Steps[Document | None]:
        params = self._restore_params(document, counter)
        statement = self._restore_statement(1)
        for _ in range(3):
            if (yield from self._write_with_unique_retry(document.collection, statement, params)):
                return None
            live = yield from self.read(document.collection, document.id)
            if live is not None:
                return live
            # The live document went away between the two statements: try again.
        raise DocstoreError("restore kept racing with writers of the same id")

    def restore_many(self, documents: Sequence[Document]) -> Steps[list[str]]:
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
            rows = yield from self._write_with_unique_retry(
                batch[0].collection, self._restore_statement(len(batch)), params
            )
            written = {row[0] for row in rows}
            held.extend(doc_id for doc_id in ids if doc_id not in written)
        return held

    def table_stats(self, collections: Sequence[str]) -> Steps[dict[str, Any]]:
        """Return the table's size on disk, its indexes' and schema version, and per collection
        how many live and expired documents it holds (a count over the collection's rows).
        """
        for collection in collections:
            check_name("collection", collection)
        counts = self.statement(
            "stats counts",
            lambda: sql.SQL(
                "SELECT collection, count(*) FILTER (WHERE {live}),"
                " count(*) FILTER (WHERE NOT {live})"
                " FROM {t} WHERE collection = ANY(%s) GROUP BY collection"
            ).format(t=self._table, live=_LIVE),
        )
        sizes = self.statement(
            "stats sizes",
            lambda: sql.SQL(
                "SELECT pg_table_size(c.oid), pg_indexes_size(c.oid),"
                " pg_total_relation_size(c.oid),"
                " (SELECT value FROM {meta} WHERE key = 'schema_version')"
                " FROM pg_class c WHERE c.oid = to_regclass(%s)"
            ).format(meta=self._name("meta")),
        )
        indexes = self.statement(
            "stats indexes",
            lambda: sql.SQL(
                "SELECT c.relname, pg_relation_size(c.oid), i.indisvalid FROM pg_index i"
                " JOIN pg_class c ON c.oid = i.indexrelid"
                " WHERE i.indrelid = to_regclass(%s) ORDER BY c.relname"
            ),
        )
        regclass = '"' + self.table_name.replace('"', '""') + '"'
        rows = yield Execute(counts, (list(collections),), write=False)
        found = {row[0]: (int(row[1]), int(row[2])) for row in rows}
        size_rows = yield Execute(sizes, (regclass,), write=False)
        table_bytes, index_bytes, total_bytes, version = size_rows[0]
        listed = yield Execute(indexes, (regclass,), write=False)
        return {
            "table": self.table_name,
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
