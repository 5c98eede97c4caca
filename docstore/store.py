"""The `DocumentStore` contract and the input validation every store shares."""

from __future__ import annotations

import json
import json.scanner
import math
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from datetime import datetime, timedelta
from types import TracebackType
from typing import Any, NamedTuple, cast

import orjson

from .document import Document
from .errors import InvalidDocument, InvalidQuery

__all__ = [
    "DocumentStore",
    "Dumped",
    "Filters",
    "OrderBy",
    "Ttl",
    "DEFAULT_MAX_DOCUMENT_BYTES",
    "MAX_NAME_LENGTH",
    "check_name",
    "check_parent",
    "check_ttl",
    "encode_data",
    "decode_json",
    "encode_json",
    "exact_numbers",
]

DEFAULT_MAX_DOCUMENT_BYTES = 1_048_576
MAX_NAME_LENGTH = 255
_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1

Filters = Mapping[str, Any]
OrderBy = str | Sequence[str]
Ttl = int | float | timedelta


def check_name(kind: str, value: object) -> str:
    """Return `value` if it is a usable collection name or id, else raise InvalidDocument."""
    if not isinstance(value, str):
        raise InvalidDocument(f"{kind} must be a str, not {type(value).__name__}")
    if not value:
        raise InvalidDocument(f"{kind} must not be empty")
    if len(value) > MAX_NAME_LENGTH:
        raise InvalidDocument(f"{kind} is longer than {MAX_NAME_LENGTH} characters")
    if "\x00" in value:
        raise InvalidDocument(f"{kind} must not contain NUL characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidDocument(f"{kind} is not valid Unicode") from exc
    return value


def check_parent(parent: object) -> tuple[str, str]:
    """Return an `append`-style `parent` as a checked (collection, id) pair."""
    if not isinstance(parent, tuple | list) or len(parent) != 2:
        raise InvalidDocument(f"parent must be a (collection, id) pair, not {parent!r}")
    return check_name("parent collection", parent[0]), check_name("parent id", parent[1])


def check_flag(name: str, value: object) -> bool:
    """Return `value` if it is True or False, or raise InvalidDocument."""
    if not isinstance(value, bool):
        raise InvalidDocument(f"{name} must be True or False, not {value!r}")
    return value


def check_ttl(ttl: object) -> float | None:
    """Return the ttl in seconds (None for no expiry), or raise InvalidDocument."""
    if ttl is None:
        return None
    if isinstance(ttl, timedelta):
        seconds = ttl.total_seconds()
    elif isinstance(ttl, int | float) and not isinstance(ttl, bool):
        seconds = float(ttl)
    else:
        raise InvalidDocument(f"ttl must be a number of seconds or a timedelta, not {ttl!r}")
    if not math.isfinite(seconds) or seconds <= 0:
        raise InvalidDocument(f"ttl must be positive and finite, not {ttl!r}")
    return seconds


def _check_value(value: object, where: str, depth: int = 0) -> None:
    # An explicit walk instead of json.dumps' own checks: it names the offending
    # place, and it refuses what json.dumps would silently accept (huge ints, NUL).
    if depth > 500:
        raise InvalidDocument(f"{where}: nested too deeply")
    if value is None or isinstance(value, bool):
        return
    if isinstance(value, str):
        if "\x00" in value:
            raise InvalidDocument(f"{where}: strings must not contain NUL characters")
        return
    if isinstance(value, int):
        if not _INT64_MIN <= value <= _INT64_MAX:
            raise InvalidDocument(f"{where}: integer outside the signed 64-bit range")
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidDocument(f"{where}: NaN and infinite floats are not JSON")
        return
    if isinstance(value, list | tuple):
        for index, item in enumerate(value):
            _check_value(item, f"{where}[{index}]", depth + 1)
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise InvalidDocument(f"{where}: keys must be str, not {type(key).__name__}")
            if "\x00" in key:
                raise InvalidDocument(f"{where}: keys must not contain NUL characters")
            _check_value(item, f"{where}.{key}", depth + 1)
        return
    raise InvalidDocument(f"{where}: {type(value).__name__} is not a JSON value")


def _plainly_valid(value: Any, depth: int = 0) -> bool:
    # The common case, fast: exact built-in types, no place names built. False
    # means "not plainly valid" (an error, or a subclass), and `_check_value`,
    # which names the offending place, decides.
    kind = type(value)
    if kind is str:
        return "\x00" not in value
    if kind is int:
        return bool(_INT64_MIN <= value <= _INT64_MAX)
    if kind is float:
        return math.isfinite(value)
    if kind is dict:
        if depth >= 500:
            return False
        for key, item in value.items():
            if type(key) is not str or "\x00" in key or not _plainly_valid(item, depth + 1):
                return False
        return True
    if kind is list or kind is tuple:
        if depth >= 500:
            return False
        for item in value:  # a loop, not all(): a generator frame per level halves the depth
            if not _plainly_valid(item, depth + 1):
                return False
        return True
    return value is None or kind is bool


def check_json_value(value: object, where: str) -> None:
    """Raise InvalidDocument unless `value` is storable JSON (used for query operands too)."""
    if not _plainly_valid(value):
        _check_value(value, where)


# The standard library's encoder, for what orjson refuses: nesting deeper than
# its 254 levels (the contract allows 500) and lone surrogates (then refused).
_encode_json_slowly = json.JSONEncoder(
    ensure_ascii=False, separators=(",", ":"), allow_nan=False
).encode


def _json_bytes(value: object) -> bytes:
    try:
        return orjson.dumps(value)
    except orjson.JSONEncodeError:
        text = _encode_json_slowly(value)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidDocument(f"data holds a string that is not valid Unicode: {exc}") from exc


def encode_json(value: object) -> str:
    """Return the compact JSON text of a value already known to hold JSON values only.

    orjson writes a ~1 KB document in about a tenth of the time of the standard
    library's encoder. It is no validator (it writes NaN as null and accepts
    UUIDs, dataclasses and unsigned 64-bit ints), so every caller passes data
    that `check_json_value` accepted or that a store decoded.
    """
    return _json_bytes(value).decode()


# Python writes floats from 1e16 up in exponent form ('1.152921504606847e+18').
# PostgreSQL keeps that shortest decimal exactly and hands it back as the
# integer 1152921504606847000, which is not equal to the float 2.0**60; below
# 2**63 it would then decode as that wrong int. Written as the exact integer the
# float holds, it comes back equal. (Past 2**63 it decodes as a float, equal.)
_EXACT_FLOAT_MIN = 1e16
_EXACT_FLOAT_LIMIT = float(2**63)


def exact_numbers(value: Any) -> Any:
    """Return `value` with integral floats in [1e16, 2**63) written as the ints they equal."""
    if isinstance(value, float):
        if _EXACT_FLOAT_MIN <= abs(value) < _EXACT_FLOAT_LIMIT:
            return int(value)  # every float this large is integral
        return value
    if isinstance(value, dict):
        return {key: exact_numbers(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [exact_numbers(item) for item in value]
    return value


def encode_data(data: object, max_bytes: int, *, reserve: int = 0) -> str:
    """Validate document data and return its compact JSON text.

    `reserve` counts bytes the store will add to the document itself (the
    `parent` and `seq` of an appended child) against `max_bytes`.
    """
    if not isinstance(data, dict):
        raise InvalidDocument(f"data must be a dict, not {type(data).__name__}")
    check_json_value(data, "data")
    encoded = _json_bytes(data)
    if b"e+1" in encoded:  # rare: only then look for floats to write exactly
        encoded = _json_bytes(exact_numbers(data))
    size = len(encoded)
    text = encoded.decode()
    if size + reserve > max_bytes:
        raise InvalidDocument(
            f"document is {size + reserve} bytes, more than the limit of {max_bytes}"
        )
    return text


def _parse_int(text: str) -> int | float:
    # Numbers beyond 64 bits come back as floats, from every store alike. Fewer
    # than 19 characters (sign included) always fit, and skip the range check.
    if len(text) < 19:
        return int(text)
    number = int(text)
    if _INT64_MIN <= number <= _INT64_MAX:
        return number
    return float(number)


_EXACT_DECODER = json.JSONDecoder(parse_int=_parse_int)
# json's C scanner alone: `json.loads` wraps it in three Python calls and two
# whitespace matches, a third of the cost of decoding a small document (and a
# query decodes a hundred). It calls `_parse_int` for each integer (about 0.1 us
# each); finding the integers that need it with a regex instead cost 9 us per
# kilobyte of text, more than the parse itself. The text the stores decode has
# no surrounding whitespace; anything else falls back to the full decoder,
# which decides. (typeshed types make_scanner's argument as the scanner class.)
_SCAN_JSON = json.scanner.make_scanner(cast(Any, _EXACT_DECODER))


# bytes.translate table: every digit becomes "9", anything else a space, so that
# a run of 19 digits (the shortest an integer beyond int64 can be) is one `in`.
_DIGIT_RUNS = bytes(57 if 48 <= i <= 57 else 32 for i in range(256))
_INT64_DIGITS = b"9" * 19


def decode_json(text: str) -> Any:
    """Decode JSON as every store returns it (ints beyond 64 bits become floats)."""
    # orjson decodes a document in 40% of the time of json's scanner, but reads
    # integers from 2**63 to 2**64 as ints: it only gets text that has no run of
    # 19 digits, which no such integer can hide from (finding none costs a
    # fifth of what orjson saves). What it refuses (NaN, a lone surrogate,
    # nesting past 1024) goes to json, which decides and words any error.
    try:
        plain = _INT64_DIGITS not in text.encode().translate(_DIGIT_RUNS)
    except UnicodeEncodeError:  # a lone surrogate
        plain = False
    if plain:
        try:
            return orjson.loads(text)
        except orjson.JSONDecodeError:
            pass
    try:
        value, end = _SCAN_JSON(text, 0)
    except StopIteration:
        return json.loads(text, parse_int=_parse_int)  # raises what json.loads would
    if end != len(text):
        return json.loads(text, parse_int=_parse_int)
    return value


class Dumped(NamedTuple):
    """A document as `dump()` reads it: with its append counter (the last `seq` given out)."""

    document: Document
    counter: int


def check_restorable(document: object, counter: object) -> Document:
    """Return `document` if `restore()` can write it as it is, else raise InvalidDocument."""
    if not isinstance(document, Document):
        raise InvalidDocument(f"restore needs a Document, not {type(document).__name__}")
    check_name("collection", document.collection)
    check_name("id", document.id)
    for name in ("created_at", "updated_at", "expires_at"):
        moment = getattr(document, name)
        if moment is None and name == "expires_at":
            continue
        if not isinstance(moment, datetime) or moment.utcoffset() is None:
            raise InvalidDocument(f"{name} must be a timezone-aware datetime, not {moment!r}")
    for name, value, low in (("version", document.version, 1), ("counter", counter, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= _INT64_MAX:
            raise InvalidDocument(f"{name} must be an int >= {low}, not {value!r}")
    return document


class DocumentStore(ABC):
    """A JSON document store: every implementation behaves the same (see docs/api.md)."""

    @abstractmethod
    def create(
        self,
        collection: str,
        data: dict[str, Any],
        *,
        id: str | None = None,
        ttl: Ttl | None = None,
    ) -> Document:
        """Create a document; raise DocumentExists when the id is taken by a live one."""

    @abstractmethod
    def read(self, collection: str, id: str) -> Document | None:
        """Return the live document, or None."""

    @abstractmethod
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

    @abstractmethod
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

    @abstractmethod
    def upsert(
        self, collection: str, id: str, data: dict[str, Any], *, ttl: Ttl | None = None
    ) -> Document:
        """Create the document, or shallow-merge into it, in one atomic step."""

    @abstractmethod
    def delete(self, collection: str, id: str, *, expected_version: int | None = None) -> bool:
        """Delete the document; True if a live one was deleted."""

    @abstractmethod
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
        """Return the live documents matching `filters`, in a deterministic order.

        `after` (keyset paging) is the last document of the previous page: the
        page starts strictly after it. It needs an order_by on created_at,
        updated_at and/or id only.
        """

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
        """Read a live document and, with it, the live documents of `related` it links to.

        `link` is (a path in the related documents, a path in the read one):
        the related documents returned are those matching `filters` whose value
        at the first path equals the read document's value at the second (a
        missing or null value links to none), ordered and limited as `query`
        orders and limits them. (None, []) when the document is missing or
        expired. PostgreSQL answers in one statement (one snapshot, one round
        trip); this default reads, then queries.
        """
        from .query import linked_filters, parse_link  # query.py imports this module

        related_path, own_path = parse_link(link, filters)
        document = self.read(collection, id)
        if document is None:
            return None, []
        linked = linked_filters(filters, related_path, own_path, document.data)
        if linked is None:
            return document, []
        return document, self.query(related, linked, limit=limit, order_by=order_by)

    @abstractmethod
    def count(self, collection: str, filters: Filters | None = None) -> int:
        """Count the live documents matching `filters`."""

    @abstractmethod
    def list_collections(self) -> list[str]:
        """Return the names of collections holding a live document, sorted by code point."""

    @abstractmethod
    def delete_collection(self, collection: str) -> bool:
        """Delete every document of the collection; True if it held a live one."""

    @abstractmethod
    def ensure_index(
        self,
        collection: str,
        paths: str | Sequence[str],
        *,
        unique: bool = False,
        order_by: OrderBy | None = None,
    ) -> None:
        """Index one field path, or several in order; idempotent.

        `order_by` (metadata columns only, as in `query`: "-updated_at", "id",
        ...) appends those columns after the paths, so that a query filtering
        on the paths with that order_by reads the index in order and stops at
        its limit. Not with `unique`.
        """

    @abstractmethod
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
        """Add a child with the parent's next `seq`, bumping the parent; None if it is missing.

        `parent_ttl`, when given, also sets the parent's expiry to now + parent_ttl
        in the same step (sliding expiry of a conversation's owner).
        `parent_data=False` returns the parent without its data (`data` is {}),
        for a caller that needs only its version and timestamps: PostgreSQL
        then neither renders nor sends the parent's document.
        """

    @abstractmethod
    def pop_child(
        self,
        collection: str,
        filters: Filters,
        *,
        parent: tuple[str, str],
        parent_ttl: Ttl | None = None,
    ) -> tuple[Document, Document | None] | None:
        """Delete the live child with the highest `seq` and bump the parent, in one atomic step.

        The children are the live documents of `collection` matching `filters`
        that have a `seq` (what `append` gives them). Returns `(parent, the
        deleted child)`, the child None when none matched (the parent is bumped
        all the same); None, with nothing changed, when the parent is missing.
        Concurrent calls never return the same child, and a child appended
        before the call began is seen by it. The parent's append counter is
        kept: the next `append` continues after the highest `seq` ever given.
        """

    @abstractmethod
    def delete_children(
        self,
        collection: str,
        filters: Filters,
        *,
        parent: tuple[str, str],
        parent_ttl: Ttl | None = None,
    ) -> tuple[Document, int] | None:
        """Delete every live child matching `filters` and bump the parent, in one atomic step.

        Returns `(parent, how many were deleted)`; None, with nothing changed,
        when the parent is missing. The parent's append counter is kept.
        """

    @abstractmethod
    def rename(
        self, collection: str, id: str, new_id: str, *, expected_version: int | None = None
    ) -> Document | None:
        """Move a live document to `new_id` atomically (version + 1, data, expiry and
        append counter kept); None when it is missing, DocumentExists if `new_id` is live."""

    @abstractmethod
    def delete_many(self, collection: str, filters: Filters) -> int:
        """Delete every matching document; return how many."""

    @abstractmethod
    def transaction(self) -> AbstractContextManager[None]:
        """Group the calls made in this thread inside the block into one transaction."""

    @abstractmethod
    def purge_expired(self, collection: str | None = None, *, batch_size: int = 1000) -> int:
        """Delete expired documents in batches; return how many."""

    @abstractmethod
    def pop_expired(self, collection: str, *, limit: int = 1000) -> list[Document]:
        """Delete up to `limit` expired documents of the collection and return them.

        For cleanups that must follow the documents (the messages of expired
        sessions): run it with the cleanup inside `transaction()`, so that both
        happen or neither. Order unspecified; [] once nothing has expired.
        """

    @abstractmethod
    def close(self) -> None:
        """Release connections."""

    # -- export and import: not abstract, so that other implementations keep working

    def dump(
        self,
        collection: str,
        filters: Filters | None = None,
        *,
        after: Document | None = None,
        limit: int = 1000,
        include_expired: bool = False,
    ) -> list[Dumped]:
        """Return a page of documents with their append counters, by (created_at, id).

        `after` is the last document of the previous page (keyset paging: the
        cost of a page does not grow with how far the walk has gone). Expired
        documents are included only with `include_expired`.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot dump documents")

    def restore(self, document: Document, *, counter: int = 0) -> Document | None:
        """Write `document` exactly as given (id, data, timestamps, version, expiry).

        `counter` is its append counter (see `dump`). When a live document
        already holds the id, nothing changes and that document is returned;
        otherwise (missing or expired) the document is written and None is
        returned. A unique index's conflict raises DocumentExists.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot restore documents")

    def restore_many(self, documents: Sequence[Document]) -> list[str]:
        """Restore several documents of one collection (append counters 0) in one step.

        Return the ids a live document already held: those were left unchanged.
        Atomic on PostgreSQL (one statement); use it in `transaction()` to
        undo the others when any id was held.
        """
        held = []
        for document in documents:
            if self.restore(document) is not None:
                held.append(document.id)
        return held

    def __enter__(self) -> DocumentStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def iter_paths(paths: object) -> Iterator[str]:
    """Yield the field paths of an `ensure_index` argument (validated by the caller)."""
    if isinstance(paths, str):
        yield paths
    elif isinstance(paths, list | tuple):
        yield from paths
    else:
        raise InvalidQuery(f"paths must be a field path or a list of them, not {paths!r}")
