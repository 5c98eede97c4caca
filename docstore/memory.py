"""In-memory document store: the PostgreSQL store's behaviour, evaluated in Python.

Filters, orderings and containment follow PostgreSQL's jsonb rules as
`docs/docstore.md` writes them down, so that one contract suite passes against
both stores.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import operator
import re
import threading
import time
import uuid
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from types import MappingProxyType
from typing import Any

from .document import Document
from .errors import DocumentExists, InvalidDocument, InvalidQuery, VersionConflict
from .query import (
    Condition,
    SortKey,
    check_paging,
    keyset_columns,
    keyset_values,
    parse_filters,
    parse_index_order,
    parse_order_by,
    parse_path,
)
from .store import (
    DEFAULT_MAX_DOCUMENT_BYTES,
    DocumentStore,
    Dumped,
    Filters,
    OrderBy,
    Ttl,
    check_flag,
    check_name,
    check_parent,
    check_restorable,
    check_ttl,
    decode_json,
    encode_data,
    iter_paths,
)

__all__ = ["MemoryDocumentStore"]

# What a path that cannot be followed yields: distinct from JSON null (None).
_MISSING: Any = object()
# PostgreSQL's `#>` reads a path segment as a list index only when it is an integer.
_LIST_INDEX = re.compile(r"-?[0-9]+")

_RANGE_OPERATORS: Mapping[str, Callable[[Any, Any], Any]] = MappingProxyType(
    {"$gt": operator.gt, "$gte": operator.ge, "$lt": operator.lt, "$lte": operator.le}
)

IndexPaths = tuple[tuple[str, ...], ...]


@dataclasses.dataclass(frozen=True)
class _Record:
    """One stored document; never mutated, so undo entries can share it."""

    data: dict[str, Any]
    created_at: datetime
    updated_at: datetime
    version: int
    expires_at: datetime | None
    # The parent's append counter, kept with it so a deleted child's seq is never reused.
    last_seq: int = 0

    def is_live(self, now: datetime) -> bool:
        """Return whether the record has not expired at `now`."""
        return self.expires_at is None or self.expires_at > now


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _follow(data: Any, path: tuple[str, ...]) -> Any:
    """Return the value at `path` as PostgreSQL's `#>` finds it, or _MISSING."""
    value = data
    for segment in path:
        if isinstance(value, dict):
            if segment not in value:
                return _MISSING
            value = value[segment]
        elif isinstance(value, list) and _LIST_INDEX.fullmatch(segment):
            index = int(segment)
            if not -len(value) <= index < len(value):
                return _MISSING
            value = value[index]
        else:
            return _MISSING
    return value


def _equality_key(value: Any) -> Hashable:
    """Return a hashable value equal for two JSON values exactly when jsonb `=` holds."""
    # Tags keep True apart from 1; ints and floats of equal value compare and hash alike.
    if isinstance(value, bool):
        return ("boolean", value)
    if isinstance(value, int | float):
        return ("number", value)
    if isinstance(value, str):
        return ("string", value)
    if isinstance(value, list):
        return ("array", tuple(_equality_key(item) for item in value))
    if isinstance(value, dict):
        return ("object", frozenset((key, _equality_key(item)) for key, item in value.items()))
    return ("null",)


def _json_equal(left: Any, right: Any) -> bool:
    return _equality_key(left) == _equality_key(right)


def _jsonb_key_order(item: tuple[str, Any]) -> tuple[int, bytes]:
    encoded = item[0].encode("utf-8")
    return len(encoded), encoded


def _sort_key(value: Any, top: bool = True) -> tuple[Any, ...]:
    """Return a key ordering JSON values as PostgreSQL's jsonb btree does."""
    # Rank 0 is jsonb's historical quirk: a top-level empty array sorts before null.
    # A missing field (SQL NULL) ranks after everything, as NULLS LAST / NULLS FIRST do.
    if value is _MISSING:
        return (7,)
    if value is None:
        return (1,)
    if isinstance(value, str):
        return (2, value)
    if isinstance(value, bool):
        return (4, value)
    if isinstance(value, int | float):
        return (3, value)
    if isinstance(value, list):
        if top and not value:
            return (0,)
        return (5, len(value), tuple(_sort_key(item, False) for item in value))
    pairs = sorted(value.items(), key=_jsonb_key_order)
    return (6, len(pairs), tuple((key, _sort_key(item, False)) for key, item in pairs))


