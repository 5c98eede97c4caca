"""`dump()` and `restore()`: what export and import are built on, against every store."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone

import pytest
from postgres_tables import drop_tables, unique_table

from docstore import (
    Document,
    DocumentExists,
    DocumentStore,
    InvalidDocument,
    MemoryDocumentStore,
    PostgresDocumentStore,
)


@pytest.fixture(
    params=[
        "memory",
        pytest.param("embedded", marks=pytest.mark.embedded),
        pytest.param("real", marks=pytest.mark.postgres),
    ]
)
def make_store(request: pytest.FixtureRequest) -> Iterator[Callable[[], DocumentStore]]:
    """Yield a builder of stores; the PostgreSQL ones share one fresh table per call."""
    built: list[DocumentStore] = []
    tables: list[str] = []
    dsn = ""
    if request.param != "memory":
        dsn = request.getfixturevalue("embedded_dsn" if request.param == "embedded" else "real_dsn")

    def make() -> DocumentStore:
        store: DocumentStore
        if request.param == "memory":
            store = MemoryDocumentStore()
        else:
            tables.append(unique_table())
            store = PostgresDocumentStore(dsn, table=tables[-1])
        built.append(store)
        return store

    yield make
    for store in built:
        store.close()
    if tables:
        drop_tables(dsn, tables + [f"{table}_meta" for table in tables])


def moment(seconds: float) -> datetime:
    return datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc) + timedelta(seconds=seconds)


def test_dump_pages_by_created_at_with_counters(make_store: Callable[[], DocumentStore]) -> None:
    store = make_store()
    for n in range(7):
        store.create("p", {"n": n, "user": "a" if n % 2 else "b"}, id=f"d{n}")
    store.append("kids", {"x": 1}, parent=("p", "d3"))
    store.append("kids", {"x": 2}, parent=("p", "d3"))
    pages: list[list[str]] = []
    after = None
    while True:
        page = store.dump("p", limit=3, after=after)
        if not page:
            break
        pages.append([item.document.id for item in page])
        after = page[-1].document
    assert [len(page) for page in pages] == [3, 3, 1]
    everything = store.dump("p", limit=100)
    assert [item.document.id for item in everything] == sum(pages, [])
    assert [item.document.created_at for item in everything] == sorted(
        item.document.created_at for item in everything
    )
    counters = {item.document.id: item.counter for item in everything}
    assert counters["d3"] == 2 and counters["d0"] == 0
    only_a = store.dump("p", {"user": "a"})
    assert sorted(item.document.id for item in only_a) == ["d1", "d3", "d5"]


def test_dump_leaves_out_expired_documents_unless_asked(
    make_store: Callable[[], DocumentStore],
) -> None:
    store = make_store()
    store.create("p", {}, id="live")
    store.restore(Document("gone", "p", {"old": True}, moment(0), moment(1), 4, moment(2)))
    assert [item.document.id for item in store.dump("p")] == ["live"]
    both = store.dump("p", include_expired=True)
    assert [item.document.id for item in both] == ["gone", "live"]
    assert both[0].document.expires_at == moment(2)


def test_restore_writes_exactly_what_it_is_given(make_store: Callable[[], DocumentStore]) -> None:
    store = make_store()
    document = Document("x", "p", {"a": [1, {"b": None}]}, moment(0), moment(5), 7, None)
    assert store.restore(document, counter=9) is None
    assert store.read("p", "x") == document
    assert store.dump("p")[0].counter == 9
    # The counter carries on: the next append gets seq 10, never an old seq.
    appended = store.append("kids", {}, parent=("p", "x"))
    assert appended is not None and appended[1].data["seq"] == 10


def test_restore_over_a_live_document_changes_nothing(
    make_store: Callable[[], DocumentStore],
) -> None:
    store = make_store()
    live = store.create("p", {"mine": True}, id="x")
    found = store.restore(Document("x", "p", {"theirs": True}, moment(0), moment(0), 1, None))
    assert found == live
    assert store.read("p", "x") == live


def test_restore_replaces_an_expired_document(make_store: Callable[[], DocumentStore]) -> None:
    store = make_store()
    store.restore(Document("x", "p", {"old": 1}, moment(0), moment(0), 3, moment(1)), counter=5)
    fresh = Document("x", "p", {"new": 1}, moment(10), moment(11), 2, None)
    assert store.restore(fresh, counter=1) is None
    assert store.read("p", "x") == fresh
    assert store.dump("p")[0].counter == 1


def test_restore_in_a_transaction_rolls_back_with_it(
    make_store: Callable[[], DocumentStore],
) -> None:
    store = make_store()
    with pytest.raises(RuntimeError), store.transaction():
        store.restore(Document("x", "p", {}, moment(0), moment(0), 1, None))
        raise RuntimeError("interrupted")
    assert store.read("p", "x") is None


def test_restore_respects_unique_indexes_and_refuses_bad_documents(
    make_store: Callable[[], DocumentStore],
) -> None:
    store = make_store()
    store.ensure_index("p", "email", unique=True)
    store.create("p", {"email": "a@example.org"}, id="first")
    with pytest.raises(DocumentExists):
        store.restore(Document("second", "p", {"email": "a@example.org"}, moment(0), moment(0), 1))
    bad = [
        (Document("x", "p", {"n": float("nan")}, moment(0), moment(0), 1), 0),
        (Document("x", "p", {}, datetime(2024, 1, 1), moment(0), 1), 0),  # naive
        (Document("x", "p", {}, moment(0), moment(0), 0), 0),
        (Document("x", "p", {}, moment(0), moment(0), 1), -1),
        (Document("", "p", {}, moment(0), moment(0), 1), 0),
    ]
    for document, counter in bad:
        with pytest.raises(InvalidDocument):
            store.restore(document, counter=counter)
    assert store.read("p", "x") is None


def test_dump_pages_through_equal_creation_times(make_store: Callable[[], DocumentStore]) -> None:
    store = make_store()
    for n in range(7):
        store.restore(Document(f"d{n}", "p", {"n": n}, moment(n // 3), moment(0), 1))
    seen: list[str] = []
    after = None
    while page := store.dump("p", limit=2, after=after):
        seen.extend(item.document.id for item in page)
        after = page[-1].document
    assert seen == [f"d{n}" for n in range(7)]
