"""`python -m session demo`: conversations written, read hot and cold, recovered after a restart.

The demo runs on whatever `get_session_store()` gives (with no variables set:
the embedded PostgreSQL server and an in-process fakeredis). It

1. creates a few sessions, each with a conversation;
2. reads them twice: the first read fills the cache, the second is served by it;
3. restarts: a second process (`demo --recover FILE`) whose cache is empty
   reads every conversation back from PostgreSQL, checks it is intact and in
   order, then reads it again from its cache;
4. continues every conversation in the first process after the restart;
5. deletes its sessions (unless `--keep`).

It prints the hit/miss counters and timings of each step, and exits non-zero
if anything read back differs from what was written. Session ids never appear
in the output, only their short hashes. With a shared Redis (`REDIS_URL`) the
restarted process uses a key prefix of its own, so that its cache really
starts empty, with a short `cache_ttl` (its copies are not invalidated when the
first process deletes the sessions).
"""

from __future__ import annotations

import functools
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TextIO, TypeVar

from .coherence import session_keys
from .config import (
    REDIS_VARIABLE,
    Backends,
    describe_backends,
    get_session_store,
    redis_client_from_url,
)
from .models import Message, Session
from .store import SessionStore, short_hash

__all__ = ["run_demo", "recover", "DEFAULT_SESSIONS", "DEFAULT_MESSAGES"]

T = TypeVar("T")

DEFAULT_SESSIONS = 5
DEFAULT_MESSAGES = 20
# The restarted process's copies live under a prefix nobody invalidates: keep them short-lived.
RESTART_CACHE_TTL = 60
RESTART_TIMEOUT = 120.0
# Stat counters the demo reports, in this order.
REPORTED = ("hits", "misses", "message_hits", "message_misses", "cache_errors")

EXIT_OK = 0
EXIT_MISMATCH = 1
DEFAULT_KEY_PREFIX = "sess:"


@dataclass
class _Timer:
    """Per-call durations of one step, in seconds."""

    durations: list[float] = field(default_factory=list)

    def __call__(self, call: Callable[[], T]) -> T:
        started = time.perf_counter()
        result = call()
        self.durations.append(time.perf_counter() - started)
        return result

    def summary(self) -> str:
        if not self.durations:
            return "no calls"
        total = sum(self.durations)
        median = statistics.median(self.durations)
        return (
            f"{len(self.durations)} calls in {total * 1000:.0f} ms, median {median * 1000:.2f} ms"
        )


@contextmanager
def _step(store: SessionStore, title: str, out: TextIO) -> Iterator[_Timer]:
    """Time the calls of one step and print them with the counters they moved."""
    before = store.stats()
    timer = _Timer()
    yield timer
    after = store.stats()
    moved = ", ".join(f"{name} {after[name] - before[name]}" for name in REPORTED)
    print(f"  {title:<34} {timer.summary():<36} [{moved}]", file=out)


def _message_record(message: Message) -> dict[str, Any]:
    return {"seq": message.seq, "id": message.id, "role": message.role, "content": message.content}


def _session_record(session: Session, messages: list[Message]) -> dict[str, Any]:
    return {
        "id": session.id,
        "user_id": session.user_id,
        "data": session.data,
        "version": session.version,
        "created_at": session.created_at.isoformat(),
        "messages": [_message_record(message) for message in messages],
    }


def _describe(backends: Backends, out: TextIO) -> None:
    print(f"  PostgreSQL tier: {backends.docstore}", file=out)
    print(f"  Redis tier:      {backends.cache}", file=out)


def _open_store(
    out: TextIO, open_store: Callable[[], SessionStore] = get_session_store
) -> SessionStore:
    started = time.perf_counter()
    store = open_store()
    print(f"  store opened in {(time.perf_counter() - started) * 1000:.0f} ms", file=out)
    return store


def _read_all(
    store: SessionStore, ids: list[str], timer: _Timer
) -> dict[str, tuple[Session | None, list[Message]]]:
    found: dict[str, tuple[Session | None, list[Message]]] = {}
    for session_id in ids:
        session = timer(functools.partial(store.get_session, session_id))
        messages = timer(functools.partial(store.get_messages, session_id))
        found[session_id] = (session, messages)
    return found


def run_demo(
    *,
    sessions: int = DEFAULT_SESSIONS,
    messages: int = DEFAULT_MESSAGES,
    keep: bool = False,
    key_prefix: str = DEFAULT_KEY_PREFIX,
    out: TextIO | None = None,
) -> int:
    """Run the demo in this process and a restarted one; return the exit status."""
    out = out or sys.stdout
    run = secrets.token_hex(4)
    backends = describe_backends()
    print(f"docstore-session demo, run {run}", file=out)
    _describe(backends, out)
    with _open_store(out, functools.partial(get_session_store, key_prefix=key_prefix)) as store:
        ids: list[str] = []
        with _step(store, f"write {sessions} sessions x {messages} msgs", out) as timer:
            for number in range(sessions):
                data = {"title": f"conversation {number}", "run": run}
                created = timer(functools.partial(store.create_session, f"demo-{run}", data))
                ids.append(created.id)
                for turn in range(1, messages + 1):
                    role = "user" if turn % 2 else "assistant"
                    content = f"{role} turn {turn} of {run}"
                    timer(
                        functools.partial(
                            store.add_message, created.id, role, content, message_id=f"m{turn}"
                        )
                    )
        with _step(store, "read 1 (fills the message cache)", out) as timer:
            first = _read_all(store, ids, timer)
        with _step(store, "read 2 (hot: Redis only)", out) as timer:
            second = _read_all(store, ids, timer)
        problems = [
            f"session {short_hash(sid)}: the hot read differs from the first read"
            for sid in ids
            if first[sid] != second[sid]
        ]
        expected = []
        for sid in ids:
            session, conversation = first[sid]
            if session is None:
                problems.append(f"session {short_hash(sid)} vanished")
                continue
            expected.append(_session_record(session, conversation))

        try:
            if not backends.persistent:
                print("restart skipped: the memory store keeps nothing across processes", file=out)
            else:
                problems += _restart(run, expected, key_prefix, out)
                problems += _continue(store, ids, messages, out)
        finally:
            if keep:
                print(f"  kept {len(ids)} sessions of user demo-{run}", file=out)
            else:
                with _step(store, "delete the demo sessions", out) as timer:
                    for sid in ids:
                        timer(functools.partial(store.delete_session, sid))
    return _verdict(problems, out)


