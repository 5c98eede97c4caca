"""The behaviour every `DocumentStore` shares, written once.

A backend's test class inherits `DocumentStoreContract` and provides a
`make_store(**kwargs)` fixture: a factory that returns a new, empty store built
with those keyword arguments (only `max_document_bytes` is used here) and
cleans up after the test. Everything else comes from the mixin, so the memory
store, the embedded server and a real PostgreSQL server run the same tests
(the pattern of Django's `SessionTestsMixin`).

Every test works in fresh, uniquely named collections; the semantics checked
here are those of `API.md` and `docs/docstore.md`.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import json
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures import wait as futures_wait
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest

from docstore import (
    DocstoreError,
    Document,
    DocumentExists,
    DocumentStore,
    InvalidDocument,
    InvalidQuery,
    StoreUnavailable,
    VersionConflict,
)

__all__ = ["DocumentStoreContract", "unique_name", "wait_until", "wait_until_expired"]

THREADS = 8
SHORT_TTL = 0.2
# The store's clock (PostgreSQL's now()) may differ a little from ours.
CLOCK_TOLERANCE = timedelta(minutes=5)


# --------------------------------------------------------------------------- helpers


def unique_name(prefix: str = "c") -> str:
    """Return a collection name no other test uses."""
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


def wait_until(predicate: Callable[[], Any], *, timeout: float = 10.0, what: str = "it") -> Any:
    """Poll `predicate` until it returns something true; fail the test after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            pytest.fail(f"gave up after {timeout} s waiting for {what}")
        time.sleep(0.02)


def wait_until_expired(store: DocumentStore, *docs: Document) -> None:
    """Wait until the store's own clock is past every doc's `expires_at`.

    The documents themselves are not touched (a store may clean up expired
    documents lazily when it meets them, which would skew `purge_expired`'s
    count): the store's clock is read from the `updated_at` of a probe document.
    """
    moments = [doc.expires_at for doc in docs]
    assert all(moment is not None for moment in moments)
    last = max(moment for moment in moments if moment is not None)
    probe = unique_name("probe")
    wait_until(
        lambda: store.upsert(probe, "clock", {}).updated_at > last,
        what="the store's clock to pass expires_at",
    )
    assert store.delete(probe, "clock")


def ids(docs: Iterable[Document]) -> list[str]:
    return [doc.id for doc in docs]


def id_list(text: str) -> list[str]:
    return text.split()


def run_in_threads(count: int, work: Callable[[int], Any]) -> list[Any]:
    """Run `work(i)` for i in range(count) in `count` threads started together."""
    barrier = threading.Barrier(count)

    def start(index: int) -> Any:
        barrier.wait(timeout=30)
        return work(index)

    with ThreadPoolExecutor(max_workers=count) as pool:
        futures = [pool.submit(start, index) for index in range(count)]
        return [future.result(timeout=120) for future in futures]


def assert_utc(moment: object) -> None:
    assert isinstance(moment, datetime)
    assert moment.tzinfo is not None
    assert moment.utcoffset() == timedelta(0)


def expect_errors(
    cases: Iterable[tuple[str, Callable[[], object]]],
    error: type[BaseException] | tuple[type[BaseException], ...],
) -> None:
    """Call every case; fail listing each one that did not raise `error`."""
    problems = []
    for label, call in cases:
        try:
            call()
        except error:
            continue
        except Exception as exc:  # reported below, with every other wrong answer
            problems.append(f"{label}: raised {type(exc).__name__}: {exc}")
        else:
            problems.append(f"{label}: accepted")
    assert not problems, "\n".join(problems)


def roundtripped(data: object) -> Any:
    return json.loads(json.dumps(data))


# --------------------------------------------------------------------------- bad input


class _Colour(enum.Enum):
    RED = 1


@dataclasses.dataclass
class _Point:
    x: int
    y: int


class _Label(str):
    pass


class _Level(enum.IntEnum):
    HIGH = 3


def _nested(depth: int) -> object:
    value: object = "bottom"
    for _ in range(depth):
        value = [value]
    return value


BAD_DATA: list[tuple[str, object]] = [
    ("list instead of dict", [("a", 1)]),
    ("str instead of dict", "text"),
    ("None instead of dict", None),
    ("int key", {1: "a"}),
    ("nested None key", {"a": {None: 1}}),
    ("tuple key", {("a",): 1}),
    ("set value", {"a": {1, 2}}),
    ("bytes value", {"a": b"bytes"}),
    ("object value", {"a": object()}),
    ("Decimal value", {"a": Decimal("1.5")}),
    ("datetime value", {"a": datetime(2024, 1, 1, tzinfo=timezone.utc)}),
    ("set nested in list", {"a": [1, {"b": {3}}]}),
    ("NaN", {"a": float("nan")}),
    ("inf", {"a": float("inf")}),
    ("-inf nested", {"a": [float("-inf")]}),
    ("int 2**63", {"a": 2**63}),
    ("int -2**63-1", {"a": -(2**63) - 1}),
    ("nested int 2**64", {"a": {"b": [2**64]}}),
    ("NUL in value", {"a": "x\x00y"}),
    ("NUL in key", {"a\x00b": 1}),
    ("NUL nested", {"a": ["ok", {"k": "\x00"}]}),
    # Values a fast JSON encoder writes without complaint, which are still not JSON.
    ("UUID value", {"a": uuid.UUID(int=1)}),
    ("date value", {"a": date(2024, 1, 1)}),
    ("Enum value", {"a": _Colour.RED}),
    ("dataclass value", {"a": _Point(1, 2)}),
    ("unsigned 64-bit int", {"a": [2**64 - 1]}),
    ("nested too deeply", {"a": _nested(600)}),
]

BAD_NAMES: list[tuple[str, object]] = [
    ("empty", ""),
    ("256 characters", "n" * 256),
    ("NUL", "a\x00b"),
    ("int", 1),
    ("bytes", b"name"),
]

BAD_TTLS: list[tuple[str, object]] = [
    ("0", 0),
    ("0.0", 0.0),
    ("-1", -1),
    ("-0.5", -0.5),
    ("'5'", "5"),
    ("True", True),
    ("False", False),
    ("nan", float("nan")),
    ("inf", float("inf")),
    ("timedelta(0)", timedelta(0)),
    ("negative timedelta", timedelta(seconds=-1)),
    ("list", [5]),
]

BAD_VERSIONS: list[tuple[str, object]] = [
    ("'1'", "1"),
    ("1.0", 1.0),
    ("True", True),
    ("[1]", [1]),
]

BAD_FILTERS: list[tuple[str, object]] = [
    ("list", [("a", 1)]),
    ("str", "a=1"),
    ("unknown operator", {"a": {"$foo": 1}}),
    ("$where", {"a": {"$where": "1=1"}}),
    ("operator mixed with a field", {"a": {"$gt": 1, "b": 2}}),
    ("$in scalar", {"a": {"$in": 1}}),
    ("$in str", {"a": {"$in": "ab"}}),
    ("$nin None", {"a": {"$nin": None}}),
    ("$exists 1", {"a": {"$exists": 1}}),
    ("$exists str", {"a": {"$exists": "yes"}}),
    ("$gt bool", {"a": {"$gt": True}}),
    ("$lt None", {"a": {"$lt": None}}),
    ("$gte list", {"a": {"$gte": [1]}}),
    ("$lte object", {"a": {"$lte": {"x": 1}}}),
    ("$regex int", {"a": {"$regex": 1}}),
    ("$regex invalid", {"a": {"$regex": "("}}),
    ("empty path", {"": 1}),
    ("empty segment", {"a..b": 1}),
    ("leading dot", {".a": 1}),
    ("trailing dot", {"a.": 1}),
    ("int path", {1: 1}),
    ("set operand", {"a": {1, 2}}),
    ("NaN operand", {"a": float("nan")}),
    ("bytes operand", {"a": {"$eq": b"x"}}),
    ("object in $in", {"a": {"$in": [object()]}}),
    ("int beyond 64 bits", {"a": 2**64}),
    ("NUL operand", {"a": "x\x00"}),
]

BAD_ORDER_BY: list[tuple[str, object]] = [
    ("int", 1),
    ("list of int", [1]),
    ("empty", ""),
    ("only a minus", "-"),
    ("empty segment", "a..b"),
    ("dict", {"a": 1}),
    ("None in list", ["a", None]),
]

BAD_LIMITS: list[tuple[str, object]] = [("-1", -1), ("'1'", "1"), ("1.5", 1.5), ("True", True)]
BAD_OFFSETS: list[tuple[str, object]] = [
    ("-1", -1),
    ("None", None),
    ("'0'", "0"),
    ("1.0", 1.0),
    ("False", False),
]

HOSTILE_NAMES = [
    "it's",
    'say "hi"',
    "'; DROP TABLE documents; --",
    "Robert'); DROP TABLE t; --",
    "%s",
    "%(name)s",
    "%%",
    "{0}",
    "back\\slash",
    "a.b.c",
    "$where",
    " spaces around ",
    "tab\tnew\nline",
    "ünïcødé-名前-🚀",
    "\u202eright-to-left",
    "/* comment */",
    "?",
    ":name",
    "--",
    "\\x00",
    "\u2028",
]

HOSTILE_KEYS = [
    "it's",
    'q"uote',
    "%s",
    "%(x)s",
    "; DROP TABLE x; --",
    "ключ",
    "🚀",
    "$dollar",
    " ",
    "back\\slash",
]

# --------------------------------------------------------------------------- query data

PEOPLE: dict[str, dict[str, Any]] = {
    "d1": {
        "name": "alice",
        "age": 30,
        "tags": ["x", "y"],
        "profile": {"city": "Oslo", "langs": ["no", "en"]},
        "active": True,
        "nick": None,
        "points": [10, 20, 30],
    },
    "d2": {
        "name": "bob",
        "age": 25,
        "tags": ["y"],
        "profile": {"city": "Bergen"},
        "active": False,
        "points": [5],
    },
    "d3": {
        "name": "carol",
        "age": "30",
        "tags": [],
        "profile": {"city": "Oslo", "zip": "0150"},
        "active": 1,
    },
    "d4": {"name": "Dave", "age": 40.5, "tags": ["x", ["z"]], "nick": "dd", "points": []},
    "d5": {"name": "émile", "age": None, "tags": "x", "profile": "Oslo"},
    "d6": {"name": "ÿvonne", "age": 30.0, "tags": [{"k": 1, "v": 2}], "active": True},
}
EVERYONE = "d1 d2 d3 d4 d5 d6"

EQUALITY_CASES: list[tuple[object, str]] = [
    (None, EVERYONE),
    ({}, EVERYONE),
    ({"name": "alice"}, "d1"),
    ({"age": 30}, "d1 d6"),
    ({"age": 30.0}, "d1 d6"),
    ({"age": "30"}, "d3"),
    ({"active": True}, "d1 d6"),
    ({"active": 1}, "d3"),
    ({"active": False}, "d2"),
    ({"active": 0}, ""),
    ({"nick": None}, "d1"),
    ({"age": None}, "d5"),
    ({"tags": ["x", "y"]}, "d1"),
    ({"tags": ("x", "y")}, "d1"),
    ({"tags": ["y", "x"]}, ""),
    ({"tags": "x"}, "d5"),
    ({"tags": "y"}, ""),
    ({"tags": []}, "d3"),
    ({"profile": {"city": "Bergen"}}, "d2"),
    ({"profile": {"city": "Oslo"}}, ""),
    ({"profile.city": "Oslo"}, "d1 d3"),
    ({"profile.langs": ["no", "en"]}, "d1"),
    ({"missing": 1}, ""),
    ({"points.0": 10}, "d1"),
    ({"points.1": 20}, "d1"),
    ({"points.-1": 30}, "d1"),
    ({"points.-1": 5}, "d2"),
    ({"points.5": 10}, ""),
    ({"profile.langs.1": "en"}, "d1"),
    ({"name.0": "a"}, ""),
    ({"name": {"$eq": "bob"}}, "d2"),
    ({"profile.city": "Oslo", "active": True}, "d1"),
    ({"name": "'; DROP TABLE documents; --"}, ""),
    ({"name": "%s"}, ""),
]

