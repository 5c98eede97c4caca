"""The history checker: a workload that records every call, and the checks run on the record.

`run_worker` drives one SessionStore from one thread (several threads, and a
child process through `fault_worker.py`, run it at once) while the test
injects faults. Every call is an `Op`: what was called, on which session, when
it started and ended (`time.monotonic()`, one clock for every process on
Linux), and its result or the qualified name of the exception it raised.
`check` then looks for lost writes, stale reads, untyped errors and slow calls.
"""

from __future__ import annotations

import dataclasses
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from session import SessionStore

__all__ = ["Op", "Recorder", "run_worker", "check", "FaultWindow", "ALLOWED_ERRORS"]

# The typed errors of API.md that a call may raise under faults.
ALLOWED_ERRORS = {"session.errors.StoreUnavailable"}


@dataclass
class Op:
    worker: str
    kind: str
    session: str
    start: float
    end: float = 0.0
    error: str | None = None
    version: int | None = None  # the session version a read saw / a write returned
    value: int | None = None  # update: the counter written; get: the worker's counter seen
    message_id: str | None = None
    seq: int | None = None
    seqs: list[int] = field(default_factory=list)  # get_messages: the seqs returned
    gone: bool = False  # get: None returned / delete: returned True

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class FaultWindow:
    """A fault from `start` to `end`; `redis` faults void the no-stale-read rule for a while."""

    kind: str
    start: float
    end: float
    redis: bool


class Recorder:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.ops: list[Op] = []

    def call(self, op: Op, run: Callable[[], Any]) -> Any:
        try:
            result = run()
        except Exception as exc:
            op.end = time.monotonic()
            op.error = f"{type(exc).__module__}.{type(exc).__qualname__}"
            result = None
        else:
            op.end = time.monotonic()
        with self._lock:
            self.ops.append(op)
        return result


def run_worker(
    store: SessionStore,
    worker: str,
    session_ids: Sequence[str],
    user_id: str,
    stop_at: float,
    recorder: Recorder,
    seed: int,
) -> None:
    """Update, append (retrying ids), read, list, create and delete until `stop_at`."""
    rng = random.Random(seed)
    counter = 0
    acked: list[tuple[str, str, int]] = []  # (session, message_id, seq)
    unacked: list[tuple[str, str]] = []  # appends that failed: retried later, same id
    message_number = 0
    while time.monotonic() < stop_at:
        session_id = rng.choice(session_ids)
        roll = rng.random()
        if roll < 0.25:
            counter += 1
            op = Op(worker, "update", session_id, time.monotonic(), value=counter)
            session = recorder.call(
                op, partial(store.update_session, session_id, {worker: counter})
            )
            if session is not None:
                op.version = session.version
        elif roll < 0.45:
            if unacked and rng.random() < 0.5:
                session_id, message_id = unacked.pop(0)
            elif acked and rng.random() < 0.1:
                session_id, message_id, _ = rng.choice(acked)
            else:
                message_number += 1
                message_id = f"{worker}-{message_number}"
            op = Op(worker, "append", session_id, time.monotonic(), message_id=message_id)
            message = recorder.call(
                op,
                partial(store.add_message, session_id, "user", message_id, message_id=message_id),
            )
            if message is None:
                unacked.append((session_id, message_id))
            else:
                op.seq = message.seq
                acked.append((session_id, message_id, message.seq))
        elif roll < 0.75:
            op = Op(worker, "get", session_id, time.monotonic())
            session = recorder.call(op, partial(store.get_session, session_id))
            if op.ok:
                op.gone = session is None
                if session is not None:
                    op.version = session.version
        elif roll < 0.88:
            op = Op(worker, "messages", session_id, time.monotonic())
            messages = recorder.call(op, partial(store.get_messages, session_id, limit=20))
            if messages is not None:
                op.seqs = [message.seq for message in messages]
        elif roll < 0.94:
            op = Op(worker, "list", user_id, time.monotonic())
            recorder.call(op, lambda: store.list_sessions(user_id, limit=10))
        else:
            _create_and_delete(store, worker, recorder)
        # Not a wait for anything: a think time that spreads the calls over the faults.
        time.sleep(rng.uniform(0, 0.01))


def _create_and_delete(store: SessionStore, worker: str, recorder: Recorder) -> None:
    """Create a private session, read it, delete it, and read it again (must be gone)."""
    op = Op(worker, "create", "", time.monotonic())
    created = recorder.call(op, lambda: store.create_session(f"{worker}-private", {"p": 1}))
    if created is None:
        return
    op.session = created.id
    op.version = created.version
    recorder.call(
        Op(worker, "get", created.id, time.monotonic()), lambda: store.get_session(created.id)
    )
    delete = Op(worker, "delete", created.id, time.monotonic())
    deleted = recorder.call(delete, lambda: store.delete_session(created.id))
    delete.gone = bool(deleted)
    after = Op(worker, "get", created.id, time.monotonic())
    session = recorder.call(after, lambda: store.get_session(created.id))
    if after.ok:
        after.gone = session is None
        if session is not None:
            after.version = session.version


