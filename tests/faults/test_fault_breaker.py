"""A store whose breaker is still open after Redis came back must not leave stale copies.

The breaker is one process's guess that Redis is down. Once Redis is healthy,
a write that returned must be seen by every reader, in this process or another,
even if the writer's breaker is still cooling down (API.md: "with Redis
healthy, once a write has returned no reader anywhere sees an older version").
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from contract.session_contract import FakeClock
from fault_proxy import FaultProxy
from fault_redis import RedisProcess
from fault_summary import FaultSummary

from session import SessionStore

pytestmark = [pytest.mark.faults, pytest.mark.embedded]


def test_a_write_behind_an_open_breaker_reaches_another_client(
    make_session_store: Callable[..., SessionStore],
    redis_proxy: FaultProxy,
    fault_summary: FaultSummary,
) -> None:
    # Two clients of one redis-server: the writer through the proxy, the reader directly.
    writer = make_session_store(clock=FakeClock(), breaker_threshold=1, breaker_cooldown=3600)
    reader = make_session_store(proxied=False)
    session = writer.create_session(data={"n": 1})
    assert reader.get_session(session.id) == session
    assert reader.get_messages(session.id) == []
    redis_proxy.cut()
    try:
        assert writer.get_session(session.id) == session  # from PostgreSQL; the breaker opens
    finally:
        redis_proxy.resume()
    fault_summary.add_fault("redis connection cut")
    assert writer.stats()["breaker_open"] == 1
    updated = writer.update_session(session.id, {"n": 2})
    assert reader.get_session(session.id) == updated
    message = writer.add_message(session.id, "user", "hi")
    assert reader.get_messages(session.id) == [message]
    fault_summary.add_operations(6)


def test_a_write_behind_an_open_breaker_reaches_another_process(
    embedded_dsn: str,
    pg_table: str,
    redis_process: RedisProcess,
    key_prefix: str,
    make_session_store: Callable[..., SessionStore],
    fault_summary: FaultSummary,
) -> None:
    reader = make_session_store(proxied=False)
    session = reader.create_session(data={"n": 1})
    assert reader.get_session(session.id) == session  # cached in this process
    assert reader.get_messages(session.id) == []
    writer = subprocess.run(
        [
            sys.executable,
            str(Path(__file__).with_name("fault_breaker_writer.py")),
            embedded_dsn,
            pg_table,
            str(redis_process.port),
            key_prefix,
            session.id,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert writer.returncode == 0, writer.stderr
    fault_summary.add_fault("redis connection cut")
    word, version, message_id = writer.stdout.split()
    assert word == "WROTE"
    current = reader.get_session(session.id)
    # The update returned `version`; the append after it bumped the session once more.
    assert current is not None and current.version == int(version) + 1
    assert current.data == {"n": 2}
    assert [m.id for m in reader.get_messages(session.id)] == [message_id]
    fault_summary.add_operations(6)