def _contains(field: Any, operand: Any, top: bool = True) -> bool:
    """Return whether `field @> operand` holds in PostgreSQL's jsonb sense."""
    if isinstance(field, list):
        if isinstance(operand, list):
            return all(any(_contains(item, wanted, False) for item in field) for wanted in operand)
        # Only the top-level array contains a bare scalar equal to one of its elements.
        return (
            top
            and not isinstance(operand, dict)
            and any(_json_equal(item, operand) for item in field)
        )
    if isinstance(field, dict):
        return isinstance(operand, dict) and all(
            key in field and _contains(field[key], wanted, False) for key, wanted in operand.items()
        )
    return not isinstance(operand, list | dict) and _json_equal(field, operand)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _predicate(condition: Condition) -> Callable[[Any], bool]:
    """Return a test of the value found at the condition's path (possibly _MISSING)."""
    op, operand = condition.op, condition.operand
    if op in ("$eq", "$ne"):
        wanted = _equality_key(operand)
        if op == "$eq":
            return lambda value: value is not _MISSING and _equality_key(value) == wanted
        return lambda value: value is _MISSING or _equality_key(value) != wanted
    if op in ("$in", "$nin"):
        choices = frozenset(_equality_key(item) for item in operand)
        if op == "$in":
            return lambda value: value is not _MISSING and _equality_key(value) in choices
        return lambda value: value is _MISSING or _equality_key(value) not in choices
    if op in ("$gt", "$gte", "$lt", "$lte"):
        compare = _RANGE_OPERATORS[op]
        if isinstance(operand, str):
            return lambda value: isinstance(value, str) and bool(compare(value, operand))
        return lambda value: _is_number(value) and bool(compare(value, operand))
    if op == "$exists":
        return lambda value: (value is not _MISSING) is operand
    if op == "$contains":
        return lambda value: value is not _MISSING and _contains(value, operand)
    if op == "$regex":
        pattern = re.compile(operand)
        return lambda value: isinstance(value, str) and pattern.search(value) is not None
    raise InvalidQuery(f"unknown operator {op!r}")


def _compile_filters(filters: object) -> Callable[[dict[str, Any]], bool]:
    """Validate `filters` and return a test of a document's data."""
    tests = [(condition.path, _predicate(condition)) for condition in parse_filters(filters)]
    return lambda data: all(test(_follow(data, path)) for path, test in tests)


def _order_value(key: SortKey, row: tuple[str, _Record]) -> Any:
    doc_id, record = row
    if key.column == "id":
        return doc_id
    if key.column == "created_at":
        return record.created_at
    if key.column == "updated_at":
        return record.updated_at
    return _sort_key(_follow(record.data, key.path))


def _keyset_filter(keys: list[SortKey], after: object) -> Callable[[tuple[str, _Record]], bool]:
    """Return a test for rows strictly after the cursor document `after` in this order."""
    if after is None:
        return lambda row: True
    columns = keyset_columns(keys)
    cursor = keyset_values(after, columns)

    def beyond(row: tuple[str, _Record]) -> bool:
        doc_id, record = row
        for (column, descending), value in zip(columns, cursor, strict=True):
            mine = doc_id if column == "id" else getattr(record, column)
            if mine != value:
                return bool(mine < value) if descending else bool(mine > value)
        return False

    return beyond


def _sort_rows(rows: list[tuple[str, _Record]], keys: list[SortKey]) -> None:
    """Sort rows in place by `keys`, ties broken by id ascending."""
    # Stable sorts from the least significant key up; reverse=True keeps stability,
    # so each key gets its own direction.
    rows.sort(key=operator.itemgetter(0))
    for key in reversed(keys):
        rows.sort(key=lambda row: _order_value(key, row), reverse=key.descending)


def _index_key(data: dict[str, Any], paths: IndexPaths) -> Hashable | None:
    """Return the unique-index value of `data`, or None when a path is missing."""
    values = [_follow(data, path) for path in paths]
    if any(value is _MISSING for value in values):
        return None
    return tuple(_equality_key(value) for value in values)


def _check_expected_version(expected_version: object) -> None:
    if expected_version is not None and (
        isinstance(expected_version, bool) or not isinstance(expected_version, int)
    ):
        raise InvalidDocument(f"expected_version must be an int or None, not {expected_version!r}")