NE_IN_CASES: list[tuple[object, str]] = [
    ({"name": {"$ne": "alice"}}, "d2 d3 d4 d5 d6"),
    ({"nick": {"$ne": None}}, "d2 d3 d4 d5 d6"),
    ({"profile.city": {"$ne": "Oslo"}}, "d2 d4 d5 d6"),
    ({"age": {"$ne": 30}}, "d2 d3 d4 d5"),
    ({"tags": {"$ne": "x"}}, "d1 d2 d3 d4 d6"),
    ({"name": {"$in": ["alice", "bob", "zed"]}}, "d1 d2"),
    ({"name": {"$in": ("alice",)}}, "d1"),
    ({"age": {"$in": [30, "30"]}}, "d1 d3 d6"),
    ({"age": {"$in": []}}, ""),
    ({"age": {"$in": [None]}}, "d5"),
    ({"tags": {"$in": ["x"]}}, "d5"),
    ({"tags": {"$in": [["y"], []]}}, "d2 d3"),
    ({"active": {"$in": [1]}}, "d3"),
    ({"nick": {"$nin": ["dd"]}}, "d1 d2 d3 d5 d6"),
    ({"nick": {"$nin": []}}, EVERYONE),
    ({"age": {"$nin": [30, None]}}, "d2 d3 d4"),
]

RANGE_CASES: list[tuple[object, str]] = [
    ({"age": {"$gt": 29}}, "d1 d4 d6"),
    ({"age": {"$gt": 30}}, "d4"),
    ({"age": {"$gte": 30}}, "d1 d4 d6"),
    ({"age": {"$lt": 30}}, "d2"),
    ({"age": {"$lte": 30}}, "d1 d2 d6"),
    ({"age": {"$lt": 30.5}}, "d1 d2 d6"),
    ({"age": {"$gte": 25, "$lt": 31}}, "d1 d2 d6"),
    ({"age": {"$gt": "2"}}, "d3"),
    ({"age": {"$lt": "4"}}, "d3"),
    ({"active": {"$gte": 0}}, "d3"),
    ({"points.0": {"$gte": 5}}, "d1 d2"),
    ({"name": {"$gte": "bob", "$lt": "d"}}, "d2 d3"),
    # By code point: upper case before lower case, accented letters after "z".
    ({"name": {"$lt": "a"}}, "d4"),
    ({"name": {"$gt": "z"}}, "d5 d6"),
    ({"name": {"$gt": "a"}}, "d1 d2 d3 d5 d6"),
]

EXISTS_CASES: list[tuple[object, str]] = [
    ({"nick": {"$exists": True}}, "d1 d4"),
    ({"nick": {"$exists": False}}, "d2 d3 d5 d6"),
    ({"profile.zip": {"$exists": True}}, "d3"),
    ({"profile.city": {"$exists": False}}, "d4 d5 d6"),
    ({"points.2": {"$exists": True}}, "d1"),
    ({"points.0": {"$exists": False}}, "d3 d4 d5 d6"),
    ({"age": {"$exists": True}}, EVERYONE),
    ({"nick": {"$exists": False}, "active": True}, "d6"),
]

CONTAINS_CASES: list[tuple[object, str]] = [
    ({"tags": {"$contains": "x"}}, "d1 d4 d5"),
    ({"tags": {"$contains": ["x", "y"]}}, "d1"),
    ({"tags": {"$contains": ["x"]}}, "d1 d4"),
    ({"tags": {"$contains": []}}, "d1 d2 d3 d4 d6"),
    ({"tags": {"$contains": [["z"]]}}, "d4"),
    ({"tags": {"$contains": "z"}}, ""),
    ({"tags": {"$contains": ["z"]}}, ""),
    ({"tags": {"$contains": [{"k": 1}]}}, "d6"),
    ({"tags": {"$contains": {"k": 1}}}, ""),
    ({"profile": {"$contains": {"city": "Oslo"}}}, "d1 d3"),
    ({"profile": {"$contains": {"langs": ["en"]}}}, "d1"),
    ({"profile": {"$contains": {"langs": "en"}}}, ""),
    ({"profile": {"$contains": {}}}, "d1 d2 d3"),
    ({"age": {"$contains": 30}}, "d1 d6"),
    ({"profile.city": {"$contains": "Oslo"}}, "d1 d3"),
    ({"points": {"$contains": [30, 10]}}, "d1"),
    ({"age": {"$gt": 20}, "tags": {"$contains": "y"}}, "d1 d2"),
]

REGEX_CASES: list[tuple[object, str]] = [
    ({"name": {"$regex": "^[a-c]"}}, "d1 d2 d3"),
    ({"name": {"$regex": "^d"}}, ""),
    ({"name": {"$regex": "^D"}}, "d4"),
    ({"name": {"$regex": "mile$"}}, "d5"),
    ({"name": {"$regex": "o"}}, "d2 d3 d6"),
    ({"name": {"$regex": "^.vonne$"}}, "d6"),
    ({"age": {"$regex": "30"}}, "d3"),
    ({"profile.city": {"$regex": "^O"}}, "d1 d3"),
    ({"tags": {"$regex": "x"}}, "d5"),
    ({"name": {"$regex": "%s|'"}}, ""),
]

# Values of one field in ascending jsonb order (see docs/docstore.md, Ordering).
MIXED_ORDER: list[tuple[str, object]] = [
    ("v00", []),
    ("v01", None),
    ("v02", "s"),
    ("v03", -3),
    ("v04", 0),
    ("v05", 1.5),
    ("v06", 2),
    ("v07", 10),
    ("v08", 2**62),
    ("v09", False),
    ("v10", True),
    ("v11", [1]),
    ("v12", [0, 0]),
    ("v13", {}),
    ("v14", {"a": 1}),
]
STRINGS_BY_CODE_POINT = ["", "B", "Z", "a", "aa", "b", "z", "ä", "é", "ﬁ", "🚀"]


