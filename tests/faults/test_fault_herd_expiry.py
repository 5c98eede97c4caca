"""A thundering herd on one hot session, and sessions expiring while readers and a touch race."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from fault_summary import FaultSummary

from docstore import PostgresDocumentStore
from session import Session, SessionStore

pytestmark = [pytest.mark.faults, pytest.mark.embedded]

READERS = 100
# How long a reader waits for another's fill before reading PostgreSQL itself.
# The default (0.1 s) is tuned for latency; on a loaded 2-core machine one fill
# can take longer, and this test is about the lease, not about that budget.
LEASE_WAIT = 1.5


def run_together(count: int, work: Callable[[int], object]) -> list[object]:
    """Run `work(i)` in `count` threads released at once; return the results in order."""
    barrier = threading.Barrier(count)
    results: list[object] = [None] * count
    errors: list[BaseException] = []

    def run(index: int) -> None:
        barrier.wait()
        try:
            results[index] = work(index)
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors[:3]
    return results


def test_thundering_herd_reads_postgres_a_handful_of_times(
    make_docstore: Callable[..., PostgresDocumentStore],
    make_session_store: Callable[..., SessionStore],
    fault_summary: FaultSummary,
) -> None:
    docstore = make_docstore(max_connections=10)
    store = make_session_store(docstore=docstore, proxied=False, lease_wait=LEASE_WAIT)
    session = store.update_session(store.create_session(data={"hot": True}).id, {"n": 1})
    reads = 0
    lock = threading.Lock()
    real_read = docstore.read

    def counted_read(collection: str, id: str) -> Any:
        nonlocal reads
        with lock:
            reads += 1
        return real_read(collection, id)

    docstore.read = counted_read  # type: ignore[method-assign]
    fault_summary.add_fault("thundering herd (100 readers, one cold session)")
    started = time.monotonic()
    results = run_together(READERS, lambda _: store.get_session(session.id))
    fault_summary.add_latencies("thundering herd", [time.monotonic() - started])
    fault_summary.add_operations(READERS)
    assert all(result == session for result in results)
    fault_summary.add_note(
        f"thundering herd, one store: {READERS} readers, {reads} PostgreSQL reads"
    )
    assert reads <= 5, f"PostgreSQL was read {reads} times"


def test_thundering_herd_across_stores(
    make_docstore: Callable[..., PostgresDocumentStore],
    make_session_store: Callable[..., SessionStore],
    fault_summary: FaultSummary,
) -> None:
    """Ten stores (as ten processes would), ten readers each, one fill lease between them."""
    docstores = [make_docstore(max_connections=2) for _ in range(10)]
    stores = [
        make_session_store(docstore=docstore, proxied=False, lease_wait=LEASE_WAIT)
        for docstore in docstores
    ]
    session = stores[0].create_session(data={"hot": True})
    reads = 0
    lock = threading.Lock()
    for docstore in docstores:
        real_read = docstore.read

        def counted_read(collection: str, id: str, real_read: Any = real_read) -> Any:
            nonlocal reads
            with lock:
                reads += 1
            return real_read(collection, id)

        docstore.read = counted_read  # type: ignore[method-assign]
    results = run_together(READERS, lambda i: stores[i % 10].get_session(session.id))
    fault_summary.add_operations(READERS)
    assert all(result == session for result in results)
    fault_summary.add_note(
        f"thundering herd, ten stores: {READERS} readers, {reads} PostgreSQL reads"
    )
    assert reads <= 5, f"PostgreSQL was read {reads} times"


def test_expiry_at_the_boundary_never_comes_back(
    make_docstore: Callable[..., PostgresDocumentStore],
    make_session_store: Callable[..., SessionStore],
    fault_summary: FaultSummary,
) -> None:
    """Readers (cached and uncached) and a touch race a 0.3 s idle expiry."""
    ttl = 0.3
    store = make_session_store(session_ttl=ttl)
    uncached = make_session_store(cached=False, session_ttl=ttl)
    fault_summary.add_fault("session expiring under readers and a touch")
    # (call, started, ended (monotonic), wall clock when it started, result)
    history: list[tuple[str, float, float, float, object]] = []
    lock = threading.Lock()
    for round_number in range(3):
        session = store.create_session(data={"round": round_number})
        stop = threading.Event()
        rng = random.Random(round_number)

        def record(kind: str, call: Callable[[], object]) -> object:
            started, started_wall = time.monotonic(), time.time()
            result = call()
            with lock:
                history.append((kind, started, time.monotonic(), started_wall, result))
            return result

        def read(
            reader: SessionStore, session: Session = session, stop: threading.Event = stop
        ) -> None:
            while not stop.is_set():
                record(f"get {session.id}", lambda: reader.get_session(session.id))

        def touch(
            session: Session = session, rng: random.Random = rng, stop: threading.Event = stop
        ) -> None:
            # Touch at random gaps around the ttl until one comes too late.
            while not stop.is_set():
                time.sleep(rng.uniform(0.1, 0.45))  # the race: a gap near the boundary
                alive = record(f"touch {session.id}", lambda: store.touch_session(session.id))
                if not alive:
                    break

        threads = [
            threading.Thread(target=read, args=(reader,)) for reader in (store, store, uncached)
        ]
        threads.append(threading.Thread(target=touch))
        for thread in threads:
            thread.start()
        threads[-1].join(timeout=30)
        time.sleep(0.3)  # keep reading for a while after it expired
        stop.set()
        for thread in threads:
            thread.join(timeout=10)
        # Check: once anything saw the session gone, nothing that started later sees it.
        mine = [entry for entry in history if entry[0].endswith(session.id)]
        gone_at = min(
            (end for kind, _, end, _, result in mine if result is None or result is False),
            default=None,
        )
        assert gone_at is not None, "the session never expired"
        for kind, started, _, started_wall, result in mine:
            if started > gone_at:
                assert result in (None, False), f"{kind.split()[0]} saw it after it expired"
            if isinstance(result, Session):
                # Not expired when the call started, by the clock the store uses (time.time).
                assert result.expires_at is not None
                assert result.expires_at.timestamp() > started_wall
        assert store.get_session(session.id) is None
        assert uncached.get_session(session.id) is None
        assert store.touch_session(session.id) is False
    fault_summary.add_operations(len(history))