def _restart(run: str, expected: list[dict[str, Any]], key_prefix: str, out: TextIO) -> list[str]:
    """Run `demo --recover` in a new process; return what went wrong."""
    descriptor, path = tempfile.mkstemp(prefix="session-demo-", suffix=".json")
    try:
        # The file holds session ids: mkstemp makes it readable by this user only.
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            json.dump({"run": run, "sessions": expected}, handle)
        print("restart: a new process recovers every conversation", file=out, flush=True)
        out.flush()
        started = time.perf_counter()
        try:
            completed = subprocess.run(
                [sys.executable, "-m", "session", "demo", "--recover", path]
                + ["--key-prefix", key_prefix],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                timeout=RESTART_TIMEOUT,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return [f"the restarted process did not finish within {RESTART_TIMEOUT:.0f} s"]
        out.write(completed.stdout)
        elapsed = (time.perf_counter() - started) * 1000
        print(f"  restarted process exited {completed.returncode} after {elapsed:.0f} ms", file=out)
    finally:
        os.unlink(path)
    if completed.returncode != EXIT_OK:
        return [f"the restarted process failed (exit status {completed.returncode})"]
    return []


def _continue(store: SessionStore, ids: list[str], messages: int, out: TextIO) -> list[str]:
    """Append one message to every conversation after the restart; return what went wrong."""
    problems: list[str] = []
    with _step(store, "continue each conversation", out) as timer:
        for sid in ids:
            added = timer(functools.partial(store.add_message, sid, "user", "back after restart"))
            conversation = timer(functools.partial(store.get_messages, sid))
            seqs = [message.seq for message in conversation]
            if added.seq != messages + 1 or seqs != list(range(1, messages + 2)):
                problems.append(f"session {short_hash(sid)}: continued out of order ({seqs})")
    return problems


def recover(path: str, *, key_prefix: str = DEFAULT_KEY_PREFIX, out: TextIO | None = None) -> int:
    """Read back every conversation recorded in `path`, cold then hot; return the exit status."""
    out = out or sys.stdout
    with open(path, encoding="utf-8") as handle:
        recorded = json.load(handle)
    run: str = recorded["run"]
    expected: list[dict[str, Any]] = recorded["sessions"]
    ids = [record["id"] for record in expected]
    backends = describe_backends()
    print(f"  [pid {os.getpid()}] restarted with an empty cache", file=out)
    own_prefix = key_prefix
    if backends.shared_cache:
        # The first process's copies are in this Redis: start from a namespace of our
        # own, next to the first one's (not inside it, where its fence would meet it).
        own_prefix = f"{key_prefix.rstrip(':')}-restart-{run}:"
    open_store = functools.partial(
        get_session_store, key_prefix=own_prefix, cache_ttl=RESTART_CACHE_TTL
    )
    problems: list[str] = []
    try:
        with _open_store(out, open_store) as store:
            with _step(store, "read 1 (cold: from PostgreSQL)", out) as timer:
                cold = _read_all(store, ids, timer)
            with _step(store, "read 2 (hot: Redis only)", out) as timer:
                hot = _read_all(store, ids, timer)
            if store.stats()["misses"] < len(ids):
                problems.append("the cold read was answered by a cache that should be empty")
    finally:
        if backends.shared_cache:
            _drop_copies(own_prefix, ids)
    for record in expected:
        sid = record["id"]
        label = f"session {short_hash(sid)}"
        session, conversation = cold[sid]
        if session is None:
            problems.append(f"{label}: not recovered")
            continue
        if _session_record(session, conversation) != record:
            problems.append(f"{label}: recovered differently from what was written")
        if hot[sid] != cold[sid]:
            problems.append(f"{label}: the hot read differs from the cold read")
        seqs = [message.seq for message in conversation]
        if seqs != list(range(1, len(record["messages"]) + 1)):
            problems.append(f"{label}: messages out of order ({seqs})")
    if not problems:
        total = sum(len(record["messages"]) for record in expected)
        print(
            f"  recovered {len(expected)} sessions and {total} messages, intact and in order",
            file=out,
        )
    return _verdict(problems, out, final=False)


def _drop_copies(key_prefix: str, ids: list[str]) -> None:
    """Delete this process's copies from the shared Redis: nobody would invalidate them."""
    with redis_client_from_url(os.environ[REDIS_VARIABLE]) as client:
        keys = [key for sid in ids for key in session_keys(key_prefix, sid).all()]
        if keys:
            client.delete(*keys)


def _verdict(problems: list[str], out: TextIO, *, final: bool = True) -> int:
    for problem in problems:
        print(f"  PROBLEM: {problem}", file=out)
    if problems:
        print("demo FAILED", file=out)
        return EXIT_MISMATCH
    if final:
        print("demo OK", file=out)
    return EXIT_OK