class DocumentStoreContract:
    """The contract suite: mix into a test class that provides `make_store`."""

    @pytest.fixture
    def make_store(self) -> Callable[..., DocumentStore]:
        raise NotImplementedError("the backend's test class provides make_store(**kwargs)")

    @pytest.fixture
    def store(self, make_store: Callable[..., DocumentStore]) -> DocumentStore:
        return make_store()

    @pytest.fixture
    def coll(self) -> str:
        return unique_name("c")

    @pytest.fixture
    def other(self) -> str:
        return unique_name("o")

    @pytest.fixture
    def code_point_strings(self) -> bool:
        """Whether `order_by` sorts strings by code point (PostgreSQL: a C collation)."""
        return True

    @pytest.fixture
    def people(self, store: DocumentStore, coll: str) -> str:
        for doc_id, data in PEOPLE.items():
            store.create(coll, data, id=doc_id)
        return coll

    # ----------------------------------------------------------------- errors

    def test_error_classes(self) -> None:
        for error in (
            DocumentExists,
            VersionConflict,
            InvalidDocument,
            InvalidQuery,
            StoreUnavailable,
        ):
            assert issubclass(error, DocstoreError)
        assert issubclass(InvalidDocument, ValueError)
        assert issubclass(InvalidQuery, ValueError)

    # ----------------------------------------------------------------- create / read

    def test_create_returns_the_stored_document(self, store: DocumentStore, coll: str) -> None:
        before = datetime.now(timezone.utc)
        doc = store.create(coll, {"a": 1, "b": "two"})
        assert isinstance(doc, Document)
        assert doc.collection == coll
        assert doc.data == {"a": 1, "b": "two"}
        assert doc.version == 1
        assert doc.expires_at is None
        assert str(uuid.UUID(doc.id)) == doc.id
        assert uuid.UUID(doc.id).version == 4
        assert_utc(doc.created_at)
        assert_utc(doc.updated_at)
        assert doc.created_at <= doc.updated_at
        assert abs(doc.created_at - before) < CLOCK_TOLERANCE
        assert store.read(coll, doc.id) == doc

    def test_generated_ids_are_distinct(self, store: DocumentStore, coll: str) -> None:
        created = {store.create(coll, {"n": n}).id for n in range(20)}
        assert len(created) == 20
        assert store.count(coll) == 20

    def test_create_with_a_taken_id_raises_and_keeps_the_original(
        self, store: DocumentStore, coll: str
    ) -> None:
        original = store.create(coll, {"v": 1}, id="x")
        with pytest.raises(DocumentExists):
            store.create(coll, {"v": 2}, id="x")
        assert store.read(coll, "x") == original
        assert store.count(coll) == 1

    def test_the_same_id_in_two_collections(
        self, store: DocumentStore, coll: str, other: str
    ) -> None:
        store.create(coll, {"where": "coll"}, id="x")
        store.create(other, {"where": "other"}, id="x")
        first, second = store.read(coll, "x"), store.read(other, "x")
        assert first is not None and first.data == {"where": "coll"}
        assert second is not None and second.data == {"where": "other"}
        assert store.delete(coll, "x")
        assert store.read(other, "x") == second

    def test_read_missing(self, store: DocumentStore, coll: str, other: str) -> None:
        assert store.read(coll, "nope") is None
        store.create(coll, {}, id="x")
        assert store.read(coll, "X") is None  # ids are case-sensitive
        assert store.read(other, "x") is None
        assert store.read(coll, "x") is not None

    def test_stored_data_is_not_shared_with_the_caller(
        self, store: DocumentStore, coll: str
    ) -> None:
        data: dict[str, Any] = {"list": [1], "obj": {"k": "v"}}
        created = store.create(coll, data, id="d")
        data["list"].append(2)
        data["obj"]["k"] = "changed"
        data["new"] = True
        created.data["list"].append(3)
        read = store.read(coll, "d")
        assert read is not None
        read.data["obj"]["k"] = "mutated"
        patch: dict[str, Any] = {"more": [1]}
        store.update(coll, "d", patch)
        patch["more"].append(2)
        again = store.read(coll, "d")
        assert again is not None
        assert again.data == {"list": [1], "obj": {"k": "v"}, "more": [1]}
        assert again.version == 2

    # ----------------------------------------------------------------- round trip

    def test_round_trip_equals_json_round_trip(self, store: DocumentStore, coll: str) -> None:
        nested: dict[str, Any] = {"leaf": "bottom"}
        for level in range(100):
            nested = {f"l{level}": nested}
        data = {
            "str": "plain",
            "empty": "",
            "unicode": "ünïcødé 名前 🚀 \u202e \u2028 \ufeff",
            "quotes": 'it\'s "quoted" \\ back\\slash',
            "sql": "'; DROP TABLE documents; --",
            "format": "%s %(x)s {0} %% $1 ?",
            "int": 42,
            "negative": -7,
            "zero": 0,
            "int64 max": 2**63 - 1,
            "int64 min": -(2**63),
            "float": 0.1,
            "negative float": -2.5,
            "tiny": 1.5e-300,
            "huge": 1.7976931348623157e308,
            "true": True,
            "false": False,
            "null": None,
            "list": [1, "two", 3.5, None, True, [], {}],
            "tuple": (1, (2, 3)),
            "object": {"a": {"b": {"c": [{"d": "deep"}]}}},
            "ключ 🚀": "unicode key",
            "": "empty key",
            "deep": nested,
        }
        expected = roundtripped(data)
        created = store.create(coll, data, id="d")
        read = store.read(coll, "d")
        assert read is not None
        assert created.data == expected
        assert read.data == expected
        assert read.data["tuple"] == [1, [2, 3]]
        assert read.data["true"] is True and read.data["false"] is False
        assert type(read.data["int64 max"]) is int
        assert type(read.data["int64 min"]) is int
        assert read.data["null"] is None

    def test_subclasses_of_json_types_are_stored_as_their_values(
        self, store: DocumentStore, coll: str
    ) -> None:
        data = {
            "label": _Label("text"),
            "level": _Level.HIGH,
            "ordered": collections.OrderedDict([("b", 1), ("a", [_Label("x")])]),
            "deep but allowed": _nested(400),
        }
        store.create(coll, data, id="d")
        read = store.read(coll, "d")
        assert read is not None
        assert read.data == roundtripped(data)
        assert read.data["level"] == 3 and type(read.data["level"]) is int
        assert type(read.data["label"]) is str

    def test_numbers_beyond_64_bits_come_back_as_floats(
        self, store: DocumentStore, coll: str
    ) -> None:
        store.create(coll, {"big": 1e20, "integral": 2.0, "neg": -1e30}, id="d")
        read = store.read(coll, "d")
        assert read is not None
        assert read.data == {"big": 1e20, "integral": 2.0, "neg": -1e30}
        assert isinstance(read.data["big"], float)
        assert isinstance(read.data["neg"], float)

    def test_integral_floats_read_back_of_equal_value(
        self, store: DocumentStore, coll: str
    ) -> None:
        """An integral float may come back as an int, but always of equal value."""
        # jsonb keeps the shortest decimal of a float ('1.152921504606847e+18'),
        # which would read back as the int 1152921504606847000, not 2**60.
        data = {
            "two**60": 2.0**60,
            "big": 3.989807121949115e16,
            "neg": -(2.0**55),
            "nested": [{"x": 2.0**62}],
            "past int64": 1.5e19,
        }
        created = store.create(coll, data, id="d")
        read = store.read(coll, "d")
        assert read is not None
        assert created.data == data
        assert read.data == data
        # A filter on such a value finds it, as the value it was written as.
        assert [d.id for d in store.query(coll, {"two**60": 2.0**60})] == ["d"]
        assert [d.id for d in store.query(coll, {"two**60": {"$gte": 2**60}})] == ["d"]

    def test_lone_surrogates_are_refused_or_kept(self, store: DocumentStore, coll: str) -> None:
        # A lone surrogate is a Python str but no valid UTF-8: a typed error, or kept exactly.
        for label, call in (
            ("value", lambda: store.create(coll, {"a": "x\ud800y"}, id="d1")),
            ("key", lambda: store.create(coll, {"\udfff": 1}, id="d2")),
            ("id", lambda: store.create(coll, {}, id="\ud800")),
            ("collection", lambda: store.create(coll + "\ud800", {}, id="d3")),
        ):
            try:
                doc = call()
            except InvalidDocument:
                continue
            read = store.read(doc.collection, doc.id)
            assert read == doc, label

    # ----------------------------------------------------------------- update / replace

    def test_update_merges_shallowly(self, store: DocumentStore, coll: str) -> None:
        created = store.create(coll, {"a": 1, "b": {"x": 1, "y": 2}, "c": [1]}, id="d")
        updated = store.update(coll, "d", {"b": {"z": 3}, "c": None, "n": "new"})
        assert updated is not None
        assert updated.data == {"a": 1, "b": {"z": 3}, "c": None, "n": "new"}
        assert updated.version == 2
        assert updated.id == "d" and updated.collection == coll
        assert updated.created_at == created.created_at
        assert updated.updated_at >= created.updated_at
        assert_utc(updated.updated_at)
        assert store.read(coll, "d") == updated

    def test_replace_swaps_the_whole_data(self, store: DocumentStore, coll: str) -> None:
        created = store.create(coll, {"a": 1, "b": 2}, id="d")
        replaced = store.replace(coll, "d", {"c": 3})
        assert replaced is not None
        assert replaced.data == {"c": 3}
        assert replaced.version == 2
        assert replaced.created_at == created.created_at
        assert replaced.updated_at >= created.updated_at
        assert store.read(coll, "d") == replaced

    def test_every_change_bumps_the_version(self, store: DocumentStore, coll: str) -> None:
        docs = [store.create(coll, {"n": 0}, id="d")]
        docs.append(store.update(coll, "d", {"n": 1}))
        docs.append(store.replace(coll, "d", {"n": 2}))
        docs.append(store.upsert(coll, "d", {"n": 3}))
        docs.append(store.update(coll, "d", {"m": 4}, expected_version=4))
        assert [doc.version for doc in docs] == [1, 2, 3, 4, 5]
        stamps = [doc.updated_at for doc in docs]
        assert stamps == sorted(stamps)
        assert {doc.created_at for doc in docs} == {docs[0].created_at}
        final = store.read(coll, "d")
        assert final is not None and final.version == 5
        assert final.data == {"n": 3, "m": 4}

    def test_update_and_replace_of_a_missing_document(
        self, store: DocumentStore, coll: str
    ) -> None:
        assert store.update(coll, "nope", {"a": 1}) is None
        assert store.update(coll, "nope", {"a": 1}, expected_version=1) is None
        assert store.replace(coll, "nope", {"a": 1}) is None
        assert store.replace(coll, "nope", {"a": 1}, expected_version=1) is None
        assert store.read(coll, "nope") is None
        assert store.count(coll) == 0

    @pytest.mark.parametrize("method", ["update", "replace"])
    def test_expected_version(self, store: DocumentStore, coll: str, method: str) -> None:
        write = getattr(store, method)
        store.create(coll, {"n": 0}, id="d")
        doc = write(coll, "d", {"n": 1}, expected_version=1)
        assert doc is not None and doc.version == 2
        for stale in (1, 3, 0):
            with pytest.raises(VersionConflict):
                write(coll, "d", {"n": 99}, expected_version=stale)
        stored = store.read(coll, "d")
        assert stored is not None
        assert stored.data == {"n": 1} and stored.version == 2

    # ----------------------------------------------------------------- upsert / delete

    def test_upsert_creates_then_merges(self, store: DocumentStore, coll: str) -> None:
        created = store.upsert(coll, "d", {"a": 1, "b": {"x": 1}})
        assert created.version == 1
        assert created.data == {"a": 1, "b": {"x": 1}}
        assert created.id == "d" and created.collection == coll
        assert created.expires_at is None
        merged = store.upsert(coll, "d", {"b": {"y": 2}, "c": 3})
        assert merged.version == 2
        assert merged.data == {"a": 1, "b": {"y": 2}, "c": 3}
        assert merged.created_at == created.created_at
        assert store.read(coll, "d") == merged

    def test_delete(self, store: DocumentStore, coll: str) -> None:
        store.create(coll, {}, id="d")
        store.create(coll, {}, id="keep")
        assert store.delete(coll, "d") is True
        assert store.read(coll, "d") is None
        assert store.delete(coll, "d") is False
        assert store.delete(coll, "never") is False
        assert ids(store.query(coll)) == ["keep"]
        again = store.create(coll, {"again": True}, id="d")
        assert again.version == 1 and again.data == {"again": True}

    def test_delete_with_expected_version(self, store: DocumentStore, coll: str) -> None:
        store.create(coll, {}, id="d")
        store.update(coll, "d", {"n": 1})
        with pytest.raises(VersionConflict):
            store.delete(coll, "d", expected_version=1)
        stored = store.read(coll, "d")
        assert stored is not None and stored.version == 2
        assert store.delete(coll, "d", expected_version=2) is True
        assert store.read(coll, "d") is None
        assert store.delete(coll, "d", expected_version=2) is False

    # ----------------------------------------------------------------- validation

    def test_bad_data_is_refused_by_every_write(self, store: DocumentStore, coll: str) -> None:
        child = coll + "_child"
        parent = store.create(coll, {"keep": 1}, id="p")
        cases = []
        for label, data in BAD_DATA:
            cases += [
                (f"create {label}", lambda data=data: store.create(coll, data, id="new")),
                (f"update {label}", lambda data=data: store.update(coll, "p", data)),
                (f"replace {label}", lambda data=data: store.replace(coll, "p", data)),
                (f"upsert existing {label}", lambda data=data: store.upsert(coll, "p", data)),
                (f"upsert new {label}", lambda data=data: store.upsert(coll, "new", data)),
                (
                    f"append {label}",
                    lambda data=data: store.append(child, data, parent=(coll, "p")),
                ),
            ]
        expect_errors(cases, InvalidDocument)
        assert store.read(coll, "p") == parent
        assert store.read(coll, "new") is None
        assert store.count(coll) == 1
        assert store.count(child) == 0
        assert store.list_collections() == [coll]

    def test_oversized_documents_are_refused(
        self, make_store: Callable[..., DocumentStore], coll: str
    ) -> None:
        store = make_store(max_document_bytes=100)
        # Compact JSON, UTF-8: '{"s":"' + 92 characters + '"}' is exactly 100 bytes.
        at_limit = store.create(coll, {"s": "x" * 92}, id="fits")
        assert store.read(coll, "fits") == at_limit
        multibyte = store.create(coll, {"s": "é" * 46}, id="fits2")
        assert store.read(coll, "fits2") == multibyte
        too_big = {"s": "x" * 93}
        too_big_multibyte = {"s": "é" * 47}
        expect_errors(
            [
                ("create", lambda: store.create(coll, too_big, id="big")),
                ("create multibyte", lambda: store.create(coll, too_big_multibyte, id="big")),
                ("update", lambda: store.update(coll, "fits", too_big)),
                ("replace", lambda: store.replace(coll, "fits", too_big)),
                ("upsert", lambda: store.upsert(coll, "fits", too_big)),
                ("upsert new", lambda: store.upsert(coll, "big", too_big)),
                ("append", lambda: store.append(coll, {"s": "x" * 200}, parent=(coll, "fits"))),
            ],
            InvalidDocument,
        )
        assert store.read(coll, "fits") == at_limit
        assert store.read(coll, "big") is None
        assert store.count(coll) == 2

    def test_default_document_limit_is_one_mebibyte(self, store: DocumentStore, coll: str) -> None:
        with pytest.raises(InvalidDocument):
            store.create(coll, {"s": "x" * 1_048_577}, id="big")
        assert store.read(coll, "big") is None
        fits = store.create(coll, {"s": "x" * 1_000_000}, id="fits")
        assert store.read(coll, "fits") == fits

    def test_bad_collection_names_are_refused_everywhere(
        self, store: DocumentStore, coll: str
    ) -> None:
        original = store.create(coll, {"a": 1}, id="d")
        calls: dict[str, Callable[[Any], object]] = {
            "create": lambda name: store.create(name, {"a": 1}, id="d"),
            "read": lambda name: store.read(name, "d"),
            "update": lambda name: store.update(name, "d", {"a": 2}),
            "replace": lambda name: store.replace(name, "d", {"a": 2}),
            "upsert": lambda name: store.upsert(name, "d", {"a": 2}),
            "delete": lambda name: store.delete(name, "d"),
            "query": lambda name: store.query(name),
            "count": lambda name: store.count(name),
            "delete_collection": lambda name: store.delete_collection(name),
            "delete_many": lambda name: store.delete_many(name, {}),
            "ensure_index": lambda name: store.ensure_index(name, "a"),
            "append (child collection)": lambda name: store.append(name, {}, parent=(coll, "d")),
            "append (parent collection)": lambda name: store.append(coll, {}, parent=(name, "d")),
            "purge_expired": lambda name: store.purge_expired(name),
        }
        cases = [
            (f"{method} with {label} collection", lambda call=call, name=name: call(name))
            for method, call in calls.items()
            for label, name in [*BAD_NAMES, ("None", None)]
            if not (method == "purge_expired" and name is None)
        ]
        expect_errors(cases, InvalidDocument)
        assert store.read(coll, "d") == original
        assert store.list_collections() == [coll]
        assert store.count(coll) == 1

    def test_bad_ids_are_refused_everywhere(self, store: DocumentStore, coll: str) -> None:
        original = store.create(coll, {"a": 1}, id="d")
        calls: dict[str, Callable[[Any], object]] = {
            "create": lambda doc_id: store.create(coll, {"a": 1}, id=doc_id),
            "read": lambda doc_id: store.read(coll, doc_id),
            "update": lambda doc_id: store.update(coll, doc_id, {"a": 2}),
            "replace": lambda doc_id: store.replace(coll, doc_id, {"a": 2}),
            "upsert": lambda doc_id: store.upsert(coll, doc_id, {"a": 2}),
            "delete": lambda doc_id: store.delete(coll, doc_id),
            "append (child id)": lambda doc_id: store.append(
                coll, {}, parent=(coll, "d"), id=doc_id
            ),
            "append (parent id)": lambda doc_id: store.append(coll, {}, parent=(coll, doc_id)),
        }
        cases = [
            (f"{method} with {label} id", lambda call=call, doc_id=doc_id: call(doc_id))
            for method, call in calls.items()
            for label, doc_id in [*BAD_NAMES, ("None", None)]
            if not (doc_id is None and method in ("create", "append (child id)"))
        ]
        expect_errors(cases, InvalidDocument)
        assert store.read(coll, "d") == original
        assert store.count(coll) == 1

    def test_names_of_255_characters_work(self, store: DocumentStore) -> None:
        collection = "c" * 245 + uuid.uuid4().hex[:10]
        children = "k" * 245 + uuid.uuid4().hex[:10]
        doc_id = "i" * 255
        created = store.create(collection, {"a": 1}, id=doc_id)
        assert store.read(collection, doc_id) == created
        store.ensure_index(collection, "a", unique=True)
        with pytest.raises(DocumentExists):
            store.create(collection, {"a": 1})
        pair = store.append(children, {"m": 1}, parent=(collection, doc_id), id="j" * 255)
        assert pair is not None
        assert pair[1].data == {"m": 1, "parent": doc_id, "seq": 1}
        assert store.list_collections() == sorted([collection, children])
        assert store.delete_collection(collection) is True

    def test_bad_ttls_are_refused(self, store: DocumentStore, coll: str) -> None:
        original = store.create(coll, {"a": 1}, id="d")
        cases = []
        for label, ttl in BAD_TTLS:
            cases += [
                (f"create ttl={label}", lambda ttl=ttl: store.create(coll, {}, id="n", ttl=ttl)),
                (f"update ttl={label}", lambda ttl=ttl: store.update(coll, "d", {}, ttl=ttl)),
                (f"replace ttl={label}", lambda ttl=ttl: store.replace(coll, "d", {}, ttl=ttl)),
                (f"upsert ttl={label}", lambda ttl=ttl: store.upsert(coll, "d", {}, ttl=ttl)),
                (
                    f"upsert new ttl={label}",
                    lambda ttl=ttl: store.upsert(coll, "n", {}, ttl=ttl),
                ),
                (
                    f"append ttl={label}",
                    lambda ttl=ttl: store.append(coll, {}, parent=(coll, "d"), ttl=ttl),
                ),
            ]
        expect_errors(cases, InvalidDocument)
        assert store.read(coll, "d") == original
        assert store.count(coll) == 1

    def test_bad_expected_versions_are_refused(self, store: DocumentStore, coll: str) -> None:
        original = store.create(coll, {"a": 1}, id="d")
        cases = []
        for label, version in BAD_VERSIONS:
            cases += [
                (
                    f"update expected_version={label}",
                    lambda v=version: store.update(coll, "d", {"a": 2}, expected_version=v),
                ),
                (
                    f"replace expected_version={label}",
                    lambda v=version: store.replace(coll, "d", {"a": 2}, expected_version=v),
                ),
                (
                    f"delete expected_version={label}",
                    lambda v=version: store.delete(coll, "d", expected_version=v),
                ),
            ]
        expect_errors(cases, InvalidDocument)
        assert store.read(coll, "d") == original

    def test_bad_queries_are_refused(self, store: DocumentStore, people: str) -> None:
        cases: list[tuple[str, Callable[[], object]]] = []
        for label, filters in BAD_FILTERS:
            cases += [
                (f"query {label}", lambda f=filters: store.query(people, f)),
                (f"count {label}", lambda f=filters: store.count(people, f)),
                (f"delete_many {label}", lambda f=filters: store.delete_many(people, f)),
            ]
        for label, order_by in BAD_ORDER_BY:
            cases.append((f"order_by={label}", lambda o=order_by: store.query(people, order_by=o)))
        for label, limit in BAD_LIMITS:
            cases.append((f"limit={label}", lambda n=limit: store.query(people, limit=n)))
        for label, offset in BAD_OFFSETS:
            cases.append((f"offset={label}", lambda n=offset: store.query(people, offset=n)))
        for label, batch_size in [("0", 0), ("-1", -1), ("'10'", "10"), ("True", True)]:
            cases.append(
                (f"batch_size={label}", lambda b=batch_size: store.purge_expired(batch_size=b))
            )
        expect_errors(cases, InvalidQuery)
        assert store.count(people) == len(PEOPLE)

    def test_bad_index_paths_are_refused(self, store: DocumentStore, coll: str) -> None:
        store.create(coll, {"a": 1}, id="d")
        expect_errors(
            [
                (f"ensure_index({paths!r})", lambda p=paths: store.ensure_index(coll, p))
                for paths in ("", "a..b", ".a", [], [""], ["a", ""], 1, None)
            ],
            (InvalidQuery, InvalidDocument),
        )
        assert store.count(coll) == 1

    # ----------------------------------------------------------------- filters

    def check_cases(self, store: DocumentStore, coll: str, cases: list[tuple[object, str]]) -> None:
        problems = []
        for filters, expected in cases:
            wanted = sorted(id_list(expected))
            found = sorted(ids(store.query(coll, filters, limit=None)))
            counted = store.count(coll, filters)
            if found != wanted or counted != len(wanted):
                problems.append(f"{filters!r}: query {found}, count {counted}, expected {wanted}")
        assert not problems, "\n".join(problems)

    def test_equality_and_paths(self, store: DocumentStore, people: str) -> None:
        self.check_cases(store, people, EQUALITY_CASES)

    def test_ne_in_nin(self, store: DocumentStore, people: str) -> None:
        self.check_cases(store, people, NE_IN_CASES)

    def test_ranges(self, store: DocumentStore, people: str) -> None:
        self.check_cases(store, people, RANGE_CASES)

    def test_exists(self, store: DocumentStore, people: str) -> None:
        self.check_cases(store, people, EXISTS_CASES)

    def test_contains(self, store: DocumentStore, people: str) -> None:
        self.check_cases(store, people, CONTAINS_CASES)

    def test_regex(self, store: DocumentStore, people: str) -> None:
        self.check_cases(store, people, REGEX_CASES)

    def test_query_returns_whole_documents(self, store: DocumentStore, people: str) -> None:
        found = store.query(people, {"name": "alice"})
        assert found == [store.read(people, "d1")]
        assert found[0].data == PEOPLE["d1"]
        assert store.query(unique_name("empty")) == []
        assert store.count(unique_name("empty")) == 0
        assert store.count(people) == len(PEOPLE)

    # ------------------------------------------------------------ read_with

    def test_read_with_returns_the_document_and_what_links_to_it(
        self, store: DocumentStore, coll: str, other: str
    ) -> None:
        parent = store.create(coll, {"meta": {"key": "k1"}, "n": 1}, id="p")
        store.create(coll, {"meta": {"key": "k2"}}, id="q")
        for seq in range(1, 6):
            store.create(other, {"key": "k1", "seq": seq}, id=f"a{seq}")
        store.create(other, {"key": "k2", "seq": 1}, id="b1")
        store.create(other, {"key": ["k1"], "seq": 9}, id="c1")  # a list is not equal
        document, linked = store.read_with(
            coll, "p", other, {"seq": {"$gte": 2}}, link=("key", "meta.key"),
            order_by=["-seq"], limit=3,
        )  # fmt: skip
        assert document == parent
        assert ids(linked) == ["a5", "a4", "a3"]
        assert linked == [store.read(other, f"a{seq}") for seq in (5, 4, 3)]
        _, everything = store.read_with(coll, "p", other, link=("key", "meta.key"), limit=None)
        assert ids(everything) == [f"a{seq}" for seq in range(1, 6)]  # created_at, then id
        assert ids(store.read_with(coll, "q", other, link=("key", "meta.key"))[1]) == ["b1"]

    def test_read_with_a_missing_or_unlinked_document(
        self, store: DocumentStore, coll: str, other: str
    ) -> None:
        store.create(other, {"key": None, "seq": 1}, id="null")
        store.create(other, {"seq": 2}, id="absent")
        assert store.read_with(coll, "nobody", other, link=("key", "key")) == (None, [])
        for data in ({}, {"key": None}, {"key": {"deeper": 1}}):
            doc_id = unique_name("d")
            document = store.create(coll, data, id=doc_id)
            # Missing or null links to nothing, not to the documents lacking the path.
            assert store.read_with(coll, doc_id, other, link=("key", "key")) == (document, [])
        gone = store.create(coll, {"key": "k"}, id="gone", ttl=SHORT_TTL)
        store.create(other, {"key": "k"}, id="of-gone")
        wait_until_expired(store, gone)
        assert store.read_with(coll, "gone", other, link=("key", "key")) == (None, [])

    def test_read_with_skips_expired_linked_documents(
        self, store: DocumentStore, coll: str, other: str
    ) -> None:
        store.create(coll, {"key": "k"}, id="p")
        store.create(other, {"key": "k"}, id="live")
        dying = store.create(other, {"key": "k"}, id="dying", ttl=SHORT_TTL)
        wait_until_expired(store, dying)
        assert ids(store.read_with(coll, "p", other, link=("key", "key"))[1]) == ["live"]

    @pytest.mark.parametrize(
        "link", [("key",), "key", ("", "key"), ("key", "a..b"), ("key", 3), None]
    )
    def test_read_with_refuses_a_bad_link(
        self, store: DocumentStore, coll: str, other: str, link: Any
    ) -> None:
        store.create(coll, {"key": "k"}, id="p")
        with pytest.raises(InvalidQuery):
            store.read_with(coll, "p", other, link=link)

    def test_read_with_refuses_filters_on_the_link_path(
        self, store: DocumentStore, coll: str, other: str
    ) -> None:
        store.create(coll, {"key": "k"}, id="p")
        with pytest.raises(InvalidQuery):
            store.read_with(coll, "p", other, {"key": "x"}, link=("key", "key"))
        with pytest.raises(InvalidQuery):
            store.read_with(coll, "p", other, {"seq": {"$bogus": 1}}, link=("seq2", "key"))

    def test_hostile_field_names(self, store: DocumentStore, coll: str) -> None:
        store.create(coll, {key: index for index, key in enumerate(HOSTILE_KEYS)}, id="all")
        store.create(coll, {"other": 1}, id="none")
        for index, key in enumerate(HOSTILE_KEYS):
            assert ids(store.query(coll, {key: index})) == ["all"], key
            assert ids(store.query(coll, {key: {"$gte": index}})) == ["all"], key
            assert ids(store.query(coll, {key: {"$exists": False}})) == ["none"], key
            assert ids(store.query(coll, order_by=f"-{key}")) == ["none", "all"], key
            assert store.count(coll, {key: {"$in": [index]}}) == 1, key
            store.ensure_index(coll, key)
            store.ensure_index(coll, [key, "other"], unique=True)
        assert store.count(coll) == 2

    # ----------------------------------------------------------------- ordering

    def test_default_order_is_created_at_then_id(self, store: DocumentStore, coll: str) -> None:
        created = [store.create(coll, {}, id=doc_id) for doc_id in ("z", "y", "x", "w")]
        with store.transaction():
            created += [store.create(coll, {}, id=doc_id) for doc_id in ("c", "b", "a")]
        found = store.query(coll)
        assert ids(found) == ids(sorted(created, key=lambda doc: (doc.created_at, doc.id)))

    def test_order_by_a_field(self, store: DocumentStore, people: str) -> None:
        cases: list[tuple[object, str]] = [
            ("age", "d5 d3 d2 d1 d6 d4"),
            ("-age", "d4 d1 d6 d2 d3 d5"),
            ("nick", "d1 d4 d2 d3 d5 d6"),
            ("-nick", "d2 d3 d5 d6 d4 d1"),
            (["profile.city", "-age"], "d2 d1 d3 d4 d6 d5"),
            (("profile.city", "-age"), "d2 d1 d3 d4 d6 d5"),
            ("points.-1", "d2 d1 d3 d4 d5 d6"),
            ("tags", "d3 d5 d2 d6 d1 d4"),
            (["active", "name"], "d3 d2 d1 d6 d4 d5"),
        ]
        problems = []
        for order_by, expected in cases:
            found = ids(store.query(people, order_by=order_by))
            if found != id_list(expected):
                problems.append(f"order_by={order_by!r}: {found}, expected {id_list(expected)}")
        assert not problems, "\n".join(problems)

    def test_order_by_mixed_types_and_missing(self, store: DocumentStore, coll: str) -> None:
        for doc_id, value in MIXED_ORDER:
            store.create(coll, {"v": value}, id=doc_id)
        store.create(coll, {}, id="w1")
        store.create(coll, {"other": 1}, id="w0")
        ascending = [doc_id for doc_id, _ in MIXED_ORDER]
        assert ids(store.query(coll, order_by="v")) == [*ascending, "w0", "w1"]
        assert ids(store.query(coll, order_by="-v")) == ["w0", "w1", *reversed(ascending)]

    def test_order_by_strings_is_by_code_point(
        self, store: DocumentStore, coll: str, code_point_strings: bool
    ) -> None:
        if not code_point_strings:
            reason = "the database's collation is not C: strings sort by that collation"
            if os.environ.get("CI"):
                # API.md orders strings by code point: CI's server must let this run.
                pytest.fail(f"CI is set but {reason}")
            pytest.skip(reason)
        for index, value in enumerate(reversed(STRINGS_BY_CODE_POINT)):
            store.create(coll, {"s": value}, id=f"s{index:02}")
        found = store.query(coll, order_by="s")
        assert [doc.data["s"] for doc in found] == STRINGS_BY_CODE_POINT
        found = store.query(coll, order_by="-s")
        assert [doc.data["s"] for doc in found] == STRINGS_BY_CODE_POINT[::-1]

    def test_ties_are_broken_by_id_ascending(self, store: DocumentStore, coll: str) -> None:
        for doc_id, group, n in (
            ("a3", "x", 1),
            ("a1", "y", 1),
            ("a5", "x", 2),
            ("a2", "x", 2),
            ("a4", "y", 3),
        ):
            store.create(coll, {"group": group, "n": n}, id=doc_id)
        assert ids(store.query(coll, order_by=["group", "-n"])) == ["a2", "a5", "a3", "a4", "a1"]
        assert ids(store.query(coll, order_by=["-group", "n"])) == ["a1", "a4", "a3", "a2", "a5"]
        assert ids(store.query(coll, order_by="-n")) == ["a4", "a2", "a5", "a1", "a3"]
        assert ids(store.query(coll, order_by="group")) == ["a2", "a3", "a5", "a1", "a4"]

    def test_order_by_metadata(self, store: DocumentStore, coll: str) -> None:
        docs = [store.create(coll, {"n": n}, id=doc_id) for n, doc_id in enumerate("cab")]
        assert ids(store.query(coll, order_by="id")) == ["a", "b", "c"]
        assert ids(store.query(coll, order_by="-id")) == ["c", "b", "a"]
        by_created = sorted(docs, key=lambda doc: (doc.created_at, doc.id))
        assert ids(store.query(coll, order_by="created_at")) == ids(by_created)
        # Python's sort is stable also with reverse=True: ties keep ascending ids.
        newest_first = sorted(by_created, key=lambda doc: doc.created_at, reverse=True)
        assert ids(store.query(coll, order_by="-created_at")) == ids(newest_first)
        store.update(coll, "c", {"touched": True})
        assert ids(store.query(coll, order_by="updated_at"))[-1] == "c"
        assert ids(store.query(coll, order_by="-updated_at"))[0] == "c"
        # A field named like a metadata column inside data is not the column.
        assert ids(store.query(coll, order_by="n")) == ["c", "a", "b"]

    # ----------------------------------------------------------------- paging

    def test_limit_and_offset(self, store: DocumentStore, coll: str) -> None:
        for n in range(7):
            store.create(coll, {"n": n}, id=f"p{n}")
        everything = ids(store.query(coll, order_by="id", limit=None))
        assert everything == [f"p{n}" for n in range(7)]
        for limit in (0, 1, 3, 7, 10, None):
            for offset in (0, 1, 5, 7, 9):
                found = ids(store.query(coll, order_by="id", limit=limit, offset=offset))
                end = None if limit is None else offset + limit
                assert found == everything[offset:end], (limit, offset)
        assert ids(store.query(coll, {"n": {"$gte": 2}}, order_by="-n", limit=2, offset=1)) == [
            "p5",
            "p4",
        ]

    def test_keyset_paging_walks_every_document_once(self, store: DocumentStore, coll: str) -> None:
        for n in range(9):
            store.create(coll, {"n": n, "g": n % 2}, id=f"k{n}")
        # Updates in an order unrelated to the ids, some within one transaction
        # (PostgreSQL then gives them equal updated_at: the id breaks the tie).
        with store.transaction():
            for n in (4, 7, 1):
                store.update(coll, f"k{n}", {"touched": True})
        for n in (8, 0):
            store.update(coll, f"k{n}", {"touched": True})
        for order_by in ("-updated_at", ["updated_at", "-id"], "id", ["-created_at"]):
            expected = ids(store.query(coll, {"g": 0}, order_by=order_by, limit=None))
            seen: list[str] = []
            page = store.query(coll, {"g": 0}, order_by=order_by, limit=2)
            while page:
                seen.extend(ids(page))
                page = store.query(coll, {"g": 0}, order_by=order_by, limit=2, after=page[-1])
            assert seen == expected, order_by
        with pytest.raises(InvalidQuery):
            store.query(coll, order_by="n", after=store.read(coll, "k1"))
        with pytest.raises(InvalidQuery):
            store.query(coll, order_by="id", after=("k1",))  # type: ignore[arg-type]

    def test_default_limit_is_100(self, store: DocumentStore, coll: str) -> None:
        with store.transaction():
            for n in range(105):
                store.create(coll, {"n": n}, id=f"p{n:03}")
        assert len(store.query(coll)) == 100
        assert len(store.query(coll, limit=None)) == 105
        assert ids(store.query(coll, offset=100, order_by="id")) == [
            f"p{n:03}" for n in range(100, 105)
        ]
        assert store.count(coll) == 105

    # ----------------------------------------------------------------- collections

    def test_list_collections(self, store: DocumentStore) -> None:
        assert store.list_collections() == []
        suffix = uuid.uuid4().hex[:8]
        names = [f"{prefix}_{suffix}" for prefix in ("b", "B", "a", "é", "Z", "🚀", "ﬁ", "_")]
        for name in names:
            store.create(name, {})
            store.create(name, {})
        assert store.list_collections() == sorted(names)

    def test_delete_collection(self, store: DocumentStore, coll: str, other: str) -> None:
        for _ in range(3):
            store.create(coll, {"x": 1})
        kept = store.create(other, {"x": 1}, id="kept")
        assert store.delete_collection(coll) is True
        assert store.count(coll) == 0
        assert store.query(coll) == []
        assert store.list_collections() == [other]
        assert store.delete_collection(coll) is False
        assert store.delete_collection(unique_name("never")) is False
        assert store.read(other, "kept") == kept
        assert store.create(coll, {"again": 1}).version == 1

    def test_delete_many(self, store: DocumentStore, coll: str, other: str) -> None:
        for n in range(6):
            store.create(coll, {"n": n, "even": n % 2 == 0}, id=f"d{n}")
        store.create(other, {"n": 0, "even": True}, id="d0")
        assert store.delete_many(coll, {"even": True}) == 3
        assert ids(store.query(coll, order_by="id")) == ["d1", "d3", "d5"]
        assert store.delete_many(coll, {"even": True}) == 0
        assert store.delete_many(coll, {"n": {"$gte": 3}}) == 2
        assert ids(store.query(coll)) == ["d1"]
        assert store.delete_many(coll, {}) == 1
        assert store.count(coll) == 0
        assert store.count(other) == 1

    # ----------------------------------------------------------------- indexes

    def test_ensure_index_is_idempotent_and_changes_no_answer(
        self, store: DocumentStore, people: str
    ) -> None:
        questions: list[tuple[object, object]] = [
            ({"age": 30}, None),
            ({"age": {"$gt": 29}}, None),
            ({"age": {"$gt": "2"}}, None),
            ({"age": {"$in": [30, "30", None]}}, None),
            ({"profile.city": "Oslo", "age": {"$gte": 25}}, None),
            ({"points.0": {"$lt": 100}}, None),
            (None, "age"),
            (None, "-age"),
            (None, ["profile.city", "-age"]),
            ({"age": {"$ne": 30}}, "points.0"),
        ]

        def answers() -> list[list[str]]:
            return [ids(store.query(people, f, order_by=o, limit=None)) for f, o in questions]

        before = answers()
        for _ in range(2):
            store.ensure_index(people, "age")
            store.ensure_index(people, ["profile.city", "age"])
            store.ensure_index(people, ("profile.city", "age"))
            store.ensure_index(people, "points.0")
            store.ensure_index(people, "profile.city", unique=False)
        assert answers() == before
        store.create(people, {"age": 30}, id="d7")
        assert ids(store.query(people, {"age": 30})) == ["d1", "d6", "d7"]

    def test_an_index_ordered_by_metadata_columns_changes_no_answer(
        self, store: DocumentStore, people: str
    ) -> None:
        questions: list[tuple[object, object]] = [
            ({"profile.city": "Oslo"}, ["-updated_at", "id"]),
            ({"profile.city": "Oslo"}, "-updated_at"),
            ({"age": {"$gt": 20}}, "created_at"),
        ]

        def answers() -> list[list[str]]:
            return [ids(store.query(people, f, order_by=o, limit=None)) for f, o in questions]

        before = answers()
        for _ in range(2):
            store.ensure_index(people, "profile.city", order_by=["-updated_at", "id"])
            store.ensure_index(people, ["age"], order_by="created_at")
        assert answers() == before
        for bad in ("age", ["-updated_at", "profile.city"], 3):
            with pytest.raises(InvalidQuery):
                store.ensure_index(people, "age", order_by=bad)  # type: ignore[arg-type]
        with pytest.raises(InvalidQuery):
            store.ensure_index(people, "age", unique=True, order_by="-updated_at")

    def test_unique_index(self, store: DocumentStore, coll: str, other: str) -> None:
        store.ensure_index(coll, "email", unique=True)
        store.ensure_index(coll, "email", unique=True)
        a = store.create(coll, {"email": "a@x"}, id="a")
        b = store.create(coll, {"email": "b@x"}, id="b")
        expect_errors(
            [
                ("create", lambda: store.create(coll, {"email": "a@x"}, id="c")),
                ("update", lambda: store.update(coll, "b", {"email": "a@x"})),
                ("replace", lambda: store.replace(coll, "b", {"email": "a@x", "z": 1})),
                ("upsert existing", lambda: store.upsert(coll, "b", {"email": "a@x"})),
                ("upsert new", lambda: store.upsert(coll, "c", {"email": "a@x"})),
                ("append", lambda: store.append(coll, {"email": "a@x"}, parent=(coll, "b"))),
            ],
            DocumentExists,
        )
        assert store.read(coll, "a") == a
        assert store.read(coll, "b") == b
        assert store.read(coll, "c") is None
        assert store.count(coll) == 2
        # Documents lacking the field never conflict; a document may keep its own value.
        store.create(coll, {"name": "one"})
        store.create(coll, {"name": "two"})
        assert store.update(coll, "a", {"email": "a@x", "n": 1}) is not None
        # Other collections are not constrained.
        store.create(other, {"email": "a@x"})
        # A freed value can be taken again.
        assert store.delete(coll, "a")
        assert store.create(coll, {"email": "a@x"}, id="c").version == 1
        assert store.update(coll, "b", {"email": "b2@x"}) is not None
        assert store.create(coll, {"email": "b@x"}, id="d").version == 1

    def test_unique_index_uses_json_equality(self, store: DocumentStore, coll: str) -> None:
        store.ensure_index(coll, "key", unique=True)
        store.create(coll, {"key": 1})
        store.create(coll, {"key": "1"})
        store.create(coll, {"key": True})
        store.create(coll, {"key": None})
        store.create(coll, {"key": [1]})
        expect_errors(
            [
                ("1.0 after 1", lambda: store.create(coll, {"key": 1.0})),
                ("null after null", lambda: store.create(coll, {"key": None})),
                ("[1] after [1]", lambda: store.create(coll, {"key": [1]})),
            ],
            DocumentExists,
        )
        assert store.count(coll) == 5

    def test_composite_unique_index(self, store: DocumentStore, coll: str) -> None:
        store.create(coll, {"org": "o1", "user": {"name": "n1"}}, id="first")
        store.ensure_index(coll, ["org", "user.name"], unique=True)
        store.create(coll, {"org": "o1", "user": {"name": "n2"}})
        store.create(coll, {"org": "o2", "user": {"name": "n1"}})
        store.create(coll, {"org": "o1"})
        store.create(coll, {"org": "o1"})
        with pytest.raises(DocumentExists):
            store.create(coll, {"org": "o1", "user": {"name": "n1"}, "extra": 1})
        with pytest.raises(DocumentExists):
            store.update(coll, "first", {"org": "o2"})
        assert store.count(coll) == 5
        assert store.count(coll, {"org": "o1", "user.name": "n1"}) == 1

    def test_expired_documents_do_not_conflict(self, store: DocumentStore, coll: str) -> None:
        store.ensure_index(coll, "email", unique=True)
        old = store.create(coll, {"email": "a@x"}, id="old", ttl=SHORT_TTL)
        wait_until_expired(store, old)
        new = store.create(coll, {"email": "a@x"}, id="new")
        assert store.read(coll, "new") == new
        assert store.count(coll, {"email": "a@x"}) == 1
        reused = store.upsert(coll, "old", {"email": "b@x"})
        assert reused.version == 1

    # ----------------------------------------------------------------- expiry

    def test_ttl_sets_expires_at(self, store: DocumentStore, coll: str) -> None:
        for ttl, seconds in ((60, 60.0), (90.5, 90.5), (timedelta(hours=1), 3600.0)):
            doc = store.create(coll, {}, ttl=ttl)
            assert doc.expires_at is not None
            assert_utc(doc.expires_at)
            assert abs((doc.expires_at - doc.created_at).total_seconds() - seconds) < 1
            read = store.read(coll, doc.id)
            assert read is not None and read.expires_at == doc.expires_at

    def test_writes_keep_or_reset_the_expiry(self, store: DocumentStore, coll: str) -> None:
        doc = store.create(coll, {"n": 0}, id="d", ttl=600)
        for write in (
            lambda: store.update(coll, "d", {"n": 1}),
            lambda: store.replace(coll, "d", {"n": 2}),
            lambda: store.upsert(coll, "d", {"n": 3}),
        ):
            changed = write()
            assert changed is not None and changed.expires_at == doc.expires_at
        for ttl, write in (
            (3600, lambda t: store.update(coll, "d", {"n": 4}, ttl=t)),
            (7200, lambda t: store.replace(coll, "d", {"n": 5}, ttl=t)),
            (10800, lambda t: store.upsert(coll, "d", {"n": 6}, ttl=t)),
        ):
            changed = write(ttl)
            assert changed is not None and changed.expires_at is not None
            assert abs((changed.expires_at - changed.updated_at).total_seconds() - ttl) < 1
        forever = store.create(coll, {}, id="forever")
        assert forever.expires_at is None
        updated = store.update(coll, "forever", {"n": 1})
        assert updated is not None and updated.expires_at is None
        upserted = store.upsert(coll, "fresh", {}, ttl=timedelta(minutes=1))
        assert upserted.expires_at is not None

    def test_expired_documents_are_absent_everywhere(
        self, store: DocumentStore, coll: str, other: str
    ) -> None:
        store.create(coll, {"k": 1}, id="live")
        gone = store.create(coll, {"k": 1}, id="gone", ttl=SHORT_TTL)
        only = store.create(other, {"k": 1}, id="only", ttl=SHORT_TTL)
        wait_until_expired(store, gone, only)
        assert store.read(coll, "gone") is None
        assert ids(store.query(coll)) == ["live"]
        assert ids(store.query(coll, {"k": 1})) == ["live"]
        assert store.query(other) == []
        assert store.count(coll) == 1
        assert store.count(coll, {"k": 1}) == 1
        assert store.count(other) == 0
        assert store.list_collections() == [coll]
        assert store.update(coll, "gone", {"x": 1}) is None
        assert store.update(coll, "gone", {"x": 1}, expected_version=1) is None
        assert store.replace(coll, "gone", {"x": 1}) is None
        assert store.delete(coll, "gone") is False
        assert store.delete(coll, "gone", expected_version=1) is False
        assert store.append(unique_name("child"), {}, parent=(coll, "gone")) is None
        assert store.read(coll, "gone") is None
        assert store.delete_collection(other) is False
        assert store.delete_many(coll, {"k": 1}) == 1
        assert store.list_collections() == []

    def test_create_and_upsert_reuse_an_expired_id(self, store: DocumentStore, coll: str) -> None:
        old_a = store.create(coll, {"old": 1}, id="a", ttl=SHORT_TTL)
        old_b = store.create(coll, {"old": 1}, id="b", ttl=SHORT_TTL)
        store.update(coll, "b", {"more": 1})
        wait_until_expired(store, old_a, old_b)
        new_a = store.create(coll, {"new": 1}, id="a")
        assert new_a.version == 1
        assert new_a.data == {"new": 1}
        assert new_a.expires_at is None
        assert new_a.created_at > old_a.created_at
        new_b = store.upsert(coll, "b", {"new": 2})
        assert new_b.version == 1
        assert new_b.data == {"new": 2}
        assert new_b.expires_at is None
        assert new_b.created_at > old_b.created_at
        assert store.read(coll, "a") == new_a
        assert store.read(coll, "b") == new_b

    def test_purge_expired(self, store: DocumentStore, coll: str, other: str) -> None:
        expiring = [store.create(coll, {"n": n}, ttl=SHORT_TTL) for n in range(3)]
        expiring.append(store.create(other, {}, ttl=SHORT_TTL))
        live = [store.create(coll, {}), store.create(other, {}), store.create(coll, {}, ttl=600)]
        wait_until_expired(store, *expiring)
        assert store.purge_expired(coll, batch_size=2) == 3
        assert store.purge_expired(coll) == 0
        assert store.purge_expired() == 1
        assert store.purge_expired() == 0
        for doc in live:
            assert store.read(doc.collection, doc.id) == doc

    # ----------------------------------------------------------------- append

    def test_append_numbers_children_and_bumps_the_parent(
        self, store: DocumentStore, coll: str, other: str
    ) -> None:
        parent = store.create(coll, {"title": "chat"}, id="p")
        children = []
        for n in range(1, 4):
            pair = store.append(other, {"text": f"m{n}"}, parent=(coll, "p"))
            assert pair is not None
            bumped, child = pair
            assert bumped.id == "p" and bumped.collection == coll
            assert bumped.version == parent.version + n
            assert bumped.data == {"title": "chat"}
            assert bumped.updated_at >= parent.updated_at
            assert bumped.created_at == parent.created_at
            assert child.collection == other
            assert child.data == {"text": f"m{n}", "parent": "p", "seq": n}
            assert child.version == 1
            assert str(uuid.UUID(child.id)) == child.id
            assert store.read(coll, "p") == bumped
            assert store.read(other, child.id) == child
            children.append(child)
        assert ids(store.query(other, order_by="seq")) == ids(children)
        assert store.count(other, {"parent": "p"}) == 3

    def test_append_without_the_parents_data(
        self, store: DocumentStore, coll: str, other: str
    ) -> None:
        store.create(coll, {"title": "chat", "big": "x" * 500}, id="p")
        pair = store.append(other, {"text": "m1"}, parent=(coll, "p"), parent_data=False)
        assert pair is not None
        bumped, child = pair
        stored = store.read(coll, "p")
        assert stored is not None and stored.data == {"title": "chat", "big": "x" * 500}
        # Everything but the data, as the parent now is.
        assert bumped == dataclasses.replace(stored, data={})
        assert bumped.version == 2
        assert child.data == {"text": "m1", "parent": "p", "seq": 1}
        # An idempotent retry: the parent as it is, still without its data.
        retry = store.append(
            other, {"text": "m1"}, parent=(coll, "p"), id=child.id, parent_data=False
        )
        assert retry == (bumped, child)
        with pytest.raises(InvalidDocument):
            store.append(other, {"text": "m2"}, parent=(coll, "p"), parent_data="no")  # type: ignore[arg-type]
        assert store.count(other) == 1  # nothing written
        after = store.read(coll, "p")
        assert after is not None and after.version == bumped.version  # not bumped

    def test_append_sequences_are_per_parent(self, store: DocumentStore, coll: str) -> None:
        store.create(coll, {}, id="p1")
        store.create(coll, {}, id="p2")
        seqs = []
        for parent_id in ("p1", "p2", "p1", "p1", "p2"):
            pair = store.append(coll + "_m", {}, parent=(coll, parent_id))
            assert pair is not None
            seqs.append((parent_id, pair[1].data["seq"]))
        assert seqs == [("p1", 1), ("p2", 1), ("p1", 2), ("p1", 3), ("p2", 2)]

    def test_append_store_fields_win_and_ttl_applies(self, store: DocumentStore, coll: str) -> None:
        store.create(coll, {}, id="p")
        pair = store.append(
            coll, {"parent": "forged", "seq": 99, "x": 1}, parent=(coll, "p"), ttl=60
        )
        assert pair is not None
        child = pair[1]
        assert child.data == {"parent": "p", "seq": 1, "x": 1}
        assert child.expires_at is not None
        assert abs((child.expires_at - child.created_at).total_seconds() - 60) < 1
        parent = store.read(coll, "p")
        assert parent is not None and parent.expires_at is None

    def test_append_parent_ttl_slides_the_parent_in_the_same_step(
        self, store: DocumentStore, coll: str
    ) -> None:
        store.create(coll, {}, id="p", ttl=5)
        pair = store.append(coll, {"x": 1}, parent=(coll, "p"), parent_ttl=600)
        assert pair is not None
        parent, child = pair
        assert parent.version == 2 and child.expires_at is None
        assert parent.expires_at is not None
        assert abs((parent.expires_at - parent.updated_at).total_seconds() - 600) < 1
        assert store.read(coll, "p") == parent
        with pytest.raises(InvalidDocument):
            store.append(coll, {"x": 2}, parent=(coll, "p"), parent_ttl=0)
        assert store.count(coll) == 2  # the refused append wrote nothing
        assert store.read(coll, "p") == parent

    def test_append_to_a_missing_parent(self, store: DocumentStore, coll: str, other: str) -> None:
        assert store.append(other, {}, parent=(coll, "nope")) is None
        store.create(coll, {}, id="p")
        assert store.append(other, {}, parent=(unique_name("wrong"), "p")) is None
        assert store.count(other) == 0
        parent = store.read(coll, "p")
        assert parent is not None and parent.version == 1

    def test_append_with_a_known_id_is_an_idempotent_retry(
        self, store: DocumentStore, coll: str, other: str
    ) -> None:
        store.create(coll, {}, id="p")
        first = store.append(other, {"text": "hi"}, parent=(coll, "p"), id="m1")
        assert first is not None
        assert first[1].id == "m1"
        retry = store.append(other, {"text": "changed"}, parent=(coll, "p"), id="m1")
        assert retry is not None
        assert retry[0] == store.read(coll, "p")
        assert retry[0].version == 2
        assert retry[1] == first[1]
        assert store.count(other) == 1
        nxt = store.append(other, {"text": "next"}, parent=(coll, "p"), id="m2")
        assert nxt is not None and nxt[1].data["seq"] == 2

    def test_append_never_reuses_a_seq(self, store: DocumentStore, coll: str) -> None:
        store.create(coll, {}, id="p")
        children = [store.append(coll + "_m", {}, parent=(coll, "p")) for _ in range(3)]
        last = children[-1]
        assert last is not None
        assert store.delete(coll + "_m", last[1].id)
        pair = store.append(coll + "_m", {}, parent=(coll, "p"))
        assert pair is not None and pair[1].data["seq"] == 4

    def test_failed_append_changes_nothing(self, store: DocumentStore, coll: str) -> None:
        store.create(coll, {}, id="p")
        messages = coll + "_m"
        store.ensure_index(messages, "key", unique=True)
        assert store.append(messages, {"key": 1}, parent=(coll, "p")) is not None
        with pytest.raises(DocumentExists):
            store.append(messages, {"key": 1}, parent=(coll, "p"))
        parent = store.read(coll, "p")
        assert parent is not None and parent.version == 2
        pair = store.append(messages, {"key": 2}, parent=(coll, "p"))
        assert pair is not None and pair[1].data["seq"] == 2
        assert store.count(messages) == 2

    def test_concurrent_appends_have_no_gaps_or_duplicates(
        self, store: DocumentStore, coll: str
    ) -> None:
        store.create(coll, {}, id="p")
        per_thread = 10

        def work(index: int) -> list[int]:
            seqs = []
            for n in range(per_thread):
                pair = store.append(coll + "_m", {"t": index, "n": n}, parent=(coll, "p"))
                assert pair is not None
                seqs.append(pair[1].data["seq"])
            return seqs

        seqs = [seq for batch in run_in_threads(THREADS, work) for seq in batch]
        total = THREADS * per_thread
        assert sorted(seqs) == list(range(1, total + 1))
        stored = store.query(coll + "_m", limit=None, order_by="seq")
        assert [doc.data["seq"] for doc in stored] == list(range(1, total + 1))
        parent = store.read(coll, "p")
        assert parent is not None and parent.version == 1 + total

    def test_concurrent_retries_of_one_append_store_it_once(
        self, store: DocumentStore, coll: str
    ) -> None:
        store.create(coll, {}, id="p")

        def work(index: int) -> tuple[Document, Document] | None:
            return store.append(coll + "_m", {"t": index}, parent=(coll, "p"), id="once")

        results = run_in_threads(THREADS, work)
        assert all(result is not None for result in results)
        children = [result[1] for result in results if result is not None]
        assert all(child == children[0] for child in children)
        assert children[0].data == {"t": children[0].data["t"], "parent": "p", "seq": 1}
        assert store.count(coll + "_m") == 1
        parent = store.read(coll, "p")
        assert parent is not None and parent.version == 2

    # ----------------------------------------------------------------- pop_child / delete_children

    @staticmethod
    def _conversation(store: DocumentStore, coll: str, count: int) -> list[Document]:
        store.create(coll, {"title": "chat"}, id="p")
        children = []
        for n in range(count):
            pair = store.append(coll + "_m", {"conv": "c", "n": n}, parent=(coll, "p"))
            assert pair is not None
            children.append(pair[1])
        return children

    def test_pop_child_removes_the_highest_seq_and_bumps_the_parent(
        self, store: DocumentStore, coll: str
    ) -> None:
        children = self._conversation(store, coll, 3)
        store.append(coll + "_m", {"conv": "other"}, parent=(coll, "p"))  # not matched
        before = store.read(coll, "p")
        assert before is not None
        popped = store.pop_child(coll + "_m", {"conv": "c"}, parent=(coll, "p"))
        assert popped is not None
        parent, child = popped
        assert child == children[2]
        assert store.read(coll + "_m", children[2].id) is None
        assert parent == store.read(coll, "p")
        assert parent.version == before.version + 1
        assert parent.updated_at >= before.updated_at
        assert (parent.data, parent.created_at) == (before.data, before.created_at)
        remaining = store.query(coll + "_m", {"conv": "c"}, order_by="seq")
        assert remaining == children[:2]
        assert store.count(coll + "_m", {"conv": "other"}) == 1

    def test_pop_child_of_no_children_still_bumps_the_parent(
        self, store: DocumentStore, coll: str
    ) -> None:
        store.create(coll, {}, id="p")
        store.create(coll + "_m", {"conv": "c"})  # matches, but has no seq: not a child
        popped = store.pop_child(coll + "_m", {"conv": "c"}, parent=(coll, "p"))
        assert popped is not None
        assert popped[1] is None and popped[0].version == 2
        assert store.count(coll + "_m") == 1

    def test_pop_child_keeps_the_append_counter(self, store: DocumentStore, coll: str) -> None:
        self._conversation(store, coll, 3)
        for _ in range(2):
            assert store.pop_child(coll + "_m", {"conv": "c"}, parent=(coll, "p")) is not None
        pair = store.append(coll + "_m", {"conv": "c"}, parent=(coll, "p"))
        assert pair is not None and pair[1].data["seq"] == 4
        popped = store.pop_child(coll + "_m", {"conv": "c"}, parent=(coll, "p"))
        assert popped is not None and popped[1] == pair[1]
        popped = store.pop_child(coll + "_m", {"conv": "c"}, parent=(coll, "p"))
        assert popped is not None and popped[1] is not None and popped[1].data["seq"] == 1

    def test_delete_children_removes_every_match_and_bumps_the_parent(
        self, store: DocumentStore, coll: str
    ) -> None:
        self._conversation(store, coll, 4)
        kept = store.append(coll + "_m", {"conv": "other"}, parent=(coll, "p"))
        assert kept is not None
        cleared = store.delete_children(coll + "_m", {"conv": "c"}, parent=(coll, "p"))
        assert cleared is not None
        parent, count = cleared
        assert count == 4
        assert parent == store.read(coll, "p") and parent.version == 7
        assert store.query(coll + "_m", limit=None) == [kept[1]]
        again = store.delete_children(coll + "_m", {"conv": "c"}, parent=(coll, "p"))
        assert again is not None and again[1] == 0 and again[0].version == 8
        pair = store.append(coll + "_m", {"conv": "c"}, parent=(coll, "p"))
        assert pair is not None and pair[1].data["seq"] == 6

    def test_pop_and_delete_children_of_a_missing_parent(
        self, store: DocumentStore, coll: str
    ) -> None:
        self._conversation(store, coll, 2)
        for parent in ((coll, "nope"), (unique_name("wrong"), "p")):
            assert store.pop_child(coll + "_m", {"conv": "c"}, parent=parent) is None
            assert store.delete_children(coll + "_m", {"conv": "c"}, parent=parent) is None
        short = store.create(coll, {}, id="short", ttl=SHORT_TTL)
        store.append(coll + "_m", {"conv": "s"}, parent=(coll, "short"))
        wait_until_expired(store, short)
        assert store.pop_child(coll + "_m", {"conv": "s"}, parent=(coll, "short")) is None
        assert store.delete_children(coll + "_m", {"conv": "s"}, parent=(coll, "short")) is None
        assert store.count(coll + "_m") == 3
        parent = store.read(coll, "p")
        assert parent is not None and parent.version == 3

    def test_pop_and_delete_children_parent_ttl(self, store: DocumentStore, coll: str) -> None:
        self._conversation(store, coll, 2)
        for remove in (store.pop_child, store.delete_children):
            result = remove(coll + "_m", {"conv": "c"}, parent=(coll, "p"), parent_ttl=600)
            assert result is not None
            parent = result[0]
            assert parent.expires_at is not None
            assert abs((parent.expires_at - parent.updated_at).total_seconds() - 600) < 1
            assert store.read(coll, "p") == parent

    @pytest.mark.parametrize(
        "arguments",
        [
            {"filters": None},
            {"filters": {"conv": {"$bad": 1}}},
            {"parent": "p"},
            {"parent": ("", "p")},
            {"parent_ttl": 0},
            {"parent_ttl": "soon"},
        ],
    )
    def test_pop_and_delete_children_bad_input_changes_nothing(
        self, store: DocumentStore, coll: str, arguments: dict[str, Any]
    ) -> None:
        children = self._conversation(store, coll, 2)
        call: dict[str, Any] = {"filters": {"conv": "c"}, "parent": (coll, "p")} | arguments
        for remove in (store.pop_child, store.delete_children):
            with pytest.raises((InvalidDocument, InvalidQuery)):
                remove(
                    coll + "_m",
                    call["filters"],
                    parent=call["parent"],
                    parent_ttl=call.get("parent_ttl"),
                )
        assert store.query(coll + "_m", order_by="seq") == children
        parent = store.read(coll, "p")
        assert parent is not None and parent.version == 3

    def test_pop_child_in_a_rolled_back_transaction(self, store: DocumentStore, coll: str) -> None:
        children = self._conversation(store, coll, 2)

        class Undo(Exception):
            pass

        with pytest.raises(Undo), store.transaction():
            assert store.pop_child(coll + "_m", {"conv": "c"}, parent=(coll, "p")) is not None
            assert store.delete_children(coll + "_m", {"conv": "c"}, parent=(coll, "p"))
            raise Undo
        assert store.query(coll + "_m", order_by="seq") == children
        parent = store.read(coll, "p")
        assert parent is not None and parent.version == 3

    def test_concurrent_pops_never_return_the_same_child(
        self, store: DocumentStore, coll: str
    ) -> None:
        total = 40
        children = self._conversation(store, coll, total)

        def work(index: int) -> list[Document]:
            popped = []
            while True:
                result = store.pop_child(coll + "_m", {"conv": "c"}, parent=(coll, "p"))
                assert result is not None
                if result[1] is None:
                    return popped
                popped.append(result[1])

        popped = [child for batch in run_in_threads(THREADS, work) for child in batch]
        assert sorted(popped, key=lambda doc: doc.data["seq"]) == children
        assert store.count(coll + "_m") == 0

    def test_pop_child_sees_an_append_that_committed_while_it_waited(
        self, store: DocumentStore, coll: str
    ) -> None:
        """The pop waits for the parent; once it has it, the newest child is the new one."""
        self._conversation(store, coll, 2)
        appended: dict[str, Document] = {}
        holding, release = threading.Event(), threading.Event()

        def append_and_hold() -> None:
            with store.transaction():
                pair = store.append(coll + "_m", {"conv": "c", "new": True}, parent=(coll, "p"))
                assert pair is not None
                appended["child"] = pair[1]
                holding.set()
                assert release.wait(10)

        with ThreadPoolExecutor(max_workers=2) as pool:
            holder = pool.submit(append_and_hold)
            assert holding.wait(10)
            popper = pool.submit(store.pop_child, coll + "_m", {"conv": "c"}, parent=(coll, "p"))
            # The pop must wait for the uncommitted append's transaction.
            with pytest.raises(FutureTimeout):
                popper.result(timeout=0.3)
            release.set()
            holder.result(timeout=10)
            popped = popper.result(timeout=10)
        assert popped is not None
        assert popped[1] == appended["child"]
        assert popped[0].version == 5

    # ----------------------------------------------------------------- concurrency

    def test_optimistic_increments_lose_nothing(self, store: DocumentStore, coll: str) -> None:
        store.create(coll, {"counter": 0}, id="c")
        per_thread = 10

        def work(index: int) -> int:
            conflicts = 0
            done = 0
            while done < per_thread:
                doc = store.read(coll, "c")
                assert doc is not None
                try:
                    store.update(
                        coll,
                        "c",
                        {"counter": doc.data["counter"] + 1},
                        expected_version=doc.version,
                    )
                except VersionConflict:
                    conflicts += 1
                else:
                    done += 1
            return conflicts

        run_in_threads(THREADS, work)
        final = store.read(coll, "c")
        assert final is not None
        assert final.data == {"counter": THREADS * per_thread}
        assert final.version == 1 + THREADS * per_thread

    def test_concurrent_upserts_are_atomic(self, store: DocumentStore, coll: str) -> None:
        results = run_in_threads(THREADS, lambda i: store.upsert(coll, "u", {f"k{i}": i}))
        assert sorted(doc.version for doc in results) == list(range(1, THREADS + 1))
        final = store.read(coll, "u")
        assert final is not None
        assert final.data == {f"k{i}": i for i in range(THREADS)}
        assert final.version == THREADS

    def test_concurrent_creates_of_one_id(self, store: DocumentStore, coll: str) -> None:
        def work(index: int) -> str:
            try:
                store.create(coll, {"winner": index}, id="x")
            except DocumentExists:
                return "lost"
            return "won"

        assert sorted(run_in_threads(THREADS, work)) == ["lost"] * (THREADS - 1) + ["won"]
        assert store.count(coll) == 1

    # ----------------------------------------------------------------- transactions

    def test_transaction_commits_together(self, store: DocumentStore, coll: str) -> None:
        store.create(coll, {"n": 0}, id="existing")
        store.create(coll, {}, id="doomed")
        with store.transaction():
            store.create(coll, {"n": 1}, id="new")
            store.update(coll, "existing", {"n": 2})
            store.delete(coll, "doomed")
            # Reads inside the block see the block's own writes.
            inside = store.read(coll, "new")
            assert inside is not None and inside.data == {"n": 1}
            assert store.count(coll) == 2
        assert sorted(ids(store.query(coll))) == ["existing", "new"]
        existing = store.read(coll, "existing")
        assert existing is not None and existing.version == 2

    def test_exception_rolls_everything_back(self, store: DocumentStore, coll: str) -> None:
        existing = store.create(coll, {"n": 0}, id="existing")
        doomed = store.create(coll, {}, id="doomed")
        parent = store.create(coll, {}, id="parent")

        class Boom(Exception):
            pass

        with pytest.raises(Boom):
            with store.transaction():
                store.create(coll, {"n": 1}, id="new")
                store.update(coll, "existing", {"n": 2})
                store.replace(coll, "doomed", {"replaced": True})
                store.delete(coll, "doomed")
                store.upsert(coll, "upserted", {})
                store.append(coll + "_m", {}, parent=(coll, "parent"))
                raise Boom
        assert store.read(coll, "new") is None
        assert store.read(coll, "upserted") is None
        assert store.read(coll, "existing") == existing
        assert store.read(coll, "doomed") == doomed
        assert store.read(coll, "parent") == parent
        assert store.count(coll + "_m") == 0
        pair = store.append(coll + "_m", {}, parent=(coll, "parent"))
        assert pair is not None and pair[1].data["seq"] == 1
        assert store.list_collections() == sorted([coll, coll + "_m"])

    def test_nested_blocks_join_the_outer_one(self, store: DocumentStore, coll: str) -> None:
        with pytest.raises(RuntimeError):
            with store.transaction():
                store.create(coll, {}, id="outer")
                with store.transaction():
                    store.create(coll, {}, id="inner")
                assert store.read(coll, "inner") is not None
                raise RuntimeError("after the inner block ended")
        assert store.read(coll, "outer") is None
        assert store.read(coll, "inner") is None
        with store.transaction():
            store.create(coll, {}, id="a")
            with store.transaction():
                store.create(coll, {}, id="b")
        assert sorted(ids(store.query(coll))) == ["a", "b"]

    def test_exception_leaving_an_inner_block_rolls_back_the_outer_one(
        self, store: DocumentStore, coll: str
    ) -> None:
        with pytest.raises(KeyError):
            with store.transaction():
                store.create(coll, {}, id="outer")
                with store.transaction():
                    store.create(coll, {}, id="inner")
                    raise KeyError("inner")
        assert store.count(coll) == 0
        store.create(coll, {}, id="after")
        assert ids(store.query(coll)) == ["after"]

    def test_an_exception_leaving_a_nested_block_undoes_only_that_block(
        self, store: DocumentStore, coll: str
    ) -> None:
        # docs/docstore.md: a nested block is a savepoint (as Django's atomic).
        with store.transaction():
            store.create(coll, {}, id="outer")
            try:
                with store.transaction():
                    store.create(coll, {}, id="inner")
                    raise KeyError("inner")
            except KeyError:
                pass
            store.create(coll, {}, id="after")
        assert store.read(coll, "inner") is None
        assert store.read(coll, "outer") is not None
        assert store.read(coll, "after") is not None

    def test_a_failed_call_does_not_abort_the_transaction(
        self, store: DocumentStore, coll: str
    ) -> None:
        original = store.create(coll, {"v": 1}, id="taken")
        with store.transaction():
            store.create(coll, {}, id="a")
            with pytest.raises(DocumentExists):
                store.create(coll, {"v": 2}, id="taken")
            with pytest.raises(VersionConflict):
                store.update(coll, "taken", {"v": 3}, expected_version=7)
            with pytest.raises(InvalidDocument):
                store.create(coll, {"bad": {1, 2}}, id="bad")
            store.create(coll, {}, id="b")
        assert sorted(ids(store.query(coll))) == ["a", "b", "taken"]
        assert store.read(coll, "taken") == original

    def test_other_threads_never_see_uncommitted_changes(
        self, store: DocumentStore, coll: str, other: str
    ) -> None:
        store.create(coll, {"n": 0}, id="existing")

        def reader() -> tuple[Document | None, int | None]:
            new = store.read(coll, "new")
            existing = store.read(coll, "existing")
            return new, None if existing is None else existing.version

        def writer() -> Document:
            return store.create(other, {}, id="from another thread")

        with ThreadPoolExecutor(max_workers=2) as pool:
            with pytest.raises(RuntimeError):
                with store.transaction():
                    store.create(coll, {"n": 1}, id="new")
                    store.update(coll, "existing", {"n": 2})
                    seen = pool.submit(reader)
                    written = pool.submit(writer)
                    # A locking store makes the other threads wait until the block ends,
                    # an MVCC store answers them at once: either is fine, as long as
                    # nobody sees what is about to be rolled back.
                    futures_wait([seen, written], timeout=2)
                    raise RuntimeError("roll back")
            assert seen.result(timeout=30) == (None, 1)
            # The other thread's write was not part of this thread's transaction.
            from_other_thread = written.result(timeout=30)
            assert store.read(other, "from another thread") == from_other_thread
        assert store.read(coll, "new") is None
        existing = store.read(coll, "existing")
        assert existing is not None and existing.version == 1

    def test_other_threads_see_only_committed_changes(
        self, store: DocumentStore, coll: str
    ) -> None:
        store.create(coll, {"n": 0}, id="existing")
        commit_began = threading.Event()

        def reader() -> tuple[int, bool]:
            """Return the version read and whether the commit had begun when it was read."""
            doc = store.read(coll, "existing")
            assert doc is not None
            return doc.version, commit_began.is_set()

        with ThreadPoolExecutor(max_workers=1) as pool:
            with store.transaction():
                store.update(coll, "existing", {"n": 1})
                during = pool.submit(reader)
                # An MVCC store answers at once (version 1); a locking store makes
                # the reader wait for the commit (version 2): either is fine.
                futures_wait([during], timeout=2)
                commit_began.set()
            version, after_commit_began = during.result(timeout=30)
            # Version 2 read before the commit began is an uncommitted change seen.
            assert version == 1 or after_commit_began, "another thread saw an uncommitted version"
            assert pool.submit(reader).result(timeout=30) == (2, True)

    def test_store_works_after_transactions(self, store: DocumentStore, coll: str) -> None:
        for _ in range(3):
            with pytest.raises(ValueError):
                with store.transaction():
                    store.create(coll, {})
                    raise ValueError("again")
            with store.transaction():
                store.create(coll, {})
        assert store.count(coll) == 3

    # ----------------------------------------------------------------- hostile names

    @pytest.mark.parametrize("hostile", HOSTILE_NAMES)
    def test_hostile_collection_names_and_ids(self, store: DocumentStore, hostile: str) -> None:
        collection = f"{hostile}{uuid.uuid4().hex[:6]}"
        children = f"{uuid.uuid4().hex[:6]}{hostile}"
        created = store.create(collection, {"k": hostile}, id=hostile)
        assert created.id == hostile and created.collection == collection
        assert store.read(collection, hostile) == created
        assert store.read(collection, hostile + "x") is None
        assert ids(store.query(collection, {"k": hostile})) == [hostile]
        assert ids(store.query(collection, {"k": {"$in": [hostile]}})) == [hostile]
        assert store.count(collection) == 1
        assert store.list_collections() == sorted([collection])
        store.ensure_index(collection, "k", unique=True)
        with pytest.raises(DocumentExists):
            store.create(collection, {"k": hostile}, id=hostile + "2")
        with pytest.raises(DocumentExists):
            store.create(collection, {"k": "other"}, id=hostile)
        updated = store.update(collection, hostile, {"n": 1}, expected_version=1)
        assert updated is not None and updated.data == {"k": hostile, "n": 1}
        assert store.upsert(collection, hostile, {"m": 2}).version == 3
        pair = store.append(children, {"k": hostile}, parent=(collection, hostile), id=hostile)
        assert pair is not None and pair[1].id == hostile and pair[1].data["seq"] == 1
        assert store.list_collections() == sorted([collection, children])
        assert store.delete_many(children, {"parent": hostile}) == 1
        assert store.delete(collection, hostile, expected_version=4) is True
        store.create(collection, {}, id=hostile)
        assert store.delete_collection(collection) is True
        assert store.list_collections() == []

    # ----------------------------------------------------------------- lifecycle

    def test_store_is_a_context_manager(
        self, make_store: Callable[..., DocumentStore], coll: str
    ) -> None:
        with make_store() as store:
            assert isinstance(store, DocumentStore)
            assert store.create(coll, {}).version == 1
        store.close()  # closing twice is harmless
