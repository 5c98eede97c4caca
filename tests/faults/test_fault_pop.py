"""pop_message and clear_messages while Redis is paused (SIGSTOP).

The removal must commit in PostgreSQL within the usual bound, and once Redis
is back no reader may see a removed message: the store that removed it drops
its stale tail before its next Redis call, and another process's copy lives at
most cache_ttl.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial

import pytest
from fault_redis import RedisProcess
from fault_summary import FaultSummary
from test_fault_redis import CACHE_TTL, fault

from session import Message, SessionStore

pytestmark = [pytest.mark.faults, pytest.mark.embedded]


def poll_until_messages(store: SessionStore, session_id: str, expected: list[Message]) -> None:
    """Assert `store` serves `expected` within cache_ttl (+1 s): no removed message lingers."""
    deadline = time.monotonic() + CACHE_TTL + 1
    while store.get_messages(session_id, limit=5) != expected[-5:]:
        assert time.monotonic() < deadline, "a removed message outlived cache_ttl"
        time.sleep(0.05)  # polling with a deadline
    assert store.get_messages(session_id) == expected


def test_pop_and_clear_while_redis_is_paused(
    make_session_store: Callable[..., SessionStore],
    redis_process: RedisProcess,
    fault_summary: FaultSummary,
) -> None:
    store = make_session_store(cache_ttl=CACHE_TTL)
    other = make_session_store(cache_ttl=CACHE_TTL)  # another process: knows nothing pending
    popped_from = store.create_session()
    cleared = store.create_session()
    added = [store.add_message(popped_from.id, "user", f"m{i}") for i in range(6)]
    store.add_message(cleared.id, "user", "x")
    for reader in (store, other):  # both hold the sessions and their tails
        assert reader.get_messages(popped_from.id, limit=5) == added[-5:]
        assert len(reader.get_messages(cleared.id, limit=5)) == 1
    with fault(fault_summary, "redis SIGSTOP during pop/clear") as timed:
        redis_process.pause()
        try:
            assert timed(partial(store.pop_message, popped_from.id)) == added[-1]
            assert timed(partial(store.pop_message, popped_from.id)) == added[-2]
            assert timed(partial(store.clear_messages, cleared.id)) == 1
            assert timed(partial(store.get_messages, popped_from.id)) == added[:-2]
            assert timed(partial(store.get_messages, cleared.id)) == []
        finally:
            redis_process.resume()
    assert store.stats()["cache_errors"] > 0
    # This store removes the tails it could not update before its next Redis call.
    assert store.get_messages(popped_from.id, limit=5) == added[-6:-2]
    assert store.get_messages(cleared.id) == []
    poll_until_messages(other, popped_from.id, added[:-2])
    poll_until_messages(other, cleared.id, [])
    # The conversation goes on after the highest seq ever given out.
    assert store.add_message(popped_from.id, "user", "next").seq == 7