def _check_version(
    collection: str, doc_id: str, record: _Record, expected_version: int | None
) -> None:
    if expected_version is not None and record.version != expected_version:
        raise VersionConflict(
            f"{collection!r}/{doc_id!r} is at version {record.version}, not {expected_version}",
            expected=expected_version,
            actual=record.version,
        )


def _expiry(now: datetime, ttl_seconds: float | None) -> datetime | None:
    if ttl_seconds is None:
        return None
    try:
        return now + timedelta(seconds=ttl_seconds)
    except OverflowError as exc:
        raise InvalidDocument(f"ttl of {ttl_seconds} seconds ends past year 9999") from exc


class MemoryDocumentStore(DocumentStore):
    """A thread-safe document store kept in this process; nothing is persisted.

    One reentrant lock guards all state. A transaction holds it for its whole
    block, so other threads wait instead of seeing uncommitted changes. Every
    write records how to undo itself, so a failing call undoes its own changes
    and a failing transaction block undoes everything done inside it.
    `close()` releases nothing and may be called any number of times; the store
    keeps working after it.

    `clock` is the wall clock (seconds since the epoch, `time.time` by default)
    that timestamps and expiry are computed from: a test injects one to move
    time without waiting (PostgreSQL uses its own `now()` instead).
    """

    def __init__(
        self,
        *,
        max_document_bytes: int = DEFAULT_MAX_DOCUMENT_BYTES,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if (
            isinstance(max_document_bytes, bool)
            or not isinstance(max_document_bytes, int)
            or max_document_bytes < 1
        ):
            raise ValueError(f"max_document_bytes must be an int >= 1, not {max_document_bytes!r}")
        self._max_document_bytes = max_document_bytes
        # The default clock keeps the plain datetime.now() call on every hot path.
        self._now: Callable[[], datetime] = (
            _now if clock is time.time else lambda: datetime.fromtimestamp(clock(), timezone.utc)
        )
        self._lock = threading.RLock()
        self._collections: dict[str, dict[str, _Record]] = {}
        self._indexes: dict[str, dict[IndexPaths, bool]] = {}  # paths -> unique
        self._undo: list[Callable[[], None]] = []
        self._transaction_depth = 0

    # -- internals -----------------------------------------------------------

    def _encode(self, data: object) -> dict[str, Any]:
        """Validate data and return it exactly as PostgreSQL would hand it back."""
        decoded: dict[str, Any] = decode_json(encode_data(data, self._max_document_bytes))
        return decoded

    @contextmanager
    def _write(self) -> Iterator[None]:
        """Hold the lock for one call and undo the call's own changes if it raises."""
        with self._lock:
            mark = len(self._undo)
            try:
                yield
            except BaseException:
                self._undo_to(mark)
                raise
            finally:
                if self._transaction_depth == 0:
                    self._undo.clear()

    def _undo_to(self, mark: int) -> None:
        while len(self._undo) > mark:
            self._undo.pop()()

    def _set(self, collection: str, doc_id: str, record: _Record | None) -> None:
        docs = self._collections.setdefault(collection, {})
        if record is None:
            docs.pop(doc_id, None)
        else:
            docs[doc_id] = record
        if not docs:
            del self._collections[collection]

    def _put(self, collection: str, doc_id: str, record: _Record | None) -> None:
        """Store (or with None remove) a record, remembering how to undo it."""
        previous = self._collections.get(collection, {}).get(doc_id)
        self._set(collection, doc_id, record)
        self._undo.append(lambda: self._set(collection, doc_id, previous))

    def _live(self, collection: str, doc_id: str, now: datetime) -> _Record | None:
        record = self._collections.get(collection, {}).get(doc_id)
        return record if record is not None and record.is_live(now) else None

    def _live_rows(self, collection: str, now: datetime) -> list[tuple[str, _Record]]:
        docs = self._collections.get(collection, {})
        return [(doc_id, record) for doc_id, record in docs.items() if record.is_live(now)]

    def _check_unique(
        self, collection: str, doc_id: str, data: dict[str, Any], now: datetime
    ) -> None:
        """Raise DocumentExists if another live document shares a unique index's values."""
        for paths, unique in self._indexes.get(collection, {}).items():
            wanted = _index_key(data, paths) if unique else None
            if wanted is None:
                continue
            for other_id, other in self._live_rows(collection, now):
                if other_id != doc_id and _index_key(other.data, paths) == wanted:
                    raise DocumentExists(
                        f"{collection!r} already holds {other_id!r} with these values of "
                        f"the unique index on {['.'.join(path) for path in paths]}"
                    )

    def _save(
        self,
        collection: str,
        doc_id: str,
        data: dict[str, Any],
        ttl_seconds: float | None,
        now: datetime,
        previous: _Record | None = None,
    ) -> Document:
        """Write `data` as a new document, or as the next version of the live `previous`.

        A new document starts at version 1 (over an expired one, if any); a next
        version keeps `created_at`, the append counter and, when `ttl_seconds` is
        None, the expiry.
        """
        self._check_unique(collection, doc_id, data, now)
        expires_at = _expiry(now, ttl_seconds)
        if previous is None:
            record = _Record(data, now, now, 1, expires_at)
        else:
            record = _Record(
                data,
                previous.created_at,
                now,
                previous.version + 1,
                previous.expires_at if ttl_seconds is None else expires_at,
                previous.last_seq,
            )
        self._put(collection, doc_id, record)
        return self._document(collection, doc_id, record)

    @staticmethod
    def _document(
        collection: str, doc_id: str, record: _Record, with_data: bool = True
    ) -> Document:
        # A copy, so a caller changing doc.data cannot change what is stored.
        return Document(
            id=doc_id,
            collection=collection,
            data=copy.deepcopy(record.data) if with_data else {},
            created_at=record.created_at,
            updated_at=record.updated_at,
            version=record.version,
            expires_at=record.expires_at,
        )

    def _change(
        self,
        collection: str,
        id: str,
        data: dict[str, Any],
        expected_version: int | None,
        ttl: Ttl | None,
        merge: bool,
    ) -> Document | None:
        """Update (merge) or replace a live document; None when it is missing."""
        check_name("collection", collection)
        check_name("id", id)
        new_data = self._encode(data)
        ttl_seconds = check_ttl(ttl)
        _check_expected_version(expected_version)
        with self._write():
            now = self._now()
            record = self._live(collection, id, now)
            if record is None:
                return None
            _check_version(collection, id, record, expected_version)
            if merge:
                new_data = self._encode(record.data | new_data)
            return self._save(collection, id, new_data, ttl_seconds, now, record)

    # -- DocumentStore -------------------------------------------------------

    def create(
        self,
        collection: str,
        data: dict[str, Any],
        *,
        id: str | None = None,
        ttl: Ttl | None = None,
    ) -> Document:
        """Create a document; raise DocumentExists when the id is taken by a live one."""
        check_name("collection", collection)
        doc_id = str(uuid.uuid4()) if id is None else check_name("id", id)
        stored = self._encode(data)
        ttl_seconds = check_ttl(ttl)
        with self._write():
            now = self._now()
            if self._live(collection, doc_id, now) is not None:
                raise DocumentExists(f"{collection!r} already holds a document {doc_id!r}")
            return self._save(collection, doc_id, stored, ttl_seconds, now)

    def read(self, collection: str, id: str) -> Document | None:
        """Return the live document, or None."""
        check_name("collection", collection)
        check_name("id", id)
        with self._lock:
            record = self._live(collection, id, self._now())
            return None if record is None else self._document(collection, id, record)

    def update(
        self,
        collection: str,
        id: str,
        data: dict[str, Any],
        *,
        expected_version: int | None = None,
        ttl: Ttl | None = None,
    ) -> Document | None:
        """Shallow-merge `data` into the document; None when it is missing."""
        return self._change(collection, id, data, expected_version, ttl, merge=True)

    def replace(
        self,
        collection: str,
        id: str,
        data: dict[str, Any],
        *,
        expected_version: int | None = None,
        ttl: Ttl | None = None,
    ) -> Document | None:
        """Replace the document's data; None when it is missing."""
        return self._change(collection, id, data, expected_version, ttl, merge=False)

    def upsert(
        self, collection: str, id: str, data: dict[str, Any], *, ttl: Ttl | None = None
    ) -> Document:
        """Create the document, or shallow-merge into it, in one atomic step."""
        check_name("collection", collection)
        check_name("id", id)
        new_data = self._encode(data)
        ttl_seconds = check_ttl(ttl)
        with self._write():
            now = self._now()
            record = self._live(collection, id, now)
            if record is not None:
                new_data = self._encode(record.data | new_data)
            return self._save(collection, id, new_data, ttl_seconds, now, record)

    def delete(self, collection: str, id: str, *, expected_version: int | None = None) -> bool:
        """Delete the document; True if a live one was deleted."""
        check_name("collection", collection)
        check_name("id", id)
        _check_expected_version(expected_version)
        with self._write():
            record = self._live(collection, id, self._now())
            if record is None:
                return False
            _check_version(collection, id, record, expected_version)
            self._put(collection, id, None)
            return True

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
        """Read a live document and the documents of `related` it links to, as one step."""
        with self._lock:
            return super().read_with(
                collection, id, related, filters, link=link, limit=limit, order_by=order_by
            )

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
        """Return the live documents matching `filters`, in a deterministic order."""
        check_name("collection", collection)
        matches = _compile_filters(filters)
        keys = parse_order_by(order_by)
        check_paging(limit, offset)
        beyond = _keyset_filter(keys, after)
        with self._lock:
            rows = [
                row
                for row in self._live_rows(collection, self._now())
                if matches(row[1].data) and beyond(row)
            ]
            _sort_rows(rows, keys)
            end = None if limit is None else offset + limit
            page = rows[offset:end]
            return [self._document(collection, doc_id, record) for doc_id, record in page]

    def count(self, collection: str, filters: Filters | None = None) -> int:
        """Count the live documents matching `filters`."""
        check_name("collection", collection)
        matches = _compile_filters(filters)
        with self._lock:
            rows = self._live_rows(collection, self._now())
            return sum(1 for _, record in rows if matches(record.data))

    def list_collections(self) -> list[str]:
        """Return the names of collections holding a live document, sorted by code point."""
        with self._lock:
            now = self._now()
            return sorted(
                name
                for name, docs in self._collections.items()
                if any(record.is_live(now) for record in docs.values())
            )

    def delete_collection(self, collection: str) -> bool:
        """Delete every document of the collection; True if it held a live one."""
        check_name("collection", collection)
        with self._write():
            held_live = bool(self._live_rows(collection, self._now()))
            removed = self._collections.pop(collection, None)
            if removed is not None:
                self._undo.append(lambda: self._collections.__setitem__(collection, removed))
            return held_live

    def ensure_index(
        self,
        collection: str,
        paths: str | Sequence[str],
        *,
        unique: bool = False,
        order_by: OrderBy | None = None,
    ) -> None:
        """Record an index on one field path, or several in order; idempotent.

        With `unique`, raise DocumentExists if live documents already share its values.
        """
        check_name("collection", collection)
        if not isinstance(paths, str | list | tuple):
            raise InvalidQuery(f"paths must be a str or a list of str, not {paths!r}")
        index_paths: IndexPaths = tuple(parse_path(path) for path in iter_paths(paths))
        if not index_paths:
            raise InvalidQuery("an index needs at least one field path")
        if not isinstance(unique, bool):
            raise InvalidQuery(f"unique must be True or False, not {unique!r}")
        # Validated as PostgreSQL does; in memory an ordering needs no index.
        if parse_index_order(order_by) and unique:
            raise InvalidQuery("a unique index takes no order_by")
        with self._write():
            indexes = self._indexes.setdefault(collection, {})
            # A unique index once made stays unique, as its PostgreSQL index would.
            was_unique = indexes.get(index_paths)
            if was_unique is not None and (was_unique or not unique):
                return
            if unique:
                seen: dict[Hashable, str] = {}
                for doc_id, record in self._live_rows(collection, self._now()):
                    key = _index_key(record.data, index_paths)
                    if key is None:
                        continue
                    if key in seen:
                        raise DocumentExists(
                            f"{collection!r} documents {seen[key]!r} and {doc_id!r} share "
                            "the values of the unique index"
                        )
                    seen[key] = doc_id
            indexes[index_paths] = unique

            def undo() -> None:
                if was_unique is None:
                    del indexes[index_paths]
                else:
                    indexes[index_paths] = was_unique

            self._undo.append(undo)

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
        """Add a child with the parent's next `seq`, bumping the parent; None if it is missing."""
        check_name("collection", collection)
        check_flag("parent_data", parent_data)
        parent_collection, parent_id = check_parent(parent)
        child_id = str(uuid.uuid4()) if id is None else check_name("id", id)
        child_data = self._encode(data)
        ttl_seconds = check_ttl(ttl)
        parent_ttl_seconds = check_ttl(parent_ttl)
        with self._write():
            now = self._now()
            parent_record = self._live(parent_collection, parent_id, now)
            if parent_record is None:
                return None
            existing = self._live(collection, child_id, now)
            if existing is not None:
                return (
                    self._document(parent_collection, parent_id, parent_record, parent_data),
                    self._document(collection, child_id, existing),
                )
            seq = parent_record.last_seq + 1
            child_data = self._encode(child_data | {"parent": parent_id, "seq": seq})
            child = self._save(collection, child_id, child_data, ttl_seconds, now)
            bumped = dataclasses.replace(
                parent_record,
                updated_at=now,
                version=parent_record.version + 1,
                last_seq=seq,
                expires_at=(
                    parent_record.expires_at
                    if parent_ttl_seconds is None
                    else _expiry(now, parent_ttl_seconds)
                ),
            )
            self._put(parent_collection, parent_id, bumped)
            return self._document(parent_collection, parent_id, bumped, parent_data), child

    def pop_child(
        self,
        collection: str,
        filters: Filters,
        *,
        parent: tuple[str, str],
        parent_ttl: Ttl | None = None,
    ) -> tuple[Document, Document | None] | None:
        """Delete the live child with the highest `seq`, bumping the parent; None if it is gone."""
        removed = self._remove_children(collection, filters, parent, parent_ttl, newest_only=True)
        if removed is None:
            return None
        bumped, children = removed
        return bumped, (children[0] if children else None)

    def delete_children(
        self,
        collection: str,
        filters: Filters,
        *,
        parent: tuple[str, str],
        parent_ttl: Ttl | None = None,
    ) -> tuple[Document, int] | None:
        """Delete every live child matching `filters` and bump the parent; None if it is missing."""
        removed = self._remove_children(collection, filters, parent, parent_ttl, newest_only=False)
        if removed is None:
            return None
        bumped, children = removed
        return bumped, len(children)

    def _remove_children(
        self,
        collection: str,
        filters: Filters,
        parent: tuple[str, str],
        parent_ttl: Ttl | None,
        *,
        newest_only: bool,
    ) -> tuple[Document, list[Document]] | None:
        check_name("collection", collection)
        if not isinstance(filters, Mapping):
            raise InvalidQuery(f"filters must be a mapping, not {type(filters).__name__}")
        matches = _compile_filters(filters)
        parent_collection, parent_id = check_parent(parent)
        parent_ttl_seconds = check_ttl(parent_ttl)
        with self._write():
            now = self._now()
            parent_record = self._live(parent_collection, parent_id, now)
            if parent_record is None:
                return None
            children = [
                (doc_id, record)
                for doc_id, record in self._live_rows(collection, now)
                if _is_number(record.data.get("seq")) and matches(record.data)
            ]
            if newest_only:
                # Ties (children of several parents matched) fall to the highest id,
                # as on PostgreSQL.
                children = sorted(children, key=lambda row: (row[1].data["seq"], row[0]))[-1:]
            removed = [self._document(collection, doc_id, record) for doc_id, record in children]
            for doc_id, _ in children:
                self._put(collection, doc_id, None)
            bumped = dataclasses.replace(
                parent_record,
                updated_at=now,
                version=parent_record.version + 1,
                expires_at=(
                    parent_record.expires_at
                    if parent_ttl_seconds is None
                    else _expiry(now, parent_ttl_seconds)
                ),
            )
            self._put(parent_collection, parent_id, bumped)
            return self._document(parent_collection, parent_id, bumped), removed

    def rename(
        self, collection: str, id: str, new_id: str, *, expected_version: int | None = None
    ) -> Document | None:
        """Move a live document to `new_id` (version + 1); None when it is missing.

        Data, `created_at`, expiry and the append counter move with it. Raise
        DocumentExists when `new_id` (even `id` itself) names a live document.
        """
        check_name("collection", collection)
        check_name("id", id)
        check_name("new_id", new_id)
        _check_expected_version(expected_version)
        with self._write():
            now = self._now()
            record = self._live(collection, id, now)
            if record is None:
                return None
            _check_version(collection, id, record, expected_version)
            if self._live(collection, new_id, now) is not None:
                raise DocumentExists(f"{collection!r} already holds a document {new_id!r}")
            # The data is unchanged and leaves `id`, so no unique index can newly conflict.
            moved = dataclasses.replace(record, updated_at=now, version=record.version + 1)
            self._put(collection, id, None)
            self._put(collection, new_id, moved)
            return self._document(collection, new_id, moved)

    def delete_many(self, collection: str, filters: Filters) -> int:
        """Delete every matching live document; return how many."""
        check_name("collection", collection)
        if not isinstance(filters, Mapping):
            raise InvalidQuery(f"filters must be a mapping, not {type(filters).__name__}")
        matches = _compile_filters(filters)
        with self._write():
            doomed = [
                doc_id
                for doc_id, record in self._live_rows(collection, self._now())
                if matches(record.data)
            ]
            for doc_id in doomed:
                self._put(collection, doc_id, None)
            return len(doomed)

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Group the calls made in this thread inside the block into one transaction.

        A nested block acts as a savepoint, as on PostgreSQL: an exception
        leaving it undoes the calls made inside it and propagates; the outermost
        block commits, or on an exception undoes everything.
        """
        with self._lock:
            mark = len(self._undo)
            self._transaction_depth += 1
            try:
                yield
            except BaseException:
                self._undo_to(mark)
                raise
            finally:
                self._transaction_depth -= 1
                if self._transaction_depth == 0:
                    self._undo.clear()

    def purge_expired(self, collection: str | None = None, *, batch_size: int = 1000) -> int:
        """Delete expired documents in batches; return how many."""
        if collection is not None:
            check_name("collection", collection)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InvalidQuery(f"batch_size must be an int >= 1, not {batch_size!r}")
        purged = 0
        while True:
            # The lock is released between batches so other threads are not held up.
            with self._write():
                now = self._now()
                names = list(self._collections) if collection is None else [collection]
                expired = (
                    (name, doc_id)
                    for name in names
                    for doc_id, record in self._collections.get(name, {}).items()
                    if not record.is_live(now)
                )
                batch = list(itertools.islice(expired, batch_size))
                for name, doc_id in batch:
                    self._put(name, doc_id, None)
            purged += len(batch)
            if len(batch) < batch_size:
                return purged

    def dump(
        self,
        collection: str,
        filters: Filters | None = None,
        *,
        after: Document | None = None,
        limit: int = 1000,
        include_expired: bool = False,
    ) -> list[Dumped]:
        """Return a page of documents with their append counters, by (created_at, id)."""
        check_name("collection", collection)
        matches = _compile_filters(filters)
        check_paging(limit, 0)
        keys = parse_order_by("created_at")
        beyond = _keyset_filter(keys, after)
        with self._lock:
            now = self._now()
            rows = [
                row
                for row in self._collections.get(collection, {}).items()
                if (include_expired or row[1].is_live(now)) and matches(row[1].data) and beyond(row)
            ]
            rows.sort(key=lambda row: (row[1].created_at, row[0]))
            return [
                Dumped(self._document(collection, doc_id, record), record.last_seq)
                for doc_id, record in rows[:limit]
            ]

    def restore(self, document: Document, *, counter: int = 0) -> Document | None:
        """Write `document` exactly as given unless a live one holds its id (then return it)."""
        check_restorable(document, counter)
        data = self._encode(document.data)
        collection, doc_id = document.collection, document.id
        with self._write():
            now = self._now()
            existing = self._live(collection, doc_id, now)
            if existing is not None:
                return self._document(collection, doc_id, existing)
            self._check_unique(collection, doc_id, data, now)
            record = _Record(
                data,
                document.created_at.astimezone(timezone.utc),
                document.updated_at.astimezone(timezone.utc),
                document.version,
                None
                if document.expires_at is None
                else document.expires_at.astimezone(timezone.utc),
                counter,
            )
            self._put(collection, doc_id, record)
            return None

    def pop_expired(self, collection: str, *, limit: int = 1000) -> list[Document]:
        """Delete up to `limit` expired documents of the collection and return them."""
        check_name("collection", collection)
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise InvalidQuery(f"limit must be an int >= 1, not {limit!r}")
        with self._write():
            now = self._now()
            expired = (
                (doc_id, record)
                for doc_id, record in self._collections.get(collection, {}).items()
                if not record.is_live(now)
            )
            batch = list(itertools.islice(expired, limit))
            for doc_id, _ in batch:
                self._put(collection, doc_id, None)
        return [self._document(collection, doc_id, record) for doc_id, record in batch]

    def close(self) -> None:
        """Do nothing: the store holds no connections and keeps working after this."""
