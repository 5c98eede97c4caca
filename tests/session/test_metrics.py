"""`session.metrics.instrument`: Prometheus histograms and counters, OpenTelemetry spans."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import fakeredis
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry, generate_latest

from docstore import MemoryDocumentStore
from session import SessionNotFound, SessionStore
from session.metrics import OPERATIONS, instrument
from session.store import STAT_NAMES, short_hash


@pytest.fixture
def store() -> Iterator[SessionStore]:
    client = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    with SessionStore(MemoryDocumentStore(), client, owns_cache=True) as built:
        yield built


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    value: float | None = registry.get_sample_value(name, labels)
    return value


def test_an_uninstrumented_store_runs_its_own_methods(store: SessionStore) -> None:
    # Zero cost when off: nothing is wrapped, the class's methods are called directly.
    assert not set(OPERATIONS) & set(vars(store))
    instrument(store, registry=CollectorRegistry(), tracing=False)
    offered = {name for name in OPERATIONS if hasattr(SessionStore, name)}
    assert offered >= {"get_session", "add_message", "get_messages"}
    assert offered <= set(vars(store))


def test_latency_by_operation_and_outcome(store: SessionStore) -> None:
    registry = CollectorRegistry()
    instrument(store, registry=registry, tracing=False)
    created = store.create_session("u", {})
    store.get_session(created.id)  # miss: PostgreSQL, then filled
    store.get_session(created.id)  # hit
    store.get_session(created.id)  # hit
    store.add_message(created.id, "user", "hi")
    store.get_messages(created.id)
    with pytest.raises(SessionNotFound):
        store.update_session("no-such-session", {})
    count = "session_store_operation_seconds_count"
    assert sample(registry, count, operation="get_session", outcome="miss") == 1
    assert sample(registry, count, operation="get_session", outcome="hit") == 2
    assert sample(registry, count, operation="create_session", outcome="write") == 1
    assert sample(registry, count, operation="add_message", outcome="write") == 1
    assert sample(registry, count, operation="update_session", outcome="error") == 1
    messages = [
        sample(registry, count, operation="get_messages", outcome=outcome)
        for outcome in ("hit", "miss")
    ]
    assert sum(value or 0 for value in messages) == 1
    assert (sample(registry, "session_store_operation_seconds_sum", operation="get_session",
                   outcome="hit") or 0) > 0  # fmt: skip


def test_store_counters_are_read_at_scrape_time(store: SessionStore) -> None:
    registry = CollectorRegistry()
    instrument(store, registry=registry, tracing=False)
    created = store.create_session("u", {})
    store.get_session(created.id)
    store.get_session(created.id)
    stats = store.stats()
    for name in STAT_NAMES:
        kind = "" if name == "invalidations_pending" else "_total"
        assert sample(registry, f"session_store_{name}{kind}") == stats[name]
    assert sample(registry, "session_store_breaker_open") == 0
    text = generate_latest(registry).decode()
    assert "session_store_hits_total 1.0" in text
    assert "# TYPE session_store_operation_seconds histogram" in text


def test_a_span_around_each_public_call_without_the_session_id(store: SessionStore) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    instrument(store, prometheus=False, tracer_provider=provider)
    created = store.create_session("u", {})
    store.get_session(created.id)
    spans = exporter.get_finished_spans()
    assert [span.name for span in spans] == ["session.create_session", "session.get_session"]
    attributes = dict(spans[1].attributes or {})
    assert attributes == {"session.id_hash": short_hash(created.id), "session.outcome": "miss"}
    assert all(created.id not in str(span.attributes) for span in spans)


def test_nothing_changes_without_the_optional_packages(
    store: SessionStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    monkeypatch.setitem(sys.modules, "opentelemetry", None)
    assert instrument(store) is store
    assert not set(OPERATIONS) & set(vars(store))
    created = store.create_session("u", {})
    assert store.get_session(created.id) is not None


def test_outcomes_of_concurrent_calls_do_not_mix(store: SessionStore) -> None:
    registry = CollectorRegistry()
    instrument(store, registry=registry, tracing=False)
    cached = store.create_session("u", {})
    store.get_session(cached.id)  # filled: every later lookup is a hit
    missing = [f"missing-{n}" for n in range(50)]

    def work(index: int) -> None:
        for n in range(50):
            if index % 2:
                store.get_session(cached.id)
            else:
                store.get_session(missing[n] + str(index))

    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(work, range(4)))
    count = "session_store_operation_seconds_count"
    assert sample(registry, count, operation="get_session", outcome="hit") == 100
    assert sample(registry, count, operation="get_session", outcome="miss") == 101
