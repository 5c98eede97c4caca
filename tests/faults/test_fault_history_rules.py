"""The history checker's rules, each pinned by a made-up history it must flag and one it must not.

No servers: the histories are written by hand, and "PostgreSQL after the run"
is a dictionary. The fault schedule is the one `test_history_checker.py` runs
(cache_ttl 3 s), whose Redis windows, extended by cache_ttl, join up: the old
checker excused every stale read after the first fault that way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from fault_history import RECOVERY_MARGIN, FaultWindow, Op, check

CACHE_TTL = 3.0
BOUND = 2.0
S = "session-a"


def schedule() -> list[FaultWindow]:
    """The windows of the real schedule: 1.5 s warm-up, each fault then 1 s healthy."""
    faults = [
        ("redis SIGSTOP", True, 1.5),
        ("redis partition", True, 1.5),
        ("postgres partition", False, 1.5),
        ("redis kill -9, restart with AOF", True, 1.0),
        ("postgres connection cut", False, 1.0),
        ("redis kill -9, restart empty", True, 0.5),
    ]
    windows, now = [], 1.5
    for kind, is_redis, length in faults:
        windows.append(FaultWindow(kind, now, now + length, is_redis))
        now += length + 1.0
    return windows


WINDOWS = schedule()  # SIGSTOP 1.5-3.0, partition 4.0-5.5, pg 6.5-8.0, AOF 9.0-10.0, ...
HEALTHY_GAP = 8.6  # between the PostgreSQL partition and the next Redis fault


@dataclass
class Stored:
    data: dict[str, int]


@dataclass
class StoredMessage:
    id: str
    seq: int


@dataclass
class FakeTruth:
    """What PostgreSQL holds after the run."""

    sessions: dict[str, Stored] = field(default_factory=dict)
    messages: dict[str, list[StoredMessage]] = field(default_factory=dict)

    def get_session(self, session_id: str) -> Stored | None:
        return self.sessions.get(session_id)

    def get_messages(self, session_id: str) -> list[StoredMessage]:
        return self.messages.get(session_id, [])


def truth_for(ops: Sequence[Op]) -> FakeTruth:
    """A PostgreSQL that holds exactly what the history acknowledged."""
    truth = FakeTruth(sessions={S: Stored({})})
    for op in ops:
        if op.ok and op.kind == "update" and op.value is not None:
            truth.sessions[op.session].data[op.worker] = op.value
        if op.ok and op.kind == "append" and op.seq is not None and op.message_id is not None:
            truth.messages.setdefault(op.session, []).append(StoredMessage(op.message_id, op.seq))
    for messages in truth.messages.values():
        messages.sort(key=lambda message: message.seq)
    return truth


def run(ops: list[Op], windows: Sequence[FaultWindow] = WINDOWS, truth: Any = None) -> list[str]:
    return check(
        ops,
        truth=truth if truth is not None else truth_for(ops),
        session_ids=[S],
        windows=windows,
        cache_ttl=CACHE_TTL,
        latency_bound=BOUND,
    )


def update(start: float, version: int, *, end: float | None = None, value: int = 1) -> Op:
    return Op("w", "update", S, start, end if end is not None else start + 0.01, version=version,
              value=value)  # fmt: skip


def get(start: float, version: int | None, *, session: str = S, end: float | None = None) -> Op:
    return Op("r", "get", session, start, end if end is not None else start + 0.01,
              version=version, gone=version is None)  # fmt: skip


def append(start: float, seq: int, *, end: float | None = None) -> Op:
    return Op("w", "append", S, start, end if end is not None else start + 0.01,
              message_id=f"m{seq}", seq=seq)  # fmt: skip


def messages(start: float, seqs: list[int]) -> Op:
    return Op("r", "messages", S, start, start + 0.01, seqs=seqs)


# -- errors and latency -----------------------------------------------------------


def test_an_untyped_error_is_flagged() -> None:
    op = get(0.2, None)
    op.error = "redis.exceptions.TimeoutError"
    assert any("untyped error" in v for v in run([op]))


def test_a_typed_error_is_not_flagged() -> None:
    op = get(0.2, None)
    op.error = "session.errors.StoreUnavailable"
    assert run([op]) == []


def test_a_slow_call_is_flagged_and_a_fast_one_is_not() -> None:
    assert any("took 2.10 s" in v for v in run([update(0.1, 2, end=2.2)]))
    assert run([update(0.1, 2, end=2.0)]) == []


# -- durability ---------------------------------------------------------------------


def test_a_lost_update_is_flagged() -> None:
    ops = [update(0.1, 2, value=5)]
    truth = truth_for(ops)
    truth.sessions[S].data["w"] = 4
    assert any("lost update" in v for v in run(ops, truth=truth))


def test_a_kept_update_is_not_flagged() -> None:
    assert run([update(0.1, 2, value=5)]) == []


def test_a_lost_or_moved_message_is_flagged() -> None:
    ops = [append(0.1, 1), append(0.2, 2)]
    truth = truth_for(ops)
    truth.messages[S] = [StoredMessage("m1", 1)]
    assert any("acked message m2" in v for v in run(ops, truth=truth))
    truth.messages[S] = [StoredMessage("m2", 1), StoredMessage("m1", 2)]
    assert any("is stored as" in v for v in run(ops, truth=truth))


def test_stored_messages_with_a_gap_or_a_duplicate_are_flagged() -> None:
    ops = [append(0.1, 1)]
    truth = truth_for(ops)
    truth.messages[S] = [StoredMessage("m1", 1), StoredMessage("x", 3)]
    assert any("not 1..n" in v for v in run(ops, truth=truth))
    truth.messages[S] = [StoredMessage("m1", 1), StoredMessage("m1", 2)]
    assert any("duplicate" in v for v in run(ops, truth=truth))


def test_kept_messages_are_not_flagged() -> None:
    assert run([append(0.1, 1), append(0.2, 2)]) == []


# -- stale session reads ----------------------------------------------------------------


def test_a_stale_read_long_after_the_faults_is_flagged() -> None:
    """Issue 14's example: write at 0.5 s, stale read at 14.9 s, Redis healthy at both."""
    ops = [update(0.5, 2), get(14.9, 1)]
    assert any("stale read" in v for v in run(ops))
    assert any("stale read" in v for v in run(ops, windows=[]))


