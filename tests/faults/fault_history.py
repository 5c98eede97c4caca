"""The history checker: a workload that records every call, and the checks run on the record.

`workload` is what one worker does (a generator of calls); `run_worker` runs
it on one SessionStore from one thread (several threads, and child processes
through `fault_worker.py`, run it at once), `run_async_worker` on an
AsyncSessionStore from one asyncio task, while the test injects faults.
Every call is an `Op`: what was called, on which session, when it started
and ended (`time.monotonic()`, one clock for every process on Linux), and
its result or the qualified name of the exception it raised.
`check` then looks for lost writes, stale reads, untyped errors and slow calls.
A stale read is excused only by a Redis fault (see `_excused`), never by the
state of a circuit breaker: the breaker is part of the code under test.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Generator, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol

from session import SessionStore

if TYPE_CHECKING:
    from session import AsyncSessionStore

__all__ = [
    "Op",
    "Recorder",
    "run_worker",
    "run_async_worker",
    "workload",
    "check",
    "FaultWindow",
    "Truth",
    "ALLOWED_ERRORS",
    "RECOVERY_MARGIN",
]

# The typed errors of API.md that a call may raise under faults.
ALLOWED_ERRORS = {"session.errors.StoreUnavailable"}
# How long after a Redis fault ends a read may still see an older copy: once
# Redis has been healthy this long, no reader anywhere may miss a returned write.
RECOVERY_MARGIN = 0.5
# get_messages(limit=...) as run_worker calls it.
MESSAGES_LIMIT = 20


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
    """A fault from `start` to `end`; `redis` faults may excuse stale reads (`_excused`)."""

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
            return self._record(op, None, exc)
        return self._record(op, result, None)

    async def acall(self, op: Op, call: Awaitable[Any]) -> Any:
        try:
            result = await call
        except Exception as exc:
            return self._record(op, None, exc)
        return self._record(op, result, None)

    def _record(self, op: Op, result: Any, exc: Exception | None) -> Any:
        op.end = time.monotonic()
        if exc is not None:
            op.error = f"{type(exc).__module__}.{type(exc).__qualname__}"
        with self._lock:
            self.ops.append(op)
        return result


# What a workload asks its runner to do: call a store method and record it as `op`
# (the result, None if it raised, is sent back), or think for a while.
Call = tuple[Op, str, tuple[Any, ...], dict[str, Any]]
Think = float
Workload = Generator[Call | Think, Any, None]


def run_worker(
    store: SessionStore,
    worker: str,
    session_ids: Sequence[str],
    user_id: str,
    stop_at: float,
    recorder: Recorder,
    seed: int,
) -> None:
    """Run `workload` on a SessionStore from this thread."""
    steps = workload(worker, session_ids, user_id, stop_at, seed)
    try:
        step = next(steps)
        while True:
            if isinstance(step, float):
                # Not a wait for anything: a think time that spreads the calls over the faults.
                time.sleep(step)
                step = steps.send(None)
            else:
                op, method, args, kwargs = step
                step = steps.send(
                    recorder.call(op, partial(getattr(store, method), *args, **kwargs))
                )
    except StopIteration:
        pass


async def run_async_worker(
    store: AsyncSessionStore,
    worker: str,
    session_ids: Sequence[str],
    user_id: str,
    stop_at: float,
    recorder: Recorder,
    seed: int,
) -> None:
    """Run `workload` on an AsyncSessionStore from this task: the same calls, awaited."""
    steps = workload(worker, session_ids, user_id, stop_at, seed)
    try:
        step = next(steps)
        while True:
            if isinstance(step, float):
                await asyncio.sleep(step)  # the think time, as above
                step = steps.send(None)
            else:
                op, method, args, kwargs = step
                step = steps.send(await recorder.acall(op, getattr(store, method)(*args, **kwargs)))
    except StopIteration:
        pass


def workload(
    worker: str, session_ids: Sequence[str], user_id: str, stop_at: float, seed: int
) -> Workload:
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
            session = yield op, "update_session", (session_id, {worker: counter}), {}
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
            message = yield (
                op,
                "add_message",
                (session_id, "user", message_id),
                {"message_id": message_id},
            )
            if message is None:
                unacked.append((session_id, message_id))
            else:
                op.seq = message.seq
                acked.append((session_id, message_id, message.seq))
        elif roll < 0.75:
            op = Op(worker, "get", session_id, time.monotonic())
            session = yield op, "get_session", (session_id,), {}
            if op.ok:
                op.gone = session is None
                if session is not None:
                    op.version = session.version
        elif roll < 0.88:
            op = Op(worker, "messages", session_id, time.monotonic())
            messages = yield op, "get_messages", (session_id,), {"limit": MESSAGES_LIMIT}
            if messages is not None:
                op.seqs = [message.seq for message in messages]
        elif roll < 0.94:
            op = Op(worker, "list", user_id, time.monotonic())
            yield op, "list_sessions", (user_id,), {"limit": 10}
        else:
            yield from _create_and_delete(worker)
        yield rng.uniform(0, 0.01)


def _create_and_delete(worker: str) -> Workload:
    """Create a private session, read it, delete it, and read it again (must be gone)."""
    op = Op(worker, "create", "", time.monotonic())
    created = yield op, "create_session", (f"{worker}-private", {"p": 1}), {}
    if created is None:
        return
    op.session = created.id
    op.version = created.version
    yield Op(worker, "get", created.id, time.monotonic()), "get_session", (created.id,), {}
    delete = Op(worker, "delete", created.id, time.monotonic())
    deleted = yield delete, "delete_session", (created.id,), {}
    delete.gone = bool(deleted)
    after = Op(worker, "get", created.id, time.monotonic())
    session = yield after, "get_session", (created.id,), {}
    if after.ok:
        after.gone = session is None
        if session is not None:
            after.version = session.version


def op_to_dict(op: Op) -> dict[str, Any]:
    return dataclasses.asdict(op)


def op_from_dict(data: dict[str, Any]) -> Op:
    return Op(**data)


class Truth(Protocol):
    """What PostgreSQL holds after the run (a SessionStore without a cache)."""

    def get_session(self, session_id: str) -> Any: ...

    def get_messages(self, session_id: str) -> Sequence[Any]: ...


@dataclass(frozen=True)
class _Write:
    """An acknowledged write a later read must reflect: `version`/`seq` None for a delete."""

    op: Op
    version: int | None = None
    seq: int | None = None


def _in_recovery(windows: Sequence[FaultWindow], read: Op) -> bool:
    """True if the read overlaps a Redis fault or the margin right after it."""
    return any(
        window.redis and read.start <= window.end + RECOVERY_MARGIN and window.start <= read.end
        for window in windows
    )


def _excused(windows: Sequence[FaultWindow], write: Op, read: Op, cache_ttl: float) -> bool:
    """True if a read may miss `write`: only because of a Redis fault, never of breaker state.

    Either the read overlaps a Redis fault or its recovery margin, or the write
    overlapped a Redis fault (its cache update may have failed, leaving a copy
    that lives at most `cache_ttl`) and the read started within `cache_ttl` of it.
    """
    if _in_recovery(windows, read):
        return True
    return read.start <= write.end + cache_ttl and any(
        window.redis and window.start <= write.end and write.start <= window.end
        for window in windows
    )


def check(
    ops: Sequence[Op],
    *,
    truth: Truth,
    session_ids: Sequence[str],
    windows: Sequence[FaultWindow],
    cache_ttl: float,
    latency_bound: float,
    coverage: Counter[str] | None = None,
) -> list[str]:
    """Return every violation found in the history (empty: the history is correct).

    `coverage`, if given, counts the reads checked: `reads`, those that followed
    an acknowledged write (`reads after a write`), and those a Redis fault's
    recovery window would excuse (`reads in a recovery window`).
    """
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
    violations += _check_durability(ops, truth, session_ids)
    violations += _check_reads(ops, windows, cache_ttl, Counter() if coverage is None else coverage)
    return violations


def _check_durability(ops: Sequence[Op], truth: Truth, session_ids: Sequence[str]) -> list[str]:
    """PostgreSQL holds every acknowledged update and message, once, in order."""
    violations: list[str] = []
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
    return violations


def _check_reads(
    ops: Sequence[Op], windows: Sequence[FaultWindow], cache_ttl: float, coverage: Counter[str]
) -> list[str]:
    """Every read reflects every write acknowledged before it started, unless excused."""
    violations: list[str] = []
    writes: dict[str, list[_Write]] = {}
    created: dict[str, float] = {}
    deleted: dict[str, Op] = {}
    for op in ops:
        if not op.ok:
            continue
        if op.kind == "update" and op.version is not None:
            writes.setdefault(op.session, []).append(_Write(op, version=op.version))
        elif op.kind == "append" and op.seq is not None:
            writes.setdefault(op.session, []).append(_Write(op, seq=op.seq))
        elif op.kind == "create" and op.session:
            created[op.session] = op.end
        elif op.kind == "delete" and op.gone:
            deleted[op.session] = op
            writes.setdefault(op.session, []).append(_Write(op))
    for read in ops:
        if not read.ok or read.kind not in ("get", "messages"):
            continue
        before = [w for w in writes.get(read.session, ()) if w.op.end < read.start]
        coverage["reads"] += 1
        coverage["reads after a write"] += bool(before)
        coverage["reads in a recovery window"] += _in_recovery(windows, read)
        if read.kind == "get":
            violations += _check_get(read, before, created, deleted, windows, cache_ttl)
        else:
            violations += _check_messages(read, before, windows, cache_ttl)
    return violations


def _check_get(
    read: Op,
    before: list[_Write],
    created: dict[str, float],
    deleted: dict[str, Op],
    windows: Sequence[FaultWindow],
    cache_ttl: float,
) -> list[str]:
    delete = deleted.get(read.session)
    if read.gone:
        # None for a live session is never excused: ids are never reused, and
        # no fault may turn a session into "missing".
        live = delete is None or delete.start > read.end
        known = read.session not in created or created[read.session] < read.start
        if live and known:
            return [f"{read.worker} got None for live session {read.session[:6]}"]
        return []
    for write in before:
        if write.op.kind == "delete":
            if not _excused(windows, write.op, read, cache_ttl):
                return [f"deleted session {read.session[:6]} read back by {read.worker}"]
        elif (
            write.version is not None
            and (read.version or 0) < write.version
            and not _excused(windows, write.op, read, cache_ttl)
        ):
            return [
                f"stale read by {read.worker}: v{read.version} of {read.session[:6]} after "
                f"{write.op.worker}'s v{write.version} returned "
                f"{read.start - write.op.end:.3f} s earlier"
            ]
    return []


def _check_messages(
    read: Op, before: list[_Write], windows: Sequence[FaultWindow], cache_ttl: float
) -> list[str]:
    """The newest messages, without gaps, including every one acknowledged before the read."""
    seqs = read.seqs
    top = seqs[-1] if seqs else 0
    if seqs != list(range(max(1, top - MESSAGES_LIMIT + 1), top + 1)):
        return [f"{read.worker} read messages out of order, with gaps or cut short: {seqs}"]
    for write in before:
        if write.seq is not None and write.seq > top:
            if not _excused(windows, write.op, read, cache_ttl):
                return [
                    f"{read.worker} read messages of {read.session[:6]} up to {top}, missing "
                    f"{write.op.worker}'s seq {write.seq} acknowledged "
                    f"{read.start - write.op.end:.3f} s earlier"
                ]
    return []