def op_to_dict(op: Op) -> dict[str, Any]:
    return dataclasses.asdict(op)


def op_from_dict(data: dict[str, Any]) -> Op:
    return Op(**data)


def _voided(windows: Sequence[FaultWindow], start: float, end: float, cache_ttl: float) -> bool:
    """True if a Redis fault (or its cache_ttl aftermath) overlaps [start, end]."""
    return any(
        window.redis and window.start <= end and start <= window.end + cache_ttl + 0.5
        for window in windows
    )


def check(
    ops: Sequence[Op],
    *,
    truth: SessionStore,
    session_ids: Sequence[str],
    windows: Sequence[FaultWindow],
    cache_ttl: float,
    latency_bound: float,
) -> list[str]:
    """Return every violation found in the history (empty: the history is correct)."""
    violations: list[str] = []
    # Only the typed errors of API.md escape.
    for op in ops:
        if op.error is not None and op.error not in ALLOWED_ERRORS:
            violations.append(f"{op.worker} {op.kind}: untyped error {op.error}")
    # Latency: no call takes longer than the bound.
    for op in ops:
        if op.end - op.start > latency_bound:
            violations.append(
                f"{op.worker} {op.kind}: took {op.end - op.start:.2f} s (bound {latency_bound} s)"
            )
    # No acknowledged update lost: the docstore holds each worker's last counter (or a later one).
    for session_id in session_ids:
        stored = truth.get_session(session_id)
        if stored is None:
            violations.append(f"session {session_id[:6]} is gone from PostgreSQL")
            continue
        last: dict[str, int] = {}
        for op in ops:
            if op.kind == "update" and op.ok and op.session == session_id:
                last[op.worker] = max(last.get(op.worker, 0), op.value or 0)
        for worker, value in last.items():
            if stored.data.get(worker, 0) < value:
                violations.append(
                    f"lost update: {worker} acked {value} on {session_id[:6]}, "
                    f"PostgreSQL holds {stored.data.get(worker)}"
                )
        # No acknowledged message lost, no duplicate, no gap; retries return the same seq.
        messages = truth.get_messages(session_id)
        seqs = [message.seq for message in messages]
        if seqs != list(range(1, len(seqs) + 1)):
            violations.append(f"messages of {session_id[:6]} are not 1..n: {seqs[:10]}...")
        by_id: dict[str, int] = {}
        for message in messages:
            if message.id in by_id:
                violations.append(f"duplicate message id {message.id}")
            by_id[message.id] = message.seq
        for op in ops:
            if op.kind == "append" and op.ok and op.session == session_id:
                assert op.message_id is not None
                if by_id.get(op.message_id) != op.seq:
                    violations.append(
                        f"acked message {op.message_id} seq {op.seq} is stored as "
                        f"{by_id.get(op.message_id)}"
                    )
    # Messages read back come in order without gaps.
    for op in ops:
        if (
            op.kind == "messages"
            and op.ok
            and op.seqs != list(range(op.seqs[0], op.seqs[0] + len(op.seqs)) if op.seqs else [])
        ):
            violations.append(f"{op.worker} read messages out of order or with gaps: {op.seqs}")
    # No stale read: a read that started after a write returned sees that write or a later one.
    writes = [op for op in ops if op.kind == "update" and op.ok and op.version is not None]
    for read in ops:
        if read.kind != "get" or not read.ok or read.version is None:
            continue
        for write in writes:
            if (
                write.session == read.session
                and write.end < read.start
                and read.version < (write.version or 0)
                and not _voided(windows, write.start, read.end, cache_ttl)
            ):
                violations.append(
                    f"stale read by {read.worker}: v{read.version} after {write.worker}'s "
                    f"v{write.version} returned {read.start - write.end:.3f} s earlier"
                )
                break
    # A deleted session never comes back.
    deleted = {op.session: op.end for op in ops if op.kind == "delete" and op.ok and op.gone}
    for read in ops:
        if read.kind == "get" and read.ok and not read.gone and read.session in deleted:
            if read.start > deleted[read.session] and not _voided(
                windows, deleted[read.session], read.end, cache_ttl
            ):
                violations.append(f"deleted session {read.session[:6]} read back by {read.worker}")
    return violations