def test_a_stale_read_in_a_healthy_gap_is_flagged() -> None:
    ops = [update(HEALTHY_GAP - 0.3, 2), get(HEALTHY_GAP, 1)]
    assert any("stale read" in v for v in run(ops))


def test_a_stale_read_around_a_postgres_fault_only_is_flagged() -> None:
    ops = [update(6.6, 2, end=7.9), get(8.0, 1)]  # the write overlaps the PostgreSQL partition
    assert any("stale read" in v for v in run(ops))


def test_a_stale_read_during_a_redis_fault_is_not_flagged() -> None:
    assert run([update(0.5, 2), get(2.0, 1)]) == []


def test_a_stale_read_within_the_recovery_margin_is_not_flagged() -> None:
    assert run([update(0.5, 2), get(3.0 + RECOVERY_MARGIN - 0.05, 1)]) == []


def test_a_stale_read_past_the_recovery_margin_of_an_earlier_write_is_flagged() -> None:
    # The write returned before the fault: its cache update reached Redis.
    ops = [update(0.5, 2), get(3.0 + RECOVERY_MARGIN + 0.1, 1)]
    assert any("stale read" in v for v in run(ops))


def test_a_write_during_a_redis_fault_excuses_reads_for_cache_ttl() -> None:
    ops = [update(2.0, 2), get(2.0 + CACHE_TTL - 0.1, 1)]
    assert run(ops) == []


def test_a_write_during_a_redis_fault_excuses_nothing_after_cache_ttl() -> None:
    windows = [FaultWindow("redis SIGSTOP", 1.5, 3.0, True)]
    ops = [update(2.0, 2), get(2.0 + CACHE_TTL + 0.2, 1)]
    assert any("stale read" in v for v in run(ops, windows=windows))


def test_a_write_after_redis_recovered_excuses_nothing() -> None:
    """The breaker may still be open in the writer's process: no excuse (issue 8)."""
    windows = [FaultWindow("redis SIGSTOP", 1.5, 3.0, True)]
    ops = [update(3.6, 2), get(3.65, 1)]
    assert any("stale read" in v for v in run(ops, windows=windows))


def test_a_current_read_is_not_flagged() -> None:
    assert run([update(0.5, 2), get(14.9, 2), get(15.0, 3)]) == []


# -- deleted and live sessions ---------------------------------------------------------------


def delete(start: float, session: str) -> Op:
    return Op("w", "delete", session, start, start + 0.01, gone=True)


def test_a_deleted_session_read_back_while_healthy_is_flagged() -> None:
    ops = [delete(HEALTHY_GAP - 0.3, "p"), get(HEALTHY_GAP, 1, session="p")]
    assert any("read back" in v for v in run(ops))


def test_a_deleted_session_read_back_during_a_redis_fault_is_not_flagged() -> None:
    assert run([delete(0.5, "p"), get(2.0, 1, session="p")]) == []


def test_none_for_a_live_session_is_flagged_even_during_a_redis_fault() -> None:
    assert any("None for live session" in v for v in run([get(HEALTHY_GAP, None)]))
    assert any("None for live session" in v for v in run([get(2.0, None)]))


def test_none_after_a_delete_is_not_flagged() -> None:
    create = Op("w", "create", "p", 0.1, 0.11, version=1)
    assert run([create, delete(0.2, "p"), get(0.3, None, session="p")]) == []


# -- message reads -------------------------------------------------------------------------


def test_a_messages_read_missing_an_acknowledged_message_is_flagged() -> None:
    ops = [append(HEALTHY_GAP - 0.3, 1), append(HEALTHY_GAP - 0.2, 2), messages(HEALTHY_GAP, [1])]
    assert any("missing" in v for v in run(ops))
    ops = [append(HEALTHY_GAP - 0.3, 1), messages(HEALTHY_GAP, [])]
    assert any("missing" in v for v in run(ops))


def test_a_messages_read_with_every_acknowledged_message_is_not_flagged() -> None:
    ops = [append(HEALTHY_GAP - 0.3, 1), append(HEALTHY_GAP - 0.2, 2)]
    assert run([*ops, messages(HEALTHY_GAP, [1, 2])]) == []


def test_a_messages_read_missing_a_message_written_during_a_redis_fault_is_not_flagged() -> None:
    assert run([append(0.5, 1), append(2.0, 2), messages(2.0 + CACHE_TTL - 0.1, [1])]) == []


@pytest.mark.parametrize("seqs", [[1, 3], [2, 1], list(range(2, 22)) + [23], list(range(3, 22))])
def test_a_messages_read_with_a_gap_or_cut_short_is_flagged(seqs: list[int]) -> None:
    assert any("gaps or cut short" in v for v in run([messages(0.2, seqs)]))


def test_the_newest_twenty_are_not_flagged() -> None:
    ops = [append(0.01 * n, n) for n in range(1, 26)] + [messages(0.5, list(range(6, 26)))]
    assert run(ops) == []
