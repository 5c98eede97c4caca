"""Redis fails over to a replica that lags: nothing stale served, nothing acknowledged lost.

Replication is asynchronous: a replica may miss the last writes' scripts, so
once promoted it can hold copies older than what a write returned. Each test
starts a master and a replica (`REPLICAOF` through a proxy the test can
partition, so the replica lags on purpose), writes through the store while the
replica lags, promotes the replica (`REPLICAOF NO ONE`) and moves the clients'
address to it (the proxy in front of Redis is retargeted, as DNS or a managed
endpoint does), then checks every reader against PostgreSQL: sync stores, and asyncio ones
(`AsyncReader`) sharing the prefix, long-lived or new after the failover.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis
from fault_async import AsyncReader
from fault_proxy import FaultProxy
from fault_redis import RedisProcess
from fault_summary import FaultSummary

from docstore import PostgresDocumentStore
from session import Session, SessionStore
from session.coherence import session_keys
from session.serializer import decode_session

pytestmark = [pytest.mark.faults, pytest.mark.embedded]


def admin(server: RedisProcess) -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=server.port, socket_timeout=5)


def wait_for_link(replica: redis.Redis, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while replica.info("replication").get("master_link_status") != "up":
        assert time.monotonic() < deadline, "the replica never synced"
        time.sleep(0.02)  # polling a replication handshake, with a deadline


@contextmanager
def replica_of(
    replica: RedisProcess, source: RedisProcess
) -> Iterator[tuple[redis.Redis, FaultProxy]]:
    """Make `replica` replicate `source` through a proxy; yield its admin client and the link."""
    with FaultProxy(("127.0.0.1", source.port)) as link:
        client = admin(replica)
        try:
            client.replicaof("127.0.0.1", link.port)
            wait_for_link(client)
            yield client, link
        finally:
            client.close()


def cached_version(client: redis.Redis, key_prefix: str, session_id: str) -> int | None:
    raw = client.get(session_keys(key_prefix, session_id).value)
    if raw is None:
        return None
    return decode_session(raw, session_id).session.version


def check_every_reader(
    readers: list[SessionStore | AsyncReader], truth: SessionStore, sessions: list[Session]
) -> int:
    """Every reader serves exactly what PostgreSQL holds; return how many reads."""
    reads = 0
    for session in sessions:
        expected = truth.get_session(session.id)
        messages = [m.id for m in truth.get_messages(session.id)]
        for reader in readers:
            assert reader.get_session(session.id) == expected
            assert [m.id for m in reader.get_messages(session.id)] == messages
            reads += 2
    return reads


def write_while_lagging(
    writer: SessionStore, sessions: list[Session], label: str
) -> tuple[list[Session], str]:
    """Update all but the last session, append to the first, delete the last."""
    written = [writer.update_session(s.id, {"n": label}) for s in sessions[:-1]]
    message = writer.add_message(sessions[0].id, "user", label, message_id=label)
    assert writer.delete_session(sessions[-1].id) is True
    return written, message.id


def test_failover_to_a_lagging_replica(
    make_session_store: Callable[..., SessionStore],
    make_docstore: Callable[..., PostgresDocumentStore],
    make_async_reader: Callable[[], AsyncReader],
    redis_process: RedisProcess,
    redis_proxy: FaultProxy,
    key_prefix: str,
    tmp_path: Path,
    fault_summary: FaultSummary,
) -> None:
    master = admin(redis_process)
    replica_process = RedisProcess(tmp_path / "replica").start()
    try:
        with replica_of(replica_process, redis_process) as (replica, link):
            writer, reader = make_session_store(), make_session_store()
            async_reader = make_async_reader()  # an asyncio service reading the same sessions
            truth = make_session_store(cached=False, docstore=make_docstore(proxied=False))
            sessions = [writer.create_session(data={"n": "before"}) for _ in range(4)]
            writer.add_message(sessions[0].id, "user", "first", message_id="first")
            check_every_reader([reader, writer, async_reader], truth, sessions)  # all cached
            assert master.wait(1, 5000) == 1  # ... and on the replica
            assert cached_version(replica, key_prefix, sessions[1].id) == 1

            link.partition()  # the replica stops receiving: it lags from here on
            written, _ = write_while_lagging(writer, sessions, "while lagging")
            # The replica really missed the writes: it still holds the old copies.
            assert cached_version(replica, key_prefix, sessions[1].id) == 1
            assert cached_version(master, key_prefix, sessions[1].id) == written[1].version

            fault_summary.add_fault("redis failover to a lagging replica")
            replica.replicaof("NO", "ONE")
            redis_proxy.retarget(("127.0.0.1", replica_process.port))
            newcomer = make_session_store()
            async_newcomer = make_async_reader()
            reads = check_every_reader(
                [reader, writer, newcomer, async_reader, async_newcomer], truth, sessions
            )
            # And the promoted server caches again, fresh.
            reads += check_every_reader([reader, newcomer, async_reader], truth, sessions)
            assert cached_version(replica, key_prefix, sessions[1].id) == written[1].version
            fault_summary.add_operations(reads + 9)
    finally:
        master.close()
        replica_process.stop()


def test_failover_back_to_a_former_master_that_lags(
    make_session_store: Callable[..., SessionStore],
    make_docstore: Callable[..., PostgresDocumentStore],
    make_async_reader: Callable[[], AsyncReader],
    redis_process: RedisProcess,
    redis_proxy: FaultProxy,
    key_prefix: str,
    tmp_path: Path,
    fault_summary: FaultSummary,
) -> None:
    """A → B, then back to A: A kept the scripts the stores loaded while it was master
    (a replica keeps its script cache through a full sync), so the scripts being
    present must not be taken as "this server has been fenced": A's promotion
    gave it a new replication id, hence other script SHAs."""
    first = admin(redis_process)
    second_process = RedisProcess(tmp_path / "second").start()
    second = admin(second_process)
    try:
        writer, reader = make_session_store(), make_session_store()
        async_reader = make_async_reader()
        truth = make_session_store(cached=False, docstore=make_docstore(proxied=False))
        sessions = [writer.create_session(data={"n": "before"}) for _ in range(4)]
        check_every_reader([reader, writer, async_reader], truth, sessions)  # scripts on A
        # Fail over to B (in sync), and let the stores use it.
        with replica_of(second_process, redis_process) as (_, link):
            assert first.wait(1, 5000) == 1
        second.replicaof("NO", "ONE")
        redis_proxy.retarget(("127.0.0.1", second_process.port))
        check_every_reader([reader, writer, async_reader], truth, sessions)
        # A comes back as B's replica, alive: its script cache survives the sync.
        with replica_of(redis_process, second_process) as (_, link):
            check_every_reader([reader, writer, async_reader], truth, sessions)
            assert second.wait(1, 5000) == 1
            link.partition()  # A lags from here on
            written, _ = write_while_lagging(writer, sessions, "while A lags")
            assert cached_version(first, key_prefix, sessions[1].id) != written[1].version
            fault_summary.add_fault("redis failover back to a lagging former master")
            first.replicaof("NO", "ONE")
            redis_proxy.retarget(("127.0.0.1", redis_process.port))
        newcomer = make_session_store()
        reads = check_every_reader([reader, writer, newcomer, async_reader], truth, sessions)
        fault_summary.add_operations(reads + 9)
    finally:
        first.close()
        second.close()
        second_process.stop()
